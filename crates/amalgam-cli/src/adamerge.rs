//! `amalgam adamerge`: AdaMerging, task-arithmetic coefficients learned on unlabelled rows.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam::config::MergeConfig;
use amalgam::ops::merge::{MergeOptions, merge};
use amalgam_eval::adamerge::{AdaMerge, Granularity, Options, merge_config};
use amalgam_eval::{Evaluator, Head, Task};
use anyhow::{Context, Result, bail};

/// Arguments of `amalgam adamerge`.
#[derive(clap::Args)]
pub struct AdaMergeArgs {
    /// A `task_arithmetic` merge config: its `base_model` and `models` (the fine-tunes, one per
    /// task, in the order of --data) are what is merged; its weights are replaced by the
    /// learned coefficients.
    config: PathBuf,
    /// Where the merged model goes; `adamerge.yml` (the config that reproduces it with
    /// `amalgam merge`) and `adamerge.json` (coefficients, losses, settings) go in it too.
    out: PathBuf,
    /// Each task's unlabelled rows (JSONL with "text"; labels are ignored), one per model of
    /// the config, in order: FILE or NAME=FILE (NAME names the task, default the file's name).
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Each task's classification head (.safetensors with weight and bias), in order, or one
    /// folder of NAME.safetensors heads.
    #[arg(long, required = true)]
    head: Vec<PathBuf>,
    /// `layer` (one coefficient per task and parameter tensor) or `task` (one per task).
    #[arg(long, value_parser = ["layer", "task"], default_value = "layer")]
    granularity: String,
    /// Optimisation steps; each takes one batch of every task.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Every coefficient's starting value, in [0, 1].
    #[arg(long, default_value_t = 0.3)]
    init: f64,
    /// Rows per task per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Use only the first N rows of each data file.
    #[arg(long)]
    limit: Option<usize>,
    /// Truncate inputs to this many tokens (default: as `amalgam eval`).
    #[arg(long)]
    max_len: Option<usize>,
    /// Seed of the row order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace OUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print a JSON summary on stdout: {"out", "config", "groups", "lambdas", "losses",
    /// "seconds"}.
    #[arg(long)]
    json: bool,
}

/// Run `amalgam adamerge`.
pub fn run(args: AdaMergeArgs, quiet: bool) -> Result<()> {
    if args.out.exists() && !args.overwrite {
        bail!(
            "{}: already exists; pass --overwrite to replace it",
            args.out.display()
        );
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    let cfg = MergeConfig::load(&args.config)?;
    if cfg.merge_method != "task_arithmetic" {
        bail!(
            "{}: merge_method is {}; adamerge learns task_arithmetic's coefficients, so the \
             config must use merge_method: task_arithmetic",
            args.config.display(),
            cfg.merge_method
        );
    }
    let Some(base) = &cfg.base_model else {
        bail!(
            "{}: no base_model; task vectors are taken from it",
            args.config.display()
        );
    };
    let models: Vec<String> = match &cfg.models {
        Some(ms) if cfg.slices.is_none() => ms
            .iter()
            .map(|m| m.model.0.clone())
            .filter(|m| m != &base.0)
            .collect(),
        _ => bail!(
            "{}: adamerge takes a models: list (not slices:)",
            args.config.display()
        ),
    };
    for m in models.iter().chain([&base.0]) {
        if m.contains('+') && !Path::new(m).exists() {
            bail!("{m}: adapters (model+adapter) are not supported by adamerge; merge them first");
        }
    }
    if models.len() != args.data.len() {
        bail!(
            "{}: {} fine-tune(s) but {} --data file(s): give each fine-tune's task rows, in the \
             config's order",
            args.config.display(),
            models.len(),
            args.data.len()
        );
    }
    let mut tasks = Vec::new();
    for d in &args.data {
        let (name, file) = match d.split_once('=') {
            Some((n, f)) if !Path::new(d).exists() => (Some(n.to_string()), PathBuf::from(f)),
            _ => (None, PathBuf::from(d)),
        };
        let mut t = Task::load(&file, args.limit)?;
        if let Some(n) = name {
            t.name = n;
        }
        tasks.push(t);
    }
    let start = Instant::now();
    let mut ev = Evaluator::open_trainable(Path::new(&base.0), args.max_len)
        .with_context(|| format!("loading {}", base.0))?;
    ev.batch_size = args.batch_size;
    let Some(hidden) = ev.hidden_size() else {
        bail!(
            "{}: a decoder LM; adamerge is implemented for encoders with classification heads",
            base.0
        );
    };
    let heads: Vec<Head> = match args.head.as_slice() {
        [dir] if dir.is_dir() => tasks
            .iter()
            .map(|t| Head::load(&dir.join(format!("{}.safetensors", t.name)), hidden))
            .collect::<amalgam_eval::Result<_>>()?,
        files if files.len() == tasks.len() => files
            .iter()
            .map(|f| Head::load(f, hidden))
            .collect::<amalgam_eval::Result<_>>()?,
        files => bail!(
            "{} task(s) but {} --head file(s): give one head per task, in order, or one folder \
             of NAME.safetensors heads",
            tasks.len(),
            files.len()
        ),
    };
    let opts = Options {
        granularity: if args.granularity == "task" {
            Granularity::Task
        } else {
            Granularity::Layer
        },
        init: args.init,
        lr: args.lr,
        steps: args.steps,
        batch_size: args.batch_size,
        seed: args.seed,
    };
    let paths: Vec<PathBuf> = models.iter().map(PathBuf::from).collect();
    let mut ada = AdaMerge::new(&ev, &paths, opts.clone())?;
    let bar = crate::progress::counter("adamerge", args.steps as u64, "steps", quiet);
    let tick = |_step: usize, loss: f64| {
        if let Some(b) = &bar {
            b.inc(1);
            b.set_message(format!("entropy {loss:.4}"));
        }
    };
    let t: Vec<&Task> = tasks.iter().collect();
    let h: Vec<&Head> = heads.iter().collect();
    let learned = ada.run(&t, &h, &tick)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let absolute = |p: &str| -> Result<String> {
        Ok(std::fs::canonicalize(p)
            .with_context(|| format!("resolving {p}"))?
            .display()
            .to_string())
    };
    let abs_models: Vec<String> = models.iter().map(|m| absolute(m)).collect::<Result<_>>()?;
    let dtype = cfg.out_dtype.as_deref().or(cfg.dtype.as_deref());
    let yaml = merge_config(&absolute(&base.0)?, &abs_models, &learned, args.init, dtype);
    // The config beside the output while merging, then inside it.
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = args
        .out
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let staged = parent.join(format!(".{name}.adamerge-{}.yml", std::process::id()));
    std::fs::write(&staged, &yaml).with_context(|| format!("writing {}", staged.display()))?;
    let merge_opts = MergeOptions {
        existing: if args.overwrite {
            amalgam::io::writer::Existing::Replace
        } else {
            amalgam::io::writer::Existing::Refuse
        },
        ..MergeOptions::default()
    };
    let merged = merge(&staged, &args.out, &merge_opts, &amalgam::progress::Silent);
    std::fs::remove_file(&staged).ok();
    let out = merged?;
    let config_out = out.join("adamerge.yml");
    std::fs::write(&config_out, &yaml)?;
    let seconds = start.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "out": out,
        "config": config_out,
        "granularity": opts.granularity,
        "options": opts,
        "tasks": tasks.iter().map(|t| &t.name).collect::<Vec<_>>(),
        "groups": learned.groups,
        "lambdas": learned.lambdas,
        "losses": learned.losses,
        "seconds": seconds,
    });
    std::fs::write(
        out.join("adamerge.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    if args.json {
        crate::print_json(&report)
    } else {
        if !quiet {
            let first = learned.losses.first().copied().unwrap_or(f64::NAN);
            let last = learned.losses.last().copied().unwrap_or(f64::NAN);
            eprintln!(
                "adamerge: {} steps, entropy {first:.4} → {last:.4}, {} coefficient(s) per task, \
                 {seconds:.1} s",
                args.steps,
                learned.groups.len()
            );
        }
        println!("{}", out.display());
        Ok(())
    }
}
