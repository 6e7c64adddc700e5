//! What the SVD methods (Iso-C, Iso-CTS, TSV-M) share: their common parameters, task vectors
//! read one at a time, which tensors get the subspace treatment, and the average the
//! references fall back to for the others.
//!
//! A tensor is treated as a matrix when it is 2-D and its `svd` parameter is true (turn it off
//! per tensor with a filter, as FusionBench's `exclude_keys` does). Every other tensor (biases,
//! norms, and 2-D tensors with `svd: false`) becomes `θ₀ + λ·mean_t(w_t τ_t)`: the references
//! average these, they do not sum them (ALGORITHMS.md §1.2).

use super::*;
use crate::config::Kind;
use crate::linalg;

/// The parameters every SVD method takes: `lambda` scales the merged update, `weight` scales
/// each task vector before merging (FusionBench's per-task `alpha` list), `svd` selects the
/// subspace treatment.
pub fn params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("lambda", Kind::Float, Scope::Shared, Value::Float(1.0)),
        ParamSpec::new("weight", Kind::Float, Scope::NonBase, Value::Float(1.0)),
        ParamSpec::new("svd", Kind::Bool, Scope::Shared, Value::Bool(true)),
    ]
}

/// The task vectors `w_t (θ_t − θ₀)` of one tensor, decoded one at a time.
pub struct TaskVectors<'a> {
    inputs: &'a dyn Inputs,
    models: Vec<(usize, f32)>,
    base: Vec<f32>,
    scratch: std::cell::RefCell<Vec<f32>>,
}

impl<'a> TaskVectors<'a> {
    /// Read the base of `job` from `inputs`.
    pub fn new(job: &MergeJob, inputs: &'a dyn Inputs) -> Result<Self> {
        let mut base = Vec::new();
        inputs.read(job.base.expect("contract guarantees a base"), &mut base)?;
        let models = job
            .non_base()
            .into_iter()
            .map(|i| (i, job.per_input[i].f("weight") as f32))
            .collect();
        Ok(TaskVectors {
            inputs,
            models,
            base,
            scratch: Default::default(),
        })
    }

    /// Number of task vectors `T`.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The base tensor.
    pub fn base(&self) -> &[f32] {
        &self.base
    }

    /// Task vector `t` into `buf`.
    pub fn read(&self, t: usize, buf: &mut Vec<f32>) -> Result<()> {
        let (input, w) = self.models[t];
        self.inputs.read(input, buf)?;
        for (x, &b) in buf.iter_mut().zip(&self.base) {
            *x = (*x - b) * w;
        }
        Ok(())
    }

    /// `Σ_t τ_t` into `out`, summed in task order.
    pub fn sum(&self, out: &mut [f32]) -> Result<()> {
        out.fill(0.0);
        let mut buf = self.scratch.borrow_mut();
        for t in 0..self.len() {
            self.read(t, &mut buf)?;
            out.iter_mut().zip(buf.iter()).for_each(|(o, &v)| *o += v);
        }
        Ok(())
    }

    /// `θ₀ + λ·mean_t(τ_t)` into `out` (the base itself when there are no task vectors).
    pub fn mean_merge(&self, lambda: f32, out: &mut [f32]) -> Result<()> {
        self.sum(out)?;
        let t = self.len().max(1) as f32;
        for (o, &b) in out.iter_mut().zip(&self.base) {
            *o = b + lambda * (*o / t);
        }
        Ok(())
    }

    /// `out ← θ₀ + λ·out` (out holding the merged update).
    pub fn finish(&self, lambda: f32, out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(&self.base) {
            *o = b + lambda * *o;
        }
    }
}

/// `(rows, cols)` when `job`'s tensor gets the subspace treatment.
pub fn matrix_shape(job: &MergeJob) -> Option<(usize, usize)> {
    match job.shape {
        [m, n] if job.shared.b("svd") && *m > 0 && *n > 0 => Some((*m, *n)),
        _ => None,
    }
}

/// Turn an SVD failure into an error naming the tensor.
pub fn svd_error<'a>(job: &'a MergeJob<'a>) -> impl Fn(String) -> Error + 'a {
    move |reason| job.error(reason)
}

/// `out ← Û diag(s) V̂ᵀ` for the row-major `m × n` output.
pub fn compose_into(
    out: &mut [f32],
    (m, n): (usize, usize),
    u: faer::MatRef<'_, f32>,
    s: &[f32],
    v: faer::MatRef<'_, f32>,
) {
    linalg::compose(linalg::rows_mut(out, m, n), u, s, v);
}

/// The top `k` singular triplets of task `t`'s matrix `a`: exact, or randomized when the
/// method's `randomized_svd` parameter is set (sketch keyed by seed, tensor and task).
pub fn top_k(job: &MergeJob, t: usize, a: faer::MatRef<'_, f32>, k: usize) -> Result<linalg::Svd> {
    if job.shared.b("randomized_svd") {
        let key = rng::Key::new(job.seed, job.name, t);
        linalg::truncated_svd(a, k, k.div_ceil(2).max(10), 2, key)
    } else {
        linalg::thin_svd(a).map(|s| linalg::truncate(s, k))
    }
    .map_err(|e| job.error(e))
}

/// Singular triplets placed side by side (`Û`, `ŝ`, `V̂` of TSV-M and Iso-CTS): `r` columns,
/// zero where nothing was placed.
pub struct Stacked {
    u: faer::Mat<f32>,
    s: Vec<f32>,
    v: faer::Mat<f32>,
}

impl Stacked {
    /// Room for `r` triplets of an `m × n` matrix.
    pub fn new(m: usize, n: usize, r: usize) -> Self {
        Stacked {
            u: faer::Mat::zeros(m, r),
            s: vec![0.0; r],
            v: faer::Mat::zeros(n, r),
        }
    }

    /// Put the first `k` triplets of `(u, s, v)` at column `at`.
    pub fn place(
        &mut self,
        at: usize,
        u: faer::MatRef<'_, f32>,
        s: &[f32],
        v: faer::MatRef<'_, f32>,
    ) {
        let k = s.len();
        self.u
            .as_mut()
            .subcols_mut(at, k)
            .copy_from(u.subcols(0, k));
        self.v
            .as_mut()
            .subcols_mut(at, k)
            .copy_from(v.subcols(0, k));
        self.s[at..at + k].copy_from_slice(s);
    }

    /// The placed values.
    pub fn spectrum(&self) -> &[f32] {
        &self.s
    }

    /// The orthogonal polar factors of both bases (`Û⊥`, `V̂⊥`).
    pub fn orthogonalised(&self, job: &MergeJob) -> Result<(faer::Mat<f32>, faer::Mat<f32>)> {
        let err = |e| job.error(e);
        Ok((
            linalg::polar(self.u.as_ref()).map_err(err)?,
            linalg::polar(self.v.as_ref()).map_err(err)?,
        ))
    }
}
