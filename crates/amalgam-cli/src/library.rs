//! `amalgam library`: build a task library, rebuild a task, describe a library, export a task
//! as a LoRA adapter.

use std::io::Write;
use std::path::PathBuf;

use amalgam::DType;
use amalgam::library::{self, Library, Manifest};
use anyhow::Result;
use clap::Subcommand;

/// The `library` subcommands.
#[derive(Subcommand)]
pub enum LibraryCommand {
    /// Build a library: one base plus a compact module per task (see the README's "Task
    /// library" section for the config and the schemes).
    Build {
        /// The library configuration (YAML: base_model, tasks, scheme, parameters, out_dtype).
        config: PathBuf,
        /// The library directory to write.
        output: PathBuf,
        /// Seed (randomized SVDs).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Memory, all threads together, for keeping a tensor's inputs between a scheme's
        /// passes (same syntax as merge's --input-cache; 0 turns it off).
        #[arg(long, value_parser = crate::parse_memory, default_value = "512M")]
        input_cache: u64,
        /// Largest shard of the shared parts (mergekit's syntax: 5B, 500M).
        #[arg(long, value_parser = crate::parse_size, default_value = "5B")]
        shard_size: u64,
        /// Replace OUTPUT if it exists (only once the new library is complete).
        #[arg(long)]
        overwrite: bool,
        /// Elements per chunk for streamed schemes (tests).
        #[arg(long, default_value_t = 0, hide = true)]
        chunk_elements: usize,
    },
    /// Rebuild one task's model from the base and the library, streaming.
    Rebuild {
        /// The library directory.
        library: PathBuf,
        /// The task's name.
        task: String,
        /// Output model directory.
        output: PathBuf,
        /// The base model (default: the path the library was built from).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Output dtype (default: the library's out_dtype, else each tensor's base dtype).
        #[arg(long, value_parser = crate::parse_dtype)]
        dtype: Option<DType>,
        /// Largest shard, mergekit's syntax: 5B, 500M.
        #[arg(long, value_parser = crate::parse_size, default_value = "5B")]
        out_shard_size: u64,
        /// Replace OUTPUT if it exists (only once the new model is complete).
        #[arg(long)]
        overwrite: bool,
        /// Elements per chunk (tests).
        #[arg(long, default_value_t = 0, hide = true)]
        chunk_elements: usize,
    },
    /// Describe a library: scheme, each task's size, bits per parameter and reconstruction
    /// error, and the totals against N full models.
    Info {
        /// The library directory.
        library: PathBuf,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write one task as a PEFT LoRA adapter (truncated SVD of each 2-D module's rebuilt task
    /// vector, with `lora extract`'s conventions).
    ExportLora {
        /// The library directory.
        library: PathBuf,
        /// The task's name.
        task: String,
        /// Output adapter directory.
        output: PathBuf,
        /// Largest rank per module.
        #[arg(long)]
        rank: usize,
        /// Per-module rank: the smallest keeping this fraction of ‖Δ‖² (at most --rank).
        #[arg(long)]
        energy: Option<f64>,
        /// The base model (default: the path the library was built from).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Exact SVD (default: randomized, seeded).
        #[arg(long)]
        exact: bool,
        /// Factor embeddings too, instead of saving them whole.
        #[arg(long)]
        embed_lora: bool,
        /// Print the per-module report as JSON.
        #[arg(long)]
        json: bool,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        overwrite: bool,
    },
}

/// Run a `library` subcommand.
pub fn run(cmd: LibraryCommand, quiet: bool) -> Result<()> {
    match cmd {
        LibraryCommand::Build {
            config,
            output,
            seed,
            input_cache,
            shard_size,
            overwrite,
            chunk_elements,
        } => {
            let opts = library::BuildOptions {
                existing: crate::existing(overwrite),
                seed,
                chunk_elements,
                input_cache: Some(input_cache),
                shard_size: Some(shard_size),
            };
            let bar = crate::progress::Bar::new("library build", quiet);
            let manifest = library::build(&config, &output, &opts, &bar)?;
            if !quiet {
                eprintln!("wrote {}", output.display());
                print_info(&manifest, &output, false, &mut std::io::stderr().lock())?;
            }
            Ok(())
        }
        LibraryCommand::Rebuild {
            library: lib,
            task,
            output,
            base,
            dtype,
            out_shard_size,
            overwrite,
            chunk_elements,
        } => {
            let opts = library::RebuildOptions {
                base,
                existing: crate::existing(overwrite),
                shard_size: Some(out_shard_size),
                out_dtype: dtype,
                chunk_elements,
            };
            let bar = crate::progress::Bar::new("library rebuild", quiet);
            let out = library::rebuild(&lib, &task, &output, &opts, &bar)?;
            if !quiet {
                eprintln!("wrote {}", out.display());
            }
            Ok(())
        }
        LibraryCommand::Info { library: lib, json } => {
            let opened = Library::open(&lib)?;
            print_info(&opened.manifest, &lib, json, &mut std::io::stdout().lock())
        }
        LibraryCommand::ExportLora {
            library: lib,
            task,
            output,
            rank,
            energy,
            base,
            exact,
            embed_lora,
            json,
            overwrite,
        } => {
            let opts = amalgam::ops::lora::ExtractOptions {
                rank,
                energy,
                exact,
                embed_lora,
                existing: crate::existing(overwrite),
                ..Default::default()
            };
            let bar = crate::progress::Bar::new("library export-lora", quiet);
            let report = library::export_lora(&lib, &task, base.as_deref(), &output, &opts, &bar)?;
            crate::print_extract(&report, json)
        }
    }
}

fn print_info(m: &Manifest, dir: &std::path::Path, json: bool, out: &mut dyn Write) -> Result<()> {
    let s = m.summary(dir);
    if json {
        serde_json::to_writer_pretty(&mut *out, &s)?;
        writeln!(out)?;
        return Ok(());
    }
    let h = crate::human_bytes;
    writeln!(
        out,
        "scheme {} over {} ({} parameters, {}), {} tasks",
        m.scheme,
        m.base.path,
        m.base.parameters,
        h(m.base.bytes),
        m.tasks.len()
    )?;
    writeln!(
        out,
        "{:<24} {:>12} {:>10} {:>12}",
        "task", "size", "bits/param", "rel. error"
    )?;
    for t in &m.tasks {
        let missing = if dir.join(&t.file).is_file() {
            ""
        } else {
            "  (file missing)"
        };
        writeln!(
            out,
            "{:<24} {:>12} {:>10.4} {:>12.3e}{missing}",
            t.name,
            h(t.bytes),
            t.bits_per_parameter,
            t.relative_error
        )?;
    }
    let total = s["total_bytes"].as_u64().unwrap_or(0);
    let full = s["full_models_bytes"].as_u64().unwrap_or(1).max(1);
    writeln!(
        out,
        "shared {} + tasks {} = {}, against {} for {} full models ({:.1} %); the base ({}) is needed too",
        h(m.shared_bytes),
        h(s["task_bytes"].as_u64().unwrap_or(0)),
        h(total),
        h(full),
        m.tasks.len(),
        100.0 * total as f64 / full as f64,
        h(m.base.bytes)
    )?;
    Ok(())
}
