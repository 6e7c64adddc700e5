//! `fisher`: Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022, "Merging Models with
//! Fisher-Weighted Averaging"; research/data-driven-merging.md §2), with FusionBench 0.2.33's
//! normalisation (`merging_with_fisher_weights`).
//!
//! Per parameter, `θ = Σᵢ cᵢ (Fᵢ + ε) θᵢ / Σᵢ cᵢ (Fᵢ + ε)`, `Fᵢ` the diagonal Fisher of model
//! `i` (`amalgam measure --stats fisher`), `ε` the `floor` (default 1e-6, the authors'
//! `fisher_floor`). `cᵢ = wᵢ` (the `weight` parameter, default 1), times, with `normalize`
//! (default on), `(1/(‖Fᵢ‖ + ε)) / Σⱼ 1/(‖Fⱼ‖ + ε)`: each model's Fisher divided by its norm over
//! every measured parameter, so models measured on different amounts or kinds of data count
//! alike. Every model merged needs a Fisher of every tensor; the base, if given, is not merged. A parameter no model has any Fisher on (only
//! possible with `floor: 0`) gets the `c`-weighted mean.

use super::regmean::model_weights;
use super::*;
use crate::config::Kind;
use crate::stats;

/// Fisher merging.
pub struct Fisher(MethodSpec);

impl Default for Fisher {
    fn default() -> Self {
        Fisher(MethodSpec {
            name: "fisher",
            pretty_name: "Fisher merging",
            reference: "https://arxiv.org/abs/2111.09832",
            params: vec![
                ParamSpec::new("weight", Kind::Float, Scope::NonBase, Value::Float(1.0)),
                ParamSpec::new("normalize", Kind::Bool, Scope::Shared, Value::Bool(true)),
                ParamSpec::new("floor", Kind::Float, Scope::Shared, Value::Float(1e-6)),
            ],
            contract: Contract {
                base: BasePolicy::Optional,
                min_non_base: 1,
                ..Contract::ANY
            },
        })
    }
}

impl Method for Fisher {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn lazy(&self) -> Option<&dyn Lazy> {
        Some(self)
    }

    fn stats_kind(&self) -> Option<stats::Kind> {
        Some(stats::Kind::Fisher)
    }
}

impl Lazy for Fisher {
    fn merge(&self, job: &MergeJob, inputs: &dyn Inputs, out: &mut [f32]) -> Result<()> {
        let floor = job.shared.f("floor");
        if !(floor.is_finite() && floor >= 0.0) {
            return Err(job.error(format!("fisher: floor must be ≥ 0, got {floor}")));
        }
        let (models, mut c) = model_weights(job)?;
        if job.shared.b("normalize") {
            let mut inv = Vec::with_capacity(models.len());
            for &k in &models {
                let norm = inputs
                    .stat_meta(k)
                    .and_then(|m| m.sq_norm)
                    .ok_or_else(|| job.error("fisher: a stats file without its Fisher norm"))?
                    .sqrt();
                inv.push(1.0 / (norm + floor));
            }
            let total: f64 = inv.iter().sum();
            for (ci, v) in c.iter_mut().zip(inv) {
                *ci *= v / total;
            }
        }
        let mut num = vec![0f64; out.len()];
        let mut den = vec![0f64; out.len()];
        // Σ cᵢθᵢ, for parameters no model has any Fisher on (possible only with floor 0).
        let mut plain = vec![0f64; out.len()];
        let mut buf = Vec::new();
        for (&k, &ck) in models.iter().zip(&c) {
            let f = inputs
                .stat(k, stats::Kind::Fisher, job.shape)?
                .ok_or_else(|| {
                    job.error(
                        "fisher: a model's stats file has no Fisher of this tensor (measure \
                         every model with amalgam measure --stats fisher)",
                    )
                })?;
            inputs.read(k, &mut buf)?;
            for (((n, d), p), (&x, &fi)) in num
                .iter_mut()
                .zip(den.iter_mut())
                .zip(plain.iter_mut())
                .zip(buf.iter().zip(&f))
            {
                let wf = ck * (fi + floor);
                *n += wf * f64::from(x);
                *d += wf;
                *p += ck * f64::from(x);
            }
        }
        let total: f64 = c.iter().sum();
        for (o, ((n, d), p)) in out.iter_mut().zip(num.into_iter().zip(den).zip(plain)) {
            *o = if d > 0.0 { n / d } else { p / total } as f32;
        }
        Ok(())
    }
}
