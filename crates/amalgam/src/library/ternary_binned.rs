//! The ternary scheme's selection in two streamed passes: the exact top `density` by
//! magnitude (per sign or jointly, ties by lower index), as [`super::ternary`] defines it.
//!
//! Pass 1 counts a histogram of the top 14 bits of each `τ`'s bits (sign, exponent and five
//! mantissa bits: [`BINS`] bins, small enough to stay in cache), which places each selection's
//! boundary in one bin. Pass 2 decides every entry outside that bin (kept when above it) and
//! writes the mask, the signs and the sums; entries inside it (1–3 % of a tensor) are kept
//! aside as candidates with their exact keys, and after the pass the largest of them (lower
//! index first among equal keys) fill the selection's count. The general selection
//! ([`crate::methods::select`]) needs three passes and walks ties element by element; this one
//! is used unless the candidates would exceed a memory cap (a tensor whose values crowd one
//! bin), and then the caller falls back to it.

use super::bits::BitWriter;
use super::scheme::TensorInputs;
use crate::error::Result;
use crate::methods::MergeJob;
use crate::methods::select;
use crate::simd::{Bf16, Elems, keep_if};
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
/// `above` are kept, entries in bin `cand` are candidates (`-2`: none), and `quota` of the
/// candidates are kept.
#[derive(Clone, Copy, Debug)]
struct Rule {
    above: i32,
    cand: i32,
    quota: usize,
}

impl Rule {
    /// The rule that keeps the `k` largest non-zero keys of a histogram of `|τ|`'s bins
    /// (`hist[0]` without the zeros, which are never kept).
    fn top(hist: &[u64], k: u64) -> Rule {
        let nonzero: u64 = hist.iter().sum();
        if k == 0 {
            return Rule {
                above: i32::MAX,
                cand: -2,
                quota: 0,
            };
        }
        if k >= nonzero {
            return Rule {
                above: -1,
                cand: -2,
                quota: 0,
            };
        }
        let mut above = 0u64;
        for bin in (0..hist.len()).rev() {
            let c = hist[bin];
            if above + c >= k {
                let quota = k - above;
                return if quota == c {
                    // The whole bin: no candidates.
                    Rule {
                        above: bin as i32 - 1,
                        cand: -2,
                        quota: 0,
                    }
                } else {
                    Rule {
                        above: bin as i32,
                        cand: bin as i32,
                        quota: quota as usize,
                    }
                };
            }
            above += c;
        }
        unreachable!("k < the non-zero count")
    }
}

/// Pass 1 of one task's chunk: `τ = x − b`'s bins into `hist` (4 interleaved copies, so that
/// neighbouring increments of one bin do not wait on each other), and its zeros by sign.
#[inline(always)]
fn count<E: Elems>(x: E, b: E, hist: &mut [u32], zeros: &mut [u64; 2]) {
    let n = x.len().min(b.len());
    let (h0, rest) = hist.split_at_mut(BINS);
    let (h1, rest) = rest.split_at_mut(BINS);
    let (h2, h3) = rest.split_at_mut(BINS);
    let h3 = &mut h3[..BINS];
    let (mut z0, mut z1) = (0u64, 0u64);
    for k in 0..n / 8 {
        let (xb, bb) = (x.eight(8 * k), b.eight(8 * k));
        let r: [u32; 8] = std::array::from_fn(|l| (xb[l] - bb[l]).to_bits());
        for (l, &r) in r.iter().enumerate() {
            z0 += (r == 0) as u64;
            z1 += (r == 0x8000_0000) as u64;
            let bin = (r >> SHIFT) as usize;
            match l % 4 {
                0 => h0[bin] += 1,
                1 => h1[bin] += 1,
                2 => h2[bin] += 1,
                _ => h3[bin] += 1,
            }
        }
    }
    for j in n / 8 * 8..n {
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
    fn count_f32(x: &[f32], b: &[f32], hist: &mut [u32], zeros: &mut [u64; 2]) {
        count(x, b, hist, zeros)
    }
}

crate::simd::vectorized! {
    /// [`count`] of bf16 inputs.
    fn count_bf16(x: &[u16], b: &[u16], hist: &mut [u32], zeros: &mut [u64; 2]) {
        count(Bf16(x), Bf16(b), hist, zeros)
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
    /// `Σ τ_kept²`, `Σ |τ_kept|`, `Σ τ²` over the entries decided in pass 2.
    sums: [LaneSum; 3],
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
fn decide<E: Elems>(
    offset: usize,
    x: E,
    b: E,
    (rules, joint): ([Rule; 2], bool),
    [mask, sign]: [&mut BitWriter; 2],
    sums: &mut [LaneSum; 3],
    cands: &mut [Vec<u64>],
) {
    /// `(kept, candidate, positive)`.
    #[inline(always)]
    fn classify(t: f32, rules: [Rule; 2]) -> (bool, bool, bool) {
        let r = t.to_bits();
        let key = r & 0x7fff_ffff;
        // The negative side's rule where the sign bit is set: selected with masks, not by
        // indexing (which would keep the loop scalar).
        let negative = (r >> 31) as i32;
        let pick = |p: i32, n: i32| p ^ ((p ^ n) & negative.wrapping_neg());
        let above = pick(rules[0].above, rules[1].above);
        let cand = pick(rules[0].cand, rules[1].cand);
        let bin = (key >> SHIFT) as i32;
        let nonzero = key != 0;
        (
            (bin > above) & nonzero,
            (bin == cand) & nonzero,
            (negative == 0) & nonzero,
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
    let one = |e: usize,
               t: f32,
               mask: &mut BitWriter,
               sign: &mut BitWriter,
               sums: &mut [LaneSum; 3],
               cands: &mut [Vec<u64>]| {
        let (kept, c, positive) = classify(t, rules);
        mask.push(kept);
        sign.push(positive);
        if c {
            cands[side(t)].push(candidate(t, e));
        }
        let v = keep_if(t, kept);
        let [a, b, s] = sums;
        a.one(e, v * v);
        b.one(e, v.abs());
        s.one(e, t * t);
    };
    for j in 0..head {
        one(offset + j, x.at(j) - b.at(j), mask, sign, sums, cands);
    }
    // The blocks' candidate bits, walked after the loop (a branch inside it would cost the loop
    // its vector form).
    let mut found = BitWriter::with_capacity(8 * blocks);
    {
        let [s0, s1, s2] = &mut *sums;
        let mut acc = crate::sums::Blocks::new([s0, s1, s2], offset + head + 8);
        for k in 0..blocks {
            let j = head + 8 * k;
            let (xb, bb) = (x.eight(j), b.eight(j));
            let (mut sq, mut ab, mut all) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            let (mut m, mut s, mut c) = (0u8, 0u8, 0u8);
            for l in 0..8 {
                let t = xb[l] - bb[l];
                let (kept, is_cand, positive) = classify(t, rules);
                m |= (kept as u8) << l;
                s |= (positive as u8) << l;
                c |= (is_cand as u8) << l;
                let v = keep_if(t, kept);
                sq[l] = v * v;
                ab[l] = v.abs();
                all[l] = t * t;
            }
            mask.push_byte(m);
            sign.push_byte(s);
            found.push_byte(c);
            acc.add([sq, ab, all]);
        }
        acc.finish();
    }
    let found = found.into_bytes();
    let found = found
        .iter()
        .enumerate()
        .filter(|&(_, &c)| c != 0)
        .map(|(k, &c)| (head + 8 * k, c));
    for (j, mut c) in found {
        while c != 0 {
            let l = c.trailing_zeros() as usize;
            c &= c - 1;
            let t = x.at(j + l) - b.at(j + l);
            cands[side(t)].push(candidate(t, offset + j + l));
        }
    }
    for j in head + 8 * blocks..n {
        one(offset + j, x.at(j) - b.at(j), mask, sign, sums, cands);
    }
}

crate::simd::vectorized! {
    /// [`decide`] of f32 inputs.
    fn decide_f32(offset: usize, x: &[f32], b: &[f32], rules: ([Rule; 2], bool), bits: [&mut BitWriter; 2], sums: &mut [LaneSum; 3], cands: &mut [Vec<u64>]) {
        decide(offset, x, b, rules, bits, sums, cands)
    }
}

crate::simd::vectorized! {
    /// [`decide`] of bf16 inputs.
    fn decide_bf16(offset: usize, x: &[u16], b: &[u16], rules: ([Rule; 2], bool), bits: [&mut BitWriter; 2], sums: &mut [LaneSum; 3], cands: &mut [Vec<u64>]) {
        decide(offset, Bf16(x), Bf16(b), rules, bits, sums, cands)
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
            cands: vec![Vec::new(); sides],
        })
        .collect();
    inputs.pass_bf16(1, &mut |chunk, _| {
        for (st, &i) in state.iter_mut().zip(&tasks) {
            match chunk.base_bf16() {
                Some(b) => count_bf16(chunk.bf16[i], b, &mut st.hist, &mut st.zeros),
                None => count_f32(
                    chunk.inputs[i],
                    chunk.base_tensor(),
                    &mut st.hist,
                    &mut st.zeros,
                ),
            }
        }
        Ok(())
    })?;
    for (st, &d) in state.iter_mut().zip(density) {
        let mut hist = vec![0u64; BINS];
        for part in st.hist.chunks_exact(BINS) {
            hist.iter_mut().zip(part).for_each(|(h, &c)| *h += c as u64);
        }
        st.hist = Vec::new();
        // The bins of |τ| for each sign (zeros are never kept: out of bin 0).
        let (mut pos, mut neg) = (hist[..HALF].to_vec(), hist[HALF..].to_vec());
        pos[0] -= st.zeros[0];
        neg[0] -= st.zeros[1];
        let round = |x: f64| x.round() as u64;
        st.rules = if joint {
            let both: Vec<u64> = pos.iter().zip(&neg).map(|(a, b)| a + b).collect();
            vec![Rule::top(&both, round(d * n as f64))]
        } else {
            let (p, q): (u64, u64) = (pos.iter().sum(), neg.iter().sum());
            vec![
                Rule::top(&pos, round(d * p as f64)),
                Rule::top(&neg, round(d * q as f64)),
            ]
        };
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
            let (bits, sums, cands) = ([&mut st.mask, &mut st.sign], &mut st.sums, &mut st.cands);
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
    for st in state {
        let mut mask = st.mask.into_bytes();
        // The quota of each side's candidates, largest key first, lower index among equals;
        // their sums in index order.
        let (mut kept2, mut kept_abs) = (0f64, 0f64);
        for (rule, mut cands) in st.rules.iter().zip(st.cands) {
            cands.sort_unstable();
            let mut chosen: Vec<u64> = cands[..rule.quota.min(cands.len())]
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
        let sign_bytes = st.sign.into_bytes();
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
    fn rules_split_the_count_at_the_right_bin() {
        // 5 keys in bin 3, 4 in bin 2, 2 in bin 0.
        let hist = [2u64, 0, 4, 5];
        let r = Rule::top(&hist, 7);
        assert_eq!((r.above, r.cand, r.quota), (2, 2, 2));
        let r = Rule::top(&hist, 5);
        assert_eq!((r.above, r.cand, r.quota), (2, -2, 0));
        let r = Rule::top(&hist, 11);
        assert_eq!((r.above, r.cand, r.quota), (-1, -2, 0));
        let r = Rule::top(&hist, 0);
        assert_eq!(r.above, i32::MAX);
        let r = Rule::top(&hist, 10);
        assert_eq!((r.above, r.cand, r.quota), (0, 0, 1));
    }
}
