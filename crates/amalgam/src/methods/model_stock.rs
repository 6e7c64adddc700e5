//! `model_stock`: interpolate between the base and the average of the fine-tunes with
//! `t = N·cos φ / (1 + (N−1)·cos φ)`, `cos φ` the mean pairwise cosine of the task vectors,
//! per tensor or per row (`filter_wise`).

use super::*;
use crate::config::Kind;

/// Model Stock.
pub struct ModelStock(MethodSpec);

impl Default for ModelStock {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        ModelStock(MethodSpec {
            name: "model_stock",
            pretty_name: "Model Stock",
            reference: "https://arxiv.org/abs/2403.19522",
            params: vec![ParamSpec::new(
                "filter_wise",
                Kind::Bool,
                Scope::Shared,
                Value::Bool(false),
            )],
            contract: Contract {
                min_inputs: 3,
                ..Contract::WITH_BASE
            },
            optional_policy: OptionalPolicy::BaseOrSkip,
        })
    }
}

/// The interpolation factor for one vector (whole tensor or one row).
fn factor(base: &[f32], models: &[&[f32]]) -> f64 {
    let offsets: Vec<Vec<f64>> = models
        .iter()
        .map(|m| {
            m.iter()
                .zip(base)
                .map(|(&x, &b)| x as f64 - b as f64)
                .collect()
        })
        .collect();
    let norms: Vec<f64> = offsets
        .iter()
        .map(|o| o.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mut cos = Vec::new();
    for i in 0..offsets.len() {
        for j in i + 1..offsets.len() {
            let d: f64 = offsets[i].iter().zip(&offsets[j]).map(|(a, b)| a * b).sum();
            cos.push((d / (norms[i] * norms[j]).max(1e-6)).clamp(-1.0, 1.0));
        }
    }
    let c = cos.iter().sum::<f64>() / cos.len() as f64;
    let n = models.len() as f64;
    let denom = 1.0 + (n - 1.0) * c;
    if denom.abs() < 1e-6 {
        0.0
    } else {
        n * c / denom
    }
}

impl Method for ModelStock {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let base = job.base_tensor();
        let models: Vec<&[f32]> = job.non_base().into_iter().map(|i| job.inputs[i]).collect();
        let row = if job.shared.b("filter_wise") && job.shape.len() >= 2 {
            *job.shape.last().expect("2-D")
        } else {
            base.len().max(1)
        };
        let n = models.len() as f32;
        for (start, o) in (0..base.len()).step_by(row).zip(out.chunks_mut(row)) {
            let end = start + o.len();
            let rows: Vec<&[f32]> = models.iter().map(|m| &m[start..end]).collect();
            let t = factor(&base[start..end], &rows) as f32;
            for (j, v) in o.iter_mut().enumerate() {
                let avg = rows.iter().map(|m| m[j]).sum::<f32>() / n;
                *v = t * avg + (1.0 - t) * base[start + j];
            }
        }
        Ok(())
    }
}
