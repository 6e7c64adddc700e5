//! `tsv_m`: Task Singular Vectors merge (Gargiulo et al. 2025, ALGORITHMS.md §2.12).
//!
//! Per matrix of rank `r = min(m, n)` and `T` tasks, with `k = ⌊r·(1/T)⌋` (computed in floating
//! point as the authors' code does): each task vector's top `k` singular triplets are placed side
//! by side, `Û = [U_1k … U_Tk 0]`, `ŝ`, `V̂ = [V_1k … V_Tk 0]`; both bases are replaced by their
//! orthogonal polar factors (whitening away the interference between tasks' directions), and
//! `Δ = Û⊥ diag(ŝ) V̂⊥ᵀ`. Other tensors are averaged ([`subspace`](super::subspace)).
//! `θ = θ₀ + λΔ`.
//!
//! One deliberate difference: with fewer dimensions than tasks (`k = 0`) the reference returns a
//! zero update for that matrix without a word; amalgam averages it like a 1-D tensor instead.

use super::subspace::{self, Stacked, TaskVectors, compose_into, matrix_shape, top_k};
use super::*;
use crate::config::Kind;
use crate::linalg::rows;

/// TSV-M.
pub struct TsvMerge {
    spec: MethodSpec,
}

impl Default for TsvMerge {
    fn default() -> Self {
        let mut params = subspace::params();
        params.push(ParamSpec::new(
            "randomized_svd",
            Kind::Bool,
            Scope::Shared,
            Value::Bool(false),
        ));
        TsvMerge {
            spec: MethodSpec {
                name: "tsv_m",
                pretty_name: "Task Singular Vectors: Merge",
                reference: "https://arxiv.org/abs/2412.00081",
                params,
                contract: Contract::WITH_BASE,
            },
        }
    }
}

impl Method for TsvMerge {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn lazy(&self) -> Option<&dyn Lazy> {
        Some(self)
    }
}

/// Directions kept per task: `⌊r·(1/T)⌋` in f64, as `int(r * (1 / T))` in the reference.
pub fn per_task_rank(r: usize, t: usize) -> usize {
    if t == 0 {
        0
    } else {
        (r as f64 * (1.0 / t as f64)) as usize
    }
}

impl Lazy for TsvMerge {
    fn merge(&self, job: &MergeJob, inputs: &dyn Inputs, out: &mut [f32]) -> Result<()> {
        let tv = TaskVectors::new(job, inputs)?;
        let lambda = job.shared.f("lambda") as f32;
        let Some((m, n)) = matrix_shape(job) else {
            return tv.mean_merge(lambda, out);
        };
        let r = m.min(n);
        let k = per_task_rank(r, tv.len());
        if k == 0 {
            return tv.mean_merge(lambda, out);
        }
        let mut stacked = Stacked::new(m, n, r);
        let mut buf = Vec::new();
        for t in 0..tv.len() {
            tv.read(t, &mut buf)?;
            let top = top_k(job, t, rows(&buf, m, n), k)?;
            stacked.place(t * k, top.u.as_ref(), &top.s, top.v.as_ref());
        }
        let (u, v) = stacked.orthogonalised(job)?;
        compose_into(out, (m, n), u.as_ref(), stacked.placed(), v.as_ref());
        tv.finish(lambda, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_task_rank_matches_python_float_division() {
        assert_eq!(per_task_rank(16, 3), 5);
        assert_eq!(per_task_rank(16, 4), 4);
        assert_eq!(per_task_rank(3, 4), 0);
        // 49 · (1/49) is 0.9999999999999999 in f64: Python's int() gives 0, and so do we.
        assert_eq!(per_task_rank(49, 49), (49.0f64 * (1.0 / 49.0)) as usize);
    }
}
