//! Parity with Hugging Face transformers on tiny random models (fixtures from
//! scripts/gen_eval_fixtures.py): encoder hidden states, mean-pooled embeddings, head
//! predictions, decoder logits and language-modelling loss, all to 1e-4.

use std::path::{Path, PathBuf};

use amalgam::io::Model;
use amalgam_eval::{Evaluator, Head, Metrics, Task};

mod common;

use common::{flat, ids_rows, ints, max_diff};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> Model {
    Model::open(fixture(name).join("expected.safetensors")).unwrap()
}

#[test]
fn bert_hidden_states_match_transformers() {
    let exp = expected("bert");
    let ev = Evaluator::open(&fixture("bert"), None).unwrap();
    let hidden = ev.forward_ids(&ids_rows(&exp)).unwrap();
    let want = exp.floats("hidden").unwrap();
    assert_eq!(hidden.dims(), exp.entry("hidden").unwrap().shape.as_slice());
    let d = max_diff(&flat(&hidden), &want);
    assert!(d < TOL, "max |Δ| = {d}");
}

#[test]
fn bert_mean_pooling_and_head_match_transformers() {
    let dir = fixture("bert");
    let exp = expected("bert");
    let ev = Evaluator::open(&dir, None).unwrap();
    let task = Task::load(&dir.join("task.jsonl"), None).unwrap();
    let pooled = ev.embed(&task.texts, &|_| {}).unwrap();
    let want = exp.floats("pooled").unwrap();
    let d = max_diff(&pooled.concat(), &want);
    assert!(d < TOL, "pooled max |Δ| = {d}");

    // Labels were written so that every other prediction is right.
    let (predicted, _) = ints(&exp, "predicted");
    let right = predicted
        .iter()
        .zip(&task.labels)
        .filter(|(p, l)| **p as usize == **l)
        .count();
    let head = Head::load(&dir.join("head.safetensors"), 32).unwrap();
    let result = ev.classify(&task, &head, &|_| {}).unwrap();
    let Metrics::Accuracy { examples, accuracy } = result.metrics else {
        panic!("not accuracy")
    };
    assert_eq!(examples, task.texts.len());
    assert_eq!(accuracy, right as f64 / examples as f64);
    assert_eq!(right, 3);
}

fn check_decoder(name: &str) {
    let dir = fixture(name);
    let exp = expected(name);
    let ev = Evaluator::open(&dir, None).unwrap();
    let logits = ev.forward_ids(&ids_rows(&exp)).unwrap();
    assert_eq!(logits.dims(), exp.entry("logits").unwrap().shape.as_slice());
    let d = max_diff(&flat(&logits), &exp.floats("logits").unwrap());
    assert!(d < TOL, "{name}: logits max |Δ| = {d}");

    let task = Task::load(&dir.join("lm.jsonl"), None).unwrap();
    let result = ev.perplexity(&task, &|_| {}).unwrap();
    let Metrics::Perplexity {
        loss, perplexity, ..
    } = result.metrics
    else {
        panic!("not perplexity")
    };
    let v = exp.tensor("loss").unwrap();
    let want = f64::from_le_bytes(v.bytes.try_into().unwrap());
    assert!((loss - want).abs() < 1e-4, "{name}: loss {loss} vs {want}");
    assert!((perplexity - want.exp()).abs() / want.exp() < 1e-4);
}

#[test]
fn llama_with_llama3_rope_and_biases_matches_transformers() {
    check_decoder("llama");
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    check_decoder("mistral");
}

#[test]
fn qwen2_bf16_tied_matches_transformers() {
    check_decoder("qwen2");
}

#[test]
fn qwen3_with_qk_norm_matches_transformers() {
    check_decoder("qwen3");
}
