//! `amalgam eval --experts ... --route ...` end to end on the routing fixtures of
//! crates/amalgam-eval (scripts/gen_routing_fixtures.py): the report, the oracle against the
//! experts evaluated alone, the calibrated router, thread independence, and bad input.

#![cfg(feature = "eval")]

mod common;

use std::path::{Path, PathBuf};

use amalgam::io::Model;
use common::{fails, json, raw, s, write_model};

fn fixture(name: &str) -> PathBuf {
    common::eval_fixture(name)
}

/// Task files `ft0.jsonl`, `ft1.jsonl`, `ft2.jsonl` (named like the SMILE fixture's experts)
/// and calibration files `cal0..2.jsonl` in `dir`: rows of the BERT fixture's vocabulary.
fn tasks(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let words = [
        "the quick brown fox jumps over the lazy dog",
        "model merging combines task vectors into one model",
        "sparse masks keep the largest entries and drop the rest",
    ];
    let mut task_files = Vec::new();
    let mut cal_files = Vec::new();
    for (t, text) in words.iter().enumerate() {
        let w: Vec<&str> = text.split(' ').collect();
        let rows = |n: usize, skip: usize| -> String {
            (0..n)
                .map(|i| {
                    let k = 2 + (i + skip) % (w.len() - 1);
                    let text = w[..k].join(" ");
                    format!("{{\"text\": \"{text}\", \"label\": {}}}\n", i % 3)
                })
                .collect()
        };
        let task = dir.join(format!("ft{t}.jsonl"));
        std::fs::write(&task, rows(6, 0)).unwrap();
        let cal = dir.join(format!("cal{t}.jsonl"));
        std::fs::write(&cal, rows(10, 3)).unwrap();
        task_files.push(task);
        cal_files.push(cal);
    }
    (task_files, cal_files)
}

fn experts() -> Vec<String> {
    (0..3)
        .map(|i| s(&fixture(&format!("routing/smile/ft{i}"))).to_string())
        .collect()
}

/// `eval BASE --task each --head` plus `extra`.
fn routed(task_files: &[PathBuf], extra: &[&str]) -> serde_json::Value {
    let base = fixture("routing/smile/base");
    let head = fixture("bert/head.safetensors");
    let mut args = vec!["eval".to_string(), s(&base).to_string()];
    for t in task_files {
        args.extend([
            "--task".into(),
            s(t).into(),
            "--head".into(),
            s(&head).into(),
        ]);
    }
    args.push("--experts".into());
    args.extend(experts());
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["--json".into(), "-q".into()]);
    json(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn oracle_with_exact_experts_scores_as_each_expert_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (task_files, _) = tasks(dir.path());
    let v = routed(&task_files, &["--route", "oracle", "--rank", "full"]);
    let head = fixture("bert/head.safetensors");
    for (t, task) in task_files.iter().enumerate() {
        let alone = json(&[
            "eval",
            &experts()[t],
            "--task",
            s(task),
            "--head",
            s(&head),
            "--json",
            "-q",
        ]);
        assert_eq!(
            v["tasks"][t]["accuracy"], alone["tasks"][0]["accuracy"],
            "task ft{t}"
        );
        assert_eq!(v["tasks"][t]["router_accuracy"], 1.0);
    }
    let r = &v["routing"];
    assert_eq!(r["route"], "oracle");
    assert_eq!(r["experts"], serde_json::json!(["ft0", "ft1", "ft2"]));
    assert_eq!(r["layers"], 12);
    assert_eq!(r["rank"], serde_json::Value::Null);
    assert!(r["memory_multiple"].as_f64().unwrap() > 1.0);
}

#[test]
fn smile_and_twin_report_router_accuracy_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (task_files, cal) = tasks(dir.path());
    let v = routed(
        &task_files,
        &["--route", "smile", "--rank", "4", "--gate-k", "2"],
    );
    let r = &v["routing"];
    assert_eq!(
        (
            r["gate"].as_str(),
            r["gate_k"].as_u64(),
            r["top_k"].as_u64()
        ),
        (Some("smile"), Some(2), Some(1))
    );
    // 3 experts on 2 layers of hidden 32, intermediate 64, per layer four 32×32 linears, a
    // 32→64 and a 64→32: factors of rank 4 ((in + out)·4 each), bias deltas (out each) and the
    // gates (in × 2 per expert).
    let per_layer_factors = 4 * (4 * 64 + 96 + 96);
    let per_layer_biases = 4 * 32 + 64 + 32;
    let per_layer_gates = 2 * (5 * 32 + 64);
    let factors = 3 * 2 * per_layer_factors;
    let biases = 3 * 2 * per_layer_biases;
    let gates = 3 * 2 * per_layer_gates;
    assert_eq!(
        r["expert_parameters"].as_u64().unwrap() as usize,
        factors + biases + gates
    );
    for t in 0..3 {
        let a = v["tasks"][t]["router_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a));
    }
    let cals: Vec<String> = cal
        .iter()
        .enumerate()
        .flat_map(|(t, c)| ["--calibrate".to_string(), format!("ft{t}={}", s(c))])
        .collect();
    let mut args = vec!["--route", "twin", "--rank", "4", "--router", "centroid"];
    args.extend(cals.iter().map(String::as_str));
    let v = routed(&task_files, &args);
    assert_eq!(v["routing"]["router"], "centroid");
    assert_eq!(
        v["routing"]["calibration_rows"],
        serde_json::json!([10, 10, 10])
    );
    assert!(v["tasks"][0]["router_accuracy"].is_number());
}

#[test]
fn routed_results_do_not_depend_on_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (task_files, cal) = tasks(dir.path());
    let cals: Vec<String> = cal
        .iter()
        .enumerate()
        .flat_map(|(t, c)| ["--calibrate".to_string(), format!("ft{t}={}", s(c))])
        .collect();
    for route in [
        vec!["--route", "smile", "--top-k", "2", "--batch-size", "2"],
        [
            vec!["--route", "twin", "--batch-size", "2"],
            cals.iter().map(String::as_str).collect(),
        ]
        .concat(),
    ] {
        let one = routed(
            &task_files,
            &[vec!["--threads", "1"], route.clone()].concat(),
        );
        let two = routed(
            &task_files,
            &[vec!["--threads", "2"], route.clone()].concat(),
        );
        assert_eq!(one, two, "{route:?}");
    }
}

#[test]
fn bad_routing_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (task_files, cal) = tasks(dir.path());
    let base = fixture("routing/smile/base");
    let head = fixture("bert/head.safetensors");
    let run = |extra: &[&str]| -> String {
        let mut args = vec![
            "eval",
            s(&base),
            "--task",
            s(&task_files[0]),
            "--head",
            s(&head),
        ];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let ex = experts();
    let with = |route: &[&str]| {
        let mut a: Vec<&str> = vec!["--experts"];
        a.extend(ex.iter().map(String::as_str));
        a.extend_from_slice(route);
        run(&a)
    };
    let e = with(&["--route", "smile", "--top-k", "4"]);
    assert!(
        e.contains("--top-k 4 must be between 1 and the number of experts (3)"),
        "{e}"
    );
    let e = with(&["--route", "arrow"]);
    assert!(e.contains("Arrow routes LoRA adapters"), "{e}");
    let e = with(&["--route", "smile", "--rank", "0"]);
    assert!(
        e.contains("--rank must be a positive integer or 'full'"),
        "{e}"
    );
    let e = with(&["--route", "twin"]);
    assert!(e.contains("--calibrate ft0=FILE.jsonl"), "{e}");
    let unknown = format!("nope={}", s(&cal[0]));
    let e = with(&["--route", "twin", "--calibrate", &unknown]);
    assert!(
        e.contains("no expert is named 'nope'; the experts: ft0, ft1, ft2"),
        "{e}"
    );
    let few = dir.path().join("few.jsonl");
    std::fs::write(&few, "{\"text\": \"the dog\"}\n{\"text\": \"the fox\"}\n").unwrap();
    let args: Vec<String> = (0..3)
        .map(|t| {
            let f = if t == 1 { &few } else { &cal[t] };
            format!("ft{t}={}", s(f))
        })
        .collect();
    let e = with(&[
        "--route",
        "twin",
        "--calibrate",
        &args[0],
        "--calibrate",
        &args[1],
        "--calibrate",
        &args[2],
    ]);
    assert!(
        e.contains("2 calibration rows for task 'ft1'; the router needs at least 8"),
        "{e}"
    );
    let e = with(&["--route", "smile", "--calibrate", &args[0]]);
    assert!(e.contains("--calibrate is for --route twin"), "{e}");
    // The oracle needs an expert named like each task.
    let other = dir.path().join("other.jsonl");
    std::fs::copy(&task_files[0], &other).unwrap();
    let mut a = vec![
        "eval",
        s(&base),
        "--task",
        s(&other),
        "--head",
        s(&head),
        "--experts",
    ];
    a.extend(ex.iter().map(String::as_str));
    a.extend(["--route", "oracle"]);
    let e = fails(&a);
    assert!(
        e.contains("task 'other'") && e.contains("has no expert of its name"),
        "{e}"
    );
    // Experts of another architecture.
    let llama = fixture("routing/arrow/base");
    let e = run(&["--experts", s(&llama), "--route", "uniform"]);
    assert!(e.contains("embeddings.word_embeddings.weight"), "{e}");
}

#[test]
fn arrow_needs_adapters_on_the_same_modules() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = fixture("routing/arrow/adapters");
    // task2 without its v_proj factors.
    let cut = dir.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    std::fs::copy(
        adapters.join("task2/adapter_config.json"),
        cut.join("adapter_config.json"),
    )
    .unwrap();
    let m = Model::open(adapters.join("task2/adapter_model.safetensors")).unwrap();
    let kept: Vec<_> = m
        .tensors()
        .iter()
        .filter(|t| !t.name.contains("v_proj"))
        .map(|t| {
            raw(
                &t.name,
                t.dtype,
                &t.shape,
                m.tensor(&t.name).unwrap().bytes.to_vec(),
            )
        })
        .collect();
    write_model(&cut, &kept);
    std::fs::rename(
        cut.join("model.safetensors"),
        cut.join("adapter_model.safetensors"),
    )
    .unwrap();
    let base = fixture("routing/arrow/base");
    let lm = fixture("llama/lm.jsonl");
    let e = fails(&[
        "eval",
        s(&base),
        "--task",
        s(&lm),
        "--experts",
        s(&adapters.join("task0")),
        s(&adapters.join("task1")),
        s(&cut),
        "--route",
        "arrow",
    ]);
    assert!(
        e.contains("adapt different modules") && e.contains("v_proj"),
        "{e}"
    );
    // The three fixture adapters route (perplexity of a language-modelling task).
    let v = json(&[
        "eval",
        s(&base),
        "--task",
        s(&lm),
        "--experts",
        s(&adapters.join("task0")),
        s(&adapters.join("task1")),
        s(&adapters.join("task2")),
        "--route",
        "arrow",
        "--top-k",
        "2",
        "--json",
        "-q",
    ]);
    assert!(v["tasks"][0]["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(v["routing"]["gate"], "arrow");
    assert_eq!(v["routing"]["layers"], 6);
}
