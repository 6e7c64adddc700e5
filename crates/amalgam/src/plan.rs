//! The plan: every output tensor with its inputs and fully resolved parameters, built from a
//! merge config and the headers of the input models before any tensor data is read.
//!
//! The planning follows mergekit's: `models:` becomes one slice spanning every layer of each
//! model (the base appended if it is not listed), embeddings come from the first slice's
//! sources, the final norm and LM head from the last slice's, and layer `k` of a slice of `n`
//! layers is planned at gradient position `t = k/(n−1)` (`t = 1` for a one-layer slice, `t = 0`
//! outside the layers). Parameters are looked up source → slice → global, first hit wins.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::arch::{self, EMBED_TOKENS, LM_HEAD, Layout, Place};
use crate::config::{self, MergeConfig, ModelRef, Parameters, Value};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::Model;
use crate::methods::{self, Method, Params, Scope};

/// The input models, opened and validated.
pub struct ModelSet {
    /// As the config names them.
    pub refs: Vec<ModelRef>,
    /// Opened, parallel to `refs`.
    pub models: Vec<Model>,
    /// Each model's layout (read once: config.json and a scan of the tensor names).
    pub layouts: Vec<Layout>,
    /// The LoRA adapter of a `model+adapter` reference, parallel to `refs`: its delta is added
    /// to the model's tensors as they are read (mergekit's syntax).
    pub adapters: Vec<Option<crate::lora::Adapter>>,
    /// The statistics file given for each model (`stats:` in `models:`), parallel to `refs`.
    pub stats: Vec<Option<crate::stats::Stats>>,
}

impl ModelSet {
    /// [`Model::check_unchanged`] for every model.
    pub fn check_unchanged(&self) -> Result<()> {
        self.models.iter().try_for_each(Model::check_unchanged)
    }

    /// The directory holding model `m`'s tokenizer: its adapter's when the adapter carries
    /// one (an adapter that added tokens), else the model's.
    pub fn tokenizer_dir(&self, m: usize) -> &std::path::Path {
        self.adapters[m]
            .as_ref()
            .and_then(|a| a.tokenizer_dir())
            .unwrap_or(&self.models[m].dir)
    }

    /// Where `input` is read from: its model's file, or its adapter's when the adapter carries
    /// the whole tensor (`modules_to_save`, saved base layers), with the tensor's name there.
    pub fn file_of<'s>(&'s self, input: &'s Input) -> (&'s Model, &'s str) {
        let saved = self.adapters[input.model]
            .as_ref()
            .and_then(|a| a.replaced.get(&input.tensor).map(|n| (&a.file, n.as_str())));
        saved.unwrap_or((&self.models[input.model], input.tensor.as_str()))
    }

    /// The data of `input` (see [`file_of`](Self::file_of)).
    pub fn tensor_of<'s>(&'s self, input: &'s Input) -> Result<crate::io::TensorView<'s>> {
        let (file, name) = self.file_of(input);
        file.tensor(name)
    }

    /// The index entry of `input` (see [`file_of`](Self::file_of)).
    pub fn entry_of<'s>(&'s self, input: &'s Input) -> Result<&'s crate::io::TensorEntry> {
        let (file, name) = self.file_of(input);
        file.entry(name)
    }

    /// Open every model `config` references. Paths are relative to the working directory, as
    /// with mergekit.
    pub fn open(config: &MergeConfig) -> Result<ModelSet> {
        let mut set =
            ModelSet::open_refs(config.referenced_models(), |reason| config.error(reason))?;
        for m in config.models.iter().flatten() {
            let Some(path) = &m.stats else { continue };
            let i = set.index(&m.model);
            if set.adapters[i].is_some() {
                return Err(config.error(format!(
                    "model '{}': statistics of a model+adapter input are not supported; bake the \
                     adapter with `amalgam lora apply` and measure that model",
                    m.model.0
                )));
            }
            set.stats[i] = Some(crate::stats::Stats::open(path)?);
        }
        Ok(set)
    }

    /// Open the models `refs` names (a folder or `.safetensors` file, or `model+adapter`);
    /// `error` makes the error for a reference that cannot be opened (naming the config).
    pub fn open_refs(refs: Vec<ModelRef>, error: impl Fn(String) -> Error) -> Result<ModelSet> {
        let mut models = Vec::new();
        let mut adapters = Vec::new();
        for r in &refs {
            let whole = PathBuf::from(&r.0);
            let (path, adapter) = match r.0.rsplit_once('+') {
                Some((m, a)) if !whole.exists() => (PathBuf::from(m), Some(PathBuf::from(a))),
                _ => (whole, None),
            };
            if !path.exists() {
                return Err(error(format!(
                    "model '{}' not found: amalgam reads local model directories or .safetensors files (it does not download from a hub)",
                    path.display()
                )));
            }
            let model = Model::open(&path)?;
            let adapter = match adapter {
                None => None,
                Some(a) if !a.exists() => {
                    return Err(error(format!(
                        "adapter '{}' of '{}' not found (a local PEFT adapter directory)",
                        a.display(),
                        r.0
                    )));
                }
                Some(a) => {
                    let adapter = crate::lora::Adapter::open(&a)?;
                    adapter.check_base(&model)?;
                    let head = crate::arch::LM_HEAD;
                    if adapter.replaced.contains_key(head) && !model.contains(head) {
                        return Err(crate::Error::Adapter {
                            path: a.clone(),
                            name: head.into(),
                            reason: "the adapter carries an LM head for a model whose head is tied to its embeddings; bake it with `amalgam lora apply` first".into(),
                        });
                    }
                    Some(adapter)
                }
            };
            models.push(model);
            adapters.push(adapter);
        }
        let layouts = models.iter().map(Layout::of).collect();
        let stats = refs.iter().map(|_| None).collect();
        Ok(ModelSet {
            refs,
            models,
            layouts,
            adapters,
            stats,
        })
    }

    /// Index of `r`.
    pub fn index(&self, r: &ModelRef) -> usize {
        self.refs
            .iter()
            .position(|x| x == r)
            .expect("referenced model")
    }
}

/// One input of an output tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// Index into [`ModelSet::models`].
    pub model: usize,
    /// The tensor name in that model.
    pub tensor: String,
    /// For a vocabulary-indexed tensor whose vocabulary is aligned: the rows every input of
    /// the tensor supplies (`None`: read as stored).
    pub rows: Option<std::sync::Arc<crate::vocab::TensorRows>>,
}

/// What produces an output tensor.
#[derive(Clone, Debug)]
pub enum Op {
    /// Run the merge method.
    Merge {
        /// Inputs in config order.
        inputs: Vec<Input>,
        /// Which input is the base.
        base: Option<usize>,
        /// Shared parameters.
        shared: Params,
        /// Per-input parameters.
        per_input: Vec<Params>,
        /// Gradient position.
        t: f64,
    },
    /// A non-float buffer: every input must hold the same bytes; the first is copied.
    CopyBuffer {
        /// Inputs.
        inputs: Vec<Input>,
    },
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// Output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Output dtype.
    pub dtype: DType,
    /// How it is made.
    pub op: Op,
}

impl PlannedTensor {
    /// The job of a merged tensor, without inputs (`None` for a buffer copied as it is).
    pub fn job<'a>(
        &'a self,
        seed: u64,
        global: Option<&'a methods::Global>,
    ) -> Option<methods::MergeJob<'a>> {
        match &self.op {
            Op::CopyBuffer { .. } => None,
            Op::Merge {
                base,
                shared,
                per_input,
                ..
            } => Some(methods::MergeJob {
                name: &self.name,
                shape: &self.shape,
                inputs: Vec::new(),
                bf16: Vec::new(),
                base: *base,
                shared,
                per_input,
                seed,
                global,
            }),
        }
    }
}

/// A whole merge plan.
pub struct Plan {
    /// The method.
    pub method: &'static dyn Method,
    /// Output tensors in write order.
    pub tensors: Vec<PlannedTensor>,
    /// The model whose config, tokenizer and side files are copied.
    pub donor: usize,
    /// The output `config.json`, if the donor has one.
    pub out_config: Option<serde_json::Value>,
    /// Notices for the user.
    pub warnings: Vec<String>,
    /// The vocabulary alignment, when the config asks for one (its tokenizer is written).
    pub alignment: Option<crate::vocab::Alignment>,
}

/// A normalised slice: sources with their layer ranges and parameters.
struct Slice<'a> {
    sources: Vec<(usize, [usize; 2], &'a Parameters)>,
    base: Option<usize>,
    params: &'a Parameters,
}

static EMPTY: std::sync::LazyLock<Parameters> = std::sync::LazyLock::new(Parameters::default);

/// Planning choices that mergekit exposes as command-line flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOptions {
    /// Merge models of different architectures (`--allow-crimes`).
    pub allow_crimes: bool,
    /// Cut vocabulary-indexed tensors (embeddings, LM head) to the smallest vocabulary among
    /// the inputs (`--unsafe-truncate-embeddings`): only right when the token ids agree.
    pub truncate_embeddings: bool,
    /// Which tensors are merged when the inputs' tensor sets differ (mergekit-pytorch's
    /// `--tensor-union` / `--tensor-intersection`).
    pub tensors: TensorSet,
}

/// Which tensors a merge writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorSet {
    /// The base's (or first model's) layout; every input must have every tensor of it.
    #[default]
    Layout,
    /// Flat, as mergekit-pytorch: every tensor any listed model has, merged over the inputs
    /// that have it.
    Union,
    /// Flat, as mergekit-pytorch: only the tensors every input has.
    Intersection,
}

/// A warning for each parameter name the config sets that the method does not read (a typo, or
/// a parameter of another method: mergekit ignores them too, but silently).
fn unused_parameters(config: &MergeConfig, spec: &methods::MethodSpec) -> Vec<String> {
    let mut scopes: Vec<&Parameters> = vec![&config.parameters];
    for m in config.models.iter().flatten() {
        scopes.push(&m.parameters);
    }
    for s in config.slices.iter().flatten() {
        scopes.push(&s.parameters);
        scopes.extend(s.sources.iter().map(|src| &src.parameters));
    }
    let mut unused: Vec<&str> = Vec::new();
    for name in scopes.iter().flat_map(|p| p.names()) {
        if !spec.params.iter().any(|p| p.name == name) && !unused.contains(&name) {
            unused.push(name);
        }
    }
    let valid: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
    unused
        .into_iter()
        .map(|name| {
            format!(
                "parameter '{name}' is not used by merge_method {} (its parameters: {})",
                spec.name,
                if valid.is_empty() {
                    "none".to_string()
                } else {
                    valid.join(", ")
                }
            )
        })
        .collect()
}

/// Build the plan for `config` over `set`.
pub fn build(config: &MergeConfig, set: &ModelSet, opts: PlanOptions) -> Result<Plan> {
    let method = methods::get(&config.merge_method).map_err(|e| config.error(e))?;
    build_with(config, set, opts, method)
}

/// [`build`] with `method` in place of the config's `merge_method` (the task library plans its
/// schemes this way: their parameters are resolved per tensor and model as a method's are).
pub fn build_with(
    config: &MergeConfig,
    set: &ModelSet,
    opts: PlanOptions,
    method: &'static dyn Method,
) -> Result<Plan> {
    check_stats(config, set, method)?;
    if !opts.allow_crimes {
        check_same_architecture(config, set)?;
    }
    let out_dtype = parse_dtype(config, "out_dtype", config.out_dtype.as_deref())?.or(parse_dtype(
        config,
        "dtype",
        config.dtype.as_deref(),
    )?);
    if opts.tensors != TensorSet::Layout && config.slices.is_some() {
        return Err(config.error(
            "--tensor-union and --tensor-intersection merge state dicts tensor by tensor; give \
             the models under models:, not slices:",
        ));
    }
    let slices = normalise(config, set)?;
    let donor = config
        .base_model
        .as_ref()
        .map(|b| set.index(b))
        .unwrap_or(0);
    let reference = &set.models[donor];
    let layout = &set.layouts[donor];
    let alignment = crate::vocab::Alignment::build(config, set)?;
    let mut planner = Planner {
        config,
        set,
        method,
        alignment: alignment.as_ref(),
        truncate_embeddings: opts.truncate_embeddings,
        layout,
        out_dtype,
        tensors: Vec::new(),
        warnings: Vec::new(),
    };
    let out_layer = match opts.tensors {
        TensorSet::Layout => planner.plan_layout(&slices, reference, layout)?,
        which => planner.plan_flat(config, &slices[0], which)?,
    };
    let Planner {
        tensors,
        warnings: mut planned_warnings,
        ..
    } = planner;
    let mut out_config = out_config(reference, config, layout, out_dtype, out_layer);
    if let (Some(a), Some(cfg)) = (&alignment, out_config.as_mut()) {
        a.update_config(cfg);
    }
    let mut warnings = alignment
        .as_ref()
        .map(|a| a.warnings.clone())
        .unwrap_or_default();
    warnings.append(&mut planned_warnings);
    warnings.extend(unused_parameters(config, method.spec()));
    Ok(Plan {
        method,
        tensors,
        donor,
        out_config,
        warnings,
        alignment,
    })
}

/// Statistics are given for every non-base model of a data-driven method, of the kind it reads,
/// and for no other method.
fn check_stats(config: &MergeConfig, set: &ModelSet, method: &dyn Method) -> Result<()> {
    let name = &method.spec().name;
    let models = config.models.iter().flatten();
    match method.stats_kind() {
        None => {
            if let Some(m) = config.models.iter().flatten().find(|m| m.stats.is_some()) {
                return Err(config.error(format!(
                    "model '{}' has stats:, which only the data-driven methods read (regmean, \
                     fisher); {name} does not",
                    m.model.0
                )));
            }
        }
        Some(kind) => {
            if config.slices.is_some() {
                return Err(config.error(format!(
                    "{name} reads statistics per model: list the models under models:, each \
                     with its stats: file, not slices:"
                )));
            }
            for m in models {
                if config.base_model.as_ref() == Some(&m.model) && m.stats.is_none() {
                    continue;
                }
                let Some(s) = &set.stats[set.index(&m.model)] else {
                    return Err(config.error(format!(
                        "model '{}' has no stats: file; {name} needs {} statistics of every \
                         model it merges (amalgam measure MODEL --data FILE --stats {} OUT)",
                        m.model.0,
                        kind.name(),
                        kind.name()
                    )));
                };
                if s.meta.kind != kind {
                    return Err(crate::Error::Config {
                        path: s.path.clone(),
                        reason: format!(
                            "holds {} statistics; {name} needs {} (amalgam measure --stats {})",
                            s.meta.kind.name(),
                            kind.name(),
                            kind.name()
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

fn check_same_architecture(config: &MergeConfig, set: &ModelSet) -> Result<()> {
    let archs: Vec<Option<String>> = set.layouts.iter().map(|l| l.architecture.clone()).collect();
    let Some(first) = archs.iter().flatten().next() else {
        return Ok(());
    };
    if let Some((i, other)) = archs
        .iter()
        .enumerate()
        .find_map(|(i, a)| a.as_ref().filter(|a| *a != first).map(|a| (i, a)))
    {
        return Err(config.error(format!(
            "the models have different architectures ({first} vs {other} in '{}'); merging across architectures is refused unless --allow-crimes",
            set.refs[i].0
        )));
    }
    Ok(())
}

fn parse_dtype(config: &MergeConfig, key: &str, value: Option<&str>) -> Result<Option<DType>> {
    value
        .map(|v| {
            DType::parse_float(v).ok_or_else(|| {
                config.error(format!(
                    "{key}: '{v}' is not a float dtype; use bfloat16, float16, float32 or float64"
                ))
            })
        })
        .transpose()
}

/// `models:` → one slice; `slices:` as given. Checks equal slice lengths and layer ranges.
fn normalise<'a>(config: &'a MergeConfig, set: &ModelSet) -> Result<Vec<Slice<'a>>> {
    let base = config.base_model.as_ref().map(|b| set.index(b));
    if let Some(models) = &config.models {
        let mut sources: Vec<(usize, [usize; 2], &Parameters)> = models
            .iter()
            .map(|m| {
                let i = set.index(&m.model);
                (i, [0, set.layouts[i].num_layers], &m.parameters)
            })
            .collect();
        if let Some(b) = base
            && !sources.iter().any(|s| s.0 == b)
        {
            sources.push((b, [0, set.layouts[b].num_layers], &EMPTY));
        }
        let slice = Slice {
            sources,
            base,
            params: &EMPTY,
        };
        check_slice(config, set, &slice)?;
        return Ok(vec![slice]);
    }
    let mut out = Vec::new();
    for s in config.slices.iter().flatten() {
        let slice = Slice {
            sources: s
                .sources
                .iter()
                .map(|src| (set.index(&src.model), src.layer_range, &src.parameters))
                .collect(),
            base: s.base_model.as_ref().map(|b| set.index(b)).or(base),
            params: &s.parameters,
        };
        check_slice(config, set, &slice)?;
        out.push(slice);
    }
    Ok(out)
}

fn check_slice(config: &MergeConfig, set: &ModelSet, slice: &Slice) -> Result<()> {
    let len = |s: &(usize, [usize; 2], &Parameters)| s.1[1] - s.1[0];
    if slice
        .sources
        .iter()
        .any(|s| len(s) != len(&slice.sources[0]))
    {
        let desc: Vec<String> = slice
            .sources
            .iter()
            .map(|s| format!("{} has {}", set.refs[s.0].0, len(s)))
            .collect();
        return Err(config.error(format!(
            "all inputs to a slice must have the same number of layers ({})",
            desc.join(", ")
        )));
    }
    for s in &slice.sources {
        let available = set.layouts[s.0].num_layers;
        if s.1[1] > available {
            return Err(config.error(format!(
                "layer_range [{}, {}] of {} is past its {available} layers",
                s.1[0], s.1[1], set.refs[s.0].0
            )));
        }
    }
    Ok(())
}

fn inputs_same_name(slice: &Slice, name: &str) -> Vec<(usize, String)> {
    slice
        .sources
        .iter()
        .map(|s| (s.0, name.to_string()))
        .collect()
}

struct Planner<'a> {
    config: &'a MergeConfig,
    set: &'a ModelSet,
    method: &'static dyn Method,
    alignment: Option<&'a crate::vocab::Alignment>,
    truncate_embeddings: bool,
    layout: &'a Layout,
    out_dtype: Option<DType>,
    tensors: Vec<PlannedTensor>,
    warnings: Vec<String>,
}

impl Planner<'_> {
    /// Plan the output layout read off `reference`: its embeddings and other tensors before
    /// the layers, the slices' layers, then the tensors after them. Returns the layer count.
    fn plan_layout(
        &mut self,
        slices: &[Slice],
        reference: &Model,
        layout: &Layout,
    ) -> Result<usize> {
        let set = self.set;
        let mut pre = Vec::new();
        let mut post = Vec::new();
        for t in reference.tensors() {
            match arch::place(&t.name) {
                Place::Pre => pre.push(t.name.clone()),
                Place::Post => post.push(t.name.clone()),
                Place::Layer { .. } => {}
            }
        }
        let first = &slices[0];
        let last = slices.last().expect("at least one slice");
        // A tied LM head is written only if some input stores one (mergekit's optional weight);
        // inputs that tie it then contribute their embeddings.
        if layout.tied_head
            && !post.iter().any(|n| n == LM_HEAD)
            && last
                .sources
                .iter()
                .any(|s| set.models[s.0].contains(LM_HEAD))
        {
            post.push(LM_HEAD.to_string());
        }
        for name in &pre {
            self.plan_tensor(name, &inputs_same_name(first, name), first, 0.0)?;
        }
        let mut out_layer = 0usize;
        for slice in slices {
            out_layer = self.plan_slice(slice, out_layer)?;
        }
        for name in &post {
            self.plan_tensor(name, &inputs_same_name(last, name), last, 0.0)?;
        }
        Ok(out_layer)
    }

    /// Plan every tensor on its own, as mergekit-pytorch does (parameters at t = 0): the names
    /// of the listed models in order of first appearance; with `Union` each merged over the
    /// inputs that have it, with `Intersection` only those every input has. Returns the layer
    /// count the output config keeps.
    fn plan_flat(
        &mut self,
        config: &MergeConfig,
        slice: &Slice,
        which: TensorSet,
    ) -> Result<usize> {
        let listed: Vec<usize> = config
            .models
            .iter()
            .flatten()
            .map(|m| self.set.index(&m.model))
            .collect();
        let mut names: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &m in &listed {
            for t in self.set.models[m].tensors() {
                if seen.insert(t.name.clone()) {
                    names.push(t.name.clone());
                }
            }
        }
        for name in &names {
            let inputs: Vec<(usize, String)> = slice
                .sources
                .iter()
                .filter(|s| self.resolve(s.0, name).is_ok())
                .map(|s| (s.0, name.clone()))
                .collect();
            if which == TensorSet::Intersection && inputs.len() < slice.sources.len() {
                continue;
            }
            self.plan_tensor(name, &inputs, slice, 0.0)?;
        }
        Ok(self.layout.num_layers)
    }

    fn plan_slice(&mut self, slice: &Slice, mut out_layer: usize) -> Result<usize> {
        let (first_model, range, _) = slice.sources[0];
        let n = range[1] - range[0];
        for offset in 0..n {
            let t = if n > 1 {
                offset as f64 / (n - 1) as f64
            } else {
                1.0
            };
            let suffixes = arch::layer_tensors(&self.set.models[first_model], range[0] + offset);
            for (prefix, suffix) in suffixes {
                let out_name = format!("{prefix}{out_layer}.{suffix}");
                let inputs: Vec<(usize, String)> = slice
                    .sources
                    .iter()
                    .map(|s| (s.0, format!("{prefix}{}.{suffix}", s.1[0] + offset)))
                    .collect();
                self.plan_tensor(&out_name, &inputs, slice, t)?;
            }
            out_layer += 1;
        }
        Ok(out_layer)
    }

    /// The tensor `name` of model `m`, or the embeddings standing in for a tied LM head.
    fn resolve(&self, m: usize, name: &str) -> Result<String> {
        let model = &self.set.models[m];
        if model.contains(name) {
            return Ok(name.to_string());
        }
        if name == LM_HEAD && self.layout.tied_head && model.contains(EMBED_TOKENS) {
            return Ok(EMBED_TOKENS.to_string());
        }
        Err(self.config.error(format!(
            "tensor '{name}' is missing from model '{}'; every input must have the tensors of the output layout (for state dicts whose tensor sets differ: --tensor-union or --tensor-intersection)",
            self.set.refs[m].0
        )))
    }

    fn plan_tensor(
        &mut self,
        out_name: &str,
        inputs: &[(usize, String)],
        slice: &Slice,
        t: f64,
    ) -> Result<()> {
        let mut inputs: Vec<Input> = inputs
            .iter()
            .map(|(m, n)| {
                Ok(Input {
                    model: *m,
                    tensor: self.resolve(*m, n)?,
                    rows: None,
                })
            })
            .collect::<Result<_>>()?;
        let (dtypes, shapes): (Vec<DType>, Vec<Vec<usize>>) = inputs
            .iter()
            .map(|i| self.set.entry_of(i).map(|e| (e.dtype, e.shape.clone())))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let shapes: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let aligned = self.alignment.filter(|_| {
            arch::is_vocabulary(out_name)
                && dtypes.iter().all(|d| d.is_float())
                && shapes.iter().all(|s| !s.is_empty())
        });
        let shape = match aligned {
            Some(a) => self.align(a, out_name, &shapes, &mut inputs, slice)?,
            None => self.common_shape(out_name, &shapes, &inputs)?,
        };
        if dtypes.iter().any(|d| !d.is_float()) {
            self.tensors.push(PlannedTensor {
                name: out_name.to_string(),
                shape,
                dtype: dtypes[0],
                op: Op::CopyBuffer { inputs },
            });
            return Ok(());
        }
        let dtype = self
            .out_dtype
            .unwrap_or_else(|| promote(dtypes.iter().copied()));
        let base = slice
            .base
            .and_then(|b| inputs.iter().position(|i| i.model == b));
        if let Some(b) = slice.base
            && base.is_none()
            && self.method.spec().contract.base != methods::BasePolicy::Ignored
        {
            return Err(self.config.error(format!(
                "the base model '{}' is not among the sources of the slice that makes '{out_name}'",
                self.set.refs[b].0
            )));
        }
        self.method
            .spec()
            .contract
            .check(inputs.len(), base.is_some())
            .map_err(|e| {
                self.config
                    .error(format!("{} for '{out_name}': {e}", self.method.spec().name))
            })?;
        let (shared, per_input) = self.resolve_params(out_name, &inputs, base, slice, t)?;
        self.tensors.push(PlannedTensor {
            name: out_name.to_string(),
            shape,
            dtype,
            op: Op::Merge {
                inputs,
                base,
                shared,
                per_input,
                t,
            },
        });
        Ok(())
    }

    /// Align the inputs of vocabulary-indexed tensor `out_name` to the output vocabulary
    /// (setting each input's rows where it is not read as stored); returns the output shape.
    fn align(
        &mut self,
        a: &crate::vocab::Alignment,
        out_name: &str,
        shapes: &[&[usize]],
        inputs: &mut [Input],
        slice: &Slice,
    ) -> Result<Vec<usize>> {
        let first = shapes[0];
        if let Some(k) = shapes.iter().position(|s| s.get(1..) != first.get(1..)) {
            let e = Error::ShapeMismatch {
                path: self.set.models[inputs[k].model].path.clone(),
                name: inputs[k].tensor.clone(),
                expected: first.to_vec(),
                found: shapes[k].to_vec(),
            };
            return Err(self.config.error(format!(
                "{e}; vocabulary-indexed tensors may differ in rows only"
            )));
        }
        let cols: usize = first[1..].iter().product();
        let stored: Vec<usize> = shapes.iter().map(|s| s[0]).collect();
        let t = crate::vocab::VocabTensor {
            name: out_name,
            inputs,
            stored: &stored,
            cols,
            base: slice.base,
        };
        let rows = a.tensor_rows(self.config, self.set, &t, &mut self.warnings)?;
        for (k, i) in inputs.iter_mut().enumerate() {
            if !rows.is_identity(k, stored[k]) {
                i.rows = Some(rows.clone());
            }
        }
        let mut shape = first.to_vec();
        shape[0] = rows.rows;
        Ok(shape)
    }

    /// The shape all inputs share, or with `truncate_embeddings` the smallest vocabulary of a
    /// vocabulary-indexed tensor whose other dimensions agree.
    fn common_shape(
        &mut self,
        out_name: &str,
        shapes: &[&[usize]],
        inputs: &[Input],
    ) -> Result<Vec<usize>> {
        let first = shapes[0];
        let Some(k) = shapes.iter().position(|s| *s != first) else {
            return Ok(first.to_vec());
        };
        let rows_only = shapes
            .iter()
            .all(|s| s.len() == first.len() && s.get(1..) == first.get(1..));
        if self.truncate_embeddings
            && rows_only
            && !first.is_empty()
            && arch::is_vocabulary(out_name)
        {
            let rows = shapes.iter().map(|s| s[0]).min().expect("inputs");
            let mut shape = first.to_vec();
            shape[0] = rows;
            self.warnings.push(format!(
                "unsafe vocabulary truncation of '{out_name}': inputs cut to their first {rows} rows; this is right only if the token ids agree"
            ));
            return Ok(shape);
        }
        let hint = if arch::is_vocabulary(out_name) {
            "; the vocabularies differ: align them by token with `tokenizer_source: union` (or base, or a model; mergekit's semantics), or cut every input to the smallest vocabulary with --unsafe-truncate-embeddings when the token ids agree"
        } else {
            "; inputs must agree in shape"
        };
        let e = Error::ShapeMismatch {
            path: self.set.models[inputs[k].model].path.clone(),
            name: inputs[k].tensor.clone(),
            expected: first.to_vec(),
            found: shapes[k].to_vec(),
        };
        Err(self.config.error(format!("{e}{hint}")))
    }

    fn resolve_params(
        &self,
        out_name: &str,
        inputs: &[Input],
        base: Option<usize>,
        slice: &Slice,
        t: f64,
    ) -> Result<(Params, Vec<Params>)> {
        let spec = self.method.spec();
        let shared_scopes = [slice.params, &self.config.parameters];
        let mut shared = Params::default();
        for p in spec.params.iter().filter(|p| p.scope == Scope::Shared) {
            let v = self.lookup(p, &shared_scopes, out_name, t, None)?;
            shared.values.push((p.name, v));
        }
        methods::ranges::check(spec.name, &shared.values)
            .map_err(|e| self.config.error(format!("tensor '{out_name}': {e}")))?;
        let mut per_input = Vec::with_capacity(inputs.len());
        for (k, input) in inputs.iter().enumerate() {
            let mut scopes: Vec<&Parameters> = slice
                .sources
                .iter()
                .filter(|s| s.0 == input.model)
                .map(|s| s.2)
                .collect();
            scopes.extend(shared_scopes);
            let mut params = Params::default();
            for p in spec.params.iter().filter(|p| match p.scope {
                Scope::Shared => false,
                Scope::Input => true,
                Scope::NonBase => Some(k) != base,
            }) {
                let v = self.lookup(p, &scopes, &input.tensor, t, Some(input.model))?;
                params.values.push((p.name, v));
            }
            let mut all = shared.values.clone();
            all.extend(params.values.iter().cloned());
            methods::ranges::check(spec.name, &all).map_err(|e| {
                self.config.error(format!(
                    "model '{}', tensor '{}': {e}",
                    self.set.refs[input.model].0, input.tensor
                ))
            })?;
            per_input.push(params);
        }
        Ok((shared, per_input))
    }

    fn lookup(
        &self,
        p: &methods::ParamSpec,
        scopes: &[&Parameters],
        tensor: &str,
        t: f64,
        model: Option<usize>,
    ) -> Result<Value> {
        for scope in scopes {
            if let Some(setting) = scope.get(p.name) {
                let v = config::evaluate(setting, tensor, t, p.kind)
                    .map_err(|e| self.config.error(format!("parameter '{}': {e}", p.name)))?;
                if let Some(v) = v {
                    return Ok(v);
                }
            }
        }
        p.default.clone().ok_or_else(|| {
            let whose = model
                .map(|m| format!(" for model '{}'", self.set.refs[m].0))
                .unwrap_or_default();
            self.config.error(format!(
                "merge_method '{}' needs parameter '{}'{whose} (tensor '{tensor}'); set it in that model's parameters or in the global parameters",
                self.method.spec().name,
                p.name
            ))
        })
    }
}

/// The dtype torch promotes a mix of float dtypes to.
fn promote(dtypes: impl Iterator<Item = DType>) -> DType {
    dtypes
        .reduce(|a, b| match (a, b) {
            _ if a == b => a,
            (DType::F64, _) | (_, DType::F64) => DType::F64,
            _ => DType::F32,
        })
        .expect("at least one input")
}

fn out_config(
    reference: &Model,
    config: &MergeConfig,
    layout: &Layout,
    out_dtype: Option<DType>,
    layers: usize,
) -> Option<serde_json::Value> {
    let mut cfg = reference.config()?;
    let obj = cfg.as_object_mut()?;
    if let Some(d) = out_dtype.and_then(DType::torch_name) {
        obj.insert("torch_dtype".into(), d.into());
    }
    if config.slices.is_some()
        && let Some(key) = layout.num_layers_key
    {
        obj.insert(key.into(), layers.into());
    }
    Some(cfg)
}

impl Plan {
    /// A human-readable listing of the plan (`--dry-run`).
    pub fn describe(&self, set: &ModelSet) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "merge_method: {} ({}), {} output tensors",
            self.method.spec().name,
            self.method.spec().pretty_name,
            self.tensors.len()
        );
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        for t in &self.tensors {
            let _ = write!(s, "{} {:?} {}", t.name, t.shape, t.dtype);
            match &t.op {
                Op::CopyBuffer { inputs } => {
                    let _ = writeln!(
                        s,
                        " <- copy {}:{}",
                        set.refs[inputs[0].model].0, inputs[0].tensor
                    );
                }
                Op::Merge {
                    inputs,
                    base,
                    shared,
                    per_input,
                    t: pos,
                } => {
                    let _ = write!(s, " t={pos:.4}");
                    for (n, v) in &shared.values {
                        let _ = write!(s, " {n}={v}");
                    }
                    let _ = writeln!(s);
                    for (k, (i, p)) in inputs.iter().zip(per_input).enumerate() {
                        let tag = if Some(k) == *base { " (base)" } else { "" };
                        let _ = write!(s, "    {}:{}{tag}", set.refs[i.model].0, i.tensor);
                        for (n, v) in &p.values {
                            let _ = write!(s, " {n}={v}");
                        }
                        let _ = writeln!(s);
                    }
                }
            }
        }
        s
    }
}
