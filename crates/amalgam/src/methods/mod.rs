//! Merge methods: one trait, one file per method, one static registry.
//!
//! A method is a pure function of its input tensors (decoded to f32, same shape) and its resolved
//! parameters. It carries its own metadata: name, parameters with scopes and defaults, and the
//! input contract (base required or not, how many inputs). It never opens files.

use crate::config::{Kind, Value};
use crate::error::{Error, Result};

pub mod arcee_fusion;
pub mod consensus;
pub mod emr;
pub mod fisher;
pub mod gta;
mod gta_global;
mod gta_kernel;
mod gta_state;
pub mod iso;
pub mod karcher;
pub mod linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod pcb;
pub mod ram;
pub mod ranges;
pub mod regmean;
pub mod rng;
pub mod sce;
pub mod select;
pub mod slerp;
pub mod sparsify;
pub mod subspace;
pub mod tsv;

/// Which inputs a parameter is bound for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value for the whole tensor.
    Shared,
    /// One value per input, base included.
    Input,
    /// One value per non-base input.
    NonBase,
}

/// A parameter a method takes.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Its name in the YAML.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its scope.
    pub scope: Scope,
    /// Its default; `None` means required.
    pub default: Option<Value>,
}

impl ParamSpec {
    /// A parameter with a default.
    pub const fn new(name: &'static str, kind: Kind, scope: Scope, default: Value) -> Self {
        ParamSpec {
            name,
            kind,
            scope,
            default: Some(default),
        }
    }

    /// A required parameter.
    pub const fn required(name: &'static str, kind: Kind, scope: Scope) -> Self {
        ParamSpec {
            name,
            kind,
            scope,
            default: None,
        }
    }
}

/// Whether a method wants a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// Must have one.
    Required,
    /// May have one.
    Optional,
    /// Base is treated as an ordinary input.
    Ignored,
}

/// What a method accepts.
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    /// Base model policy.
    pub base: BasePolicy,
    /// Fewest inputs (base included).
    pub min_inputs: usize,
    /// Most inputs (base included).
    pub max_inputs: Option<usize>,
    /// Fewest non-base inputs.
    pub min_non_base: usize,
    /// Most non-base inputs.
    pub max_non_base: Option<usize>,
}

impl Contract {
    /// Any number of inputs (at least one), base ignored.
    pub const ANY: Contract = Contract {
        base: BasePolicy::Ignored,
        min_inputs: 1,
        max_inputs: None,
        min_non_base: 0,
        max_non_base: None,
    };

    /// A base and any number of other inputs.
    pub const WITH_BASE: Contract = Contract {
        base: BasePolicy::Required,
        ..Contract::ANY
    };

    /// Check the inputs of one tensor: `n` inputs, `has_base` whether one is the base.
    pub fn check(&self, n: usize, has_base: bool) -> std::result::Result<(), String> {
        if self.base == BasePolicy::Required && !has_base {
            return Err("this method needs a base_model".into());
        }
        let has_base = has_base && self.base != BasePolicy::Ignored;
        let non_base = n - has_base as usize;
        let range = |what: &str, count: usize, min: usize, max: Option<usize>| {
            if count < min || max.is_some_and(|m| count > m) {
                let want = match max {
                    Some(m) if m == min => format!("exactly {m}"),
                    Some(m) => format!("{min} to {m}"),
                    None => format!("at least {min}"),
                };
                Err(format!("this method takes {want} {what}, got {count}"))
            } else {
                Ok(())
            }
        };
        range(
            "inputs (base included)",
            n,
            self.min_inputs,
            self.max_inputs,
        )?;
        range(
            "non-base models",
            non_base,
            self.min_non_base,
            self.max_non_base,
        )
    }
}

/// A method's metadata.
#[derive(Clone, Debug)]
pub struct MethodSpec {
    /// The `merge_method` name.
    pub name: &'static str,
    /// Human name.
    pub pretty_name: &'static str,
    /// Paper or reference.
    pub reference: &'static str,
    /// Parameters.
    pub params: Vec<ParamSpec>,
    /// Inputs accepted.
    pub contract: Contract,
}

/// Resolved parameters for one tensor: shared values and one map per input.
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// `(name, value)` pairs.
    pub values: Vec<(&'static str, Value)>,
}

impl Params {
    /// The value of `name`.
    pub fn get(&self, name: &str) -> &Value {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or(&Value::None)
    }

    /// `name` as a float (0 if absent).
    pub fn f(&self, name: &str) -> f64 {
        match self.get(name) {
            Value::Float(x) => *x,
            Value::Int(i) => *i as f64,
            Value::Bool(b) => *b as u8 as f64,
            Value::Choice(_) | Value::None => 0.0,
        }
    }

    /// `name` as a float if set.
    pub fn opt_f(&self, name: &str) -> Option<f64> {
        match self.get(name) {
            Value::None => None,
            _ => Some(self.f(name)),
        }
    }

    /// `name` as a choice (`""` if absent).
    pub fn choice(&self, name: &str) -> &'static str {
        match self.get(name) {
            Value::Choice(c) => c,
            _ => "",
        }
    }

    /// `name` as a bool.
    pub fn b(&self, name: &str) -> bool {
        matches!(self.get(name), Value::Bool(true))
    }

    /// `name` as an integer.
    pub fn i(&self, name: &str) -> i64 {
        match self.get(name) {
            Value::Int(i) => *i,
            _ => self.f(name) as i64,
        }
    }
}

/// Everything a method sees for one output tensor.
#[derive(Clone)]
pub struct MergeJob<'a> {
    /// Output tensor name (for errors and the random stream).
    pub name: &'a str,
    /// Shape shared by all inputs.
    pub shape: &'a [usize],
    /// Inputs in config order, decoded to f32.
    pub inputs: Vec<&'a [f32]>,
    /// The same inputs as bf16 bits instead, for a pass that asked for them
    /// ([`Streaming::reads_bf16`]) over inputs stored as bf16; `inputs` is then empty.
    /// Otherwise empty.
    pub bf16: Vec<&'a [u16]>,
    /// Index of the base among `inputs`.
    pub base: Option<usize>,
    /// Shared parameters.
    pub shared: &'a Params,
    /// Per-input parameters, parallel to `inputs` (the base's holds only `Input`-scoped ones).
    pub per_input: &'a [Params],
    /// Seed for random methods.
    pub seed: u64,
    /// What the method's whole-model passes found, if it ran any ([`WholeModel`]).
    pub global: Option<&'a Global>,
}

impl<'a> MergeJob<'a> {
    /// The base tensor. Methods whose contract requires a base may call this.
    pub fn base_tensor(&self) -> &'a [f32] {
        self.inputs[self.base.expect("contract guarantees a base")]
    }

    /// Elements in each input of this chunk (as f32 values or as bf16 bits).
    pub fn chunk_len(&self) -> usize {
        self.bf16
            .first()
            .map_or_else(|| self.inputs.first().map_or(0, |x| x.len()), |b| b.len())
    }

    /// The base's bf16 bits, when the chunk came as bf16 ([`bf16`](Self::bf16)).
    pub fn base_bf16(&self) -> Option<&'a [u16]> {
        self.base
            .filter(|_| !self.bf16.is_empty())
            .map(|b| self.bf16[b])
    }

    /// Indices of the non-base inputs, in order (valid also when `inputs` is empty, as it is
    /// for [`Streaming::begin`]).
    pub fn non_base(&self) -> Vec<usize> {
        (0..self.per_input.len())
            .filter(|&i| Some(i) != self.base)
            .collect()
    }

    /// A numeric error naming this tensor.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Numeric {
            name: self.name.to_string(),
            reason: reason.into(),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A merge method.
pub trait Method: Sync + Send {
    /// Metadata.
    fn spec(&self) -> &MethodSpec;
    /// Merge `job`'s whole inputs into `out` (the tensor's length). By default, the streamed
    /// or lazy form over the in-memory inputs; methods with neither implement this.
    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        if let Some(l) = self.lazy() {
            let meta = MergeJob {
                inputs: Vec::new(),
                ..job.clone()
            };
            return l.merge(&meta, &job.inputs, out);
        }
        let s = self
            .streaming(job)
            .expect("a method without a streamed or lazy form implements merge");
        merge_whole(s, job, out)
    }
    /// The whole-model passes of this method, if it has any: statistics over every tensor,
    /// gathered before the first output is computed and then visible to each tensor's merge as
    /// [`MergeJob::global`].
    fn whole_model(&self) -> Option<&dyn WholeModel> {
        None
    }
    /// The lazy form of this method, if it has one: the executor then hands it the inputs
    /// undecoded and it reads them one at a time, so a worker holds the few whole tensors the
    /// method needs (an SVD method: the base, one input, its accumulators) instead of all.
    fn lazy(&self) -> Option<&dyn Lazy> {
        None
    }
    /// The statistics this method reads per input model (`stats:` in the config), if any: the
    /// planner then requires them of every model it merges, and the method reads them through
    /// [`Inputs::stat`].
    fn stats_kind(&self) -> Option<crate::stats::Kind> {
        None
    }
    /// The streamed form of this method, if it has one: the executor then feeds the inputs in
    /// chunks, so a worker holds a few chunks instead of a few whole tensors.
    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        None
    }
}

/// The whole inputs of one tensor, decoded to f32 on request.
pub trait Inputs {
    /// Decode input `k` (in config order) into `buf`, resized to the tensor's length.
    fn read(&self, k: usize, buf: &mut Vec<f32>) -> Result<()>;
    /// Statistic `kind` of this tensor in input `k`'s stats file, checked to have `shape` and to
    /// have been measured on this input's stored tensor; `None` where the file does not
    /// describe the tensor (or the input has no stats file).
    fn stat(
        &self,
        _k: usize,
        _kind: crate::stats::Kind,
        _shape: &[usize],
    ) -> Result<Option<Vec<f64>>> {
        Ok(None)
    }
    /// The metadata of input `k`'s stats file, if it has one.
    fn stat_meta(&self, _k: usize) -> Option<&crate::stats::Meta> {
        None
    }
}

impl Inputs for Vec<&[f32]> {
    fn read(&self, k: usize, buf: &mut Vec<f32>) -> Result<()> {
        buf.clear();
        buf.extend_from_slice(self[k]);
        Ok(())
    }
}

/// A method that reads whole inputs one at a time.
pub trait Lazy: Sync {
    /// Merge into `out`; `job.inputs` is empty, the inputs come from `inputs`.
    fn merge(&self, job: &MergeJob, inputs: &dyn Inputs, out: &mut [f32]) -> Result<()>;
}

/// Whole-model statistics, gathered by [`WholeModel`] passes.
pub type Global = Box<dyn std::any::Any + Send + Sync>;

/// Passes over the whole model before any output: e.g. TIES's global magnitude threshold over
/// every tensor of a task vector. The executor streams every participating tensor through each
/// pass (chunks in index order, tensors on any worker in any order), folds each tensor's
/// accumulator into the model's with [`absorb`](WholeModel::absorb), and ends the pass.
/// Folding must not depend on order (integer counts, or per-tensor slots combined at the end),
/// so that results do not depend on the thread count.
pub trait WholeModel: Sync {
    /// The statistics to gather for these tensors (jobs without inputs, in plan order), or
    /// `None` when this configuration needs no whole-model pass.
    fn begin_model(&self, jobs: &[MergeJob]) -> Result<Option<Global>>;
    /// How many passes `global` needs.
    fn model_passes(&self, global: &Global) -> usize;
    /// The model-wide accumulator of pass `pass`.
    fn begin_pass(&self, pass: usize, global: &Global) -> State;
    /// A fresh accumulator for tensor `index` (of `jobs`) in pass `pass`, or `None` if the
    /// tensor does not take part.
    fn begin_tensor(
        &self,
        pass: usize,
        global: &Global,
        index: usize,
        job: &MergeJob,
    ) -> Option<State>;
    /// Observe a chunk of a participating tensor, starting at element `offset`.
    fn observe_tensor(
        &self,
        pass: usize,
        global: &Global,
        job: &MergeJob,
        offset: usize,
        acc: &mut State,
    ) -> Result<()>;
    /// Fold tensor `index`'s accumulator `tensor` into the pass's accumulator `model`.
    fn absorb(&self, pass: usize, global: &Global, model: &mut State, index: usize, tensor: State);
    /// End of pass `pass`: keep what `model` gathered in `global`.
    fn end_model_pass(&self, pass: usize, global: &mut Global, model: State) -> Result<()>;
}

/// Per-tensor state of a streamed merge, owned by the executor between calls.
pub type State = Box<dyn std::any::Any + Send>;

/// A method computed in chunks: zero or more statistics passes over the inputs (per-tensor
/// thresholds, norms, dot products), then an output pass. Chunks arrive in index order, each
/// as `job.inputs` = the chunk's slices, starting at element `offset` of the tensor; every
/// pass sees every element once. The result must not depend on how the tensor is cut.
pub trait Streaming: Sync {
    /// Fresh state for one tensor (`job.inputs` is empty here). Default: none.
    fn begin(&self, _job: &MergeJob) -> Result<State> {
        Ok(Box::new(()))
    }
    /// How many statistics passes `state` needs. Default: none (an elementwise method).
    fn passes(&self, _state: &State) -> usize {
        0
    }
    /// Whether pass `pass` (`passes(state)`: the output pass) reads bf16 chunks
    /// ([`MergeJob::bf16`]) when every input is stored as bf16, instead of f32 ones: the
    /// executor then skips decoding them. Default: no.
    fn reads_bf16(&self, _pass: usize, _job: &MergeJob, _state: &State) -> bool {
        false
    }
    /// Chunks hold a whole number of this many elements (a row, for row-wise statistics).
    fn granule(&self, _job: &MergeJob) -> usize {
        1
    }
    /// Statistics pass `pass` over one chunk.
    fn observe(
        &self,
        _pass: usize,
        _job: &MergeJob,
        _offset: usize,
        _state: &mut State,
    ) -> Result<()> {
        Ok(())
    }
    /// End of statistics pass `pass`.
    fn end_pass(&self, _pass: usize, _job: &MergeJob, _state: &mut State) -> Result<()> {
        Ok(())
    }
    /// Output pass over one chunk: every element of `out` must be written (it holds whatever
    /// the executor's buffer held before; debug builds fill it with NaN, which the output check
    /// rejects, so a missed element fails the tests).
    fn apply(
        &self,
        job: &MergeJob,
        offset: usize,
        state: &mut State,
        out: &mut [f32],
    ) -> Result<()>;
}

/// Run a streamed method over whole in-memory inputs as a single chunk.
pub fn merge_whole(s: &dyn Streaming, job: &MergeJob, out: &mut [f32]) -> Result<()> {
    let meta = MergeJob {
        inputs: Vec::new(),
        bf16: Vec::new(),
        ..*job
    };
    let state = s.begin(&meta)?;
    merge_whole_from(s, job, state, out)
}

/// [`merge_whole`] from a given state (a method that prepares part of it itself).
pub fn merge_whole_from(
    s: &dyn Streaming,
    job: &MergeJob,
    mut state: State,
    out: &mut [f32],
) -> Result<()> {
    for pass in 0..s.passes(&state) {
        s.observe(pass, job, 0, &mut state)?;
        s.end_pass(pass, job, &mut state)?;
    }
    s.apply(job, 0, &mut state, out)
}

/// A method's shared parameters at their defaults, with `overrides` set (for tests).
#[cfg(test)]
pub(crate) fn shared_params(method: &dyn Method, overrides: &[(&'static str, Value)]) -> Params {
    let mut values: Vec<(&'static str, Value)> = method
        .spec()
        .params
        .iter()
        .filter(|p| p.scope == Scope::Shared)
        .filter_map(|p| p.default.clone().map(|d| (p.name, d)))
        .collect();
    for (k, v) in overrides {
        values.retain(|(n, _)| n != k);
        values.push((k, v.clone()));
    }
    Params { values }
}

/// The state a method created, by type.
pub fn state_mut<T: 'static>(state: &mut State) -> &mut T {
    state
        .downcast_mut::<T>()
        .expect("state made by this method's begin")
}

/// Every method amalgam knows, by name.
pub fn registry() -> &'static [Box<dyn Method>] {
    static REGISTRY: std::sync::OnceLock<Vec<Box<dyn Method>>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut v: Vec<Box<dyn Method>> = vec![
            Box::new(linear::Linear::default()),
            Box::new(slerp::Slerp::default()),
            Box::new(nuslerp::NuSlerp::default()),
            Box::new(multislerp::MultiSlerp::default()),
            Box::new(karcher::Karcher::default()),
            Box::new(model_stock::ModelStock::default()),
            Box::new(passthrough::Passthrough::default()),
            Box::new(nearswap::NearSwap::default()),
            Box::new(arcee_fusion::ArceeFusion::default()),
            Box::new(sce::Sce::default()),
            Box::new(ram::Ram::new(false)),
            Box::new(ram::Ram::new(true)),
            Box::new(iso::Iso::new(false)),
            Box::new(iso::Iso::new(true)),
            Box::new(tsv::TsvMerge::default()),
            Box::new(emr::Emr::default()),
            Box::new(consensus::Consensus::default()),
            Box::new(pcb::Pcb::default()),
            Box::new(regmean::RegMean::default()),
            Box::new(fisher::Fisher::default()),
        ];
        v.extend(
            gta::all()
                .into_iter()
                .map(|m| Box::new(m) as Box<dyn Method>),
        );
        v
    })
}

/// Look a method up by name; the error lists the valid names.
pub fn get(name: &str) -> std::result::Result<&'static dyn Method, String> {
    registry()
        .iter()
        .find(|m| m.spec().name == name)
        .map(|m| m.as_ref())
        .ok_or_else(|| {
            let mut names: Vec<_> = registry().iter().map(|m| m.spec().name).collect();
            names.sort();
            format!(
                "unknown merge_method '{name}'; valid methods: {}",
                names.join(", ")
            )
        })
}

pub use crate::simd::weighted_sum;

/// Euclidean norm accumulated in f64.
pub fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}
