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
    std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
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
