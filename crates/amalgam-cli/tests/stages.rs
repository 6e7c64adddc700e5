//! Multi-stage merges (mergekit-multi's schema): a three-stage config gives the same bytes as
//! running its stages by hand; a second run rebuilds nothing; a changed stage config or input
//! content rebuilds that stage and what reads it, a touched but unchanged input nothing; bad
//! stage structure is refused naming the stage.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/merge/models")
}

/// Three stages: `soup` (linear of two fine-tunes), `trimmed` (TIES of the soup and a third
/// fine-tune, read as a stage by name) and the final SLERP of `trimmed` with the first fine-tune.
fn three_stages(m: &Path, ft3: &Path, ties_weight: f64) -> String {
    let m = m.display();
    let ft3 = ft3.display();
    format!(
        "name: soup
merge_method: linear
models:
  - model: {m}/llama_ft1
    parameters: {{weight: 0.6}}
  - model: {m}/llama_ft2
    parameters: {{weight: 0.4}}
dtype: float32
---
merge_method: slerp
base_model: trimmed
models:
  - model: trimmed
  - model: {m}/llama_ft1
parameters:
  t: 0.3
dtype: float32
---
name: trimmed
merge_method: ties
base_model: {m}/llama_base
models:
  - model: soup
    parameters: {{weight: {ties_weight}, density: 0.5}}
  - model: {ft3}
    parameters: {{weight: 0.5, density: 0.7}}
dtype: float32
"
    )
}

/// Run `amalgam merge` and return stderr; it must succeed.
fn merge(args: &[&str]) -> String {
    let out = amalgam(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "amalgam {args:?} failed: {err}");
    err
}

/// The model files of a directory (everything but the stage stamp), name and bytes.
fn model_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "amalgam-stage.json")
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn three_stages_equal_the_stages_run_by_hand_and_rerun_rebuilds_only_what_changed() {
    let d = tempfile::tempdir().unwrap();
    let ft3 = d.path().join("ft3");
    copy_dir(&models().join("llama_ft3"), &ft3);
    let cfg = d.path().join("multi.yml");
    std::fs::write(&cfg, three_stages(&models(), &ft3, 0.5)).unwrap();
    let (inter, out) = (d.path().join("stages"), d.path().join("out"));
    let run = || merge(&["merge", s(&cfg), s(&out), "-I", s(&inter)]);

    // The dry run lists the stages in the order they run.
    let plan = ok(&["merge", s(&cfg), s(&out), "-I", s(&inter), "--dry-run"]);
    let lines: Vec<&str> = plan.lines().collect();
    assert_eq!(lines.len(), 3, "{plan}");
    assert!(lines[0].starts_with("1. stage 'soup' (linear)"), "{plan}");
    assert!(
        lines[1].starts_with("2. stage 'trimmed' (ties)")
            && lines[1].ends_with("reads stage 'soup'"),
        "{plan}"
    );
    assert!(
        lines[2].starts_with("3. the final stage (slerp)")
            && lines[2].ends_with("reads stage 'trimmed'"),
        "{plan}"
    );
    assert!(!inter.exists() && !out.exists(), "a dry run writes nothing");

    let first = run();
    assert!(first.contains("3 stages: 3 built, 0 up to date"), "{first}");

    // By hand: each stage's config on its own, the stage names replaced by the directories.
    let hand = d.path().join("hand");
    std::fs::create_dir_all(&hand).unwrap();
    let text = three_stages(&models(), &ft3, 0.5);
    let docs: Vec<&str> = text.split("---\n").collect();
    let by_hand = |doc: &str, name: &str| {
        let doc = doc
            .lines()
            .filter(|l| !l.starts_with("name:"))
            .map(|l| {
                l.replace(
                    "model: soup",
                    &format!("model: {}", hand.join("soup").display()),
                )
                .replace(
                    "model: trimmed",
                    &format!("model: {}", hand.join("trimmed").display()),
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = hand.join(format!("{name}.yml"));
        std::fs::write(&c, doc).unwrap();
        merge(&["merge", s(&c), s(&hand.join(name)), "-q"]);
    };
    by_hand(docs[0], "soup");
    by_hand(docs[2], "trimmed");
    by_hand(docs[1], "final");
    for (stage, mine) in [
        ("soup", inter.join("soup")),
        ("trimmed", inter.join("trimmed")),
        ("final", out.clone()),
    ] {
        assert_eq!(
            model_files(&mine),
            model_files(&hand.join(stage)),
            "stage {stage} differs from the stage run by hand"
        );
    }

    // A second run rebuilds nothing and leaves every file as it was.
    let stamp_times: Vec<_> = [inter.join("soup"), inter.join("trimmed"), out.clone()]
        .iter()
        .map(|p| mtime(&p.join("model.safetensors")))
        .collect();
    let second = run();
    assert!(
        second.contains("3 stages: 0 built, 3 up to date"),
        "{second}"
    );
    let again: Vec<_> = [inter.join("soup"), inter.join("trimmed"), out.clone()]
        .iter()
        .map(|p| mtime(&p.join("model.safetensors")))
        .collect();
    assert_eq!(stamp_times, again);

    // An input touched but unchanged in content: still nothing to do.
    let shard = ft3.join("model.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&shard, &bytes).unwrap();
    let touched = run();
    assert!(
        touched.contains("3 stages: 0 built, 3 up to date"),
        "{touched}"
    );

    // The middle stage's config changes: it and the final stage are rebuilt, not the first.
    std::fs::write(&cfg, three_stages(&models(), &ft3, 0.8)).unwrap();
    let changed = run();
    assert!(
        changed.contains("3 stages: 2 built, 1 up to date"),
        "{changed}"
    );
    assert!(changed.contains("stage 'soup': up to date"), "{changed}");
    assert_ne!(model_files(&out), model_files(&hand.join("final")));

    // An input's content changes: the stage reading it and the final one are rebuilt.
    let mut altered = bytes.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x40;
    std::fs::write(&shard, &altered).unwrap();
    let content = run();
    assert!(
        content.contains("3 stages: 2 built, 1 up to date"),
        "{content}"
    );

    // A damaged stage output is rebuilt, and only it (its bytes are the same, so the final
    // stage, which keys on the stage's inputs, is up to date).
    let soup = inter.join("soup/model.safetensors");
    std::fs::write(&soup, b"garbage").unwrap();
    let damaged = run();
    assert!(
        damaged.contains("3 stages: 1 built, 2 up to date"),
        "{damaged}"
    );
    assert_eq!(
        model_files(&inter.join("soup")),
        model_files(&hand.join("soup"))
    );

    // --rebuild-stages rebuilds everything.
    let forced = merge(&[
        "merge",
        s(&cfg),
        s(&out),
        "-I",
        s(&inter),
        "--rebuild-stages",
    ]);
    assert!(
        forced.contains("3 stages: 3 built, 0 up to date"),
        "{forced}"
    );
}

/// The merge fails naming every `expect`, and nothing is written.
fn refused(yaml: &str, extra: &[&str], expect: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("multi.yml");
    std::fs::write(
        &cfg,
        yaml.replace("$M/", &format!("{}/", models().display())),
    )
    .unwrap();
    let (inter, out) = (d.path().join("stages"), d.path().join("out"));
    let mut args = vec!["merge", s(&cfg), s(&out), "-q"];
    if !extra.contains(&"no-dir") {
        args.extend(["-I", s(&inter)]);
    }
    let err = fails(&args);
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(listing(d.path()), ["multi.yml"], "nothing written");
}

const LINEAR: &str = "merge_method: linear
models:
  - model: $M/llama_ft1
  - model: $M/llama_ft2
";

#[test]
fn bad_stage_structure_is_refused_naming_the_stage() {
    let named = |n: &str, body: &str| format!("name: {n}\n{body}");
    let two = format!("{}---\n{LINEAR}", named("a", LINEAR));
    refused(
        &two,
        &["no-dir"],
        &["multi-stage config", "--intermediate-dir"],
    );
    refused(
        &format!(
            "{}---\n{}---\n{LINEAR}",
            named("a", LINEAR),
            named("a", LINEAR)
        ),
        &[],
        &["two stages are named 'a'"],
    );
    refused(
        &format!("{LINEAR}---\n{LINEAR}"),
        &[],
        &["more than one unnamed stage"],
    );
    refused(&named("a", LINEAR), &[], &["no unnamed final stage"]);
    refused(
        &format!("{}---\n{LINEAR}", named("x/y", LINEAR)),
        &[],
        &["stage name 'x/y' is not a plain directory name"],
    );
    refused(
        &format!("{}---\n{LINEAR}", named("union", LINEAR)),
        &[],
        &["stage name 'union'"],
    );
    let reads = |n: &str, other: &str| {
        format!(
            "name: {n}\nmerge_method: linear\nmodels:\n  - model: {other}\n  - model: $M/llama_ft1\n"
        )
    };
    refused(
        &format!("{}---\n{}---\n{LINEAR}", reads("a", "b"), reads("b", "a")),
        &[],
        &["cycle: a -> b -> a"],
    );
    refused(
        &format!(
            "{}---\n{LINEAR}",
            named(
                "a",
                "merge_method: linear\nmodels:\n  - model: $M/llama_ft1\n    parameters: {weight: 1}\n  - model: $M/llama_ft2\n    parameters: {wieght: 1}\n"
            )
        ),
        &[],
        &[],
    );
    refused(
        &format!(
            "{}---\n{LINEAR}",
            named("a", "merge_method: linear\nmodles: []\n")
        ),
        &[],
        &["stage 'a'", "modles"],
    );
    refused(
        "name: 3\nmerge_method: linear\n",
        &[],
        &["'name' must be a string"],
    );
    // One merge with --intermediate-dir: the flag is for multi-stage configs.
    refused(LINEAR, &[], &["are for multi-stage configs"]);
}
