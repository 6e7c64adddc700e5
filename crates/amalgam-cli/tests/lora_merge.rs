//! `amalgam lora merge` against PEFT's `add_weighted_adapter` (fixtures from
//! scripts/gen_lora_fixtures.py, peft 0.21.2): the delta `s·B·A` of every module is compared, so
//! the factors' rotation and padding do not matter. Also the exact amalgam-method merges, KnOTS,
//! DARE's statistics, and config errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use amalgam::lora::Adapter;
use common::*;

fn lora_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

/// Every module's `s·ΔW` (row-major, the base tensor's shape) by base tensor name.
fn deltas(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let a = Adapter::open(dir).unwrap();
    a.modules
        .iter()
        .map(|(name, m)| {
            let (fa, fb) = a.factors(m).unwrap();
            let mut d = vec![0.0; m.shape[0] * m.shape[1]];
            m.add_delta_rows(&fa, &fb, 1.0, 0..m.shape[0], &mut d, &mut Vec::new());
            (name.clone(), d)
        })
        .collect()
}

/// The worst norm-relative difference between the deltas of two adapters (same modules).
fn worst(ours: &Path, theirs: &Path) -> f64 {
    let (a, b) = (deltas(ours), deltas(theirs));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "modules of {ours:?} and {theirs:?}"
    );
    a.iter()
        .map(|(name, x)| {
            let y = &b[name];
            let diff: f64 = x.iter().zip(y).map(|(p, q)| f64::from(p - q).powi(2)).sum();
            let norm: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum();
            (diff / norm.max(1e-30)).sqrt()
        })
        .fold(0.0, f64::max)
}

/// Run `lora merge` on `config` (a path relative to the lora fixture directory, or YAML text
/// written there) from that directory.
fn merge(config: &str, out: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(lora_dir())
        .args(["lora", "merge", config, s(out), "-q"])
        .output()
        .unwrap()
}

fn merge_text(yaml: &str, dir: &Path, out: &Path) -> std::process::Output {
    let cfg = dir.join("c.yml");
    std::fs::write(&cfg, yaml).unwrap();
    merge(s(&cfg), out)
}

fn succeeded(run: &std::process::Output) {
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn combination_types_match_peft_add_weighted_adapter() {
    let mut cases: Vec<String> = std::fs::read_dir(lora_dir().join("merged"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".yml").map(str::to_string)
        })
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 8, "{cases:?}");
    let d = tempfile::tempdir().unwrap();
    for case in cases {
        let out = d.path().join(&case);
        succeeded(&merge(&format!("merged/{case}.yml"), &out));
        let w = worst(&out, &lora_dir().join("merged").join(&case));
        eprintln!("{case}: worst norm-relative ΔW error {w:e}");
        assert!(w <= 1e-5, "{case}: worst norm-relative ΔW error {w:e}");
    }
}

const ADAPTERS: &str = "adapters:\n  - {adapter: adapters/m1, weight: 0.7}\n  - {adapter: adapters/m2, weight: 0.5}\n  - {adapter: adapters/m3, weight: -0.3}\n";

#[test]
fn merge_method_task_arithmetic_is_the_exact_weighted_sum() {
    // task_arithmetic on the deltas is Σ w_i ΔW_i, which `cat` represents exactly; re-factored
    // at a rank that holds it (4 + 4 + 2), the two agree.
    let d = tempfile::tempdir().unwrap();
    let ta = d.path().join("ta");
    let yaml = format!("merge_method: task_arithmetic\nsvd_rank: 10\n{ADAPTERS}");
    succeeded(&merge_text(&yaml, d.path(), &ta));
    let w = worst(&ta, &lora_dir().join("merged/cat"));
    assert!(w <= 1e-5, "task_arithmetic vs cat: {w:e}");
    // KnOTS alignment is a change of basis: with the plain sum it changes nothing.
    let knots = d.path().join("knots");
    let yaml = format!("merge_method: task_arithmetic\nknots: true\nsvd_rank: 10\n{ADAPTERS}");
    succeeded(&merge_text(&yaml, d.path(), &knots));
    let w = worst(&knots, &lora_dir().join("merged/cat"));
    assert!(w <= 1e-5, "KnOTS task_arithmetic vs cat: {w:e}");
    // Exact TIES on the deltas differs from PEFT's factor-space ties (cross terms).
    let ties = d.path().join("ties");
    let yaml = "merge_method: ties\nparameters: {density: 0.5}\nadapters:\n  - {adapter: adapters/m1, weight: 0.7}\n  - {adapter: adapters/m2, weight: -0.5}\n";
    succeeded(&merge_text(yaml, d.path(), &ties));
    let w = worst(&ties, &lora_dir().join("merged/ties"));
    assert!(
        w > 1e-2,
        "exact TIES should not equal factor-space TIES ({w:e})"
    );
    // KnOTS-TIES runs and gives a different merge from plain TIES.
    let kt = d.path().join("knots_ties");
    let yaml = std::fs::read_to_string(d.path().join("c.yml"))
        .unwrap()
        .replace("merge_method: ties\n", "merge_method: ties\nknots: true\n");
    succeeded(&merge_text(&yaml, d.path(), &kt));
    assert!(worst(&kt, &ties) > 1e-3);
}

#[test]
fn dare_at_full_density_is_linear_and_is_seeded() {
    let d = tempfile::tempdir().unwrap();
    let two = "adapters:\n  - {adapter: adapters/m1, weight: 0.7}\n  - {adapter: adapters/m2, weight: 0.5}\n";
    let full = d.path().join("full");
    succeeded(&merge_text(
        &format!("combination_type: dare_linear\ndensity: 1.0\n{two}"),
        d.path(),
        &full,
    ));
    assert!(worst(&full, &lora_dir().join("merged/linear")) <= 1e-6);
    let run = |seed: u64, name: &str| {
        let out = d.path().join(name);
        succeeded(&merge_text(
            &format!("combination_type: dare_ties_svd\ndensity: 0.5\nseed: {seed}\n{two}"),
            d.path(),
            &out,
        ));
        out
    };
    let (a, b, c) = (run(1, "a"), run(1, "b"), run(2, "c"));
    assert_eq!(worst(&a, &b), 0.0, "same seed, same adapter");
    assert!(worst(&a, &c) > 1e-3, "another seed, another mask");
}

#[test]
fn bad_configs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let fails_with = |yaml: &str, expect: &str| {
        let run = merge_text(yaml, d.path(), &out);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{yaml}: {err}");
        assert!(err.contains(expect), "{yaml}: expected '{expect}' in {err}");
        assert!(!out.exists());
    };
    fails_with(
        &format!("combination_type: nope\n{ADAPTERS}"),
        "is not one of",
    );
    fails_with(
        &format!("combination_type: ties\n{ADAPTERS}"),
        "needs density",
    );
    fails_with(
        &format!("combination_type: linear\n{ADAPTERS}"),
        "needs equal ranks",
    );
    fails_with(
        &format!("combination_type: svd\nmerge_method: ties\n{ADAPTERS}"),
        "not both",
    );
    fails_with(&format!("merge_method: pcb\n{ADAPTERS}"), "whole-model");
    fails_with(
        &format!("knots: true\ncombination_type: cat\n{ADAPTERS}"),
        "knots",
    );
    fails_with(
        &format!("combination_type: svd\ndensity: 2\n{ADAPTERS}"),
        "density",
    );
    fails_with("adapters:\n  - {adapter: adapters/nope}\n", "adapters/nope");
    fails_with(
        &format!("base_model: ../merge/models/qwen2_base\n{ADAPTERS}"),
        "base model",
    );
    fails_with(&format!("colour: red\n{ADAPTERS}"), "colour");
}
