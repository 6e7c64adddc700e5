//! `emr`: EMR-Merging's elect, mask, rescale (Huang et al. 2024; ALGORITHMS.md §4.2).
//!
//! Shared: the unified vector `τ_uni = γ ⊙ max_t |a_t ⊙ τ_t|`, `γ = +1` where `Σ_t τ_t > 0`
//! else `−1` (a zero sum elects `−1`, as the authors' code does), `a_t = [τ_t·γ > 0]`. Per task:
//! the mask `M_t = [τ_t ⊙ τ_uni > 0]` (1 bit per parameter, part `mask`) and one rescaler `λ_t`
//! over the whole model, in the manifest. Rebuild: `θ0 + λ_t · M_t ⊙ τ_uni`.
//!
//! `rescale: paper` (default): `λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|` over all parameters, the
//! least-squares rescaler of the paper's appendix. `rescale: code`: the authors' code (and
//! FusionBench's copy), the ratio of the sums over tensors of per-tensor means of the same
//! magnitudes. A task whose masks are all zero (it agrees with the elected sign nowhere) gets
//! `λ = 1`, where the code divides by zero. Every float tensor takes part, norms and biases too.

use super::bits::{self, BitWriter};
use super::scheme::{self, ChunkStats, Decoder, Encoded, Parts, Scheme, TaskStats, TensorInputs};
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec};

/// The EMR scheme.
pub struct Emr {
    spec: MethodSpec,
}

impl Default for Emr {
    fn default() -> Self {
        Emr {
            spec: scheme::spec(
                "emr",
                "EMR-Merging (elect, mask, rescale)",
                "https://arxiv.org/abs/2405.17461",
                vec![
                    scheme::choice("rescale", &["paper", "code"]),
                    scheme::shared_dtype_param(),
                ],
            ),
        }
    }
}

crate::simd::vectorized! {
    /// The unified vector of a chunk: the elected sign of `Σ τ_t` (a zero sum elects −1), times
    /// the largest magnitude among the tasks that agree with it. (`sign` is scratch.)
    fn elect(taus: &[Vec<f32>], sign: &mut Vec<f32>, uni: &mut Vec<f32>) {
        let len = taus.first().map_or(0, Vec::len);
        sign.clear();
        sign.resize(len, 0.0f32);
        for tau in taus {
            sign.iter_mut().zip(tau).for_each(|(s, &t)| *s += t);
        }
        sign.iter_mut().for_each(|s| *s = if *s > 0.0 { 1.0 } else { -1.0 });
        uni.clear();
        uni.resize(len, 0.0f32);
        for tau in taus {
            for ((u, &t), &g) in uni.iter_mut().zip(tau).zip(sign.iter()) {
                // A select, not `f32::max` (no NaN here; its NaN rule keeps the loop scalar).
                let agree = if t * g > 0.0 { t.abs() } else { 0.0 };
                *u = if agree > *u { agree } else { *u };
            }
        }
        uni.iter_mut().zip(sign.iter()).for_each(|(u, &g)| *u *= g);
    }
}

crate::simd::vectorized! {
    /// `M ⊙ τ_uni` of one task into `kept`, non-zero exactly where the mask is set
    /// (`τ·τ_uni > 0` needs `τ_uni ≠ 0`), and the mask bits to `mask`.
    fn keep_agreeing(tau: &[f32], uni: &[f32], kept: &mut Vec<f32>, mask: &mut BitWriter) {
        kept.clear();
        kept.extend(tau.iter().zip(uni).map(|(&t, &u)| if t * u > 0.0 { u } else { 0.0 }));
        mask.push_nonzero(kept);
    }
}

impl Method for Emr {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Emr {
    fn shared_parts(&self, job: &MergeJob, _out: DType) -> Vec<scheme::PartSpec> {
        scheme::shared_vector(job, "uni")
    }

    fn sums(&self) -> usize {
        4
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let tasks = job.non_base();
        let n = job.numel();
        let mut masks: Vec<BitWriter> = tasks.iter().map(|_| BitWriter::with_capacity(n)).collect();
        let mut stats: Vec<ChunkStats> = tasks.iter().map(|_| ChunkStats::new(2)).collect();
        let (mut uni, mut sign, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        let mut taus: Vec<Vec<f32>> = vec![Vec::new(); tasks.len()];
        inputs.plan_passes(1);
        inputs.pass(1, &mut |chunk, offset| {
            let base = chunk.base_tensor();
            for (tau, &i) in taus.iter_mut().zip(&tasks) {
                scheme::delta_into(chunk.inputs[i], base, tau);
            }
            elect(&taus, &mut sign, &mut uni);
            for ((tau, mask), s) in taus.iter().zip(&mut masks).zip(&mut stats) {
                keep_agreeing(tau, &uni, &mut kept, mask);
                s.observe(offset, &kept, tau);
                s.extra(0, offset, tau.iter().map(|t| t.abs()));
                s.extra(1, offset, kept.iter().map(|r| r.abs()));
            }
            out.shared(0, offset, &uni)
        })?;
        for (t, (mask, s)) in masks.into_iter().zip(stats).enumerate() {
            let mut totals = s.totals();
            let n = n.max(1) as f64;
            totals.sums.push(totals.sums[0] / n);
            totals.sums.push(totals.sums[1] / n);
            *out.stats(t) = totals;
            debug_assert_eq!(mask.len(), job.numel());
            scheme::put_bits(out, t, "mask", mask)?;
        }
        Ok(())
    }

    fn scale(&self, stats: &TaskStats, params: &serde_json::Value) -> Result<f64> {
        let code = params.get("rescale").and_then(|v| v.as_str()) == Some("code");
        let (num, den) = if code {
            (stats.sums[2], stats.sums[3])
        } else {
            (stats.sums[0], stats.sums[1])
        };
        Ok(if den > 0.0 { num / den } else { 1.0 })
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        let Some(mask) = parts.task("mask")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        scheme::check_len(
            parts,
            "mask",
            mask,
            bits::packed_len(shape.iter().product(), 1),
        )?;
        Ok(Box::new(MaskDecoder {
            mask,
            parts,
            shared: "uni",
            scale: parts.scale(),
            buf: Vec::new(),
        }))
    }
}

/// `θ0 + s · m ⊙ v` for a packed mask `m` and a shared vector `v` (EMR, TALL).
pub(crate) struct MaskDecoder<'a> {
    /// The packed mask.
    pub(crate) mask: &'a [u8],
    /// Where the shared vector is read from.
    pub(crate) parts: &'a dyn Parts,
    /// The shared part's suffix.
    pub(crate) shared: &'static str,
    /// The task's scale.
    pub(crate) scale: f32,
    /// Scratch for the shared chunk.
    pub(crate) buf: Vec<f32>,
}

impl Decoder for MaskDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        self.parts
            .shared(self.shared, range.clone(), &mut self.buf)?;
        bits::masked_add(self.mask, range.start, base, &self.buf, self.scale, out);
        Ok(())
    }
}
