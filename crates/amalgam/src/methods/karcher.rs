//! `karcher`: the Riemannian (Fréchet) mean of the inputs' directions on the unit sphere,
//! found by fixed-point iteration, scaled by the mean of their norms.

use super::*;
use crate::config::Kind;

/// Karcher mean.
pub struct Karcher(MethodSpec);

impl Default for Karcher {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        Karcher(MethodSpec {
            name: "karcher",
            pretty_name: "Karcher Mean",
            reference: "https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
            params: vec![
                ParamSpec::new("max_iter", Kind::Int, Scope::Shared, Value::Int(10)),
                ParamSpec::new("tol", Kind::Float, Scope::Shared, Value::Float(1e-5)),
            ],
            contract: Contract::ANY,
        })
    }
}

fn vnorm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

impl Method for Karcher {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let k = job.inputs.len();
        if k == 1 {
            out.copy_from_slice(job.inputs[0]);
            return Ok(());
        }
        let (max_iter, tol) = (job.shared.i("max_iter").max(0), job.shared.f("tol"));
        let alphas = vec![1.0 / k as f64; k];
        let norms: Vec<f64> = job.inputs.iter().map(|x| norm(x)).collect();
        let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
        if valid.is_empty() {
            out.fill(0.0);
            return Ok(());
        }
        let units: Vec<Vec<f64>> = valid
            .iter()
            .map(|&i| job.inputs[i].iter().map(|&v| v as f64 / norms[i]).collect())
            .collect();
        let asum: f64 = valid.iter().map(|&i| alphas[i]).sum();
        let a: Vec<f64> = valid.iter().map(|&i| alphas[i] / asum).collect();
        let n = out.len();
        let mut mean = vec![0f64; n];
        for (u, &ai) in units.iter().zip(&a) {
            mean.iter_mut().zip(u).for_each(|(m, x)| *m += ai * x);
        }
        let mn = vnorm(&mean);
        if mn < tol {
            mean.clone_from(&units[0]);
        } else {
            mean.iter_mut().for_each(|m| *m /= mn);
        }
        for _ in 0..max_iter {
            let mut tangent = vec![0f64; n];
            for (u, &ai) in units.iter().zip(&a) {
                let d = mean
                    .iter()
                    .zip(u)
                    .map(|(m, x)| m * x)
                    .sum::<f64>()
                    .clamp(-1.0, 1.0);
                let theta = d.acos();
                if theta < tol {
                    continue;
                }
                let c = ai * theta / theta.sin();
                tangent
                    .iter_mut()
                    .zip(u.iter().zip(&mean))
                    .for_each(|(t, (x, m))| *t += c * (x - d * m));
            }
            let tn = vnorm(&tangent);
            if tn < tol {
                break;
            }
            for (m, t) in mean.iter_mut().zip(&tangent) {
                *m = tn.cos() * *m + tn.sin() * (t / tn);
            }
            let un = vnorm(&mean);
            if un > tol {
                mean.iter_mut().for_each(|m| *m /= un);
            }
        }
        let scale: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
        for (o, m) in out.iter_mut().zip(&mean) {
            *o = (scale * m) as f32;
        }
        Ok(())
    }
}
