//! `slerp`: spherical interpolation between the base (`t = 0`) and one other model (`t = 1`)
//! over the whole flattened tensor; nearly colinear pairs (|cos| > 0.9995) interpolate linearly.

use super::*;
use crate::config::Kind;

const DOT_THRESHOLD: f64 = 0.9995;
const EPS: f64 = 1e-8;

/// SLERP.
pub struct Slerp(MethodSpec);

impl Default for Slerp {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        Slerp(MethodSpec {
            name: "slerp",
            pretty_name: "SLERP",
            reference: "https://en.wikipedia.org/wiki/Slerp",
            params: vec![ParamSpec::required("t", Kind::Float, Scope::Shared)],
            contract: Contract {
                min_inputs: 2,
                max_inputs: Some(2),
                ..Contract::WITH_BASE
            },
        })
    }
}

/// Coefficients `(ca, cb)` with `slerp(t, a, b) = ca·a + cb·b`, from the norms and dot product
/// of the two tensors. Zero-norm inputs are not normalised (their norm is taken as 1), as in
/// mergekit.
pub fn coefficients_from(t: f64, sums: &Sums) -> (f64, f64) {
    let na = sums.aa.sqrt();
    let nb = sums.bb.sqrt();
    let na = if na > EPS { na } else { 1.0 };
    let nb = if nb > EPS { nb } else { 1.0 };
    let d = (sums.ab / (na * nb)).clamp(-1.0, 1.0);
    if d.abs() > DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let theta = d.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

/// `coefficients_from` for two whole tensors.
pub fn coefficients(t: f64, a: &[f32], b: &[f32]) -> (f64, f64) {
    let mut sums = Sums::default();
    sums.add(a, b);
    coefficients_from(t, &sums)
}

/// Running `Σa²`, `Σb²`, `Σab` in f64.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sums {
    aa: f64,
    bb: f64,
    ab: f64,
}

impl Sums {
    fn add(&mut self, a: &[f32], b: &[f32]) {
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            self.aa += x * x;
            self.bb += y * y;
            self.ab += x * y;
        }
    }
}

impl Method for Slerp {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }
}

impl Streaming for Slerp {
    fn begin(&self, _job: &MergeJob) -> Result<State> {
        Ok(Box::new(Sums::default()))
    }

    fn passes(&self, _state: &State) -> usize {
        1
    }

    fn observe(
        &self,
        _pass: usize,
        job: &MergeJob,
        _offset: usize,
        state: &mut State,
    ) -> Result<()> {
        let a = job.base_tensor();
        let b = job.inputs[job.non_base()[0]];
        state_mut::<Sums>(state).add(a, b);
        Ok(())
    }

    fn apply(
        &self,
        job: &MergeJob,
        _offset: usize,
        state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let (ca, cb) = coefficients_from(job.shared.f("t"), state_mut::<Sums>(state));
        let (ca, cb) = (ca as f32, cb as f32);
        let a = job.base_tensor();
        let b = job.inputs[job.non_base()[0]];
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = ca * x + cb * y;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::coefficients;

    #[test]
    fn endpoints_and_colinear_fallback() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 2.0];
        let (ca, cb) = coefficients(0.0, &a, &b);
        assert!((ca - 1.0).abs() < 1e-12 && cb.abs() < 1e-12);
        let (ca, cb) = coefficients(1.0, &a, &b);
        assert!(ca.abs() < 1e-12 && (cb - 1.0).abs() < 1e-12);
        // Orthogonal at t = 0.5: both weights sin(π/4)/sin(π/2).
        let (ca, cb) = coefficients(0.5, &a, &b);
        assert!((ca - 0.5f64.sqrt()).abs() < 1e-12 && (cb - ca).abs() < 1e-12);
        assert_eq!(coefficients(0.3, &[1.0, 1.0], &[2.0, 2.0]), (0.7, 0.3));
    }
}
