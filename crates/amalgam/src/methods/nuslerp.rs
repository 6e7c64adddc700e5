//! `nuslerp`: SLERP between two models (or their task vectors, with a base) with
//! `t = w₂ / (w₁ + w₂)`, over the flattened tensor or row/column-wise.

use super::*;
use crate::config::Kind;

/// NuSLERP.
pub struct NuSlerp(MethodSpec);

impl Default for NuSlerp {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        NuSlerp(MethodSpec {
            name: "nuslerp",
            pretty_name: "NuSLERP",
            reference: "",
            params: vec![
                ParamSpec::required("weight", Kind::Float, Scope::NonBase),
                ParamSpec::new(
                    "nuslerp_row_wise",
                    Kind::Bool,
                    Scope::Shared,
                    Value::Bool(false),
                ),
                ParamSpec::new(
                    "nuslerp_flatten",
                    Kind::Bool,
                    Scope::Shared,
                    Value::Bool(true),
                ),
            ],
            contract: Contract {
                base: BasePolicy::Optional,
                min_non_base: 2,
                max_non_base: Some(2),
                ..Contract::ANY
            },
        })
    }
}

/// SLERP of one pair of vectors (as mergekit's `nuslerp`: normalise with norm clamped at 1e-7,
/// colinear when `1 − cos² ≤ 1e-16`), written into `out`.
fn slerp_vectors(t: f64, v0: &[f64], v1: &[f64], out: &mut [f64]) {
    let n0 = v0.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-7);
    let n1 = v1.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-7);
    let cos = (v0.iter().zip(v1).map(|(a, b)| a * b).sum::<f64>() / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        for ((o, a), b) in out.iter_mut().zip(v0).zip(v1) {
            *o = (1.0 - t) * a + t * b;
        }
        return;
    }
    let theta = cos.acos();
    let s = theta.sin();
    let (ca, cb) = (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s);
    for ((o, a), b) in out.iter_mut().zip(v0).zip(v1) {
        *o = ca * a + cb * b;
    }
}

impl Method for NuSlerp {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let nb = job.non_base();
        let (w0, w1) = (
            job.per_input[nb[0]].f("weight"),
            job.per_input[nb[1]].f("weight"),
        );
        let total = w0 + w1;
        let t = if total.abs() < 1e-6 { 0.5 } else { w1 / total };
        let base = job.base.map(|b| job.inputs[b]);
        let delta = |i: usize| -> Vec<f64> {
            let x = job.inputs[i];
            match base {
                Some(b) => x
                    .iter()
                    .zip(b)
                    .map(|(&v, &b)| v as f64 - b as f64)
                    .collect(),
                None => x.iter().map(|&v| v as f64).collect(),
            }
        };
        let (a, b) = (delta(nb[0]), delta(nb[1]));
        let mut res = vec![0f64; a.len()];
        let flatten = job.shared.b("nuslerp_flatten");
        let row_wise = job.shared.b("nuslerp_row_wise");
        if flatten || job.shape.len() < 2 {
            slerp_vectors(t, &a, &b, &mut res);
        } else {
            if row_wise {
                // Vectors along dim 0: view as (shape[0] × rest), take each column.
                let rows = job.shape[0];
                let cols = a.len() / rows.max(1);
                let (mut x, mut y, mut r) = (vec![0f64; rows], vec![0f64; rows], vec![0f64; rows]);
                for c in 0..cols {
                    for i in 0..rows {
                        x[i] = a[i * cols + c];
                        y[i] = b[i * cols + c];
                    }
                    slerp_vectors(t, &x, &y, &mut r);
                    for i in 0..rows {
                        res[i * cols + c] = r[i];
                    }
                }
            } else {
                let cols = *job.shape.last().expect("2-D or more");
                for ((o, x), y) in res.chunks_mut(cols).zip(a.chunks(cols)).zip(b.chunks(cols)) {
                    slerp_vectors(t, x, y, o);
                }
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = (res[i] + base.map_or(0.0, |b| b[i] as f64)) as f32;
        }
        Ok(())
    }
}
