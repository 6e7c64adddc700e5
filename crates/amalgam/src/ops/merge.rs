//! `merge`: carry out a merge config. Config → plan → executor → writer: the plan is built and
//! every output header written before any tensor data is read; then each worker decodes one
//! output's inputs to f32, runs the method, encodes the result and writes it in place.

use std::path::{Path, PathBuf};

use crate::config::MergeConfig;
use crate::dtype::{decode_f32_append, decode_f32_append_finite, encode_f32};
use crate::error::{Error, Result};
use crate::exec::{self, Scratch, buffers};
use crate::io::{Existing, ModelWriter, TensorEntry, TensorSpec, TensorView, modeldir};
use crate::methods::{Global, Inputs, MergeJob, Streaming};
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
        match &t.op {
            Op::CopyBuffer { .. } => None,
            Op::Merge {
                base,
                shared,
                per_input,
                ..
            } => Some(MergeJob {
                name: &t.name,
                shape: &t.shape,
                inputs: Vec::new(),
                bf16: Vec::new(),
                base: *base,
                shared,
                per_input,
                seed: self.seed,
                global: self.global,
            }),
        }
    }

    /// Chunk length for a method whose chunks hold whole granules.
    fn step(&self, granule: usize) -> usize {
        let granule = granule.max(1);
        (self.chunk / granule).max(1) * granule
    }
}

/// Open the inputs of a merged tensor and hand them to `f` as a [`Source`] whose raw byte
/// buffers come from (and go back to) the worker's `pool`.
fn with_source<R>(
    set: &ModelSet,
    inputs: &[plan::Input],
    pool: &mut Vec<Vec<u64>>,
    f: impl FnOnce(&Source) -> Result<R>,
) -> Result<R> {
    let views: Vec<TensorView> = inputs
        .iter()
        .map(|i| set.tensor_of(i))
        .collect::<Result<_>>()?;
    let entries: Vec<&TensorEntry> = inputs
        .iter()
        .map(|i| set.entry_of(i))
        .collect::<Result<_>>()?;
    let mut raw = std::mem::take(pool);
    raw.resize_with(inputs.len().max(raw.len()), Vec::new);
    let source = Source::new(set, inputs, &views, &entries, raw)?;
    let result = f(&source);
    *pool = source
        .raw
        .into_inner()
        .into_iter()
        .map(|(_, buf)| buf)
        .collect();
    result
}

/// Elements `range` of an input as bf16 bits, from its raw buffer holding elements `held`.
fn bf16_part<'b>(
    held: &std::ops::Range<usize>,
    buf: &'b [u64],
    range: &std::ops::Range<usize>,
) -> &'b [u16] {
    &bytemuck::cast_slice::<u64, u16>(buf)[range.start - held.start..range.end - held.start]
}

/// Chunks of `step` elements covering `0..n` (one empty chunk when `n` is 0).
fn chunks(n: usize, step: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n.max(1))
        .step_by(step)
        .map(move |a| a..(a + step).min(n))
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

/// The inputs of one output tensor, read chunk by chunk with positioned reads into a small
/// read-ahead buffer per input (nothing stays mapped, so resident memory is the workers' buffers
/// however large the model), decoded to f32 and checked.
struct Source<'a> {
    set: &'a ModelSet,
    inputs: &'a [plan::Input],
    views: &'a [TensorView<'a>],
    entries: &'a [&'a TensorEntry],
    /// Whether a whole pass has read (and so checked) every input already.
    checked: std::cell::Cell<bool>,
    /// Per input: the LoRA delta of a `model+adapter` input (module and decoded factors).
    patches: Vec<Option<Patch<'a>>>,
    /// Scratch rows of a delta.
    rows: std::cell::RefCell<(Vec<f32>, Vec<f32>)>,
    /// Per input: the elements read ahead and their raw bytes (u64s, so any dtype's view of
    /// them is aligned).
    raw: std::cell::RefCell<Vec<(std::ops::Range<usize>, Vec<u64>)>>,
    /// Whether the raw buffers hold the inputs' first elements, up to this many, as they are
    /// read, so later passes read memory instead of the files ([`Source::hold`]).
    held: std::cell::Cell<Option<usize>>,
}

/// Elements per positioned read: 64K (128 KiB of bf16). Larger reads cost fewer system calls
/// but copy into a buffer that no longer stays in cache (measured: 512 KiB reads were slower).
const READ_AHEAD: usize = 1 << 16;

/// A LoRA delta added to one input as it is read.
enum Patch<'a> {
    /// A module's `s·B·A` from its decoded factors.
    Factors {
        module: &'a crate::lora::Module,
        a: Vec<f32>,
        b: Vec<f32>,
    },
    /// A bias delta `s·b` (PEFT's `lora_bias`).
    Bias(Vec<f32>),
}

impl Patch<'_> {
    /// Add the delta of elements `range` (row-major) to `buf`. Whole rows are computed the same
    /// way whatever the chunking, so results do not depend on it.
    fn add(&self, range: std::ops::Range<usize>, buf: &mut [f32], rows: &mut (Vec<f32>, Vec<f32>)) {
        let (module, a, b) = match self {
            Patch::Bias(delta) => {
                for (x, d) in buf.iter_mut().zip(&delta[range]) {
                    *x += d;
                }
                return;
            }
            Patch::Factors { module, a, b } => (module, a, b),
        };
        let cols = module.shape[1];
        if cols == 0 || range.is_empty() {
            return;
        }
        let (r0, r1) = (range.start / cols, range.end.div_ceil(cols));
        let (delta, acc) = rows;
        delta.clear();
        delta.resize((r1 - r0) * cols, 0.0);
        module.add_delta_rows(a, b, 1.0, r0..r1, delta, acc);
        let skip = range.start - r0 * cols;
        for (x, d) in buf.iter_mut().zip(&delta[skip..]) {
            *x += d;
        }
    }
}

/// A lazy method's view of the inputs: each read decodes one whole input and checks it.
struct WholeInputs<'a, 'b> {
    source: &'b Source<'a>,
    n: usize,
}

impl Inputs for WholeInputs<'_, '_> {
    fn read(&self, k: usize, buf: &mut Vec<f32>) -> Result<()> {
        self.source.read_input(k, 0..self.n, buf, true)
    }
}

impl<'a> Source<'a> {
    fn new(
        set: &'a ModelSet,
        inputs: &'a [plan::Input],
        views: &'a [TensorView<'a>],
        entries: &'a [&'a TensorEntry],
        raw: Vec<Vec<u64>>,
    ) -> Result<Self> {
        let patches = inputs
            .iter()
            .map(|i| {
                let Some(adapter) = &set.adapters[i.model] else {
                    return Ok(None);
                };
                if let Some(module) = adapter.modules.get(&i.tensor) {
                    let (a, b) = adapter.factors(module)?;
                    return Ok(Some(Patch::Factors { module, a, b }));
                }
                Ok(adapter.bias_delta(&i.tensor)?.map(Patch::Bias))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Source {
            set,
            inputs,
            views,
            entries,
            checked: std::cell::Cell::new(false),
            patches,
            rows: Default::default(),
            raw: std::cell::RefCell::new(raw.into_iter().map(|b| (0..0, b)).collect()),
            held: std::cell::Cell::new(None),
        })
    }

    /// Keep elements `0..n` of every input in memory as the next pass reads them (in order,
    /// from the start), for the passes after it, if their raw bytes fit in `budget`.
    fn hold(&self, n: usize, budget: usize) {
        let bytes: usize = self.views.iter().map(|v| n * v.dtype.size()).sum();
        if bytes > budget {
            return;
        }
        for ((held, raw), view) in self.raw.borrow_mut().iter_mut().zip(self.views) {
            *held = 0..0;
            let words = (n * view.dtype.size()).div_ceil(8);
            // Grown, never shrunk: the buffers are the worker's from one tensor to the next.
            if raw.len() < words {
                raw.resize(words, 0);
            }
        }
        self.held.set(Some(n));
    }

    /// Decode elements `range` of every input into `bufs`. In the first pass, an input holding
    /// NaN or infinity is an error naming its file and tensor (later passes read the same bytes).
    fn read(&self, range: std::ops::Range<usize>, bufs: &mut [Vec<f32>]) -> Result<()> {
        let check = !self.checked.get();
        for (k, buf) in bufs.iter_mut().enumerate() {
            self.read_input(k, range.clone(), buf, check)?;
        }
        Ok(())
    }

    /// Decode elements `range` of input `k` into `buf`.
    fn read_input(
        &self,
        k: usize,
        range: std::ops::Range<usize>,
        buf: &mut Vec<f32>,
        check: bool,
    ) -> Result<()> {
        let view = &self.views[k];
        let size = view.dtype.size();
        buf.clear();
        let (held, raw) = &mut self.raw.borrow_mut()[k];
        // Without a LoRA patch, the decode loop checks the values it writes.
        let patch = &self.patches[k];
        let mut finite = true;
        let mut pos = range.start;
        while pos < range.end {
            if !held.contains(&pos) {
                self.load(k, pos, READ_AHEAD, held, raw)?;
            }
            let upto = range.end.min(held.end);
            let from = (pos - held.start) * size;
            let bytes = &bytemuck::cast_slice::<u64, u8>(raw)[from..from + (upto - pos) * size];
            if check && patch.is_none() {
                finite &= decode_f32_append_finite(view.dtype, bytes, buf);
            } else {
                decode_f32_append(view.dtype, bytes, buf);
            }
            pos = upto;
        }
        if let Some(p) = patch {
            p.add(range.clone(), buf, &mut self.rows.borrow_mut());
            finite = !check || crate::simd::all_finite(buf);
        }
        if !finite {
            return Err(self.not_finite(k));
        }
        Ok(())
    }

    /// Read input `k` from element `pos` on, `len` elements (fewer at the end), into its raw
    /// buffer: a held input grows its prefix up to there (passes read in order), any other
    /// gets a new window.
    fn load(
        &self,
        k: usize,
        pos: usize,
        len: usize,
        held: &mut std::ops::Range<usize>,
        raw: &mut Vec<u64>,
    ) -> Result<()> {
        let view = &self.views[k];
        let size = view.dtype.size();
        let entry = self.entries[k];
        // A vocabulary cut to the smallest input reads each input's leading rows only.
        let available = view.bytes.len() / size;
        let (start, from, end) = match self.held.get() {
            Some(n) => (0, held.end, (pos + len).min(n)),
            None => (pos, pos, (pos + len).min(available)),
        };
        let words = ((end - start) * size).div_ceil(8);
        if raw.len() < words {
            raw.resize(words.max((READ_AHEAD * size).div_ceil(8)), 0);
        }
        let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(raw)
            [(from - start) * size..(end - start) * size];
        self.model(k)
            .read_at(entry.shard, entry.range.start + from * size, bytes)?;
        *held = start..end;
        Ok(())
    }

    /// Whether every input is stored as bf16 and read as is (no LoRA delta to add).
    fn all_bf16(&self) -> bool {
        self.views
            .iter()
            .all(|v| v.dtype == crate::dtype::DType::BF16)
            && self.patches.iter().all(Option::is_none)
    }

    /// Call `f` with elements `range` of every input as bf16 bits, straight from the read
    /// buffers ([`all_bf16`](Self::all_bf16) must hold). In the first pass, an input holding
    /// NaN or infinity is an error, as in [`read`](Self::read).
    fn with_bf16<R>(
        &self,
        range: std::ops::Range<usize>,
        f: impl FnOnce(Vec<&[u16]>) -> Result<R>,
    ) -> Result<R> {
        let check = !self.checked.get();
        let mut raw = self.raw.borrow_mut();
        for (k, (held, buf)) in raw.iter_mut().enumerate().take(self.inputs.len()) {
            if !(held.start <= range.start && range.end <= held.end) {
                self.load(k, range.start, READ_AHEAD.max(range.len()), held, buf)?;
            }
            // Checked input by input, while its bytes just read are still in cache.
            if check && !crate::dtype::bf16_all_finite(bf16_part(held, buf, &range)) {
                return Err(self.not_finite(k));
            }
        }
        let parts = raw
            .iter()
            .take(self.inputs.len())
            .map(|(held, buf)| bf16_part(held, buf, &range))
            .collect();
        f(parts)
    }

    /// Hand elements `range` of the inputs to `f` as a chunk of `meta`: as bf16 bits straight
    /// from the read buffers when `bf16` (see [`with_bf16`](Self::with_bf16)), else decoded
    /// into `bufs`.
    fn chunk<R>(
        &self,
        meta: &MergeJob,
        range: std::ops::Range<usize>,
        bf16: bool,
        bufs: &mut [Vec<f32>],
        f: impl FnOnce(&MergeJob) -> Result<R>,
    ) -> Result<R> {
        if bf16 {
            return self.with_bf16(range, |bits| {
                f(&MergeJob {
                    bf16: bits,
                    ..meta.clone()
                })
            });
        }
        self.read(range, bufs)?;
        f(&MergeJob {
            inputs: bufs.iter().map(|b| b.as_slice()).collect(),
            ..meta.clone()
        })
    }

    /// The error for input `k` holding NaN or infinity.
    fn not_finite(&self, k: usize) -> Error {
        Error::Numeric {
            name: self.inputs[k].tensor.clone(),
            reason: format!(
                "input {} holds NaN or infinite values; fix or exclude that model",
                self.model(k).path.display()
            ),
        }
    }

    /// The pass is over: later passes read the same (checked) bytes.
    fn end_pass(&self) {
        self.checked.set(true);
    }

    fn model(&self, k: usize) -> &crate::io::Model {
        self.set.file_of(&self.inputs[k]).0
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
    let tokenizer_from = tokenizer_source(config, set)?.unwrap_or(plan.donor);
    let src = &set.models[tokenizer_from].dir;
    modeldir::copy_present(src, dir, modeldir::TOKENIZER_FILES)?;
    modeldir::copy_present(&donor.dir, dir, &modeldir::CONFIG_FILES[1..])?;
    if let Some(template) = &config.chat_template {
        crate::chat_template::apply(config, set, dir, template)?;
    }
    Ok(())
}

fn tokenizer_source(config: &MergeConfig, set: &ModelSet) -> Result<Option<usize>> {
    let source = config
        .tokenizer
        .as_ref()
        .map(|t| t.source.clone())
        .or(config.tokenizer_source.clone());
    match source.as_deref() {
        None => Ok(None),
        Some("base") => Ok(config.base_model.as_ref().map(|b| set.index(b))),
        Some(m) => set
            .refs
            .iter()
            .position(|r| r.0 == m)
            .map(Some)
            .ok_or_else(|| {
                config.error(format!(
                    "tokenizer source '{m}' is not one of the models in the config"
                ))
            }),
    }
}
