//! `tall`: TALL masks (Wang et al. 2024, "Localizing Task Information"; ALGORITHMS.md §4.1).
//!
//! Shared: a multi-task vector `τ_MTL`, the plain sum `Σ_t τ_t` (`merged: task_arithmetic`, the
//! default) or TIES with `density` and the disjoint sum (`merged: ties`: mergekit's `ties` with
//! `normalize: false`, weights 1, `λ = 1`). Per task: the mask
//! `m_t = [ |τ_t| > λ_t · |τ_MTL − τ_t| ]` (strict, 1 bit per parameter, part `mask`), `λ_t` per
//! task (`lambda` under the task's `parameters:`) or one for all (default 0.4). Rebuild:
//! `θ0 + m_t ⊙ τ_MTL`, coefficient 1 as in the authors' code.
//!
//! With `merged: ties` the merged vector needs each tensor's inputs whole (TIES' per-tensor
//! threshold), so a worker holds them; the sum streams.

use super::bits::BitWriter;
use super::emr::MaskDecoder;
use super::scheme::{self, ChunkStats, Decoder, Encoded, Parts, Scheme, TensorInputs};
use crate::config::{Kind, Value};
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};

/// The TALL-mask scheme.
pub struct Tall {
    spec: MethodSpec,
}

impl Default for Tall {
    fn default() -> Self {
        Tall {
            spec: scheme::spec(
                "tall",
                "TALL masks over a multi-task vector",
                "https://arxiv.org/abs/2405.07813",
                vec![
                    ParamSpec::new("lambda", Kind::Float, Scope::NonBase, Value::Float(0.4)),
                    scheme::choice("merged", &["task_arithmetic", "ties"]),
                    ParamSpec::new("density", Kind::Float, Scope::Shared, Value::Float(0.2)),
                    scheme::shared_dtype_param(),
                ],
            ),
        }
    }
}

/// Masks of the chunk at `offset`: for each task, `|τ_t| > λ_t |v − τ_t|`, with the
/// statistics of `τ̂ = m ⊙ v` against `τ_t`.
fn masks(
    offset: usize,
    taus: &[&[f32]],
    lambdas: &[f32],
    v: &[f32],
    masks: &mut [BitWriter],
    stats: &mut [ChunkStats],
    kept: &mut Vec<f32>,
) {
    for (t, tau) in taus.iter().enumerate() {
        let lambda = lambdas[t];
        // Where v is 0 a set bit would rebuild the same value as a clear one: clear.
        kept.clear();
        kept.extend(tau.iter().zip(v).map(|(&x, &m)| {
            if x.abs() > lambda * (m - x).abs() {
                m
            } else {
                0.0
            }
        }));
        masks[t].push_nonzero(kept);
        stats[t].observe(offset, kept, tau);
    }
}

impl Method for Tall {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Tall {
    fn merge_block(&self) -> scheme::MergeBlock {
        scheme::MergeBlock::Optional
    }

    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        for &i in &job.non_base() {
            scheme::in_range(job, &job.per_input[i], "lambda", 0.0, f64::MAX)?;
        }
        scheme::in_range(job, job.shared, "density", 0.0, 1.0).map(|_| ())
    }

    fn shared_parts(&self, job: &MergeJob, _out: DType) -> Vec<scheme::PartSpec> {
        scheme::shared_vector(job, "mtl")
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let tasks = job.non_base();
        let n = job.numel();
        let lambdas: Vec<f32> = tasks
            .iter()
            .map(|&i| job.per_input[i].f("lambda") as f32)
            .collect();
        let mut bits: Vec<BitWriter> = tasks.iter().map(|_| BitWriter::with_capacity(n)).collect();
        let mut stats: Vec<ChunkStats> = vec![ChunkStats::new(0); tasks.len()];
        let mut kept = Vec::new();
        if job.shared.choice("merged") == "ties" {
            let base_index = job.base.expect("contract: a base");
            let (mut base, mut mtl) = (Vec::new(), Vec::new());
            inputs.whole(base_index, &mut base)?;
            inputs.merged(&mut mtl)?;
            for (m, b) in mtl.iter_mut().zip(&base) {
                *m -= b;
            }
            let mut taus: Vec<Vec<f32>> = Vec::with_capacity(tasks.len());
            for &i in &tasks {
                let mut x = Vec::new();
                inputs.whole(i, &mut x)?;
                x.iter_mut().zip(&base).for_each(|(x, b)| *x -= b);
                taus.push(x);
            }
            let views: Vec<&[f32]> = taus.iter().map(|v| v.as_slice()).collect();
            masks(0, &views, &lambdas, &mtl, &mut bits, &mut stats, &mut kept);
            out.shared(0, 0, &mtl)?;
        } else {
            let mut mtl: Vec<f32> = Vec::new();
            let mut taus: Vec<Vec<f32>> = vec![Vec::new(); tasks.len()];
            inputs.plan_passes(1);
            inputs.pass(1, &mut |chunk, offset| {
                let base = chunk.base_tensor();
                for (tau, &i) in taus.iter_mut().zip(&tasks) {
                    scheme::delta_into(chunk.inputs[i], base, tau);
                }
                mtl.clear();
                mtl.resize(base.len(), 0.0);
                for tau in &taus {
                    mtl.iter_mut().zip(tau).for_each(|(m, &t)| *m += t);
                }
                let views: Vec<&[f32]> = taus.iter().map(|v| v.as_slice()).collect();
                masks(
                    offset, &views, &lambdas, &mtl, &mut bits, &mut stats, &mut kept,
                );
                out.shared(0, offset, &mtl)
            })?;
        }
        for (t, (mask, s)) in bits.into_iter().zip(stats).enumerate() {
            *out.stats(t) = s.totals();
            debug_assert_eq!(mask.len(), job.numel());
            scheme::put_bits(out, t, "mask", mask)?;
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        let Some(mask) = parts.task("mask")? else {
            return Ok(Box::new(scheme::Unchanged));
        };
        let n: usize = shape.iter().product();
        scheme::check_len(parts, "mask", mask, n.div_ceil(8))?;
        Ok(Box::new(MaskDecoder {
            mask,
            parts,
            shared: "mtl",
            scale: 1.0,
            buf: Vec::new(),
        }))
    }
}
