//! `tsv_c`: Task Singular Vectors, compression form (Gargiulo et al. 2025; ALGORITHMS.md §6.3).
//!
//! For each matrix (2-D tensor) and task: the top `k` singular triplets of `τ_t`, stored as
//! `u = U_k diag(σ_k)` (part `u`, `m × k`) and `v = V_kᵀ` (part `v`, `k × n`) in `factor_dtype`
//! (float32 by default). `k = ⌊min(m, n)/T⌋` (the authors' code), or `rank: K`, or with
//! `energy: e` the smallest `k` holding that fraction of `‖τ_t‖²_F` (at most `rank` when both
//! are given). Other tensors are stored as they are (`raw`). Rebuild: `θ0 + u·v`, at
//! coefficient one. The SVD is exact (faer's thin SVD, f32) unless `randomized_svd: true`
//! (seeded range finder, fixed `k` only), and reads each tensor's inputs whole, one task at a
//! time.

use super::scheme::{self, Decoder, Encoded, Parts, Scheme, TensorInputs};
use crate::config::{Kind, Value};
use crate::dtype::{DType, decode_f32};
use crate::error::{Error, Result};
use crate::linalg;
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};

/// The TSV-C scheme.
pub struct TsvC {
    spec: MethodSpec,
}

impl Default for TsvC {
    fn default() -> Self {
        TsvC {
            spec: scheme::spec(
                "tsv_c",
                "Task Singular Vectors (compression)",
                "https://arxiv.org/abs/2412.00081",
                vec![
                    ParamSpec::new("rank", Kind::Int, Scope::Shared, Value::Int(0)),
                    ParamSpec::new("energy", Kind::OptionalFloat, Scope::Shared, Value::None),
                    factor_dtype_param(),
                    ParamSpec::new(
                        "randomized_svd",
                        Kind::Bool,
                        Scope::Shared,
                        Value::Bool(false),
                    ),
                ],
            ),
        }
    }
}

/// `factor_dtype`: how low-rank factors are stored.
pub(crate) fn factor_dtype_param() -> ParamSpec {
    scheme::choice("factor_dtype", &["float32", "bfloat16", "float16"])
}

impl Method for TsvC {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

/// The dtype of `factor_dtype`.
pub(crate) fn factor_dtype(job: &MergeJob) -> DType {
    DType::parse_float(job.shared.choice("factor_dtype")).unwrap_or(DType::F32)
}

/// How a matrix is factored.
pub(crate) struct Factoring {
    /// Rank (the cap, with `energy`).
    pub(crate) k: usize,
    /// The smallest rank holding this fraction of the squared norm, if set.
    pub(crate) energy: Option<f64>,
    /// A seeded randomized SVD instead of the exact one (fixed rank only).
    pub(crate) randomized: bool,
    /// The factors' storage dtype.
    pub(crate) dtype: DType,
}

/// Factor `tau` (`m × n`, row-major) as `how` says, store the factors as task `task`'s parts
/// `u`, `v`, and return `u·v` as stored (to measure the error).
pub(crate) fn store_factors(
    job: &MergeJob,
    tau: &[f32],
    (m, n): (usize, usize),
    how: &Factoring,
    task: usize,
    out: &mut dyn Encoded,
) -> Result<Vec<f32>> {
    let Factoring {
        k,
        energy,
        randomized,
        dtype,
    } = *how;
    let a = linalg::rows(tau, m, n);
    let numeric = |e: String| Error::Numeric {
        name: job.name.to_string(),
        reason: e,
    };
    let svd = match energy {
        None if randomized => {
            let key = crate::methods::rng::Key::new(job.seed, job.name, task);
            linalg::truncated_svd(a, k, 10, 2, key).map_err(numeric)?
        }
        None => linalg::truncate(linalg::thin_svd(a).map_err(numeric)?, k),
        Some(e) => {
            let full = linalg::thin_svd(a).map_err(numeric)?;
            let total: f64 = full.s.iter().map(|&s| (s as f64) * (s as f64)).sum();
            let mut kept = 0.0f64;
            let mut r = 0;
            while r < full.s.len() && r < k && kept < e * total {
                kept += (full.s[r] as f64) * (full.s[r] as f64);
                r += 1;
            }
            linalg::truncate(full, r)
        }
    };
    let r = svd.s.len();
    let mut u = vec![0.0f32; m * r];
    for i in 0..m {
        for j in 0..r {
            u[i * r + j] = svd.u[(i, j)] * svd.s[j];
        }
    }
    let mut v = vec![0.0f32; r * n];
    for j in 0..r {
        for c in 0..n {
            v[j * n + c] = svd.v[(c, j)];
        }
    }
    let (u, u_bytes) = scheme::stored_as(&u, dtype);
    let (v, v_bytes) = scheme::stored_as(&v, dtype);
    out.task(task, "u", dtype, vec![m, r], u_bytes)?;
    out.task(task, "v", dtype, vec![r, n], v_bytes)?;
    let mut rebuilt = vec![0.0f32; m * n];
    if r > 0 {
        linalg::matmul(
            linalg::rows_mut(&mut rebuilt, m, n),
            linalg::rows(&u, m, r),
            linalg::rows(&v, r, n),
        );
    }
    Ok(rebuilt)
}

impl Scheme for TsvC {
    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        if job.shared.i("rank") < 0 {
            return Err(format!(
                "parameter 'rank' is {} for tensor '{}'; it must be ≥ 1 (0: ⌊min(m, n)/tasks⌋)",
                job.shared.i("rank"),
                job.name
            ));
        }
        if job.shared.opt_f("energy").is_some() {
            let e = scheme::in_range(job, job.shared, "energy", 0.0, 1.0)?;
            if e == 0.0 {
                return Err(format!(
                    "parameter 'energy' must be above 0 (tensor '{}')",
                    job.name
                ));
            }
        }
        Ok(())
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let tasks = job.non_base();
        if scheme::raw_unless_matrix(job, inputs, out)? {
            return Ok(());
        }
        let (m, n) = scheme::matrix(job.shape).expect("a matrix");
        let energy = job.shared.opt_f("energy");
        let k = match job.shared.i("rank") as usize {
            0 if energy.is_some() => m.min(n),
            0 => m.min(n) / tasks.len(),
            r => r.min(m.min(n)),
        };
        let (mut base, mut tau) = (Vec::new(), Vec::new());
        inputs.whole(job.base.expect("contract: a base"), &mut base)?;
        for (t, &i) in tasks.iter().enumerate() {
            inputs.whole(i, &mut tau)?;
            tau.iter_mut().zip(&base).for_each(|(x, b)| *x -= b);
            if tau.iter().all(|&x| x == 0.0) {
                continue;
            }
            let how = Factoring {
                k,
                energy,
                randomized: job.shared.b("randomized_svd"),
                dtype: factor_dtype(job),
            };
            let rebuilt = store_factors(job, &tau, (m, n), &how, t, out)?;
            out.stats(t).observe(&rebuilt, &tau);
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        match LowRank::of(parts, shape)? {
            Some(lr) => Ok(Box::new(lr)),
            None => Ok(Box::new(scheme::Unchanged)),
        }
    }
}

/// Decoded factors `u` (`m × r`) and `v` (`r × n`) of one tensor; rebuilds `base + u·v`.
pub(crate) struct LowRank {
    u: Vec<f32>,
    v: Vec<f32>,
    r: usize,
    n: usize,
    row: Vec<f32>,
}

impl LowRank {
    /// The task's factors of a tensor of `shape`, if it stores them.
    pub(crate) fn of(parts: &dyn Parts, shape: &[usize]) -> Result<Option<LowRank>> {
        let Some(u_bytes) = parts.task("u")? else {
            return Ok(None);
        };
        let (m, n) = scheme::matrix(shape)
            .ok_or_else(|| parts.corrupt("low-rank factors on a tensor that is not 2-D".into()))?;
        let v_bytes = parts
            .task("v")?
            .ok_or_else(|| parts.corrupt("its factor 'v' is missing".into()))?;
        let (us, vs) = (parts.task_shape("u"), parts.task_shape("v"));
        let r = match (us, vs) {
            (Some(&[um, ur]), Some(&[vr, vn])) if um == m && vn == n && ur == vr => ur,
            _ => {
                return Err(parts.corrupt(format!(
                    "factors of shapes {us:?} and {vs:?} do not make a {m} × {n} matrix"
                )));
            }
        };
        let decode = |suffix: &str, bytes: &[u8]| -> Result<Vec<f32>> {
            let dtype = parts.task_dtype(suffix).expect("part exists");
            let mut out = Vec::new();
            if !dtype.is_float() || !decode_f32(dtype, bytes, &mut out) {
                return Err(parts.corrupt(format!("its factor '{suffix}' is not a float tensor")));
            }
            Ok(out)
        };
        Ok(Some(LowRank {
            u: decode("u", u_bytes)?,
            v: decode("v", v_bytes)?,
            r,
            n,
            row: Vec::new(),
        }))
    }

    /// Add `(u·v)[range]` to `out`.
    pub(crate) fn add(&mut self, range: std::ops::Range<usize>, out: &mut [f32]) {
        let n = self.n;
        let mut e = range.start;
        while e < range.end {
            let (i, c0) = (e / n, e % n);
            let c1 = n.min(c0 + (range.end - e));
            self.row.clear();
            self.row.resize(c1 - c0, 0.0);
            for j in 0..self.r {
                let w = self.u[i * self.r + j];
                let v = &self.v[j * n + c0..j * n + c1];
                self.row.iter_mut().zip(v).for_each(|(a, &x)| *a += w * x);
            }
            let at = e - range.start;
            out[at..at + (c1 - c0)]
                .iter_mut()
                .zip(&self.row)
                .for_each(|(o, &d)| *o += d);
            e += c1 - c0;
        }
    }
}

impl Decoder for LowRank {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        out.copy_from_slice(base);
        self.add(range, out);
        Ok(())
    }
}
