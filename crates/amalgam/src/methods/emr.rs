//! `emr`: the elected unified task vector of EMR-Merging (Huang et al. 2024, ALGORITHMS.md
//! §4.2), as a static merge.
//!
//! Per element: the sign `γ = +1` where `Σ_t τ_t > 0`, else `−1` (a zero sum elects `−1`, as in
//! the authors' code); the magnitude is the largest `|τ_t|` among the tasks whose sign agrees with
//! `γ` (0 if none does); `θ = θ₀ + λ·γ·max`. EMR's per-task masks and rescalers, which rebuild
//! each task from this vector, belong to the task-vector library, not to a single merged model.
//! Applied to every float tensor, biases and norms included, as the reference does.

use super::*;
use crate::config::Kind;

/// EMR's unified vector.
pub struct Emr {
    spec: MethodSpec,
}

impl Default for Emr {
    fn default() -> Self {
        Emr {
            spec: MethodSpec {
                name: "emr",
                pretty_name: "EMR-Merging (elected unified vector)",
                reference: "https://arxiv.org/abs/2405.17461",
                params: vec![ParamSpec::new(
                    "lambda",
                    Kind::Float,
                    Scope::Shared,
                    Value::Float(1.0),
                )],
                contract: Contract::WITH_BASE,
            },
        }
    }
}

impl Method for Emr {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }
}

impl Streaming for Emr {
    fn apply(
        &self,
        job: &MergeJob,
        _offset: usize,
        _state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let base = job.base_tensor();
        let models: Vec<&[f32]> = job.non_base().iter().map(|&i| job.inputs[i]).collect();
        let lambda = job.shared.f("lambda") as f32;
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let sum = models.iter().fold(0.0f32, |s, x| s + (x[j] - b));
            let sign = if sum > 0.0 { 1.0f32 } else { -1.0 };
            let mut largest = 0.0f32;
            for x in &models {
                let d = x[j] - b;
                if d * sign > 0.0 && d.abs() > largest {
                    largest = d.abs();
                }
            }
            *o = b + lambda * (sign * largest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(inputs: &[&[f32]], lambda: f64) -> Vec<f32> {
        let shared = Params {
            values: vec![("lambda", Value::Float(lambda))],
        };
        let per_input = vec![Params::default(); inputs.len()];
        let job = MergeJob {
            name: "t",
            shape: &[inputs[0].len()],
            inputs: inputs.to_vec(),
            bf16: Vec::new(),
            base: Some(0),
            shared: &shared,
            per_input: &per_input,
            seed: 0,
            global: None,
        };
        let mut out = vec![0.0; inputs[0].len()];
        Emr::default().merge(&job, &mut out).unwrap();
        out
    }

    #[test]
    fn elects_sign_by_sum_and_keeps_largest_agreeing_magnitude() {
        let base = [1.0, 1.0, 1.0, 1.0];
        let a = [3.0, 0.0, 1.5, 1.0]; // τ = [2, −1, 0.5, 0]
        let b = [0.5, 2.0, 0.0, 1.0]; // τ = [−0.5, 1, −1, 0]
        let out = run(&[&base, &a, &b], 1.0);
        // Σ = [1.5, 0 → −1, −0.5, 0 → −1]; agreeing maxima: 2, 1 (from a), 1 (from b), none.
        assert_eq!(out, vec![3.0, 0.0, 0.0, 1.0]);
        let half = run(&[&base, &a, &b], 0.5);
        assert_eq!(half, vec![2.0, 0.5, 0.5, 1.0]);
    }

    #[test]
    fn one_task_is_reconstructed_exactly() {
        let base = [0.25, -1.0, 2.0];
        let a = [1.0, -3.0, 2.0];
        assert_eq!(run(&[&base, &a], 1.0), a.to_vec());
    }
}
