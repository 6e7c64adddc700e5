//! `ram` and `ramplus_tl` (Reinforced Agent Merging): elements changed by one fine-tune keep its
//! change; elements changed by several are averaged over those that changed them. RAM+ (tensor
//! local) boosts the unique changes by `1 + r·clamp(shared/unique, 0, alpha)` per model.

use super::*;
use crate::config::Kind;

/// RAM or RAM+.
pub struct Ram {
    spec: MethodSpec,
    plus: bool,
}

impl Ram {
    /// `ram` (`plus = false`) or `ramplus_tl`.
    pub fn new(plus: bool) -> Self {
        let mut params = vec![ParamSpec::new(
            "epsilon",
            Kind::Float,
            Scope::Shared,
            Value::Float(1e-5),
        )];
        if plus {
            params.insert(
                0,
                ParamSpec::new("r", Kind::Float, Scope::Shared, Value::Float(0.1)),
            );
            params.insert(
                1,
                ParamSpec::new("alpha", Kind::Float, Scope::Shared, Value::Float(0.2)),
            );
        }
        Ram {
            spec: MethodSpec {
                name: if plus { "ramplus_tl" } else { "ram" },
                pretty_name: if plus {
                    "Reinforced Agent Merging Plus (Tensor-Local)"
                } else {
                    "Reinforced Agent Merging"
                },
                reference: "https://arxiv.org/abs/2601.13572",
                params,
                contract: Contract::WITH_BASE,
            },
            plus,
        }
    }
}

impl Method for Ram {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let base = job.base_tensor();
        let nb = job.non_base();
        let eps = job.shared.f("epsilon") as f32;
        let tv = |i: usize, j: usize| job.inputs[nb[i]][j] - base[j];
        let n = base.len();
        let counts: Vec<u32> = (0..n)
            .map(|j| (0..nb.len()).filter(|&i| tv(i, j).abs() > eps).count() as u32)
            .collect();
        let lambdas: Vec<f32> = (0..nb.len())
            .map(|i| {
                if !self.plus {
                    return 1.0;
                }
                let (mut shared, mut unique) = (0u64, 0u64);
                for (j, &c) in counts.iter().enumerate() {
                    if tv(i, j).abs() > eps {
                        shared += (c > 1) as u64;
                        unique += (c == 1) as u64;
                    }
                }
                let rho = shared as f32 / (unique as f32).max(eps);
                let (r, alpha) = (job.shared.f("r") as f32, job.shared.f("alpha") as f32);
                1.0 + r * rho.clamp(0.0, alpha)
            })
            .collect();
        for (j, o) in out.iter_mut().enumerate() {
            let c = counts[j];
            let mut acc = 0f32;
            for (i, &lam) in lambdas.iter().enumerate() {
                let v = tv(i, j);
                if v.abs() > eps {
                    acc += if c == 1 { v * lam } else { v / c.max(1) as f32 };
                }
            }
            *o = base[j] + acc;
        }
        Ok(())
    }
}
