//! The per-chunk arithmetic of generalized task arithmetic ([`gta`](super::gta)): the output
//! pass, the L1 pass and the sign vote.
//!
//! Each entry point is one [`vectorized!`](crate::simd::vectorized) function over a chunk that
//! walks it in small tiles: every step (subtract, mask, scale, sum, elect, merge) is a tight loop
//! over a tile that stays in L1, and every helper inlines into the entry point, so the whole pass
//! runs in the chunk's vector instruction set. Per element, the f32 operations are the same, in
//! the same order, as an element-at-a-time loop; tiles change only the memory traffic.
//!
//! The common cases take one fused loop per chunk instead ([`fused_apply`], [`l1_random`]),
//! every model's delta in registers; those loops also read bf16 chunks as they are stored
//! ([`Elems`], [`MergeJob::bf16`]), with the same f32 operations on the widened values.

use super::MergeJob;
use super::gta_state::{GtaState, Mask, PerModel};
use super::rng::{Stream32, run_length};
use super::select::{Window, key};
use crate::simd::{Bf16, Elems, keep_if, rewrite};
use crate::sums::{FLUSH, LaneSum};

/// `$m!(K)` with the literal `K` equal to `$k`, for 1 to 8 models (the loops that keep every
/// model's values in registers are instantiated per count); more than 8 is taken as 8.
macro_rules! by_count {
    ($k:expr, $m:ident) => {
        match $k {
            1 => $m!(1),
            2 => $m!(2),
            3 => $m!(3),
            4 => $m!(4),
            5 => $m!(5),
            6 => $m!(6),
            7 => $m!(7),
            _ => $m!(8),
        }
    };
}

/// Elements per tile: a few KiB per buffer, so a tile's buffers fit in L1 together.
const TILE: usize = 512;

/// How a model's kept entries are scaled before weighting.
#[derive(Clone, Copy)]
enum Scale {
    /// Multiply in f32.
    By(f32),
    /// Divide by the keep probability in f64 (the papers' 1/p).
    InverseF64(f64),
}

/// The last step of the output pass.
#[derive(Clone, Copy)]
pub(super) struct Finish {
    /// Divide by the divisor (weight sum, or the agreeing weights' sum).
    pub normalize: bool,
    /// Scale of the merged delta.
    pub lambda: f32,
    /// Output the merged delta (no λ, no base).
    pub raw: bool,
    /// With a sign consensus: the sign elected where the weighted sum is exactly 0 is `+`.
    pub tie_up: bool,
    /// With a sign consensus: count agreeing models instead of summing their weights.
    pub by_count: bool,
}

impl Finish {
    /// The sign elected by the weighted sum `sum`, as ±1: `+` when the sum is > 0, `−` when
    /// < 0, and the tie sign when it is 0. An entry agrees when its product with the sign is
    /// positive (zero agrees with neither sign).
    #[inline(always)]
    fn elected_sign(self, sum: f32) -> f32 {
        // Two selects on floats: a mix of the comparisons with the flag as booleans compiles
        // to packing and unpacking vector masks.
        let tie = if self.tie_up { 1.0 } else { -1.0 };
        if sum > 0.0 {
            1.0
        } else if sum < 0.0 {
            -1.0
        } else {
            tie
        }
    }

    /// The output element from the merged delta `x`, its divisor and the base value `b`.
    #[inline(always)]
    fn value(self, x: f32, divisor: f32, b: f32) -> f32 {
        let x = if self.normalize { x / divisor } else { x };
        if self.raw {
            x
        } else if self.lambda != 1.0 {
            b + x * self.lambda
        } else {
            b + x
        }
    }
}

/// Tiles `(start, end)` of a chunk of `n` elements.
#[inline(always)]
fn tiles(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(TILE).map(move |s| (s, (s + TILE).min(n)))
}

/// `d = x − b`, masked, scaled and weighted, for model `m` over tile elements `start..end` of
/// the chunk at `offset` (tie counters of a magnitude selection advance in index order).
#[inline(always)]
fn delta(m: &mut PerModel, rescale_l1: bool, x: &[f32], b: &[f32], at: usize, d: &mut Vec<f32>) {
    d.clear();
    let w = m.weight;
    if matches!(m.mask, Mask::All) && m.inverse_density.is_none() && !rescale_l1 {
        // Nothing between the subtraction and the weighting: one loop.
        d.extend(x.iter().zip(b).map(|(&a, &b)| (a - b) * w));
        return;
    }
    d.extend(x.iter().zip(b).map(|(&a, &b)| a - b));
    match &mut m.mask {
        Mask::All => {}
        Mask::Nothing => d.fill(0.0),
        Mask::Select(_, sel) => sel.apply(d),
        Mask::Random(k, t) => k.mask32(at as u64, *t, d),
        Mask::Given(f) => d
            .iter_mut()
            .zip(&f[at..at + x.len()])
            .for_each(|(v, &g)| *v *= g),
    }
    let scale = match m.inverse_density {
        Some(p) => Scale::InverseF64(p),
        None if rescale_l1 => Scale::By(m.scale),
        None => Scale::By(1.0),
    };
    match scale {
        Scale::InverseF64(p) => d.iter_mut().for_each(|v| *v = ((*v as f64 / p) as f32) * w),
        Scale::By(s) => d.iter_mut().for_each(|v| *v = *v * s * w),
    }
}

impl GtaState {
    /// Σ sgn(elected sums) of a chunk (the majority-sign vote).
    pub(super) fn vote(&mut self, job: &MergeJob, offset: usize) -> i64 {
        if self.models.is_empty() {
            return 0;
        }
        vote_chunk(self, job, offset)
    }

    /// Every model's delta over tile `start..end` of the chunk at `offset` into `buffers`.
    #[inline(always)]
    fn tile_deltas(&mut self, job: &MergeJob, offset: usize, start: usize, end: usize) {
        let base = &job.base_tensor()[start..end];
        self.buffers.resize_with(self.models.len(), Vec::new);
        for (m, d) in self.models.iter_mut().zip(self.buffers.iter_mut()) {
            let x = &job.inputs[m.input][start..end];
            delta(m, self.rescale_l1, x, base, offset + start, d);
        }
    }

    /// The per-element sums that elect the sign (from 0.0, in model order) into `sums[0]`.
    #[inline(always)]
    fn tile_sign_sums(&mut self, n: usize) {
        let sum = &mut self.sums[0];
        sum.clear();
        sum.resize(n, 0.0);
        for dm in &self.buffers {
            sum.iter_mut().zip(dm).for_each(|(s, &v)| *s += v);
        }
    }
}

crate::simd::vectorized! {
    /// The output pass over one chunk: `out` from the inputs of `job` at `offset`.
    pub(super) fn apply_chunk(
        st: &mut GtaState,
        job: &MergeJob,
        offset: usize,
        consensus: bool,
        f: Finish,
        out: &mut [f32],
    ) {
        let weight_sum: f32 = st.models.iter().map(|m| m.weight).sum();
        let plain_divisor = if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum };
        if fused_apply(st, job, offset, consensus, f, plain_divisor, out) {
            return;
        }
        if job.bf16.is_empty() {
            tiled_apply(st, job, offset, consensus, f, plain_divisor, out);
            return;
        }
        // A bf16 chunk the fused loop does not take (a selection's boundary ties split in it):
        // decode it for the tiled steps.
        let mut decoded = std::mem::take(&mut st.decoded);
        decoded.resize_with(job.bf16.len(), Vec::new);
        for (d, bits) in decoded.iter_mut().zip(&job.bf16) {
            d.clear();
            crate::dtype::widen_bf16(bits, d);
        }
        let f32_job = MergeJob {
            inputs: decoded.iter().map(|d| d.as_slice()).collect(),
            bf16: Vec::new(),
            ..job.clone()
        };
        tiled_apply(st, &f32_job, offset, consensus, f, plain_divisor, out);
        drop(f32_job);
        st.decoded = decoded;
    }
}

/// The output pass over one chunk of f32 inputs in tiles, every step a loop of its own.
#[inline(always)]
fn tiled_apply(
    st: &mut GtaState,
    job: &MergeJob,
    offset: usize,
    consensus: bool,
    f: Finish,
    plain_divisor: f32,
    out: &mut [f32],
) {
    let base = job.base_tensor();
    for (start, end) in tiles(out.len()) {
        st.tile_deltas(job, offset, start, end);
        let (o, b) = (&mut out[start..end], &base[start..end]);
        if !consensus {
            // Per-element sums over the models, in model order from 0.0.
            o.fill(0.0);
            for dm in &st.buffers {
                o.iter_mut().zip(dm).for_each(|(s, &v)| *s += v);
            }
            o.iter_mut()
                .zip(b)
                .for_each(|(o, &b)| *o = f.value(*o, plain_divisor, b));
            continue;
        }
        st.tile_sign_sums(end - start);
        // Keep the entries that agree with the elected sign ([`Finish::elected_sign`]).
        let [sum, mixed, divisor] = &mut st.sums;
        mixed.clear();
        mixed.resize(end - start, 0.0);
        divisor.clear();
        divisor.resize(end - start, 0.0);
        for (dm, m) in st.buffers.iter().zip(&st.models) {
            let w = if f.by_count { 1.0 } else { m.weight };
            let cells = mixed.iter_mut().zip(divisor.iter_mut());
            for ((x, dv), (&v, &s)) in cells.zip(dm.iter().zip(sum.iter())) {
                let agree = v * f.elected_sign(s) > 0.0;
                *x += keep_if(v, agree);
                *dv += keep_if(w, agree);
            }
        }
        for (((o, &b), &x), &dv) in o.iter_mut().zip(b).zip(mixed.iter()).zip(divisor.iter()) {
            *o = f.value(x, if dv == 0.0 { 1.0 } else { dv }, b);
        }
    }
}

crate::simd::vectorized! {
    /// Σ sgn(elected sums) over one chunk (the majority-sign vote).
    pub(super) fn vote_chunk(st: &mut GtaState, job: &MergeJob, offset: usize) -> i64 {
        let n = job.inputs.first().map_or(0, |x| x.len());
        let mut votes = 0i64;
        for (start, end) in tiles(n) {
            st.tile_deltas(job, offset, start, end);
            st.tile_sign_sums(end - start);
            votes += st.sums[0]
                .iter()
                .map(|&s| (s > 0.0) as i64 - (s < 0.0) as i64)
                .sum::<i64>();
        }
        votes
    }
}

crate::simd::vectorized! {
    /// The L1 pass over one chunk: each model's Σ|δ| and Σ|kept δ|.
    pub(super) fn l1_chunk(st: &mut GtaState, job: &MergeJob, offset: usize) {
        if let Some(base) = job.base_bf16() {
            // bf16 chunks come only when every mask is random ([`GtaState::reads_bf16`]).
            l1_random_models(&mut st.models, |m| Bf16(job.bf16[m.input]), Bf16(base), offset);
            return;
        }
        let base = job.base_tensor();
        let all_random = st.models.iter().all(|m| matches!(m.mask, Mask::Random(..)));
        if all_random && run_length(offset as u64) >= base.len() {
            l1_random_models(&mut st.models, |m| job.inputs[m.input], base, offset);
            return;
        }
        let (mut all, mut kept) = ([0f32; TILE], [0f32; TILE]);
        for m in &mut st.models {
            let x = job.inputs[m.input];
            if let Mask::Random(k, t) = m.mask
                && run_length(offset as u64) >= x.len()
            {
                let mut sums = [&mut m.l1];
                l1_random::<1, _>([x], base, offset, [(k.stream32(offset as u64), t)], &mut sums);
                continue;
            }
            for (start, end) in tiles(x.len()) {
                let (all, kept) = (&mut all[..end - start], &mut kept[..end - start]);
                for ((a, &v), &b) in all.iter_mut().zip(&x[start..end]).zip(&base[start..end]) {
                    *a = (v - b).abs();
                }
                kept.copy_from_slice(all);
                // |δ| has the key of δ, so a magnitude selection keeps the same entries.
                let at = offset + start;
                match &mut m.mask {
                    Mask::All => {}
                    Mask::Nothing => kept.fill(0.0),
                    Mask::Select(_, sel) => sel.apply(kept),
                    Mask::Random(k, t) => k.mask32(at as u64, *t, kept),
                    Mask::Given(f) => {
                        let f = &f[at..at + kept.len()];
                        rewrite(kept, |j, v| keep_if(v, f[j] != 0.0));
                    }
                }
                m.l1.0.add(at, all);
                m.l1.1.add(at, kept);
            }
        }
    }
}

/// One model's constants in the fused output loop.
#[derive(Clone, Copy, Default)]
struct Lane {
    /// Scale of kept entries (the L1 match, or 1).
    scale: f32,
    weight: f32,
    /// What an agreeing entry adds to the divisor (its weight, or 1 when counting).
    vote: f32,
    /// Random masks: the stream and threshold.
    stream: Stream32,
    threshold: u32,
    /// Magnitude masks: this chunk's rule.
    window: Window,
}

/// Which mask every model of a fused chunk has.
const ALL: u8 = 0;
const RANDOM: u8 = 1;
const SELECT: u8 = 2;

/// The output pass over a chunk in one loop, every model's delta kept in registers, when the
/// chunk allows it: 1 to 8 models with the same kind of mask (none, random, or a magnitude
/// selection whose boundary ties in this chunk are all kept or all dropped) and no f64 rescale.
/// Returns `false`, having changed nothing, otherwise.
#[inline(always)]
fn fused_apply(
    st: &mut GtaState,
    job: &MergeJob,
    offset: usize,
    consensus: bool,
    f: Finish,
    plain_divisor: f32,
    out: &mut [f32],
) -> bool {
    let k = st.models.len();
    let n = out.len();
    if !st.fuse || !(1..=8).contains(&k) || st.models.iter().any(|m| m.inverse_density.is_some()) {
        return false;
    }
    let kind = match &st.models[0].mask {
        Mask::All => ALL,
        Mask::Random(..) if run_length(offset as u64) >= n => RANDOM,
        Mask::Select(None, _) => SELECT,
        _ => return false,
    };
    let out = Output {
        consensus,
        f,
        plain_divisor,
        out,
    };
    match job.base_bf16() {
        Some(base) => {
            let inputs = st.models.iter().map(|m| Bf16(job.bf16[m.input])).collect();
            fused_over(st, kind, inputs, Bf16(base), offset, out)
        }
        None => {
            let inputs = st.models.iter().map(|m| job.inputs[m.input]).collect();
            fused_over(st, kind, inputs, job.base_tensor(), offset, out)
        }
    }
}

/// Where the fused output loop writes, and how it finishes each element.
struct Output<'o> {
    consensus: bool,
    f: Finish,
    plain_divisor: f32,
    out: &'o mut [f32],
}

/// [`fused_apply`] past its checks, over each model's input (`inputs`, in model order) and the
/// base as `E`: the models' constants, this chunk's selection windows, then the loop.
#[inline(always)]
fn fused_over<E: Elems>(
    st: &mut GtaState,
    kind: u8,
    inputs: Vec<E>,
    base: E,
    offset: usize,
    o: Output,
) -> bool {
    let (n, f) = (o.out.len(), o.f);
    let mut lanes = [Lane::default(); 8];
    let mut ties = [(0u64, 0u64); 8];
    for ((m, &x), (lane, tie)) in st
        .models
        .iter()
        .zip(&inputs)
        .zip(lanes.iter_mut().zip(ties.iter_mut()))
    {
        *lane = Lane {
            scale: if st.rescale_l1 { m.scale } else { 1.0 },
            weight: m.weight,
            vote: if f.by_count { 1.0 } else { m.weight },
            ..Lane::default()
        };
        match (&m.mask, kind) {
            (Mask::All, ALL) => {}
            (Mask::Random(key, t), RANDOM) => {
                lane.stream = key.stream32(offset as u64);
                lane.threshold = *t;
            }
            (Mask::Select(None, sel), SELECT) => {
                let (lo, hi) = sel.edges();
                *tie = count_equal_delta(x, base, n, lo, hi);
                match sel.window(tie.0, tie.1) {
                    Some(w) => lane.window = w,
                    None => return false,
                }
            }
            _ => return false,
        }
    }
    if kind == SELECT {
        for (m, &(lo, hi)) in st.models.iter_mut().zip(&ties) {
            if let Mask::Select(None, sel) = &mut m.mask {
                sel.advance(lo, hi);
            }
        }
    }
    let (pd, out) = (o.plain_divisor, o.out);
    macro_rules! with_k {
        ($k:literal) => {
            match (kind, o.consensus) {
                (ALL, false) => fused::<$k, ALL, false, E>(&lanes, &inputs, base, f, pd, out),
                (ALL, true) => fused::<$k, ALL, true, E>(&lanes, &inputs, base, f, pd, out),
                (RANDOM, false) => fused::<$k, RANDOM, false, E>(&lanes, &inputs, base, f, pd, out),
                (RANDOM, true) => fused::<$k, RANDOM, true, E>(&lanes, &inputs, base, f, pd, out),
                (_, false) => fused::<$k, SELECT, false, E>(&lanes, &inputs, base, f, pd, out),
                (_, true) => fused::<$k, SELECT, true, E>(&lanes, &inputs, base, f, pd, out),
            }
        };
    }
    by_count!(st.models.len(), with_k);
    true
}

/// How many keys of `x − b` (first `n` elements) equal `lo`, and how many equal `hi`.
#[inline(always)]
fn count_equal_delta<E: Elems>(x: E, b: E, n: usize, lo: u32, hi: u32) -> (u64, u64) {
    let (x, b) = (x.prefix(n), b.prefix(n));
    let (mut n_lo, mut n_hi) = (0u64, 0u64);
    for t in (0..n).step_by(TILE) {
        let end = (t + TILE).min(n);
        let (mut a, mut c) = (0u32, 0u32);
        let mut i = t;
        while i + 8 <= end {
            let (xs, bs) = (x.eight(i), b.eight(i));
            for j in 0..8 {
                let k = key(xs[j] - bs[j]);
                a += (k == lo) as u32;
                c += (k == hi) as u32;
            }
            i += 8;
        }
        for i in i..end {
            let k = key(x.at(i) - b.at(i));
            a += (k == lo) as u32;
            c += (k == hi) as u32;
        }
        n_lo += a as u64;
        n_hi += c as u64;
    }
    (n_lo, n_hi)
}

/// The output loop of [`fused_apply`] for `K` models with masks of kind `KIND`.
#[inline(always)]
fn fused<const K: usize, const KIND: u8, const CONSENSUS: bool, E: Elems>(
    lanes: &[Lane; 8],
    inputs: &[E],
    base: E,
    f: Finish,
    plain_divisor: f32,
    out: &mut [f32],
) {
    let n = out.len();
    let lanes: [Lane; K] = std::array::from_fn(|m| lanes[m]);
    let xs: [E; K] = std::array::from_fn(|m| inputs[m].prefix(n));
    let base = base.prefix(n);
    // Random masks carry each stream's Weyl sequence (an add per element, not a multiply).
    let mut weyl: [u32; K] = std::array::from_fn(|m| lanes[m].stream.weyl(0));
    for (i, o) in out.iter_mut().enumerate() {
        let b = base.at(i);
        let mut d = [0f32; K];
        for m in 0..K {
            let l = lanes[m];
            let v = xs[m].at(i) - b;
            let keep = match KIND {
                RANDOM => {
                    let bits = Stream32::finish(weyl[m]);
                    weyl[m] = weyl[m].wrapping_add(Stream32::STEP);
                    bits < l.threshold
                }
                SELECT => l.window.keeps(key(v)),
                _ => true,
            };
            d[m] = keep_if(v, keep) * l.scale * l.weight;
        }
        let mut sum = 0.0f32;
        for &v in &d {
            sum += v;
        }
        *o = if CONSENSUS {
            let sign = f.elected_sign(sum);
            let (mut mixed, mut divisor) = (0.0f32, 0.0f32);
            for m in 0..K {
                let v = d[m];
                let agree = v * sign > 0.0;
                mixed += keep_if(v, agree);
                divisor += keep_if(lanes[m].vote, agree);
            }
            f.value(mixed, if divisor == 0.0 { 1.0 } else { divisor }, b)
        } else {
            f.value(sum, plain_divisor, b)
        };
    }
}

/// The L1 pass of models that all have random masks, over a chunk at `offset` (within one
/// stream), [`l1_random`] over up to 8 of them at a time.
#[inline(always)]
fn l1_random_models<E: Elems>(
    models: &mut [PerModel],
    input: impl Fn(&PerModel) -> E,
    base: E,
    offset: usize,
) {
    for group in models.chunks_mut(8) {
        let xs: Vec<E> = group.iter().map(&input).collect();
        let masks: Vec<(Stream32, u32)> = group
            .iter()
            .map(|m| match m.mask {
                Mask::Random(k, t) => (k.stream32(offset as u64), t),
                _ => unreachable!("every mask is random"),
            })
            .collect();
        let mut sums: Vec<&mut (LaneSum, LaneSum)> = group.iter_mut().map(|m| &mut m.l1).collect();
        macro_rules! with_k {
            ($k:literal) => {
                l1_random::<$k, E>(
                    std::array::from_fn(|m| xs[m]),
                    base,
                    offset,
                    std::array::from_fn(|m| masks[m]),
                    sums.as_mut_slice().try_into().expect("k"),
                )
            };
        }
        by_count!(xs.len(), with_k);
    }
}

/// The L1 pass of `K` models with random masks (`(stream, threshold)` each) over a chunk at
/// `offset` (within one stream): each model's Σ|δ| and Σ|kept δ| into its lane sums, in one
/// loop that reads and widens the base once for all of them. Each lane sum gets the same adds
/// in the same order as a loop over one model.
#[inline(always)]
fn l1_random<const K: usize, E: Elems>(
    xs: [E; K],
    base: E,
    offset: usize,
    masks: [(Stream32, u32); K],
    sums: &mut [&mut (LaneSum, LaneSum); K],
) {
    let n = base
        .len()
        .min(xs.iter().map(|x| x.len()).min().unwrap_or(0));
    let base = base.prefix(n);
    let xs = xs.map(|x| x.prefix(n));
    // Elements before the first index that is a multiple of 8, and after the last, go through
    // the general adder.
    let head = ((8 - offset % 8) % 8).min(n);
    let full = (n - head) / 8 * 8;
    let rest = head + full;
    let edge = |sums: &mut (LaneSum, LaneSum),
                x: E,
                (stream, t): (Stream32, u32),
                from: usize,
                to: usize| {
        let (mut all, mut kept) = ([0f32; 8], [0f32; 8]);
        for j in from..to {
            all[j - from] = (x.at(j) - base.at(j)).abs();
            kept[j - from] = keep_if(all[j - from], stream.bits(j as u32) < t);
        }
        sums.0.add(offset + from, &all[..to - from]);
        sums.1.add(offset + from, &kept[..to - from]);
    };
    for m in 0..K {
        edge(sums[m], xs[m], masks[m], 0, head);
    }
    // Lane accumulators in locals (registers), one block of 8 elements per step.
    let mut acc: [(LaneSum, LaneSum); K] = std::array::from_fn(|m| *sums[m]);
    // The streams' Weyl sequences, carried by adds (see `Stream32::STEP`).
    let mut weyl: [[u32; 8]; K] =
        std::array::from_fn(|m| std::array::from_fn(|j| masks[m].0.weyl((head + j) as u32)));
    for first in (head..rest).step_by(8) {
        let bb = base.eight(first);
        for m in 0..K {
            let xb = xs[m].eight(first);
            let (mut all, mut kept) = ([0f32; 8], [0f32; 8]);
            for j in 0..8 {
                all[j] = (xb[j] - bb[j]).abs();
                kept[j] = keep_if(all[j], Stream32::finish(weyl[m][j]) < masks[m].1);
                weyl[m][j] = weyl[m][j].wrapping_add(Stream32::STEP.wrapping_mul(8));
            }
            acc[m].0.eight(&all);
            acc[m].1.eight(&kept);
        }
        if (offset + first + 8).is_multiple_of(FLUSH) {
            for a in &mut acc {
                a.0.flush();
                a.1.flush();
            }
        }
    }
    for m in 0..K {
        *sums[m] = acc[m];
        edge(sums[m], xs[m], masks[m], rest, n);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{MergeJob, Params, State, get, shared_params, state_mut};
    use super::*;
    use crate::config::Value;

    /// Base + `k` inputs of `n` values on a coarse grid (so magnitudes tie often), some equal
    /// to the base.
    fn data(k: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
        let key = super::super::rng::Key::new(seed, "fused", 0);
        let grid = |i: u64| ((key.uniform(i) * 16.0).floor() as f32 - 8.0) / 32.0;
        let base: Vec<f32> = (0..n as u64).map(|i| grid(i) / 4.0).collect();
        let mut all = vec![base.clone()];
        for m in 1..=k as u64 {
            all.push(
                (0..n as u64)
                    .map(|i| {
                        let v = grid(m * 1_000_003 + i);
                        if i % 13 == m {
                            base[i as usize]
                        } else {
                            base[i as usize] + v
                        }
                    })
                    .collect(),
            );
        }
        all
    }

    /// How [`run`] feeds the kernels.
    #[derive(Clone, Copy, PartialEq)]
    enum Feed {
        /// f32 chunks, the tiled steps only.
        Tiled,
        /// f32 chunks, fused loops where they apply.
        Fused,
        /// bf16 chunks to the passes that read them ([`GtaState::reads_bf16`]), f32 otherwise.
        Bf16,
    }

    /// Run `method` over `inputs` streamed in chunks of `chunk`, fed as `feed` says.
    fn run(
        method: &str,
        shared_over: &[(&'static str, Value)],
        per_model: &[Params],
        inputs: &[Vec<f32>],
        chunk: usize,
        feed: Feed,
    ) -> Vec<u32> {
        let random = method.starts_with("dare");
        let selecting = method.starts_with("ties") || method.starts_with("breadcrumbs");
        let method = get(method).unwrap();
        let shared = shared_params(method, shared_over);
        let mut per_input = vec![Params { values: Vec::new() }];
        per_input.extend(per_model.iter().cloned());
        let n = inputs[0].len();
        let shape = [n];
        let meta = MergeJob {
            name: "t",
            shape: &shape,
            inputs: Vec::new(),
            bf16: Vec::new(),
            base: Some(0),
            shared: &shared,
            per_input: &per_input,
            seed: 3,
            global: None,
        };
        let s = method.streaming(&meta).unwrap();
        let mut state: State = s.begin(&meta).unwrap();
        state_mut::<GtaState>(&mut state).fuse = feed != Feed::Tiled;
        // The inputs' bf16 bits: the data are on a grid that bf16 holds exactly.
        let bits: Vec<Vec<u16>> = inputs
            .iter()
            .map(|v| v.iter().map(|&x| (x.to_bits() >> 16) as u16).collect())
            .collect();
        assert!(inputs.iter().flatten().all(|x| x.to_bits() & 0xffff == 0));
        let job = |a: usize, b: usize, bf16: bool| MergeJob {
            inputs: match bf16 {
                false => inputs.iter().map(|v| &v[a..b]).collect(),
                true => Vec::new(),
            },
            bf16: match bf16 {
                true => bits.iter().map(|v| &v[a..b]).collect(),
                false => Vec::new(),
            },
            ..meta.clone()
        };
        let passes = s.passes(&state);
        let mut bf16_passes = 0;
        for pass in 0..passes {
            let bf16 = feed == Feed::Bf16 && s.reads_bf16(pass, &meta, &state);
            bf16_passes += bf16 as usize;
            for a in (0..n).step_by(chunk) {
                let b = (a + chunk).min(n);
                s.observe(pass, &job(a, b, bf16), a, &mut state).unwrap();
            }
            s.end_pass(pass, &meta, &mut state).unwrap();
        }
        let mut out = vec![0f32; n];
        let bf16 = feed == Feed::Bf16 && s.reads_bf16(passes, &meta, &state);
        bf16_passes += bf16 as usize;
        for a in (0..n).step_by(chunk) {
            let b = (a + chunk).min(n);
            s.apply(&job(a, b, bf16), a, &mut state, &mut out[a..b])
                .unwrap();
        }
        // Random masks read bf16 in every pass, magnitude selections in their histogram passes,
        // and every method here (1 to 8 models, one kind of mask) in the output pass.
        if feed == Feed::Bf16 {
            match random {
                true => assert_eq!(bf16_passes, passes + 1),
                false => assert_eq!(bf16_passes, passes.min(2) * selecting as usize + 1),
            }
        }
        out.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn lane_sums_do_not_depend_on_the_chunking() {
        let key = super::super::rng::Key::new(1, "lanes", 0);
        let v: Vec<f32> = (0..5000).map(|i| key.uniform(i) as f32 * 3.0).collect();
        let sum = |chunk: usize| {
            let mut s = LaneSum::default();
            for (i, c) in v.chunks(chunk).enumerate() {
                s.add(i * chunk, c);
            }
            s.total().to_bits()
        };
        let whole = sum(v.len());
        for chunk in [1, 7, 8, 97, 256, 300, 4999] {
            assert_eq!(sum(chunk), whole, "chunk {chunk}");
        }
        let exact: f64 = v.iter().map(|&x| x as f64).sum();
        // f32 within blocks of 32 per lane: a few f32 roundings of relative error.
        assert!((f64::from_bits(whole) - exact).abs() < 1e-6 * exact);
    }

    #[test]
    fn l1_of_many_models_at_once_matches_one_at_a_time_bit_for_bit() {
        use super::super::rng::{Key, threshold32};
        let n = 1237;
        for k in [1, 3, 8, 11] {
            // Values with bf16's precision but not on a grid, so sums round (and the order of
            // the adds shows in the bits).
            let key = Key::new(k as u64, "values", 0);
            let inputs: Vec<Vec<f32>> = (0..=k as u64)
                .map(|m| {
                    (0..n as u64)
                        .map(|i| {
                            let v = (key.uniform(m * 100_003 + i) * 2.0 - 1.0) as f32;
                            f32::from_bits(v.to_bits() & 0xffff_0000)
                        })
                        .collect()
                })
                .collect();
            let masks: Vec<(Key, u32)> = (0..k)
                .map(|m| {
                    (
                        Key::new(5, "l1", m + 1),
                        threshold32([0.5, 0.3, 0.9][m % 3]),
                    )
                })
                .collect();
            // The reference: one model at a time, in tiles, through the general mask.
            let reference: Vec<(u64, u64)> = masks
                .iter()
                .enumerate()
                .map(|(m, &(key, t))| {
                    let mut sums = (LaneSum::default(), LaneSum::default());
                    for (a, b) in tiles(n) {
                        let all: Vec<f32> = (a..b)
                            .map(|i| (inputs[m + 1][i] - inputs[0][i]).abs())
                            .collect();
                        let mut kept = all.clone();
                        key.mask32(a as u64, t, &mut kept);
                        sums.0.add(a, &all);
                        sums.1.add(a, &kept);
                    }
                    (sums.0.total().to_bits(), sums.1.total().to_bits())
                })
                .collect();
            let bits: Vec<Vec<u16>> = inputs
                .iter()
                .map(|v| v.iter().map(|&x| (x.to_bits() >> 16) as u16).collect())
                .collect();
            for chunk in [n, 97, 515] {
                for bf16 in [false, true] {
                    let mut models: Vec<PerModel> = masks
                        .iter()
                        .enumerate()
                        .map(|(m, &(key, t))| PerModel {
                            input: m + 1,
                            weight: 1.0,
                            mask: Mask::Random(key, t),
                            l1: Default::default(),
                            scale: 1.0,
                            inverse_density: None,
                        })
                        .collect();
                    for a in (0..n).step_by(chunk) {
                        let b = (a + chunk).min(n);
                        match bf16 {
                            false => l1_random_models(
                                &mut models,
                                |m| &inputs[m.input][a..b],
                                &inputs[0][a..b],
                                a,
                            ),
                            true => l1_random_models(
                                &mut models,
                                |m| Bf16(&bits[m.input][a..b]),
                                Bf16(&bits[0][a..b]),
                                a,
                            ),
                        }
                    }
                    let got: Vec<(u64, u64)> = models
                        .iter()
                        .map(|m| (m.l1.0.total().to_bits(), m.l1.1.total().to_bits()))
                        .collect();
                    assert_eq!(got, reference, "{k} models, chunk {chunk}, bf16 {bf16}");
                }
            }
        }
    }

    #[test]
    fn fused_loop_matches_the_tiled_steps_bit_for_bit() {
        let n = 1237;
        let f = Value::Float;
        for k in 1..=8 {
            let inputs = data(k, n, k as u64);
            let per_model: Vec<Params> = (0..k)
                .map(|m| Params {
                    values: vec![
                        ("weight", f([1.0, -0.5, 0.75, 2.0][m % 4])),
                        ("density", f([0.5, 0.3, 0.9, 0.61][m % 4])),
                        ("gamma", f(0.05)),
                    ],
                })
                .collect();
            let cases: [(&str, Vec<(&'static str, Value)>); 9] = [
                ("task_arithmetic", vec![("lambda", f(0.7))]),
                ("ties", vec![]),
                ("ties", vec![("sign_tie", Value::Choice("majority"))]),
                ("ties", vec![("mean_divisor", Value::Choice("count"))]),
                ("dare_ties", vec![]),
                ("dare_linear", vec![("normalize", Value::Bool(true))]),
                ("breadcrumbs", vec![]),
                ("breadcrumbs_ties", vec![("lambda", f(1.5))]),
                ("ties", vec![("normalize", Value::Bool(false))]),
            ];
            for (method, shared) in &cases {
                for chunk in [n, 97, 512 + 3] {
                    let tiled = run(method, shared, &per_model, &inputs, chunk, Feed::Tiled);
                    for feed in [Feed::Fused, Feed::Bf16] {
                        assert!(
                            run(method, shared, &per_model, &inputs, chunk, feed) == tiled,
                            "{method} {shared:?}, {k} models, chunk {chunk}, bf16: {}",
                            feed == Feed::Bf16
                        );
                    }
                }
            }
        }
    }
}
