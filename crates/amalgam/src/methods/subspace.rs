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
/// subspace treatment, `solver` how singular triplets and polar factors are computed (`auto`:
/// through the Gram matrix where that is as accurate as the SVD, [`linalg::gram`]; `svd`:
/// always the thin SVD, as the references do).
pub fn params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("lambda", Kind::Float, Scope::Shared, Value::Float(1.0)),
        ParamSpec::new("weight", Kind::Float, Scope::NonBase, Value::Float(1.0)),
        ParamSpec::new("svd", Kind::Bool, Scope::Shared, Value::Bool(true)),
        ParamSpec::new(
            "solver",
            Kind::Choice(&["auto", "svd"]),
            Scope::Shared,
            Value::Choice("auto"),
        ),
    ]
}

/// The method's `solver` parameter.
pub fn solver(job: &MergeJob) -> linalg::Solver {
    linalg::Solver::from_name(job.shared.choice("solver"))
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

/// The top `k` singular triplets of task `t`'s matrix `a`: exact (by the method's solver), or
/// randomized when the method's `randomized_svd` parameter is set (sketch keyed by seed, tensor
/// and task).
pub fn top_k(job: &MergeJob, t: usize, a: faer::MatRef<'_, f32>, k: usize) -> Result<linalg::Svd> {
    if job.shared.b("randomized_svd") {
        let key = rng::Key::new(job.seed, job.name, t);
        linalg::truncated_svd(a, k, k.div_ceil(2).max(10), 2, key)
    } else {
        linalg::top_k(a, k, solver(job))
    }
    .map_err(|e| job.error(e))
}

/// Singular triplets placed side by side (`Û`, `ŝ`, `V̂` of TSV-M and Iso-CTS): `r` columns,
/// zero where nothing was placed.
pub struct Stacked {
    u: faer::Mat<f32>,
    s: Vec<f32>,
    v: faer::Mat<f32>,
    /// Columns `0..filled` hold placed triplets (they are placed from the left).
    filled: usize,
}

impl Stacked {
    /// Room for `r` triplets of an `m × n` matrix.
    pub fn new(m: usize, n: usize, r: usize) -> Self {
        Stacked {
            u: faer::Mat::zeros(m, r),
            s: vec![0.0; r],
            v: faer::Mat::zeros(n, r),
            filled: 0,
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
        self.filled = self.filled.max(at + k);
    }

    /// The values of all `r` columns (zeros where nothing was placed).
    pub fn spectrum(&self) -> &[f32] {
        &self.s
    }

    /// The values of the placed columns.
    pub fn placed(&self) -> &[f32] {
        &self.s[..self.filled]
    }

    /// The orthogonal polar factors of both bases (`Û⊥`, `V̂⊥`), placed columns only. The
    /// references take the polar factor of all `r` columns, zero ones included; the placed
    /// columns of that factor are the polar factor of the placed columns alone (the zero
    /// columns span the null space), and the others meet a zero value in `ŝ`.
    pub fn orthogonalised(&self, job: &MergeJob) -> Result<(faer::Mat<f32>, faer::Mat<f32>)> {
        let err = |e| job.error(e);
        let solver = solver(job);
        let k = self.filled;
        Ok((
            linalg::polar(self.u.as_ref().subcols(0, k), solver)
                .map_err(err)?
                .0,
            linalg::polar(self.v.as_ref().subcols(0, k), solver)
                .map_err(err)?
                .0,
        ))
    }
}

/// The edge cases of ALGORITHMS.md §1.9 and the invariants of §9 for the SVD methods.
#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    /// Run method `name` on in-memory tensors (input 0 is the base).
    fn run(
        name: &str,
        shape: &[usize],
        inputs: &[Vec<f32>],
        shared: &[(&'static str, Value)],
    ) -> Vec<f32> {
        let method = get(name).unwrap();
        let shared = super::super::shared_params(method, shared);
        let weight = Params {
            values: vec![("weight", Value::Float(1.0))],
        };
        let per_input = vec![weight; inputs.len()];
        let job = MergeJob {
            name: "t",
            shape,
            inputs: inputs.iter().map(|v| v.as_slice()).collect(),
            bf16: Vec::new(),
            base: Some(0),
            shared: &shared,
            per_input: &per_input,
            seed: 7,
            global: None,
        };
        let mut out = vec![0.0; inputs[0].len()];
        method.merge(&job, &mut out).unwrap();
        out
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let key = rng::Key::new(seed, "sub", 0);
        (0..n)
            .map(|i| (key.uniform(i as u64) - 0.5) as f32)
            .collect()
    }

    fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    fn delta(out: &[f32], base: &[f32]) -> Vec<f32> {
        out.iter().zip(base).map(|(o, b)| o - b).collect()
    }

    fn singular_values(x: &[f32], m: usize, n: usize) -> Vec<f32> {
        linalg::thin_svd(linalg::rows(x, m, n)).unwrap().s
    }

    const SVD_METHODS: [&str; 3] = ["iso_c", "iso_cts", "tsv_m"];

    #[test]
    fn iso_c_one_full_rank_task_flattens_its_spectrum() {
        let (m, n) = (6, 4);
        let base = random(m * n, 1);
        let tau = random(m * n, 2);
        let out = run("iso_c", &[m, n], &[base.clone(), add(&base, &tau)], &[]);
        let d = delta(&out, &base);
        let s = singular_values(&tau, m, n);
        let mean = s.iter().sum::<f32>() / s.len() as f32;
        for x in singular_values(&d, m, n) {
            assert!((x - mean).abs() < 1e-5 * mean, "{x} vs {mean}");
        }
        // Same singular vectors: Δ = mean·U Vᵀ of τ.
        let f = linalg::thin_svd(linalg::rows(&tau, m, n)).unwrap();
        let mut want = Mat::<f32>::zeros(m, n);
        linalg::compose(want.as_mut(), f.u.as_ref(), &vec![mean; n], f.v.as_ref());
        let err: f32 = (0..m * n)
            .map(|i| (d[i] - want[(i / n, i % n)]).powi(2))
            .sum();
        assert!(err.sqrt() < 1e-5 * mean);
    }

    #[test]
    fn tsv_m_one_task_returns_it_unchanged() {
        let (m, n) = (5, 7);
        let base = random(m * n, 3);
        let tau = random(m * n, 4);
        let ft = add(&base, &tau);
        let out = run("tsv_m", &[m, n], &[base, ft.clone()], &[]);
        for (o, f) in out.iter().zip(&ft) {
            assert!((o - f).abs() < 1e-5, "{o} vs {f}");
        }
    }

    #[test]
    fn all_zero_task_vectors_leave_the_base() {
        let (m, n) = (4, 6);
        let base = random(m * n, 5);
        for name in SVD_METHODS {
            let out = run(
                name,
                &[m, n],
                &[base.clone(), base.clone(), base.clone()],
                &[],
            );
            assert_eq!(out, base, "{name}");
        }
    }

    #[test]
    fn one_dimensional_tensors_are_averaged() {
        let base = random(8, 6);
        let a = add(&base, &random(8, 7));
        let b = add(&base, &random(8, 8));
        for name in SVD_METHODS {
            let out = run(
                name,
                &[8],
                &[base.clone(), a.clone(), b.clone()],
                &[("lambda", Value::Float(2.0))],
            );
            for i in 0..8 {
                let mean = ((a[i] - base[i]) + (b[i] - base[i])) / 2.0;
                assert!((out[i] - (base[i] + 2.0 * mean)).abs() < 1e-6, "{name}");
            }
        }
    }

    #[test]
    fn svd_false_averages_a_matrix() {
        let (m, n) = (3, 3);
        let base = random(9, 9);
        let a = add(&base, &random(9, 10));
        let out = run(
            "iso_c",
            &[m, n],
            &[base.clone(), a.clone()],
            &[("svd", Value::Bool(false))],
        );
        assert_eq!(out, a);
    }

    #[test]
    fn fewer_dimensions_than_tasks() {
        // r = 2 < T = 3: TSV-M's reference gives a zero update; amalgam averages instead.
        // Iso-CTS has no task-specific room and equals Iso-C.
        let (m, n) = (2, 5);
        let base = random(m * n, 11);
        let inputs: Vec<Vec<f32>> = std::iter::once(base.clone())
            .chain((0..3).map(|t| add(&base, &random(m * n, 12 + t))))
            .collect();
        let tsv = run("tsv_m", &[m, n], &inputs, &[]);
        let mean = run("tsv_m", &[m, n], &inputs, &[("svd", Value::Bool(false))]);
        assert_eq!(tsv, mean);
        let iso_c = run("iso_c", &[m, n], &inputs, &[]);
        let iso_cts = run("iso_cts", &[m, n], &inputs, &[]);
        for (a, b) in iso_c.iter().zip(&iso_cts) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn rank_deficient_sum_gets_the_mean_on_every_direction() {
        // Two rank-1 task vectors along the same direction: M has rank 1, so Iso-C's other
        // singular directions are whatever the SVD backend picks. What does not depend on
        // that choice: ‖Δ‖_F = σ̄·√r, and the known direction keeps weight σ̄.
        let (m, n) = (5, 4);
        let u = random(m, 13);
        let v = random(n, 14);
        let outer = |s: f32| -> Vec<f32> { (0..m * n).map(|i| s * u[i / n] * v[i % n]).collect() };
        let base = random(m * n, 15);
        let inputs = vec![
            base.clone(),
            add(&base, &outer(1.0)),
            add(&base, &outer(2.0)),
        ];
        let d = delta(&run("iso_c", &[m, n], &inputs, &[]), &base);
        assert!(d.iter().all(|x| x.is_finite()));
        let sigma = 3.0 * norm(&u) as f32 * norm(&v) as f32;
        let mean = sigma / n as f32;
        let fro = norm(&d) as f32;
        assert!((fro - mean * (n as f32).sqrt()).abs() < 1e-4 * fro, "{fro}");
        let (nu, nv) = (norm(&u) as f32, norm(&v) as f32);
        let along: f32 = (0..m * n).map(|i| d[i] * u[i / n] * v[i % n]).sum::<f32>() / (nu * nv);
        assert!((along - mean).abs() < 1e-4 * mean, "{along} vs {mean}");
        for name in ["iso_cts", "tsv_m"] {
            let out = run(name, &[m, n], &inputs, &[]);
            assert!(out.iter().all(|x| x.is_finite()), "{name}");
        }
    }

    #[test]
    fn randomized_top_k_is_reproducible_and_close_on_a_decaying_spectrum() {
        // Low-rank task vectors (rank 3 each in a 40 × 30 matrix): the randomized sketch
        // captures them, so the merge matches the exact one.
        let (m, n) = (40, 30);
        let base = random(m * n, 16);
        let low_rank = |seed: u64| -> Vec<f32> {
            let a = random(m * 3, seed);
            let b = random(3 * n, seed + 100);
            (0..m * n)
                .map(|i| (0..3).map(|r| a[(i / n) * 3 + r] * b[r * n + i % n]).sum())
                .collect()
        };
        let inputs: Vec<Vec<f32>> = std::iter::once(base.clone())
            .chain((0..3).map(|t| add(&base, &low_rank(20 + t))))
            .collect();
        let exact = run("iso_cts", &[m, n], &inputs, &[]);
        let fast = run(
            "iso_cts",
            &[m, n],
            &inputs,
            &[("randomized_svd", Value::Bool(true))],
        );
        let again = run(
            "iso_cts",
            &[m, n],
            &inputs,
            &[("randomized_svd", Value::Bool(true))],
        );
        assert_eq!(fast, again);
        let diff: Vec<f32> = exact.iter().zip(&fast).map(|(a, b)| a - b).collect();
        assert!(norm(&diff) < 1e-3 * norm(&delta(&exact, &base)));
    }

    #[test]
    fn gram_and_svd_solvers_agree_on_gaussian_task_vectors() {
        // Flat (Marchenko–Pastur) spectra: square sums are ill-conditioned (the polar factors
        // fall back to the SVD), tall ones are not, truncations are within the bound.
        for (m, n) in [(96, 96), (240, 64), (64, 240)] {
            let base = random(m * n, 30);
            let inputs: Vec<Vec<f32>> = std::iter::once(base.clone())
                .chain((0..4).map(|t| add(&base, &random(m * n, 31 + t))))
                .collect();
            for name in SVD_METHODS {
                let svd = run(name, &[m, n], &inputs, &[("solver", Value::Choice("svd"))]);
                let auto = run(name, &[m, n], &inputs, &[]);
                let diff: Vec<f32> = auto.iter().zip(&svd).map(|(a, b)| a - b).collect();
                let rel = norm(&diff) / norm(&delta(&svd, &base));
                assert!(rel < 1e-4, "{name} {m}x{n}: {rel}");
            }
        }
    }
}
