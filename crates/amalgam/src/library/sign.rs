//! `sign`: 1-bit task vectors with a scale, BitDelta's data-free form (Liu et al. 2024;
//! ALGORITHMS.md §6.1).
//!
//! For each matrix (2-D tensor): the sign of `τ` (part `sign`, 1 bit per element; `τ ≥ 0` is
//! `+1`, as BitDelta's code maps a zero difference) and its scale `α = mean|τ|`, the L2-optimal
//! value for a fixed sign pattern, over the whole matrix (`scale: matrix`, the default) or per
//! row (`scale: row`), part `scale` (f32). Other tensors (norms, biases) are stored as they are
//! (`raw`). Rebuild: `θ0 + α ⊙ sign(τ)`.

use super::bits::{self, BitWriter};
use super::scheme::{self, Decoder, Encoded, Parts, Scheme, TaskStats, TensorInputs};
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec};
use crate::simd::{Bf16, Elems};
use crate::sums::LaneSum;

/// The sign scheme.
pub struct Sign {
    spec: MethodSpec,
}

impl Default for Sign {
    fn default() -> Self {
        Sign {
            spec: scheme::spec(
                "sign",
                "1-bit sign and scale (BitDelta, data-free)",
                "https://arxiv.org/abs/2402.10193",
                vec![scheme::choice("scale", &["matrix", "row"])],
            ),
        }
    }
}

/// Per task: the sign bits, and per scale group `Σ|τ|` and `Στ²` in lanes.
struct Acc {
    bits: BitWriter,
    abs: Vec<LaneSum>,
    sq: Vec<LaneSum>,
}

impl Method for Sign {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Sign {
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
        let (rows, cols) = scheme::matrix(job.shape).expect("a matrix");
        let per_row = job.shared.choice("scale") == "row";
        let groups = if per_row { rows } else { 1 };
        let mut accs: Vec<Acc> = tasks
            .iter()
            .map(|_| Acc {
                bits: BitWriter::with_capacity(rows * cols),
                abs: vec![LaneSum::default(); groups],
                sq: vec![LaneSum::default(); groups],
            })
            .collect();
        inputs.plan_passes(1);
        inputs.pass_bf16(1, &mut |chunk, offset| {
            let len = chunk.chunk_len();
            for (acc, &i) in accs.iter_mut().zip(&tasks) {
                // Each scale group's part of the chunk (rows when per row).
                let mut e = offset;
                while e < offset + len {
                    let (g, end) = if per_row {
                        (e / cols, ((e / cols + 1) * cols).min(offset + len))
                    } else {
                        (0, offset + len)
                    };
                    let at = e - offset..end - offset;
                    let (bits, abs, sq) = (&mut acc.bits, &mut acc.abs[g], &mut acc.sq[g]);
                    match chunk.base_bf16() {
                        Some(b) => {
                            encode_bf16(e, &chunk.bf16[i][at.clone()], &b[at], bits, abs, sq)
                        }
                        None => {
                            let (x, b) = (chunk.inputs[i], chunk.base_tensor());
                            encode_f32(e, &x[at.clone()], &b[at], bits, abs, sq)
                        }
                    }
                    e = end;
                }
            }
            Ok(())
        })?;
        let count = if per_row { cols } else { rows * cols } as f64;
        for (t, acc) in accs.into_iter().enumerate() {
            let abs: Vec<f64> = acc.abs.iter().map(LaneSum::total).collect();
            let scales: Vec<f32> = abs
                .iter()
                .map(|&s| if count > 0.0 { (s / count) as f32 } else { 0.0 })
                .collect();
            let mut s = TaskStats::default();
            for ((&alpha, &abs), sq) in scales.iter().zip(&abs).zip(&acc.sq) {
                let (alpha, sq) = (alpha as f64, sq.total());
                s.a += alpha * alpha * count;
                // sign(τ)·τ = |τ| (a zero τ counts +1 and adds 0).
                s.b += alpha * abs;
                s.c += sq;
            }
            *out.stats(t) = s;
            scheme::put_bits(out, t, "sign", acc.bits)?;
            scheme::put_f32(out, t, "scale", &scales)?;
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        let Some(sign) = parts.task("sign")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        let (rows, cols) = scheme::matrix(shape)
            .ok_or_else(|| parts.corrupt("a sign part on a tensor that is not 2-D".into()))?;
        scheme::check_len(parts, "sign", sign, (rows * cols).div_ceil(8))?;
        let scales = scheme::task_f32s(parts, "scale")?;
        if scales.len() != 1 && scales.len() != rows {
            return Err(parts.corrupt(format!(
                "{} scales for {rows} rows; expected 1 or {rows}",
                scales.len()
            )));
        }
        Ok(Box::new(SignDecoder { sign, scales, cols }))
    }
}

/// Elements `offset..` of one scale group: the sign bits of `τ = x − b` (`τ ≥ 0` is 1) to
/// `bits`, `|τ|` to `abs` and `τ²` to `sq`, in one loop.
#[inline(always)]
fn encode_span<E: Elems>(
    offset: usize,
    x: E,
    b: E,
    bits: &mut BitWriter,
    abs: &mut LaneSum,
    sq: &mut LaneSum,
) {
    #[inline(always)]
    fn one(e: usize, t: f32, bits: &mut BitWriter, abs: &mut LaneSum, sq: &mut LaneSum) {
        bits.push(t >= 0.0);
        abs.one(e, t.abs());
        sq.one(e, t * t);
    }
    let n = x.len().min(b.len());
    let (head, blocks) = crate::sums::spans(offset, n);
    for j in 0..head {
        one(offset + j, x.at(j) - b.at(j), bits, abs, sq);
    }
    if blocks > 0 {
        let bytes = bits.extend_bytes(blocks);
        let mut sums = crate::sums::Blocks::new([&mut *abs, &mut *sq], offset + head + 8);
        for (k, byte) in bytes.iter_mut().enumerate() {
            let (xb, bb) = (x.eight(head + 8 * k), b.eight(head + 8 * k));
            let (mut a, mut q, mut signs) = ([0f32; 8], [0f32; 8], 0u8);
            for l in 0..8 {
                let t = xb[l] - bb[l];
                signs |= ((t >= 0.0) as u8) << l;
                a[l] = t.abs();
                q[l] = t * t;
            }
            *byte = signs;
            sums.add([a, q]);
        }
        sums.finish();
    }
    for j in head + 8 * blocks..n {
        one(offset + j, x.at(j) - b.at(j), bits, abs, sq);
    }
}

crate::simd::vectorized! {
    /// [`encode_span`] of f32 inputs.
    fn encode_f32(offset: usize, x: &[f32], b: &[f32], bits: &mut BitWriter, abs: &mut LaneSum, sq: &mut LaneSum) {
        encode_span(offset, x, b, bits, abs, sq)
    }
}

crate::simd::vectorized! {
    /// [`encode_span`] of bf16 inputs, widened in registers.
    fn encode_bf16(offset: usize, x: &[u16], b: &[u16], bits: &mut BitWriter, abs: &mut LaneSum, sq: &mut LaneSum) {
        encode_span(offset, Bf16(x), Bf16(b), bits, abs, sq)
    }
}

struct SignDecoder<'a> {
    sign: &'a [u8],
    scales: Vec<f32>,
    cols: usize,
}

impl Decoder for SignDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        if self.scales.len() == 1 {
            bits::signed_add(self.sign, range.start, base, self.scales[0], out);
            return Ok(());
        }
        // Row by row: one scale each.
        let mut e = range.start;
        while e < range.end {
            let row = e / self.cols;
            let end = ((row + 1) * self.cols).min(range.end);
            let at = e - range.start..end - range.start;
            bits::signed_add(
                self.sign,
                e,
                &base[at.clone()],
                self.scales[row],
                &mut out[at],
            );
            e = end;
        }
        Ok(())
    }
}
