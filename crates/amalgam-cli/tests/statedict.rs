//! Plain state dicts (safetensors files without config.json, names of no Hugging Face
//! architecture) whose tensor sets differ, merged with `--tensor-union` / `--tensor-intersection`:
//! parity with mergekit-pytorch 0.1.5 (fixtures from scripts/gen_statedict_fixtures.py), every
//! tensor within 1e-5 and the same tensor set; then the refusals.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/statedict")
}

parity_cases!(
    fixtures(), 1e-5;
    linear_union,
    linear_intersection,
    ties_union,
    task_arithmetic_intersection
);

/// `yaml` (paths relative to the fixtures) with `flags` fails naming every `expect`; nothing is
/// written.
fn refused(yaml: &str, flags: &[&str], expect: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.yml");
    let m = fixtures().join("models");
    std::fs::write(&cfg, yaml.replace("$M/", &format!("{}/", m.display()))).unwrap();
    let out = d.path().join("out");
    let mut args = vec!["merge", s(&cfg), s(&out), "-q"];
    args.extend(flags);
    let err = fails(&args);
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(!out.exists(), "nothing written");
}

#[test]
fn differing_tensor_sets_are_refused_unless_a_flag_says_what_to_merge() {
    let linear = "merge_method: linear\nmodels:\n  - {model: $M/ft_a.safetensors, parameters: {weight: 1}}\n  - {model: $M/ft_b.safetensors, parameters: {weight: 1}}\n";
    refused(
        linear,
        &[],
        &[
            "ft_b.safetensors",
            "--tensor-union or --tensor-intersection",
        ],
    );
    // A method that needs the base, for a tensor the base lacks.
    refused(
        "merge_method: ties\nbase_model: $M/base.safetensors\nmodels:\n  - {model: $M/ft_b.safetensors, parameters: {weight: 1, density: 0.5}}\n",
        &["--tensor-union"],
        &["time_embedding.linear_1.weight", "base model"],
    );
    refused(
        "merge_method: linear\nslices:\n  - sources:\n      - {model: $M/ft_a.safetensors, layer_range: [0, 1]}\n",
        &["--tensor-intersection"],
        &["not slices:"],
    );
    let out = amalgam(&[
        "merge",
        "x.yml",
        "out",
        "--tensor-union",
        "--tensor-intersection",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
