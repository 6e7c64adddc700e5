//! `amalgam lora apply` against PEFT's `merge_and_unload` (fixtures from
//! scripts/gen_lora_fixtures.py: peft 0.21.2 on the small f32 Llama fixture), and the errors
//! for adapters that do not fit.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base() -> PathBuf {
    fixtures().join("merge/models/llama_base")
}

fn adapter(case: &str) -> PathBuf {
    fixtures().join("lora/adapters").join(case)
}

/// Apply `case` and return the worst norm-relative error against PEFT's merged model.
fn apply_and_compare(case: &str) -> f64 {
    apply_to_and_compare(&base(), case)
}

fn apply_to_and_compare(base: &Path, case: &str) -> f64 {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    ok(&["lora", "apply", s(base), s(&adapter(case)), s(&out), "-q"]);
    let expected = fixtures().join("lora/expected").join(case);
    let json = amalgam(&["diff", s(&out), s(&expected), "--json", "--all"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["only_in_a"], serde_json::json!([]), "{case}");
    assert_eq!(report["only_in_b"], serde_json::json!([]), "{case}");
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["rel"].as_f64())
        .fold(0.0, f64::max)
}

#[test]
fn apply_matches_peft_merge_and_unload() {
    for case in ["qv", "all_rslora_patterns"] {
        let worst = apply_and_compare(case);
        assert!(worst <= 1e-6, "{case}: worst norm-relative error {worst:e}");
    }
}

/// mergekit-extract-lora's adapters save embeddings and norms whole (`modules_to_save`) and
/// write `lora_B.bias` without `lora_bias` (which PEFT then ignores, and so does amalgam).
#[test]
fn mergekit_extracted_adapters_apply_like_peft() {
    let models = fixtures().join("merge/models");
    for (base, case) in [
        ("llama_base", "mergekit_llama_r4"),
        ("qwen2_base", "mergekit_qwen2_r4"),
    ] {
        let worst = apply_to_and_compare(&models.join(base), case);
        assert!(worst <= 1e-6, "{case}: worst norm-relative error {worst:e}");
    }
}

#[test]
fn apply_changes_only_the_targets_and_scales() {
    let d = tempfile::tempdir().unwrap();
    let (one, half, zero) = (d.path().join("1"), d.path().join("h"), d.path().join("0"));
    for (out, scale) in [(&one, "1"), (&half, "0.5"), (&zero, "0")] {
        ok(&[
            "lora",
            "apply",
            s(&base()),
            s(&adapter("qv")),
            s(out),
            "--scale",
            scale,
            "-q",
        ]);
    }
    // Scale 0 is the base, bit for bit.
    assert!(amalgam(&["diff", s(&zero), s(&base())]).status.success());
    let floats = |m: &Path, name: &str| {
        let model = amalgam::io::Model::open(m).unwrap();
        let v = model.tensor(name).unwrap();
        let mut out = Vec::new();
        amalgam::dtype::decode_f32(v.dtype, v.bytes, &mut out);
        out
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    let (b, x1, xh) = (floats(&base(), q), floats(&one, q), floats(&half, q));
    for i in 0..b.len() {
        assert!(((xh[i] - b[i]) - 0.5 * (x1[i] - b[i])).abs() < 1e-6);
    }
    assert_ne!(b, x1);
    // Untargeted tensors are copied.
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(floats(&base(), k), floats(&one, k));
}

/// Copy adapter `case` into `dir`, let `edit` change its config and tensors, return its path.
fn doctored(dir: &Path, case: &str, edit: impl Fn(&mut serde_json::Value, &mut Vec<T>)) -> PathBuf {
    let to = dir.join(case);
    std::fs::create_dir_all(&to).unwrap();
    let from = adapter(case);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("adapter_config.json")).unwrap()).unwrap();
    let model = amalgam::io::Model::open(from.join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<T> = model
        .tensors()
        .iter()
        .map(|e| {
            let v = model.tensor(&e.name).unwrap();
            raw(&e.name, v.dtype, v.shape, v.bytes.to_vec())
        })
        .collect();
    edit(&mut cfg, &mut tensors);
    std::fs::write(to.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        to.join("adapter_model.safetensors"),
        safetensors_bytes(&tensors),
    )
    .unwrap();
    to
}

fn rejected(adapter: &Path, expect: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let err = fails(&["lora", "apply", s(&base()), s(adapter), s(&out), "-q"]);
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn bad_adapters_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    // The config's rank disagrees with the factors.
    let a = doctored(d.path(), "qv", |cfg, _| cfg["r"] = 3.into());
    rejected(
        &a,
        &["model.layers.0.self_attn.q_proj", "rank mismatch", "r = 3"],
    );
    // A module whose B is missing.
    let b = doctored(&d.path().join("b"), "qv", |_, t| {
        t.retain(|t| t.name != q_a.replace("lora_A", "lora_B"))
    });
    rejected(&b, &["q_proj has lora_A but no lora_B"]);
    // A target the base does not have.
    let c = doctored(&d.path().join("c"), "qv", |_, t| {
        for t in t.iter_mut() {
            t.name = t.name.replace("layers.0.", "layers.9.");
        }
    });
    rejected(
        &c,
        &[
            "model.layers.9.self_attn.q_proj.weight",
            "is this the adapter's base model?",
        ],
    );
    // A delta of the wrong shape for its base tensor (A with more input columns).
    let e = doctored(&d.path().join("e"), "qv", |_, t| {
        let i = t.iter().position(|t| t.name == q_a).unwrap();
        t[i] = float(q_a, amalgam::DType::F32, &[4, 20], 1);
    });
    rejected(&e, &["q_proj.weight", "[16, 20]", "[16, 16]"]);
    // Unsupported adapter kinds and stray tensors.
    let f = doctored(&d.path().join("f"), "qv", |cfg, _| {
        cfg["use_dora"] = true.into()
    });
    rejected(&f, &["DoRA"]);
    let g = doctored(&d.path().join("g"), "qv", |_, t| {
        t.push(float(
            "base_model.model.lm_head.bias",
            amalgam::DType::F32,
            &[64],
            2,
        ))
    });
    rejected(
        &g,
        &["lm_head.bias", "neither a LoRA factor", "modules_to_save"],
    );
    // Not an adapter at all.
    rejected(&base(), &["no adapter_config.json"]);
}

#[test]
fn model_plus_adapter_in_a_merge_config_is_the_baked_model() {
    // mergekit's `model+adapter` syntax: the adapter's delta is added as the tensors are read.
    // A one-model linear merge of it is PEFT's merged model.
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.yml");
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
        base().display(),
        adapter("qv").display()
    );
    std::fs::write(&cfg, yaml).unwrap();
    let out = d.path().join("out");
    ok(&["merge", s(&cfg), s(&out), "-q"]);
    let expected = fixtures().join("lora/expected/qv");
    let diff = amalgam(&["diff", s(&out), s(&expected), "--rtol", "1e-6"]);
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    // Chunked reads (rows split across chunks) give the same bytes.
    let chunked = d.path().join("chunked");
    ok(&["merge", s(&cfg), s(&chunked), "-q", "--chunk-elements", "7"]);
    assert!(amalgam(&["diff", s(&out), s(&chunked)]).status.success());
    // Adapters carrying whole tensors: saved embedding base layers (PEFT), modules_to_save
    // (mergekit-extract-lora); those replace the model's tensors as they are read.
    for case in ["all_rslora_patterns", "mergekit_llama_r4"] {
        let yaml = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("adapters/qv", &format!("adapters/{case}"));
        let cfg2 = d.path().join(format!("{case}.yml"));
        std::fs::write(&cfg2, yaml).unwrap();
        let out = d.path().join(case);
        ok(&["merge", s(&cfg2), s(&out), "-q"]);
        let expected = fixtures().join("lora/expected").join(case);
        let diff = amalgam(&["diff", s(&out), s(&expected), "--rtol", "1e-6"]);
        assert!(
            diff.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
}
