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
        let (mut tau, mut tmp) = (Vec::new(), Vec::new());
        inputs.plan_passes(1);
        inputs.pass(1, &mut |chunk, offset| {
            let base = chunk.base_tensor();
            for (acc, &i) in accs.iter_mut().zip(&tasks) {
                scheme::delta_into(chunk.inputs[i], base, &mut tau);
                acc.bits.push_bits(&tau, |t| t >= 0.0);
                // Each scale group's part of the chunk (rows when per row).
                let mut e = offset;
                while e < offset + tau.len() {
                    let (g, end) = if per_row {
                        (e / cols, ((e / cols + 1) * cols).min(offset + tau.len()))
                    } else {
                        (0, offset + tau.len())
                    };
                    let part = &tau[e - offset..end - offset];
                    tmp.clear();
                    tmp.extend(part.iter().map(|t| t.abs()));
                    acc.abs[g].add(e, &tmp);
                    tmp.clear();
                    tmp.extend(part.iter().map(|t| t * t));
                    acc.sq[g].add(e, &tmp);
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
