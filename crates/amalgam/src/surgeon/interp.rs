//! mergekit's `common_interpolation` (`tokensurgeon/common_interpolation.py`): each new token is
//! a weighted sum of the model rows of its `k` nearest shared tokens, nearest by the donor's
//! rows (euclidean, or `1 − cos`), weighted in proportion to inverse distance (cosine: the
//! similarity), by barycentric coordinates, or by least squares. In f64 (mergekit: f32).

use faer::Mat;
use faer::linalg::solvers::SolveLstsq;

use super::matrix::Rows;

/// How the neighbours are weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weighting {
    /// `1/max(d, 1e-6)` (cosine: `1 − d`), normalised to sum 1 (the sum floored at 1e-6).
    DistanceProportional,
    /// The affine combination of the neighbours closest to the target: the least-squares
    /// solution of `[[P Pᵀ, 1], [1ᵀ, 0]] [w; μ] = [P y; 1]`.
    Barycentric,
    /// The least-squares fit of the target on its neighbours, `min ‖Pᵀw − y‖`.
    LeastSquares,
}

/// One target's neighbours (indices into the dictionary) and their weights.
pub struct Fit {
    /// Indices into the dictionary.
    pub picked: Vec<usize>,
    /// Weights.
    pub weights: Vec<f64>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Least-squares solution of `a x = b` (minimum norm when `a` has more columns than rows).
fn lstsq(a: &Mat<f64>, b: &[f64]) -> Vec<f64> {
    let rhs = Mat::from_fn(b.len(), 1, |i, _| b[i]);
    if a.nrows() >= a.ncols() {
        let x = a.col_piv_qr().solve_lstsq(&rhs);
        (0..a.ncols()).map(|i| x[(i, 0)]).collect()
    } else {
        // x = aᵀ z with (a aᵀ) z = b.
        let aat = a * a.transpose();
        let z = aat.col_piv_qr().solve_lstsq(&rhs);
        let x = a.transpose() * &z;
        (0..a.ncols()).map(|i| x[(i, 0)]).collect()
    }
}

/// Neighbours and weights of each target among `dict`'s rows; `k ≤ dict.len()` (checked by
/// the caller).
pub fn interp<T: Copy + Into<f64> + Sync>(
    targets: &[Vec<f64>],
    dict: &Rows<T>,
    k: usize,
    cosine: bool,
    weighting: Weighting,
) -> Vec<Fit> {
    use rayon::prelude::*;
    let n = dict.len();
    let norms = dict.norms();
    targets
        .par_iter()
        .map(|y| {
            let yn = dot(y, y).sqrt();
            let dist: Vec<f64> = (0..n)
                .map(|j| {
                    let p = dict.row(j);
                    if cosine {
                        let xy: f64 = y.iter().zip(p).map(|(a, &b)| a * b.into()).sum();
                        1.0 - xy / (yn * norms[j]).max(1e-6)
                    } else {
                        y.iter()
                            .zip(p)
                            .map(|(a, &b)| (a - b.into()).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
            order.truncate(k);
            let rows: Vec<Vec<f64>> = order
                .iter()
                .map(|&j| dict.row(j).iter().map(|&x| x.into()).collect())
                .collect();
            let weights = match weighting {
                Weighting::DistanceProportional => {
                    let w: Vec<f64> = order
                        .iter()
                        .map(|&j| {
                            if cosine {
                                1.0 - dist[j]
                            } else {
                                1.0 / dist[j].max(1e-6)
                            }
                        })
                        .collect();
                    let s = w.iter().sum::<f64>().max(1e-6);
                    w.into_iter().map(|x| x / s).collect()
                }
                Weighting::Barycentric => {
                    let m = Mat::from_fn(k + 1, k + 1, |i, j| match (i < k, j < k) {
                        (true, true) => dot(&rows[i], &rows[j]),
                        (false, false) => 0.0,
                        _ => 1.0,
                    });
                    let mut b: Vec<f64> = rows.iter().map(|r| dot(r, y)).collect();
                    b.push(1.0);
                    let mut w = lstsq(&m, &b);
                    w.truncate(k);
                    w
                }
                Weighting::LeastSquares => {
                    let pt = Mat::from_fn(y.len(), k, |i, j| rows[j][i]);
                    lstsq(&pt, y)
                }
            };
            Fit {
                picked: order,
                weights,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict() -> Rows<f64> {
        Rows {
            data: vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 5.0, 5.0],
            cols: 2,
        }
    }

    #[test]
    fn nearest_rows_weighted_by_inverse_distance() {
        let f = interp(
            &[vec![0.25, 0.0]],
            &dict(),
            2,
            false,
            Weighting::DistanceProportional,
        );
        assert_eq!(f[0].picked, [0, 1]);
        // distances 0.25 and 0.75: weights 4 and 4/3, normalised.
        assert!((f[0].weights[0] - 0.75).abs() < 1e-12);
        assert!((f[0].weights[1] - 0.25).abs() < 1e-12);
    }

    #[test]
    fn barycentric_and_least_squares_reproduce_a_point_in_the_span() {
        let y = vec![0.3, 0.6];
        for w in [Weighting::Barycentric, Weighting::LeastSquares] {
            let f = interp(std::slice::from_ref(&y), &dict(), 3, false, w);
            let mut got = [0.0; 2];
            for (&j, &c) in f[0].picked.iter().zip(&f[0].weights) {
                got[0] += c * dict().row(j)[0];
                got[1] += c * dict().row(j)[1];
            }
            assert!(
                (got[0] - 0.3).abs() < 1e-12 && (got[1] - 0.6).abs() < 1e-12,
                "{w:?} {got:?}"
            );
            if w == Weighting::Barycentric {
                assert!((f[0].weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }
}
