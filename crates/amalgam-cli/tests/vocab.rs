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

/// Write a PEFT adapter for `base` at `dir`: the given tensors (PEFT names) and config.
fn write_adapter(dir: &Path, tensors: &[T], config: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors_bytes(tensors),
    )
    .unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

fn tensor_of(model: &Path, name: &str, as_name: &str) -> T {
    let m = amalgam::io::Model::open(model).unwrap();
    let t = m.tensor(name).unwrap();
    raw(as_name, t.dtype, t.shape, t.bytes.to_vec())
}

/// An adapter for the base that carries `model`'s embeddings and LM head whole (a resized
/// vocabulary, `modules_to_save`) and a rank-2 LoRA on layer 0's query (`q` its shape, factors
/// from seeds `seed` and `seed + 1`).
fn resized_adapter(dir: &Path, model: &Path, q: &[usize], seed: u64) {
    write_adapter(
        dir,
        &[
            tensor_of(
                model,
                "model.embed_tokens.weight",
                "base_model.model.model.embed_tokens.weight",
            ),
            tensor_of(model, "lm_head.weight", "base_model.model.lm_head.weight"),
            float(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                amalgam::DType::F32,
                &[2, q[1]],
                seed,
            ),
            float(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                amalgam::DType::F32,
                &[q[0], 2],
                seed + 1,
            ),
        ],
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                           "modules_to_save": ["embed_tokens", "lm_head"]}),
    );
}

/// Adapter inputs under vocabulary alignment, for every family of methods. An adapter that
/// added tokens (the resized embeddings and LM head saved whole, `modules_to_save`, with its
/// tokenizer beside it, as PEFT users save them) and a LoRA on the embeddings of another
/// model: `lora apply` bakes each into a model with that vocabulary; merging `model+adapter`
/// references with `tokenizer_source: union` gives the same tensors as merging the baked
/// models; and each method's union merge equals the same method run without alignment on
/// copies of the inputs aligned to the union vocabulary first (a weight-1 `linear` merge of
/// each input with the others at weight 0 aligns it exactly), so alignment happens before
/// any method.
#[test]
fn adapter_inputs_and_every_method_read_the_aligned_rows() {
    let fx = fixtures().join("models");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Adapter 1 on the base: ft_special's vocabulary (47 rows, the base has 45) plus a LoRA
    // on one projection.
    let a1 = dir.join("a_special");
    let q = "model.layers.0.self_attn.q_proj.weight";
    let qs = amalgam::io::Model::open(fx.join("base"))
        .unwrap()
        .entry(q)
        .unwrap()
        .shape
        .clone();
    resized_adapter(&a1, &fx.join("ft_special"), &qs, 11);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if fx.join("ft_special").join(f).is_file() {
            std::fs::copy(fx.join("ft_special").join(f), a1.join(f)).unwrap();
        }
    }
    // Adapter 2 on ft_extra: a LoRA on its embeddings (50 rows), no tokenizer of its own.
    let a2 = dir.join("a_embed");
    write_adapter(
        &a2,
        &[
            float(
                "base_model.model.model.embed_tokens.lora_embedding_A",
                amalgam::DType::F32,
                &[2, 50],
                13,
            ),
            float(
                "base_model.model.model.embed_tokens.lora_embedding_B",
                amalgam::DType::F32,
                &[16, 2],
                14,
            ),
        ],
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens"]}),
    );
    let (b1, b2) = (dir.join("baked_special"), dir.join("baked_embed"));
    ok(&["lora", "apply", s(&fx.join("base")), s(&a1), s(&b1), "-q"]);
    ok(&[
        "lora",
        "apply",
        s(&fx.join("ft_extra")),
        s(&a2),
        s(&b2),
        "-q",
    ]);
    assert_eq!(
        json(&b1.join("tokenizer.json")),
        json(&fx.join("ft_special/tokenizer.json"))
    );
    assert_eq!(json(&b1.join("config.json"))["vocab_size"], 47);
    let baked = amalgam::io::Model::open(&b1).unwrap();
    assert_eq!(baked.entry("lm_head.weight").unwrap().shape, [47, 16]);
    let special = amalgam::io::Model::open(fx.join("ft_special")).unwrap();
    assert!(
        baked.tensor("model.embed_tokens.weight").unwrap().bytes
            == special.tensor("model.embed_tokens.weight").unwrap().bytes
    );

    // Resizing the embeddings without the LM head is refused, naming what to save.
    let half = dir.join("a_half");
    write_adapter(
        &half,
        &[tensor_of(
            &fx.join("ft_special"),
            "model.embed_tokens.weight",
            "base_model.model.model.embed_tokens.weight",
        )],
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                           "modules_to_save": ["embed_tokens"]}),
    );
    let err = fails(&[
        "lora",
        "apply",
        s(&fx.join("base")),
        s(&half),
        s(&dir.join("half_out")),
    ]);
    assert!(
        err.contains("lm_head.weight") && err.contains("modules_to_save"),
        "{err}"
    );
    assert!(!dir.join("half_out").exists());

    // `lora merge` cannot put two vocabularies in one adapter: refused, pointing to `merge`.
    let a3 = dir.join("a_extra");
    resized_adapter(&a3, &fx.join("ft_extra"), &qs, 15);
    let lm = dir.join("lora_merge.yml");
    std::fs::write(
        &lm,
        format!(
            "combination_type: linear\nadapters:\n  - {{adapter: {}, weight: 0.5}}\n  - {{adapter: {}, weight: 0.5}}\n",
            a1.display(),
            a3.display()
        ),
    )
    .unwrap();
    let err = fails(&["lora", "merge", s(&lm), s(&dir.join("lm_out"))]);
    assert!(
        err.contains("different vocabularies") && err.contains("tokenizer_source: union"),
        "{err}"
    );
    assert!(!dir.join("lm_out").exists());

    let base = fx.join("base");
    let refs = [
        format!("{}+{}", base.display(), a1.display()),
        format!("{}+{}", fx.join("ft_extra").display(), a2.display()),
        fx.join("ft_small").display().to_string(),
    ];
    let baked_refs = [
        b1.display().to_string(),
        b2.display().to_string(),
        refs[2].clone(),
    ];
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let models_yaml = |refs: &[String], params: &str| -> String {
        refs.iter()
            .map(|r| format!("  - model: {r}\n    parameters: {params}\n"))
            .collect()
    };
    // Inputs aligned to the union vocabulary, one by one.
    let mut aligned = Vec::new();
    for (k, r) in refs.iter().enumerate() {
        let mut ms = String::new();
        for (j, other) in refs.iter().enumerate() {
            ms += &format!(
                "  - model: {other}\n    parameters: {{weight: {}}}\n",
                u8::from(j == k)
            );
        }
        let cfg = write(
            &format!("align{k}.yml"),
            format!(
                "merge_method: linear\nbase_model: {}\nmodels:\n{ms}parameters: {{weight: 0}}\ntokenizer_source: union\nout_dtype: float32\n",
                base.display()
            ),
        );
        let out = dir.join(format!("aligned{k}"));
        ok(&["merge", s(&cfg), s(&out), "-q"]);
        let _ = r;
        aligned.push(out.display().to_string());
    }
    let base_cfg = write(
        "align_base.yml",
        format!(
            "merge_method: linear\nbase_model: {b}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1}}\n{}parameters: {{weight: 0}}\ntokenizer_source: union\nout_dtype: float32\n",
            models_yaml(&refs, "{weight: 0}"),
            b = base.display()
        ),
    );
    let aligned_base = dir.join("aligned_base");
    ok(&["merge", s(&base_cfg), s(&aligned_base), "-q"]);

    let methods: &[(&str, &str, &str)] = &[
        ("linear", "{weight: 0.5}", "parameters: {weight: 0.5}\n"),
        ("task_arithmetic", "{weight: 0.5}", ""),
        ("ties", "{weight: 1.0, density: 0.5}", ""),
        ("dare_ties", "{weight: 1.0, density: 0.5}", ""),
        (
            "della",
            "{weight: 1.0, density: 0.5, epsilon: 0.1}",
            "parameters: {lambda: 1.0}\n",
        ),
        ("breadcrumbs", "{weight: 1.0, density: 0.8, gamma: 0.1}", ""),
        ("model_stock", "{}", ""),
        ("karcher", "{}", ""),
        ("iso_c", "{}", ""),
        ("iso_cts", "{}", ""),
        ("tsv_m", "{}", ""),
        ("pcb", "{}", ""),
        ("emr", "{}", ""),
    ];
    for (method, params, extra) in methods {
        // Every config has the base (the rows a token's fill takes depend on it).
        let head = |b: &str| format!("merge_method: {method}\nbase_model: {b}\n");
        let x = write(
            &format!("{method}_adapters.yml"),
            format!(
                "{}models:\n{}{extra}tokenizer_source: union\nout_dtype: float32\n",
                head(&base.display().to_string()),
                models_yaml(&refs, params)
            ),
        );
        let y = write(
            &format!("{method}_baked.yml"),
            format!(
                "{}models:\n{}{extra}tokenizer_source: union\nout_dtype: float32\n",
                head(&base.display().to_string()),
                models_yaml(&baked_refs, params)
            ),
        );
        let z = write(
            &format!("{method}_prealigned.yml"),
            format!(
                "{}models:\n{}{extra}out_dtype: float32\n",
                head(&aligned_base.display().to_string()),
                models_yaml(&aligned, params)
            ),
        );
        let outs: Vec<PathBuf> = ["adapters", "baked", "prealigned"]
            .iter()
            .map(|n| dir.join(format!("{method}_{n}")))
            .collect();
        for (cfg, out) in [&x, &y, &z].iter().zip(&outs) {
            ok(&["merge", s(cfg), s(out), "-q", "--seed", "3"]);
        }
        for other in &outs[1..] {
            let diff = amalgam(&["diff", s(&outs[0]), s(other)]);
            assert!(
                diff.status.success(),
                "{method}: {} differs from {}: {}",
                outs[0].display(),
                other.display(),
                String::from_utf8_lossy(&diff.stdout)
            );
        }
        assert_eq!(
            json(&outs[0].join("tokenizer.json")),
            json(&outs[1].join("tokenizer.json")),
            "{method}"
        );
    }
}
