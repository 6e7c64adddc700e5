//! The task library against independent references (scripts/gen_library_fixtures.py: the
//! schemes restated in torch, FusionBench 0.2.33's EMR rescaler, mergekit 0.1.5's TIES and
//! task arithmetic, which made every expected output under tests/fixtures/library): each
//! rebuilt tensor within norm-relative 1e-6 of the reference, the build-time errors and EMR's
//! rescalers as the reference computes them, the same bytes at any thread count and chunking.

mod common;

use std::path::{Path, PathBuf};

use common::{amalgam, fails, ok, s};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/library")
}

/// Run amalgam with the crate directory as working directory (the configs' paths are relative
/// to it).
fn run(args: &[&str]) -> std::process::Output {
    run_env(&[], args)
}

/// [`run`] with environment variables set.
fn run_env(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(root())
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn run_ok(args: &[&str]) -> String {
    run_ok_env(&[], args)
}

/// [`run_ok`] with environment variables set.
fn run_ok_env(env: &[(&str, &str)], args: &[&str]) -> String {
    let out = run_env(env, args);
    assert!(
        out.status.success(),
        "amalgam {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Build `case`'s library into `dir/lib` with `extra` flags.
fn build(case: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let lib = dir.join("lib");
    let config = fixtures().join(format!("configs/{case}.yml"));
    let mut args = vec!["library", "build", s(&config), s(&lib), "-q", "--overwrite"];
    args.extend_from_slice(extra);
    run_ok(&args);
    lib
}

fn info(lib: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["library", "info", s(lib), "--json"])).unwrap()
}

/// The worst per-tensor norm-relative difference `amalgam diff` reports, and the diff's exit.
fn worst(a: &Path, b: &Path) -> f64 {
    let out = amalgam(&["diff", s(a), s(b), "--json", "--all"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["only_in_a"], serde_json::json!([]), "{v}");
    assert_eq!(v["only_in_b"], serde_json::json!([]), "{v}");
    let tensors = v["tensors"].as_array().expect("tensors");
    assert!(!tensors.is_empty());
    tensors
        .iter()
        .map(|t| t["rel"].as_f64().expect("same shapes"))
        .fold(0.0, f64::max)
}

fn parity(case: &str) {
    let d = tempfile::tempdir().unwrap();
    let lib = build(case, d.path(), &[]);
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join(format!("expected/{case}/info.json"))).unwrap(),
    )
    .unwrap();
    let report = info(&lib);
    for (t, task) in report["tasks"].as_array().unwrap().iter().enumerate() {
        let name = task["name"].as_str().unwrap();
        let out = d.path().join(name);
        run_ok(&[
            "library",
            "rebuild",
            s(&lib),
            name,
            s(&out),
            "-q",
            "--dtype",
            "f32",
        ]);
        let want = fixtures().join(format!("expected/{case}/{name}.safetensors"));
        let w = worst(&out, &want);
        assert!(w <= 1e-6, "{case}/{name}: worst norm-relative error {w:e}");
        let e = &expected["tasks"][name];
        let (mine, theirs) = (
            task["relative_error"].as_f64().unwrap(),
            e["relative_error"].as_f64().unwrap(),
        );
        assert!(
            (mine - theirs).abs() <= 1e-5 * theirs.max(1e-3),
            "{case}/{name}: relative error {mine} vs the reference's {theirs}"
        );
        if let Some(lambda) = e["lambda_f64"].as_f64().or(e["lambda"].as_f64()) {
            let scale = task["scale"].as_f64().unwrap();
            assert!(
                (scale - lambda).abs() <= 1e-6 * lambda,
                "{case}/{name}: rescaler {scale} vs {lambda}"
            );
        }
        // One thread and 7-element chunks give the same bytes.
        let other = d.path().join(format!("{name}-1t"));
        run_ok(&[
            "--threads",
            "1",
            "library",
            "rebuild",
            s(&lib),
            name,
            s(&other),
            "-q",
            "--dtype",
            "f32",
            "--chunk-elements",
            "7",
        ]);
        assert!(
            common::same_safetensors(&out, &other),
            "{case}/{name}: bytes differ"
        );
        assert_eq!(name, format!("task{t}"));
    }
    // The library itself does not depend on the thread count or the chunking.
    let again = d.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let lib2 = {
        let config = fixtures().join(format!("configs/{case}.yml"));
        let out = again.join("lib");
        run_ok(&[
            "--threads",
            "1",
            "library",
            "build",
            s(&config),
            s(&out),
            "-q",
            "--chunk-elements",
            "5",
            "--input-cache",
            "0",
        ]);
        out
    };
    for f in files(&lib) {
        let (a, b) = (
            std::fs::read(lib.join(&f)).unwrap(),
            std::fs::read(lib2.join(&f)).unwrap(),
        );
        if a != b {
            let first = String::from_utf8_lossy(&a)
                .lines()
                .zip(String::from_utf8_lossy(&b).lines())
                .find(|(x, y)| x != y)
                .map(|(x, y)| format!("{x} | {y}"));
            panic!("{case}: {f} differs between builds at 2 and 1 threads: {first:?}");
        }
    }
}

/// Every file of a library, relative to it.
fn files(lib: &Path) -> Vec<String> {
    let mut v: Vec<String> = common::listing(lib)
        .into_iter()
        .filter(|f| f != "tasks")
        .collect();
    v.extend(
        common::listing(&lib.join("tasks"))
            .into_iter()
            .map(|f| format!("tasks/{f}")),
    );
    v
}

macro_rules! parity {
    ($($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                parity(stringify!($case));
            }
        )*
    };
}

parity!(
    emr_paper,
    emr_code,
    emr_bf16,
    tall_ta,
    tall_ties,
    sign_matrix,
    sign_row,
    ternary_sign,
    ternary_joint,
    quant4,
    quant2_g8,
    quant2_g12,
    quant_residual,
    tsv_c_default,
    tsv_c_rank2,
    twin,
    dense,
    sign_row_bf16,
    ternary_sign_bf16,
    quant4_bf16,
    tall_ta_bf16,
);

#[test]
fn dense_round_trips_bit_exactly() {
    let d = tempfile::tempdir().unwrap();
    let lib = build("dense_bf16", d.path(), &[]);
    for task in ["task0", "task1", "task2"] {
        let out = d.path().join(task);
        run_ok(&["library", "rebuild", s(&lib), task, s(&out), "-q"]);
        let original = fixtures().join(format!("models_bf16/{task}"));
        let diff = amalgam(&["diff", s(&out), s(&original)]);
        assert_eq!(
            diff.status.code(),
            Some(0),
            "{task}: {}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
    // Tensors equal to the base are not stored: task2 froze one more matrix than the others.
    let report = info(&lib);
    let bytes: Vec<u64> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["bytes"].as_u64().unwrap())
        .collect();
    assert!(bytes[2] < bytes[0], "{bytes:?}");
}

/// The tiny BERT of crates/amalgam-eval and two "fine-tunes" of it (its weights plus seeded
/// noise), with its config and tokenizer: a library whose tasks `eval` can run.
#[cfg(feature = "eval")]
fn bert_library(dir: &Path, scheme: &str) -> PathBuf {
    let bert = root().join("../amalgam-eval/tests/fixtures/bert");
    let model = amalgam::io::Model::open(&bert).unwrap();
    for (k, name) in ["a", "b"].iter().enumerate() {
        let tensors: Vec<common::T> = model
            .tensors()
            .iter()
            .map(|e| {
                let mut v = model.floats(&e.name).unwrap();
                let noise = common::randn(k as u64 * 1000 + e.numel() as u64, v.len());
                v.iter_mut().zip(noise).for_each(|(x, z)| *x += 0.05 * z);
                let mut bytes = Vec::new();
                amalgam::dtype::encode_f32(e.dtype, &v, &mut bytes);
                common::raw(&e.name, e.dtype, &e.shape, bytes)
            })
            .collect();
        let out = dir.join(name);
        common::write_model(&out, &tensors);
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(bert.join(f), out.join(f)).unwrap();
        }
    }
    build_text(
        dir,
        format!(
            "base_model: {}\ntasks:\n  - {{name: a, model: {}}}\n  - {{name: b, model: {}}}\nscheme: {scheme}\n",
            s(&bert),
            s(&dir.join("a")),
            s(&dir.join("b"))
        ),
    )
}

/// `eval --library-task` reports what `eval` reports on the rebuilt model, without writing it.
#[cfg(feature = "eval")]
#[test]
fn eval_of_a_library_task_equals_eval_of_the_rebuilt_model() {
    let d = tempfile::tempdir().unwrap();
    let lib = bert_library(d.path(), "sign");
    let bert = root().join("../amalgam-eval/tests/fixtures/bert");
    let (task, head) = (bert.join("task.jsonl"), bert.join("head.safetensors"));
    for name in ["a", "b"] {
        let rebuilt = d.path().join(format!("rebuilt-{name}"));
        ok(&["library", "rebuild", s(&lib), name, s(&rebuilt), "-q"]);
        let direct = ok(&[
            "eval",
            s(&lib),
            "--library-task",
            name,
            "--task",
            s(&task),
            "--head",
            s(&head),
            "--json",
            "-q",
        ]);
        let written = ok(&[
            "eval",
            s(&rebuilt),
            "--task",
            s(&task),
            "--head",
            s(&head),
            "--json",
            "-q",
        ]);
        assert_eq!(direct, written, "task {name}");
    }
    let err = fails(&[
        "eval",
        s(&lib),
        "--library-task",
        "c",
        "--task",
        s(&task),
        "--head",
        s(&head),
    ]);
    assert!(err.contains("no task 'c'") && err.contains("a, b"), "{err}");
}

/// Write `text` as `dir/lib.yml` and build it into `dir/lib`, which it returns.
fn build_text(dir: &Path, text: String) -> PathBuf {
    let config = dir.join("lib.yml");
    std::fs::write(&config, text).unwrap();
    let lib = dir.join("lib");
    ok(&["library", "build", s(&config), s(&lib), "-q"]);
    lib
}

/// Write `text` as a library config in `dir` and build it; returns stderr of the failure.
fn build_fails(dir: &Path, text: &str) -> String {
    let config = dir.join("bad.yml");
    std::fs::write(&config, text).unwrap();
    let lib = dir.join("badlib");
    let out = run(&["library", "build", s(&config), s(&lib)]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lib.exists(), "a failed build left {}", lib.display());
    assert!(
        common::listing(dir)
            .iter()
            .all(|f| !f.starts_with(".amalgam-tmp")),
        "a failed build left a staging directory"
    );
    String::from_utf8(out.stderr).unwrap()
}

const MODELS: &str = "tests/fixtures/library/models";

fn config(scheme: &str, parameters: &str, extra_task: &str) -> String {
    format!(
        "base_model: {MODELS}/base\ntasks:\n  - {{name: t0, model: {MODELS}/task0}}\n  - {{name: t1, model: {MODELS}/task1}}\n{extra_task}scheme: {scheme}\nparameters: {parameters}\n"
    )
}

#[test]
fn bad_configs_are_clear_errors_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let cases: Vec<(String, &str)> = vec![
        (
            config("emr", "{}", "").replace("scheme:", "sheme:"),
            "unknown field `sheme`",
        ),
        (
            config("zip", "{}", ""),
            "unknown scheme 'zip'; valid schemes: emr, tall",
        ),
        (
            config("emr", "{density: 0.5}", ""),
            "parameter 'density' is not one of scheme emr's: rescale",
        ),
        (
            config("ternary", "{density: 1.5}", ""),
            "parameter 'density' = 1.5 is outside [0, 1]",
        ),
        (config("quant", "{bits: 5}", ""), "it must be 2, 3, 4 or 8"),
        (
            config("tsv_c", "{energy: 0}", ""),
            "'energy' must be above 0",
        ),
        (config("twin", "{}", ""), "needs a 'merge:' block"),
        (config("emr", "{rescale: sometimes}", ""), "rescale"),
        (
            config(
                "emr",
                "{}",
                &format!("  - {{name: t0, model: {MODELS}/task2}}\n"),
            ),
            "task 't0' is named twice",
        ),
        (
            config(
                "emr",
                "{}",
                "  - {name: t2, model: tests/fixtures/library/nothing}\n",
            ),
            "not found",
        ),
        (
            config(
                "emr",
                "{}",
                &format!("  - {{name: ../x, model: {MODELS}/task2}}\n"),
            ),
            "task name '../x'",
        ),
        (
            config("emr", "{}", "").replace("emr", "emr\nout_dtype: int8"),
            "out_dtype: 'int8'",
        ),
    ];
    for (text, want) in cases {
        let err = build_fails(dir, &text);
        assert!(err.contains(want), "expected '{want}' in: {err}");
    }
}

#[test]
fn tasks_of_another_shape_name_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    // A "fine-tune" whose q_proj has other dimensions.
    let mut tensors = Vec::new();
    let base = amalgam::io::Model::open(root().join(MODELS).join("base")).unwrap();
    for e in base.tensors() {
        let shape = if e.name == "model.layers.0.self_attn.q_proj.weight" {
            vec![e.shape[0] + 1, e.shape[1]]
        } else {
            e.shape.clone()
        };
        tensors.push(common::float(&e.name, e.dtype, &shape, 7));
    }
    let odd = d.path().join("odd");
    common::write_model(&odd, &tensors);
    let err = build_fails(
        d.path(),
        &config(
            "emr",
            "{}",
            &format!("  - {{name: odd, model: {}}}\n", s(&odd)),
        ),
    );
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("[17, 16]"),
        "{err}"
    );
}

#[test]
fn a_library_refuses_another_base_and_edited_files() {
    let d = tempfile::tempdir().unwrap();
    let lib = build("emr_paper", d.path(), &[]);
    let out = d.path().join("out");
    // Another base: same names and shapes, other values (a fine-tune).
    let other = root().join(MODELS).join("task1");
    let err = fails(&[
        "library",
        "rebuild",
        s(&lib),
        "task0",
        s(&out),
        "--base",
        s(&other),
    ]);
    assert!(
        err.contains("differs from the library's base") && err.contains("tensor '"),
        "{err}"
    );
    assert!(!out.exists());
    // A base missing a tensor / of another shape: named before anything is read.
    let err = fails(&[
        "library",
        "rebuild",
        s(&lib),
        "task0",
        s(&out),
        "--base",
        s(&root().join("tests/fixtures/library/expected/tsv_c_rank2/task0.safetensors")),
    ]);
    assert!(err.contains("differs from the library's base"), "{err}");
    // An unknown task.
    let err = fails(&["library", "rebuild", s(&lib), "task9", s(&out)]);
    assert!(
        err.contains("no task 'task9'") && err.contains("task0, task1, task2"),
        "{err}"
    );
    // An edited task file (one byte of its data flipped), then a truncated one.
    let file = lib.join("tasks/task1.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let err = fails(&["library", "rebuild", s(&lib), "task1", s(&out)]);
    assert!(
        err.contains("task1.safetensors") && err.contains("truncated or edited"),
        "{err}"
    );
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["library", "rebuild", s(&lib), "task1", s(&out)]);
    assert!(err.contains("truncated or edited"), "{err}");
    // A deleted task file: that task cannot be rebuilt, the others can; info says so.
    std::fs::remove_file(&file).unwrap();
    let err = fails(&["library", "rebuild", s(&lib), "task1", s(&out)]);
    assert!(err.contains("missing from the library"), "{err}");
    ok(&["library", "rebuild", s(&lib), "task0", s(&out), "-q"]);
    let report = info(&lib);
    assert_eq!(report["tasks"][1]["present"], false);
    assert_eq!(report["tasks"][0]["present"], true);
    // An edited shared part (a value of the unified vector changed).
    let shared = lib.join("shared.safetensors");
    let mut bytes = std::fs::read(&shared).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x10;
    std::fs::write(&shared, &bytes).unwrap();
    let out2 = d.path().join("out2");
    let err = fails(&["library", "rebuild", s(&lib), "task0", s(&out2)]);
    assert!(
        err.contains("shared part") && err.contains("edited or damaged"),
        "{err}"
    );
    assert!(!out2.exists());
    // Not a library at all.
    let err = fails(&["library", "info", s(&root().join(MODELS).join("base"))]);
    assert!(err.contains("not a task library"), "{err}");
}

#[test]
fn export_lora_writes_an_adapter_that_rebuilds_the_task() {
    let d = tempfile::tempdir().unwrap();
    let lib = build("tsv_c_rank2", d.path(), &[]);
    let adapter = d.path().join("adapter");
    // The task's matrices are rank 2 in this library, so rank 2 is exact for them.
    ok(&[
        "library",
        "export-lora",
        s(&lib),
        "task0",
        s(&adapter),
        "--rank",
        "2",
        "--exact",
        "-q",
    ]);
    let baked = d.path().join("baked");
    ok(&[
        "lora",
        "apply",
        s(&root().join(MODELS).join("base")),
        s(&adapter),
        s(&baked),
        "-q",
    ]);
    let want = root().join("tests/fixtures/library/expected/tsv_c_rank2/task0.safetensors");
    let w = worst(&baked, &want);
    assert!(
        w <= 1e-5,
        "adapter baked into the base: worst norm-relative error {w:e}"
    );
    let listing = common::listing(d.path());
    assert!(
        listing.iter().all(|f| !f.starts_with(".amalgam-export")),
        "{listing:?}"
    );
}

/// A task given as `model+adapter` is the baked model: a lossless library of it rebuilds what
/// `lora apply` writes.
#[test]
fn adapter_tasks_are_the_baked_models() {
    let d = tempfile::tempdir().unwrap();
    let base = root().join("tests/fixtures/merge/models/llama_base");
    let adapter = root().join("tests/fixtures/lora/adapters/qv");
    let baked = d.path().join("baked");
    ok(&["lora", "apply", s(&base), s(&adapter), s(&baked), "-q"]);
    let lib = build_text(
        d.path(),
        format!(
            "base_model: {}\ntasks:\n  - {{name: qv, model: {}+{}}}\nscheme: dense\n",
            s(&base),
            s(&base),
            s(&adapter)
        ),
    );
    let out = d.path().join("out");
    ok(&["library", "rebuild", s(&lib), "qv", s(&out), "-q"]);
    let diff = amalgam(&["diff", s(&out), s(&baked)]);
    assert_eq!(
        diff.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
}

/// Ternary keeps exactly `round(density · count)` entries per sign, equal magnitudes by lower
/// index first, and rebuilds them at `±α`, `α = ‖τ_kept‖ / √kept`.
#[test]
fn ternary_keeps_ties_by_lower_index() {
    let d = tempfile::tempdir().unwrap();
    let name = "model.embed_tokens.weight";
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let base = d.path().join("base");
    common::write_model(
        &base,
        &[common::raw(
            name,
            amalgam::DType::F32,
            &[2, 4],
            f32s(&[0.0; 8]),
        )],
    );
    let task = [1.0, 1.0, 1.0, 2.0, -1.0, -1.0, -3.0, 0.5];
    let ft = d.path().join("ft");
    common::write_model(
        &ft,
        &[common::raw(name, amalgam::DType::F32, &[2, 4], f32s(&task))],
    );
    let lib = build_text(
        d.path(),
        format!(
            "base_model: {}\ntasks:\n  - {{name: t, model: {}}}\nscheme: ternary\nparameters: {{density: 0.5}}\n",
            s(&base),
            s(&ft)
        ),
    );
    let out = d.path().join("out");
    ok(&["library", "rebuild", s(&lib), "t", s(&out), "-q"]);
    let got = amalgam::io::Model::open(&out)
        .unwrap()
        .floats(name)
        .unwrap();
    // Positives 1, 1, 1, 2, 0.5: round(2.5) = 3 kept, the 2 and the first two 1s; negatives
    // −1, −1, −3: round(1.5) = 2 kept, the −3 and the first −1.
    let alpha = (16.0f32 / 5.0).sqrt();
    let want = [alpha, alpha, 0.0, alpha, -alpha, 0.0, -alpha, 0.0];
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6,
            "element {i}: {g} vs {w} (all: {got:?})"
        );
    }
}

/// The ternary scheme's general three-pass selection (which a tensor whose values crowd one
/// histogram bin falls back to; `AMALGAM_TERNARY_CANDIDATES=0` forces it) selects what the
/// binned two-pass one does: the same rebuilt tensors, per sign and jointly, f32 and bf16.
#[test]
fn ternary_general_selection_agrees_with_the_binned_one() {
    for case in ["ternary_sign", "ternary_joint", "ternary_sign_bf16"] {
        let d = tempfile::tempdir().unwrap();
        let binned = build(case, d.path(), &[]);
        let general = d.path().join("general");
        let config = fixtures().join(format!("configs/{case}.yml"));
        run_ok_env(
            &[("AMALGAM_TERNARY_CANDIDATES", "0")],
            &["library", "build", s(&config), s(&general), "-q"],
        );
        for task in ["task0", "task1", "task2"] {
            let rebuilt = |lib: &Path, name: &str| {
                let out = d.path().join(format!("{task}-{name}"));
                run_ok(&[
                    "library",
                    "rebuild",
                    s(lib),
                    task,
                    s(&out),
                    "-q",
                    "--dtype",
                    "f32",
                ]);
                out
            };
            let (a, b) = (rebuilt(&binned, "binned"), rebuilt(&general, "general"));
            let w = worst(&a, &b);
            assert!(w <= 1e-6, "{case}/{task}: binned vs general {w:e}");
        }
    }
}

/// A base that ties its LM head to its embeddings, and a task that stores its own head (an
/// untied fine-tune): the library stores the head, the rebuild reads the base's embeddings in
/// its place (the plan's rule) and writes a config that no longer ties them.
#[test]
fn a_task_with_its_own_head_over_a_tied_base_rebuilds() {
    use amalgam::io::Model;
    use common::{raw, write_model};
    let d = tempfile::tempdir().unwrap();
    let models = root().join("tests/fixtures/merge/models");
    let ft = Model::open(models.join("qwen2_ft1")).unwrap();
    let mut tensors: Vec<_> = ft
        .tensors()
        .iter()
        .map(|e| {
            let mut bytes = vec![0u8; e.nbytes()];
            ft.read_at(e.shard, e.range.start, &mut bytes).unwrap();
            raw(&e.name, e.dtype, &e.shape, bytes)
        })
        .collect();
    let embed = ft.entry("model.embed_tokens.weight").unwrap();
    tensors.push(common::float(
        "lm_head.weight",
        embed.dtype,
        &embed.shape,
        7,
    ));
    let task = d.path().join("untied");
    write_model(&task, &tensors);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join("qwen2_ft1/config.json")).unwrap())
            .unwrap();
    config["tie_word_embeddings"] = false.into();
    std::fs::write(task.join("config.json"), config.to_string()).unwrap();
    let yml = d.path().join("lib.yml");
    std::fs::write(
        &yml,
        format!(
            "base_model: {}\ntasks:\n  - {{name: a, model: {}}}\nscheme: dense\n",
            models.join("qwen2_base").display(),
            task.display()
        ),
    )
    .unwrap();
    let lib = d.path().join("lib");
    run_ok(&["library", "build", s(&yml), s(&lib), "-q"]);
    let out = d.path().join("out");
    run_ok(&["library", "rebuild", s(&lib), "a", s(&out), "-q"]);
    assert_eq!(
        worst(&out, &task),
        0.0,
        "the task's tensors, its head included"
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["tie_word_embeddings"], false);
}
