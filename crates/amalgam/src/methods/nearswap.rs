//! `nearswap`: take the other model's value where it is within `t` of the base,
//! interpolating with weight `clamp(t / |a − b|, 0, 1)`.

use super::*;
use crate::config::Kind;

/// NearSwap.
pub struct NearSwap(MethodSpec);

impl Default for NearSwap {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        NearSwap(MethodSpec {
            name: "nearswap",
            pretty_name: "NearSwap",
            reference: "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            params: vec![ParamSpec::required("t", Kind::Float, Scope::Shared)],
            contract: Contract {
                min_inputs: 2,
                max_inputs: Some(2),
                ..Contract::WITH_BASE
            },
        })
    }
}

impl Method for NearSwap {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }
}

impl Streaming for NearSwap {
    fn apply(
        &self,
        job: &MergeJob,
        _offset: usize,
        _state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let t = job.shared.f("t") as f32;
        let a = job.base_tensor();
        let b = job.inputs[job.non_base()[0]];
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            let w = (t / (x - y).abs().max(1e-6)).clamp(0.0, 1.0);
            *o = w * y + (1.0 - w) * x;
        }
        Ok(())
    }
}
