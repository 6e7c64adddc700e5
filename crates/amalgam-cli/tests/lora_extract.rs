//! `amalgam lora extract`: the reconstruction error of mergekit-extract-lora at the same rank
//! (fixtures from scripts/gen_lora_fixtures.py, mergekit 0.1.5), exact reproduction at full
//! rank, per-module energy ranks, module selection, and errors.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model(name: &str) -> PathBuf {
    fixtures().join("merge/models").join(name)
}

/// The arguments of `lora extract` from `base` to `ft` into `out`, plus `extra`.
fn extract_args(base: &str, ft: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let (b, f) = (model(base), model(ft));
    let mut args = vec![
        "lora",
        "extract",
        "--base",
        s(&b),
        "--model",
        s(&f),
        s(out),
        "-q",
    ];
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Run `lora extract` and return its JSON report.
fn extract(base: &str, ft: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = extract_args(base, ft, out, extra);
    args.push("--json".into());
    serde_json::from_str(&ok(&strs(&args))).unwrap()
}

fn errors(report: &serde_json::Value) -> Vec<(String, u64, f64)> {
    report["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["module"].as_str().unwrap().to_string(),
                m["rank"].as_u64().unwrap(),
                m["relative_error"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn extraction_error_matches_mergekit_extract_lora() {
    let cases = fixtures().join("lora/extract");
    let mut names: Vec<_> = std::fs::read_dir(&cases)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4);
    for case in names {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("errors.json")).unwrap())
                .unwrap();
        let args: Vec<&str> = reference["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let d = tempfile::tempdir().unwrap();
        for exact in [false, true] {
            let out = d.path().join(format!("a{exact}"));
            let mut extra = args.clone();
            if exact {
                extra.push("--exact");
            }
            let report = extract(
                reference["base"].as_str().unwrap(),
                reference["model"].as_str().unwrap(),
                &out,
                &extra,
            );
            let theirs = reference["modules"].as_object().unwrap();
            let ours = errors(&report);
            assert_eq!(ours.len(), theirs.len(), "{case:?}: modules factored");
            for (module, _, err) in &ours {
                let want = theirs[module].as_f64().unwrap();
                assert!(
                    (err / want - 1.0).abs() <= 0.01,
                    "{case:?} {module}: relative error {err} vs mergekit's {want}"
                );
            }
            let overall = report["overall_relative_error"].as_f64().unwrap();
            let want = reference["overall"].as_f64().unwrap();
            assert!(
                (overall / want - 1.0).abs() <= 0.01,
                "{case:?}: overall {overall} vs {want}"
            );
        }
    }
}

#[test]
fn full_rank_extraction_reproduces_the_finetune() {
    let d = tempfile::tempdir().unwrap();
    for (i, extra) in [&[][..], &["--embed-lora", "--no-distribute-scale"][..]]
        .iter()
        .enumerate()
    {
        let adapter = d.path().join(format!("adapter{i}"));
        let mut args = vec!["--rank", "64", "--exact"];
        args.extend_from_slice(extra);
        let report = extract("llama_base", "llama_ft3", &adapter, &args);
        // f32 SVD round-off (measured 2e-6); the issue asks for 1e-5.
        assert!(report["overall_relative_error"].as_f64().unwrap() < 1e-5);
        let baked = d.path().join(format!("baked{i}"));
        ok(&[
            "lora",
            "apply",
            s(&model("llama_base")),
            s(&adapter),
            s(&baked),
            "-q",
        ]);
        let json = amalgam(&["diff", s(&baked), s(&model("llama_ft3")), "--json", "--all"]);
        let diff: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        let worst = diff["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["rel"].as_f64())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-5,
            "{extra:?}: worst norm-relative error {worst:e}"
        );
    }
}

#[test]
fn energy_picks_per_module_ranks_and_regexes_select_modules() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("energy");
    let report = extract(
        "llama_base",
        "llama_ft1",
        &out,
        &[
            "--rank",
            "12",
            "--energy",
            "0.6",
            "-i",
            "self_attn",
            "-e",
            "layers\\.0\\.",
        ],
    );
    let ours = errors(&report);
    assert_eq!(ours.len(), 12, "attention modules of layers 1..3");
    for (module, rank, err) in &ours {
        assert!(module.contains("self_attn") && !module.contains("layers.0."));
        assert!(*rank <= 12);
        // The kept rank holds at least 60 % of the energy: the error is at most √0.4.
        assert!(err * err <= 0.4 + 1e-5, "{module}: {err}");
    }
    // Rank one fewer would not have held 60 %: rank-(r-1) errors from exact extractions.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_u64().unwrap();
    assert_eq!(r, ours.iter().map(|m| m.1).max().unwrap());
    for (module, rank, _) in &ours {
        let want = if *rank == r {
            None
        } else {
            Some(serde_json::json!(rank))
        };
        assert_eq!(cfg["rank_pattern"].get(module), want.as_ref(), "{module}");
        if *rank > 1 {
            let lower = d.path().join(format!("lower-{module}"));
            let escaped = format!("^{}$", module.replace('.', "\\."));
            let rank_below = (rank - 1).to_string();
            let rep = extract(
                "llama_base",
                "llama_ft1",
                &lower,
                &["--rank", &rank_below, "--exact", "-i", &escaped],
            );
            let e = errors(&rep)[0].2;
            assert!(
                e * e > 0.4 - 1e-5,
                "{module}: rank {rank} is not the fewest"
            );
        }
    }
    // The adapter is what PEFT would load: it applies.
    ok(&[
        "lora",
        "apply",
        s(&model("llama_base")),
        s(&out),
        s(&d.path().join("baked")),
        "-q",
    ]);
}

#[test]
fn extraction_saves_only_what_changed() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("a");
    let report = extract("llama_base", "llama_ft1", &out, &["--rank", "2"]);
    let adapter = amalgam::io::Model::open(out.join("adapter_model.safetensors")).unwrap();
    let saved: Vec<&str> = report["saved"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in &saved {
        assert!(adapter.contains(&format!("base_model.model.{name}")));
    }
    assert!(saved.contains(&"model.embed_tokens.weight"));
    // Identical models leave nothing to extract.
    let none = d.path().join("none");
    let err = fails(&strs(&extract_args("llama_base", "llama_base", &none, &[])));
    assert!(err.contains("nothing to extract"), "{err}");
    assert!(!d.path().join("none").exists());
}

#[test]
fn extraction_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let run = |base: &str, ft: &str, extra: &[&str]| {
        let out = d.path().join("out");
        let err = fails(&strs(&extract_args(base, ft, &out, extra)));
        assert!(!out.exists(), "no half-written output");
        err
    };
    assert!(run("llama_base", "llama_ft1", &["--rank", "0"]).contains("rank"));
    assert!(run("llama_base", "llama_ft1", &["--energy", "1.5"]).contains("energy"));
    assert!(run("llama_base", "llama_ft1", &["-i", "("]).contains("regular expression"));
    let err = run("llama_base", "llama_ft_bigvocab", &[]);
    assert!(
        err.contains("[72, 16]") && err.contains("[64, 16]"),
        "{err}"
    );
    let err = run("llama_base", "qwen2_ft1", &[]);
    assert!(err.contains("not found") || err.contains("shape"), "{err}");
}
