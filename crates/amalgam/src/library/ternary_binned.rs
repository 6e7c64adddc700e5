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
#[derive(Clone, Copy, Debug)]
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
/// by sign; and `Σ τ²` over every element into `all` (here, where few registers are in use,
/// rather than in pass 2's loop, which has too few left).
#[inline(always)]
fn count<E: Elems>(
    offset: usize,
    x: E,
    b: E,
    hist: &mut [u32],
    zeros: &mut [u64; 2],
    all: &mut LaneSum,
) {
    let n = x.len().min(b.len());
    let (head, blocks) = crate::sums::spans(offset, n);
    let square = |j: usize| {
        let t = x.at(j) - b.at(j);
        t * t
    };
    for j in 0..head {
        all.one(offset + j, square(j));
    }
    let mut acc = crate::sums::Blocks::new([&mut *all], offset + head + 8);
    for k in 0..blocks {
        let (xb, bb) = (x.eight(head + 8 * k), b.eight(head + 8 * k));
        acc.add([std::array::from_fn(|l| {
            let t = xb[l] - bb[l];
            t * t
        })]);
    }
    acc.finish();
    for j in head + 8 * blocks..n {
        all.one(offset + j, square(j));
    }
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
    fn count_f32(offset: usize, x: &[f32], b: &[f32], hist: &mut [u32], zeros: &mut [u64; 2], all: &mut LaneSum) {
        count(offset, x, b, hist, zeros, all)
    }
}

crate::simd::vectorized! {
    /// [`count`] of bf16 inputs.
    fn count_bf16(offset: usize, x: &[u16], b: &[u16], hist: &mut [u32], zeros: &mut [u64; 2], all: &mut LaneSum) {
        count(offset, Bf16(x), Bf16(b), hist, zeros, all)
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
    /// `Σ τ_kept²`, `Σ |τ_kept|` over the entries decided in pass 2.
    sums: [LaneSum; 2],
    /// `Σ τ²`, from pass 1.
    all: LaneSum,
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

/// Pass 2 of one task's chunk, elements `offset..`: the mask of the decided entries, every sign
/// bit (`[mask, sign]`), the decided entries' sums, and the candidates (to `cands[side]`; side
/// 0 only when `joint`). `rules` is `([positive, negative], joint)` (the same rule twice for a
/// joint selection).
#[inline(always)]
fn decide<E: Elems, const V3: bool>(
    offset: usize,
    x: E,
    b: E,
    (rules, joint): ([Rule; 2], bool),
    [mask, sign]: [&mut BitWriter; 2],
    (sums, nonzero): (&mut [LaneSum; 2], &mut u64),
    cands: &mut [Vec<u64>],
) {
    /// `(kept, candidate, positive)`.
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
               sums: &mut [LaneSum; 2],
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
        let [a, b] = sums;
        *nonzeros += nonzero as u64;
        a.one(e, v * v);
        b.one(e, v.abs());
    };
    for j in 0..head {
        one(j, mask, sign, sums, nonzero, cands);
    }
    // The blocks, 64 elements at a time: each stream's bits of 8 lanes gathered from the lanes'
    // top bits ([`top_bits`]), a word of 64 pushed at once; the candidates' words are walked
    // after the loop (a branch inside it would cost the loop its vector form).
    let mut found: Vec<u64> = Vec::with_capacity(blocks.div_ceil(8));
    {
        let [s0, s1] = &mut *sums;
        let mut acc = crate::sums::Blocks::new([s0, s1], offset + head + 8);
        let mut nz = 0u64;
        let mut k = 0;
        while k < blocks {
            let run = (blocks - k).min(8);
            let (mut mw, mut sw, mut cw) = (0u64, 0u64, 0u64);
            for r in 0..run {
                let j = head + 8 * (k + r);
                let (xb, bb) = (x.eight(j), b.eight(j));
                let (mut sq, mut ab) = ([0f32; 8], [0f32; 8]);
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
                acc.add([sq, ab]);
            }
            mask.push_wide(mw, 8 * run as u32);
            sign.push_wide(sw, 8 * run as u32);
            found.push(cw);
            k += run;
        }
        acc.finish();
        *nonzero += nz;
    }
    for (w, &word) in found.iter().enumerate() {
        let (j, mut c) = (head + 64 * w, word);
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
    fn decide_f32(offset: usize, x: &[f32], b: &[f32], rules: ([Rule; 2], bool), bits: [&mut BitWriter; 2], sums: (&mut [LaneSum; 2], &mut u64), cands: &mut [Vec<u64>]) {
        decide::<_, V3>(offset, x, b, rules, bits, sums, cands)
    }
}

crate::simd::vectorized! {
    /// [`decide`] of bf16 inputs.
    fn decide_bf16(offset: usize, x: &[u16], b: &[u16], rules: ([Rule; 2], bool), bits: [&mut BitWriter; 2], sums: (&mut [LaneSum; 2], &mut u64), cands: &mut [Vec<u64>]) {
        decide::<_, V3>(offset, Bf16(x), Bf16(b), rules, bits, sums, cands)
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
            sums: [LaneSum::default(); 2],
            all: LaneSum::default(),
            nonzero: 0,
            cands: vec![Vec::new(); sides],
        })
        .collect();
    inputs.pass_bf16(1, &mut |chunk, offset| {
        for (st, &i) in state.iter_mut().zip(&tasks) {
            match chunk.base_bf16() {
                Some(b) => count_bf16(
                    offset,
                    chunk.bf16[i],
                    b,
                    &mut st.hist,
                    &mut st.zeros,
                    &mut st.all,
                ),
                None => count_f32(
                    offset,
                    chunk.inputs[i],
                    chunk.base_tensor(),
                    &mut st.hist,
                    &mut st.zeros,
                    &mut st.all,
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
        let ([a, b], c) = (st.sums.map(|s| s.total()), st.all.total());
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
}
