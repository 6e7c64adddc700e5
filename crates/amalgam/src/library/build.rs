//! `library build`: config → plan (the scheme's parameters resolved per tensor and task by the
//! merge planner) → the executor's input side, one tensor per worker → the scheme → the shared
//! parts written in place, the task parts spilled, then each task's file and the manifest.
//! Everything is assembled in a staging directory beside the target and renamed into place at
//! the end: an interrupted or failed build leaves no library behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use super::config::LibraryConfig;
use super::format::{self, BaseInfo, BaseTensor, Manifest, TaskFiles, TaskInfo};
use super::scheme::{self, Encoded, MergeBlock, Scheme, TaskStats, TensorInputs};
use crate::config::Parameters;
use crate::dtype::{DType, encode_f32};
use crate::error::{Error, Result};
use crate::exec::{self, Scratch, buffers};
use crate::io::{Existing, ModelWriter, TensorSpec};
use crate::methods::{MergeJob, Method};
use crate::ops::source::{Source, chunks, with_source};
use crate::plan::{self, ModelSet, Op, Plan, PlannedTensor};
use crate::progress::Progress;

/// Options for [`build`].
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// What to do if the library exists.
    pub existing: Existing,
    /// Seed (randomized SVDs).
    pub seed: u64,
    /// Elements per chunk of streamed schemes (0: 64K).
    pub chunk_elements: usize,
    /// Bytes, all workers together, for holding a tensor's inputs between passes (`None`:
    /// the merge default).
    pub input_cache: Option<u64>,
    /// Shard size of the shared parts (`None`: one file).
    pub shard_size: Option<u64>,
}

/// What one tensor's encoding leaves for the manifest.
#[derive(Default)]
struct TensorResult {
    hash: String,
    stats: Vec<TaskStats>,
    shared_hashes: Vec<(String, String)>,
}

/// Everything the per-tensor work shares.
struct Job<'a> {
    scheme: &'static dyn Scheme,
    set: &'a ModelSet,
    plan: &'a Plan,
    /// The merged model's plan, parallel to `plan`, for schemes that build on one.
    merged: Option<&'a Plan>,
    /// Per tensor: its first shared spec and how many.
    shared: Vec<(usize, usize)>,
    writer: &'a ModelWriter,
    tasks: &'a TaskFiles,
    seed: u64,
    chunk: usize,
    hold: usize,
    results: Vec<Mutex<TensorResult>>,
}

/// Build the library `config_path` describes into `lib`; returns its manifest.
pub fn build(
    config_path: &Path,
    lib: &Path,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let cfg = LibraryConfig::load(config_path)?;
    let scheme = scheme::get(&cfg.scheme).map_err(|e| cfg.error(e))?;
    check_names(&cfg, scheme)?;
    if cfg.base_model.0.contains('+') && !Path::new(&cfg.base_model.0).exists() {
        return Err(cfg.error(
            "the base model cannot be a model+adapter reference: bake it first with `amalgam lora apply`",
        ));
    }
    let out_dtype = cfg
        .out_dtype
        .as_deref()
        .map(|d| {
            DType::parse_float(d).ok_or_else(|| {
                cfg.error(format!(
                    "out_dtype: '{d}' is not a float dtype; use bfloat16, float16, float32 or float64"
                ))
            })
        })
        .transpose()?;
    let mcfg = cfg.as_merge(&cfg.scheme, &cfg.parameters, true);
    let set = ModelSet::open(&mcfg)?;
    let method: &'static dyn Method = scheme;
    let plan = plan::build_with(&mcfg, &set, plan::PlanOptions::default(), method)?;
    let merged = merged_plan(&cfg, scheme, &set, &plan)?;
    let metas: Vec<Option<MergeJob>> = plan.tensors.iter().map(|t| meta(t, opts.seed)).collect();
    for m in metas.iter().flatten() {
        scheme.check(m).map_err(|e| cfg.error(e))?;
    }
    let mut specs = Vec::new();
    let mut shared = Vec::with_capacity(plan.tensors.len());
    for (t, m) in plan.tensors.iter().zip(&metas) {
        let parts = m
            .as_ref()
            .map(|m| scheme.shared_parts(m, out_dtype.unwrap_or(t.dtype)))
            .unwrap_or_default();
        shared.push((specs.len(), parts.len()));
        specs.extend(parts.into_iter().map(|p| TensorSpec {
            name: format::part_name(&t.name, p.suffix),
            dtype: p.dtype,
            shape: p.shape,
        }));
    }
    let has_shared = !specs.is_empty();
    let writer =
        ModelWriter::create_named(lib, specs, opts.shard_size, opts.existing, format::SHARED)?;
    let names: Vec<String> = cfg.tasks.iter().map(|t| t.name.clone()).collect();
    let tasks = TaskFiles::create(&writer.staging_dir().join("tasks"), &names)?;
    let cache = opts
        .input_cache
        .unwrap_or(crate::ops::merge::DEFAULT_INPUT_CACHE);
    let job = Job {
        scheme,
        set: &set,
        plan: &plan,
        merged: merged.as_ref(),
        shared,
        writer: &writer,
        tasks: &tasks,
        seed: opts.seed,
        chunk: if opts.chunk_elements == 0 {
            1 << 16
        } else {
            opts.chunk_elements
        },
        hold: usize::try_from(cache / rayon::current_num_threads() as u64).unwrap_or(usize::MAX),
        results: plan.tensors.iter().map(|_| Default::default()).collect(),
    };
    let sizes: Vec<u64> = plan
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64 * 4)
        .collect();
    exec::for_each(&sizes, progress, |i, scratch| tensor(&job, i, scratch))?;
    let results: Vec<TensorResult> = job
        .results
        .into_iter()
        .map(|r| r.into_inner().expect("no panics holding it"))
        .collect();
    let manifest = finish_manifest(
        &cfg, scheme, &set, &plan, out_dtype, &results, tasks, &writer,
    )?;
    if !has_shared {
        let empty = writer
            .staging_dir()
            .join(format!("{}.safetensors", format::SHARED));
        std::fs::remove_file(&empty).map_err(|e| Error::io(&empty, e))?;
    }
    set.check_unchanged()?;
    writer.finish()?;
    Ok(manifest)
}

/// Every parameter name the config sets must be one of the scheme's.
fn check_names(cfg: &LibraryConfig, scheme: &dyn Scheme) -> Result<()> {
    let valid: Vec<&str> = scheme.spec().params.iter().map(|p| p.name).collect();
    let scopes = std::iter::once(&cfg.parameters).chain(cfg.tasks.iter().map(|t| &t.parameters));
    for p in scopes {
        if let Some(bad) = p.names().find(|n| !valid.contains(n)) {
            return Err(cfg.error(format!(
                "parameter '{bad}' is not one of scheme {}'s: {}",
                scheme.spec().name,
                if valid.is_empty() {
                    "it takes none".to_string()
                } else {
                    valid.join(", ")
                }
            )));
        }
    }
    match (scheme.merge_block(), &cfg.merge) {
        (MergeBlock::Required, None) => Err(cfg.error(format!(
            "scheme {} needs a 'merge:' block naming its shared model's merge_method and parameters",
            scheme.spec().name
        ))),
        (MergeBlock::No | MergeBlock::Optional, Some(_)) => Err(cfg.error(format!(
            "scheme {} takes no 'merge:' block",
            scheme.spec().name
        ))),
        _ => Ok(()),
    }
}

/// The merged model's plan for schemes that build on one: the config's `merge:` block, or
/// TALL's `merged: ties` (TIES with its `density`, the disjoint sum, weights 1).
fn merged_plan(
    cfg: &LibraryConfig,
    scheme: &dyn Scheme,
    set: &ModelSet,
    plan: &Plan,
) -> Result<Option<Plan>> {
    let first = plan.tensors.iter().find_map(|t| match &t.op {
        Op::Merge { shared, .. } => Some(shared),
        Op::CopyBuffer { .. } => None,
    });
    let mcfg = match (&cfg.merge, first) {
        (Some(m), _) => {
            // Weights 1 unless the block says otherwise (mergekit requires one per model).
            let mut raw = cfg
                .raw_merge()
                .and_then(|b| b.get("parameters").cloned())
                .unwrap_or_else(|| serde_json::json!({}));
            if let Some(obj) = raw.as_object_mut() {
                obj.entry("weight").or_insert(serde_json::json!(1.0));
            }
            let params: Parameters = serde_json::from_value(raw)
                .map_err(|e| cfg.error(format!("merge: parameters: {e}")))?;
            cfg.as_merge(&m.merge_method, &params, false)
        }
        (None, Some(shared))
            if scheme.merge_block() == MergeBlock::Optional
                && shared.choice("merged") == "ties" =>
        {
            let params: Parameters = serde_json::from_value(serde_json::json!({
                "density": shared.f("density"),
                "normalize": false,
                "weight": 1.0,
            }))
            .expect("valid parameters");
            cfg.as_merge("ties", &params, false)
        }
        _ => return Ok(None),
    };
    let merged = plan::build(&mcfg, set, plan::PlanOptions::default())?;
    let jobs: Vec<MergeJob> = merged.tensors.iter().filter_map(|t| meta(t, 0)).collect();
    let whole = match merged.method.whole_model() {
        Some(wm) => wm.begin_model(&jobs)?.is_some(),
        None => false,
    };
    drop(jobs);
    if whole {
        return Err(cfg.error(format!(
            "merge_method {} needs whole-model passes, which a library's merged model does not run; pick a per-tensor method",
            merged.method.spec().name
        )));
    }
    let same = merged.tensors.len() == plan.tensors.len()
        && merged
            .tensors
            .iter()
            .zip(&plan.tensors)
            .all(|(a, b)| a.name == b.name);
    if !same {
        return Err(cfg.error("the merged model's tensors do not match the library's"));
    }
    Ok(Some(merged))
}

/// The job of a float tensor, without inputs; `None` for buffers copied as they are.
fn meta(t: &PlannedTensor, seed: u64) -> Option<MergeJob<'_>> {
    t.job(seed, None)
}

/// The base's input of a planned tensor (the planner appends the base after the tasks).
fn base_input(t: &PlannedTensor) -> &plan::Input {
    match &t.op {
        Op::Merge { inputs, base, .. } => &inputs[base.expect("contract: a base")],
        Op::CopyBuffer { inputs } => inputs.last().expect("inputs"),
    }
}

/// BLAKE3 of tensor `t`'s base bytes as stored, read from its memory map.
fn base_hash(job: &Job, t: &PlannedTensor) -> Result<String> {
    let base = base_input(t);
    let (model, name) = job.set.file_of(base);
    let hash = format::hash(job.set.tensor_of(base)?.bytes);
    model.release(name);
    Ok(hash)
}

/// Encode tensor `i` of the plan.
fn tensor(job: &Job, i: usize, scratch: &mut Scratch) -> Result<()> {
    let t = &job.plan.tensors[i];
    let Some(meta) = meta(t, job.seed) else {
        return buffer(job, i, base_hash(job, t)?);
    };
    let Op::Merge { inputs, .. } = &t.op else {
        unreachable!("float tensors are merged")
    };
    let tasks = meta.non_base();
    let (first, count) = job.shared[i];
    let mut sink = Sink {
        writer: job.writer,
        specs: &job.writer.specs()[first..first + count],
        first,
        bytes: std::mem::take(&mut scratch.bytes),
        hashers: (0..count).map(|_| (blake3::Hasher::new(), 0)).collect(),
        parts: vec![Vec::new(); tasks.len()],
        stats: vec![
            TaskStats {
                sums: vec![0.0; job.scheme.sums()],
                ..Default::default()
            };
            tasks.len()
        ],
        name: &t.name,
    };
    let (same, hash) = with_source(job.set, inputs, &mut scratch.raw, |source| {
        source.hash_input(meta.base.expect("contract: a base"));
        let mut reader = Reader {
            source,
            meta: &meta,
            f32s: &mut scratch.f32s,
            chunk: job.chunk,
            hold: job.hold,
            passed: false,
            same: vec![true; inputs.len()],
            merged: job.merged.map(|p| (p.method, &p.tensors[i])),
        };
        job.scheme.encode(&meta, &mut reader, &mut sink)?;
        let same = if reader.passed {
            reader.same
        } else {
            vec![false; inputs.len()]
        };
        Ok((same, source.input_hash()))
    })?;
    // Schemes that did not read the whole base through the source (dense's raw bytes): hash it.
    let hash = match hash {
        Some(h) => {
            debug_assert_eq!(h, base_hash(job, t)?, "{}: hash of the bytes read", t.name);
            h
        }
        None => base_hash(job, t)?,
    };
    scratch.bytes = std::mem::take(&mut sink.bytes);
    let mut result = TensorResult {
        hash,
        stats: Vec::with_capacity(tasks.len()),
        shared_hashes: Vec::new(),
    };
    for (k, (h, written)) in sink.hashers.into_iter().enumerate() {
        let spec = &sink.specs[k];
        if Some(written) != spec.nbytes() {
            return Err(Error::Numeric {
                name: t.name.clone(),
                reason: format!(
                    "scheme {} wrote {written} of the {} bytes of shared part '{}' (in order)",
                    job.scheme.spec().name,
                    spec.nbytes().unwrap_or(0),
                    spec.name
                ),
            });
        }
        result
            .shared_hashes
            .push((spec.name.clone(), h.finalize().to_hex().to_string()));
    }
    for (task, (&k, (parts, stats))) in tasks
        .iter()
        .zip(sink.parts.into_iter().zip(sink.stats))
        .enumerate()
    {
        // A task equal to the base here stores nothing and rebuilds the base exactly.
        if same[k] {
            result.stats.push(TaskStats {
                sums: vec![0.0; job.scheme.sums()],
                ..Default::default()
            });
            continue;
        }
        for (p, (suffix, dtype, shape, bytes)) in parts.into_iter().enumerate() {
            let name = format::part_name(&t.name, suffix);
            job.tasks.put(task, (i, p), name, dtype, shape, &bytes)?;
        }
        result.stats.push(stats);
    }
    *job.results[i].lock().expect("no panics holding it") = result;
    Ok(())
}

/// A non-float buffer: each task that holds other bytes than the base stores its own.
fn buffer(job: &Job, i: usize, hash: String) -> Result<()> {
    let t = &job.plan.tensors[i];
    let Op::CopyBuffer { inputs } = &t.op else {
        unreachable!("buffers are copied")
    };
    let base = job.set.tensor_of(inputs.last().expect("inputs"))?;
    for (task, input) in inputs[..inputs.len() - 1].iter().enumerate() {
        let mine = job.set.tensor_of(input)?;
        if mine.dtype != base.dtype || mine.bytes != base.bytes {
            let name = format::part_name(&t.name, "raw");
            job.tasks.put(
                task,
                (i, 0),
                name,
                mine.dtype,
                mine.shape.to_vec(),
                mine.bytes,
            )?;
        }
    }
    *job.results[i].lock().expect("no panics holding it") = TensorResult {
        hash,
        stats: vec![TaskStats::default(); inputs.len() - 1],
        shared_hashes: Vec::new(),
    };
    Ok(())
}

/// Sum the tensors' statistics in plan order (the same whatever the thread count), derive
/// each task's scale and error, write the task files and the manifest.
#[allow(clippy::too_many_arguments)]
fn finish_manifest(
    cfg: &LibraryConfig,
    scheme: &dyn Scheme,
    set: &ModelSet,
    plan: &Plan,
    out_dtype: Option<DType>,
    results: &[TensorResult],
    tasks: TaskFiles,
    writer: &ModelWriter,
) -> Result<Manifest> {
    let n = cfg.tasks.len();
    let mut totals = vec![
        TaskStats {
            sums: vec![0.0; scheme.sums()],
            ..Default::default()
        };
        n
    ];
    for r in results {
        for (total, s) in totals.iter_mut().zip(&r.stats) {
            total.add(s);
        }
    }
    let raw = cfg.raw_parameters();
    let scales: Vec<f64> = totals
        .iter()
        .map(|s| scheme.scale(s, &raw))
        .collect::<Result<_>>()?;
    let metadata: Vec<BTreeMap<String, String>> = cfg
        .tasks
        .iter()
        .zip(&scales)
        .map(|(t, s)| {
            BTreeMap::from([
                ("amalgam_library_task".to_string(), t.name.clone()),
                ("scheme".to_string(), scheme.spec().name.to_string()),
                ("scale".to_string(), format!("{s:e}")),
            ])
        })
        .collect();
    let files = tasks.finish(&metadata)?;
    let base_ref = &cfg.base_model;
    let base_model = &set.models[set.index(base_ref)];
    let tensors: Vec<BaseTensor> = plan
        .tensors
        .iter()
        .zip(results)
        .map(|(t, r)| {
            let e = set.entry_of(base_input(t))?;
            Ok(BaseTensor {
                name: t.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                blake3: r.hash.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let parameters: u64 = tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let shared_bytes: u64 = writer.specs().iter().filter_map(|s| s.nbytes()).sum();
    let manifest = Manifest {
        format: format::FORMAT.into(),
        version: format::VERSION,
        amalgam_version: env!("CARGO_PKG_VERSION").into(),
        scheme: scheme.spec().name.into(),
        parameters: raw.clone(),
        merge: cfg.raw_merge(),
        out_dtype,
        base: BaseInfo {
            path: base_ref.0.clone(),
            parameters,
            bytes: base_model.total_bytes(),
            tensors,
        },
        shared_bytes,
        shared_hashes: results
            .iter()
            .flat_map(|r| r.shared_hashes.iter().cloned())
            .collect(),
        tasks: cfg
            .tasks
            .iter()
            .enumerate()
            .map(|(k, t)| TaskInfo {
                name: t.name.clone(),
                model: t.model.0.clone(),
                file: format::task_file(&t.name),
                bytes: files[k].0,
                blake3: files[k].1.clone(),
                bits_per_parameter: 8.0 * files[k].0 as f64 / parameters.max(1) as f64,
                relative_error: totals[k].relative_error(scales[k]),
                scale: scales[k],
                parameters: cfg.raw_task_parameters(k),
            })
            .collect(),
    };
    let path = writer.staging_dir().join(format::MANIFEST);
    let text = serde_json::to_vec_pretty(&manifest).expect("json");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(manifest)
}

/// The scheme's view of one tensor's inputs.
struct Reader<'s, 'a> {
    source: &'s Source<'a>,
    meta: &'s MergeJob<'s>,
    f32s: &'s mut Vec<Vec<f32>>,
    chunk: usize,
    hold: usize,
    /// Whether a streamed pass has run (then `same` is known).
    passed: bool,
    /// Per input: whether it held the base's values in every chunk of the first pass.
    same: Vec<bool>,
    /// The merged model's method and this tensor's plan in it.
    merged: Option<(&'static dyn Method, &'s PlannedTensor)>,
}

impl Reader<'_, '_> {
    /// One streamed pass, the chunks as bf16 bits when `bf16` (the source must be
    /// [`all_bf16`](Source::all_bf16)). The first pass also finds the tasks whose tensor is the
    /// base's, bit for bit.
    fn pass_as(
        &mut self,
        granule: usize,
        bf16: bool,
        f: &mut dyn FnMut(&MergeJob, usize) -> Result<()>,
    ) -> Result<()> {
        let granule = granule.max(1);
        let step = (self.chunk / granule).max(1) * granule;
        let k = self.source.inputs.len();
        let bufs = buffers(self.f32s, k);
        let first = !self.passed;
        let base = self.meta.base.expect("contract: a base");
        let same = &mut self.same;
        for range in chunks(self.meta.numel(), step) {
            crate::cancel::check()?;
            self.source
                .chunk(self.meta, range.clone(), bf16, bufs, |chunk| {
                    if first {
                        for (i, s) in same.iter_mut().enumerate() {
                            // The base is itself; a task that differs stops being compared.
                            if i == base || !*s {
                                continue;
                            }
                            *s = if bf16 {
                                chunk.bf16[i] == chunk.bf16[base]
                            } else {
                                let (x, b) = (chunk.inputs[i], chunk.inputs[base]);
                                x.iter().zip(b).all(|(x, b)| x.to_bits() == b.to_bits())
                            };
                        }
                    }
                    f(chunk, range.start)
                })?;
        }
        self.source.end_pass();
        self.passed = true;
        Ok(())
    }
}

impl TensorInputs for Reader<'_, '_> {
    fn plan_passes(&mut self, passes: usize) {
        if passes > 1 {
            self.source.hold(self.meta.numel(), self.hold);
        }
    }

    fn pass(
        &mut self,
        granule: usize,
        f: &mut dyn FnMut(&MergeJob, usize) -> Result<()>,
    ) -> Result<()> {
        self.pass_as(granule, false, f)
    }

    fn pass_bf16(
        &mut self,
        granule: usize,
        f: &mut dyn FnMut(&MergeJob, usize) -> Result<()>,
    ) -> Result<()> {
        let bf16 = self.source.all_bf16();
        self.pass_as(granule, bf16, f)
    }

    fn whole(&mut self, k: usize, buf: &mut Vec<f32>) -> Result<()> {
        self.source.read_input(k, 0..self.meta.numel(), buf, true)
    }

    fn raw(&mut self, k: usize) -> Result<(DType, Vec<u8>)> {
        self.source.raw_bytes(k, self.meta.numel())
    }

    fn merged(&mut self, out: &mut Vec<f32>) -> Result<()> {
        let (method, t) = self.merged.ok_or_else(|| Error::Numeric {
            name: self.meta.name.to_string(),
            reason: "this scheme needs a merged model and the library has none".into(),
        })?;
        let Op::Merge {
            base,
            shared,
            per_input,
            ..
        } = &t.op
        else {
            unreachable!("float tensors are merged")
        };
        let n = self.meta.numel();
        let k = self.source.inputs.len();
        let bufs = buffers(self.f32s, k);
        for (i, buf) in bufs.iter_mut().enumerate() {
            self.source.read_input(i, 0..n, buf, true)?;
        }
        let job = MergeJob {
            inputs: bufs.iter().map(|b| b.as_slice()).collect(),
            base: *base,
            shared,
            per_input,
            ..self.meta.clone()
        };
        out.clear();
        out.resize(n, 0.0);
        method.merge(&job, out)?;
        if !crate::simd::all_finite(out) {
            return Err(job
                .error("the merged model has NaN or infinite values; check the merge parameters"));
        }
        Ok(())
    }
}

/// Where a tensor's parts go.
struct Sink<'s> {
    writer: &'s ModelWriter,
    specs: &'s [TensorSpec],
    first: usize,
    bytes: Vec<u8>,
    /// Per shared part: its hash so far and the bytes written (in order).
    hashers: Vec<(blake3::Hasher, u64)>,
    parts: Vec<Vec<scheme::TaskPart>>,
    stats: Vec<TaskStats>,
    name: &'s str,
}

impl Encoded for Sink<'_> {
    fn shared(&mut self, part: usize, offset: usize, values: &[f32]) -> Result<()> {
        if !crate::simd::all_finite(values) {
            return Err(Error::Numeric {
                name: self.name.to_string(),
                reason: "the shared part has NaN or infinite values".into(),
            });
        }
        let dtype = self.specs[part].dtype;
        let mut bytes = std::mem::take(&mut self.bytes);
        encode_f32(dtype, values, &mut bytes);
        let result = self.shared_bytes(part, offset * dtype.size(), &bytes);
        self.bytes = bytes;
        result
    }

    fn shared_bytes(&mut self, part: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let (hasher, written) = &mut self.hashers[part];
        if offset as u64 != *written {
            return Err(Error::Numeric {
                name: self.name.to_string(),
                reason: format!(
                    "shared part written out of order (at byte {offset}, {written} written)"
                ),
            });
        }
        hasher.update(bytes);
        *written += bytes.len() as u64;
        self.writer
            .write_part(self.first + part, offset as u64, bytes)
    }

    fn task(
        &mut self,
        task: usize,
        suffix: &'static str,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.parts[task].push((suffix, dtype, shape, bytes));
        Ok(())
    }

    fn stats(&mut self, task: usize) -> &mut TaskStats {
        &mut self.stats[task]
    }
}
