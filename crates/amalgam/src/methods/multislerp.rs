//! `multislerp`: barycentric interpolation of several models on the hypersphere: project to the
//! tangent space at the weighted mean direction, average there, map back, rescale by the
//! weighted mean norm. With a base, works on task vectors.

use super::*;
use crate::config::Kind;

/// Multi-SLERP.
pub struct MultiSlerp(MethodSpec);

impl Default for MultiSlerp {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        MultiSlerp(MethodSpec {
            name: "multislerp",
            pretty_name: "Multi-SLERP",
            reference: "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            params: vec![
                ParamSpec::required("weight", Kind::Float, Scope::NonBase),
                ParamSpec::new(
                    "normalize_weights",
                    Kind::Bool,
                    Scope::Shared,
                    Value::Bool(true),
                ),
                ParamSpec::new("eps", Kind::Float, Scope::Shared, Value::Float(1e-8)),
            ],
            contract: Contract {
                base: BasePolicy::Optional,
                min_non_base: 1,
                ..Contract::ANY
            },
        })
    }
}

impl Method for MultiSlerp {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let nb = job.non_base();
        let base = job.base.map(|b| job.inputs[b]);
        if nb.len() == 1 {
            out.copy_from_slice(job.inputs[nb[0]]);
            return Ok(());
        }
        let eps = job.shared.f("eps");
        let mut w: Vec<f64> = nb.iter().map(|&i| job.per_input[i].f("weight")).collect();
        if job.shared.b("normalize_weights") {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= s);
        }
        let n = out.len();
        let vecs: Vec<Vec<f64>> = nb
            .iter()
            .map(|&i| {
                let x = job.inputs[i];
                (0..n)
                    .map(|j| x[j] as f64 - base.map_or(0.0, |b| b[j] as f64))
                    .collect()
            })
            .collect();
        let norms: Vec<f64> = vecs
            .iter()
            .map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        let units: Vec<Vec<f64>> = vecs
            .iter()
            .zip(&norms)
            .map(|(v, &nv)| v.iter().map(|x| x / (nv + eps)).collect())
            .collect();
        let mut mean = vec![0f64; n];
        for (u, &wi) in units.iter().zip(&w) {
            mean.iter_mut().zip(u).for_each(|(m, x)| *m += wi * x);
        }
        let mean_norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
        let result: Vec<f64> = if mean_norm < eps {
            if vecs.len() != 2 {
                return Err(job.error(
                    "multislerp: the weighted sum of the inputs' directions is zero (antipodal inputs balanced by their weights); change the weights",
                ));
            }
            (0..n)
                .map(|j| vecs[0][j] * w[0] + vecs[1][j] * w[1])
                .collect()
        } else {
            mean.iter_mut().for_each(|m| *m /= mean_norm);
            let mut tangent = vec![0f64; n];
            for (u, &wi) in units.iter().zip(&w) {
                let d: f64 = u.iter().zip(&mean).map(|(a, b)| a * b).sum();
                tangent
                    .iter_mut()
                    .zip(u.iter().zip(&mean))
                    .for_each(|(t, (x, m))| *t += wi * (x - d * m));
            }
            let tn = tangent.iter().map(|x| x * x).sum::<f64>().sqrt() + eps;
            let avg_norm: f64 = norms.iter().zip(&w).map(|(a, b)| a * b).sum();
            (0..n)
                .map(|j| (mean[j] * tn.cos() + tangent[j] * (tn.sin() / tn)) * avg_norm)
                .collect()
        };
        for (j, o) in out.iter_mut().enumerate() {
            *o = (result[j] + base.map_or(0.0, |b| b[j] as f64)) as f32;
        }
        Ok(())
    }
}
