//! `amalgam search`: CMA-ES over a merge genome, scored by evaluation tasks
//! ([`amalgam_search`]); one line per trial on stderr, a JSON summary with `--json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam_search::{LocalOptions, Search, SearchConfig};
use anyhow::{Result, bail};

/// `amalgam search` arguments.
#[derive(clap::Args)]
pub struct SearchArgs {
    /// The search config (YAML): `genome:` (mergekit-evolve's: models, merge_method,
    /// base_model, layer_granularity, filters, normalize, allow_negative_weights, smooth),
    /// `tasks:` ([{task, head, weight}]), `search:` {population, sigma0, max_evals, seed}.
    config: PathBuf,
    /// The results file (JSON lines, one per trial): an existing one of this config resumes the
    /// search. Default: CONFIG's name with `.results.jsonl`.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Where the best trial's merge config is written (default: CONFIG's name with
    /// `.best.yml`).
    #[arg(long)]
    best: Option<PathBuf>,
    /// The plot of the objective against trials (SVG; default: the results file's name with
    /// `.svg`).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Trials run at once (--threads is split between them).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Scratch directory for the trials' merged models (each deleted after its evaluation).
    /// Default: the system's temporary directory.
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print a JSON summary on stdout (trials, the best trial with its scores and config).
    #[arg(long)]
    json: bool,
}

fn beside(config: &Path, suffix: &str) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    config.with_file_name(format!("{stem}{suffix}"))
}

/// Run `amalgam search`.
pub fn run(args: SearchArgs, threads: Option<usize>, quiet: bool) -> Result<()> {
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let config = SearchConfig::load(&args.config)?;
    let results = args
        .results
        .unwrap_or_else(|| beside(&args.config, ".results.jsonl"));
    let best = args
        .best
        .unwrap_or_else(|| beside(&args.config, ".best.yml"));
    let plot = args.plot.unwrap_or_else(|| results.with_extension("svg"));
    let scratch = args
        .scratch
        .unwrap_or_else(|| std::env::temp_dir().join(format!("amalgam-search-{}", config.hash())));
    let started = Instant::now();
    let mut search = Search::open(config, &results)?;
    if !quiet {
        for w in &search.warnings {
            eprintln!("warning: {w}");
        }
        let done = search.records().count();
        eprintln!(
            "search: {} values, population {}, {} trials{}",
            search.layout().dimension(),
            search.summary()["population"],
            search.total_trials(),
            if done > 0 {
                format!(" ({done} already in {})", results.display())
            } else {
                String::new()
            }
        );
    }
    let total = search.total_trials();
    let opts = LocalOptions {
        jobs: args.jobs,
        threads,
        scratch,
    };
    let outcome = amalgam_search::run_local(&mut search, &opts, &mut |s, r| {
        if !quiet {
            let best = s.best().map_or(f64::NAN, |b| b.outcome.objective);
            eprintln!(
                "trial {}/{total} (generation {}): objective {:.4}, best {best:.4}; merge {:.2} s, eval {:.2} s",
                r.trial + 1,
                r.generation,
                r.outcome.objective,
                r.outcome.merge_seconds,
                r.outcome.eval_seconds
            );
        }
    });
    // What finished is kept whatever happened: the best so far and the plot.
    let wrote = search.write_best(&best)?;
    search.write_plot(&plot)?;
    outcome?;
    let mut summary = search.summary();
    summary["best_config"] = serde_json::json!(wrote.then_some(&best));
    summary["plot"] = serde_json::json!(plot);
    summary["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
    if args.json {
        crate::print_json(&summary)?;
    } else if !quiet {
        let b = &summary["best"];
        eprintln!(
            "search: best trial {} objective {} → {} (plot {}) in {:.1} s",
            b["trial"],
            b["objective"],
            best.display(),
            plot.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
