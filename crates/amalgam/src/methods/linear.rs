//! `linear`: weighted average of the inputs, `Σ wᵢθᵢ / Σ wᵢ` (model soups).

use super::*;
use crate::config::Kind;

/// Weighted average.
pub struct Linear(MethodSpec);

impl Default for Linear {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        Linear(MethodSpec {
            name: "linear",
            pretty_name: "Linear",
            reference: "https://arxiv.org/abs/2203.05482",
            params: vec![
                ParamSpec::required("weight", Kind::Float, Scope::Input),
                ParamSpec::new("normalize", Kind::Bool, Scope::Shared, Value::Bool(true)),
            ],
            contract: Contract::ANY,
        })
    }
}

impl Method for Linear {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }
}

impl Streaming for Linear {
    fn apply(
        &self,
        job: &MergeJob,
        _offset: usize,
        _state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let weights: Vec<f32> = job.per_input.iter().map(|p| p.f("weight") as f32).collect();
        weighted_sum(&job.inputs, &weights, out);
        if job.shared.b("normalize") {
            let total: f32 = weights.iter().sum();
            if total == 0.0 {
                return Err(job.error(
                    "linear: the weights sum to zero, so they cannot be normalized; set normalize: false or change the weights",
                ));
            }
            out.iter_mut().for_each(|o| *o /= total);
        }
        Ok(())
    }
}
