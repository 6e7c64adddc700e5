//! `regmean`: Regression Mean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging
//! Weights of Language Models"; ALGORITHMS.md and research/data-driven-merging.md §1).
//!
//! Every linear weight `W` (`out × in`) whose input Gram matrices `Gᵢ` (`in × in`, measured by
//! `amalgam measure --stats gram`) the models' stats files hold is merged as the least-squares
//! fit to every model's outputs on its own inputs:
//! `Wᵀ = (Σᵢ wᵢ G̃ᵢ)⁻¹ Σᵢ wᵢ G̃ᵢ Wᵢᵀ` with `G̃ = α·G + (1 − α)·diag(G)` (the references'
//! "reduce non-diagonal elements"; `alpha: 1` is plain RegMean). Every other tensor (biases,
//! norms, embeddings, layers the measurement did not run) is the `w`-weighted mean, as in the
//! references. The system is solved by Cholesky in f64 (the references invert the sum in f32);
//! a singular sum (fewer measured token positions than input features, or a feature that is
//! always zero) is an error naming the tensor, not a solution of rounding noise: with
//! `alpha < 1` only the diagonal must be positive.
//! The base model, if given, is not merged.

use super::*;
use crate::config::Kind;
use crate::stats;

/// RegMean.
pub struct RegMean(MethodSpec);

impl Default for RegMean {
    fn default() -> Self {
        RegMean(MethodSpec {
            name: "regmean",
            pretty_name: "RegMean",
            reference: "https://arxiv.org/abs/2212.09849",
            params: vec![
                ParamSpec::new("alpha", Kind::Float, Scope::Shared, Value::Float(0.9)),
                ParamSpec::new("weight", Kind::Float, Scope::NonBase, Value::Float(1.0)),
            ],
            contract: Contract {
                base: BasePolicy::Optional,
                min_non_base: 1,
                ..Contract::ANY
            },
        })
    }
}

impl Method for RegMean {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn lazy(&self) -> Option<&dyn Lazy> {
        Some(self)
    }

    fn stats_kind(&self) -> Option<stats::Kind> {
        Some(stats::Kind::Gram)
    }
}

/// The merged models' indices and their weights `wᵢ`, checked.
pub(crate) fn model_weights(job: &MergeJob) -> Result<(Vec<usize>, Vec<f64>)> {
    let models = job.non_base();
    let w: Vec<f64> = models
        .iter()
        .map(|&i| job.per_input[i].f("weight"))
        .collect();
    if let Some(bad) = w.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(job.error(format!("weight must be a finite number ≥ 0, got {bad}")));
    }
    if w.iter().sum::<f64>() <= 0.0 {
        return Err(job.error("the weights sum to zero"));
    }
    Ok((models, w))
}

/// `out = Σ wᵢθᵢ / Σ wᵢ` over `models`.
pub(crate) fn weighted_mean(
    inputs: &dyn Inputs,
    models: &[usize],
    w: &[f64],
    out: &mut [f32],
) -> Result<()> {
    let mut acc = vec![0f64; out.len()];
    let mut buf = Vec::new();
    for (&k, &wk) in models.iter().zip(w) {
        inputs.read(k, &mut buf)?;
        for (a, &x) in acc.iter_mut().zip(&buf) {
            *a += wk * f64::from(x);
        }
    }
    let total: f64 = w.iter().sum();
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / total) as f32;
    }
    Ok(())
}

impl Lazy for RegMean {
    fn merge(&self, job: &MergeJob, inputs: &dyn Inputs, out: &mut [f32]) -> Result<()> {
        let alpha = job.shared.f("alpha");
        if !(0.0..=1.0).contains(&alpha) {
            return Err(job.error(format!("regmean: alpha must be in [0, 1], got {alpha}")));
        }
        let (models, w) = model_weights(job)?;
        let &[rows, cols] = job.shape else {
            return weighted_mean(inputs, &models, &w, out);
        };
        let mut grams = Vec::with_capacity(models.len());
        for &k in &models {
            grams.push(inputs.stat(k, stats::Kind::Gram, &[cols, cols])?);
        }
        match grams.iter().filter(|g| g.is_some()).count() {
            0 => return weighted_mean(inputs, &models, &w, out),
            n if n < models.len() => {
                return Err(job.error(
                    "regmean: some models' stats files hold a Gram matrix for this weight and \
                     others do not; measure every model with the same amalgam version and data \
                     layout",
                ));
            }
            _ => {}
        }
        // A = Σ wᵢ G̃ᵢ (in × in), B = Σ wᵢ G̃ᵢ Wᵢᵀ (in × out).
        let mut a = faer::Mat::<f64>::zeros(cols, cols);
        let mut b = faer::Mat::<f64>::zeros(cols, rows);
        let mut buf = Vec::new();
        for ((&k, &wk), g) in models.iter().zip(&w).zip(grams) {
            let g = g.expect("counted above");
            let reduced = faer::Mat::<f64>::from_fn(cols, cols, |i, j| {
                let v = g[i * cols + j];
                wk * if i == j { v } else { alpha * v }
            });
            inputs.read(k, &mut buf)?;
            let wt = faer::Mat::<f64>::from_fn(cols, rows, |i, j| f64::from(buf[j * cols + i]));
            faer::linalg::matmul::matmul(
                b.as_mut(),
                faer::Accum::Add,
                reduced.as_ref(),
                wt.as_ref(),
                1.0,
                crate::linalg::par(),
            );
            a += &reduced;
        }
        let singular = |index: usize| {
            job.error(format!(
                "regmean: the summed Gram matrices are singular (input feature {index} is \
                 zero or linearly dependent on the others over every measured row); measure \
                 more rows, or lower alpha below 1 so that only the diagonal must be positive"
            ))
        };
        let top = (0..cols).map(|i| a[(i, i)]).fold(0.0, f64::max);
        let llt = a.llt(faer::Side::Lower).map_err(|e| match e {
            faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index } => {
                singular(index)
            }
        })?;
        // Rounding can leave a tiny positive pivot where the matrix is singular: a pivot below
        // 1e-12 of the largest diagonal entry (relative to f64's 1e-16) is treated as zero.
        if let Some(i) = (0..cols).find(|&i| llt.L()[(i, i)].powi(2) <= 1e-12 * top) {
            return Err(singular(i));
        }
        use faer::linalg::solvers::Solve;
        llt.solve_in_place(b.as_mut());
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            for (c, o) in row.iter_mut().enumerate() {
                *o = b[(c, r)] as f32;
            }
        }
        Ok(())
    }
}
