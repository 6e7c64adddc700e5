//! Vocabulary alignment, parity with mergekit 0.1.5 (fixtures from scripts/gen_vocab_fixtures.py):
//! tiny Llamas whose tokenizers differ (added special tokens, extra regular tokens, a smaller
//! vocabulary with other ids), merged with `tokenizer_source: union | base | MODEL` and the
//! `tokenizer:` block (`tokens:` of every kind, `force`, `pad_to_multiple_of`) under linear, TIES
//! and SLERP. Every tensor within 1e-5 of mergekit's output, the same tokenizer.json, special
//! tokens and vocab_size, and the output tokenizer encodes the test string to the ids
//! transformers gives for mergekit's output. Then bad inputs, refused with nothing written.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vocab")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn parity(case: &str) {
    let dir = fixtures();
    // Tensors within 1e-5, names equal; chunked and baseline runs byte-identical.
    check(&dir, case, 1e-5);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join(case);
    let run = merge_case(&dir, case, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let expected = dir.join("expected").join(case);
    assert_eq!(
        json(&out.join("tokenizer.json")),
        json(&expected.join("tokenizer.json")),
        "{case}: tokenizer.json"
    );
    let (mine, theirs) = (
        json(&out.join("tokenizer_config.json")),
        json(&expected.join("tokenizer_config.json")),
    );
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "extra_special_tokens",
    ] {
        assert_eq!(
            mine.get(key),
            theirs.get(key),
            "{case}: tokenizer_config {key}"
        );
    }
    assert_eq!(
        json(&out.join("config.json"))["vocab_size"],
        json(&expected.join("config.json"))["vocab_size"],
        "{case}: vocab_size"
    );
    let want = json(&expected.join("tokenize.json"));
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = want["text"].as_str().unwrap();
    for (special, key) in [
        (true, "with_special_tokens"),
        (false, "without_special_tokens"),
    ] {
        let ids = tok.encode(text, special).unwrap().get_ids().to_vec();
        let expected: Vec<u32> = want[key]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, expected, "{case}: ids {key}");
    }
    let vocab: Vec<(String, u32)> = want["vocab"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                e[1].as_u64().unwrap() as u32,
            )
        })
        .collect();
    for (t, id) in &vocab {
        assert_eq!(tok.token_to_id(t), Some(*id), "{case}: id of '{t}'");
    }
    assert_eq!(
        tok.get_vocab_size(true),
        vocab.len(),
        "{case}: vocabulary size"
    );
}

#[test]
fn linear_union() {
    parity("linear_union");
}

#[test]
fn ties_union() {
    parity("ties_union");
}

#[test]
fn slerp_base() {
    parity("slerp_base");
}

#[test]
fn linear_model_source() {
    parity("linear_model_source");
}

#[test]
fn linear_tokens() {
    parity("linear_tokens");
}

#[test]
fn ties_union_pad() {
    parity("ties_union_pad");
}

/// Copy fixture model `name` into `dir` (as `as_name`).
fn copy_model(dir: &Path, name: &str, as_name: &str) -> PathBuf {
    let to = dir.join(as_name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

/// A linear union merge of `a` and `b` (paths) with `extra` config lines fails naming every
/// `expect`; nothing is written.
fn refused(dir: &Path, a: &Path, b: &Path, extra: &str, expect: &[&str]) {
    let cfg = dir.join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - {{model: {}, parameters: {{weight: 1}}}}\n  - {{model: {}, parameters: {{weight: 1}}}}\n{extra}",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let err = fails(&["merge", s(&cfg), s(&out), "-q"]);
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn bad_tokenizers_and_token_entries_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let base = copy_model(d.path(), "base", "base");
    let extra = copy_model(d.path(), "ft_extra", "ft_extra");
    let union = "tokenizer_source: union\n";

    // A tokenizer.json that does not parse.
    let broken = copy_model(d.path(), "ft_special", "broken");
    std::fs::write(broken.join("tokenizer.json"), "{\"model\": ").unwrap();
    refused(
        d.path(),
        &base,
        &broken,
        union,
        &["broken/tokenizer.json", "not a tokenizer.json"],
    );

    // Token ids beyond the embedding rows: ft_small's 40-row weights with the base's
    // 45-token tokenizer and config.
    let short = copy_model(d.path(), "ft_small", "short");
    for f in ["tokenizer.json", "config.json"] {
        std::fs::copy(base.join(f), short.join(f)).unwrap();
    }
    refused(
        d.path(),
        &base,
        &short,
        union,
        &[
            "short",
            "model.embed_tokens.weight",
            "has 40 rows",
            "token id",
        ],
    );

    // The tokenizer base without a tokenizer.json.
    let bare = copy_model(d.path(), "base", "bare");
    std::fs::remove_file(bare.join("tokenizer.json")).unwrap();
    refused(
        d.path(),
        &bare,
        &extra,
        union,
        &["bare", "no tokenizer.json"],
    );

    // tokens: entries that cannot be honoured.
    let tokens =
        |entry: &str| format!("tokenizer:\n  source: union\n  tokens:\n    \"<new>\": {entry}\n");
    refused(
        d.path(),
        &base,
        &extra,
        &tokens("{}"),
        &["'<new>' has no source"],
    );
    refused(
        d.path(),
        &base,
        &extra,
        &tokens(&format!(
            "{{source: {{kind: model_token, model: {}, token_id: 999}}}}",
            base.display()
        )),
        &["token id 999 is out of range"],
    );
    refused(
        d.path(),
        &base,
        &extra,
        &tokens(&format!(
            "{{source: {{kind: model_token, model: {}, token: \"nope\"}}}}",
            base.display()
        )),
        &["token 'nope' is not in the vocabulary"],
    );
    refused(
        d.path(),
        &base,
        &extra,
        &tokens(&format!("{{source: {}}}", base.display())),
        &["does not have that token"],
    );
    refused(
        d.path(),
        &base,
        &extra,
        &tokens("{source: elsewhere}"),
        &["'elsewhere', which is not one of the models"],
    );
    refused(
        d.path(),
        &base,
        &extra,
        &tokens(&format!(
            "{{source: {{kind: model_token, model: {}, token: a, token_id: 3}}}}",
            base.display()
        )),
        &["exactly one of 'token' and 'token_id'"],
    );
    refused(
        d.path(),
        &base,
        &extra,
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 0\n",
        &["pad_to_multiple_of must be at least 1"],
    );
}
