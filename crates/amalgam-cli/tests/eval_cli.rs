//! `amalgam eval` end to end on the tiny fixtures of crates/amalgam-eval (made by
//! scripts/gen_eval_fixtures.py with transformers): results, output formats, heads given as a
//! folder, merged models evaluated as written, and bad input.

#![cfg(feature = "eval")]

mod common;

use std::path::PathBuf;

use common::{fails, json, ok, s};

fn fixture(name: &str) -> PathBuf {
    common::eval_fixture(name)
}

/// The fixture's labels agree with transformers' predictions on rows 0, 2 and 4 only.
#[test]
fn classification_json_reports_accuracy() {
    let bert = fixture("bert");
    let task = bert.join("task.jsonl");
    let head = bert.join("head.safetensors");
    let v = json(&[
        "eval",
        s(&bert),
        "--task",
        s(&task),
        "--head",
        s(&head),
        "--json",
        "-q",
    ]);
    assert_eq!(
        v,
        serde_json::json!({"tasks": [{"name": "task", "examples": 6, "accuracy": 0.5}]})
    );
    let v = json(&[
        "eval",
        s(&bert),
        "--task",
        s(&task),
        "--head",
        s(&head),
        "--json",
        "--limit",
        "3",
        "--batch-size",
        "2",
    ]);
    assert_eq!(v["tasks"][0]["examples"], 3);
    assert_eq!(v["tasks"][0]["accuracy"], 2.0 / 3.0);
}

#[test]
fn several_tasks_with_a_head_folder_and_a_table() {
    let bert = fixture("bert");
    let tmp = tempfile::tempdir().unwrap();
    let heads = tmp.path().join("heads");
    std::fs::create_dir(&heads).unwrap();
    for name in ["alpha", "beta"] {
        std::fs::copy(
            bert.join("task.jsonl"),
            tmp.path().join(format!("{name}.test.jsonl")),
        )
        .unwrap();
        std::fs::copy(
            bert.join("head.safetensors"),
            heads.join(format!("{name}.safetensors")),
        )
        .unwrap();
    }
    let a = tmp.path().join("alpha.test.jsonl");
    let b = tmp.path().join("beta.test.jsonl");
    let v = json(&[
        "eval",
        s(&bert),
        "--task",
        s(&a),
        "--task",
        s(&b),
        "--head",
        s(&heads),
        "--json",
    ]);
    let names: Vec<&str> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let table = ok(&[
        "eval",
        s(&bert),
        "--task",
        s(&a),
        "--task",
        s(&b),
        "--head",
        s(&heads),
    ]);
    assert!(table.contains("alpha") && table.contains("beta"), "{table}");
    let avg = table
        .lines()
        .find(|l| l.starts_with("average"))
        .expect(&table);
    assert!(avg.contains("0.5000"), "{avg}");
}

#[test]
fn language_modelling_loss_matches_transformers() {
    let qwen = fixture("qwen3");
    let expected = amalgam::io::Model::open(qwen.join("expected.safetensors")).unwrap();
    let want = f64::from_le_bytes(expected.tensor("loss").unwrap().bytes.try_into().unwrap());
    let v = json(&[
        "eval",
        s(&qwen),
        "--task",
        s(&qwen.join("lm.jsonl")),
        "--json",
    ]);
    let t = &v["tasks"][0];
    assert_eq!(t["name"], "lm");
    assert_eq!(t["examples"], 6);
    let loss = t["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
    assert!((t["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-3 * want.exp());
}

/// A merge's output folder is evaluated as written: the average of a model with itself is the
/// model, so it scores the same.
#[test]
fn evaluates_a_merged_model_folder() {
    let bert = fixture("bert");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("merge.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 1.0}}\ndtype: float32\n",
            b = s(&bert)
        ),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    ok(&["merge", s(&cfg), s(&out), "-q"]);
    let task = bert.join("task.jsonl");
    let head = bert.join("head.safetensors");
    let v = json(&[
        "eval",
        s(&out),
        "--task",
        s(&task),
        "--head",
        s(&head),
        "--json",
    ]);
    assert_eq!(v["tasks"][0]["accuracy"], 0.5);
}

#[test]
fn bad_input_gets_clear_errors() {
    let bert = fixture("bert");
    let head = bert.join("head.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    let bad_row = write(
        "bad.jsonl",
        "{\"text\": \"fine\", \"label\": 0}\n{\"text\": \"oops\"\n",
    );
    let err = fails(&["eval", s(&bert), "--task", s(&bad_row), "--head", s(&head)]);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("not a JSON object"),
        "{err}"
    );

    let mixed = write(
        "mixed.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\"}\n",
    );
    let err = fails(&["eval", s(&bert), "--task", s(&mixed), "--head", s(&head)]);
    assert!(
        err.contains("mixed.jsonl:2") && err.contains("no \"label\""),
        "{err}"
    );

    let out_of_range = write(
        "range.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 3}\n",
    );
    let err = fails(&[
        "eval",
        s(&bert),
        "--task",
        s(&out_of_range),
        "--head",
        s(&head),
    ]);
    assert!(
        err.contains("range.jsonl:2") && err.contains("outside the head's 3 classes"),
        "{err}"
    );

    // A head trained on a 16-wide model does not fit this 32-wide one.
    let narrow = tmp.path().join("narrow.safetensors");
    let tensors = [
        common::float("weight", amalgam::DType::F32, &[3, 16], 1),
        common::float("bias", amalgam::DType::F32, &[3], 2),
    ];
    std::fs::write(&narrow, common::safetensors_bytes(&tensors)).unwrap();
    let task = bert.join("task.jsonl");
    let err = fails(&["eval", s(&bert), "--task", s(&task), "--head", s(&narrow)]);
    assert!(
        err.contains("narrow.safetensors") && err.contains("hidden size is 32"),
        "{err}"
    );

    // An architecture the crate does not run.
    let gpt2 = tmp.path().join("gpt2");
    std::fs::create_dir(&gpt2).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(bert.join(f), gpt2.join(f)).unwrap();
    }
    std::fs::write(gpt2.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = fails(&["eval", s(&gpt2), "--task", s(&task), "--head", s(&head)]);
    assert!(
        err.contains("\"gpt2\" is not supported") && err.contains("llama"),
        "{err}"
    );

    // No tokenizer.
    std::fs::copy(bert.join("config.json"), gpt2.join("config.json")).unwrap();
    std::fs::remove_file(gpt2.join("tokenizer.json")).unwrap();
    let err = fails(&["eval", s(&gpt2), "--task", s(&task), "--head", s(&head)]);
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );

    // Another model's tokenizer, whose ids run past this model's vocabulary.
    let qwen = fixture("qwen3");
    std::fs::copy(qwen.join("tokenizer.json"), gpt2.join("tokenizer.json")).unwrap();
    let err = fails(&["eval", s(&gpt2), "--task", s(&task), "--head", s(&head)]);
    assert!(err.contains("outside the model's vocabulary"), "{err}");

    // A classification head on a decoder LM, and too long an input for the position table.
    let err = fails(&["eval", s(&qwen), "--task", s(&task), "--head", s(&head)]);
    assert!(err.contains("decoder LM"), "{err}");
    let err = fails(&[
        "eval",
        s(&bert),
        "--task",
        s(&task),
        "--head",
        s(&head),
        "--max-len",
        "65",
    ]);
    assert!(err.contains("exceeds the model's 64 positions"), "{err}");
}

/// Batches run in parallel, but each batch's work is independent and results are combined in
/// batch order: the output is the same at any thread count.
#[test]
fn results_do_not_depend_on_threads() {
    let qwen = fixture("qwen3");
    let lm = qwen.join("lm.jsonl");
    let bert = fixture("bert");
    let task = bert.join("task.jsonl");
    let head = bert.join("head.safetensors");
    for args in [
        vec![
            "eval",
            s(&qwen),
            "--task",
            s(&lm),
            "--batch-size",
            "1",
            "--json",
        ],
        vec![
            "eval",
            s(&bert),
            "--task",
            s(&task),
            "--head",
            s(&head),
            "--batch-size",
            "1",
            "--json",
        ],
    ] {
        let one = ok(&[&["--threads", "1"], args.as_slice()].concat());
        let two = ok(&[&["--threads", "2"], args.as_slice()].concat());
        assert_eq!(one, two);
    }
}
