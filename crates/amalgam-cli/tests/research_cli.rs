//! The research methods through the CLI beyond parity: whole-model passes and SVD methods give
//! the same bytes for 1 and 2 threads, the dry run shows their parameters, and bad settings
//! are clear errors that write nothing.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn research() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/research")
}

fn merged_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("model.safetensors")).unwrap()
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    for case in [
        "ties_global_bf16_majority",
        "consensus_ties",
        "pcb_vision",
        "iso_cts",
        "tsv_m",
    ] {
        let d = tempfile::tempdir().unwrap();
        let run = |threads: &str, name: &str| {
            let out = d.path().join(name);
            let config = research().join(format!("configs/{case}.yml"));
            let run = std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
                .current_dir(research())
                .args(["merge", s(&config), s(&out), "-q", "--threads", threads])
                .output()
                .unwrap();
            assert!(
                run.status.success(),
                "{case}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            merged_bytes(&out)
        };
        assert_eq!(run("1", "a"), run("2", "b"), "{case}: 1 vs 2 threads");
    }
}

#[test]
fn dry_run_shows_the_research_parameters() {
    let config = research().join("configs/consensus_ties.yml");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(research())
        .args(["merge", s(&config), "/nonexistent/out", "--dry-run"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = String::from_utf8_lossy(&run.stdout);
    for want in [
        "consensus",
        "base_merge=ties",
        "trim_scope=global",
        "tall_mask_lambda=0.6",
    ] {
        assert!(text.contains(want), "expected '{want}' in:\n{text}");
    }
}

/// The merge of `yaml` (model paths relative to the merge fixtures) fails with every `expect`
/// in its message, and writes nothing.
fn rejected(yaml: &str, expect: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let models = research().join("../merge/models");
    let cfg = d.path().join("config.yml");
    std::fs::write(&cfg, yaml.replace("$M/", &format!("{}/", models.display()))).unwrap();
    let err = fails(&["merge", s(&cfg), s(&d.path().join("out")), "-q"]);
    for e in expect {
        assert!(err.contains(e), "expected '{e}' in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(listing(d.path()), ["config.yml"], "nothing written");
}

#[test]
fn bad_research_settings_are_clear_errors() {
    rejected(
        "merge_method: ties\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\n    parameters: {weight: 1, density: 0.5}\nparameters: {trim_scope: everywhere}\n",
        &["trim_scope", "'everywhere' is not one of: tensor, global"],
    );
    rejected(
        "merge_method: ties\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\n    parameters:\n      weight: 1\n      density: [{filter: mlp, value: 0.2}, {value: 0.5}]\nparameters: {trim_scope: global}\n",
        &["trim_scope: global needs", "one density per model"],
    );
    rejected(
        "merge_method: iso_cts\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\nparameters: {common_space_fraction: 1.5}\n",
        &["parameter 'common_space_fraction' = 1.5 is outside [0, 1]"],
    );
    rejected(
        "merge_method: pcb\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\nparameters: {pcb_ratio: 0}\n",
        &["0 < pcb_ratio"],
    );
    rejected(
        "merge_method: consensus\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\nparameters:\n  base_merge: [{filter: mlp, value: ties}, {value: task_arithmetic}]\n",
        &["base_merge must be the same for every tensor"],
    );
}

/// Merge `yaml` (model paths under `$M/`) into `out`; panics with the stderr on failure.
fn merged(dir: &Path, yaml: &str, out: &str) -> Vec<u8> {
    let models = research().join("../merge/models");
    let cfg = dir.join(format!("{out}.yml"));
    std::fs::write(&cfg, yaml.replace("$M/", &format!("{}/", models.display()))).unwrap();
    let out = dir.join(out);
    ok(&["merge", s(&cfg), s(&out), "-q"]);
    merged_bytes(&out)
}

#[test]
fn reference_defects_are_avoided() {
    let d = tempfile::tempdir().unwrap();
    // PCB with a task vector that is all zero: the reference min-max normalises a constant row
    // (0/0) and its whole merge turns NaN; amalgam treats the row as 0 and merges the rest.
    // (The merge itself fails on any NaN, so success means every value is finite.)
    let pcb = "merge_method: pcb\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\n  - model: $M/llama_base\n";
    let with_zero = merged(d.path(), pcb, "pcb");
    let base = merged_bytes(&research().join("../merge/models/llama_base"));
    assert_eq!(with_zero.len(), base.len());
    assert_ne!(with_zero, base, "the nonzero task still moves the weights");
    // Global TIES at density 1: the paper's code fails (k-th value of rank 0); amalgam keeps
    // everything, exactly as the per-tensor form does.
    let ties = |scope: &str| {
        format!(
            "merge_method: ties\nbase_model: $M/llama_base\nmodels:\n  - model: $M/llama_ft1\n    parameters: {{weight: 1, density: 1}}\n  - model: $M/llama_ft2\n    parameters: {{weight: 1, density: 1}}\nparameters: {{trim_scope: {scope}}}\n"
        )
    };
    assert_eq!(
        merged(d.path(), &ties("global"), "global"),
        merged(d.path(), &ties("tensor"), "tensor")
    );
}
