//! Shared helpers for the CLI tests: tiny synthetic models written byte by byte, and a way to
//! run the binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use amalgam::DType;
use amalgam::dtype::encode_f32;
use amalgam::io::header;

/// A tensor to put in a test file: name, dtype, shape, raw bytes.
pub struct T {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Deterministic pseudo-random f32s in [-1, 1) (splitmix64).
pub fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A float tensor of `dtype` filled from `randn(seed)`.
pub fn float(name: &str, dtype: DType, shape: &[usize], seed: u64) -> T {
    let n = shape.iter().product();
    let mut bytes = Vec::new();
    assert!(encode_f32(dtype, &randn(seed, n), &mut bytes));
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// A tensor with raw bytes.
pub fn raw(name: &str, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> T {
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// Serialize tensors as one safetensors file's bytes.
pub fn safetensors_bytes(tensors: &[T]) -> Vec<u8> {
    let mut offset = 0;
    let entries: Vec<_> = tensors
        .iter()
        .map(|t| {
            let start = offset;
            offset += t.bytes.len();
            (t.name.as_str(), t.dtype, &t.shape[..], start, offset)
        })
        .collect();
    let mut out = header::serialize(entries, &BTreeMap::new());
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    out
}

/// Write a single-file model `dir/model.safetensors` plus a config.json.
pub fn write_model(dir: &Path, tensors: &[T]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(tensors)).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}"#,
    )
    .unwrap();
}

/// Write a sharded model: `groups[i]` goes in shard i, with an index.
pub fn write_sharded(dir: &Path, groups: &[Vec<T>]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut map = serde_json::Map::new();
    for (i, g) in groups.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        std::fs::write(dir.join(&name), safetensors_bytes(g)).unwrap();
        for t in g {
            map.insert(t.name.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// Run the amalgam binary.
pub fn amalgam(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .output()
        .expect("run amalgam")
}

/// Run amalgam and require success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = amalgam(args);
    assert!(
        out.status.success(),
        "amalgam {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run amalgam and require exit code 2 (an error); returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = amalgam(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "amalgam {args:?} should fail; stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// Entries of a directory (names), sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fixture of the evaluation crate (`crates/amalgam-eval/tests/fixtures/NAME`).
pub fn eval_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../amalgam-eval/tests/fixtures")
        .join(name)
}

/// Run amalgam, require success, and parse its stdout as JSON.
pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

/// A path under a temp dir.
pub fn p(dir: &tempfile::TempDir, rel: &str) -> PathBuf {
    dir.path().join(rel)
}

/// Merge `case` with amalgam; a first line `# flags: ...` in the config gives command-line
/// flags that the generator also passed to mergekit.
pub fn merge_case(dir: &Path, case: &str, out: &Path) -> std::process::Output {
    merge_case_with(dir, case, out, &[], &[])
}

/// [`merge_case`] with extra arguments and environment variables.
pub fn merge_case_with(
    dir: &Path,
    case: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let config = format!("configs/{case}.yml");
    let text = std::fs::read_to_string(dir.join(&config)).unwrap();
    let flags: Vec<&str> = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# flags:"))
        .map(|f| f.split_whitespace().collect())
        .unwrap_or_default();
    std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(dir)
        .args(["merge", &config, s(out), "-q"])
        .args(flags)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Merge `case` (under `dir`) with amalgam and compare with the reference output in
/// `dir/expected/case` at norm-relative `rtol`; then check that a run in 7-element chunks, and a
/// run on one thread with the baseline (non-AVX2) loops, give the same bytes.
pub fn check(dir: &Path, case: &str, rtol: f64) -> serde_json::Value {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join(case);
    let run = merge_case(dir, case, &out);
    assert!(
        run.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let expected = dir.join("expected").join(case);
    let json = amalgam(&[
        "diff",
        s(&out),
        s(&expected),
        "--rtol",
        &rtol.to_string(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let worst = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| {
            t["rel"]
                .as_f64()
                .map(|r| (r, t["name"].as_str().unwrap().to_string()))
        })
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
    assert_eq!(
        report["only_in_a"],
        serde_json::json!([]),
        "{case}: extra tensors"
    );
    assert_eq!(
        report["only_in_b"],
        serde_json::json!([]),
        "{case}: missing tensors"
    );
    assert_eq!(
        report["differ"], false,
        "{case}: worst rel error {:e} at {}",
        worst.0, worst.1
    );
    // Streamed methods see the tensor in chunks; cutting it into tiny odd-sized chunks (several
    // per row) must give the same bytes. So must one thread with the baseline loops.
    type Variant<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let variants: [Variant; 2] = [
        ("chunked", &["--chunk-elements", "7"], &[]),
        (
            "baseline",
            &["--threads", "1"],
            &[("AMALGAM_SIMD", "baseline")],
        ),
    ];
    for (name, extra, env) in variants {
        let other = d.path().join(name);
        let run = merge_case_with(dir, case, &other, extra, env);
        assert!(
            run.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            same_safetensors(&out, &other),
            "{case}: the {name} result differs\n{}",
            String::from_utf8_lossy(&amalgam(&["diff", s(&out), s(&other)]).stdout)
        );
    }
    report
}

/// Whether two model directories hold the same `.safetensors` files, byte for byte.
pub fn same_safetensors(a: &Path, b: &Path) -> bool {
    let files = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let (fa, fb) = (files(a), files(b));
    !fa.is_empty() && fa == fb
}

/// One `#[test]` per case: [`check`] of `case` under the fixture directory `$dir` at `$rtol`.
#[allow(unused_macros)]
macro_rules! parity_cases {
    ($dir:expr, $rtol:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::common::check(&$dir, stringify!($case), $rtol);
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use parity_cases;
