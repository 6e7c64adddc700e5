//! `amalgam eval`: evaluate a model on JSONL tasks and print a summary table or JSON.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use amalgam_eval::{Evaluator, Metrics, Task, TaskReport, Weighting};
use anyhow::{Context, Result, bail};

/// Arguments of `amalgam eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// The model: a folder with config.json, tokenizer.json and safetensors (amalgam's outputs
    /// are such folders).
    model: PathBuf,
    /// A task file: JSONL rows {"text", "label"} (classification: accuracy of --head on the
    /// mean-pooled encoder output) or {"text"} (language modelling: per-token loss and
    /// perplexity). Repeat for several tasks.
    #[arg(long = "task", required = true)]
    tasks: Vec<PathBuf>,
    /// Classification head: a .safetensors file with weight [classes, hidden] and bias
    /// [classes], one per classification --task in the same order; or a folder holding
    /// NAME.safetensors for each task NAME (the task file's name without .test.jsonl/.jsonl).
    #[arg(long = "head")]
    heads: Vec<PathBuf>,
    /// Truncate inputs to this many tokens, special tokens included (default: the model's
    /// sentence-transformers max_seq_length or position table for encoders; 1024 for decoders).
    #[arg(long)]
    max_len: Option<usize>,
    /// Evaluate only the first N rows of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// MODEL is a task library: evaluate this task of it, rebuilt in memory (nothing is
    /// written), with the base's config and tokenizer.
    #[arg(long)]
    library_task: Option<String>,
    /// With --library-task: the base model (default: the one the library was built from).
    #[arg(long, requires = "library_task")]
    base: Option<PathBuf>,
    /// Print one JSON object on stdout: {"tasks": [{"name", "examples", "accuracy"} or
    /// {"name", "examples", "loss", "perplexity"}, with "router_accuracy" when routed]} and,
    /// when routed, "routing": the router, experts, their parameters and the memory multiple.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    route: crate::route::RouteArgs,
}

/// Run `amalgam eval`.
pub fn run(args: EvalArgs, quiet: bool) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    // Read every task and its head before the model, so bad input fails fast.
    let tasks = args
        .tasks
        .iter()
        .map(|p| Task::load(p, args.limit))
        .collect::<amalgam_eval::Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut ev = match &args.library_task {
        Some(task) => {
            Evaluator::open_library(&args.model, task, args.base.as_deref(), args.max_len)
        }
        None => Evaluator::open(&args.model, args.max_len),
    }
    .with_context(|| format!("loading {}", args.model.display()))?;
    ev.batch_size = args.batch_size;
    let heads = amalgam_eval::head::heads_for(&tasks, &args.heads, ev.hidden_size())?;
    let say = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    say(format!(
        "eval: {} loaded in {:.1} s (max length {} tokens)",
        args.model.display(),
        start.elapsed().as_secs_f64(),
        ev.max_len
    ));
    let routing = if args.route.enabled() {
        let t0 = Instant::now();
        let shared = ev.parameters();
        let r = args.route.attach(&mut ev, &tasks, shared, quiet)?;
        say(format!(
            "eval: {} experts on {} layers ({} parameters, {:.2}× the shared model's memory) \
             in {:.1} s",
            r.experts.len(),
            r.report.layers,
            r.report.expert_parameters,
            r.report.memory_multiple,
            t0.elapsed().as_secs_f64()
        ));
        Some(r)
    } else {
        None
    };
    let mut results = Vec::with_capacity(tasks.len());
    for (task, head) in tasks.iter().zip(&heads) {
        let t0 = Instant::now();
        let bar = crate::progress::counter(
            &format!("eval {}", task.name),
            task.texts.len() as u64,
            "examples",
            quiet,
        );
        let tick = |n: usize| {
            if let Some(b) = &bar {
                b.inc(n as u64);
            }
        };
        let row = match &routing {
            Some(r) => {
                let before = ev.expert_counts();
                let rows = r.weights(&ev, task)?;
                let w = match &rows {
                    None => Weighting::Token,
                    Some(rows) => Weighting::PerRow(rows),
                };
                let routed = match head {
                    Some(h) => ev.classify_routed(task, h, Some(w), &tick)?,
                    None => ev.perplexity_routed(task, Some(w), &tick)?,
                };
                // Uniform weights have no top expert.
                let own = r
                    .expert_of(task)
                    .filter(|_| r.kind != crate::route::RouteKind::Uniform);
                let acc = own.map(|e| {
                    routed.top.iter().filter(|&&t| t == e).count() as f64
                        / routed.top.len().max(1) as f64
                });
                TaskReport {
                    result: routed.result,
                    router_accuracy: acc,
                    expert_fractions: ev.expert_fractions_since(before),
                }
            }
            None => ev.evaluate(task, head.as_ref(), &tick)?,
        };
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        say(format!(
            "eval: {}: {}{} in {:.1} s",
            task.name,
            describe(&row.result.metrics),
            row.router_accuracy
                .map_or(String::new(), |a| format!(", router accuracy {a:.4}")),
            t0.elapsed().as_secs_f64()
        ));
        results.push(row);
    }
    if args.json {
        let mut out = serde_json::json!({ "tasks": results });
        if let Some(r) = &routing {
            out["routing"] = serde_json::to_value(&r.report)?;
        }
        crate::print_json(&out)
    } else {
        print_table(&results)
    }
}

fn describe(m: &Metrics) -> String {
    match m {
        Metrics::Accuracy { examples, accuracy } => {
            format!("{examples} examples, accuracy {accuracy:.4}")
        }
        Metrics::Perplexity {
            examples,
            loss,
            perplexity,
        } => format!("{examples} examples, loss {loss:.4}, perplexity {perplexity:.3}"),
    }
}

fn print_table(rows: &[TaskReport]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let routed = rows.iter().any(|r| r.router_accuracy.is_some());
    let width = rows
        .iter()
        .map(|r| r.result.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let router = |r: &TaskReport| match (routed, r.router_accuracy) {
        (false, _) => String::new(),
        (true, Some(a)) => format!("  {a:>6.4}"),
        (true, None) => format!("  {:>6}", "-"),
    };
    writeln!(
        out,
        "{:<width$}  {:>8}  {:>9}  {:>9}  {:>10}{}",
        "task",
        "examples",
        "accuracy",
        "loss",
        "perplexity",
        if routed { "  router" } else { "" }
    )?;
    let mut accs = Vec::new();
    for row in rows {
        let r = &row.result;
        match &r.metrics {
            Metrics::Accuracy { examples, accuracy } => {
                accs.push(*accuracy);
                writeln!(
                    out,
                    "{:<width$}  {examples:>8}  {accuracy:>9.4}  {:>9}  {:>10}{}",
                    r.name,
                    "",
                    "",
                    router(row)
                )?;
            }
            Metrics::Perplexity {
                examples,
                loss,
                perplexity,
            } => writeln!(
                out,
                "{:<width$}  {examples:>8}  {:>9}  {loss:>9.4}  {perplexity:>10.3}{}",
                r.name,
                "",
                router(row)
            )?,
        }
    }
    if accs.len() > 1 {
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        writeln!(out, "{:<width$}  {:>8}  {mean:>9.4}", "average", "")?;
    }
    Ok(())
}
