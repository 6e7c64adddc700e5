//! One trial: merge a genotype's config into scratch, evaluate the tasks on it, delete it.
//!
//! The trial's directory is a staging directory (`.amalgam-tmp-trial-N` with amalgam's owner
//! record), so a trial killed on a node is swept by the next trial that starts there, exactly as
//! a killed merge's output is: no partial model stays behind.

use std::path::Path;
use std::time::Instant;

use amalgam::io::staging;
use amalgam::ops::merge as merge_op;
use amalgam_eval::{Evaluator, Metrics, Task};
use serde_json::Value;

use crate::config::SearchConfig;
use crate::genome::Layout;
use crate::results::Outcome;
use crate::{Error, Result};

/// Removes the trial's directory however the trial ends.
struct Scratch<'a>(&'a Path);

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

/// The score a task contributes to the objective: accuracy, or −perplexity.
pub fn score(metrics: &Metrics) -> f64 {
    match metrics {
        Metrics::Accuracy { accuracy, .. } => *accuracy,
        Metrics::Perplexity { perplexity, .. } => -perplexity,
    }
}

/// The name of trial `trial`'s directory in the scratch directory.
pub fn scratch_name(trial: usize) -> String {
    format!("{}trial-{trial}", staging::STAGING_PREFIX)
}

/// Run trial `trial` of genotype `x` in `scratch` (created if missing). `config` has absolute
/// paths (or the working directory is the config's); `layout` is its genome's.
pub fn run(
    config: &SearchConfig,
    layout: &Layout,
    trial: usize,
    x: &[f64],
    scratch: &Path,
) -> Result<Outcome> {
    let at = |p: &Path, e: std::io::Error| Error::new(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(scratch).map_err(|e| at(scratch, e))?;
    // Trials (and merges) killed on this node before: their owners are gone.
    staging::sweep(scratch, None, false);
    let dir = scratch.join(scratch_name(trial));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| at(&dir, e))?;
    }
    std::fs::create_dir(&dir).map_err(|e| at(&dir, e))?;
    let _cleanup = Scratch(&dir);
    staging::mark(&dir, &staging::Owner::me(&dir)).map_err(|e| Error::new(e.to_string()))?;

    let started = Instant::now();
    let merge_config = layout.merge_config(x);
    let config_path = dir.join("merge.yml");
    std::fs::write(&config_path, merge_config.to_string()).map_err(|e| at(&config_path, e))?;
    let model = dir.join("model");
    let opts = merge_op::MergeOptions {
        seed: config.search.seed.wrapping_add(trial as u64),
        ..Default::default()
    };
    merge_op::merge(&config_path, &model, &opts, &amalgam::progress::Silent)
        .map_err(|e| Error::new(format!("trial {trial}: merging: {e}")))?;
    let merge_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let tasks = config
        .tasks
        .iter()
        .map(|t| Task::load(&t.task, config.limit))
        .collect::<amalgam_eval::Result<Vec<_>>>()
        .map_err(|e| Error::new(e.to_string()))?;
    let mut ev = Evaluator::open(&model, config.max_len)
        .map_err(|e| Error::new(format!("trial {trial}: loading the merged model: {e}")))?;
    ev.batch_size = config.batch_size;
    let given: Vec<_> = config.tasks.iter().filter_map(|t| t.head.clone()).collect();
    let heads = amalgam_eval::head::heads_for(&tasks, &given, ev.hidden_size())
        .map_err(|e| Error::new(e.to_string()))?;
    let mut reports = Vec::new();
    let (mut sum, mut weights) = (0.0, 0.0);
    for ((task, head), spec) in tasks.iter().zip(&heads).zip(&config.tasks) {
        let r = ev
            .evaluate(task, head.as_ref(), &|_| {})
            .map_err(|e| Error::new(format!("trial {trial}: {}: {e}", task.path.display())))?;
        sum += spec.weight * score(&r.result.metrics);
        weights += spec.weight;
        reports.push(serde_json::to_value(&r).expect("json"));
    }
    drop(ev);
    let objective = sum / weights;
    Ok(Outcome {
        // A merge that broke (NaN, an overflowing perplexity) ranks below every other; JSON has
        // no infinities, so it is the lowest finite value.
        objective: if objective.is_finite() {
            objective
        } else {
            f64::MIN
        },
        tasks: reports,
        merge_seconds,
        eval_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The merge config of `x` as YAML text, for a person to read (the best config).
pub fn yaml(config: &Value) -> String {
    serde_saphyr::to_string(config).expect("a JSON value serialises as YAML")
}
