//! `arcee_fusion`: take the fine-tune's change only where its importance (|Δ| times the KL
//! divergence between the row softmaxes of the two models) reaches `median + 1.5·IQR`.
//!
//! mergekit estimates the quantiles from a random sample of 1M entries on larger tensors;
//! amalgam computes them exactly, so large tensors can differ from mergekit's (randomised)
//! threshold slightly. Tensors of up to 1M entries match exactly.

use super::*;

/// Arcee Fusion.
pub struct ArceeFusion(MethodSpec);

impl Default for ArceeFusion {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        ArceeFusion(MethodSpec {
            name: "arcee_fusion",
            pretty_name: "Arcee Fusion",
            reference: "https://arcee.ai",
            params: vec![],
            contract: Contract {
                min_inputs: 2,
                max_inputs: Some(2),
                ..Contract::WITH_BASE
            },
        })
    }
}

fn softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

impl Method for ArceeFusion {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let base = job.base_tensor();
        let tuned = job.inputs[job.non_base()[0]];
        let row = job.shape.last().copied().unwrap_or(1).max(1);
        let mut importance = vec![0f32; base.len()];
        for ((imp, p), q) in importance
            .chunks_mut(row)
            .zip(tuned.chunks(row))
            .zip(base.chunks(row))
        {
            let (sp, sq) = (softmax(p), softmax(q));
            let kl: f64 = sp
                .iter()
                .zip(&sq)
                .map(|(&a, &b)| {
                    let (a, b) = (a + 1e-8, b + 1e-8);
                    a * (a / b).ln()
                })
                .sum();
            for ((i, &x), &y) in imp.iter_mut().zip(p).zip(q) {
                *i = ((x - y).abs() as f64 * kl) as f32;
            }
        }
        let mut sorted = importance.clone();
        sorted.sort_by(f32::total_cmp);
        let at = |q: f64| sorted[(q * (sorted.len() - 1) as f64) as usize];
        let threshold = at(0.5) + 1.5 * (at(0.75) - at(0.25));
        for (((o, &b), &t), &i) in out.iter_mut().zip(base).zip(tuned).zip(&importance) {
            *o = if i >= threshold { b + (t - b) } else { b };
        }
        Ok(())
    }
}
