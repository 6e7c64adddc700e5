//! Model I/O end to end through the binary: round trips in every float dtype, sharding, every
//! validation rule on crafted bad files, and the output-directory guarantees.

mod common;

use amalgam::DType;
use amalgam::io::Model;
use amalgam::io::staging::{MARKER, STAGING_PREFIX};
use common::*;
use std::path::{Path, PathBuf};

fn sample(dtype: DType) -> Vec<T> {
    vec![
        float("model.embed_tokens.weight", dtype, &[64, 16], 1),
        float(
            "model.layers.0.self_attn.q_proj.weight",
            dtype,
            &[16, 16],
            2,
        ),
        float("model.layers.0.input_layernorm.weight", dtype, &[16], 3),
        float("model.layers.1.mlp.up_proj.weight", dtype, &[32, 16], 4),
        float("scale", dtype, &[], 5),
        float("empty", dtype, &[0, 4], 6),
        raw("position_ids", DType::I64, &[4], (0..32).collect()),
        raw("mask", DType::Bool, &[3], vec![1, 0, 1]),
    ]
}

/// Every tensor of `a` is in `b` with the same dtype, shape and bytes, and nothing else is.
fn assert_bit_identical(a: &std::path::Path, b: &std::path::Path) {
    let (ma, mb) = (Model::open(a).unwrap(), Model::open(b).unwrap());
    assert_eq!(ma.tensors().len(), mb.tensors().len());
    for t in ma.tensors() {
        let (va, vb) = (ma.tensor(&t.name).unwrap(), mb.tensor(&t.name).unwrap());
        assert_eq!((va.dtype, va.shape), (vb.dtype, vb.shape), "{}", t.name);
        assert_eq!(va.bytes, vb.bytes, "{}", t.name);
    }
}

#[test]
fn round_trip_is_bit_exact_in_every_dtype_single_and_sharded() {
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
        let d = tempfile::tempdir().unwrap();
        let src = p(&d, "src");
        write_model(&src, &sample(dtype));
        // Single file -> 4 shards -> single file.
        let sharded = p(&d, "sharded");
        ok(&[
            "convert",
            s(&src),
            s(&sharded),
            "--out-shard-size",
            "1000",
            "-q",
        ]);
        let files = listing(&sharded);
        assert!(
            files.contains(&"model.safetensors.index.json".into()),
            "{files:?}"
        );
        assert!(
            files.iter().filter(|f| f.ends_with(".safetensors")).count() > 2,
            "{files:?}"
        );
        assert_bit_identical(&src, &sharded);
        let back = p(&d, "back");
        ok(&["convert", s(&sharded), s(&back), "-q"]);
        assert_eq!(listing(&back), ["config.json", "model.safetensors"]);
        assert_bit_identical(&src, &back);
        let out = ok(&["diff", s(&src), s(&back)]);
        assert!(out.contains("models match"), "{out}");
    }
}

#[test]
fn dtype_round_trip_widening_then_narrowing_is_exact() {
    for dtype in [DType::F16, DType::BF16] {
        let d = tempfile::tempdir().unwrap();
        let src = p(&d, "src");
        write_model(&src, &sample(dtype));
        let wide = p(&d, "wide");
        ok(&["convert", s(&src), s(&wide), "--dtype", "f32", "-q"]);
        let m = Model::open(&wide).unwrap();
        assert_eq!(m.tensor("scale").unwrap().dtype, DType::F32);
        assert_eq!(m.tensor("position_ids").unwrap().dtype, DType::I64);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(wide.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], "float32");
        let narrow = p(&d, "narrow");
        let name = if dtype == DType::F16 { "f16" } else { "bf16" };
        ok(&["convert", s(&wide), s(&narrow), "--dtype", name, "-q"]);
        assert_bit_identical(&src, &narrow);
    }
}

#[test]
fn narrowing_is_reported_by_diff_with_its_error() {
    let d = tempfile::tempdir().unwrap();
    let src = p(&d, "src");
    write_model(&src, &sample(DType::F32));
    let bf = p(&d, "bf");
    ok(&["convert", s(&src), s(&bf), "--dtype", "bf16", "-q"]);
    let out = amalgam(&["diff", s(&src), s(&bf)]);
    assert_eq!(out.status.code(), Some(1));
    // bf16 keeps 8 significant bits: relative error per tensor is below 2^-8.
    let out = ok(&["diff", s(&src), s(&bf), "--rtol", "0.004", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["differ"], false);
    let worst = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["rel"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(worst > 1e-4 && worst < 0.004, "{worst}");
}

#[test]
fn diff_reports_missing_and_shape_differences() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (p(&d, "a"), p(&d, "b"));
    write_model(
        &a,
        &[
            float("x", DType::F32, &[4], 1),
            float("y", DType::F32, &[4], 2),
        ],
    );
    write_model(
        &b,
        &[
            float("x", DType::F32, &[2, 2], 1),
            float("z", DType::F32, &[4], 2),
        ],
    );
    let out = amalgam(&["diff", s(&a), s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("only in A: y"), "{text}");
    assert!(text.contains("only in B: z"), "{text}");
    assert!(text.contains("shape differs: x"), "{text}");
}

#[test]
fn inspect_reports_architecture_counts_and_shards() {
    let d = tempfile::tempdir().unwrap();
    let src = p(&d, "src");
    write_sharded(
        &src,
        &[
            vec![float("a", DType::BF16, &[8, 4], 1)],
            vec![
                float("b", DType::F32, &[3], 2),
                raw("i", DType::I64, &[2], vec![0; 16]),
            ],
        ],
    );
    std::fs::write(
        src.join("config.json"),
        r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2"}"#,
    )
    .unwrap();
    let out = ok(&["inspect", s(&src), "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["architecture"], "Qwen2ForCausalLM");
    assert_eq!(r["tensors"], 3);
    assert_eq!(r["parameters"], 32 + 3 + 2);
    assert_eq!(r["total_bytes"], 64 + 12 + 16);
    assert_eq!(r["shards"].as_array().unwrap().len(), 2);
    assert_eq!(r["dtypes"]["BF16"]["tensors"], 1);
    assert_eq!(r["largest"][0]["name"], "a");
    let human = ok(&["inspect", s(&src)]);
    assert!(human.contains("Qwen2ForCausalLM (qwen2)"), "{human}");
}

#[test]
fn single_file_input_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    let file = p(&d, "weights.safetensors");
    std::fs::write(&file, safetensors_bytes(&sample(DType::BF16))).unwrap();
    let out = ok(&["inspect", s(&file), "--json"]);
    assert!(out.contains("\"tensors\": 8"), "{out}");
    let o = p(&d, "o");
    ok(&["convert", s(&file), s(&o), "-q"]);
    assert_bit_identical(&file, &o);
}

#[test]
fn side_files_are_copied_and_their_absence_tolerated() {
    let d = tempfile::tempdir().unwrap();
    let src = p(&d, "src");
    write_model(&src, &sample(DType::F32));
    std::fs::write(src.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(src.join("generation_config.json"), "{}").unwrap();
    let o = p(&d, "o");
    ok(&["convert", s(&src), s(&o), "-q"]);
    assert_eq!(
        listing(&o),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    let bare = p(&d, "bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(
        bare.join("model.safetensors"),
        safetensors_bytes(&sample(DType::F32)),
    )
    .unwrap();
    let o2 = p(&d, "o2");
    ok(&["convert", s(&bare), s(&o2), "-q"]);
    assert_eq!(listing(&o2), ["model.safetensors"]);
}

#[test]
fn existing_output_is_refused_then_replaced_with_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let src = p(&d, "src");
    write_model(&src, &sample(DType::F32));
    let o = p(&d, "o");
    std::fs::create_dir_all(&o).unwrap();
    std::fs::write(o.join("keep.txt"), "precious").unwrap();
    let err = fails(&["convert", s(&src), s(&o), "-q"]);
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(o.join("keep.txt")).unwrap(),
        "precious"
    );
    ok(&["convert", s(&src), s(&o), "-q", "--overwrite"]);
    assert!(!o.join("keep.txt").exists());
    assert_bit_identical(&src, &o);
    assert_eq!(
        listing(d.path()),
        ["o", "src"],
        "no temporary or backup directory left"
    );
}

/// A bad input: the command fails with exit code 2, says `expect`, and leaves no output.
fn assert_rejected(model: &std::path::Path, expect: &[&str]) {
    let parent = model.parent().unwrap().to_path_buf();
    let out = parent.join("out");
    let before = listing(&parent);
    for args in [
        vec!["inspect", s(model)],
        vec!["convert", s(model), s(&out), "-q"],
    ] {
        let err = fails(&args);
        for e in expect {
            assert!(err.contains(e), "expected '{e}' in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(listing(&parent), before, "nothing written beside the input");
}

fn bad_file(bytes: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let f = p(&d, "bad.safetensors");
    std::fs::write(&f, bytes).unwrap();
    (d, f)
}

fn with_header(json: &str, data: usize) -> Vec<u8> {
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data));
    b
}

#[test]
fn truncated_and_malformed_headers_are_rejected() {
    let cases: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (vec![1, 2, 3], vec!["bad.safetensors", "truncated"]),
        (
            {
                let mut b = 500u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            vec!["runs past the end"],
        ),
        (u64::MAX.to_le_bytes().to_vec(), vec!["exceeds"]),
        (with_header("{not json", 0), vec!["not valid JSON"]),
        (
            with_header(r#"{"w": [1]}"#, 0),
            vec!["'w'", "must be an object"],
        ),
        (
            with_header(
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#,
                8,
            ),
            vec!["'w'", "needs 16"],
        ),
        (
            with_header(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
            ),
            vec!["truncated"],
        ),
        (
            with_header(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                12,
            ),
            vec!["'b'", "gap"],
        ),
        (
            with_header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
            vec!["overlap"],
        ),
        (
            with_header(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
            vec!["'a' appears twice"],
        ),
        (
            with_header(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                6,
            ),
            vec!["trailing"],
        ),
        (
            with_header(
                r#"{"w":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}}"#,
                4,
            ),
            vec!["unknown dtype 'X9'"],
        ),
    ];
    for (bytes, expect) in cases {
        let (_d, f) = bad_file(bytes);
        assert_rejected(&f, &expect);
    }
}

#[test]
fn inconsistent_indexes_are_rejected() {
    let good = || {
        vec![
            vec![float("a", DType::F32, &[2], 1)],
            vec![
                float("b", DType::F32, &[2], 2),
                float("c", DType::F32, &[1], 3),
            ],
        ]
    };
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let d = tempfile::tempdir().unwrap();
        let m = p(&d, "m");
        write_sharded(&m, &good());
        let ip = m.join("model.safetensors.index.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&ip, serde_json::to_vec(&v).unwrap()).unwrap();
        (d, m)
    };
    let (_d, m) = edit(&|v| {
        v["weight_map"]["a"] = "model-00002-of-00002.safetensors".into();
    });
    assert_rejected(&m, &["index", "'a'", "does not contain it"]);
    let (_d, m) = edit(&|v| {
        v["weight_map"].as_object_mut().unwrap().remove("b");
    });
    assert_rejected(&m, &["'b'", "missing from weight_map"]);
    let (_d, m) = edit(&|v| {
        v["weight_map"]["d"] = "model-00009-of-00009.safetensors".into();
    });
    assert_rejected(&m, &["does not exist"]);
    let (_d, m) = edit(&|v| {
        v["weight_map"]["a"] = "../../etc/passwd".into();
    });
    assert_rejected(&m, &["not a plain file name"]);
    let (_d, m) = edit(&|v| *v = serde_json::json!({"weight_map": 3}));
    assert_rejected(&m, &["model.safetensors.index.json", "not a valid index"]);

    // The same tensor stored in two shards.
    let d = tempfile::tempdir().unwrap();
    let m = p(&d, "m");
    write_sharded(&m, &good());
    std::fs::write(
        m.join("model-00002-of-00002.safetensors"),
        safetensors_bytes(&[
            float("b", DType::F32, &[2], 2),
            float("c", DType::F32, &[1], 3),
            float("a", DType::F32, &[2], 1),
        ]),
    )
    .unwrap();
    assert_rejected(&m, &["'a'", "stored in both"]);

    // A shard that is itself corrupt is named.
    let d = tempfile::tempdir().unwrap();
    let m = p(&d, "m");
    write_sharded(&m, &good());
    let shard = m.join("model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&shard, bytes).unwrap();
    assert_rejected(&m, &["model-00002-of-00002.safetensors", "truncated"]);
}

#[test]
fn directory_without_safetensors_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let m = p(&d, "m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), b"x").unwrap();
    let err = fails(&["inspect", s(&m)]);
    assert!(
        err.contains("no .safetensors") && err.contains("pytorch_model.bin"),
        "{err}"
    );
    let err = fails(&["inspect", s(&p(&d, "nope"))]);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn tensors_larger_than_a_conversion_part_convert_exactly() {
    // 5M f32 elements = 20 MB, more than one 16 MiB conversion part, with an odd element count.
    let d = tempfile::tempdir().unwrap();
    let src = p(&d, "src");
    write_model(
        &src,
        &[
            float("big", DType::F32, &[5_000_001], 9),
            float("small", DType::F32, &[3], 1),
        ],
    );
    let bf = p(&d, "bf");
    ok(&["convert", s(&src), s(&bf), "--dtype", "bf16", "-q"]);
    let m = Model::open(&src).unwrap();
    let v = m.tensor("big").unwrap();
    let mut vals = Vec::new();
    amalgam::dtype::decode_f32(v.dtype, v.bytes, &mut vals);
    let mut expected = Vec::new();
    amalgam::dtype::encode_f32(DType::BF16, &vals, &mut expected);
    assert_eq!(
        Model::open(&bf).unwrap().tensor("big").unwrap().bytes,
        &expected[..]
    );
    let copy = p(&d, "copy");
    ok(&["convert", s(&bf), s(&copy), "--out-shard-size", "1M", "-q"]);
    assert_bit_identical(&bf, &copy);
}

#[test]
fn interrupted_run_leaves_no_output_and_keeps_the_old_one() {
    let d = tempfile::tempdir().unwrap();
    let (src, out) = slow_case(&d);
    // Interrupted once the temporary output directory exists.
    let child = start_slow_convert(&d, &src, &out);
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let result = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        listing(d.path()),
        ["out", "src"],
        "temporary directory removed"
    );
    assert_eq!(listing(&out), ["old.txt"], "old output untouched");
}

#[test]
fn a_file_cut_short_after_opening_is_a_read_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    write_model(&dir, &[float("w", DType::BF16, &[64, 64], 1)]);
    let model = Model::open(&dir).unwrap();
    let entry = model.entry("w").unwrap().clone();
    let mut buf = vec![0u8; entry.nbytes()];
    model
        .read_at(entry.shard, entry.range.start, &mut buf)
        .unwrap();
    // Another process truncates the file while the merge runs: a positioned read past the new
    // end fails with an error that names the file (a mapped read would have crashed).
    let file = dir.join("model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(entry.range.start as u64 + 100)
        .unwrap();
    let err = model
        .read_at(entry.shard, entry.range.start, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Start `amalgam convert SRC OUT --dtype f64 --overwrite` (slow enough to catch mid-run) and
/// wait until its staging directory exists beside OUT.
fn start_slow_convert(d: &tempfile::TempDir, src: &Path, out: &Path) -> std::process::Child {
    start_slow(d, &["convert", s(src), s(out), "--dtype", "f64"])
}

/// Start `amalgam --threads 1 ARGS --overwrite -q` and wait until a staging directory with its
/// owner record exists in `d` (the record is written just after the directory is made: a kill
/// between the two would leave a directory no later run may claim).
fn start_slow(d: &tempfile::TempDir, args: &[&str]) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["--threads", "1"])
        .args(args)
        .args(["--overwrite", "-q"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !listing(d.path())
        .iter()
        .any(|n| n.starts_with(STAGING_PREFIX) && d.path().join(n).join(MARKER).exists())
    {
        assert!(started.elapsed().as_secs() < 30, "output never started");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child
}

/// A model of 64 tensors of 4 MiB, and an existing output directory beside it.
fn slow_case(d: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    let src = p(d, "src");
    let tensors: Vec<T> = (0..64)
        .map(|i| float(&format!("t{i}"), DType::F32, &[1 << 20], i))
        .collect();
    write_model(&src, &tensors);
    let out = p(d, "out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("old.txt"), "previous output").unwrap();
    (src, out)
}

#[test]
fn a_killed_merge_leaves_a_staging_directory_the_next_run_removes() {
    let d = tempfile::tempdir().unwrap();
    let (src, out) = slow_case(&d);
    let config = d.path().join("linear.yml");
    std::fs::write(
        &config,
        format!(
            "merge_method: linear\nmodels:\n  - model: {0}\n    parameters: {{weight: 0.5}}\n  - model: {0}\n    parameters: {{weight: 0.5}}\ndtype: float64\n",
            src.display()
        ),
    )
    .unwrap();
    let mut child = start_slow(&d, &["merge", s(&config), s(&out)]);
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    let stale: Vec<String> = listing(d.path())
        .into_iter()
        .filter(|n| n.starts_with(STAGING_PREFIX))
        .collect();
    assert_eq!(stale.len(), 1, "{:?}", listing(d.path()));
    assert_eq!(listing(&out), ["old.txt"], "old output untouched");
    assert_eq!(
        std::fs::read_to_string(out.join("old.txt")).unwrap(),
        "previous output"
    );
    // `clean --dry-run` finds it and removes nothing.
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["clean", s(d.path()), "--dry-run", "--json"])).unwrap();
    assert_eq!(report["found"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["found"][0]["stale"], true, "{report}");
    assert!(d.path().join(&stale[0]).exists());
    // The next run into the same output removes it and says so.
    let run = amalgam(&["convert", s(&src), s(&out), "--overwrite", "-q"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("removed") && err.contains(&stale[0]), "{err}");
    assert_eq!(
        listing(d.path()),
        ["linear.yml", "out", "src"],
        "nothing left beside the output"
    );
    ok(&["diff", s(&src), s(&out)]); // exit 0: the same tensors
}

#[test]
fn a_second_run_into_an_output_being_written_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (src, out) = slow_case(&d);
    let child = start_slow_convert(&d, &src, &out);
    let err = fails(&["convert", s(&src), s(&out), "--overwrite", "-q"]);
    assert!(
        err.contains(&format!("amalgam process {}", child.id()))
            && err.contains("is writing this output now"),
        "{err}"
    );
    // `clean` leaves the live run's directory alone.
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["clean", s(d.path()), "--json"])).unwrap();
    assert_eq!(report["freed_bytes"], 0, "{report}");
    assert_eq!(report["found"][0]["stale"], false, "{report}");
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    child.wait_with_output().unwrap();
    assert_eq!(
        listing(d.path()),
        ["out", "src"],
        "lock and staging removed"
    );
    assert_eq!(listing(&out), ["old.txt"]);
}

/// A tmpfs mounted at a directory (unmounted when dropped), where this process may mount one.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs", s(dir)])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Convert `src` into `out` (as user `nobody` when `as_nobody`); the run must fail naming
/// `out`'s directory with `why`, and leave that directory as it was.
fn write_fails_cleanly(src: &Path, out: &Path, why: &str, as_nobody: bool) {
    let dir = out.parent().unwrap();
    let before = listing(dir);
    let bin = env!("CARGO_BIN_EXE_amalgam");
    let mut cmd = if as_nobody {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin]);
        c
    } else {
        std::process::Command::new(bin)
    };
    let run = cmd
        .args(["convert", s(src), s(out), "-q"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{why}: {err}");
    assert!(err.contains(why) && err.contains(s(dir)), "{why}: {err}");
    assert_eq!(listing(dir), before, "{why}: nothing left behind");
}

#[test]
fn write_errors_leave_nothing_behind_and_name_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    // Readable by `nobody` too (the permission case runs as that user when we are root).
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = p(&d, "src");
    write_model(&src, &[float("w", DType::F32, &[1 << 20], 1)]);
    // The output path is a file.
    std::fs::write(p(&d, "file"), "not a directory").unwrap();
    write_fails_cleanly(&src, &p(&d, "file"), "is not a directory", false);
    // Permission denied: a directory we may not write (as root, checked as `nobody`).
    let locked = p(&d, "locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    write_fails_cleanly(&src, &locked.join("out"), "Permission denied", root);
    // Read-only file system and disk full: tmpfs mounts, where this process may mount (root,
    // as in CI); otherwise reported as skipped.
    let ro = p(&d, "ro");
    match Tmpfs::mount(&ro, "size=8m") {
        Some(_m) => {
            let remount = std::process::Command::new("mount")
                .args(["-o", "remount,ro", s(&ro)])
                .status()
                .unwrap();
            assert!(remount.success());
            write_fails_cleanly(&src, &ro.join("out"), "Read-only file system", false);
        }
        None => eprintln!("skipped: read-only file system case (cannot mount a tmpfs here)"),
    }
    let full = p(&d, "full");
    match Tmpfs::mount(&full, "size=1m") {
        Some(_m) => {
            write_fails_cleanly(&src, &full.join("out"), "not enough free disk space", false)
        }
        None => eprintln!("skipped: disk full case (cannot mount a tmpfs here)"),
    }
}

#[test]
fn an_input_changed_during_a_run_is_an_error_and_nothing_is_written() {
    for how in ["written to", "replaced by another file"] {
        let d = tempfile::tempdir().unwrap();
        let (src, out) = slow_case(&d);
        let child = start_slow_convert(&d, &src, &out);
        let file = src.join("model.safetensors");
        if how == "written to" {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .unwrap();
            std::io::Write::write_all(&mut f, b" ").unwrap();
        } else {
            let other = src.join("other.tmp");
            std::fs::write(&other, b"new contents").unwrap();
            std::fs::rename(&other, &file).unwrap();
        }
        let run = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{how}: {err}");
        assert!(
            err.contains(&format!("{how} while it was being read")) && err.contains(s(&file)),
            "{how}: {err}"
        );
        assert_eq!(
            listing(d.path()),
            ["out", "src"],
            "{how}: nothing left behind"
        );
        assert_eq!(listing(&out), ["old.txt"], "{how}: old output untouched");
    }
}
