//! `amalgam measure`, the `regmean`/`fisher` merges and `amalgam adamerge` end to end on the
//! tiny fixtures of crates/amalgam-eval/tests/fixtures/datadriven (made by
//! scripts/gen_datadriven_fixtures.py; the numbers are checked against the references in
//! crates/amalgam-eval/tests/datadriven.rs): outputs, `--json`, reproduction, bad input.

#![cfg(feature = "eval")]

mod common;

use std::path::PathBuf;

use common::{fails, json, ok, s};

fn fx(name: &str) -> PathBuf {
    common::eval_fixture("datadriven").join(name)
}

#[test]
fn measure_then_merge_with_regmean_and_fisher() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for m in ["a", "b"] {
        let model = fx(&format!("bert_{m}"));
        let data = fx(&format!("data_{m}.jsonl"));
        let gram = dir.path().join(format!("{m}.gram.safetensors"));
        let v = json(&[
            "measure",
            s(&model),
            "--data",
            s(&data),
            "--stats",
            "gram",
            s(&gram),
            "--json",
        ]);
        assert_eq!(v["stats"], "gram");
        assert_eq!(v["rows"], 10);
        assert_eq!(v["tensors"], 12);
        let fisher = dir.path().join(format!("{m}.fisher.safetensors"));
        let head = model.join("head.safetensors");
        let v = json(&[
            "measure",
            s(&model),
            "--data",
            s(&data),
            "--stats",
            "fisher",
            s(&fisher),
            "--head",
            s(&head),
            "--json",
        ]);
        assert_eq!(v["stats"], "fisher");
        files.push((model, gram, fisher));
    }
    for (method, idx) in [("regmean", 1), ("fisher", 2)] {
        let mut cfg = format!("merge_method: {method}\nmodels:\n");
        for f in &files {
            let stats = if idx == 1 { &f.1 } else { &f.2 };
            cfg += &format!("  - model: {}\n    stats: {}\n", s(&f.0), s(stats));
        }
        let path = dir.path().join(format!("{method}.yml"));
        std::fs::write(&path, cfg).unwrap();
        let out = dir.path().join(method);
        ok(&["merge", s(&path), s(&out), "-q"]);
        assert!(out.join("model.safetensors").exists());
    }
    // An existing stats file is kept unless --overwrite.
    let (model, gram, _) = &files[0];
    let e = fails(&[
        "measure",
        s(model),
        "--data",
        s(&fx("data_a.jsonl")),
        "--stats",
        "gram",
        s(gram),
    ]);
    assert!(e.contains("--overwrite"), "{e}");
}

#[test]
fn measure_rejects_bad_data() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"sentence\": \"no text field\"}\n").unwrap();
    let out = dir.path().join("g.safetensors");
    let e = fails(&[
        "measure",
        s(&fx("bert_a")),
        "--data",
        s(&bad),
        "--stats",
        "gram",
        s(&out),
    ]);
    assert!(e.contains("bad.jsonl") && e.contains("text"), "{e}");
    assert!(!out.exists());
    // The Fisher of an encoder needs a head.
    let e = fails(&[
        "measure",
        s(&fx("bert_a")),
        "--data",
        s(&fx("data_a.jsonl")),
        "--stats",
        "fisher",
        s(&out),
    ]);
    assert!(e.contains("--head"), "{e}");
    assert!(!out.exists());
}

#[test]
fn adamerge_writes_a_config_that_merge_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::eval_fixture("bert");
    let cfg = dir.path().join("ta.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\ndtype: float32\n",
            s(&base),
            s(&fx("bert_a")),
            s(&fx("bert_b"))
        ),
    )
    .unwrap();
    let out = dir.path().join("ada");
    let v = json(&[
        "adamerge",
        s(&cfg),
        s(&out),
        "--data",
        &format!("a={}", s(&fx("data_a.jsonl"))),
        "--data",
        s(&fx("data_b.jsonl")),
        "--head",
        s(&fx("bert_a/head.safetensors")),
        "--head",
        s(&fx("bert_b/head.safetensors")),
        "--steps",
        "4",
        "--lr",
        "0.05",
        "--batch-size",
        "4",
        "--json",
    ]);
    assert_eq!(v["losses"].as_array().unwrap().len(), 4);
    assert_eq!(v["groups"].as_array().unwrap().len(), 37);
    assert_eq!(v["tasks"], serde_json::json!(["a", "data_b"]));
    for l in v["lambdas"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
    {
        let l = l.as_f64().unwrap();
        assert!((0.0..=1.0).contains(&l));
    }
    // The config it wrote gives the same model, to the byte.
    let again = dir.path().join("again");
    ok(&["merge", s(&out.join("adamerge.yml")), s(&again), "-q"]);
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
    // Not a task_arithmetic config; a --data count that does not match.
    let replace = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&cfg).unwrap().replace(from, to);
        std::fs::write(&cfg, text).unwrap();
    };
    let x = dir.path().join("x");
    replace("task_arithmetic", "ties");
    let e = fails(&["adamerge", s(&cfg), s(&x), "--data", "f", "--head", "h"]);
    assert!(e.contains("task_arithmetic"), "{e}");
    replace("ties", "task_arithmetic");
    let data = fx("data_a.jsonl");
    let e = fails(&[
        "adamerge",
        s(&cfg),
        s(&x),
        "--data",
        s(&data),
        "--head",
        "h",
    ]);
    assert!(e.contains("2 fine-tune(s) but 1 --data"), "{e}");
    assert!(!dir.path().join("x").exists());
}
