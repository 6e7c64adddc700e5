//! Calibrated per-sequence routers (Twin-Merging's): a classifier from the shared model's
//! mean-pooled last hidden states to the task an input belongs to, fitted on a few hundred
//! task-labelled inputs (task ids only; the tasks' own labels are never read). Nothing is
//! backpropagated through the model: the features are fixed.
//!
//! - [`Classifier::Centroid`]: the nearest task centroid by cosine similarity (features
//!   L2-normalised, the centroid the normalised mean of its task's features); its scores are
//!   the cosines.
//! - [`Classifier::Logistic`]: multinomial logistic regression on standardised features (each
//!   feature's calibration mean and standard deviation), L2-penalised, fitted by full-batch
//!   gradient descent with Nesterov momentum from zero at step `1/L` (`L` the smoothness bound
//!   `λmax(XᵀX)/(2n) + penalty`); its scores are the logits.
//!
//! Both are deterministic: the same rows give the same router, bit for bit, on any thread
//! count (every sum runs in row order).

use serde::Serialize;

use crate::error::{Error, Result};

/// Fewest calibration rows a task may have.
pub const MIN_ROWS: usize = 8;

/// Which classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Classifier {
    /// Nearest centroid (cosine).
    Centroid,
    /// Multinomial logistic regression.
    Logistic,
}

impl std::str::FromStr for Classifier {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "centroid" => Ok(Classifier::Centroid),
            "logistic" => Ok(Classifier::Logistic),
            other => Err(format!(
                "unknown router classifier '{other}' (expected centroid or logistic)"
            )),
        }
    }
}

/// A fitted router over `classes` tasks and `dim` features.
#[derive(Clone, Debug)]
pub struct Router {
    kind: Classifier,
    classes: usize,
    dim: usize,
    /// Centroid: unit centroids, `classes × dim`. Logistic: weights `classes × dim` on the
    /// standardised features.
    weights: Vec<f64>,
    /// Logistic: biases.
    bias: Vec<f64>,
    /// Logistic: feature means and inverse standard deviations.
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

/// L2 penalty of the logistic regression (on standardised features).
const PENALTY: f64 = 1e-3;
/// Gradient steps of the logistic regression.
const STEPS: usize = 500;

fn unit(v: &[f32]) -> Vec<f64> {
    let n = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let n = if n > 0.0 { n } else { 1.0 };
    v.iter().map(|&x| f64::from(x) / n).collect()
}

impl Router {
    /// Fit on `features[i]` labelled `labels[i]` (task indices below `classes`).
    pub fn fit(
        kind: Classifier,
        features: &[Vec<f32>],
        labels: &[usize],
        classes: usize,
    ) -> Result<Router> {
        let dim = features.first().map_or(0, Vec::len);
        if features.is_empty() || features.iter().any(|f| f.len() != dim) || dim == 0 {
            return Err(Error::Argument(
                "router calibration needs feature vectors of one width".into(),
            ));
        }
        let mut counts = vec![0usize; classes];
        for &l in labels {
            counts[l] += 1;
        }
        if let Some(c) = counts.iter().position(|&n| n == 0) {
            return Err(Error::Argument(format!(
                "router calibration has no rows for task {c}"
            )));
        }
        Ok(match kind {
            Classifier::Centroid => {
                let mut sums = vec![0f64; classes * dim];
                for (f, &l) in features.iter().zip(labels) {
                    for (s, v) in sums[l * dim..(l + 1) * dim].iter_mut().zip(unit(f)) {
                        *s += v;
                    }
                }
                let weights = sums
                    .chunks(dim)
                    .flat_map(|c| {
                        let c: Vec<f32> = c.iter().map(|&v| v as f32).collect();
                        unit(&c)
                    })
                    .collect();
                Router {
                    kind,
                    classes,
                    dim,
                    weights,
                    bias: vec![0.0; classes],
                    mean: Vec::new(),
                    inv_std: Vec::new(),
                }
            }
            Classifier::Logistic => fit_logistic(features, labels, classes, dim),
        })
    }

    /// The classifier.
    pub fn kind(&self) -> Classifier {
        self.kind
    }

    /// Scores per task for one feature vector (cosines or logits).
    pub fn scores(&self, f: &[f32]) -> Vec<f64> {
        let x: Vec<f64> = match self.kind {
            Classifier::Centroid => unit(f),
            Classifier::Logistic => f
                .iter()
                .enumerate()
                .map(|(j, &v)| (f64::from(v) - self.mean[j]) * self.inv_std[j])
                .collect(),
        };
        (0..self.classes)
            .map(|c| {
                let w = &self.weights[c * self.dim..(c + 1) * self.dim];
                self.bias[c] + w.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect()
    }

    /// Task probabilities: softmax of the scores (centroid cosines at temperature 0.05, so
    /// that a clear nearest centroid takes nearly all the weight).
    pub fn probabilities(&self, f: &[f32]) -> Vec<f64> {
        let s = self.scores(f);
        let t = match self.kind {
            Classifier::Centroid => 0.05,
            Classifier::Logistic => 1.0,
        };
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| ((v - max) / t).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|v| v / sum).collect()
    }
}

fn fit_logistic(features: &[Vec<f32>], labels: &[usize], classes: usize, dim: usize) -> Router {
    let n = features.len();
    let mut mean = vec![0f64; dim];
    for f in features {
        for (m, &v) in mean.iter_mut().zip(f) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0f64; dim];
    for f in features {
        for ((s, &v), m) in var.iter_mut().zip(f).zip(&mean) {
            *s += (f64::from(v) - m).powi(2);
        }
    }
    let inv_std: Vec<f64> = var
        .iter()
        .map(|&s| {
            let sd = (s / n as f64).sqrt();
            if sd > 1e-12 { 1.0 / sd } else { 0.0 }
        })
        .collect();
    let x: Vec<f64> = features
        .iter()
        .flat_map(|f| {
            f.iter()
                .enumerate()
                .map(|(j, &v)| (f64::from(v) - mean[j]) * inv_std[j])
                .collect::<Vec<_>>()
        })
        .collect();
    // Smoothness: the softmax loss's Hessian is at most ½·XᵀX/n (with the bias column).
    let lmax = top_eigenvalue(&x, n, dim);
    let step = 1.0 / (0.5 * (lmax + 1.0) / n as f64 + PENALTY);
    let width = dim + 1;
    let mut w = vec![0f64; classes * width];
    let mut prev = w.clone();
    let mut grad = vec![0f64; classes * width];
    let mut p = vec![0f64; classes];
    for it in 0..STEPS {
        // Nesterov: evaluate at the look-ahead point.
        let beta = it as f64 / (it as f64 + 3.0);
        let look: Vec<f64> = w
            .iter()
            .zip(&prev)
            .map(|(a, b)| a + beta * (a - b))
            .collect();
        grad.iter_mut().for_each(|g| *g = 0.0);
        for (r, &l) in labels.iter().enumerate() {
            let row = &x[r * dim..(r + 1) * dim];
            for c in 0..classes {
                let wc = &look[c * width..(c + 1) * width];
                p[c] = wc[dim] + wc[..dim].iter().zip(row).map(|(a, b)| a * b).sum::<f64>();
            }
            let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            p.iter_mut().for_each(|v| {
                *v = (*v - max).exp();
                sum += *v;
            });
            for c in 0..classes {
                let d = p[c] / sum - if c == l { 1.0 } else { 0.0 };
                let g = &mut grad[c * width..(c + 1) * width];
                for (gj, xj) in g[..dim].iter_mut().zip(row) {
                    *gj += d * xj;
                }
                g[dim] += d;
            }
        }
        prev.clone_from(&w);
        for (k, (wk, gk)) in w.iter_mut().zip(&grad).enumerate() {
            let penalty = if k % width == dim {
                0.0
            } else {
                PENALTY * look[k]
            };
            *wk = look[k] - step * (gk / n as f64 + penalty);
        }
    }
    let mut weights = vec![0f64; classes * dim];
    let mut bias = vec![0f64; classes];
    for c in 0..classes {
        weights[c * dim..(c + 1) * dim].copy_from_slice(&w[c * width..c * width + dim]);
        bias[c] = w[c * width + dim];
    }
    Router {
        kind: Classifier::Logistic,
        classes,
        dim,
        weights,
        bias,
        mean,
        inv_std,
    }
}

/// The largest eigenvalue of `XᵀX` (`x` is `n × d`), by 100 power iterations from the ones
/// vector (an upper estimate is all the step size needs; 10 % headroom is added).
fn top_eigenvalue(x: &[f64], n: usize, d: usize) -> f64 {
    let mut v = vec![1.0 / (d as f64).sqrt(); d];
    let mut lambda = 0.0;
    for _ in 0..100 {
        let xv: Vec<f64> = (0..n)
            .map(|r| {
                x[r * d..(r + 1) * d]
                    .iter()
                    .zip(&v)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect();
        let mut w = vec![0f64; d];
        for r in 0..n {
            for (wj, xj) in w.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                *wj += xv[r] * xj;
            }
        }
        let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        lambda = norm;
        v = w.into_iter().map(|a| a / norm).collect();
    }
    1.1 * lambda
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two well-separated clusters per class in 3 dimensions.
    fn data() -> (Vec<Vec<f32>>, Vec<usize>) {
        let centres = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut f = Vec::new();
        let mut l = Vec::new();
        for i in 0..30 {
            let c = i % 3;
            let jitter = (i as f32 * 0.37).sin() * 0.2;
            let mut v = centres[c];
            v[(c + 1) % 3] += jitter;
            f.push(v.to_vec());
            l.push(c);
        }
        (f, l)
    }

    #[test]
    fn both_classifiers_separate_separable_tasks() {
        let (f, l) = data();
        for kind in [Classifier::Centroid, Classifier::Logistic] {
            let r = Router::fit(kind, &f, &l, 3).unwrap();
            for (x, &want) in f.iter().zip(&l) {
                let p = r.probabilities(x);
                let got = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
                assert_eq!(got, want, "{kind:?}");
                assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn a_task_without_rows_is_an_error() {
        let (f, l) = data();
        let err = Router::fit(Classifier::Logistic, &f, &l, 4).unwrap_err();
        assert!(err.to_string().contains("no rows for task 3"), "{err}");
    }
}
