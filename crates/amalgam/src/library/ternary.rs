//! `ternary`: sparse ternary task vectors (T-Switch, Qi et al. 2025; ComPEFT's ternary form).
//!
//! For each matrix (2-D tensor) and task: keep the `density` largest entries of `τ` by
//! magnitude, per sign (`select: sign`, the default, as T-Switch: the top `density` of the
//! positive entries and, separately, of the negative ones) or over all entries
//! (`select: joint`); exactly that many, ties by lower index. Stored: the mask of kept entries
//! (part `mask`, 1 bit per element), the signs of the kept entries in index order (part
//! `sign`, 1 bit per kept entry, `1` = positive) and one norm-preserving scale
//! `α = ‖τ_kept‖₂ / √count` (part `scale`). Other tensors are stored as they are (`raw`).
//! Rebuild: `θ0 + α · mask ⊙ sign`.

use super::bits::{self, BitWriter};
use super::scheme::{self, Decoder, Encoded, Parts, Scheme, TaskStats, TensorInputs};
use crate::config::{Kind, Value};
use crate::error::Result;
use crate::methods::select::{self, Selection, Selector, Want, Window};
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};
use crate::simd::{Bf16, Elems, keep_if};
use crate::sums::LaneSum;

/// The ternary scheme.
pub struct Ternary {
    spec: MethodSpec,
}

impl Default for Ternary {
    fn default() -> Self {
        Ternary {
            spec: scheme::spec(
                "ternary",
                "sparse ternary task vectors (T-Switch)",
                "https://arxiv.org/abs/2412.00054",
                vec![
                    ParamSpec::new("density", Kind::Float, Scope::NonBase, Value::Float(0.1)),
                    scheme::choice("select", &["sign", "joint"]),
                ],
            ),
        }
    }
}

/// One selection in the making: its selector until both histogram passes are done.
enum Pick {
    Counting(Box<Selector>),
    Done(Selection),
}

impl Pick {
    fn new(n: usize, want: Want) -> Pick {
        match Selector::new(n, want) {
            Ok(s) => Pick::Counting(Box::new(s)),
            Err(done) => Pick::Done(done),
        }
    }
}

/// Which entries a selection ranks: all (`ALL`), or those of one sign; the others get key 0 and
/// are never among the top `density` of their own sign's count.
const ALL: u8 = 0;
const POSITIVE: u8 = 1;
const NEGATIVE: u8 = 2;

/// The sort key of `τ` for a selection over a side, given as `(flip, on)` ([`side_bits`]):
/// `|τ|` as bits when the sign bit of `τ` xor `flip` is 0 or `on` is 0, else 0 (branch-free).
#[inline(always)]
fn key(tau: f32, (flip, on): (u32, u32)) -> u32 {
    let negative = tau.to_bits() >> 31;
    select::key(tau) & ((negative ^ flip) & on).wrapping_sub(1)
}

/// `(flip, on)` of a side for [`key`]. (A zero `τ` has key 0 whatever its sign bit.)
fn side_bits(side: u8) -> (u32, u32) {
    match side {
        POSITIVE => (0, 1),
        NEGATIVE => (1, 1),
        _ => (0, 0),
    }
}

/// The keys of `τ = x − b` for `side` into `keys`; how many are not 0.
#[inline(always)]
fn keys_of<E: Elems>(x: E, b: E, side: u8, keys: &mut Vec<u32>) -> usize {
    let n = x.len().min(b.len());
    let side = side_bits(side);
    keys.clear();
    keys.resize(n, 0);
    let mut counts = [0u32; 8];
    let mut nonzero = 0usize;
    for (k, out) in keys.chunks_exact_mut(8).enumerate() {
        let (xb, bb) = (x.eight(8 * k), b.eight(8 * k));
        for l in 0..8 {
            out[l] = key(xb[l] - bb[l], side);
            counts[l] += (out[l] != 0) as u32;
        }
        // Lane counts stay far below overflow between flushes.
        if k % 65536 == 65535 {
            nonzero += counts.iter().map(|&c| c as usize).sum::<usize>();
            counts = [0; 8];
        }
    }
    nonzero += counts.iter().map(|&c| c as usize).sum::<usize>();
    for (j, k) in keys.iter_mut().enumerate().skip(n / 8 * 8) {
        *k = key(x.at(j) - b.at(j), side);
        nonzero += (*k != 0) as usize;
    }
    nonzero
}

crate::simd::vectorized! {
    /// [`keys_of`] of f32 inputs.
    fn keys_f32(x: &[f32], b: &[f32], side: u8, keys: &mut Vec<u32>) -> usize {
        keys_of(x, b, side, keys)
    }
}

crate::simd::vectorized! {
    /// [`keys_of`] of bf16 inputs.
    fn keys_bf16(x: &[u16], b: &[u16], side: u8, keys: &mut Vec<u32>) -> usize {
        keys_of(Bf16(x), Bf16(b), side, keys)
    }
}

/// The keys of task input `i` of a chunk for `side`; how many are not 0.
fn chunk_keys(chunk: &MergeJob, i: usize, side: u8, keys: &mut Vec<u32>) -> usize {
    match chunk.base_bf16() {
        Some(b) => keys_bf16(chunk.bf16[i], b, side, keys),
        None => keys_f32(chunk.inputs[i], chunk.base_tensor(), side, keys),
    }
}

crate::simd::vectorized! {
    /// How many keys equal `a`, and how many equal `b`.
    fn count_equal(keys: &[u32], a: u32, b: u32) -> (u64, u64) {
        keys.chunks(1 << 20).fold((0, 0), |(na, nb), c| {
            let (ca, cb) = c.iter().fold((0u32, 0u32), |(ca, cb), &k| {
                (ca + (k == a) as u32, cb + (k == b) as u32)
            });
            (na + ca as u64, nb + cb as u64)
        })
    }
}

crate::simd::vectorized! {
    /// Set `kept[j]` where `window` keeps non-zero key `keys[j]`.
    fn window_keeps(keys: &[u32], window: Window, kept: &mut [u8]) {
        for (f, &k) in kept.iter_mut().zip(keys) {
            *f |= (window.keeps(k) & (k != 0)) as u8;
        }
    }
}

/// Set `kept[j]` where `selection` keeps the next element, of key `keys[j]` (not 0): the
/// branch-free rule when the chunk's ties at the edges are all kept or all dropped, else element
/// by element (the chunk where an edge's quota runs out).
fn mark_kept(selection: &mut Selection, keys: &[u32], kept: &mut [u8]) {
    let (lo, hi) = selection.edges();
    let (n_lo, n_hi) = count_equal(keys, lo, hi);
    match selection.window(n_lo, n_hi) {
        Some(w) => {
            selection.advance(n_lo, n_hi);
            window_keeps(keys, w, kept);
        }
        None => {
            for (f, &k) in kept.iter_mut().zip(keys) {
                *f |= (selection.keep(k) && k != 0) as u8;
            }
        }
    }
}

/// Per task: the mask and sign streams and the sums `Σ τ_kept²`, `Σ |τ_kept|`, `Σ τ²`.
struct Acc {
    mask: BitWriter,
    sign: BitWriter,
    sums: [LaneSum; 3],
}

/// Elements `offset..` of one task: the bit of `kept` to `mask`, the sign bit (`τ > 0`) of every
/// element to `sign` (the caller keeps those of the kept ones), and the sums.
#[inline(always)]
fn encode_span<E: Elems>(
    offset: usize,
    x: E,
    b: E,
    kept: &[u8],
    mask: &mut BitWriter,
    sign: &mut BitWriter,
    sums: &mut [LaneSum; 3],
) {
    #[inline(always)]
    fn one(
        e: usize,
        t: f32,
        k: bool,
        mask: &mut BitWriter,
        sign: &mut BitWriter,
        sums: &mut [LaneSum; 3],
    ) {
        mask.push(k);
        sign.push(t > 0.0);
        let v = keep_if(t, k);
        let [a, b, c] = sums;
        a.one(e, v * v);
        b.one(e, v.abs());
        c.one(e, t * t);
    }
    let n = x.len().min(b.len()).min(kept.len());
    let (head, blocks) = crate::sums::spans(offset, n);
    for (j, &f) in kept.iter().enumerate().take(head) {
        one(offset + j, x.at(j) - b.at(j), f != 0, mask, sign, sums);
    }
    {
        let [s0, s1, s2] = sums;
        let mut acc = crate::sums::Blocks::new([s0, s1, s2], offset + head + 8);
        for k in 0..blocks {
            let j = head + 8 * k;
            let (xb, bb) = (x.eight(j), b.eight(j));
            let f: &[u8; 8] = kept[j..j + 8].try_into().expect("8");
            let (mut sq, mut ab, mut all, mut m, mut s) =
                ([0f32; 8], [0f32; 8], [0f32; 8], 0u8, 0u8);
            for l in 0..8 {
                let t = xb[l] - bb[l];
                let v = keep_if(t, f[l] != 0);
                m |= (f[l] != 0) as u8 * (1 << l);
                s |= ((t > 0.0) as u8) << l;
                sq[l] = v * v;
                ab[l] = v.abs();
                all[l] = t * t;
            }
            mask.push_byte(m);
            sign.push_byte(s);
            acc.add([sq, ab, all]);
        }
        acc.finish();
    }
    for (j, &f) in kept.iter().enumerate().take(n).skip(head + 8 * blocks) {
        one(offset + j, x.at(j) - b.at(j), f != 0, mask, sign, sums);
    }
}

crate::simd::vectorized! {
    /// [`encode_span`] of f32 inputs.
    fn encode_f32(offset: usize, x: &[f32], b: &[f32], kept: &[u8], mask: &mut BitWriter, sign: &mut BitWriter, sums: &mut [LaneSum; 3]) {
        encode_span(offset, x, b, kept, mask, sign, sums)
    }
}

crate::simd::vectorized! {
    /// [`encode_span`] of bf16 inputs.
    fn encode_bf16(offset: usize, x: &[u16], b: &[u16], kept: &[u8], mask: &mut BitWriter, sign: &mut BitWriter, sums: &mut [LaneSum; 3]) {
        encode_span(offset, Bf16(x), Bf16(b), kept, mask, sign, sums)
    }
}

/// Store task `t`'s mask, the signs of its kept entries and its norm-preserving scale, from
/// `[Σ τ_kept², Σ |τ_kept|, Σ τ²]`.
fn store(
    out: &mut dyn Encoded,
    t: usize,
    mask: BitWriter,
    sign: BitWriter,
    [kept2, kept_abs, all2]: [f64; 3],
) -> Result<()> {
    let count = sign.len() as f64;
    let alpha = if count > 0.0 {
        (kept2.sqrt() / count.sqrt()) as f32
    } else {
        0.0
    };
    let a = alpha as f64;
    *out.stats(t) = TaskStats {
        a: a * a * count,
        b: a * kept_abs,
        c: all2,
        sums: Vec::new(),
    };
    scheme::put_bits(out, t, "mask", mask)?;
    scheme::put_bits(out, t, "sign", sign)?;
    scheme::put_f32(out, t, "scale", &[alpha])
}

impl Method for Ternary {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Ternary {
    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        for &i in &job.non_base() {
            scheme::in_range(job, &job.per_input[i], "density", 0.0, 1.0)?;
        }
        Ok(())
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let tasks = job.non_base();
        if scheme::raw_unless_matrix(job, inputs, out)? {
            return Ok(());
        }
        let n = job.numel();
        let sides: &[u8] = if job.shared.choice("select") == "joint" {
            &[ALL]
        } else {
            &[POSITIVE, NEGATIVE]
        };
        let density: Vec<f64> = tasks
            .iter()
            .map(|&i| job.per_input[i].f("density"))
            .collect();
        // Joint selections know their count now; per-sign ones after the first pass counts the
        // entries of each sign (retargeted then).
        let mut picks: Vec<Vec<Pick>> = density
            .iter()
            .map(|&d| {
                sides
                    .iter()
                    .map(|&side| match side {
                        ALL => Pick::new(n, Want::TopK((d * n as f64).round() as usize)),
                        _ => Pick::new(n, Want::TopK(n.max(1) - 1)),
                    })
                    .collect()
            })
            .collect();
        inputs.plan_passes(3);
        if let Some(selected) =
            super::ternary_binned::select(job, inputs, sides.len() == 1, &density)?
        {
            for (t, (mask, sign, sums)) in selected.into_iter().enumerate() {
                store(out, t, mask, sign, sums)?;
            }
            return Ok(());
        }
        // The general selection (three passes), for tensors whose values crowd one bin.
        let mut counts = vec![vec![0usize; sides.len()]; tasks.len()];
        let mut keys: Vec<u32> = Vec::new();
        for pass in 0..2 {
            inputs.pass_bf16(1, &mut |chunk, _| {
                for (t, &i) in tasks.iter().enumerate() {
                    for (s, &side) in sides.iter().enumerate() {
                        let Pick::Counting(sel) = &mut picks[t][s] else {
                            continue;
                        };
                        let nonzero = chunk_keys(chunk, i, side, &mut keys);
                        if pass == 0 {
                            counts[t][s] += nonzero;
                            sel.count_high(&keys);
                        } else {
                            sel.count_low(&keys);
                        }
                    }
                }
                Ok(())
            })?;
            for (t, row) in picks.iter_mut().enumerate() {
                for (s, pick) in row.iter_mut().enumerate() {
                    let Pick::Counting(sel) = pick else { continue };
                    if pass == 0 {
                        if sides[s] != ALL {
                            let k = (density[t] * counts[t][s] as f64).round() as usize;
                            if let Some(done) = sel.retarget(Want::TopK(k)) {
                                *pick = Pick::Done(done);
                                continue;
                            }
                        }
                        sel.end_high();
                    } else {
                        let Pick::Counting(sel) =
                            std::mem::replace(pick, Pick::Done(Selection::nothing()))
                        else {
                            unreachable!("counting")
                        };
                        *pick = Pick::Done(sel.finish());
                    }
                }
            }
        }
        let mut selections: Vec<Vec<Selection>> = picks
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|p| match p {
                        Pick::Done(s) => s,
                        Pick::Counting(_) => unreachable!("both passes ran"),
                    })
                    .collect()
            })
            .collect();
        let mut accs: Vec<Acc> = tasks
            .iter()
            .map(|_| Acc {
                mask: BitWriter::with_capacity(n),
                sign: BitWriter::default(),
                sums: [LaneSum::default(); 3],
            })
            .collect();
        let mut kept: Vec<u8> = Vec::new();
        inputs.pass_bf16(1, &mut |chunk, offset| {
            for (t, &i) in tasks.iter().enumerate() {
                let len = chunk.chunk_len();
                kept.clear();
                kept.resize(len, 0);
                for (s, &side) in sides.iter().enumerate() {
                    // Every selection sees every element, in order (its tie count).
                    chunk_keys(chunk, i, side, &mut keys);
                    mark_kept(&mut selections[t][s], &keys, &mut kept);
                }
                // This chunk's mask and signs, then the signs of its kept entries.
                let (mut mask, mut sign) =
                    (BitWriter::with_capacity(len), BitWriter::with_capacity(len));
                let acc = &mut accs[t];
                match chunk.base_bf16() {
                    Some(b) => encode_bf16(
                        offset,
                        chunk.bf16[i],
                        b,
                        &kept,
                        &mut mask,
                        &mut sign,
                        &mut acc.sums,
                    ),
                    None => {
                        let (x, b) = (chunk.inputs[i], chunk.base_tensor());
                        encode_f32(offset, x, b, &kept, &mut mask, &mut sign, &mut acc.sums)
                    }
                }
                let (mask, sign) = (mask.into_bytes(), sign.into_bytes());
                acc.mask.push_stream(&mask, len);
                acc.sign.push_selected(&sign, &mask, len);
            }
            Ok(())
        })?;
        for (t, acc) in accs.into_iter().enumerate() {
            store(out, t, acc.mask, acc.sign, acc.sums.map(|s| s.total()))?;
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        let Some(mask) = parts.task("mask")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        let n: usize = shape.iter().product();
        scheme::check_len(parts, "mask", mask, n.div_ceil(8))?;
        let kept = bits::count_ones(mask, n);
        let sign = parts
            .task("sign")?
            .ok_or_else(|| parts.corrupt("its part 'sign' is missing".into()))?;
        scheme::check_len(parts, "sign", sign, kept.div_ceil(8))?;
        let scale = scheme::task_f32s(parts, "scale")?;
        let &[alpha] = scale.as_slice() else {
            return Err(parts.corrupt(format!("{} scales; expected 1", scale.len())));
        };
        Ok(Box::new(TernaryDecoder {
            mask,
            sign,
            alpha,
            at: 0,
            kept_before: 0,
        }))
    }
}

struct TernaryDecoder<'a> {
    mask: &'a [u8],
    sign: &'a [u8],
    alpha: f32,
    /// Where the last chunk ended, and how many kept entries precede it (chunks usually come in
    /// order, so the sign index carries on without recounting the mask).
    at: usize,
    kept_before: usize,
}

impl Decoder for TernaryDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        if range.start != self.at {
            self.kept_before = bits::count_ones(self.mask, range.start);
        }
        let mut s = self.kept_before;
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            *o = if bits::bit(self.mask, range.start + j) {
                let v = if bits::bit(self.sign, s) {
                    self.alpha
                } else {
                    -self.alpha
                };
                s += 1;
                b + v
            } else {
                b
            };
        }
        self.at = range.end;
        self.kept_before = s;
        Ok(())
    }
}
