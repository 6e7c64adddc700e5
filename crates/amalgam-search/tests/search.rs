//! End-to-end searches over the tiny BERT fixtures: three dense fine-tunes of one base
//! (`amalgam-eval`'s SMILE routing fixture) scored by a classification task with a head.

use std::path::{Path, PathBuf};

use amalgam_search::{LocalOptions, Record, Search, SearchConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../amalgam-eval/tests/fixtures")
}

fn config(method: &str, extra_genome: &str, max_evals: usize) -> SearchConfig {
    let fx = fixtures();
    let smile = fx.join("routing/smile");
    let m = |n: &str| smile.join(n).display().to_string();
    let text = format!(
        "genome:\n  models: [{}, {}, {}]\n  merge_method: {method}\n  base_model: {}\n{extra_genome}\
         tasks:\n  - task: {}\n    head: {}\n\
         search:\n  population: 4\n  max_evals: {max_evals}\n  seed: 3\n",
        m("ft0"),
        m("ft1"),
        m("ft2"),
        m("base"),
        fx.join("bert/task.jsonl").display(),
        fx.join("bert/head.safetensors").display(),
    );
    SearchConfig::parse(Path::new("search.yml"), &text).unwrap()
}

fn run(cfg: SearchConfig, results: &Path, scratch: &Path, jobs: usize) -> Search {
    let mut s = Search::open(cfg, results).unwrap();
    let opts = LocalOptions {
        jobs,
        threads: Some(2),
        scratch: scratch.to_path_buf(),
    };
    amalgam_search::run_local(&mut s, &opts, &mut |_, _| {}).unwrap();
    s
}

/// The trials without their timings.
fn trials(s: &Search) -> Vec<(usize, Vec<f64>, f64, Vec<serde_json::Value>)> {
    s.records()
        .map(|r: &Record| {
            (
                r.trial,
                r.x.clone(),
                r.outcome.objective,
                r.outcome.tasks.clone(),
            )
        })
        .collect()
}

#[test]
fn a_search_records_every_trial_and_its_best_config_reproduces_its_score() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let s = run(
        config("ties", "  layer_granularity: 1\n", 8),
        &dir.path().join("r.jsonl"),
        &scratch,
        1,
    );
    assert!(s.finished());
    assert_eq!(s.records().count(), 8);
    let lines = std::fs::read_to_string(dir.path().join("r.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 9, "a header and one line per trial");
    // Nothing is left in scratch.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);

    // The best config is an ordinary merge config: merging and evaluating it gives its score.
    let best = dir.path().join("best.yml");
    assert!(s.write_best(&best).unwrap());
    let b = s.best().unwrap();
    assert!(
        s.records()
            .all(|r| r.outcome.objective <= b.outcome.objective)
    );
    let text = std::fs::read_to_string(&best).unwrap();
    assert!(
        text.contains("slices:") && text.contains("layer_range"),
        "{text}"
    );
    let out = dir.path().join("best");
    amalgam::ops::merge::merge(&best, &out, &Default::default(), &amalgam::progress::Silent)
        .unwrap();
    let ev = amalgam_eval::Evaluator::open(&out, None).unwrap();
    let fx = fixtures();
    let task = amalgam_eval::Task::load(&fx.join("bert/task.jsonl"), None).unwrap();
    let head = amalgam_eval::Head::load(&fx.join("bert/head.safetensors"), 32).unwrap();
    let r = ev.evaluate(&task, Some(&head), &|_| {}).unwrap();
    assert_eq!(serde_json::to_value(&r).unwrap(), b.outcome.tasks[0]);

    let svg = dir.path().join("plot.svg");
    s.write_plot(&svg).unwrap();
    let svg = std::fs::read_to_string(svg).unwrap();
    assert_eq!(svg.matches("<circle").count(), 8);
}

#[test]
fn a_resumed_search_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let whole = run(
        config("task_arithmetic", "", 12),
        &dir.path().join("whole.jsonl"),
        &scratch,
        1,
    );

    // A search of 4 trials extended to 12 (max_evals is not part of the config's identity).
    let part = dir.path().join("part.jsonl");
    run(config("task_arithmetic", "", 4), &part, &scratch, 1);
    let extended = run(config("task_arithmetic", "", 12), &part, &scratch, 2);
    assert_eq!(trials(&extended), trials(&whole));

    // A run killed mid-write: 6 whole trials and a torn seventh line.
    let text = std::fs::read_to_string(dir.path().join("whole.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let killed = dir.path().join("killed.jsonl");
    std::fs::write(
        &killed,
        format!("{}\n{}", lines[..7].join("\n"), &lines[7][..20]),
    )
    .unwrap();
    let s = Search::open(config("task_arithmetic", "", 12), &killed).unwrap();
    assert!(s.warnings[0].contains("torn last line"), "{:?}", s.warnings);
    assert_eq!(s.records().count(), 6);
    assert_eq!(s.pending().len(), 2, "the rest of generation 1");
    drop(s);
    let resumed = run(config("task_arithmetic", "", 12), &killed, &scratch, 1);
    assert_eq!(trials(&resumed), trials(&whole));

    // Another config's results file is refused, naming both hashes.
    let e = Search::open(config("ties", "", 12), &part)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another search config"), "{e}");
}

#[test]
fn a_trial_that_fails_stops_the_search_with_the_reason_and_keeps_what_finished() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("linear", "", 4);
    cfg.tasks[0].head = Some(dir.path().join("missing.safetensors"));
    let results = dir.path().join("r.jsonl");
    let mut s = Search::open(cfg, &results).unwrap();
    let opts = LocalOptions {
        jobs: 1,
        threads: Some(1),
        scratch: dir.path().join("scratch"),
    };
    let e = amalgam_search::run_local(&mut s, &opts, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("scratch"))
            .unwrap()
            .count(),
        0
    );
}
