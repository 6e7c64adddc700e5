//! The `amalgam` binary: argument parsing, progress, output formatting and exit codes. All the
//! work happens in the `amalgam` library.

#[cfg(feature = "eval")]
mod adamerge;
#[cfg(feature = "eval")]
mod eval;
mod library;
#[cfg(feature = "eval")]
mod measure;
mod moe;
mod progress;
#[cfg(feature = "eval")]
mod route;
#[cfg(feature = "eval")]
mod search;
mod tokensurgeon;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use amalgam::DType;
use amalgam::io::{Existing, parse_shard_size};
use amalgam::ops::{convert, diff, inspect, merge};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Compose task-specific fine-tunes of one base model into one model.
#[derive(Parser)]
#[command(name = "amalgam", version, about)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress bar and no warnings on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models as a mergekit YAML config describes (`mergekit-yaml CONFIG OUT` equivalent).
    Merge {
        /// The merge configuration (mergekit's YAML schema).
        config: PathBuf,
        /// Output model directory.
        output: PathBuf,
        /// Print the plan (each output tensor, its sources and resolved parameters); write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seed for random methods (DARE, DELLA); results do not depend on --threads.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest shard, mergekit's syntax: bytes, or a number with K, M, B (10^9): 5B, 500M.
        #[arg(long, value_parser = parse_size, default_value = "5B")]
        out_shard_size: u64,
        /// Replace OUTPUT if it exists (only once the new model is complete).
        #[arg(long)]
        overwrite: bool,
        /// Allow merging models of different architectures (mergekit's flag).
        #[arg(long)]
        allow_crimes: bool,
        /// Cut embeddings and LM heads to the smallest vocabulary among the inputs. Only right
        /// when the models' token ids agree (mergekit's flag).
        #[arg(long)]
        unsafe_truncate_embeddings: bool,
        /// For state dicts whose tensor sets differ (mergekit-pytorch's flag): merge every
        /// tensor any listed model has, over the inputs that have it. Flat: each tensor on its
        /// own, gradient parameters at their first value.
        #[arg(long, conflicts_with = "tensor_intersection")]
        tensor_union: bool,
        /// For state dicts whose tensor sets differ (mergekit-pytorch's flag): merge only the
        /// tensors every input has. Flat, as --tensor-union.
        #[arg(long)]
        tensor_intersection: bool,
        /// Memory, all threads together, for keeping a tensor's inputs between the passes of
        /// methods that read them more than once (ties, dare_ties, breadcrumbs, slerp,
        /// model_stock, ...); a tensor whose inputs do not fit in its thread's share is read
        /// again from the files. Same syntax as --out-shard-size; 0 turns it off.
        #[arg(long, value_parser = parse_memory, default_value = "512M")]
        input_cache: u64,
        /// Elements per chunk for streamed methods (tests use tiny chunks to check that the
        /// result does not depend on the chunking).
        #[arg(long, default_value_t = 0, hide = true)]
        chunk_elements: usize,
        /// For a multi-stage CONFIG (several YAML documents, mergekit-multi's schema): where
        /// the named stages' models go, one directory per stage.
        #[arg(long, short = 'I')]
        intermediate_dir: Option<PathBuf>,
        /// Rebuild every stage of a multi-stage CONFIG, even those whose config and inputs are
        /// unchanged since their last build.
        #[arg(long)]
        rebuild_stages: bool,
    },
    /// Summarise a model: architecture, tensors, parameters, dtypes, shards, largest tensors.
    Inspect {
        /// A model directory or a .safetensors file.
        path: PathBuf,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        /// How many of the largest tensors to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Rewrite a model with another float dtype and/or sharding, streaming.
    Convert {
        /// Input model directory or .safetensors file.
        input: PathBuf,
        /// Output model directory.
        output: PathBuf,
        /// Float dtype of the output: bf16, f16, f32 or f64 (default: keep each tensor's).
        #[arg(long, value_parser = parse_dtype)]
        dtype: Option<DType>,
        /// Largest shard, mergekit's syntax: bytes, or a number with K, M, B (10^9): 5B, 500M.
        #[arg(long, value_parser = parse_size)]
        out_shard_size: Option<u64>,
        /// Replace OUTPUT if it exists (only once the new model is complete).
        #[arg(long)]
        overwrite: bool,
    },
    /// Evaluate a model on JSONL tasks: classification accuracy of a linear head on mean-pooled
    /// encoder outputs (BERT family), or per-token loss and perplexity of a decoder LM (Llama,
    /// Mistral, Qwen2, Qwen3).
    #[cfg(feature = "eval")]
    Eval(eval::EvalArgs),
    /// Search a merge's parameters (CMA-ES over mergekit-evolve's genome: per-layer-group and
    /// per-filter weights and densities) against evaluation tasks; every trial is recorded in
    /// a results file that resumes the search, the best written as a merge config.
    #[cfg(feature = "eval")]
    Search(search::SearchArgs),
    /// Measure a model's statistics on data for the data-driven merges: the Gram matrices of
    /// its linear layers' inputs (regmean) or the diagonal Fisher of its parameters (fisher),
    /// written as a stats file the merge config names per model (`stats:`).
    #[cfg(feature = "eval")]
    Measure(measure::MeasureArgs),
    /// AdaMerging: learn task arithmetic's coefficients (per task, or per task and tensor) by
    /// minimising the merged model's prediction entropy on unlabelled rows of every task; writes
    /// the merged model and the merge config that reproduces it.
    #[cfg(feature = "eval")]
    Adamerge(adamerge::AdaMergeArgs),
    /// Build a mixture-of-experts model from dense fine-tunes of one base, from a
    /// mergekit-moe YAML config: Mixtral, Qwen2-MoE (one gated shared expert) or Qwen3-MoE,
    /// router weights from prompts (hidden states or token embeddings) or random.
    Moe(moe::MoeArgs),
    /// LoRA adapters (PEFT format).
    #[command(subcommand)]
    Lora(LoraCommand),
    /// Task libraries: one base plus a compact module per task, any task rebuilt on demand.
    #[command(subcommand)]
    Library(library::LibraryCommand),
    /// Give MODEL the DONOR's tokenizer (mergekit-tokensurgeon): rows of tokens MODEL has are
    /// kept, the others approximated from the shared tokens (orthogonal matching pursuit by
    /// default); writes MODEL's weights with the donor's tokenizer files.
    Tokensurgeon(tokensurgeon::SurgeonArgs),
    /// Remove the staging directories that killed runs left under DIR (hidden
    /// `.amalgam-tmp-*` directories whose owner process is gone); a live run's, or one with no
    /// owner record, is listed and left alone.
    Clean {
        /// The directory tree to clean.
        dir: PathBuf,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Compare two models tensor by tensor; exit code 1 if they differ beyond --rtol.
    Diff {
        /// First model.
        a: PathBuf,
        /// Second model.
        b: PathBuf,
        /// Largest norm-relative error ‖a−b‖/max(‖a‖,‖b‖) per tensor that counts as equal.
        #[arg(long, default_value_t = 0.0)]
        rtol: f64,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        /// List every tensor, not only those that differ.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum LoraCommand {
    /// Bake an adapter into its base model: W + scale·(α/r)·B·A (α/√r with rsLoRA), streaming.
    Apply {
        /// The base model the adapter was trained on.
        base: PathBuf,
        /// The PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
        adapter: PathBuf,
        /// Output model directory.
        output: PathBuf,
        /// Multiplier of the adapter's delta.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        scale: f64,
        /// Largest shard, mergekit's syntax: bytes, or a number with K, M, B (10^9): 5B, 500M.
        #[arg(long, value_parser = parse_size)]
        out_shard_size: Option<u64>,
        /// Replace OUTPUT if it exists (only once the new model is complete).
        #[arg(long)]
        overwrite: bool,
    },
    /// Compose PEFT adapters into one, as a YAML config says: PEFT's combination types
    /// (cat, svd, linear, ties, ties_svd, dare_*, magnitude_prune[_svd]) or any per-tensor
    /// amalgam merge_method on the full deltas, optionally KnOTS-aligned.
    Merge {
        /// The config (base_model, combination_type or merge_method, adapters: [{adapter, weight}]).
        config: PathBuf,
        /// Output adapter directory.
        output: PathBuf,
        /// Replace OUTPUT if it exists (only once the new adapter is complete).
        #[arg(long)]
        overwrite: bool,
    },
    /// Extract a PEFT adapter approximating FINETUNED − BASE by a truncated SVD of each weight
    /// difference (mergekit-extract-lora's conventions); prints each module's relative error.
    Extract {
        /// The base model.
        #[arg(long, alias = "base-model")]
        base: PathBuf,
        /// The fine-tuned model.
        #[arg(long)]
        model: PathBuf,
        /// Largest rank per module.
        #[arg(long, alias = "max-rank", default_value_t = 128)]
        rank: usize,
        /// Output adapter directory.
        output: PathBuf,
        /// Per-module rank: the smallest keeping this fraction of ‖ΔW‖² (at most --rank).
        #[arg(long)]
        energy: Option<f64>,
        /// Put the singular values in A (B = U) instead of √σ in both.
        #[arg(long)]
        no_distribute_scale: bool,
        /// Factor embeddings and the LM head too, instead of saving them whole.
        #[arg(long)]
        embed_lora: bool,
        /// Save this module whole (full name or last component; repeatable).
        #[arg(long = "save-module")]
        save_modules: Vec<String>,
        /// Only modules whose name matches this regular expression (repeatable).
        #[arg(long = "include-regex", short = 'i')]
        include: Vec<String>,
        /// Leave out modules whose name matches this regular expression (repeatable).
        #[arg(long = "exclude-regex", short = 'e')]
        exclude: Vec<String>,
        /// Drop singular values at or below this.
        #[arg(long, default_value_t = 0.0)]
        sv_epsilon: f64,
        /// Leave out modules that cannot be factored (norms) instead of saving them whole.
        #[arg(long)]
        skip_undecomposable: bool,
        /// Exact SVD (default: randomized, seeded; much faster at low rank).
        #[arg(long)]
        exact: bool,
        /// Seed of the randomized SVD.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Replace OUTPUT if it exists (only once the new adapter is complete).
        #[arg(long)]
        overwrite: bool,
    },
}

fn print_extract(report: &amalgam::ops::lora::ExtractReport, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let value = report.to_json();
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    let width = report
        .modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6);
    writeln!(
        out,
        "{:width$}  {:>5}  {:>12}",
        "module", "rank", "rel. error"
    )?;
    for m in &report.modules {
        writeln!(
            out,
            "{:width$}  {:>5}  {:>12.6}",
            m.module,
            m.rank,
            m.relative()
        )?;
    }
    writeln!(
        out,
        "{} modules factored, overall relative error {:.6}; {} tensors saved whole; {} modules unchanged",
        report.modules.len(),
        report.overall(),
        report.saved.len(),
        report.unchanged.len()
    )?;
    writeln!(out, "wrote {}", report.path.display())?;
    Ok(())
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse_float(s)
        .ok_or_else(|| format!("'{s}' is not a float dtype; use bf16, f16, f32 or f64"))
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    parse_shard_size(s).map_err(|e| e.to_string())
}

/// A memory size as [`parse_size`] reads it, or 0.
fn parse_memory(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size(s).map_err(|_| {
        format!("'{s}' is not a size; use a byte count or a number with K, M or B (10^9), e.g. 512M, or 0")
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", message(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, `: `-separated, each cause left out when the text so far already
/// ends with it (amalgam's file errors print their OS error themselves).
fn message(err: &anyhow::Error) -> String {
    let mut chain = err.chain();
    let mut msg = chain.next().map(ToString::to_string).unwrap_or_default();
    for cause in chain {
        let text = cause.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    // candle (amalgam eval) has its own worker pool; evaluation runs whole batches in parallel
    // on rayon's workers instead, each batch on one core, which scales better than splitting
    // every small operation. Set before any other thread exists.
    #[cfg(feature = "eval")]
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread is running yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let _ = ctrlc::set_handler(amalgam::cancel::cancel);
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up worker threads")?;
    }
    match cli.command {
        Command::Merge {
            config,
            output,
            dry_run,
            seed,
            out_shard_size,
            overwrite,
            allow_crimes,
            unsafe_truncate_embeddings,
            tensor_union,
            tensor_intersection,
            input_cache,
            chunk_elements,
            intermediate_dir,
            rebuild_stages,
        } => {
            let plan_opts = amalgam::plan::PlanOptions {
                allow_crimes,
                truncate_embeddings: unsafe_truncate_embeddings,
                tensors: match (tensor_union, tensor_intersection) {
                    (true, _) => amalgam::plan::TensorSet::Union,
                    (_, true) => amalgam::plan::TensorSet::Intersection,
                    _ => amalgam::plan::TensorSet::Layout,
                },
            };
            let opts = merge::MergeOptions {
                shard_size: Some(out_shard_size),
                existing: existing(overwrite),
                seed,
                plan: plan_opts,
                chunk_elements,
                input_cache: Some(input_cache),
            };
            let multi = std::fs::read_to_string(&config)
                .is_ok_and(|text| amalgam::ops::stages::is_multi(&text));
            if multi {
                let Some(dir) = intermediate_dir else {
                    bail!(
                        "{} is a multi-stage config (several documents or named stages); give \
                         --intermediate-dir DIR for the named stages' models",
                        config.display()
                    );
                };
                let stages = amalgam::ops::stages::load(&config, &dir, &output)?;
                if dry_run {
                    print!("{}", describe_stages(&stages));
                    return Ok(ExitCode::SUCCESS);
                }
                let bar = progress::Bar::new("merge", cli.quiet);
                let opts = amalgam::ops::stages::StageOptions {
                    merge: opts,
                    rebuild: rebuild_stages,
                };
                let done = amalgam::ops::stages::run(&stages, &opts, &bar)?;
                drop(bar);
                if !cli.quiet {
                    let built = done
                        .iter()
                        .filter(|(_, o)| *o == amalgam::ops::stages::Outcome::Built)
                        .count();
                    eprintln!(
                        "{} stages: {built} built, {} up to date; wrote {}",
                        done.len(),
                        done.len() - built,
                        output.display()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            if intermediate_dir.is_some() || rebuild_stages {
                bail!(
                    "--intermediate-dir and --rebuild-stages are for multi-stage configs; {} is one merge",
                    config.display()
                );
            }
            let (cfg, set, plan) = merge::prepare(&config, plan_opts)?;
            if dry_run {
                print!("{}", plan.describe(&set));
                return Ok(ExitCode::SUCCESS);
            }
            let bar = progress::Bar::new("merge", cli.quiet);
            plan.warnings
                .iter()
                .for_each(|w| amalgam::progress::Progress::warn(&bar, w));
            let out = merge::execute(&cfg, &set, &plan, &output, &opts, &bar)?;
            if !cli.quiet {
                eprintln!("wrote {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, json, top } => {
            let report = inspect::inspect(&path, top)?;
            if json {
                print_json(&report)?;
            } else {
                print_inspect(&report)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert {
            input,
            output,
            dtype,
            out_shard_size,
            overwrite,
        } => {
            let opts = convert::ConvertOptions {
                dtype,
                shard_size: out_shard_size,
                existing: existing(overwrite),
            };
            let bar = progress::Bar::new("convert", cli.quiet);
            let out = convert::convert(&input, &output, &opts, &bar)?;
            if !cli.quiet {
                eprintln!("wrote {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lora(LoraCommand::Apply {
            base,
            adapter,
            output,
            scale,
            out_shard_size,
            overwrite,
        }) => {
            let opts = amalgam::ops::lora::ApplyOptions {
                scale,
                shard_size: out_shard_size,
                existing: existing(overwrite),
            };
            let bar = progress::Bar::new("lora apply", cli.quiet);
            let out = amalgam::ops::lora::apply(&base, &adapter, &output, &opts, &bar)?;
            if !cli.quiet {
                eprintln!("wrote {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lora(LoraCommand::Merge {
            config,
            output,
            overwrite,
        }) => {
            let cfg = amalgam::ops::lora::LoraMergeConfig::load(&config)?;
            let bar = progress::Bar::new("lora merge", cli.quiet);
            let ranks =
                amalgam::ops::lora::merge(&config, &cfg, &output, existing(overwrite), &bar)?;
            if !cli.quiet {
                let max = ranks.values().max().copied().unwrap_or(0);
                eprintln!(
                    "wrote {} ({} modules, rank up to {max})",
                    output.display(),
                    ranks.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lora(LoraCommand::Extract {
            base,
            model,
            rank,
            output,
            energy,
            no_distribute_scale,
            embed_lora,
            save_modules,
            include,
            exclude,
            sv_epsilon,
            skip_undecomposable,
            exact,
            seed,
            json,
            overwrite,
        }) => {
            let opts = amalgam::ops::lora::ExtractOptions {
                rank,
                energy,
                distribute_scale: !no_distribute_scale,
                embed_lora,
                save_modules,
                include,
                exclude,
                sv_epsilon,
                skip_undecomposable,
                exact,
                seed,
                existing: existing(overwrite),
            };
            let bar = progress::Bar::new("lora extract", cli.quiet);
            let report = amalgam::ops::lora::extract(&base, &model, &output, &opts, &bar)?;
            print_extract(&report, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Moe(args) => {
            moe::run(args, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Library(cmd) => {
            library::run(cmd, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "eval")]
        Command::Search(args) => {
            search::run(args, cli.threads, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "eval")]
        Command::Measure(args) => {
            measure::run(args, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "eval")]
        Command::Adamerge(args) => {
            adamerge::run(args, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "eval")]
        Command::Eval(args) => {
            eval::run(args, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokensurgeon(args) => {
            tokensurgeon::run(args, cli.quiet)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Clean { dir, dry_run, json } => {
            let found = amalgam::io::staging::clean(&dir, dry_run)?;
            let freed: u64 = found.iter().filter(|f| f.stale).map(|f| f.bytes).sum();
            if json {
                print_json(&serde_json::json!({
                    "dry_run": dry_run,
                    "freed_bytes": freed,
                    "found": found,
                }))?;
            } else {
                print_clean(&found, dry_run, freed)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            a,
            b,
            rtol,
            json,
            all,
        } => {
            let report = diff::diff(&a, &b, rtol)?;
            if json {
                print_json(&report)?;
            } else {
                print_diff(&report, all)?;
            }
            Ok(if report.differ {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// The stages of a multi-stage config in run order: what each reads and where it writes.
fn describe_stages(stages: &amalgam::ops::stages::Stages) -> String {
    let mut out = String::new();
    for (i, s) in stages.stages.iter().enumerate() {
        let reads: Vec<String> = s.deps.iter().map(|&d| stages.stages[d].label()).collect();
        out += &format!(
            "{}. {} ({}) -> {}{}\n",
            i + 1,
            s.label(),
            s.config.merge_method,
            s.out.display(),
            if reads.is_empty() {
                String::new()
            } else {
                format!(", reads {}", reads.join(", "))
            }
        );
    }
    out
}

pub(crate) fn existing(overwrite: bool) -> Existing {
    if overwrite {
        Existing::Replace
    } else {
        Existing::Refuse
    }
}

fn print_clean(found: &[amalgam::io::staging::Found], dry_run: bool, freed: u64) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for f in found {
        let why = match (&f.owner, f.stale) {
            (Some(o), true) => format!(
                "{} (process {} ended before finishing {})",
                if dry_run { "would remove" } else { "removed" },
                o.pid,
                o.target.display()
            ),
            (Some(o), false) => format!(
                "kept: process {} on {} is writing {} (or is on another host, where it cannot be checked)",
                o.pid,
                o.host,
                o.target.display()
            ),
            (None, _) => "kept: no owner record (an older amalgam's, or not amalgam's); remove it by hand if nothing is writing there".to_string(),
        };
        writeln!(out, "{}  {}  {why}", f.path.display(), human_bytes(f.bytes))?;
    }
    let verb = if dry_run { "would free" } else { "freed" };
    writeln!(
        out,
        "{} staging director{} found; {verb} {}",
        found.len(),
        if found.len() == 1 { "y" } else { "ies" },
        human_bytes(freed)
    )?;
    Ok(())
}

pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn print_inspect(r: &inspect::Report) -> Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "model:        {}", r.path)?;
    let arch = match (&r.architecture, &r.model_type) {
        (Some(a), Some(t)) => format!("{a} ({t})"),
        (Some(a), None) => a.clone(),
        (None, Some(t)) => t.clone(),
        (None, None) => "unknown (no config.json)".into(),
    };
    writeln!(o, "architecture: {arch}")?;
    writeln!(o, "tensors:      {}", r.tensors)?;
    writeln!(
        o,
        "parameters:   {} ({:.3} B)",
        r.parameters,
        r.parameters as f64 / 1e9
    )?;
    writeln!(
        o,
        "size:         {} ({} bytes)",
        human_bytes(r.total_bytes),
        r.total_bytes
    )?;
    writeln!(o, "dtypes:")?;
    for (d, s) in &r.dtypes {
        writeln!(
            o,
            "  {d:<8} {:>6} tensors {:>14} params {:>12}",
            s.tensors,
            s.parameters,
            human_bytes(s.bytes)
        )?;
    }
    writeln!(o, "shards:")?;
    for s in &r.shards {
        writeln!(
            o,
            "  {:<40} {:>6} tensors {:>12}",
            s.file,
            s.tensors,
            human_bytes(s.bytes)
        )?;
    }
    writeln!(o, "largest tensors:")?;
    for t in &r.largest {
        writeln!(
            o,
            "  {:<50} {:<5} {:<20} {:>12}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            human_bytes(t.bytes)
        )?;
    }
    Ok(())
}

fn print_diff(r: &diff::DiffReport, all: bool) -> Result<()> {
    let mut o = std::io::stdout().lock();
    for n in &r.only_in_a {
        writeln!(o, "only in A: {n}")?;
    }
    for n in &r.only_in_b {
        writeln!(o, "only in B: {n}")?;
    }
    let mut differing = 0;
    let mut worst: Option<(&str, f64)> = None;
    for t in &r.tensors {
        let bad = t.differs(r.rtol);
        differing += bad as usize;
        if let Some(rel) = t.rel
            && worst.is_none_or(|(_, w)| rel > w || rel.is_nan())
        {
            worst = Some((&t.name, rel));
        }
        if !(bad || all) {
            continue;
        }
        if t.shapes[0] != t.shapes[1] {
            writeln!(
                o,
                "shape differs: {}: {:?} vs {:?}",
                t.name, t.shapes[0], t.shapes[1]
            )?;
        } else {
            let dt = if t.dtypes[0] != t.dtypes[1] {
                format!(" ({} vs {})", t.dtypes[0], t.dtypes[1])
            } else {
                String::new()
            };
            writeln!(
                o,
                "{} {}: max_abs {:.3e} rel {:.3e}{dt}",
                if bad { "differs:" } else { "same:   " },
                t.name,
                t.max_abs.unwrap_or(f64::NAN),
                t.rel.unwrap_or(f64::NAN)
            )?;
        }
    }
    writeln!(
        o,
        "{} common tensors, {} differ beyond rtol {:e}; {} only in A, {} only in B{}",
        r.tensors.len(),
        differing,
        r.rtol,
        r.only_in_a.len(),
        r.only_in_b.len(),
        worst
            .map(|(n, w)| format!("; largest rel error {w:.3e} ({n})"))
            .unwrap_or_default()
    )?;
    writeln!(
        o,
        "{}",
        if r.differ {
            "models differ"
        } else {
            "models match"
        }
    )?;
    Ok(())
}
