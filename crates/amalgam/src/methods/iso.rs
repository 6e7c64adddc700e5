//! `iso_c` and `iso_cts`: isotropic merging in the common subspace, and in the common plus
//! task-specific subspaces (Marczak et al. 2025, ALGORITHMS.md §2.11).
//!
//! Iso-C, per matrix: `M = Σ_t τ_t = U diag(σ) Vᵀ`, then `Δ = mean(σ)·U Vᵀ` (every singular value
//! replaced by their mean, zeros included). Iso-CTS keeps the top `k_c` directions of `M` as the
//! common subspace, adds each task's top `k` directions of its residual
//! `τ_t − U_c U_cᵀ τ_t`, orthogonalises the stacked left and right bases by their polar
//! factors and again flattens the spectrum to its mean. Other tensors are averaged
//! ([`subspace`](super::subspace)). `θ = θ₀ + λΔ`.
//!
//! Subspace sizes follow the authors' code exactly: `k_c = ⌊r·f⌋`, the task-specific total is
//! `round((r − k_c)/T)·T` (Python's round, ties to even), `k_c` is then `r` minus that total
//! and `k` that total over `T`. With fewer dimensions than tasks (`k = 0`) only the common
//! subspace remains and Iso-CTS equals Iso-C.

use super::subspace::{self, Stacked, TaskVectors, compose_into, matrix_shape, top_k};
use super::*;
use crate::config::Kind;
use crate::linalg::{self, rows};

/// Iso-C (`cts = false`) or Iso-CTS.
pub struct Iso {
    spec: MethodSpec,
    cts: bool,
}

impl Iso {
    /// `iso_c` or `iso_cts`.
    pub fn new(cts: bool) -> Self {
        let mut params = subspace::params();
        if cts {
            params.push(ParamSpec::new(
                "common_space_fraction",
                Kind::Float,
                Scope::Shared,
                Value::Float(0.8),
            ));
            params.push(ParamSpec::new(
                "randomized_svd",
                Kind::Bool,
                Scope::Shared,
                Value::Bool(false),
            ));
        }
        Iso {
            spec: MethodSpec {
                name: if cts { "iso_cts" } else { "iso_c" },
                pretty_name: if cts {
                    "Isotropic Merging in Common and Task-Specific Subspaces"
                } else {
                    "Isotropic Merging in Common Subspace"
                },
                reference: "https://arxiv.org/abs/2502.04959",
                params,
                contract: Contract::WITH_BASE,
            },
            cts,
        }
    }
}

impl Method for Iso {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn lazy(&self) -> Option<&dyn Lazy> {
        Some(self)
    }
}

/// Iso-CTS subspace sizes `(k_c, k)` for rank `r`, `T` tasks and common fraction `f`.
pub fn cts_sizes(r: usize, t: usize, f: f64) -> (usize, usize) {
    if t == 0 {
        return (r, 0);
    }
    let common = ((r as f64 * f) as usize).min(r);
    let mut specific = ((r - common) as f64 / t as f64).round_ties_even() as usize * t;
    if specific > r {
        // Rounding up past the rank (only when r < T/2 + k_c): keep what fits.
        specific = r / t * t;
    }
    (r - specific, specific / t)
}

impl Lazy for Iso {
    fn merge(&self, job: &MergeJob, inputs: &dyn Inputs, out: &mut [f32]) -> Result<()> {
        let tv = TaskVectors::new(job, inputs)?;
        let lambda = job.shared.f("lambda") as f32;
        let Some((m, n)) = matrix_shape(job) else {
            return tv.mean_merge(lambda, out);
        };
        tv.sum(out)?;
        let r = m.min(n);
        let solver = subspace::solver(job);
        let err = |e| job.error(e);
        let mean = |s: &[f32]| (s.iter().map(|&x| x as f64).sum::<f64>() / r as f64) as f32;
        if !self.cts {
            // Δ = mean(σ)·U Vᵀ: the polar factor of M, scaled.
            let (p, s) = linalg::polar(rows(out, m, n), solver).map_err(err)?;
            let mean = mean(&s);
            linalg::rows_mut(out, m, n).copy_from(p.as_ref());
            out.iter_mut().for_each(|x| *x *= mean);
        } else {
            let f = job.shared.f("common_space_fraction");
            if !(0.0..=1.0).contains(&f) {
                return Err(job.error(format!("common_space_fraction must be in [0, 1], got {f}")));
            }
            let (kc, k) = cts_sizes(r, tv.len(), f);
            let common = linalg::top_k(rows(out, m, n), kc, solver).map_err(err)?;
            let mut stacked = Stacked::new(m, n, r);
            let common_u = common.u.as_ref();
            let mut buf = Vec::new();
            let mut proj = faer::Mat::<f32>::zeros(kc, n);
            for t in 0..if k == 0 { 0 } else { tv.len() } {
                tv.read(t, &mut buf)?;
                // R_t = τ_t − U_c (U_cᵀ τ_t), in place.
                let mut residual = linalg::rows_mut(&mut buf, m, n);
                linalg::matmul(proj.as_mut(), common_u.transpose(), residual.as_ref());
                linalg::sub_product(residual.as_mut(), common_u, proj.as_ref());
                let top = top_k(job, t, residual.as_ref(), k)?;
                stacked.place(t * k, top.u.as_ref(), &top.s, top.v.as_ref());
            }
            stacked.place(tv.len() * k, common_u, &common.s, common.v.as_ref());
            let (u, v) = stacked.orthogonalised(job)?;
            let mean = mean(stacked.spectrum());
            compose_into(out, (m, n), u.as_ref(), &vec![mean; u.ncols()], v.as_ref());
        }
        tv.finish(lambda, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cts_sizes_follow_the_authors_rounding() {
        // r = 16, f = 0.8: k_c = 12, (16 − 12)/3 = 1.33 → 1 per task, k_c = 13.
        assert_eq!(cts_sizes(16, 3, 0.8), (13, 1));
        // (10 − 8)/4 = 0.5 rounds to even (0): only the common subspace.
        assert_eq!(cts_sizes(10, 4, 0.8), (10, 0));
        // (20 − 16)/8 = 0.5 → 0; (30 − 24)/4 = 1.5 → 2 per task, k_c = 22.
        assert_eq!(cts_sizes(20, 8, 0.8), (20, 0));
        assert_eq!(cts_sizes(30, 4, 0.8), (22, 2));
        // Fewer dimensions than tasks.
        assert_eq!(cts_sizes(2, 5, 0.8), (2, 0));
        assert_eq!(cts_sizes(1, 1, 0.0), (0, 1));
    }
}
