//! The input side of the executor: the inputs of one output tensor, read chunk by chunk with
//! positioned reads (nothing stays mapped), decoded to f32 or handed over as bf16 bits, checked
//! for NaN and infinity as they are first read, with a `model+adapter` input's LoRA delta added
//! as it is read, and held in memory between passes when they fit the worker's budget.
//! Used by `merge` and by the task library's `build`.

use crate::dtype::{decode_f32_append, decode_f32_append_finite};
use crate::error::{Error, Result};
use crate::io::{TensorEntry, TensorView};
use crate::methods::{Inputs, MergeJob};
use crate::plan::{self, ModelSet};
use crate::vocab::TensorRows;
use crate::vocab::rows::{PadCache, RowReader};

/// Open the inputs of a merged tensor and hand them to `f` as a [`Source`] whose raw byte
/// buffers come from (and go back to) the worker's `pool`.
pub(crate) fn with_source<R>(
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
pub(crate) fn chunks(n: usize, step: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..n.max(1))
        .step_by(step)
        .map(move |a| a..(a + step).min(n))
}

/// The inputs of one output tensor, read chunk by chunk with positioned reads into a small
/// read-ahead buffer per input (nothing stays mapped, so resident memory is the workers' buffers
/// however large the model), decoded to f32 and checked.
pub(crate) struct Source<'a> {
    set: &'a ModelSet,
    pub(crate) inputs: &'a [plan::Input],
    views: &'a [TensorView<'a>],
    entries: &'a [&'a TensorEntry],
    /// Whether a whole pass has read (and so checked) every input already.
    checked: std::cell::Cell<bool>,
    /// Per input: the LoRA delta of a `model+adapter` input (module and decoded factors).
    patches: Vec<Option<Patch<'a>>>,
    /// Scratch rows of a delta.
    rows: std::cell::RefCell<(Vec<f32>, Vec<f32>)>,
    /// Scratch rows of an aligned input, and the stored rows' bytes and values.
    aligned: std::cell::RefCell<Vec<f32>>,
    stored: std::cell::RefCell<(Vec<u8>, Vec<f32>)>,
    /// Padding rows of aligned inputs, once computed.
    pads: PadCache,
    /// Per input: the elements read ahead and their raw bytes (u64s, so any dtype's view of
    /// them is aligned).
    raw: std::cell::RefCell<Vec<(std::ops::Range<usize>, Vec<u64>)>>,
    /// Whether the raw buffers hold the inputs' first elements, up to this many, as they are
    /// read, so later passes read memory instead of the files ([`Source::hold`]).
    held: std::cell::Cell<Option<usize>>,
    /// The input whose stored bytes are hashed as they are first read, in order
    /// ([`hash_input`](Self::hash_input)): its index, the hash so far and the bytes it covers.
    hash: std::cell::RefCell<Option<(usize, blake3::Hasher, usize)>>,
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

/// The stored rows of a tensor's inputs, read for an aligned input.
struct StoredRows<'s, 'a> {
    source: &'s Source<'a>,
    cols: usize,
}

impl RowReader for StoredRows<'_, '_> {
    fn read_rows(&self, input: usize, first: usize, count: usize, out: &mut [f32]) -> Result<()> {
        let s = self.source;
        let (view, entry) = (&s.views[input], s.entries[input]);
        let size = view.dtype.size();
        let mut stored = s.stored.borrow_mut();
        let (bytes, values) = &mut *stored;
        bytes.resize(count * self.cols * size, 0);
        s.model(input).read_at(
            entry.shard,
            entry.range.start + first * self.cols * size,
            bytes,
        )?;
        values.clear();
        decode_f32_append(view.dtype, bytes, values);
        // An adapter's LoRA delta on the stored rows, before they are permuted.
        if let Some(p) = &s.patches[input] {
            let start = first * self.cols;
            p.add(
                start..start + values.len(),
                values,
                &mut s.rows.borrow_mut(),
            );
        }
        out[..values.len()].copy_from_slice(values);
        Ok(())
    }
}

/// A lazy method's view of the inputs: each read decodes one whole input and checks it.
pub(crate) struct WholeInputs<'a, 'b> {
    /// The inputs.
    pub(crate) source: &'b Source<'a>,
    /// Elements of the tensor.
    pub(crate) n: usize,
}

impl Inputs for WholeInputs<'_, '_> {
    fn read(&self, k: usize, buf: &mut Vec<f32>) -> Result<()> {
        self.source.read_input(k, 0..self.n, buf, true)
    }

    fn stat(
        &self,
        k: usize,
        kind: crate::stats::Kind,
        shape: &[usize],
    ) -> Result<Option<Vec<f64>>> {
        let source = self.source;
        let input = &source.inputs[k];
        let Some(stats) = &source.set.stats[input.model] else {
            return Ok(None);
        };
        if !stats.has(&input.tensor, kind) {
            return Ok(None);
        }
        let stored = source.views[k].bytes;
        let got = stats.get(&input.tensor, kind, shape, stored);
        // The hash read the tensor's stored bytes through the file's map (the merge itself reads
        // them with positioned reads): give those pages back, or a merge over many models
        // would keep every one it has hashed resident.
        let entry = source.entries[k];
        source
            .model(k)
            .release_range(entry.shard, entry.range.clone());
        got
    }

    fn stat_meta(&self, k: usize) -> Option<&crate::stats::Meta> {
        let input = &self.source.inputs[k];
        self.source.set.stats[input.model].as_ref().map(|s| &s.meta)
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
            aligned: Default::default(),
            stored: Default::default(),
            pads: PadCache::default(),
            raw: std::cell::RefCell::new(raw.into_iter().map(|b| (0..0, b)).collect()),
            held: std::cell::Cell::new(None),
            hash: std::cell::RefCell::new(None),
        })
    }

    /// Keep elements `0..n` of every input in memory as the next pass reads them (in order,
    /// from the start), for the passes after it, if their raw bytes fit in `budget`.
    pub(crate) fn hold(&self, n: usize, budget: usize) {
        let bytes: usize = self.views.iter().map(|v| n * v.dtype.size()).sum();
        // Aligned inputs are assembled from rows anywhere in their tensors: read again.
        if bytes > budget || self.any_aligned() {
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
    pub(crate) fn read(&self, range: std::ops::Range<usize>, bufs: &mut [Vec<f32>]) -> Result<()> {
        let check = !self.checked.get();
        for (k, buf) in bufs.iter_mut().enumerate() {
            self.read_input(k, range.clone(), buf, check)?;
        }
        Ok(())
    }

    /// Decode elements `range` of input `k` into `buf`.
    pub(crate) fn read_input(
        &self,
        k: usize,
        range: std::ops::Range<usize>,
        buf: &mut Vec<f32>,
        check: bool,
    ) -> Result<()> {
        if let Some(rows) = &self.inputs[k].rows {
            return self.read_aligned(k, rows, range, buf, check);
        }
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

    /// Elements `range` of input `k` aligned to the output vocabulary: its rows assembled from
    /// the stored rows `rows` names (whole rows, so any chunking gives the same values).
    fn read_aligned(
        &self,
        k: usize,
        rows: &TensorRows,
        range: std::ops::Range<usize>,
        buf: &mut Vec<f32>,
        check: bool,
    ) -> Result<()> {
        buf.clear();
        let cols = rows.cols.max(1);
        let (r0, r1) = (range.start / cols, range.end.div_ceil(cols));
        let mut block = std::mem::take(&mut *self.aligned.borrow_mut());
        block.clear();
        block.resize((r1 - r0) * cols, 0.0);
        let reader = StoredRows { source: self, cols };
        rows.assemble(k, r0, r1, &reader, &self.pads, &mut block)?;
        let skip = range.start - r0 * cols;
        buf.extend_from_slice(&block[skip..skip + range.len()]);
        *self.aligned.borrow_mut() = block;
        if check && !crate::simd::all_finite(buf) {
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
        if let Some((i, hasher, done)) = self.hash.borrow_mut().as_mut()
            && *i == k
            && *done == from * size
        {
            hasher.update(bytes);
            *done += bytes.len();
        }
        *held = start..end;
        Ok(())
    }

    /// Hash input `k`'s stored bytes as the reads that follow first cover them (the task
    /// library records its base's content hashes without reading the base again).
    pub(crate) fn hash_input(&self, k: usize) {
        *self.hash.borrow_mut() = Some((k, blake3::Hasher::new(), 0));
    }

    /// The BLAKE3 (hex) of the input [`hash_input`](Self::hash_input) named, if the reads
    /// since covered all its bytes.
    pub(crate) fn input_hash(&self) -> Option<String> {
        let hash = self.hash.borrow();
        let (k, hasher, done) = hash.as_ref()?;
        (*done == self.views[*k].bytes.len()).then(|| hasher.finalize().to_hex().to_string())
    }

    /// Whether every input is stored as bf16 and read as is (no LoRA delta to add, no
    /// vocabulary alignment).
    pub(crate) fn all_bf16(&self) -> bool {
        self.views
            .iter()
            .all(|v| v.dtype == crate::dtype::DType::BF16)
            && self.patches.iter().all(Option::is_none)
            && !self.any_aligned()
    }

    /// Whether some input is aligned to the output vocabulary.
    fn any_aligned(&self) -> bool {
        self.inputs.iter().any(|i| i.rows.is_some())
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
    pub(crate) fn chunk<R>(
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

    /// Input `k` whole as stored: its dtype and bytes, checked for NaN and infinity (a
    /// `model+adapter` input: its values with the delta added, encoded in the model's dtype).
    pub(crate) fn raw_bytes(&self, k: usize, n: usize) -> Result<(crate::DType, Vec<u8>)> {
        let view = &self.views[k];
        let rewritten = self.patches[k].is_some() || self.inputs[k].rows.is_some();
        if rewritten || view.dtype.is_float() {
            let mut values = Vec::new();
            self.read_input(k, 0..n, &mut values, true)?;
            if rewritten {
                let mut bytes = Vec::new();
                crate::dtype::encode_f32(view.dtype, &values, &mut bytes);
                return Ok((view.dtype, bytes));
            }
        }
        let (model, name) = self.set.file_of(&self.inputs[k]);
        let bytes = view.bytes.to_vec();
        model.release(name);
        Ok((view.dtype, bytes))
    }

    /// The pass is over: later passes read the same (checked) bytes.
    pub(crate) fn end_pass(&self) {
        self.checked.set(true);
    }

    fn model(&self, k: usize) -> &crate::io::Model {
        self.set.file_of(&self.inputs[k]).0
    }
}
