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
}

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
    let ctx = Context {
        set,
        plan,
        seed: opts.seed,
        global: global.as_ref(),
        chunk,
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

/// Open the inputs of a merged tensor and hand them to `f` as a [`Source`].
fn with_source<R>(
    set: &ModelSet,
    inputs: &[plan::Input],
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
    f(&Source::new(set, inputs, &views, &entries)?)
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
        order.into_par_iter().with_max_len(1).try_for_each_init(
            Scratch::default,
            |scratch, i| -> Result<()> {
                crate::cancel::check()?;
                let (t, meta) = (merged[i], &jobs[i]);
                if let Some(mut acc) = wm.begin_tensor(pass, &global, i, meta) {
                    let Op::Merge { inputs, .. } = &t.op else {
                        unreachable!("merged tensors only")
                    };
                    with_source(set, inputs, |source| {
                        let bufs = buffers(&mut scratch.f32s, inputs.len());
                        for range in chunks(meta.numel(), step) {
                            crate::cancel::check()?;
                            source.read(range.clone(), bufs)?;
                            let job = MergeJob {
                                inputs: bufs.iter().map(|b| b.as_slice()).collect(),
                                ..meta.clone()
                            };
                            wm.observe_tensor(pass, &global, &job, range.start, &mut acc)?;
                        }
                        source.end_pass();
                        Ok(())
                    })?;
                    let mut m = model.lock().expect("no worker panics holding it");
                    wm.absorb(pass, &global, &mut m, i, acc);
                }
                progress.advance(meta.numel() as u64 * 4);
                Ok(())
            },
        )?;
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
    with_source(ctx.set, inputs, |source| match method.streaming(&meta) {
        Some(s) => {
            let step = ctx.step(s.granule(&meta));
            streamed(s, &meta, source, n, step, t, scratch, writer, index)
        }
        None => match method.lazy() {
            Some(l) => {
                let out = &mut buffers(&mut scratch.f32s, 1)[0];
                out.clear();
                out.resize(n, 0.0);
                l.merge(&meta, &WholeInputs { source, n }, out)?;
                emit(t, out, &mut scratch.bytes, writer, index, 0)
            }
            None => whole(method, &meta, source, n, t, scratch, writer, index),
        },
    })
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
            raw: std::cell::RefCell::new(vec![(0..0, Vec::new()); inputs.len()]),
        })
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
        let entry = self.entries[k];
        // A vocabulary cut to the smallest input reads each input's leading rows only.
        debug_assert!(range.end * size <= view.bytes.len());
        buf.clear();
        let available = view.bytes.len() / size;
        let (held, raw) = &mut self.raw.borrow_mut()[k];
        // Without a LoRA patch, the decode loop checks the values it writes.
        let patch = &self.patches[k];
        let mut finite = true;
        let mut pos = range.start;
        while pos < range.end {
            if !held.contains(&pos) {
                let end = (pos + READ_AHEAD).min(available);
                raw.resize((READ_AHEAD * size).div_ceil(8), 0);
                let bytes = &mut bytemuck::cast_slice_mut::<u64, u8>(raw)[..(end - pos) * size];
                self.model(k)
                    .read_at(entry.shard, entry.range.start + pos * size, bytes)?;
                *held = pos..end;
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
            return Err(Error::Numeric {
                name: self.inputs[k].tensor.clone(),
                reason: format!(
                    "input {} holds NaN or infinite values; fix or exclude that model",
                    self.model(k).path.display()
                ),
            });
        }
        Ok(())
    }

    /// The pass is over: later passes read the same (checked) bytes.
    fn end_pass(&self) {
        self.checked.set(true);
    }

    fn model(&self, k: usize) -> &crate::io::Model {
        self.set.file_of(&self.inputs[k]).0
    }
}

#[allow(clippy::too_many_arguments)]
fn streamed(
    s: &dyn Streaming,
    meta: &MergeJob,
    source: &Source,
    n: usize,
    step: usize,
    t: &PlannedTensor,
    scratch: &mut Scratch,
    writer: &ModelWriter,
    index: usize,
) -> Result<()> {
    let k = source.inputs.len();
    let mut state = s.begin(meta)?;
    for pass in 0..s.passes(&state) {
        for range in chunks(n, step) {
            crate::cancel::check()?;
            let bufs = buffers(&mut scratch.f32s, k);
            source.read(range.clone(), bufs)?;
            let job = MergeJob {
                inputs: bufs.iter().map(|b| b.as_slice()).collect(),
                ..meta.clone()
            };
            s.observe(pass, &job, range.start, &mut state)?;
        }
        source.end_pass();
        s.end_pass(pass, meta, &mut state)?;
    }
    let size = t.dtype.size() as u64;
    for range in chunks(n, step) {
        crate::cancel::check()?;
        let bufs = buffers(&mut scratch.f32s, k + 1);
        let (ins, rest) = bufs.split_at_mut(k);
        source.read(range.clone(), ins)?;
        let out = &mut rest[0];
        out.clear();
        out.resize(range.len(), 0.0);
        let job = MergeJob {
            inputs: ins.iter().map(|b| b.as_slice()).collect(),
            ..meta.clone()
        };
        s.apply(&job, range.start, &mut state, out)?;
        emit(
            t,
            out,
            &mut scratch.bytes,
            writer,
            index,
            range.start as u64 * size,
        )?;
    }
    source.end_pass();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn whole(
    method: &dyn crate::methods::Method,
    meta: &MergeJob,
    source: &Source,
    n: usize,
    t: &PlannedTensor,
    scratch: &mut Scratch,
    writer: &ModelWriter,
    index: usize,
) -> Result<()> {
    let k = source.inputs.len();
    let bufs = buffers(&mut scratch.f32s, k + 1);
    let (ins, rest) = bufs.split_at_mut(k);
    source.read(0..n, ins)?;
    source.end_pass();
    let out = &mut rest[0];
    out.clear();
    out.resize(n, 0.0);
    let job = MergeJob {
        inputs: ins.iter().map(|b| b.as_slice()).collect(),
        ..meta.clone()
    };
    method.merge(&job, out)?;
    emit(t, out, &mut scratch.bytes, writer, index, 0)
}

/// Check a computed part of output tensor `index` (a NaN or infinity from finite inputs is the
/// method's: inputs were checked as they were read), encode it and write it at byte `pos`.
fn emit(
    t: &PlannedTensor,
    out: &[f32],
    bytes: &mut Vec<u8>,
    writer: &ModelWriter,
    index: usize,
    pos: u64,
) -> Result<()> {
    if !crate::simd::all_finite(out) {
        return Err(Error::Numeric {
            name: t.name.clone(),
            reason: "the merge produced NaN or infinite values from finite inputs; check the parameters (e.g. weights summing to zero)".into(),
        });
    }
    encode_f32(t.dtype, out, bytes);
    writer.write_part(index, pos, bytes)
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
