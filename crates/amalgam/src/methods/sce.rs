//! `sce` (Select, Calculate, Erase): keep the elements where the fine-tunes vary most
//! (`select_topk` of the per-element variance), weight each task vector by its mean square,
//! erase elements disagreeing with the elected sign, and average what remains.

use super::*;
use crate::config::Kind;
use crate::methods::gta::elect_sign_sum;

/// SCE.
pub struct Sce(MethodSpec);

impl Default for Sce {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        Sce(MethodSpec {
            name: "sce",
            pretty_name: "SCE",
            reference: "https://arxiv.org/abs/2408.07990",
            params: vec![
                ParamSpec::new("int8_mask", Kind::Bool, Scope::Shared, Value::Bool(false)),
                ParamSpec::new("select_topk", Kind::Float, Scope::Shared, Value::Float(1.0)),
            ],
            contract: Contract::WITH_BASE,
        })
    }
}

impl Method for Sce {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let base = job.base_tensor();
        let nb = job.non_base();
        if nb.is_empty() {
            out.copy_from_slice(base);
            return Ok(());
        }
        let n = base.len();
        let mut tvs: Vec<Vec<f32>> = nb
            .iter()
            .map(|&i| {
                job.inputs[i]
                    .iter()
                    .zip(base)
                    .map(|(&x, &b)| x - b)
                    .collect()
            })
            .collect();
        let topk = job.shared.f("select_topk");
        if topk < 1.0 {
            let keep = select_by_variance(&tvs, topk);
            for tv in &mut tvs {
                tv.iter_mut().zip(&keep).for_each(|(v, &k)| {
                    if !k {
                        *v = 0.0
                    }
                });
            }
        }
        let weights: Vec<f64> = {
            let w: Vec<f64> = tvs
                .iter()
                .map(|tv| {
                    tv.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n.max(1) as f64
                })
                .collect();
            let s: f64 = w.iter().sum();
            if s.abs() < 1e-6 {
                vec![1.0 / w.len() as f64; w.len()]
            } else {
                w.iter().map(|x| x / s).collect()
            }
        };
        let refs: Vec<&[f32]> = tvs.iter().map(|v| v.as_slice()).collect();
        for (j, o) in out.iter_mut().enumerate() {
            let sign = elect_sign_sum(refs.iter().map(|tv| tv[j]));
            let (mut num, mut den) = (0f32, 0f32);
            for (tv, &w) in refs.iter().zip(&weights) {
                let v = tv[j];
                if v != 0.0 && (v > 0.0) == (sign > 0.0) {
                    num += v * w as f32;
                    den += w as f32;
                }
            }
            *o = base[j] + num / den.max(1e-6);
        }
        Ok(())
    }
}

/// Elements whose variance across the task vectors is among the top `density` fraction of the
/// nonzero variances.
fn select_by_variance(tvs: &[Vec<f32>], density: f64) -> Vec<bool> {
    let n = tvs[0].len();
    if density <= 0.0 {
        return vec![false; n];
    }
    let k = tvs.len() as f64;
    let var: Vec<f32> = (0..n)
        .map(|j| {
            let mean = tvs.iter().map(|t| t[j] as f64).sum::<f64>() / k;
            (tvs.iter()
                .map(|t| (t[j] as f64 - mean).powi(2))
                .sum::<f64>()
                / k) as f32
        })
        .collect();
    let nonzero = var.iter().filter(|&&v| v != 0.0).count();
    let keep = (nonzero as f64 * density) as usize;
    let mut keep_mask = vec![false; n];
    for i in super::sparsify::top_k_indices(&var, keep) {
        keep_mask[i] = true;
    }
    keep_mask
}
