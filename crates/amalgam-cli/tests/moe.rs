//! `amalgam moe` against mergekit-moe 0.1.5 (fixtures from `scripts/gen_moe_fixtures.py`):
//! cheap_embed outputs tensor for tensor, `hidden*` router weights against mergekit's own
//! computation, the legacy layout, random gates, config fields, and bad input.

#![cfg(feature = "eval")]

mod common;

use std::path::{Path, PathBuf};

use amalgam::io::Model;
use common::{fails, json, ok, s};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/moe")
        .join(rel)
}

/// The fixture config `case`, its paths made absolute, with `extra` appended, written into
/// `dir`; returns its path.
fn config(dir: &Path, case: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(fixture(&format!("{case}.yml"))).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = text.replace("crates/amalgam-cli/", &format!("{}/", root.display()));
    let path = dir.join(format!("{case}.yml"));
    std::fs::write(&path, format!("{text}{extra}")).unwrap();
    path
}

/// A copy of folder `from` at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn cheap_embed_matches_mergekit_tensor_for_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for case in [
        "mixtral_cheap",
        "qwen2moe_cheap",
        "qwen3moe_cheap",
        "qwen2_qwen2moe_cheap",
    ] {
        let out = dir.path().join(case);
        let cfg = config(dir.path(), case, "");
        ok(&["moe", s(&cfg), s(&out)]);
        let (ours, theirs) = (
            Model::open(&out).unwrap(),
            Model::open(fixture(&format!("{case}.out"))).unwrap(),
        );
        let mut a: Vec<&str> = ours.tensors().iter().map(|t| t.name.as_str()).collect();
        let mut b: Vec<&str> = theirs.tensors().iter().map(|t| t.name.as_str()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: tensor names");
        for t in theirs.tensors() {
            let (x, y) = (
                theirs.tensor(&t.name).unwrap(),
                ours.tensor(&t.name).unwrap(),
            );
            assert_eq!((x.dtype, x.shape), (y.dtype, y.shape), "{case}: {}", t.name);
            if x.bytes == y.bytes {
                continue;
            }
            // Only an f32 router may differ, by torch's reduction order in the embedding sum and
            // norm (bf16 routers round it away and are identical): each row is a unit vector,
            // and each entry is within one ulp of that unit (f32::EPSILON).
            assert!(
                t.name.ends_with("mlp.gate.weight") && t.dtype == amalgam::DType::F32,
                "{case}: {} differs",
                t.name
            );
            let (xv, yv) = (
                theirs.floats(&t.name).unwrap(),
                ours.floats(&t.name).unwrap(),
            );
            let worst = xv
                .iter()
                .zip(&yv)
                .map(|(&p, &q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst <= f32::EPSILON, "{case}: {} off by {worst:e}", t.name);
        }
        // The same config keys and values (transformers_version is the writer's).
        let (mut c1, mut c2) = (
            config_json(&out),
            config_json(&fixture(&format!("{case}.out"))),
        );
        for c in [&mut c1, &mut c2] {
            c.as_object_mut().unwrap().remove("transformers_version");
        }
        assert_eq!(c1, c2, "{case}: config.json");
        // What mergekit leaves out, amalgam copies: the tokenizer.
        assert!(out.join("tokenizer.json").is_file());
    }
}

/// Router weights of an output, per layer, with the shared expert's gate row appended.
fn routers(out: &Path, layers: usize) -> Vec<Vec<f32>> {
    let m = Model::open(out).unwrap();
    (0..layers)
        .map(|l| {
            let mut v = m
                .floats(&format!("model.layers.{l}.mlp.gate.weight"))
                .unwrap();
            let shared = format!("model.layers.{l}.mlp.shared_expert_gate.weight");
            if m.contains(&shared) {
                v.extend(m.floats(&shared).unwrap());
            }
            v
        })
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

#[test]
fn hidden_gates_match_mergekits_computation() {
    // mergekit runs the base in bfloat16; amalgam in f32. Against mergekit's code with the base
    // loaded in f32 the router weights agree to f32 rounding; against its bf16 run, to bf16's
    // (measured 2.7e-3 to 4.9e-3 norm-relative per layer).
    let dir = tempfile::tempdir().unwrap();
    for case in [
        "llama_hidden",
        "llama_hidden_avg",
        "qwen3_hidden_last",
        "qwen2moe_hidden",
    ] {
        let out = dir.path().join(case);
        // In f32, so the comparison is not limited by the output's bf16.
        let cfg = config(dir.path(), case, "out_dtype: float32\n");
        ok(&["moe", s(&cfg), s(&out)]);
        let reference = Model::open(fixture(&format!("{case}.gates.safetensors"))).unwrap();
        for (l, ours) in routers(&out, 2).iter().enumerate() {
            let f32_ref = reference.floats(&format!("f32.{l}")).unwrap();
            let bf16_ref = reference.floats(&format!("bf16.{l}")).unwrap();
            let (r32, r16) = (rel(ours, &f32_ref), rel(ours, &bf16_ref));
            assert!(r32 < 1e-6, "{case} layer {l}: {r32:e} from mergekit in f32");
            assert!(
                r16 < 1e-2,
                "{case} layer {l}: {r16:e} from mergekit in bf16"
            );
        }
    }
}

#[test]
fn legacy_layout_holds_the_same_experts_unfused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "mixtral_cheap", "");
    let (v5, legacy) = (dir.path().join("v5"), dir.path().join("legacy"));
    ok(&["moe", s(&cfg), s(&v5)]);
    ok(&["moe", s(&cfg), s(&legacy), "--layout", "legacy"]);
    let (a, b) = (Model::open(&v5).unwrap(), Model::open(&legacy).unwrap());
    let (h, i) = (32, 48);
    for l in 0..2 {
        let gate_up = a
            .floats(&format!("model.layers.{l}.mlp.experts.gate_up_proj"))
            .unwrap();
        let down = a
            .floats(&format!("model.layers.{l}.mlp.experts.down_proj"))
            .unwrap();
        for e in 0..2 {
            let p = format!("model.layers.{l}.block_sparse_moe.experts.{e}");
            let w1 = b.floats(&format!("{p}.w1.weight")).unwrap();
            let w3 = b.floats(&format!("{p}.w3.weight")).unwrap();
            let w2 = b.floats(&format!("{p}.w2.weight")).unwrap();
            assert_eq!(w1, gate_up[2 * e * i * h..(2 * e + 1) * i * h]);
            assert_eq!(w3, gate_up[(2 * e + 1) * i * h..(2 * e + 2) * i * h]);
            assert_eq!(w2, down[e * h * i..(e + 1) * h * i]);
        }
        assert_eq!(
            a.floats(&format!("model.layers.{l}.mlp.gate.weight"))
                .unwrap(),
            b.floats(&format!("model.layers.{l}.block_sparse_moe.gate.weight"))
                .unwrap()
        );
    }
    // Every expert of the fixture is its source model's MLP: slot 0 is e0's gate_proj.
    let e0 = Model::open(fixture("llama/e0")).unwrap();
    assert_eq!(
        b.floats("model.layers.1.block_sparse_moe.experts.0.w1.weight")
            .unwrap(),
        e0.floats("model.layers.1.mlp.gate_proj.weight").unwrap()
    );
    assert_eq!(config_json(&legacy)["num_local_experts"], 2);
    let q3 = config(dir.path(), "qwen3moe_cheap", "");
    let q3_out = dir.path().join("q3");
    ok(&["moe", s(&q3), s(&q3_out), "--layout", "legacy"]);
    let m = Model::open(&q3_out).unwrap();
    assert!(m.contains("model.layers.0.mlp.experts.1.down_proj.weight"));
    assert!(!m.contains("model.layers.0.mlp.experts.down_proj"));
    assert_eq!(config_json(&q3_out)["num_experts"], 2);
}

#[test]
fn random_gates_follow_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "mixtral_cheap", "out_dtype: float32\n");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("gate_mode: cheap_embed", "gate_mode: uniform_random");
    std::fs::write(&cfg, text).unwrap();
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        ok(&["moe", s(&cfg), s(&out), "--seed", seed]);
        routers(&out, 2)
    };
    let (a, b, c) = (run("a", "1"), run("b", "1"), run("c", "2"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let bound = 1.0 / (32f32).sqrt();
    assert!(a.iter().flatten().all(|x| x.abs() <= bound));
}

#[test]
fn config_fields_of_the_base_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // rope scaling (the fixture's linear ×2) and an untied head.
    let cfg = config(dir.path(), "mixtral_cheap", "");
    let out = dir.path().join("m");
    ok(&["moe", s(&cfg), s(&out)]);
    let c = config_json(&out);
    assert_eq!(c["rope_parameters"]["rope_type"], "linear");
    assert_eq!(c["rope_parameters"]["factor"], 2.0);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["sliding_window"], serde_json::Value::Null);
    // A tied Qwen3 base: no LM head written, the tie kept.
    let cfg = config(dir.path(), "qwen3moe_cheap", "");
    let out = dir.path().join("q");
    ok(&["moe", s(&cfg), s(&out)]);
    assert_eq!(config_json(&out)["tie_word_embeddings"], true);
    assert!(!Model::open(&out).unwrap().contains("lm_head.weight"));
    // A Mistral base's sliding window (mergekit writes null, which changes its attention).
    let base = dir.path().join("mistral");
    copy_dir(&fixture("llama/base"), &base);
    let mut c = config_json(&base);
    c["model_type"] = "mistral".into();
    c["sliding_window"] = 4.into();
    std::fs::write(base.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    let yml = dir.path().join("mistral.yml");
    let experts = std::fs::read_to_string(config(dir.path(), "mixtral_cheap", "")).unwrap();
    let text = experts
        .lines()
        .map(|l| {
            if l.starts_with("base_model:") {
                format!("base_model: {}", base.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    // The experts stay Llama: every input must have the base's model type.
    std::fs::write(&yml, &text).unwrap();
    let e = fails(&["moe", s(&yml), s(&dir.path().join("x"))]);
    assert!(
        e.contains("expert 0") && e.contains("the base a mistral model"),
        "{e}"
    );
    for (i, name) in ["e0", "e1"].iter().enumerate() {
        let d = dir.path().join(format!("m{i}"));
        copy_dir(&fixture(&format!("llama/{name}")), &d);
        std::fs::write(d.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    }
    let text = text
        .replace(
            &s(&fixture("llama/e0")).to_string(),
            s(&dir.path().join("m0")),
        )
        .replace(
            &s(&fixture("llama/e1")).to_string(),
            s(&dir.path().join("m1")),
        );
    std::fs::write(&yml, text).unwrap();
    let out = dir.path().join("mixtral-sw");
    ok(&["moe", s(&yml), s(&out)]);
    assert_eq!(config_json(&out)["sliding_window"], 4);
    assert_eq!(config_json(&out)["model_type"], "mixtral");
}

#[test]
fn json_report_and_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "qwen2moe_cheap", "");
    let out = dir.path().join("o");
    let plan = ok(&["moe", s(&cfg), s(&out), "--dry-run"]);
    assert!(plan.contains("Qwen MoE"), "{plan}");
    assert!(
        plan.contains("model.layers.1.mlp.shared_expert_gate.weight [1, 32]"),
        "{plan}"
    );
    assert!(plan.contains("x0.3"), "residual_scale shown: {plan}");
    assert!(!out.exists(), "a dry run writes nothing");
    let report = json(&["moe", s(&cfg), s(&out), "--json"]);
    assert_eq!(report["architecture"], "Qwen MoE");
    assert_eq!(report["experts"], 2);
    assert_eq!(report["shared_experts"], 1);
    assert_eq!(report["prompts"], 6);
    assert_eq!(report["tensors"], 43);
}

/// `moe` with config `text` fails, writes nothing, and says `expected`.
fn refused(dir: &Path, text: &str, expected: &[&str]) {
    let yml = dir.join("bad.yml");
    std::fs::write(&yml, text).unwrap();
    let out = dir.join("bad-out");
    let e = fails(&["moe", s(&yml), s(&out)]);
    for x in expected {
        assert!(e.contains(x), "expected {x:?} in: {e}");
    }
    assert!(!out.exists(), "nothing written");
}

#[test]
fn bad_input_is_refused_with_the_expert_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("llama/base");
    let good = std::fs::read_to_string(config(dir.path(), "mixtral_cheap", "")).unwrap();
    // An expert of another hidden size.
    let other = dir.path().join("wide");
    let e1 = fixture("llama/e1");
    copy_dir(&e1, &other);
    let mut c = config_json(&other);
    c["hidden_size"] = 64.into();
    std::fs::write(other.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    refused(
        dir.path(),
        &good.replace(s(&e1), s(&other)),
        &["expert 1", "hidden_size 64, the base 32"],
    );
    // An expert of another architecture.
    let qwen = dir.path().join("qwen3-e1");
    copy_dir(&e1, &qwen);
    let mut c = config_json(&qwen);
    c["model_type"] = "qwen3".into();
    std::fs::write(qwen.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    refused(
        dir.path(),
        &good.replace(s(&e1), s(&qwen)),
        &["expert 1", "is a qwen3 model, the base a llama model"],
    );
    // An expert missing an MLP tensor.
    let holed = dir.path().join("holed");
    let src = Model::open(&e1).unwrap();
    let kept: Vec<common::T> = src
        .tensors()
        .iter()
        .filter(|t| t.name != "model.layers.1.mlp.up_proj.weight")
        .map(|t| {
            let v = src.tensor(&t.name).unwrap();
            common::raw(&t.name, v.dtype, v.shape, v.bytes.to_vec())
        })
        .collect();
    common::write_model(&holed, &kept);
    std::fs::copy(e1.join("config.json"), holed.join("config.json")).unwrap();
    refused(
        dir.path(),
        &good.replace(s(&e1), s(&holed)),
        &["expert 1", "model.layers.1.mlp.up_proj.weight not found"],
    );
    // Qwen2-MoE without its shared expert.
    refused(
        dir.path(),
        &format!("{good}architecture: qwen\n"),
        &["Qwen MoE needs exactly one shared expert"],
    );
    // A prompt that tokenizes to nothing.
    refused(
        dir.path(),
        &good.replace("- task vectors into one model", "- ''"),
        &["expert 1", "prompt 1", "tokenizes to no tokens"],
    );
    // A base whose attention has biases, which Mixtral has not.
    let biased = common::eval_fixture("llama");
    let copy = dir.path().join("biased-copy");
    copy_dir(&biased, &copy);
    let text = good
        .replace(s(&base), s(&biased))
        .replace(s(&fixture("llama/e0")), s(&biased))
        .replace(s(&e1), s(&copy));
    refused(
        dir.path(),
        &text,
        &[
            "self_attn.k_proj.bias has no place in a Mixtral model",
            "architecture: qwen",
        ],
    );
    // mergekit's checks.
    refused(
        dir.path(),
        &good.replace("experts_per_token: 2", "experts_per_token: 3"),
        &["only 2 experts"],
    );
    refused(
        dir.path(),
        &format!("{good}gate_moed: hidden\n"),
        &["gate_moed"],
    );
}

#[test]
fn a_shared_expert_of_its_own_model() {
    // mergekit 0.1.5 opens only the base and the routed experts, so a shared expert from any
    // other model fails there; here it is read like the others.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "qwen2moe_cheap", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let shared_at = text.find("shared_experts:").unwrap();
    let (head, tail) = text.split_at(shared_at);
    let tail = tail.replace(s(&fixture("llama/base")), s(&fixture("llama/e2")));
    std::fs::write(&cfg, format!("{head}{tail}")).unwrap();
    let out = dir.path().join("o");
    ok(&["moe", s(&cfg), s(&out)]);
    let (m, e2) = (
        Model::open(&out).unwrap(),
        Model::open(fixture("llama/e2")).unwrap(),
    );
    for proj in ["gate_proj", "up_proj", "down_proj"] {
        assert_eq!(
            m.floats(&format!("model.layers.1.mlp.shared_expert.{proj}.weight"))
                .unwrap(),
            e2.floats(&format!("model.layers.1.mlp.{proj}.weight"))
                .unwrap()
        );
    }
}

/// Logits of `model` for `ids` [b, t] through `amalgam eval`'s forward, flattened.
fn eval_logits(model: &Path, ids: &[Vec<u32>]) -> Vec<f32> {
    let ev = amalgam_eval::Evaluator::open(model, None).unwrap();
    ev.forward_ids(ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn eval_runs_the_moe_models_as_transformers_does() {
    // transformers 5.24 loads each of mergekit's (= amalgam's) outputs; its logits for fixed ids
    // are the reference for amalgam's own MoE forward: top-k routing, renormalisation as the
    // config says, the shared expert's sigmoid gate.
    let dir = tempfile::tempdir().unwrap();
    for case in [
        "mixtral_cheap",
        "qwen2moe_cheap",
        "qwen3moe_cheap",
        "qwen2_qwen2moe_cheap",
    ] {
        let out = fixture(&format!("{case}.out"));
        let expected = Model::open(out.join("expected.safetensors")).unwrap();
        let ids: Vec<i64> = bytemuck_ids(expected.tensor("ids").unwrap().bytes);
        let ids: Vec<Vec<u32>> = ids
            .chunks(12)
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect();
        let want = expected.floats("logits").unwrap();
        let got = eval_logits(&out, &ids);
        let worst = max_abs(&want, &got);
        eprintln!("{case}: logits within {worst:e} of transformers'");
        assert!(worst < 1e-4, "{case}: logits off by {worst}");
        // The legacy layout computes the same.
        let cfg = config(dir.path(), case, "");
        let legacy = dir.path().join(format!("{case}-legacy"));
        ok(&["moe", s(&cfg), s(&legacy), "--layout", "legacy"]);
        let again = eval_logits(&legacy, &ids);
        let worst = max_abs(&got, &again);
        assert!(worst < 1e-5, "{case} legacy: logits off by {worst}");
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn bytemuck_ids(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn eval_reports_the_tokens_each_expert_received() {
    let task = common::eval_fixture("llama").join("lm.jsonl");
    for case in ["mixtral_cheap", "qwen2moe_cheap"] {
        let out = fixture(&format!("{case}.out"));
        let report = json(&["eval", s(&out), "--task", s(&task), "--json"]);
        let t = &report["tasks"][0];
        assert!(t["perplexity"].as_f64().unwrap().is_finite());
        let layers = t["expert_fractions"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "{case}");
        for l in layers {
            let f: Vec<f64> = l
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(f.len(), 2);
            // Top-2 of 2 experts: every token goes to both.
            assert!(
                (f[0] - 0.5).abs() < 1e-12 && (f[1] - 0.5).abs() < 1e-12,
                "{case}: {f:?}"
            );
        }
    }
    // Top-1: each token to one expert, the fractions a split of the tokens.
    let dir = tempfile::tempdir().unwrap();
    let top1 = dir.path().join("top1");
    copy_dir(&fixture("mixtral_cheap.out"), &top1);
    let mut c = config_json(&top1);
    c["num_experts_per_tok"] = 1.into();
    std::fs::write(top1.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    let report = json(&["eval", s(&top1), "--task", s(&task), "--json"]);
    for l in report["tasks"][0]["expert_fractions"].as_array().unwrap() {
        let f: Vec<f64> = l
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{f:?}");
    }
}

#[test]
fn an_expert_given_as_model_plus_adapter() {
    // `base+adapter` as a source_model: the expert is the adapter baked into the base, exactly
    // as `lora apply` bakes it.
    let dir = tempfile::tempdir().unwrap();
    let (base, e0) = (fixture("llama/base"), fixture("llama/e0"));
    let adapter = dir.path().join("e0-lora");
    ok(&[
        "lora",
        "extract",
        "--base",
        s(&base),
        "--model",
        s(&e0),
        "--rank",
        "4",
        s(&adapter),
    ]);
    let baked = dir.path().join("baked");
    ok(&["lora", "apply", s(&base), s(&adapter), s(&baked)]);
    let text = std::fs::read_to_string(config(dir.path(), "mixtral_cheap", "")).unwrap();
    let text = text.replace(
        &format!("source_model: {}", s(&e0)),
        &format!("source_model: {}+{}", s(&base), s(&adapter)),
    );
    let yml = dir.path().join("adapter.yml");
    std::fs::write(&yml, text).unwrap();
    let out = dir.path().join("o");
    ok(&["moe", s(&yml), s(&out), "--layout", "legacy"]);
    let (m, b) = (Model::open(&out).unwrap(), Model::open(&baked).unwrap());
    for (w, proj) in [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")] {
        let ours = m
            .floats(&format!(
                "model.layers.1.block_sparse_moe.experts.0.{w}.weight"
            ))
            .unwrap();
        let want = b
            .floats(&format!("model.layers.1.mlp.{proj}.weight"))
            .unwrap();
        assert_eq!(ours, want, "{proj}");
        let plain = Model::open(&base).unwrap();
        assert_ne!(
            ours,
            plain
                .floats(&format!("model.layers.1.mlp.{proj}.weight"))
                .unwrap()
        );
    }
}

#[test]
fn noise_is_seeded_and_scaled_and_warnings_are_mergekits() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(config(dir.path(), "mixtral_cheap", "out_dtype: float32\n"))
        .unwrap()
        .replace("residual_scale: 0.3", "noise_scale: 0.01");
    let yml = dir.path().join("noise.yml");
    std::fs::write(&yml, &text).unwrap();
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        ok(&[
            "moe",
            s(&yml),
            s(&out),
            "--seed",
            seed,
            "--layout",
            "legacy",
        ]);
        Model::open(&out)
            .unwrap()
            .floats("model.layers.0.block_sparse_moe.experts.1.w2.weight")
            .unwrap()
    };
    let (a, b, c) = (run("a", "5"), run("b", "5"), run("c", "6"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let clean = Model::open(fixture("llama/e1"))
        .unwrap()
        .floats("model.layers.0.mlp.down_proj.weight")
        .unwrap();
    let noise: Vec<f64> = a.iter().zip(&clean).map(|(x, y)| (x - y) as f64).collect();
    let sd = (noise.iter().map(|d| d * d).sum::<f64>() / noise.len() as f64).sqrt();
    assert!((sd - 0.01).abs() < 0.001, "noise sd {sd}");
    // Three experts: not a power of two, which llama.cpp cannot load.
    let three = std::fs::read_to_string(config(dir.path(), "mixtral_cheap", "")).unwrap();
    let e1 = fixture("llama/e1");
    let extra = format!(
        "- source_model: {}\n  positive_prompts:\n  - numbers 12345 and punctuation!?\n",
        s(&fixture("llama/e2"))
    );
    let three = three.replacen(
        &format!("- source_model: {}", s(&e1)),
        &format!("{extra}- source_model: {}", s(&e1)),
        1,
    );
    let yml = dir.path().join("three.yml");
    std::fs::write(&yml, three).unwrap();
    let out = common::amalgam(&["moe", s(&yml), s(&dir.path().join("three"))]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3 experts, which is not a power of two"),
        "{err}"
    );
}
