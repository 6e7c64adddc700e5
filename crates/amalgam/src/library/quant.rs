//! `quant`: uniformly quantized task vectors (TVQ, Kim et al. 2025), and their residual form
//! (RTVQ: a shared quantized mean plus quantized per-task offsets).
//!
//! For each matrix (2-D tensor), per group of `group_size` consecutive elements (0, the
//! default: the whole tensor): `lo = min`, `step = (max − min)/(2^bits − 1)`, codes
//! `q = round((x − lo)/step)` of `bits` ∈ {2, 3, 4, 8} bits (part `q`, packed as documented in
//! [`super::bits`]), `lo` and `step` per group (parts `lo`, `step`, f32); `x̂ = lo + q·step`.
//! Without `residual`, `x = τ_t`. With `residual: true`, the mean `μ = (1/T) Σ_t τ_t` is
//! quantized once at `base_bits` (default 3) into shared parts `q`, `lo`, `step`, and each task
//! stores `τ_t − μ̂` at `bits`; rebuild `θ0 + μ̂ + offset̂_t`. Other tensors are stored as they
//! are (`raw`).

use super::bits::{self, BitWriter};
use super::scheme::{self, ChunkStats, Decoder, Encoded, PartSpec, Parts, Scheme, TensorInputs};
use crate::config::{Kind, Value};
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};
use crate::simd::{Bf16, Elems};
use crate::sums::LaneSum;

/// The quantization scheme.
pub struct Quant {
    spec: MethodSpec,
}

impl Default for Quant {
    fn default() -> Self {
        Quant {
            spec: scheme::spec(
                "quant",
                "uniformly quantized task vectors (TVQ / RTVQ)",
                "https://arxiv.org/abs/2503.06921",
                vec![
                    ParamSpec::new("bits", Kind::Int, Scope::Shared, Value::Int(4)),
                    ParamSpec::new("group_size", Kind::Int, Scope::Shared, Value::Int(0)),
                    ParamSpec::new("residual", Kind::Bool, Scope::Shared, Value::Bool(false)),
                    ParamSpec::new("base_bits", Kind::Int, Scope::Shared, Value::Int(3)),
                ],
            ),
        }
    }
}

/// Groups of a tensor of `n` elements.
fn groups(n: usize, group: usize) -> usize {
    if group == 0 {
        1
    } else {
        n.div_ceil(group).max(1)
    }
}

/// Per-group minimum and maximum, gathered chunk by chunk.
#[derive(Clone)]
struct Range {
    lo: Vec<f32>,
    hi: Vec<f32>,
    group: usize,
}

impl Range {
    fn new(n: usize, group: usize) -> Range {
        let g = groups(n, group);
        Range {
            lo: vec![f32::INFINITY; g],
            hi: vec![f32::NEG_INFINITY; g],
            group,
        }
    }

    fn observe(&mut self, offset: usize, x: &[f32]) {
        for (g, seg) in segments(offset, x, self.group) {
            (self.lo[g], self.hi[g]) = min_max(seg, self.lo[g], self.hi[g]);
        }
    }

    /// The grid of `bits`-bit codes over these ranges: per group `lo` and `step`.
    fn grid(&self, bits: u32) -> Grid {
        let levels = ((1u32 << bits) - 1) as f32;
        let (lo, step) = self
            .lo
            .iter()
            .zip(&self.hi)
            .map(|(&lo, &hi)| {
                if lo.is_finite() && hi > lo {
                    (lo, (hi - lo) / levels)
                } else if lo.is_finite() {
                    (lo, 0.0)
                } else {
                    (0.0, 0.0)
                }
            })
            .unzip();
        Grid {
            lo,
            step,
            group: self.group,
            bits,
        }
    }
}

/// The parts of elements `offset..offset + len` in each group: `(group, range in the chunk)`.
fn groups_in(
    offset: usize,
    len: usize,
    group: usize,
) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
    let mut e = offset;
    std::iter::from_fn(move || {
        if e >= offset + len {
            return None;
        }
        let (g, end) = match group {
            0 => (0, offset + len),
            _ => (e / group, ((e / group + 1) * group).min(offset + len)),
        };
        let at = e - offset..end - offset;
        e = end;
        Some((g, at))
    })
}

/// The parts of elements `offset..offset + x.len()` in each group: `(group, values)`.
fn segments(offset: usize, x: &[f32], group: usize) -> impl Iterator<Item = (usize, &[f32])> {
    groups_in(offset, x.len(), group).map(move |(g, at)| (g, &x[at]))
}

/// `2²³`: adding it to a float in `[0, 2²³)` rounds it to an integer, half to even (the
/// default rounding of the addition), and leaves that integer in the low mantissa bits.
const ROUNDER: f32 = 8_388_608.0;

/// The code of `x` on the grid `lo + q·step`, `q ≤ max`: `round((x − lo)/step)`, half to even
/// (as `torch.round`), clamped to `[0, max]` (clamped first, which gives the same code, so that
/// the rounding is of a small non-negative value and vectorises); and the value it stands for.
#[inline(always)]
fn code_of(x: f32, lo: f32, step: f32, max: f32) -> (u8, f32) {
    let y = ((x - lo) / step).clamp(0.0, max) + ROUNDER;
    ((y.to_bits() & 0xff) as u8, lo + (y - ROUNDER) * step)
}

crate::simd::vectorized! {
    /// Append the codes of `seg` on the grid `lo + q·step` (`q ≤ max`, [`code_of`]) to `q`, and
    /// the values they stand for to `values`.
    fn quantize_span(seg: &[f32], lo: f32, step: f32, max: f32, q: &mut Vec<u8>, values: &mut Vec<f32>) {
        let (qs, vs) = (q.len(), values.len());
        q.resize(qs + seg.len(), 0);
        values.resize(vs + seg.len(), 0.0);
        for ((o, val), &v) in q[qs..].iter_mut().zip(values[vs..].iter_mut()).zip(seg) {
            (*o, *val) = code_of(v, lo, step, max);
        }
    }
}

/// The bits of a float as an unsigned integer that orders like the float (negatives flipped,
/// positives above them), so that a minimum is one integer instruction without a dependency on
/// a compare-and-blend; exact for every non-NaN value (−0 orders just below +0).
#[inline(always)]
fn ordered(f: f32) -> u32 {
    let b = f.to_bits();
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

/// The inverse of [`ordered`].
#[inline(always)]
fn unordered(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

/// `(min, max)` of `lo`, `hi` and `τ = x − b` over a segment, in 8 lanes of [`ordered`] bits.
#[inline(always)]
fn delta_range<X: Elems, B: Elems>(x: X, b: B, lo: f32, hi: f32) -> (f32, f32) {
    let n = x.len().min(b.len());
    let (mut l, mut h) = ([ordered(lo); 8], [ordered(hi); 8]);
    for k in 0..n / 8 {
        let (xb, bb) = (x.eight(8 * k), b.eight(8 * k));
        for i in 0..8 {
            let t = ordered(xb[i] - bb[i]);
            l[i] = l[i].min(t);
            h[i] = h[i].max(t);
        }
    }
    for j in n / 8 * 8..n {
        let t = ordered(x.at(j) - b.at(j));
        l[0] = l[0].min(t);
        h[0] = h[0].max(t);
    }
    (
        unordered(l.into_iter().fold(u32::MAX, u32::min)),
        unordered(h.into_iter().fold(0, u32::max)),
    )
}

crate::simd::vectorized! {
    /// [`delta_range`] of f32 inputs.
    fn range_f32(x: &[f32], b: &[f32], lo: f32, hi: f32) -> (f32, f32) {
        delta_range(x, b, lo, hi)
    }
}

crate::simd::vectorized! {
    /// [`delta_range`] of bf16 inputs.
    fn range_bf16(x: &[u16], b: &[u16], lo: f32, hi: f32) -> (f32, f32) {
        delta_range(Bf16(x), Bf16(b), lo, hi)
    }
}

/// One grid segment's part of a chunk, elements `offset..`: the codes of `τ = x − b` (packed to
/// `codes`, 8 at a time) and the sums of the values they stand for against `τ`, in one loop.
#[inline(always)]
fn encode_span<E: Elems>(
    offset: usize,
    x: E,
    b: E,
    grid: (f32, f32, u32),
    codes: &mut BitWriter,
    stats: [&mut LaneSum; 3],
) {
    let (lo, step, width) = grid;
    // A flat segment: every code 0, every value `lo` (step 1 and max 0 give exactly that).
    let (step, max) = if step == 0.0 {
        (1.0, 0.0)
    } else {
        (step, ((1u32 << width) - 1) as f32)
    };
    let low = 0x0101_0101_0101_0101u64 * ((1u64 << width) - 1);
    let n = x.len().min(b.len());
    let (head, blocks) = crate::sums::spans(offset, n);
    let [a, c2, t2] = stats;
    #[inline(always)]
    fn one(
        e: usize,
        t: f32,
        grid: (f32, f32, f32, u32),
        codes: &mut BitWriter,
        sums: [&mut LaneSum; 3],
    ) {
        let (lo, step, max, width) = grid;
        let (q, v) = code_of(t, lo, step, max);
        codes.push_code(q as u32, width);
        let [a, c2, t2] = sums;
        a.one(e, v * v);
        c2.one(e, v * t);
        t2.one(e, t * t);
    }
    let g = (lo, step, max, width);
    for j in 0..head {
        one(
            offset + j,
            x.at(j) - b.at(j),
            g,
            codes,
            [&mut *a, &mut *c2, &mut *t2],
        );
    }
    {
        // Tile by tile: the codes, values and sums of a tile in one plain loop (which
        // vectorises, codes narrowed to bytes in vector registers), then its codes packed 8 at
        // a time and its sums added block by block.
        const TILE: usize = 256;
        let mut sums = crate::sums::Blocks::new([&mut *a, &mut *c2, &mut *t2], offset + head + 8);
        let (mut q, mut vv, mut vt, mut tt) =
            ([0u8; TILE], [0f32; TILE], [0f32; TILE], [0f32; TILE]);
        let end = head + 8 * blocks;
        let mut j = head;
        while j < end {
            let m = TILE.min(end - j);
            let (xt, bt) = (x.range(j, j + m), b.range(j, j + m));
            for l in 0..m {
                let t = xt.at(l) - bt.at(l);
                let (c, v) = code_of(t, lo, step, max);
                q[l] = c;
                vv[l] = v * v;
                vt[l] = v * t;
                tt[l] = t * t;
            }
            for k in 0..m / 8 {
                let at = 8 * k..8 * k + 8;
                let word = u64::from_le_bytes(q[at.clone()].try_into().expect("8"));
                codes.push_wide(
                    if width == 8 {
                        word
                    } else {
                        bits::pext(word, low)
                    },
                    8 * width,
                );
                let eight = |a: &[f32; TILE]| -> [f32; 8] { a[at.clone()].try_into().expect("8") };
                sums.add([eight(&vv), eight(&vt), eight(&tt)]);
            }
            j += m;
        }
        sums.finish();
    }
    for j in head + 8 * blocks..n {
        one(
            offset + j,
            x.at(j) - b.at(j),
            g,
            codes,
            [&mut *a, &mut *c2, &mut *t2],
        );
    }
}

crate::simd::vectorized! {
    /// [`encode_span`] of f32 inputs.
    fn encode_f32(offset: usize, x: &[f32], b: &[f32], grid: (f32, f32, u32), codes: &mut BitWriter, stats: [&mut LaneSum; 3]) {
        encode_span(offset, x, b, grid, codes, stats)
    }
}

crate::simd::vectorized! {
    /// [`encode_span`] of bf16 inputs.
    fn encode_bf16(offset: usize, x: &[u16], b: &[u16], grid: (f32, f32, u32), codes: &mut BitWriter, stats: [&mut LaneSum; 3]) {
        encode_span(offset, Bf16(x), Bf16(b), grid, codes, stats)
    }
}

crate::simd::vectorized! {
    /// `(min, max)` of `lo`, `hi` and the values of `seg` ([`delta_range`] against zeros).
    fn min_max(seg: &[f32], lo: f32, hi: f32) -> (f32, f32) {
        delta_range(seg, Zeros(seg.len()), lo, hi)
    }
}

/// `n` zeros, as inputs a kernel subtracts (`x − 0` is `x`, bit for bit).
#[derive(Clone, Copy)]
struct Zeros(usize);

impl Elems for Zeros {
    #[inline(always)]
    fn len(self) -> usize {
        self.0
    }
    #[inline(always)]
    fn prefix(self, n: usize) -> Self {
        Zeros(n.min(self.0))
    }
    #[inline(always)]
    fn range(self, start: usize, end: usize) -> Self {
        Zeros(end - start)
    }
    #[inline(always)]
    fn at(self, _: usize) -> f32 {
        0.0
    }
    #[inline(always)]
    fn eight(self, _: usize) -> [f32; 8] {
        [0.0; 8]
    }
}

/// A quantization grid: per group `lo` and `step`, `bits` per code.
struct Grid {
    lo: Vec<f32>,
    step: Vec<f32>,
    group: usize,
    bits: u32,
}

impl Grid {
    #[inline]
    fn group_of(&self, e: usize) -> usize {
        e.checked_div(self.group).unwrap_or(0)
    }

    /// Quantize elements `offset..` given in `x`: their codes to `codes` (if given) and the
    /// values they stand for to `values`.
    fn quantize(
        &self,
        offset: usize,
        x: &[f32],
        mut codes: Option<&mut BitWriter>,
        values: &mut Vec<f32>,
    ) {
        values.clear();
        let max = ((1u32 << self.bits) - 1) as f32;
        let mut q: Vec<u8> = Vec::with_capacity(x.len());
        for (g, seg) in segments(offset, x, self.group) {
            let (lo, step) = (self.lo[g], self.step[g]);
            q.clear();
            if step == 0.0 {
                q.resize(seg.len(), 0);
                values.resize(values.len() + seg.len(), lo + 0.0);
            } else {
                quantize_span(seg, lo, step, max, &mut q, values);
            }
            if let Some(c) = codes.as_deref_mut() {
                c.push_codes(&q, self.bits);
            }
        }
    }

    #[inline]
    fn value(&self, e: usize, code: u32) -> f32 {
        let g = self.group_of(e);
        self.lo[g] + code as f32 * self.step[g]
    }
}

fn check_bits(job: &MergeJob, name: &str) -> std::result::Result<u32, String> {
    match job.shared.i(name) {
        b @ (2 | 3 | 4 | 8) => Ok(b as u32),
        b => Err(format!(
            "parameter '{name}' is {b} for tensor '{}'; it must be 2, 3, 4 or 8",
            job.name
        )),
    }
}

/// The `q`, `lo`, `step` and `meta` (`[bits, group_size]`, U32) parts of one quantized vector.
fn parts_of(grid: &Grid, codes: BitWriter) -> [scheme::TaskPart; 4] {
    let len = codes.len();
    let meta = [grid.bits, grid.group as u32];
    [
        ("q", DType::U8, vec![len.div_ceil(8)], codes.into_bytes()),
        (
            "lo",
            DType::F32,
            vec![grid.lo.len()],
            bytemuck::cast_slice(&grid.lo).to_vec(),
        ),
        (
            "step",
            DType::F32,
            vec![grid.step.len()],
            bytemuck::cast_slice(&grid.step).to_vec(),
        ),
        (
            "meta",
            DType::U32,
            vec![2],
            bytemuck::cast_slice(&meta).to_vec(),
        ),
    ]
}

/// Every task's `τ` quantized on its own grid (no shared mean): two passes that read the inputs
/// as stored (bf16 widened in registers), the first for each group's range, the second for the
/// codes and the error sums.
fn encode_plain(
    job: &MergeJob,
    inputs: &mut dyn TensorInputs,
    out: &mut dyn Encoded,
    (n, group, bits): (usize, usize, u32),
) -> Result<()> {
    let tasks = job.non_base();
    inputs.plan_passes(2);
    let mut ranges: Vec<Range> = vec![Range::new(n, group); tasks.len()];
    inputs.pass_bf16(1, &mut |chunk, offset| {
        for (r, &i) in ranges.iter_mut().zip(&tasks) {
            for (g, at) in groups_in(offset, chunk.chunk_len(), group) {
                let (lo, hi) = (r.lo[g], r.hi[g]);
                (r.lo[g], r.hi[g]) = match chunk.base_bf16() {
                    Some(b) => range_bf16(&chunk.bf16[i][at.clone()], &b[at], lo, hi),
                    None => range_f32(
                        &chunk.inputs[i][at.clone()],
                        &chunk.base_tensor()[at],
                        lo,
                        hi,
                    ),
                };
            }
        }
        Ok(())
    })?;
    let grids: Vec<Grid> = ranges.iter().map(|r| r.grid(bits)).collect();
    let mut codes = code_streams(tasks.len(), n, bits);
    let mut stats = vec![ChunkStats::new(0); tasks.len()];
    inputs.pass_bf16(1, &mut |chunk, offset| {
        for (t, &i) in tasks.iter().enumerate() {
            for (g, at) in groups_in(offset, chunk.chunk_len(), group) {
                let grid = (grids[t].lo[g], grids[t].step[g], bits);
                let e = offset + at.start;
                let (w, s) = (&mut codes[t], stats[t].lanes());
                match chunk.base_bf16() {
                    Some(b) => encode_bf16(e, &chunk.bf16[i][at.clone()], &b[at], grid, w, s),
                    None => encode_f32(
                        e,
                        &chunk.inputs[i][at.clone()],
                        &chunk.base_tensor()[at],
                        grid,
                        w,
                        s,
                    ),
                }
            }
        }
        Ok(())
    })?;
    store_tasks(out, &grids, codes, &stats)
}

/// RTVQ: the mean `μ` of the tasks' `τ` quantized once at `base_bits` (shared), each task's
/// `τ_t − μ̂` at `bits`; three passes over f32 chunks (the mean's range, the offsets' ranges,
/// the codes).
fn encode_residual(
    job: &MergeJob,
    inputs: &mut dyn TensorInputs,
    out: &mut dyn Encoded,
    (n, group, bits): (usize, usize, u32),
) -> Result<()> {
    let tasks = job.non_base();
    let t_count = tasks.len() as f32;
    // Per chunk: each task's τ, and their mean.
    let (mut taus, mut mean) = (vec![Vec::new(); tasks.len()], Vec::new());
    let fill = |chunk: &MergeJob, taus: &mut Vec<Vec<f32>>, mean: &mut Vec<f32>| {
        let base = chunk.base_tensor();
        for (tau, &i) in taus.iter_mut().zip(&tasks) {
            scheme::delta_into(chunk.inputs[i], base, tau);
        }
        mean.clear();
        mean.resize(base.len(), 0.0);
        for tau in taus.iter() {
            mean.iter_mut().zip(tau).for_each(|(m, &t)| *m += t);
        }
        mean.iter_mut().for_each(|m| *m /= t_count);
    };
    inputs.plan_passes(3);
    let mut r = Range::new(n, group);
    inputs.pass(1, &mut |chunk, offset| {
        fill(chunk, &mut taus, &mut mean);
        r.observe(offset, &mean);
        Ok(())
    })?;
    let shared_grid = r.grid(job.shared.i("base_bits") as u32);
    let (mut centre, mut x, mut values) = (Vec::new(), Vec::new(), Vec::new());
    let mut ranges: Vec<Range> = vec![Range::new(n, group); tasks.len()];
    inputs.pass(1, &mut |chunk, offset| {
        fill(chunk, &mut taus, &mut mean);
        shared_grid.quantize(offset, &mean, None, &mut centre);
        for (r, tau) in ranges.iter_mut().zip(&taus) {
            x.clear();
            x.extend(tau.iter().zip(&centre).map(|(t, c)| t - c));
            r.observe(offset, &x);
        }
        Ok(())
    })?;
    let grids: Vec<Grid> = ranges.iter().map(|r| r.grid(bits)).collect();
    let mut codes = code_streams(tasks.len(), n, bits);
    let mut shared_codes = BitWriter::default();
    let mut stats = vec![ChunkStats::new(0); tasks.len()];
    inputs.pass(1, &mut |chunk, offset| {
        fill(chunk, &mut taus, &mut mean);
        shared_grid.quantize(offset, &mean, Some(&mut shared_codes), &mut centre);
        for (t, tau) in taus.iter().enumerate() {
            x.clear();
            x.extend(tau.iter().zip(&centre).map(|(t, c)| t - c));
            grids[t].quantize(offset, &x, Some(&mut codes[t]), &mut values);
            values.iter_mut().zip(&centre).for_each(|(v, c)| *v += c);
            stats[t].observe(offset, &values, tau);
        }
        Ok(())
    })?;
    for (k, (_, _, _, bytes)) in parts_of(&shared_grid, shared_codes).into_iter().enumerate() {
        out.shared_bytes(k, 0, &bytes)?;
    }
    store_tasks(out, &grids, codes, &stats)
}

/// One code stream per task, with room for `n` codes of `bits`.
fn code_streams(tasks: usize, n: usize, bits: u32) -> Vec<BitWriter> {
    (0..tasks)
        .map(|_| BitWriter::with_capacity(n * bits as usize))
        .collect()
}

/// Store each task's grid, codes and sums.
fn store_tasks(
    out: &mut dyn Encoded,
    grids: &[Grid],
    codes: Vec<BitWriter>,
    stats: &[ChunkStats],
) -> Result<()> {
    for (t, (grid, codes)) in grids.iter().zip(codes).enumerate() {
        *out.stats(t) = stats[t].totals();
        for (suffix, dtype, shape, bytes) in parts_of(grid, codes) {
            out.task(t, suffix, dtype, shape, bytes)?;
        }
    }
    Ok(())
}

impl Method for Quant {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Quant {
    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        check_bits(job, "bits")?;
        check_bits(job, "base_bits")?;
        if job.shared.i("group_size") < 0 {
            return Err(format!(
                "parameter 'group_size' is {} for tensor '{}'; it must be 0 (whole tensor) or a positive group length",
                job.shared.i("group_size"),
                job.name
            ));
        }
        Ok(())
    }

    fn shared_parts(&self, job: &MergeJob, _out: DType) -> Vec<PartSpec> {
        if !job.shared.b("residual") || scheme::matrix(job.shape).is_none() {
            return Vec::new();
        }
        let n = job.numel();
        let g = groups(n, job.shared.i("group_size") as usize);
        let bits = job.shared.i("base_bits") as u32;
        vec![
            PartSpec {
                suffix: "q",
                dtype: DType::U8,
                shape: vec![bits::packed_len(n, bits)],
            },
            PartSpec {
                suffix: "lo",
                dtype: DType::F32,
                shape: vec![g],
            },
            PartSpec {
                suffix: "step",
                dtype: DType::F32,
                shape: vec![g],
            },
            PartSpec {
                suffix: "meta",
                dtype: DType::U32,
                shape: vec![2],
            },
        ]
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        if scheme::raw_unless_matrix(job, inputs, out)? {
            return Ok(());
        }
        let n = job.numel();
        let group = job.shared.i("group_size") as usize;
        let bits = job.shared.i("bits") as u32;
        if job.shared.b("residual") {
            encode_residual(job, inputs, out, (n, group, bits))
        } else {
            encode_plain(job, inputs, out, (n, group, bits))
        }
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        let Some(q) = parts.task("q")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        let n: usize = shape.iter().product();
        let task_part = |s: &str| -> Result<Vec<u8>> {
            Ok(parts
                .task(s)?
                .ok_or_else(|| parts.corrupt(format!("its part '{s}' is missing")))?
                .to_vec())
        };
        let task = grid_of(parts, n, q.len(), &task_part)?;
        let shared = match parts.shared_bytes("q")? {
            Some(sq) => {
                let shared_part = |s: &str| -> Result<Vec<u8>> {
                    parts
                        .shared_bytes(s)?
                        .ok_or_else(|| parts.corrupt(format!("the shared part '{s}' is missing")))
                };
                let g = grid_of(parts, n, sq.len(), &shared_part)?;
                Some((g, sq))
            }
            None => None,
        };
        Ok(Box::new(QuantDecoder { q, task, shared }))
    }
}

/// The grid of a quantized vector of `n` elements whose codes take `len` bytes, from its
/// `lo`, `step` and `meta` parts.
fn grid_of(
    parts: &dyn Parts,
    n: usize,
    len: usize,
    part: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<Grid> {
    let floats = |s: &str| -> Result<Vec<f32>> {
        scheme::le_f32s(&part(s)?)
            .ok_or_else(|| parts.corrupt(format!("its part '{s}' is not F32")))
    };
    let (lo, step) = (floats("lo")?, floats("step")?);
    let meta: Vec<u32> = part("meta")?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let &[bits, group] = meta.as_slice() else {
        return Err(parts.corrupt("its part 'meta' is not [bits, group_size]".into()));
    };
    let group = group as usize;
    if ![2, 3, 4, 8].contains(&bits) || bits::packed_len(n, bits) != len {
        return Err(parts.corrupt(format!(
            "{len} code bytes do not hold {n} codes of {bits} bits"
        )));
    }
    if lo.len() != groups(n, group) || step.len() != lo.len() {
        return Err(parts.corrupt(format!(
            "{} offsets and {} steps for {} groups",
            lo.len(),
            step.len(),
            groups(n, group)
        )));
    }
    Ok(Grid {
        lo,
        step,
        group,
        bits,
    })
}

struct QuantDecoder<'a> {
    q: &'a [u8],
    task: Grid,
    shared: Option<(Grid, Vec<u8>)>,
}

impl Decoder for QuantDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let e = range.start + j;
            let centre = match &self.shared {
                Some((g, q)) => g.value(e, bits::code(q, e, g.bits)),
                None => 0.0,
            };
            *o = b + (centre + self.task.value(e, bits::code(self.q, e, self.task.bits)));
        }
        Ok(())
    }
}
