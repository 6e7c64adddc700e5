//! `amalgam merge` beyond parity: every config error and unsupported combination gives a clear
//! message and writes nothing; random methods are seeded and independent of the thread count
//! and of the vector instructions used; the dry run prints the plan; side files land in the
//! output.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge/models")
}

/// Write `yaml` (with `$M/` standing for the fixture models directory) to a config in `dir`.
fn config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("config.yml");
    let text = yaml.replace("$M/", &format!("{}/", models().display()));
    std::fs::write(&path, text).unwrap();
    path
}

/// The merge fails with exit code 2, its message has every `expect`, and no output exists.
fn rejected(yaml: &str, expect: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), yaml);
    let out = d.path().join("out");
    let err = fails(&["merge", s(&cfg), s(&out), "-q"]);
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(listing(d.path()), ["config.yml"], "nothing written");
}

const TIES: &str = "
merge_method: ties
base_model: $M/llama_base
models:
  - model: $M/llama_ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: $M/llama_ft2
    parameters: {weight: 0.5, density: 0.5}
";

#[test]
fn unknown_method_lists_the_valid_ones() {
    rejected(
        &TIES.replace("ties", "tiez"),
        &[
            "config.yml",
            "unknown merge_method 'tiez'",
            "breadcrumbs_ties",
            "model_stock",
        ],
    );
}

#[test]
fn unknown_key_names_the_valid_keys() {
    rejected(
        &format!("{TIES}mergemethod: x\n"),
        &["mergemethod", "merge_method"],
    );
    rejected(
        &TIES.replace(
            "parameters: {weight: 0.5, density: 0.5}\n  - model: $M/llama_ft2",
            "paramters: {weight: 0.5}\n  - model: $M/llama_ft2",
        ),
        &["paramters", "parameters"],
    );
}

#[test]
fn missing_required_parameter_names_model_and_parameter() {
    rejected(
        &TIES.replace(
            "weight: 0.5, density: 0.5}\n  - model: $M/llama_ft2",
            "density: 0.5}\n  - model: $M/llama_ft2",
        ),
        &["needs parameter 'weight'", "llama_ft1"],
    );
    rejected(
        "merge_method: slerp\nbase_model: $M/llama_base\nmodels: [{model: $M/llama_base}, {model: $M/llama_other}]\n",
        &["needs parameter 't'"],
    );
}

#[test]
fn parameters_the_method_does_not_read_are_warned_about() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        &TIES
            .replace(
                "density: 0.5}\n  - model: $M/llama_ft2",
                "densty: 0.5}\n  - model: $M/llama_ft2",
            )
            .replace(
                "merge_method: ties",
                "merge_method: ties\nparameters: {t: 0.5}",
            ),
    );
    let out = amalgam(&["merge", s(&cfg), s(&d.path().join("out"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: parameter 'densty'"), "{err}");
    // --dry-run lists the warnings with the plan.
    let out = amalgam(&["merge", s(&cfg), s(&d.path().join("out2")), "--dry-run"]);
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("parameter 'densty' is not used by merge_method ties")
            && err.contains("parameter 't' is not used")
            && err.contains("density"),
        "{err}"
    );
    // A config whose every parameter is read gets no such warning.
    let cfg = config(d.path(), TIES);
    let out = amalgam(&["merge", s(&cfg), s(&d.path().join("out3"))]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not used"));
}

#[test]
fn bad_parameter_values_are_reported() {
    rejected(
        &format!("{TIES}parameters: {{lambda: abc}}\n"),
        &["lambda", "not a number"],
    );
    rejected(
        &format!("{TIES}parameters: {{normalize: 7}}\n"),
        &["normalize", "not a boolean"],
    );
}

#[test]
fn missing_model_and_lora_references_are_clear() {
    rejected(
        &TIES.replace("$M/llama_ft2", "$M/nope"),
        &["nope", "not found", "does not download"],
    );
    rejected(
        &TIES.replace("$M/llama_ft2", "$M/llama_ft2+M/adapter"),
        &["adapter 'M/adapter'", "not found"],
    );
}

#[test]
fn method_contracts_are_enforced() {
    rejected(
        "merge_method: slerp\nbase_model: $M/llama_base\nmodels: [{model: $M/llama_ft1}, {model: $M/llama_ft2}]\nparameters: {t: 0.5}\n",
        &["slerp", "exactly 2"],
    );
    rejected(
        "merge_method: ties\nmodels: [{model: $M/llama_ft1, parameters: {weight: 1}}]\n",
        &["needs a base_model"],
    );
    rejected(
        "merge_method: model_stock\nbase_model: $M/llama_base\nmodels: [{model: $M/llama_ft1}]\n",
        &["at least 3"],
    );
}

#[test]
fn structural_problems_are_reported() {
    rejected(
        "merge_method: linear\n",
        &["exactly one of 'models' or 'slices'"],
    );
    rejected(
        "merge_method: linear\nmodules: {text: {models: []}}\n",
        &["'modules'", "not supported yet"],
    );
    rejected(
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: $M/llama_ft1, layer_range: [0, 2]}\n      - {model: $M/llama_ft2, layer_range: [0, 3]}\n",
        &["same number of layers"],
    );
    rejected(
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: $M/llama_ft1, layer_range: [2, 9]}\n",
        &["past its 4 layers"],
    );
    rejected(
        &format!("{TIES}tokenizer_source: union\n"),
        &[
            "tokenizer source 'union'",
            "llama_base",
            "no tokenizer.json",
        ],
    );
    // Parameters outside their range name the model, the parameter and the range.
    rejected(
        &TIES.replacen("density: 0.5", "density: 1.5", 1),
        &["llama_ft1", "parameter 'density' = 1.5 is outside [0, 1]"],
    );
    rejected(
        "merge_method: slerp\nbase_model: $M/llama_base\nmodels:\n  - {model: $M/llama_ft1}\n  - {model: $M/llama_base}\nparameters: {t: [0, 1.4]}\n",
        &["parameter 't' = 1.4 is outside [0, 1]", "layers.3"],
    );
    rejected(
        "merge_method: della\nbase_model: $M/llama_base\nmodels:\n  - {model: $M/llama_ft1, parameters: {weight: 1, density: 0.9, epsilon: 0.2}}\n",
        &["llama_ft1", "density ± epsilon must lie in (0, 1)"],
    );
    rejected(
        &format!("{TIES}dtype: int8\n"),
        &["'int8' is not a float dtype"],
    );
    rejected(
        &format!("{TIES}chat_template: nope\n"),
        &["chat_template 'nope'"],
    );
    rejected(
        "merge_method: ties\nbase_model: $M/llama_base\nslices:\n  - sources:\n      - {model: $M/llama_ft1, layer_range: [0, 4], parameters: {weight: 1}}\n",
        &["base model", "not among the sources"],
    );
}

const MIXED: &str = "merge_method: linear\nslices:\n  - sources:\n      - {model: $M/llama_ft1, layer_range: [0, 2], parameters: {weight: 1}}\n      - {model: $M/OTHER, layer_range: [0, 2], parameters: {weight: 1}}\n";

#[test]
fn mismatched_architectures_are_reported() {
    rejected(
        &MIXED.replace("OTHER", "qwen2_ft1"),
        &[
            "different architectures",
            "LlamaForCausalLM",
            "Qwen2ForCausalLM",
            "--allow-crimes",
        ],
    );
    // With --allow-crimes the layouts still have to agree tensor by tensor.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &MIXED.replace("OTHER", "phi3_ft1"));
    let err = fails(&[
        "merge",
        s(&cfg),
        s(&d.path().join("o")),
        "-q",
        "--allow-crimes",
    ]);
    assert!(
        err.contains("missing from model") && err.contains("phi3_ft1"),
        "{err}"
    );
}

/// A copy of `llama_ft1` where one tensor is replaced.
fn doctored(dir: &Path, name: &str, f: impl Fn(&mut Vec<f32>, &mut Vec<usize>)) -> PathBuf {
    let src = amalgam::io::Model::open(models().join("llama_ft1")).unwrap();
    let mut tensors = Vec::new();
    for e in src.tensors() {
        let v = src.tensor(&e.name).unwrap();
        let mut vals = Vec::new();
        amalgam::dtype::decode_f32(v.dtype, v.bytes, &mut vals);
        let mut shape = e.shape.clone();
        if e.name == name {
            f(&mut vals, &mut shape);
        }
        let mut bytes = Vec::new();
        amalgam::dtype::encode_f32(amalgam::DType::F32, &vals, &mut bytes);
        tensors.push(raw(&e.name, amalgam::DType::F32, &shape, bytes));
    }
    let out = dir.join("doctored");
    write_model(&out, &tensors);
    out
}

#[test]
fn shape_mismatch_and_nan_inputs_name_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let bad = doctored(d.path(), "model.layers.1.mlp.up_proj.weight", |v, s| {
        v.truncate(16 * 16);
        *s = vec![16, 16];
    });
    let yaml = TIES.replace("$M/llama_ft2", s(&bad));
    rejected(
        &yaml,
        &["model.layers.1.mlp.up_proj.weight", "[16, 16]", "doctored"],
    );
    let nan = doctored(d.path(), "model.norm.weight", |v, _| v[3] = f32::NAN);
    let yaml = TIES.replace("$M/llama_ft2", s(&nan));
    let d2 = tempfile::tempdir().unwrap();
    let cfg = config(d2.path(), &yaml);
    let err = fails(&["merge", s(&cfg), s(&d2.path().join("out")), "-q"]);
    assert!(
        err.contains("model.norm.weight") && err.contains("NaN") && err.contains("doctored"),
        "{err}"
    );
    assert_eq!(listing(d2.path()), ["config.yml"]);
}

#[test]
fn zero_weight_sum_in_linear_is_an_error() {
    rejected(
        "merge_method: linear\nmodels: [{model: $M/llama_ft1, parameters: {weight: 1}}, {model: $M/llama_ft2, parameters: {weight: -1}}]\n",
        &["sum to zero"],
    );
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        "merge_method: ties\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\n    parameters: {weight: 1, density: [0.2, 0.8]}\nparameters: {lambda: 0.5}\n",
    );
    let out = d.path().join("out");
    let plan = ok(&["merge", s(&cfg), s(&out), "--dry-run"]);
    assert!(plan.contains("39 output tensors"), "{plan}");
    assert!(
        plan.contains("model.layers.3.mlp.up_proj.weight [32, 16] F32 t=1.0000"),
        "{plan}"
    );
    assert!(plan.contains("lambda=0.5"), "{plan}");
    // density 0.2 → 0.8 over 4 layers: layer 1 sits at t = 1/3.
    let lines: Vec<&str> = plan.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("model.layers.1.mlp.up_proj.weight"))
        .unwrap();
    assert!(
        lines[at + 1].contains("llama_ft1:model.layers.1.mlp.up_proj.weight weight=1 density=0.4"),
        "{}",
        lines[at + 1]
    );
    assert!(lines[at + 2].ends_with("(base)"), "{}", lines[at + 2]);
    assert!(!out.exists());
}

const DARE: &str = "
merge_method: dare_ties
base_model: $M/llama_base
models:
  - model: $M/llama_ft1
    parameters: {weight: 1.0, density: 0.3}
  - model: $M/llama_ft2
    parameters: {weight: 1.0, density: 0.3}
";

fn merged_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("model.safetensors")).unwrap()
}

#[test]
fn random_methods_depend_on_the_seed_only() {
    for method in ["dare_ties", "dare_linear", "della", "della_linear"] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), &DARE.replace("dare_ties", method));
        let run = |threads: &str, seed: &str, name: &str| {
            let out = d.path().join(name);
            ok(&[
                "merge",
                s(&cfg),
                s(&out),
                "--threads",
                threads,
                "--seed",
                seed,
                "-q",
            ]);
            merged_bytes(&out)
        };
        let one = run("1", "7", "a");
        assert_eq!(one, run("2", "7", "b"), "{method}: 1 vs 2 threads");
        let out = d.path().join("baseline");
        let baseline = std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
            .args(["merge", s(&cfg), s(&out), "--seed", "7", "-q"])
            .env("AMALGAM_SIMD", "baseline")
            .output()
            .unwrap();
        assert!(baseline.status.success());
        assert_eq!(one, merged_bytes(&out), "{method}: baseline loops");
        assert_eq!(one, run("2", "7", "c"), "{method}: repeat");
        assert_ne!(one, run("2", "8", "d"), "{method}: another seed");
    }
}

/// The fixture models `names` converted to `dtype` under `dir` (same names).
fn converted(dir: &Path, from: &Path, names: &[&str], dtype: &str) {
    for n in names {
        let out = dir.join(n);
        ok(&["convert", s(&from.join(n)), s(&out), "--dtype", dtype, "-q"]);
    }
}

#[test]
fn bf16_inputs_give_the_bytes_of_their_f32_values() {
    // bf16 inputs take the kernels that read bf16 bits as they are (no f32 copy: DARE's L1
    // sums, the selection histograms, the fused output loop, with a decoded fallback for chunks
    // it does not take); their values in f32 files take the decoding path. Both must give the
    // same bytes, however the tensors are chunked, held between passes or not, on any number of
    // threads.
    let d = tempfile::tempdir().unwrap();
    let names = ["llama_base", "llama_ft1", "llama_ft2"];
    let (bf16, f32s) = (d.path().join("bf16"), d.path().join("f32"));
    converted(&bf16, &models(), &names, "bf16");
    converted(&f32s, &bf16, &names, "f32");
    for method in [
        "dare_ties",
        "dare_linear",
        "ties",
        "breadcrumbs_ties",
        "task_arithmetic",
    ] {
        let yaml = DARE.replace("dare_ties", method);
        let from_bf16 = config(&bf16, &yaml.replace("$M", s(&bf16)));
        let from_f32 = config(
            &f32s,
            &(yaml.replace("$M", s(&f32s)) + "out_dtype: bfloat16\n"),
        );
        let run = |cfg: &Path, name: &str, extra: &[&str]| {
            let out = d.path().join(format!("{method}-{name}"));
            let mut args = vec!["merge", s(cfg), s(&out), "-q"];
            args.extend(extra);
            ok(&args);
            merged_bytes(&out)
        };
        let reference = run(&from_f32, "f32", &[]);
        for (name, extra) in [
            ("bf16", &[][..]),
            ("no-cache", &["--input-cache", "0"][..]),
            ("chunks", &["--chunk-elements", "7", "--threads", "1"][..]),
            (
                "chunks-no-cache",
                &["--chunk-elements", "7", "--input-cache", "0"][..],
            ),
        ] {
            assert!(
                run(&from_bf16, name, extra) == reference,
                "{method}: bf16 inputs ({name}) differ from their f32 values"
            );
        }
    }
    // A bad cache size is refused before anything is read or written.
    let cfg = config(&bf16, &DARE.replace("$M", s(&bf16)));
    let bad = fails(&[
        "merge",
        s(&cfg),
        s(&d.path().join("x")),
        "--input-cache",
        "lots",
    ]);
    assert!(
        bad.contains("--input-cache") && bad.contains("'lots' is not a size"),
        "{bad}"
    );
    assert!(!d.path().join("x").exists());
    // A NaN in a bf16 input is caught on that path too.
    let nan = doctored(d.path(), "model.norm.weight", |v, _| v[3] = f32::NAN);
    let nan_bf16 = d.path().join("nan-bf16");
    ok(&["convert", s(&nan), s(&nan_bf16), "--dtype", "bf16", "-q"]);
    let yaml = DARE
        .replace("$M/llama_ft2", s(&nan_bf16))
        .replace("$M", s(&bf16));
    std::fs::create_dir(d.path().join("nan")).unwrap();
    let cfg = config(&d.path().join("nan"), &yaml);
    let err = fails(&["merge", s(&cfg), s(&d.path().join("nan-out")), "-q"]);
    assert!(
        err.contains("model.norm.weight") && err.contains("NaN") && err.contains("nan-bf16"),
        "{err}"
    );
    assert!(!d.path().join("nan-out").exists());
}

#[test]
fn dare_keeps_the_density_fraction_and_l1_norm() {
    let d = tempfile::tempdir().unwrap();
    // One fine-tune, weight 1, no election: output − base = the rescaled sparse task vector.
    let cfg = config(
        d.path(),
        "merge_method: dare_linear\nbase_model: $M/llama_base\nmodels: [{model: $M/llama_ft1, parameters: {weight: 1.0, density: 0.3}}]\n",
    );
    let out = d.path().join("o");
    ok(&["merge", s(&cfg), s(&out), "-q"]);
    let read = |p: &Path| amalgam::io::Model::open(p).unwrap();
    let (m_out, m_base, m_ft) = (
        read(&out),
        read(&models().join("llama_base")),
        read(&models().join("llama_ft1")),
    );
    let (mut kept, mut total) = (0usize, 0usize);
    for e in m_out.tensors() {
        let get = |m: &amalgam::io::Model| {
            let mut v = Vec::new();
            let t = m.tensor(&e.name).unwrap();
            amalgam::dtype::decode_f32(t.dtype, t.bytes, &mut v);
            v
        };
        let (o, b, f) = (get(&m_out), get(&m_base), get(&m_ft));
        let delta: Vec<f32> = f.iter().zip(&b).map(|(x, y)| x - y).collect();
        let sparse: Vec<f32> = o.iter().zip(&b).map(|(x, y)| x - y).collect();
        kept += sparse.iter().filter(|v| v.abs() > 1e-9).count();
        total += delta.len();
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        if e.numel() >= 256 {
            let ratio = l1(&sparse) / l1(&delta);
            assert!((ratio - 1.0).abs() < 1e-3, "{}: L1 ratio {ratio}", e.name);
        }
    }
    let frac = kept as f64 / total as f64;
    assert!((frac - 0.3).abs() < 0.01, "kept {frac}");
}

#[test]
fn side_files_and_chat_template_are_written() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(models().join("llama_base").join(f), base.join(f)).unwrap();
    }
    std::fs::write(base.join("tokenizer.json"), r#"{"version":"1.0"}"#).unwrap();
    std::fs::write(
        base.join("tokenizer_config.json"),
        r#"{"model_max_length": 64}"#,
    )
    .unwrap();
    std::fs::write(base.join("generation_config.json"), "{}").unwrap();
    let yaml =
        TIES.replace("$M/llama_base", s(&base)) + "chat_template: chatml\nout_dtype: bfloat16\n";
    let cfg = config(d.path(), &yaml);
    let out = d.path().join("out");
    ok(&["merge", s(&cfg), s(&out), "-q"]);
    assert_eq!(
        listing(&out),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    assert_eq!(tc["model_max_length"], 64);
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["torch_dtype"], "bfloat16");
    let m = amalgam::io::Model::open(&out).unwrap();
    assert_eq!(
        m.tensor("model.norm.weight").unwrap().dtype,
        amalgam::DType::BF16
    );
}

#[test]
fn sharded_output_matches_single_file() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), TIES);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    ok(&["merge", s(&cfg), s(&a), "-q"]);
    ok(&["merge", s(&cfg), s(&b), "-q", "--out-shard-size", "10K"]);
    assert!(listing(&b).contains(&"model.safetensors.index.json".to_string()));
    assert!(ok(&["diff", s(&a), s(&b)]).contains("models match"));
}

#[test]
fn vocabulary_mismatch_explains_the_options() {
    rejected(
        "merge_method: task_arithmetic\nbase_model: $M/llama_base\nmodels: [{model: $M/llama_ft_bigvocab, parameters: {weight: 1}}]\n",
        &[
            "model.embed_tokens.weight",
            "[64, 16]",
            "[72, 16]",
            "vocabularies differ",
            "tokenizer_source: union",
            "--unsafe-truncate-embeddings",
        ],
    );
}
