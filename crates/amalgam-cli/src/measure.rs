//! `amalgam measure`: statistics of a model on data, for the data-driven merges.

use std::path::PathBuf;
use std::time::Instant;

use amalgam_eval::measure::{FisherVariant, Options};
use amalgam_eval::{Evaluator, Task};
use anyhow::{Context, Result, bail};

/// Arguments of `amalgam measure`.
#[derive(clap::Args)]
pub struct MeasureArgs {
    /// The model: a folder with config.json, tokenizer.json and safetensors.
    model: PathBuf,
    /// The rows to measure on: JSONL with "text" (and "label" for a classification Fisher with
    /// --fisher empirical).
    #[arg(long)]
    data: PathBuf,
    /// What to measure: `gram` (every linear layer's input Gram matrix, for merge_method:
    /// regmean) or `fisher` (the diagonal Fisher of every parameter, for merge_method: fisher).
    #[arg(long, value_parser = ["gram", "fisher"])]
    stats: String,
    /// The stats file to write (.safetensors).
    out: PathBuf,
    /// Classification head of an encoder (a .safetensors file with weight and bias, or a
    /// folder holding DATA_NAME.safetensors): the Fisher of an encoder is that of its
    /// classifier's log-likelihood.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Measure only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Truncate inputs to this many tokens (default: as `amalgam eval`).
    #[arg(long)]
    max_len: Option<usize>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Gram: count padding positions too, as the reference implementations do (their count
    /// then depends on how rows are batched). Default: real tokens only.
    #[arg(long)]
    include_padding: bool,
    /// Fisher estimator: `exact` (classification: Σ_c p_c·g_c² per example, the authors'
    /// code; the default for encoders), `empirical` (the true label's, or for a decoder LM the
    /// sequence's own log-likelihood: the only one, and the default, for LMs), `batch`
    /// (FusionBench's: squared gradient of a batch's Σ_c √p_c·log p_c, faster and approximate).
    #[arg(long, value_parser = ["exact", "empirical", "batch"])]
    fisher: Option<String>,
    /// Store the statistics as f64 instead of f32.
    #[arg(long)]
    f64: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print a JSON summary on stdout: {"stats", "rows", "tokens", "tensors", "bytes",
    /// "seconds"}.
    #[arg(long)]
    json: bool,
}

/// Run `amalgam measure`.
pub fn run(args: MeasureArgs, quiet: bool) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.out.exists() && !args.overwrite {
        bail!(
            "{}: already exists; pass --overwrite to replace it",
            args.out.display()
        );
    }
    if args.stats == "gram" && args.fisher.is_some() {
        bail!("--fisher is for --stats fisher");
    }
    let task = Task::load(&args.data, args.limit)?;
    let start = Instant::now();
    let mut ev = if args.stats == "fisher" {
        Evaluator::open_trainable(&args.model, args.max_len)
    } else {
        Evaluator::open(&args.model, args.max_len)
    }
    .with_context(|| format!("loading {}", args.model.display()))?;
    ev.batch_size = args.batch_size;
    let opts = Options {
        mask_padding: !args.include_padding,
        dtype: if args.f64 {
            amalgam::DType::F64
        } else {
            amalgam::DType::F32
        },
        overwrite: args.overwrite,
    };
    let bar = crate::progress::counter(
        &format!("measure {} on {}", args.stats, task.name),
        task.texts.len() as u64,
        "rows",
        quiet,
    );
    let tick = |n: usize| {
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    };
    let summary = match args.stats.as_str() {
        "gram" => {
            if args.head.is_some() {
                bail!("--head is for --stats fisher; a Gram matrix needs no head");
            }
            ev.measure_gram(&task, &opts, &args.out, &tick)?
        }
        _ => {
            let default = if ev.hidden_size().is_some() {
                "exact"
            } else {
                "empirical"
            };
            let variant = match args.fisher.as_deref().unwrap_or(default) {
                "exact" => FisherVariant::Exact,
                "empirical" => FisherVariant::Empirical,
                _ => FisherVariant::Batch,
            };
            let head = match (&args.head, ev.hidden_size()) {
                (Some(h), Some(hidden)) => {
                    let path = if h.is_dir() {
                        h.join(format!("{}.safetensors", task.name))
                    } else {
                        h.clone()
                    };
                    Some(amalgam_eval::Head::load(&path, hidden)?)
                }
                (None, Some(_)) => bail!(
                    "{} is an encoder: its Fisher is that of a classifier; give the task's --head",
                    args.model.display()
                ),
                (Some(_), None) => bail!(
                    "{} is a decoder LM: its Fisher is that of its own next-token predictions; \
                     drop --head",
                    args.model.display()
                ),
                (None, None) => None,
            };
            ev.measure_fisher(&task, head.as_ref(), variant, &opts, &args.out, &tick)?
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["seconds"] = serde_json::json!(seconds);
        crate::print_json(&v)
    } else {
        if !quiet {
            eprintln!(
                "measure: {} statistics of {} on {} rows ({} token positions) in {:.1} s",
                summary.stats,
                args.model.display(),
                summary.rows,
                summary.tokens,
                seconds
            );
        }
        println!(
            "{}: {} tensors, {:.1} MB",
            args.out.display(),
            summary.tensors,
            summary.bytes as f64 / 1e6
        );
        Ok(())
    }
}
