//! What a storage scheme is: one trait, one file per scheme, one static registry.
//!
//! A scheme turns one tensor of the base and of every task into a shared part (fixed size,
//! known before any data is read: EMR's unified vector, TALL's multi-task vector, Twin's merged
//! delta, RTVQ's quantized mean) and a per-task module (any size: packed bits, codes with
//! scales, low-rank factors), and rebuilds a task's tensor from them. Like a merge method it
//! never opens files: it reads its inputs through [`TensorInputs`], writes through
//! [`Encoded`], and rebuilds from the parts a [`Parts`] hands it.

use crate::config::Value;
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::{Contract, MergeJob, Method, MethodSpec, ParamSpec};
use crate::sums::LaneSum;

/// A task's part of one tensor as a scheme hands it over: suffix, dtype, shape, bytes.
pub type TaskPart = (&'static str, DType, Vec<usize>, Vec<u8>);

/// A fixed-size shared part of one tensor: the part's name suffix, dtype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct PartSpec {
    /// The suffix: the part is stored as `TENSOR:SUFFIX`.
    pub suffix: &'static str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Per-task sums a scheme gathers while encoding, added over every tensor.
///
/// With `τ̂` the rebuilt task vector before the task's scale `s` (EMR's rescaler; 1 for the other
/// schemes) and `τ` the true one, `a = Σ τ̂²`, `b = Σ τ̂·τ`, `c = Σ τ²`, so the reconstruction
/// error is `‖s·τ̂ − τ‖² = s²a − 2sb + c` whatever `s` turns out to be. `sums` are the scheme's
/// own accumulators (EMR's rescaler sums).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskStats {
    /// `Σ τ̂²`.
    pub a: f64,
    /// `Σ τ̂·τ`.
    pub b: f64,
    /// `Σ τ²`.
    pub c: f64,
    /// Scheme-defined sums.
    pub sums: Vec<f64>,
}

impl TaskStats {
    /// Add another tensor's sums.
    pub fn add(&mut self, other: &TaskStats) {
        self.a += other.a;
        self.b += other.b;
        self.c += other.c;
        if self.sums.len() < other.sums.len() {
            self.sums.resize(other.sums.len(), 0.0);
        }
        for (s, o) in self.sums.iter_mut().zip(&other.sums) {
            *s += o;
        }
    }

    /// Add a whole tensor's `τ̂` against `τ`.
    pub fn observe(&mut self, rebuilt: &[f32], truth: &[f32]) {
        let mut s = ChunkStats::new(0);
        s.observe(0, rebuilt, truth);
        self.add(&s.totals());
    }

    /// `‖s·τ̂ − τ‖ / ‖τ‖` (0 when the task vector is zero).
    pub fn relative_error(&self, scale: f64) -> f64 {
        if self.c == 0.0 {
            return 0.0;
        }
        let err2 = scale * scale * self.a - 2.0 * scale * self.b + self.c;
        (err2.max(0.0) / self.c).sqrt()
    }
}

/// One task's [`TaskStats`] over one tensor, gathered chunk by chunk in lanes by element index
/// ([`LaneSum`]): vectorised, and the same sums whatever the chunking.
#[derive(Clone, Debug, Default)]
pub struct ChunkStats {
    a: LaneSum,
    b: LaneSum,
    c: LaneSum,
    extra: Vec<LaneSum>,
    tmp: Vec<f32>,
}

impl ChunkStats {
    /// Sums with `extra` scheme-defined ones.
    pub fn new(extra: usize) -> ChunkStats {
        ChunkStats {
            extra: vec![LaneSum::default(); extra],
            ..Default::default()
        }
    }

    /// Add elements `offset..` of `τ̂` (`rebuilt`) against `τ` (`truth`).
    pub fn observe(&mut self, offset: usize, rebuilt: &[f32], truth: &[f32]) {
        quad(
            offset,
            rebuilt,
            truth,
            [&mut self.a, &mut self.b, &mut self.c],
        );
    }

    /// The lane sums of `Σ τ̂²`, `Σ τ̂·τ`, `Σ τ²`, for a kernel that adds to them itself (in
    /// index order, as [`observe`](Self::observe) does).
    pub(crate) fn lanes(&mut self) -> [&mut LaneSum; 3] {
        [&mut self.a, &mut self.b, &mut self.c]
    }

    /// Add elements `offset..` of `values` to extra sum `k`.
    pub fn extra(&mut self, k: usize, offset: usize, values: impl Iterator<Item = f32>) {
        self.tmp.clear();
        self.tmp.extend(values);
        self.extra[k].add(offset, &self.tmp);
    }

    /// The totals.
    pub fn totals(&self) -> TaskStats {
        TaskStats {
            a: self.a.total(),
            b: self.b.total(),
            c: self.c.total(),
            sums: self.extra.iter().map(LaneSum::total).collect(),
        }
    }
}

crate::simd::vectorized! {
    /// `Σ r²`, `Σ r·t`, `Σ t²` of a chunk into their lane sums, in one loop (the sums
    /// [`LaneSum::add`] gives).
    fn quad(offset: usize, r: &[f32], t: &[f32], sums: [&mut LaneSum; 3]) {
        let [a, b, c] = sums;
        let n = r.len().min(t.len());
        let (head, blocks) = crate::sums::spans(offset, n);
        let one = |j: usize, a: &mut LaneSum, b: &mut LaneSum, c: &mut LaneSum| {
            a.one(offset + j, r[j] * r[j]);
            b.one(offset + j, r[j] * t[j]);
            c.one(offset + j, t[j] * t[j]);
        };
        for j in 0..head {
            one(j, a, b, c);
        }
        let mut sums = crate::sums::Blocks::new([&mut *a, &mut *b, &mut *c], offset + head + 8);
        for k in 0..blocks {
            let j = head + 8 * k;
            let (rb, tb): (&[f32; 8], &[f32; 8]) =
                (r[j..j + 8].try_into().expect("8"), t[j..j + 8].try_into().expect("8"));
            sums.add([
                std::array::from_fn(|l| rb[l] * rb[l]),
                std::array::from_fn(|l| rb[l] * tb[l]),
                std::array::from_fn(|l| tb[l] * tb[l]),
            ]);
        }
        sums.finish();
        for j in head + 8 * blocks..n {
            one(j, a, b, c);
        }
    }
}

/// What a scheme produces for one tensor, besides its shared parts (which it writes through
/// [`Encoded::shared`] as it goes).
pub trait Encoded {
    /// Write elements starting at `offset` of shared part `part` (index into the tensor's
    /// [`Scheme::shared_parts`]), given as f32 and stored in the part's dtype.
    fn shared(&mut self, part: usize, offset: usize, values: &[f32]) -> Result<()>;
    /// Write bytes starting at byte `offset` of shared part `part`, as stored.
    fn shared_bytes(&mut self, part: usize, offset: usize, bytes: &[u8]) -> Result<()>;
    /// Store a part of task `task`'s module: `TENSOR:SUFFIX` with this dtype, shape and data.
    fn task(
        &mut self,
        task: usize,
        suffix: &'static str,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<()>;
    /// Task `task`'s sums for this tensor.
    fn stats(&mut self, task: usize) -> &mut TaskStats;
}

/// The inputs of one tensor as a scheme reads them: streamed passes over chunks of every input
/// (the base and each task, decoded to f32), or one whole input at a time.
pub trait TensorInputs {
    /// Announce how many streamed passes follow, so that inputs read more than once are held
    /// in memory when they fit the worker's budget.
    fn plan_passes(&mut self, passes: usize);
    /// One streamed pass: `f(chunk, offset)` for chunks in index order, whose `inputs` hold the
    /// chunk of every input (`base` marks the base; the tasks are the others, in task order),
    /// each chunk a whole number of `granule` elements.
    fn pass(
        &mut self,
        granule: usize,
        f: &mut dyn FnMut(&MergeJob, usize) -> Result<()>,
    ) -> Result<()>;
    /// [`pass`](Self::pass) with each chunk as bf16 bits ([`MergeJob::bf16`], `inputs` empty)
    /// when every input is stored as bf16 and read as is, for kernels that widen the values in
    /// registers ([`crate::simd::Elems`]); decoded to f32 otherwise, as `pass` does.
    fn pass_bf16(
        &mut self,
        granule: usize,
        f: &mut dyn FnMut(&MergeJob, usize) -> Result<()>,
    ) -> Result<()>;
    /// Input `k` (in job order) whole, decoded to f32.
    fn whole(&mut self, k: usize, buf: &mut Vec<f32>) -> Result<()>;
    /// Input `k` whole as stored (dtype and bytes; a `model+adapter` input's values with the
    /// adapter's delta, in the model's dtype).
    fn raw(&mut self, k: usize) -> Result<(DType, Vec<u8>)>;
    /// The merged model's tensor (`θ*`, of the config's `merge:` method) whole, for schemes
    /// built on one; an error otherwise.
    fn merged(&mut self, buf: &mut Vec<f32>) -> Result<()>;
}

/// The parts of one tensor that rebuilding one task reads.
pub trait Parts {
    /// Bytes of the task's part `suffix`, if the task stores one for this tensor.
    fn task(&self, suffix: &str) -> Result<Option<&[u8]>>;
    /// Shape of the task's part `suffix`.
    fn task_shape(&self, suffix: &str) -> Option<&[usize]>;
    /// Dtype of the task's part `suffix`.
    fn task_dtype(&self, suffix: &str) -> Option<DType>;
    /// Elements `range` of shared part `suffix`, decoded to f32.
    fn shared(&self, suffix: &str, range: std::ops::Range<usize>, out: &mut Vec<f32>)
    -> Result<()>;
    /// The whole shared part `suffix` as stored, if the library has it for this tensor.
    fn shared_bytes(&self, suffix: &str) -> Result<Option<Vec<u8>>>;
    /// The task's scale (EMR's rescaler; 1 for the other schemes).
    fn scale(&self) -> f32;
    /// The tensor's name, for errors.
    fn tensor(&self) -> &str;
    /// An error about this tensor's parts (a library that does not fit its scheme).
    fn corrupt(&self, reason: String) -> crate::Error;
}

/// A storage scheme.
///
/// Its [`Method::spec`] gives its name, parameters (resolved per tensor and task by the
/// planner, as merge parameters are) and input contract; it is never run as a merge.
pub trait Scheme: Method {
    /// Whether the scheme works on a merged model given by the config's `merge:` block
    /// (required), or may (optional: e.g. TALL with `merged: ties`).
    fn merge_block(&self) -> MergeBlock {
        MergeBlock::No
    }
    /// Check the resolved parameters of a tensor before any data is read (ranges).
    fn check(&self, _job: &MergeJob) -> std::result::Result<(), String> {
        Ok(())
    }
    /// The shared parts stored for this float tensor (default: none).
    fn shared_parts(&self, _job: &MergeJob, _out_dtype: DType) -> Vec<PartSpec> {
        Vec::new()
    }
    /// How many sums of [`TaskStats::sums`] the scheme keeps per task.
    fn sums(&self) -> usize {
        0
    }
    /// Encode one float tensor whose tasks are not all equal to the base.
    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()>;
    /// Task `task`'s scale from its sums over the whole model (default: 1).
    fn scale(&self, _stats: &TaskStats, _params: &serde_json::Value) -> Result<f64> {
        Ok(1.0)
    }
    /// A decoder of one tensor of shape `shape` for one task, from its parts (decoding
    /// whatever the whole tensor shares, e.g. low-rank factors, once).
    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>>;
}

/// Rebuilds one task's tensor chunk by chunk.
pub trait Decoder {
    /// Elements `range` of the rebuilt tensor `θ̂_t` into `out` (`range.len()` long, every
    /// element written), from the base's elements `base` of the same range.
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()>;
}

/// The decoder of a tensor the task stores as it is (`raw`), or of one it does not store
/// (the base's values), if either is the case.
pub(crate) fn raw_decoder<'a>(
    parts: &'a dyn Parts,
    shape: &[usize],
) -> Result<Option<Box<dyn Decoder + 'a>>> {
    let Some(bytes) = parts.task("raw")? else {
        return Ok(None);
    };
    let dtype = parts.task_dtype("raw").expect("part exists");
    let n: usize = shape.iter().product();
    if bytes.len() != n * dtype.size() {
        return Err(parts.corrupt(format!(
            "its raw part has {} bytes, expected {} for {n} {dtype} elements",
            bytes.len(),
            n * dtype.size()
        )));
    }
    Ok(Some(Box::new(Raw { bytes, dtype })))
}

/// A tensor a task does not store: its rebuilt values are the base's.
pub(crate) struct Unchanged;

impl Decoder for Unchanged {
    fn decode(
        &mut self,
        _range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        out.copy_from_slice(base);
        Ok(())
    }
}

struct Raw<'a> {
    bytes: &'a [u8],
    dtype: DType,
}

impl Decoder for Raw<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        _base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let size = self.dtype.size();
        let mut buf = Vec::with_capacity(range.len());
        crate::dtype::decode_f32(
            self.dtype,
            &self.bytes[range.start * size..range.end * size],
            &mut buf,
        );
        out.copy_from_slice(&buf);
        Ok(())
    }
}

/// Whether a scheme uses a merged model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeBlock {
    /// Never.
    No,
    /// When its parameters say so.
    Optional,
    /// Always: the config needs a `merge:` block.
    Required,
}

/// A scheme's spec: its parameters, with a base model required.
pub(crate) fn spec(
    name: &'static str,
    pretty_name: &'static str,
    reference: &'static str,
    params: Vec<ParamSpec>,
) -> MethodSpec {
    MethodSpec {
        name,
        pretty_name,
        reference,
        params,
        contract: Contract {
            min_non_base: 1,
            ..Contract::WITH_BASE
        },
    }
}

/// Every scheme, by name.
pub fn registry() -> &'static [Box<dyn Scheme>] {
    static REGISTRY: std::sync::OnceLock<Vec<Box<dyn Scheme>>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| {
        vec![
            Box::new(super::emr::Emr::default()),
            Box::new(super::tall::Tall::default()),
            Box::new(super::tsv_c::TsvC::default()),
            Box::new(super::sign::Sign::default()),
            Box::new(super::ternary::Ternary::default()),
            Box::new(super::quant::Quant::default()),
            Box::new(super::twin::Twin::default()),
            Box::new(super::dense::Dense::default()),
        ]
    })
}

/// Look a scheme up by name; the error lists the valid names.
pub fn get(name: &str) -> std::result::Result<&'static dyn Scheme, String> {
    registry()
        .iter()
        .find(|s| s.spec().name == name)
        .map(|s| s.as_ref())
        .ok_or_else(|| {
            let names: Vec<_> = registry().iter().map(|s| s.spec().name).collect();
            format!(
                "unknown scheme '{name}'; valid schemes: {}",
                names.join(", ")
            )
        })
}

/// A float parameter in `[lo, hi]` (inclusive), or an error naming it.
pub(crate) fn in_range(
    job: &MergeJob,
    params: &crate::methods::Params,
    name: &str,
    lo: f64,
    hi: f64,
) -> std::result::Result<f64, String> {
    let v = params.f(name);
    if !(v >= lo && v <= hi) {
        return Err(format!(
            "parameter '{name}' is {v} for tensor '{}'; it must be in [{lo}, {hi}]",
            job.name
        ));
    }
    Ok(v)
}

/// Store task `task`'s tensor as it is (`raw`): lossless, for tensors a scheme does not
/// compress (1-D tensors of the low-rank and sign schemes, the `dense` scheme).
pub(crate) fn store_raw(
    job: &MergeJob,
    inputs: &mut dyn TensorInputs,
    k: usize,
    task: usize,
    out: &mut dyn Encoded,
) -> Result<()> {
    let (dtype, bytes) = inputs.raw(k)?;
    let (mut base, mut tau) = (Vec::new(), Vec::new());
    inputs.whole(job.base.expect("contract: a base"), &mut base)?;
    inputs.whole(k, &mut tau)?;
    tau.iter_mut().zip(&base).for_each(|(x, b)| *x -= b);
    out.stats(task).observe(&tau, &tau);
    out.task(task, "raw", dtype, job.shape.to_vec(), bytes)
}

/// Store every task's tensor as it is ([`store_raw`]), for a tensor the scheme does not
/// compress (not 2-D); `Ok(true)` when the tensor was such.
pub(crate) fn raw_unless_matrix(
    job: &MergeJob,
    inputs: &mut dyn TensorInputs,
    out: &mut dyn Encoded,
) -> Result<bool> {
    if matrix(job.shape).is_some() {
        return Ok(false);
    }
    for (t, &i) in job.non_base().iter().enumerate() {
        store_raw(job, inputs, i, t, out)?;
    }
    Ok(true)
}

/// `out = x − b`: a task vector's chunk.
#[inline]
pub(crate) fn delta_into(x: &[f32], b: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(x.iter().zip(b).map(|(&x, &b)| x - b));
}

/// `shared_dtype`: how a shared full-size vector is stored (float32 by default, exact).
pub(crate) fn shared_dtype_param() -> ParamSpec {
    choice("shared_dtype", &["float32", "bfloat16", "float16"])
}

/// The dtype `shared_dtype` names.
pub(crate) fn shared_dtype(job: &MergeJob) -> DType {
    match job.shared.get("shared_dtype") {
        Value::Choice(c) => DType::parse_float(c).unwrap_or(DType::F32),
        _ => DType::F32,
    }
}

/// The one shared part of schemes that keep a full-size vector (EMR's `uni`, TALL's `mtl`,
/// Twin's `merged`), in `shared_dtype`.
pub(crate) fn shared_vector(job: &MergeJob, suffix: &'static str) -> Vec<PartSpec> {
    vec![PartSpec {
        suffix,
        dtype: shared_dtype(job),
        shape: job.shape.to_vec(),
    }]
}

/// `x` as stored in `dtype`: the values read back, and the bytes.
pub(crate) fn stored_as(x: &[f32], dtype: DType) -> (Vec<f32>, Vec<u8>) {
    let mut bytes = Vec::new();
    crate::dtype::encode_f32(dtype, x, &mut bytes);
    let mut back = Vec::new();
    crate::dtype::decode_f32(dtype, &bytes, &mut back);
    (back, bytes)
}

/// Store `values` as task `task`'s F32 part `suffix` (1-D).
pub(crate) fn put_f32(
    out: &mut dyn Encoded,
    task: usize,
    suffix: &'static str,
    values: &[f32],
) -> Result<()> {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.task(task, suffix, DType::F32, vec![values.len()], bytes)
}

/// Store a packed bit stream as task `task`'s U8 part `suffix`.
pub(crate) fn put_bits(
    out: &mut dyn Encoded,
    task: usize,
    suffix: &'static str,
    bits: super::bits::BitWriter,
) -> Result<()> {
    let bytes = bits.into_bytes();
    out.task(task, suffix, DType::U8, vec![bytes.len()], bytes)
}

/// Little-endian f32s, or `None` if `bytes` is not a whole number of them.
pub(crate) fn le_f32s(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// A task's F32 part `suffix` (an error if it is missing or not F32).
pub(crate) fn task_f32s(parts: &dyn Parts, suffix: &str) -> Result<Vec<f32>> {
    let bytes = parts
        .task(suffix)?
        .ok_or_else(|| parts.corrupt(format!("its part '{suffix}' is missing")))?;
    le_f32s(bytes)
        .filter(|_| parts.task_dtype(suffix) == Some(DType::F32))
        .ok_or_else(|| parts.corrupt(format!("its part '{suffix}' is not F32")))
}

/// Check that part `suffix` has `len` bytes.
pub(crate) fn check_len(parts: &dyn Parts, suffix: &str, bytes: &[u8], len: usize) -> Result<()> {
    if bytes.len() != len {
        return Err(parts.corrupt(format!(
            "its part '{suffix}' has {} bytes, expected {len}",
            bytes.len()
        )));
    }
    Ok(())
}

/// The `(rows, cols)` of a 2-D tensor.
pub(crate) fn matrix(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [m, n] => Some((*m, *n)),
        _ => None,
    }
}

/// Parameter helpers shared by the schemes.
pub(crate) fn choice(name: &'static str, options: &'static [&'static str]) -> ParamSpec {
    ParamSpec::new(
        name,
        crate::config::Kind::Choice(options),
        crate::methods::Scope::Shared,
        Value::Choice(options[0]),
    )
}
