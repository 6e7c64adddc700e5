//! The ternary scheme's selection in two streamed passes: the exact top `density` by
//! magnitude (per sign or jointly, ties by lower index), as [`super::ternary`] defines it.
//!
//! Pass 1 counts a histogram of the top 14 bits of `τ`'s bits (sign, exponent and five
//! mantissa bits: [`BINS`] bins) over a sample, the elements whose index is a multiple of
//! [`STRIDE`], and places each selection's boundary in a band of bins with a margin of four
//! standard deviations of a sampled count. Pass 2 decides every entry above the band (kept) or
//! below it (dropped), writes the mask, the signs and the sums, counts the non-zero entries
//! exactly, and keeps the band's entries (a few in a hundred) as candidates with their exact
//! keys. The exact counts then give each selection's size and how many candidates it keeps:
//! the largest, lower index first among equal keys. If the band missed the boundary (the sample
//! misled), the candidates would pass a memory cap (a tensor whose values crowd one bin), or the
//! band reaches the bottom (a density near 1), the caller falls back to the general three-pass
//! selection ([`crate::methods::select`]), which walks ties element by element; nothing has
//! been stored then.

use super::bits::BitWriter;
use super::scheme::TensorInputs;
use crate::error::Result;
use crate::methods::MergeJob;
use crate::methods::select;
use crate::simd::{Bf16, Elems, keep_if, top_bits};
use crate::sums::LaneSum;

/// Histogram bins: the top 14 bits of an f32 (sign, exponent, 5 mantissa bits: 1/32 of an
/// octave; 4 interleaved u32 copies take 256 KiB, in L2).
const BINS: usize = 1 << 14;
/// The shift that gives an f32's bin.
const SHIFT: u32 = 18;
/// Bins of one sign (the sign bit is the bin's top bit).
const HALF: usize = BINS / 2;

/// Candidates a tensor may hold (8 bytes each) before the caller's general selection is used
/// instead: a sixteenth of its elements, at least 2²⁰. `AMALGAM_TERNARY_CANDIDATES` overrides it
/// (the tests set 0 to run the general selection on every tensor).
fn candidate_cap(n: usize) -> usize {
    static CAP: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    CAP.get_or_init(|| {
        std::env::var("AMALGAM_TERNARY_CANDIDATES")
            .ok()
            .and_then(|v| v.parse().ok())
    })
    .unwrap_or((n / 16).max(1 << 20))
}

/// One selection's rule for pass 2, in bins of its keys (`|τ|`'s top bits): entries above bin
/// `above` are kept, entries in bins `lo..=above` are candidates.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rule {
    above: i32,
    lo: i32,
}

/// Elements sampled in pass 1: those whose index is a multiple of this.
const STRIDE: usize = 8;

impl Rule {
    /// Keep nothing.
    const NONE: Rule = Rule {
        above: i32::MAX,
        lo: i32::MAX,
    };
    /// Keep every non-zero entry.
    const ALL: Rule = Rule { above: -1, lo: 0 };

    /// The band that holds, with a wide margin, the boundary of the `r` largest of the sample
    /// histogram `hist` (non-zero keys only): the bins above it hold at most `r − δ` of the
    /// sample, the band and above at least `r + δ` (δ four standard deviations of a sampled
    /// count, plus 16). `None` when the band would reach the bottom (too few non-zero entries
    /// sampled to be sure; the caller's general selection is used then).
    fn band(hist: &[u64], r: f64) -> Option<Rule> {
        let delta = 4.0 * (r + 1.0).sqrt() + 16.0;
        let (hi_target, lo_target) = (r - delta, r + delta);
        let mut above = hist.len() as i32; // nothing decided
        let mut count = 0u64; // the sample in the bins above `bin`
        for bin in (0..hist.len()).rev() {
            if (count as f64) <= hi_target {
                above = bin as i32;
            }
            count += hist[bin];
            if count as f64 >= lo_target {
                return Some(Rule {
                    above,
                    lo: bin as i32,
                });
            }
        }
        None
    }
}

/// Pass 1 of one task's chunk, elements `offset..`: the bins of `τ = x − b` at the sampled
/// indices (multiples of [`STRIDE`]) into `hist` (2 interleaved copies), and the sampled zeros
/// by sign.
#[inline(always)]
fn count<E: Elems>(offset: usize, x: E, b: E, hist: &mut [u32], zeros: &mut [u64; 2]) {
    let n = x.len().min(b.len());
    let (h0, rest) = hist.split_at_mut(BINS);
    let h1 = &mut rest[..BINS];
    let mut j = (STRIDE - offset % STRIDE) % STRIDE;
    let (mut z0, mut z1) = (0u64, 0u64);
    while j + STRIDE < n {
        let (r0, r1) = (
            (x.at(j) - b.at(j)).to_bits(),
            (x.at(j + STRIDE) - b.at(j + STRIDE)).to_bits(),
        );
        z0 += (r0 == 0) as u64 + (r1 == 0) as u64;
        z1 += (r0 == 0x8000_0000) as u64 + (r1 == 0x8000_0000) as u64;
        h0[(r0 >> SHIFT) as usize] += 1;
        h1[(r1 >> SHIFT) as usize] += 1;
        j += 2 * STRIDE;
    }
    if j < n {
        let r = (x.at(j) - b.at(j)).to_bits();
        z0 += (r == 0) as u64;
        z1 += (r == 0x8000_0000) as u64;
        h0[(r >> SHIFT) as usize] += 1;
    }
    zeros[0] += z0;
    zeros[1] += z1;
}

crate::simd::vectorized! {
    /// [`count`] of f32 inputs.
    fn count_f32(offset: usize, x: &[f32], b: &[f32], hist: &mut [u32], zeros: &mut [u64; 2]) {
        count(offset, x, b, hist, zeros)
    }
}

crate::simd::vectorized! {
    /// [`count`] of bf16 inputs.
    fn count_bf16(offset: usize, x: &[u16], b: &[u16], hist: &mut [u32], zeros: &mut [u64; 2]) {
        count(offset, Bf16(x), Bf16(b), hist, zeros)
    }
}

/// Per task: pass 1's histogram and zeros, then pass 2's streams, sums and candidates.
struct Task {
    hist: Vec<u32>,
    zeros: [u64; 2],
    /// Per side (positive, negative; one for a joint selection).
    rules: Vec<Rule>,
    mask: BitWriter,
    /// The sign bit (`τ > 0`) of every element; the signs of the kept ones are taken at the end.
    sign: BitWriter,
    /// `Σ τ_kept²`, `Σ |τ_kept|` over the entries decided in pass 2, and `Σ τ²`.
    sums: [LaneSum; 3],
    /// The non-zero entries.
    nonzero: u64,
    /// Per side: the candidates ([`candidate`]).
    cands: Vec<Vec<u64>>,
}

/// A candidate as stored: `(0x7fffffff − key) << 32 | index`, so that ascending order is key
/// descending, then index ascending.
#[inline(always)]
fn candidate(t: f32, index: usize) -> u64 {
    ((0x7fff_ffff - select::key(t) as u64) << 32) | index as u64
}

/// `(kept, candidate, positive, non-zero)` of `τ = t` under the side's rule.
#[inline(always)]
fn classify(t: f32, rules: [Rule; 2]) -> (bool, bool, bool, bool) {
    let r = t.to_bits();
    let key = r & 0x7fff_ffff;
    // The negative side's rule where the sign bit is set: selected with masks, not by
    // indexing (which would keep the loop scalar).
    let negative = (r >> 31) as i32;
    let pick = |p: i32, n: i32| p ^ ((p ^ n) & negative.wrapping_neg());
    let above = pick(rules[0].above, rules[1].above);
    let lo = pick(rules[0].lo, rules[1].lo);
    let bin = (key >> SHIFT) as i32;
    let nonzero = key != 0;
    (
        (bin > above) & nonzero,
        (bin >= lo) & (bin <= above) & nonzero,
        (negative == 0) & nonzero,
        nonzero,
    )
}

/// Pass 2's sums and non-zero count, as [`decide`] takes them.
type Sums<'s> = (&'s mut [LaneSum; 3], &'s mut u64);

/// Pass 2's whole blocks of 8, elements `head..head + 8 * blocks` of the chunk, the first ending
/// at tensor index `first_end`, 64 elements at a time: each stream's bits of 8 lanes gathered
/// from the lanes' top bits ([`top_bits`]), a word of 64 pushed at once. Returns the candidates'
/// bits (one per element from `head`), which the caller walks after the loop (a branch inside
/// it would cost the loop its vector form).
#[inline(always)]
fn runs<E: Elems, const V3: bool>(
    (x, b): (E, E),
    (head, blocks): (usize, usize),
    rules: [Rule; 2],
    [mask, sign]: [&mut BitWriter; 2],
    (sums, nonzero): Sums,
    first_end: usize,
) -> BitWriter {
    let mut found = BitWriter::with_capacity(8 * blocks);
    let [s0, s1, s2] = sums;
    let mut acc = crate::sums::Blocks::new([s0, s1, s2], first_end);
    let mut nz = 0u64;
    let mut k = 0;
    while k < blocks {
        let run = (blocks - k).min(8);
        let (mut mw, mut sw, mut cw) = (0u64, 0u64, 0u64);
        for r in 0..run {
            let j = head + 8 * (k + r);
            let (xb, bb) = (x.eight(j), b.eight(j));
            let (mut sq, mut ab, mut all) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            let (mut km, mut pm, mut cm, mut zm) = ([0u32; 8], [0u32; 8], [0u32; 8], [0u32; 8]);
            for l in 0..8 {
                let t = xb[l] - bb[l];
                let (kept, is_cand, positive, nonzero) = classify(t, rules);
                zm[l] = (nonzero as u32).wrapping_neg();
                km[l] = (kept as u32).wrapping_neg();
                pm[l] = (positive as u32).wrapping_neg();
                cm[l] = (is_cand as u32).wrapping_neg();
                let v = keep_if(t, kept);
                sq[l] = v * v;
                ab[l] = v.abs();
                all[l] = t * t;
            }
            // SAFETY: `V3` is the enclosing `vectorized!` body's.
            let (m, s, c, z) = unsafe {
                (
                    top_bits::<V3>(km),
                    top_bits::<V3>(pm),
                    top_bits::<V3>(cm),
                    top_bits::<V3>(zm),
                )
            };
            nz += u64::from(z.count_ones());
            mw |= u64::from(m) << (8 * r);
            sw |= u64::from(s) << (8 * r);
            cw |= u64::from(c) << (8 * r);
            acc.add([sq, ab, all]);
        }
        mask.push_wide(mw, 8 * run as u32);
        sign.push_wide(sw, 8 * run as u32);
        found.push_wide(cw, 8 * run as u32);
        k += run;
    }
    acc.finish();
    *nonzero += nz;
    found
}

/// [`runs`] of bf16 inputs in AVX2 registers written out: the same operations in the same
/// order (so the same bits and sums), without the spills of the partial sums and lane arrays
/// that the compiler's version of the generic loop has. Its runs end at multiples of 64
/// elements of the tensor (the first may be shorter), so a flush of the lane sums (every
/// [`FLUSH`](crate::sums::FLUSH)) falls between runs, outside the loop that feeds them: with the
/// flush inside it, the compiler kept the partial sums in memory.
///
/// # Safety
/// The CPU must have AVX2, BMI2 and POPCNT.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,popcnt")]
unsafe fn runs_bf16_avx2(
    (x, b): (&[u16], &[u16]),
    (head, blocks): (usize, usize),
    rules: [Rule; 2],
    [mask, sign]: [&mut BitWriter; 2],
    (sums, nonzero): Sums,
    first_end: usize,
) -> BitWriter {
    use std::arch::x86_64::*;
    assert!(x.len() >= head + 8 * blocks && b.len() >= head + 8 * blocks);
    let mut found = BitWriter::with_capacity(8 * blocks);
    let [s0, s1, s2] = sums;
    // SAFETY (every load below): elements `head + 8 * i .. + 8` with `i < blocks`, in bounds
    // by the assertion.
    unsafe {
        let widen = |p: *const u16| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            )))
        };
        // A side's rule per lane by the sign of τ (blendv takes the sign bit): positive
        // first, negative second.
        let rule = |p: i32, n: i32| {
            (
                _mm256_set1_ps(f32::from_bits(p as u32)),
                _mm256_set1_ps(f32::from_bits(n as u32)),
            )
        };
        let (above_p, above_n) = rule(rules[0].above, rules[1].above);
        let (lo_p, lo_n) = rule(rules[0].lo, rules[1].lo);
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        // A lane sum's flush ([`LaneSum::flush`]) from registers (the partial sum taken by
        // value, which keeps it out of memory).
        let flush = |total: &mut [f64; 8], p: __m256| {
            let t = total.as_mut_ptr();
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(p));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(p));
            _mm256_storeu_pd(t, _mm256_add_pd(_mm256_loadu_pd(t), lo));
            _mm256_storeu_pd(t.add(4), _mm256_add_pd(_mm256_loadu_pd(t.add(4)), hi));
            _mm256_setzero_ps()
        };
        let load = |a: &[f32; 8]| _mm256_loadu_ps(a.as_ptr());
        let (mut p0, mut p1, mut p2) = (load(&s0.part), load(&s1.part), load(&s2.part));
        // The tensor index where block `k` starts.
        let start = |k: usize| first_end - 8 + 8 * k;
        let mut nz = 0u64;
        let mut k = 0;
        while k < blocks {
            let run = (blocks - k).min((64 - start(k) % 64) / 8);
            let (mut mw, mut sw, mut cw) = (0u64, 0u64, 0u64);
            for r in 0..run {
                let j = head + 8 * (k + r);
                let t = _mm256_sub_ps(widen(x.as_ptr().add(j)), widen(b.as_ptr().add(j)));
                let key = _mm256_and_si256(_mm256_castps_si256(t), magnitude);
                let bin = _mm256_srli_epi32::<18>(key);
                let is_zero = _mm256_cmpeq_epi32(key, _mm256_setzero_si256());
                let pick = |p: __m256, n: __m256| _mm256_castps_si256(_mm256_blendv_ps(p, n, t));
                // kept: bin > above; candidate: lo <= bin <= above; both non-zero.
                let over = _mm256_cmpgt_epi32(bin, pick(above_p, above_n));
                let outside = _mm256_or_si256(over, _mm256_cmpgt_epi32(pick(lo_p, lo_n), bin));
                let bits = |v: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(v)) as u8;
                let nonzero = !bits(is_zero);
                nz += u64::from(nonzero.count_ones());
                mw |= u64::from(bits(over) & nonzero) << (8 * r);
                sw |= u64::from(!(_mm256_movemask_ps(t) as u8) & nonzero) << (8 * r);
                cw |= u64::from(!bits(outside) & nonzero) << (8 * r);
                // τ where kept, else ±0 (whose square and magnitude add +0, as the generic
                // loop's +0 does); |τ| is the key's bits.
                let v = _mm256_and_ps(t, _mm256_castsi256_ps(over));
                p0 = _mm256_add_ps(p0, _mm256_mul_ps(v, v));
                p1 = _mm256_add_ps(p1, _mm256_castsi256_ps(_mm256_and_si256(key, over)));
                p2 = _mm256_add_ps(p2, _mm256_mul_ps(t, t));
            }
            if start(k + run).is_multiple_of(crate::sums::FLUSH) {
                p0 = flush(&mut s0.total, p0);
                p1 = flush(&mut s1.total, p1);
                p2 = flush(&mut s2.total, p2);
            }
            mask.push_wide(mw, 8 * run as u32);
            sign.push_wide(sw, 8 * run as u32);
            found.push_wide(cw, 8 * run as u32);
            k += run;
        }
        _mm256_storeu_ps(s0.part.as_mut_ptr(), p0);
        _mm256_storeu_ps(s1.part.as_mut_ptr(), p1);
        _mm256_storeu_ps(s2.part.as_mut_ptr(), p2);
        *nonzero += nz;
    }
    found
}

/// Pass 2 of one task's chunk, elements `offset..`: the mask of the decided entries, every sign
/// bit (`[mask, sign]`), the sums (`[Σ τ_kept², Σ |τ_kept|, Σ τ²]`, the last over every entry:
/// here rather than in pass 1, which then touches only its sample), and the candidates (to
/// `cands[side]`; side 0 only when `joint`). `rules` is `([positive, negative], joint)` (the
/// same rule twice for a joint selection). `whole_blocks` runs the aligned blocks between the
/// first and last elements ([`runs`] or [`runs_bf16_avx2`]).
#[inline(always)]
fn decide<E: Elems, const V3: bool>(
    offset: usize,
    (x, b): (E, E),
    (rules, joint): ([Rule; 2], bool),
    [mask, sign]: [&mut BitWriter; 2],
    (sums, nonzero): Sums,
    cands: &mut [Vec<u64>],
    whole_blocks: impl FnOnce(usize, usize, [Rule; 2], [&mut BitWriter; 2], Sums, usize) -> BitWriter,
) {
    let side = |t: f32| {
        if joint {
            0
        } else {
            (t.to_bits() >> 31) as usize
        }
    };
    let n = x.len().min(b.len());
    let (head, blocks) = crate::sums::spans(offset, n);
    // Element `j` alone (the span before the first block and after the last).
    let one = |j: usize,
               mask: &mut BitWriter,
               sign: &mut BitWriter,
               sums: &mut [LaneSum; 3],
               nonzeros: &mut u64,
               cands: &mut [Vec<u64>]| {
        let (e, t) = (offset + j, x.at(j) - b.at(j));
        let (kept, c, positive, nonzero) = classify(t, rules);
        mask.push(kept);
        sign.push(positive);
        if c {
            cands[side(t)].push(candidate(t, e));
        }
        let v = keep_if(t, kept);
        let [a, b, c] = sums;
        *nonzeros += nonzero as u64;
        a.one(e, v * v);
        b.one(e, v.abs());
        c.one(e, t * t);
    };
    for j in 0..head {
        one(j, mask, sign, sums, nonzero, cands);
    }
    let found = whole_blocks(
        head,
        blocks,
        rules,
        [&mut *mask, &mut *sign],
        (&mut *sums, &mut *nonzero),
        offset + head + 8,
    );
    for (w, word) in found.into_bytes().chunks(8).enumerate() {
        let mut bytes = [0u8; 8];
        bytes[..word.len()].copy_from_slice(word);
        let (j, mut c) = (head + 64 * w, u64::from_le_bytes(bytes));
        while c != 0 {
            let l = c.trailing_zeros() as usize;
            c &= c - 1;
            let t = x.at(j + l) - b.at(j + l);
            cands[side(t)].push(candidate(t, offset + j + l));
        }
    }
    for j in head + 8 * blocks..n {
        one(j, mask, sign, sums, nonzero, cands);
    }
}

crate::simd::vectorized! {
    /// [`decide`] of f32 inputs.
    fn decide_f32(offset: usize, x: &[f32], b: &[f32], rules: ([Rule; 2], bool), bits: [&mut BitWriter; 2], sums: Sums, cands: &mut [Vec<u64>]) {
        decide::<_, V3>(offset, (x, b), rules, bits, sums, cands, |head, blocks, rules, bits, sums, first_end| {
            runs::<_, V3>((x, b), (head, blocks), rules, bits, sums, first_end)
        })
    }
}

crate::simd::vectorized! {
    /// [`decide`] of bf16 inputs.
    fn decide_bf16(offset: usize, x: &[u16], b: &[u16], rules: ([Rule; 2], bool), bits: [&mut BitWriter; 2], sums: Sums, cands: &mut [Vec<u64>]) {
        decide::<_, V3>(offset, (Bf16(x), Bf16(b)), rules, bits, sums, cands, |head, blocks, rules, bits, sums, first_end| {
            #[cfg(target_arch = "x86_64")]
            if V3 {
                // SAFETY: `V3`: the CPU has the features the v3 copy was compiled for.
                return unsafe { runs_bf16_avx2((x, b), (head, blocks), rules, bits, sums, first_end) };
            }
            runs::<_, V3>((Bf16(x), Bf16(b)), (head, blocks), rules, bits, sums, first_end)
        })
    }
}

/// What a task's selection came to: its mask and sign streams and `[Σ τ_kept², Σ |τ_kept|,
/// Σ τ²]`.
pub(super) type Selected = (BitWriter, BitWriter, [f64; 3]);

/// Select every task's entries of one matrix in two passes (`joint`: one selection over both
/// signs; `density` per task). `None` when the candidates would exceed the cap; nothing has been
/// stored then, and the inputs can be read again.
pub(super) fn select(
    job: &MergeJob,
    inputs: &mut dyn TensorInputs,
    joint: bool,
    density: &[f64],
) -> Result<Option<Vec<Selected>>> {
    let tasks = job.non_base();
    let n = job.numel();
    if n > u32::MAX as usize {
        return Ok(None);
    }
    let sides = if joint { 1 } else { 2 };
    let mut state: Vec<Task> = tasks
        .iter()
        .map(|_| Task {
            hist: vec![0; 4 * BINS],
            zeros: [0; 2],
            rules: Vec::new(),
            mask: BitWriter::with_capacity(n),
            sign: BitWriter::with_capacity(n),
            sums: [LaneSum::default(); 3],
            nonzero: 0,
            cands: vec![Vec::new(); sides],
        })
        .collect();
    inputs.pass_bf16(1, &mut |chunk, offset| {
        for (st, &i) in state.iter_mut().zip(&tasks) {
            match chunk.base_bf16() {
                Some(b) => count_bf16(offset, chunk.bf16[i], b, &mut st.hist, &mut st.zeros),
                None => count_f32(
                    offset,
                    chunk.inputs[i],
                    chunk.base_tensor(),
                    &mut st.hist,
                    &mut st.zeros,
                ),
            }
        }
        Ok(())
    })?;
    // The sampled elements of the tensor.
    let sampled = n.div_ceil(STRIDE) as f64;
    for (st, &d) in state.iter_mut().zip(density) {
        let mut hist = vec![0u64; BINS];
        for part in st.hist.chunks_exact(BINS) {
            hist.iter_mut().zip(part).for_each(|(h, &c)| *h += c as u64);
        }
        st.hist = Vec::new();
        // The sample's bins of |τ| for each sign (zeros are never kept: out of bin 0).
        let (mut pos, mut neg) = (hist[..HALF].to_vec(), hist[HALF..].to_vec());
        pos[0] -= st.zeros[0];
        neg[0] -= st.zeros[1];
        let rule = if d <= 0.0 {
            Some(vec![Rule::NONE])
        } else if d >= 1.0 {
            Some(vec![Rule::ALL])
        } else if joint {
            let both: Vec<u64> = pos.iter().zip(&neg).map(|(a, b)| a + b).collect();
            Rule::band(&both, d * sampled).map(|r| vec![r])
        } else {
            let (p, q): (u64, u64) = (pos.iter().sum(), neg.iter().sum());
            Rule::band(&pos, d * p as f64)
                .zip(Rule::band(&neg, d * q as f64))
                .map(|(a, b)| vec![a, b])
        };
        match rule {
            Some(r) => st.rules = r,
            None => return Ok(None),
        }
    }
    let cap = candidate_cap(n);
    let mut held = 0usize;
    let mut overflow = false;
    inputs.pass_bf16(1, &mut |chunk, offset| {
        if overflow {
            return Ok(());
        }
        for (st, &i) in state.iter_mut().zip(&tasks) {
            let rules = [st.rules[0], *st.rules.last().expect("a rule")];
            let before: usize = st.cands.iter().map(Vec::len).sum();
            let (bits, sums, cands) = (
                [&mut st.mask, &mut st.sign],
                (&mut st.sums, &mut st.nonzero),
                &mut st.cands,
            );
            match chunk.base_bf16() {
                Some(b) => decide_bf16(offset, chunk.bf16[i], b, (rules, joint), bits, sums, cands),
                None => {
                    let (x, b) = (chunk.inputs[i], chunk.base_tensor());
                    decide_f32(offset, x, b, (rules, joint), bits, sums, cands)
                }
            }
            held += st.cands.iter().map(Vec::len).sum::<usize>() - before;
            if held > cap {
                overflow = true;
                return Ok(());
            }
        }
        Ok(())
    })?;
    if overflow {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (st, &d) in state.into_iter().zip(density) {
        let mut mask = st.mask.into_bytes();
        let sign_bytes = st.sign.into_bytes();
        // The exact counts: non-zero entries and those decided, per sign, give each selection's
        // count and how many of its candidates it keeps; a band that missed the boundary (the
        // sample misled) leaves the general selection to do it.
        let [decided, positive, decided_pos] =
            super::bits::count_pair(&mask, &sign_bytes).map(|c| c as u64);
        let nonzero = st.nonzero;
        let round = |x: f64| x.round() as u64;
        let wanted: Vec<(u64, u64)> = if joint {
            vec![(round(d * n as f64).min(nonzero), decided)]
        } else {
            vec![
                (round(d * positive as f64), decided_pos),
                (
                    round(d * (nonzero - positive) as f64),
                    decided - decided_pos,
                ),
            ]
        };
        let mut quotas = Vec::with_capacity(wanted.len());
        for ((k, a), c) in wanted.iter().zip(&st.cands) {
            if *a > *k || *k > *a + c.len() as u64 {
                return Ok(None);
            }
            quotas.push((k - a) as usize);
        }
        // The quota of each side's candidates, largest key first, lower index among equals;
        // their sums in index order.
        let (mut kept2, mut kept_abs) = (0f64, 0f64);
        for (&quota, mut cands) in quotas.iter().zip(st.cands) {
            // The `quota` smallest (largest keys), in no order: the values are distinct.
            if quota < cands.len() {
                cands.select_nth_unstable(quota);
            }
            let mut chosen: Vec<u64> = cands[..quota]
                .iter()
                .map(|&c| (c << 32 >> 32) | ((0x7fff_ffff - (c >> 32)) << 32))
                .collect();
            chosen.sort_unstable_by_key(|&c| c & 0xffff_ffff);
            for c in chosen {
                let (index, key) = ((c & 0xffff_ffff) as usize, (c >> 32) as u32);
                mask[index / 8] |= 1 << (index % 8);
                let v = f32::from_bits(key) as f64;
                kept2 += v * v;
                kept_abs += v;
            }
        }
        let [a, b, c] = st.sums.map(|s| s.total());
        let mut sign = BitWriter::with_capacity(n);
        sign.push_selected(&sign_bytes, &mask, n);
        let mut m = BitWriter::with_capacity(n);
        m.push_stream(&mask, n);
        out.push((m, sign, [a + kept2, b + kept_abs, c]));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_hold_the_sampled_boundary_with_a_margin() {
        // 1000 sampled keys in each of bins 0..8.
        let hist = vec![1000u64; 8];
        // The 3500 largest: the boundary is in bin 4; δ = 4·√3501 + 16 ≈ 253.
        let r = Rule::band(&hist, 3500.0).unwrap();
        assert_eq!((r.above, r.lo), (4, 4));
        // Near a bin edge the band takes both bins.
        let r = Rule::band(&hist, 4000.0).unwrap();
        assert_eq!((r.above, r.lo), (4, 3));
        // Near the bottom it is inconclusive.
        assert!(Rule::band(&hist, 7900.0).is_none());
        // The top bin is the boundary's: nothing above it to decide.
        let r = Rule::band(&hist, 100.0).unwrap();
        assert_eq!((r.above, r.lo), (7, 7));
        // So few wanted that even the top bin may hold more: above every bin.
        let r = Rule::band(&hist, 10.0).unwrap();
        assert_eq!((r.above, r.lo), (8, 7));
    }

    /// Pass 2 of one chunk through [`decide`] with the given block loop: the mask and sign
    /// bytes, the sums' lanes, the non-zero count and the candidates.
    type Decided = (
        Vec<u8>,
        Vec<u8>,
        Vec<([u64; 8], [u32; 8])>,
        u64,
        Vec<Vec<u64>>,
    );

    /// `V3` is the generic loop's copy: true only where the caller is compiled for x86-64-v3.
    #[inline(always)]
    fn decided<const V3: bool>(
        offset: usize,
        (x, b): (&[u16], &[u16]),
        rules: ([Rule; 2], bool),
        avx2: bool,
    ) -> Decided {
        let (mut mask, mut sign) = (BitWriter::default(), BitWriter::default());
        // Sums that already hold something, as in a tensor's later chunks.
        let mut sums = [LaneSum::default(); 3];
        for (s, sum) in sums.iter_mut().enumerate() {
            sum.add(0, &[0.25 + s as f32; 13]);
        }
        let (mut nonzero, mut cands) = (0u64, vec![Vec::new(); 2]);
        decide::<_, true>(
            offset,
            (Bf16(x), Bf16(b)),
            rules,
            [&mut mask, &mut sign],
            (&mut sums, &mut nonzero),
            &mut cands,
            |head, blocks, rules, bits, sums, first_end| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the caller checked the CPU.
                    return unsafe {
                        runs_bf16_avx2((x, b), (head, blocks), rules, bits, sums, first_end)
                    };
                }
                runs::<_, V3>(
                    (Bf16(x), Bf16(b)),
                    (head, blocks),
                    rules,
                    bits,
                    sums,
                    first_end,
                )
            },
        );
        let lanes = sums
            .iter()
            .map(|s| (s.total.map(f64::to_bits), s.part.map(f32::to_bits)))
            .collect();
        (mask.into_bytes(), sign.into_bytes(), lanes, nonzero, cands)
    }

    #[test]
    fn the_avx2_decisions_equal_the_generic_loop_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::v3() {
            // bf16 task vectors around a base, with zeros (equal entries) and repeated values.
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let n = 5000;
            let b: Vec<u16> = (0..n).map(|_| 0x3c00 + (next() % 0x200) as u16).collect();
            let x: Vec<u16> = b
                .iter()
                .map(|&v| match next() % 8 {
                    0 => v,
                    1 => 0x3c10,
                    _ => v.wrapping_add((next() % 64) as u16).wrapping_sub(32),
                })
                .collect();
            let bin = |v: f32| (v.to_bits() >> SHIFT) as i32;
            let mid = bin(1e-2);
            let rule = |above: i32, lo: i32| Rule { above, lo };
            let rules = [
                ([rule(mid, mid - 6), rule(mid + 1, mid - 5)], false),
                ([rule(mid - 3, mid - 3); 2], true),
                ([Rule::ALL, Rule::NONE], false),
                ([Rule::NONE, rule(mid, 0)], false),
            ];
            // Chunks that start anywhere: before, at and after flush and word boundaries.
            for offset in [0, 3, 8, 56, 64, 200, 255, 256, 257, 1000, 4096 - 24] {
                for len in [0, 5, 64, 700, n] {
                    let (x, b) = (&x[..len], &b[..len]);
                    for &r in &rules {
                        let got = decided::<false>(offset, (x, b), r, true);
                        assert_eq!(
                            got,
                            decided::<false>(offset, (x, b), r, false),
                            "offset {offset}, {len} elements, rules {r:?}"
                        );
                        let kept: u32 = got.0.iter().map(|m| m.count_ones()).sum();
                        let cands: usize = got.4.iter().map(Vec::len).sum();
                        if len == n && r == rules[0] {
                            // Every kind of decision is made.
                            assert!(
                                kept > 100 && cands > 100 && got.3 < n as u64,
                                "{kept} {cands}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Pass 2 of `x`, `b` through the generic block loop compiled for x86-64-v3 (what bf16
    /// inputs took before [`runs_bf16_avx2`]) or through the AVX2 one.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
    fn pass2_v3(x: &[u16], b: &[u16], rules: ([Rule; 2], bool), avx2: bool) -> Decided {
        decided::<true>(0, (x, b), rules, avx2)
    }

    /// The time per element of pass 2's two block loops, in cache (32 Ki elements) and from
    /// memory (16 Mi), best of 5 runs, alternating:
    /// `cargo test --release -p amalgam --lib pass2_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing, not a check"]
    fn pass2_timing() {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::v3() {
            for n in [1usize << 15, 1 << 24] {
                let b: Vec<u16> = (0..n)
                    .map(|i| 0x3c00 + ((i * 7919) % 0x200) as u16)
                    .collect();
                let x: Vec<u16> = b
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v.wrapping_add(((i * 31) % 64) as u16).wrapping_sub(32))
                    .collect();
                let mid = (1e-2f32.to_bits() >> SHIFT) as i32;
                let rules = (
                    [
                        Rule {
                            above: mid,
                            lo: mid - 1,
                        },
                        Rule {
                            above: mid + 1,
                            lo: mid,
                        },
                    ],
                    false,
                );
                let reps = (1 << 27) / n;
                for avx2 in [false, true, false, true] {
                    let mut best = f64::MAX;
                    for _ in 0..5 {
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            // SAFETY: `v3()` checked the CPU.
                            std::hint::black_box(unsafe { pass2_v3(&x, &b, rules, avx2) });
                        }
                        best = best.min(t.elapsed().as_secs_f64() / (reps * n) as f64 * 1e9);
                    }
                    let name = if avx2 {
                        "AVX2 loop"
                    } else {
                        "generic loop (v3)"
                    };
                    println!("{n:>9} elements, {name:>17}: {best:.3} ns per element");
                }
            }
        }
    }
}
