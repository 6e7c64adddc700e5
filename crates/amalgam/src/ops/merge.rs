//! `merge`: carry out a merge config. Config → plan → executor → writer: the plan is built and
//! every output header written before any tensor data is read; then each worker decodes one
//! output's inputs to f32, runs the method, encodes the result and writes it in place.

use std::path::{Path, PathBuf};

use crate::config::MergeConfig;
use crate::dtype::encode_f32;
use crate::error::{Error, Result};
use crate::exec::{self, Scratch, buffers};
use crate::io::{Existing, ModelWriter, TensorSpec, modeldir};
use crate::methods::{Global, MergeJob, Streaming};
use crate::ops::source::{Source, WholeInputs, chunks, with_source};
use crate::plan::{self, ModelSet, Op, Plan, PlannedTensor};
use crate::progress::Progress;
use rayon::prelude::*;

/// Options for [`merge`].
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Shard byte budget (`None`: one file).
    pub shard_size: Option<u64>,
    /// What to do if the output exists.
    pub existing: Existing,
    /// Seed for random methods.
    pub seed: u64,
    /// Planning flags.
    pub plan: plan::PlanOptions,
    /// Elements per chunk for streamed methods (0: the default, 64K).
    pub chunk_elements: usize,
    /// Bytes, all worker threads together, for holding a tensor's inputs in memory between the
    /// passes of a method that reads them more than once (`None`: [`DEFAULT_INPUT_CACHE`]; 0: read
    /// them again from the files).
    pub input_cache: Option<u64>,
}

/// Default [`MergeOptions::input_cache`]: 512 MB.
pub const DEFAULT_INPUT_CACHE: u64 = 512_000_000;

/// Default chunk: 64K elements (256 KiB of f32 per input): smaller chunks cost more system calls
/// (output writes) than they save in cache misses.
const DEFAULT_CHUNK: usize = 1 << 16;

/// Load `config_path` and open its models; returns the config, the models and the plan.
pub fn prepare(
    config_path: &Path,
    opts: plan::PlanOptions,
) -> Result<(MergeConfig, ModelSet, Plan)> {
    let config = MergeConfig::load(config_path)?;
    let set = ModelSet::open(&config)?;
    let plan = plan::build(&config, &set, opts)?;
    Ok((config, set, plan))
}

/// Run the merge described by `config_path` into `output`.
pub fn merge(
    config_path: &Path,
    output: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let (config, set, plan) = prepare(config_path, opts.plan)?;
    plan.warnings.iter().for_each(|w| progress.warn(w));
    execute(&config, &set, &plan, output, opts, progress)
}

/// Execute a prepared plan.
pub fn execute(
    config: &MergeConfig,
    set: &ModelSet,
    plan: &Plan,
    output: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let specs = plan
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    let chunk = if opts.chunk_elements == 0 {
        DEFAULT_CHUNK
    } else {
        opts.chunk_elements
    };
    let global = whole_model(set, plan, opts.seed, chunk, progress)?;
    let cache = opts.input_cache.unwrap_or(DEFAULT_INPUT_CACHE);
    let hold = cache / rayon::current_num_threads() as u64;
    let ctx = Context {
        set,
        plan,
        seed: opts.seed,
        global: global.as_ref(),
        chunk,
        hold: usize::try_from(hold).unwrap_or(usize::MAX),
    };
    exec::run(&writer, progress, |i, scratch| {
        produce(&ctx, &plan.tensors[i], scratch, &writer, i)
    })?;
    write_side_files(config, set, plan, writer.staging_dir())?;
    set.check_unchanged()?;
    writer.finish()
}

/// What every tensor's production shares.
struct Context<'a> {
    set: &'a ModelSet,
    plan: &'a Plan,
    seed: u64,
    global: Option<&'a Global>,
    chunk: usize,
    /// Bytes per worker for holding a tensor's inputs between passes.
    hold: usize,
}

impl<'a> Context<'a> {
    /// The job of a merged tensor, without inputs.
    fn meta(&self, t: &'a PlannedTensor) -> Option<MergeJob<'a>> {
        t.job(self.seed, self.global)
    }

    /// Chunk length for a method whose chunks hold whole granules.
    fn step(&self, granule: usize) -> usize {
        let granule = granule.max(1);
        (self.chunk / granule).max(1) * granule
    }
}

/// Run the method's whole-model passes, if it has any: each pass streams every participating
/// tensor (in parallel, largest first) and folds its accumulator into the model's.
fn whole_model(
    set: &ModelSet,
    plan: &Plan,
    seed: u64,
    chunk: usize,
    progress: &dyn Progress,
) -> Result<Option<Global>> {
    let Some(wm) = plan.method.whole_model() else {
        return Ok(None);
    };
    let ctx = Context {
        set,
        plan,
        seed,
        global: None,
        chunk,
        hold: 0,
    };
    let merged: Vec<&PlannedTensor> = plan
        .tensors
        .iter()
        .filter(|t| matches!(t.op, Op::Merge { .. }))
        .collect();
    let jobs: Vec<MergeJob> = merged.iter().filter_map(|t| ctx.meta(t)).collect();
    let Some(mut global) = wm.begin_model(&jobs)? else {
        return Ok(None);
    };
    let step = ctx.step(1);
    let passes = wm.model_passes(&global);
    for pass in 0..passes {
        progress.stage(&format!("whole-model pass {}/{passes}", pass + 1));
        let model = std::sync::Mutex::new(wm.begin_pass(pass, &global));
        let total: u64 = jobs.iter().map(|j| j.numel() as u64).sum();
        progress.start(merged.len() as u64, total * 4);
        let mut order: Vec<usize> = (0..merged.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].numel()));
        let scratch = exec::PerThread::new();
        order
            .into_par_iter()
            .with_max_len(1)
            .try_for_each(|i| -> Result<()> {
                scratch.with(|scratch| {
                    crate::cancel::check()?;
                    let (t, meta) = (merged[i], &jobs[i]);
                    if let Some(mut acc) = wm.begin_tensor(pass, &global, i, meta) {
                        let Op::Merge { inputs, .. } = &t.op else {
                            unreachable!("merged tensors only")
                        };
                        with_source(set, inputs, &mut scratch.raw, |source| {
                            let bufs = buffers(&mut scratch.f32s, inputs.len());
                            for range in chunks(meta.numel(), step) {
                                crate::cancel::check()?;
                                source.chunk(meta, range.clone(), false, bufs, |job| {
                                    wm.observe_tensor(pass, &global, job, range.start, &mut acc)
                                })?;
                            }
                            source.end_pass();
                            Ok(())
                        })?;
                        let mut m = model.lock().expect("no worker panics holding it");
                        wm.absorb(pass, &global, &mut m, i, acc);
                    }
                    progress.advance(meta.numel() as u64 * 4);
                    Ok(())
                })
            })?;
        let model = model.into_inner().expect("no worker panics holding it");
        wm.end_model_pass(pass, &mut global, model)?;
    }
    progress.stage("");
    Ok(Some(global))
}

fn produce(
    ctx: &Context,
    t: &PlannedTensor,
    scratch: &mut Scratch,
    writer: &ModelWriter,
    index: usize,
) -> Result<()> {
    let Some(meta) = ctx.meta(t) else {
        let Op::CopyBuffer { inputs } = &t.op else {
            unreachable!("merged tensors have a job")
        };
        return copy_buffer(ctx.set, t, inputs, writer, index);
    };
    let Op::Merge { inputs, .. } = &t.op else {
        unreachable!("only merged tensors have a job")
    };
    let n = meta.numel();
    let method = ctx.plan.method;
    let Scratch { f32s, bytes, raw } = scratch;
    let mut out = Out {
        t,
        writer,
        index,
        bytes,
    };
    with_source(ctx.set, inputs, raw, |source| {
        match method.streaming(&meta) {
            Some(s) => {
                let step = ctx.step(s.granule(&meta));
                streamed(s, &meta, source, step, ctx.hold, f32s, out)
            }
            None => match method.lazy() {
                Some(l) => {
                    let merged = &mut buffers(f32s, 1)[0];
                    merged.clear();
                    merged.resize(n, 0.0);
                    l.merge(&meta, &WholeInputs { source, n }, merged)?;
                    out.emit(merged, 0)
                }
                None => whole(method, &meta, source, f32s, out),
            },
        }
    })
}

/// Where a merged tensor goes: output tensor `index` of `writer`, encoded through `bytes`.
struct Out<'a> {
    t: &'a PlannedTensor,
    writer: &'a ModelWriter,
    index: usize,
    bytes: &'a mut Vec<u8>,
}

impl Out<'_> {
    /// Check a computed part of the tensor, the one that starts at element `start` (a NaN or
    /// infinity from finite inputs is the method's: inputs were checked as they were read),
    /// encode it and write it in place.
    fn emit(&mut self, out: &[f32], start: usize) -> Result<()> {
        if !crate::simd::all_finite(out) {
            return Err(Error::Numeric {
                name: self.t.name.clone(),
                reason: "the merge produced NaN or infinite values from finite inputs; check the parameters (e.g. weights summing to zero)".into(),
            });
        }
        encode_f32(self.t.dtype, out, self.bytes);
        let pos = (start * self.t.dtype.size()) as u64;
        self.writer.write_part(self.index, pos, self.bytes)
    }
}

fn streamed(
    s: &dyn Streaming,
    meta: &MergeJob,
    source: &Source,
    step: usize,
    hold: usize,
    f32s: &mut Vec<Vec<f32>>,
    mut out: Out,
) -> Result<()> {
    let (k, n) = (source.inputs.len(), meta.numel());
    let mut state = s.begin(meta)?;
    let passes = s.passes(&state);
    if passes > 0 {
        source.hold(n, hold);
    }
    let all_bf16 = source.all_bf16();
    for pass in 0..passes {
        let bf16 = all_bf16 && s.reads_bf16(pass, meta, &state);
        for range in chunks(n, step) {
            crate::cancel::check()?;
            source.chunk(meta, range.clone(), bf16, buffers(f32s, k), |job| {
                s.observe(pass, job, range.start, &mut state)
            })?;
        }
        source.end_pass();
        s.end_pass(pass, meta, &mut state)?;
    }
    let bf16 = all_bf16 && s.reads_bf16(passes, meta, &state);
    for range in chunks(n, step) {
        crate::cancel::check()?;
        let bufs = buffers(f32s, k + 1);
        let (ins, rest) = bufs.split_at_mut(k);
        let merged = &mut rest[0];
        // `apply` writes every element: no zeroing, only the growth of the buffer is filled.
        merged.resize(range.len(), 0.0);
        if cfg!(debug_assertions) {
            merged.fill(f32::NAN);
        }
        source.chunk(meta, range.clone(), bf16, ins, |job| {
            s.apply(job, range.start, &mut state, merged)
        })?;
        out.emit(merged, range.start)?;
    }
    source.end_pass();
    Ok(())
}

fn whole(
    method: &dyn crate::methods::Method,
    meta: &MergeJob,
    source: &Source,
    f32s: &mut Vec<Vec<f32>>,
    mut out: Out,
) -> Result<()> {
    let (k, n) = (source.inputs.len(), meta.numel());
    let bufs = buffers(f32s, k + 1);
    let (ins, rest) = bufs.split_at_mut(k);
    source.read(0..n, ins)?;
    source.end_pass();
    let merged = &mut rest[0];
    merged.clear();
    merged.resize(n, 0.0);
    let job = MergeJob {
        inputs: ins.iter().map(|b| b.as_slice()).collect(),
        ..meta.clone()
    };
    method.merge(&job, merged)?;
    out.emit(merged, 0)
}

fn copy_buffer(
    set: &ModelSet,
    t: &PlannedTensor,
    inputs: &[plan::Input],
    writer: &ModelWriter,
    index: usize,
) -> Result<()> {
    let first = set.tensor_of(&inputs[0])?;
    for i in &inputs[1..] {
        let other = set.tensor_of(i)?;
        if other.dtype != first.dtype || other.bytes != first.bytes {
            return Err(Error::Numeric {
                name: t.name.clone(),
                reason: format!(
                    "non-float buffer differs between {} and {}; make them agree before merging",
                    set.models[inputs[0].model].path.display(),
                    set.models[i.model].path.display()
                ),
            });
        }
    }
    writer.write(index, first.bytes)
}

fn write_side_files(config: &MergeConfig, set: &ModelSet, plan: &Plan, dir: &Path) -> Result<()> {
    let donor = &set.models[plan.donor];
    if let Some(cfg) = &plan.out_config {
        let path = dir.join("config.json");
        let text = serde_json::to_vec_pretty(cfg).expect("json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    match &plan.alignment {
        // The aligned vocabulary's tokenizer; of the source's other files only those that do
        // not list the vocabulary.
        Some(a) => {
            a.write(dir)?;
            modeldir::copy_present(
                &a.config_from,
                dir,
                &["chat_template.jinja", "chat_template.json"],
            )?;
        }
        None => {
            modeldir::copy_present(&donor.dir, dir, modeldir::TOKENIZER_FILES)?;
        }
    }
    modeldir::copy_present(&donor.dir, dir, &modeldir::CONFIG_FILES[1..])?;
    if let Some(template) = &config.chat_template {
        crate::chat_template::apply(config, set, dir, template)?;
    }
    Ok(())
}
