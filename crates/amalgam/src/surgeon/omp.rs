//! Orthogonal matching pursuit as mergekit's `batch_omp` runs it (`tokensurgeon/omp.py`): for
//! each target, `k` greedy steps, each picking the unselected dictionary row with the largest
//! |⟨residual, row⟩| over the raw (unnormalised) rows (the lowest index on ties), extending a
//! classical Gram–Schmidt QR of the picked rows by one projection, and recomputing the residual
//! from scratch, `r = y − Q(Qᵀy)`; every 256 steps Q is re-orthogonalised by a QR. The
//! coefficients are `R⁻¹Qᵀy`, the least-squares fit of the target on its picked rows.
//!
//! The picks and the fit are f64 (mergekit: f32 unless the donor is f64, and its f32 picks
//! differ from exact ones where the best two candidates are within about 1e-5 relative, as on
//! 4 of 512 tokens of `bench/tokensurgeon.sh`); the correlations that screen the candidates
//! are f32 with a rigorous error bound ([`omp`]). Targets run in lock-step batches so each
//! step's correlations are one matrix product.

use faer::{Accum, Mat, Par};
use rayon::prelude::*;

use super::matrix::Rows;

/// Mergekit's floor on a new basis vector's norm.
const EPS: f64 = 1e-8;
/// Steps between re-orthogonalisations (mergekit's `reorthogonalize_interval`).
const REORTH: usize = 256;
/// Dictionary rows per matrix product.
const BLOCK: usize = 2048;

/// One target's fit: the picked dictionary rows, in order, and their coefficients.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    /// Indices into the dictionary.
    pub picked: Vec<usize>,
    /// Coefficient of each picked row.
    pub coeffs: Vec<f64>,
}

struct State {
    y: Vec<f64>,
    r: Vec<f64>,
    /// Basis vectors, one per step, each of length d.
    q: Vec<Vec<f64>>,
    /// Upper triangle, by column: `rr[t]` holds R[0..=t, t].
    rr: Vec<Vec<f64>>,
    picked: Vec<usize>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

impl State {
    fn new(y: Vec<f64>) -> State {
        State {
            r: y.clone(),
            y,
            q: Vec::new(),
            rr: Vec::new(),
            picked: Vec::new(),
        }
    }

    /// Add dictionary row `j` (`atom`) to the basis and recompute the residual.
    fn step(&mut self, j: usize, atom: &[f64]) {
        let t = self.q.len();
        self.picked.push(j);
        let (v, mut col) = if t == 0 {
            (atom.to_vec(), Vec::new())
        } else {
            let p: Vec<f64> = self.q.iter().map(|q| dot(q, atom)).collect();
            let mut v = atom.to_vec();
            for (q, &pi) in self.q.iter().zip(&p) {
                v.iter_mut().zip(q).for_each(|(vi, qi)| *vi -= qi * pi);
            }
            (v, p)
        };
        let n = norm(&v);
        // At t = 0 mergekit stores the unclamped norm in R and divides by the clamped one.
        col.push(if t == 0 { n } else { n.max(EPS) });
        let scale = 1.0 / n.max(EPS);
        self.q.push(v.iter().map(|x| x * scale).collect());
        self.rr.push(col);
        if t > 0 && t.is_multiple_of(REORTH) {
            self.reorthogonalise();
        }
        let qy: Vec<f64> = self.q.iter().map(|q| dot(q, &self.y)).collect();
        self.r.copy_from_slice(&self.y);
        for (q, &c) in self.q.iter().zip(&qy) {
            self.r.iter_mut().zip(q).for_each(|(ri, qi)| *ri -= qi * c);
        }
    }

    /// `Q, R ← Q', R'R` with `Q = Q'R'` a fresh QR (mergekit's periodic re-orthogonalisation).
    fn reorthogonalise(&mut self) {
        let (d, m) = (self.y.len(), self.q.len());
        let qm = Mat::from_fn(d, m, |i, t| self.q[t][i]);
        let qr = qm.qr();
        let q2 = qr.compute_thin_Q();
        let r2 = qr.thin_R();
        let r_old = Mat::from_fn(m, m, |i, t| if i <= t { self.rr[t][i] } else { 0.0 });
        let r_new = r2 * &r_old;
        for t in 0..m {
            self.q[t] = (0..d).map(|i| q2[(i, t)]).collect();
            self.rr[t] = (0..=t).map(|i| r_new[(i, t)]).collect();
        }
    }

    /// Back substitution `R c = Qᵀy`.
    fn finish(self) -> Fit {
        let k = self.q.len();
        let mut c: Vec<f64> = self.q.iter().map(|q| dot(q, &self.y)).collect();
        for t in (0..k).rev() {
            let s: f64 = (t + 1..k).map(|u| self.rr[u][t] * c[u]).sum();
            c[t] = (c[t] - s) / self.rr[t][t];
        }
        Fit {
            picked: self.picked,
            coeffs: c,
        }
    }
}

/// Unit roundoff of f32.
const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// Fit each of `targets` (rows of the dictionary's width) with `k` rows of `dict`.
/// `k` must not exceed the dictionary's row count (checked by the caller).
///
/// Each step's correlations are computed in f32 (one matrix product at twice f64's rate) only
/// to screen: every row whose f32 correlation could, within a rigorous bound on its rounding
/// error (`γ·‖r‖·‖row‖`, γ = 2(d+2)·2⁻²⁴: the dot product's accumulation and the inputs'
/// rounding to f32, doubled), reach the largest is recomputed in f64, and the pick is made on
/// those. The picks are therefore those of an f64 computation.
pub fn omp<T: Copy + Into<f64> + Sync>(
    targets: Vec<Vec<f64>>,
    dict: &Rows<T>,
    k: usize,
) -> Vec<Fit> {
    let n = dict.len();
    let d = dict.cols;
    assert!(k <= n, "omp: k {k} > {n} dictionary rows");
    let norms = dict.norms();
    let norm_max = norms.iter().fold(0f64, |m, &x| m.max(x));
    let gamma = 2.0 * (d as f64 + 2.0) * U32;
    // Bound the correlation matrix (batch × n f32) to about 32 MiB.
    let batch = ((8 << 20) / n.max(1)).clamp(1, 512);
    let mut fits = Vec::with_capacity(targets.len());
    let mut targets = targets.into_iter().peekable();
    // The dictionary in f32, column-major, for the products (one copy, converted once).
    let mut dict32 = Mat::<f32>::zeros(n, d);
    for j in 0..n {
        for (c, &x) in dict.row(j).iter().enumerate() {
            dict32[(j, c)] = x.into() as f32;
        }
    }
    while targets.peek().is_some() {
        let mut states: Vec<State> = targets.by_ref().take(batch).map(State::new).collect();
        let b = states.len();
        // Correlations, one contiguous column of n per target.
        let mut corr = vec![0.0f32; n * b];
        for _ in 0..k {
            let resid = Mat::from_fn(d, b, |c, i| states[i].r[c] as f32);
            let mut dst = faer::MatMut::from_column_major_slice_mut(&mut corr, n, b);
            for j0 in (0..n).step_by(BLOCK) {
                let rows = (j0 + BLOCK).min(n) - j0;
                faer::linalg::matmul::matmul(
                    dst.as_mut().subrows_mut(j0, rows),
                    Accum::Replace,
                    dict32.as_ref().subrows(j0, rows),
                    resid.as_ref(),
                    1.0f32,
                    Par::rayon(0),
                );
            }
            corr.par_chunks_mut(n)
                .zip(states.par_iter_mut())
                .for_each(|(c, s)| {
                    let j = pick(c, s, dict, &norms, norm_max, gamma);
                    let atom: Vec<f64> = dict.row(j).iter().map(|&x| x.into()).collect();
                    s.step(j, &atom);
                });
        }
        fits.extend(states.into_iter().map(State::finish));
    }
    fits
}

/// The unpicked row with the largest |⟨r, row⟩| in f64 (lowest index on ties), screened by the
/// f32 correlations `c` of state `s`'s residual.
fn pick<T: Copy + Into<f64>>(
    c: &mut [f32],
    s: &State,
    dict: &Rows<T>,
    norms: &[f64],
    norm_max: f64,
    gamma: f64,
) -> usize {
    // NaN never compares, so picked rows drop out of every scan.
    for &j in &s.picked {
        c[j] = f32::NAN;
    }
    let mut best = (usize::MAX, f32::NEG_INFINITY);
    for (j, x) in c.iter().enumerate() {
        if x.abs() > best.1 {
            best = (j, x.abs());
        }
    }
    if best.0 == usize::MAX {
        // No finite correlation (non-finite input, refused earlier): the first unpicked row.
        return (0..c.len())
            .find(|j| !s.picked.contains(j))
            .expect("k <= n");
    }
    let rn = norm(&s.r);
    let err = |j: usize| gamma * rn * norms[j];
    // Every row whose exact correlation may reach the best row's exact one.
    let floor = best.1 as f64 - err(best.0);
    let coarse = floor - gamma * rn * norm_max;
    let mut top = (usize::MAX, f64::NEG_INFINITY);
    for (j, x) in c.iter().enumerate() {
        let a = x.abs() as f64;
        if a >= coarse && a + err(j) >= floor {
            let exact = dict
                .row(j)
                .iter()
                .zip(&s.r)
                .map(|(&p, r)| p.into() * r)
                .sum::<f64>()
                .abs();
            if exact > top.1 {
                top = (j, exact);
            }
        }
    }
    top.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_sparse_combination() {
        // 6 rows in 4 dimensions; the target is 2·row1 − 0.5·row4.
        let data: Vec<f64> = vec![
            1.0, 0.0, 0.0, 0.0, //
            0.0, 1.0, 0.2, 0.0, //
            0.0, 0.0, 1.0, 0.0, //
            0.3, 0.3, 0.3, 0.3, //
            0.0, 0.0, 0.1, 1.0, //
            0.5, 0.5, 0.0, 0.0,
        ];
        let dict = Rows { data, cols: 4 };
        let y: Vec<f64> = (0..4)
            .map(|c| 2.0 * dict.row(1)[c] - 0.5 * dict.row(4)[c])
            .collect();
        let fit = omp(vec![y.clone()], &dict, 2).remove(0);
        let mut got: Vec<(usize, f64)> = fit.picked.iter().copied().zip(fit.coeffs).collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 4]);
        assert!(
            (got[0].1 - 2.0).abs() < 1e-12 && (got[1].1 + 0.5).abs() < 1e-12,
            "{got:?}"
        );
    }

    #[test]
    fn picks_are_exact_where_f32_cannot_tell_candidates_apart() {
        // Rows 0 and 1 round to the same f32 row; row 1's correlation is larger by 1e-9
        // relative, so an f64 pick takes row 1 first, where f32 alone would tie and take row 0.
        let data: Vec<f64> = vec![1.0, 0.0, 0.0, 1.0 + 1e-9, 0.0, 0.0, 0.0, 1.0, 0.0];
        let dict = Rows { data, cols: 3 };
        let fit = omp(vec![vec![1.0, 0.5, 0.25]], &dict, 1).remove(0);
        assert_eq!(fit.picked, [1]);
        let neg = Rows {
            data: vec![1.0, 0.0, 0.0, -1.0 - 1e-9, 0.0, 0.0],
            cols: 3,
        };
        // |−(1+1e-9)| wins over 1: the magnitude counts, not the sign.
        assert_eq!(omp(vec![vec![1.0, 0.0, 0.0]], &neg, 1)[0].picked, [1]);
    }

    #[test]
    fn reorthogonalisation_keeps_the_fit() {
        // 300 steps over 400 random rows in 320 dimensions crosses the 256-step QR.
        let mut state = 12345u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let (n, d, k) = (400, 320, 300);
        let dict = Rows {
            data: (0..n * d).map(|_| rnd()).collect::<Vec<f64>>(),
            cols: d,
        };
        let y: Vec<f64> = (0..d).map(|_| rnd()).collect();
        let fit = omp(vec![y.clone()], &dict, k).remove(0);
        // The coefficients are the least-squares fit on the picked rows: the residual is
        // orthogonal to each of them.
        let mut r = y.clone();
        for (&j, &c) in fit.picked.iter().zip(&fit.coeffs) {
            r.iter_mut()
                .zip(dict.row(j))
                .for_each(|(ri, a)| *ri -= c * a);
        }
        for &j in &fit.picked {
            assert!(dot(&r, dict.row(j)).abs() < 1e-9, "row {j}");
        }
        let mut sorted = fit.picked.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), k);
    }
}
