//! `amalgam moe`: argument parsing and reporting around [`amalgam::moe`]; the router's forward
//! passes come from the evaluation crate.

use std::path::PathBuf;

use amalgam::moe::{self, Layout, PromptEncoder};
use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::progress;

/// The expert layout on disk.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayoutArg {
    /// What mergekit-moe 0.1.5 writes (transformers v5): Mixtral's and Qwen3-MoE's experts
    /// fused per layer.
    V5,
    /// One tensor per expert (`block_sparse_moe.experts.N.w1/w2/w3` for Mixtral), for
    /// llama.cpp's converters and transformers 4.
    Legacy,
}

/// `amalgam moe` arguments.
#[derive(Args)]
pub struct MoeArgs {
    /// The config (mergekit-moe's YAML: base_model, experts with source_model and prompts,
    /// gate_mode, experts_per_token, shared_experts, architecture, dtype).
    config: PathBuf,
    /// Output model directory.
    output: PathBuf,
    /// Print the output architecture and every output tensor with its sources; write nothing
    /// and run no forward pass.
    #[arg(long)]
    dry_run: bool,
    /// Expert tensor layout.
    #[arg(long, value_enum, default_value = "v5")]
    layout: LayoutArg,
    /// Seed of the `random`/`uniform_random` gates and of `noise_scale`.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Allow every expert to be the same model (useful only before training).
    #[arg(long, alias = "i-understand-this-is-not-useful-without-training")]
    allow_identical_experts: bool,
    /// Largest shard, mergekit's syntax: bytes, or a number with K, M, B (10^9): 5B, 500M.
    #[arg(long, value_parser = crate::parse_size, default_value = "5B")]
    out_shard_size: u64,
    /// Replace OUTPUT if it exists (only once the new model is complete).
    #[arg(long)]
    overwrite: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
}

/// Run `amalgam moe`.
pub fn run(args: MoeArgs, quiet: bool) -> Result<()> {
    let layout = match args.layout {
        LayoutArg::V5 => Layout::V5,
        LayoutArg::Legacy => Layout::Legacy,
    };
    let prepared = moe::prepare(
        &args.config,
        moe::PrepareOptions {
            layout,
            allow_identical: args.allow_identical_experts,
        },
    )?;
    if args.dry_run {
        use amalgam::progress::Progress as _;
        let bar = progress::Bar::new("moe", quiet);
        prepared.warnings.iter().for_each(|w| bar.warn(w));
        print!("{}", prepared.describe());
        return Ok(());
    }
    let opts = moe::MoeOptions {
        shard_size: Some(args.out_shard_size),
        existing: crate::existing(args.overwrite),
        seed: args.seed,
    };
    let bar = progress::Bar::new("moe", quiet);
    let report = moe::build(
        &prepared,
        &args.output,
        &opts,
        &mut |p| encoder(p, quiet),
        &bar,
    )?;
    if args.json {
        crate::print_json(&report)?;
    } else if !quiet {
        eprintln!(
            "wrote {} ({}, {} experts, gate_mode {})",
            report.output.display(),
            report.architecture,
            report.experts,
            report.gate_mode
        );
    }
    Ok(())
}

/// The base model's prompt encoder, with a counter of the forward pass's layers on stderr.
#[cfg(feature = "eval")]
fn encoder(prepared: &moe::Prepared, quiet: bool) -> amalgam::Result<Box<dyn PromptEncoder>> {
    let what = if prepared.config.gate_mode == moe::GateMode::CheapEmbed {
        "moe (gates: token embeddings)"
    } else {
        "moe (gates: forward passes of the base)"
    };
    let bar = progress::counter(what, prepared.layers as u64, "layers", quiet);
    let report = Box::new(move |done: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
            if done as u64 >= b.length().unwrap_or(0) {
                b.finish_and_clear();
            }
        }
    });
    amalgam_eval::moe_gate::encoder_for(prepared, report)
}

#[cfg(not(feature = "eval"))]
fn encoder(prepared: &moe::Prepared, _: bool) -> amalgam::Result<Box<dyn PromptEncoder>> {
    Err(prepared.config.error(format!(
        "gate_mode {} needs the base model's forward pass; this amalgam was built without the `eval` feature",
        prepared.config.gate_mode.name()
    )))
}
