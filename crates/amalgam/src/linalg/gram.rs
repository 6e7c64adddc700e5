//! Singular triplets and polar factors through the Gram matrix of the smaller side.
//!
//! For a tall `t` (`p × q`, `p ≥ q`; a wide matrix is handled as its transpose),
//! `tᵀt = V Λ Vᵀ` gives `t`'s right singular vectors `V`, its singular values `√λ` and its left
//! singular vectors `t V Λ^{-1/2}`; its orthogonal polar factor is `t V Λ^{-1/2} Vᵀ`. A
//! `p × q × q` product and a `q × q` symmetric eigendecomposition replace the SVD's
//! bidiagonalisation and its two back-transformations. On this machine (2 cores, faer 0.24,
//! `cargo run --release -p amalgam --example linalg_timing`): the Gram matrix of a
//! 14336 × 4096 matrix takes 2.4 s and the f64 eigendecomposition of the 4096² result 8.1 s,
//! against 12.7 s for the f32 thin SVD of a 4096² matrix alone. The gain grows with the aspect
//! ratio (the SVD's cost grows with `p`, the eigendecomposition's does not) and is smallest
//! for square matrices (about 1.3×).
//!
//! The Gram matrix is formed in f32 (products over row blocks summed in f64) and decomposed in
//! f64 (see `eigen` for why not f32). Squaring the matrix squares its condition number: an
//! eigenvalue is known to about `ε₃₂·λ_max`, so a singular direction derived from it is
//! accurate only where its eigenvalue is not far below the largest one. Each function here
//! states which eigenvalues it needs (all of them for a polar factor, the top `k` for a
//! truncation) and returns `None` when one of them is below [`MIN_RATIO`]·λ_max (σ below a
//! tenth of σ_max): the caller then takes the SVD. Within that bound the results are as close
//! to an f64 SVD as the f32 SVD's are, usually closer (the tests below measure both).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::evd::{ComputeEigenvectors, self_adjoint_evd, self_adjoint_evd_scratch};
use faer::{Mat, MatRef};

use super::{Polar, Svd, matmul, par};

/// The smallest `λ_i / λ_max` the Gram route accepts for an eigenvalue it uses.
pub const MIN_RATIO: f64 = 1e-2;

/// Rows of `t` per f32 partial Gram product; the partial products are summed in f64, so the
/// rounding does not grow with the row count (embeddings have 32000 rows and more).
const BLOCK: usize = 2048;

/// `a` as a tall matrix, and whether that is its transpose.
fn tall(a: MatRef<'_, f32>) -> (MatRef<'_, f32>, bool) {
    if a.nrows() >= a.ncols() {
        (a, false)
    } else {
        (a.transpose(), true)
    }
}

/// `tᵀ t` (f32 products over row blocks, summed in f64).
fn gram(t: MatRef<'_, f32>) -> Mat<f64> {
    let (p, q) = t.shape();
    let mut part = Mat::<f32>::zeros(q, q);
    let mut sum = Mat::<f64>::zeros(q, q);
    for start in (0..p).step_by(BLOCK) {
        let rows = t.subrows(start, BLOCK.min(p - start));
        matmul(part.as_mut(), rows.transpose(), rows);
        for j in 0..q {
            for (s, &x) in sum.col_mut(j).iter_mut().zip(part.col(j).iter()) {
                *s += x as f64;
            }
        }
    }
    sum
}

/// A cheap proof that `g` is ill-conditioned: when `g − MIN_RATIO·λ̂·I` has no Cholesky factor
/// (λ̂ a Rayleigh quotient from power iteration, never above λ_max), some eigenvalue is below
/// `MIN_RATIO·λ_max` and the eigendecomposition would be wasted. `true` proves nothing; the
/// eigenvalues are checked again once computed.
fn may_be_conditioned(g: MatRef<'_, f64>) -> bool {
    let q = g.nrows();
    let mut x = Mat::<f64>::from_fn(q, 1, |i, _| 1.0 + (i % 7) as f64 * 0.1);
    let mut y = Mat::<f64>::zeros(q, 1);
    let mut rayleigh = 0.0f64;
    for _ in 0..30 {
        let norm = x.norm_l2();
        if norm == 0.0 || !norm.is_finite() {
            return false;
        }
        x /= faer::Scale(norm);
        matmul(y.as_mut(), g, x.as_ref());
        rayleigh = (0..q).map(|i| x[(i, 0)] * y[(i, 0)]).sum();
        std::mem::swap(&mut x, &mut y);
    }
    if rayleigh.is_nan() || rayleigh <= 0.0 {
        return false;
    }
    let mut shifted = g.to_owned();
    let shift = MIN_RATIO * rayleigh;
    for i in 0..q {
        shifted[(i, i)] -= shift;
    }
    let params = Default::default();
    let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f64>(q, par(), params));
    cholesky_in_place(
        shifted.as_mut(),
        Default::default(),
        par(),
        MemStack::new(&mut buf),
        params,
    )
    .is_ok()
}

/// The eigenvalues of `g`, descending, and its eigenvectors in the same order (rounded to f32).
///
/// In f64: faer 0.24's f32 eigendecomposition leaves residuals `‖GV − VΛ‖/‖G‖` about ten times
/// LAPACK's (1.3e-5 against 1.4e-6 for a 2048² Gram matrix, `examples/eig_check.rs`), enough to
/// spoil Iso-CTS's common subspace (a 4e-2 difference on one 2048² matrix); the f64 one is
/// accurate and costs 2.3× the f32 one.
fn eigen(g: MatRef<'_, f64>) -> Result<(Vec<f32>, Mat<f32>), String> {
    let q = g.nrows();
    let mut s = faer::diag::Diag::<f64>::zeros(q);
    let mut u = Mat::<f64>::zeros(q, q);
    let params = Default::default();
    let mut buf = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        q,
        ComputeEigenvectors::Yes,
        par(),
        params,
    ));
    self_adjoint_evd(
        g,
        s.as_mut(),
        Some(u.as_mut()),
        par(),
        MemStack::new(&mut buf),
        params,
    )
    .map_err(|e| format!("the eigendecomposition did not converge ({e:?})"))?;
    let values = (0..q).rev().map(|i| s[i] as f32).collect();
    let vectors = Mat::from_fn(q, q, |i, j| u[(i, q - 1 - j)] as f32);
    Ok((values, vectors))
}

/// Whether the first `k` of the descending `values` are all at least `MIN_RATIO` of the first.
fn usable(values: &[f32], k: usize) -> bool {
    let top = values.first().copied().unwrap_or(0.0) as f64;
    top > 0.0 && top.is_finite() && k <= values.len() && (values[k - 1] as f64) >= MIN_RATIO * top
}

/// The top `k` (`1 ≤ k ≤ min(m, n)`) singular triplets of `a`, or `None` when `σ_k` is below
/// the bound (or `a` is zero).
pub fn top_k(a: MatRef<'_, f32>, k: usize) -> Result<Option<Svd>, String> {
    if k == 0 {
        return Ok(None);
    }
    let (t, transposed) = tall(a);
    let (values, vectors) = eigen(gram(t).as_ref())?;
    if !usable(&values, k) {
        return Ok(None);
    }
    let s: Vec<f32> = values[..k].iter().map(|&l| l.sqrt()).collect();
    let v = vectors.as_ref().subcols(0, k).to_owned();
    let mut u = Mat::<f32>::zeros(t.nrows(), k);
    matmul(u.as_mut(), t, v.as_ref());
    for (j, &sj) in s.iter().enumerate() {
        u.col_mut(j).iter_mut().for_each(|x| *x /= sj);
    }
    Ok(Some(if transposed {
        Svd { u: v, s, v: u }
    } else {
        Svd { u, s, v }
    }))
}

/// The orthogonal polar factor of `a` (`m × n`, the nearest matrix with orthonormal columns or
/// rows) and all `min(m, n)` singular values, descending; `None` when the smallest is below the
/// bound.
pub fn polar(a: MatRef<'_, f32>) -> Result<Option<Polar>, String> {
    let (t, transposed) = tall(a);
    let g = gram(t);
    if !may_be_conditioned(g.as_ref()) {
        return Ok(None);
    }
    let (values, vectors) = eigen(g.as_ref())?;
    drop(g);
    let q = values.len();
    if !usable(&values, q) {
        return Ok(None);
    }
    // W = V Λ^{-1/2} Vᵀ, then P = t W (tall) or W tᵀ (wide: the transpose of t's factor).
    let scaled = Mat::<f32>::from_fn(q, q, |i, j| vectors[(i, j)] / values[j].sqrt());
    let mut w = Mat::<f32>::zeros(q, q);
    matmul(w.as_mut(), scaled.as_ref(), vectors.transpose());
    let mut p = Mat::<f32>::zeros(a.nrows(), a.ncols());
    if transposed {
        matmul(p.as_mut(), w.as_ref(), a);
    } else {
        matmul(p.as_mut(), a, w.as_ref());
    }
    Ok(Some((p, values.iter().map(|&l| l.sqrt()).collect())))
}

#[cfg(test)]
mod tests {
    use super::super::{compose, thin_svd};
    use super::*;
    use crate::methods::rng::Key;

    /// An `m × n` matrix with singular values spread evenly from 1 down to `1/kappa`.
    fn conditioned(m: usize, n: usize, kappa: f64, seed: u64) -> Mat<f32> {
        let key = Key::new(seed, "gram", 0);
        let gauss = |rows: usize, cols: usize, salt: u64| {
            Mat::<f32>::from_fn(rows, cols, |i, j| {
                let idx = salt * 1_000_000 + 2 * (i * cols + j) as u64;
                let u1 = key.uniform(idx).max(f64::MIN_POSITIVE);
                let u2 = key.uniform(idx + 1);
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
        };
        let r = m.min(n);
        let u = gauss(m, r, 1).qr().compute_thin_Q();
        let v = gauss(n, r, 2).qr().compute_thin_Q();
        let s: Vec<f32> = (0..r)
            .map(|i| (1.0 - (1.0 - 1.0 / kappa) * i as f64 / (r - 1).max(1) as f64) as f32)
            .collect();
        let mut a = Mat::<f32>::zeros(m, n);
        compose(a.as_mut(), u.as_ref(), &s, v.as_ref());
        a
    }

    /// `‖a − b‖ / ‖b‖` in f64.
    fn rel(a: MatRef<'_, f32>, b: MatRef<'_, f64>) -> f64 {
        let mut num = 0.0;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                num += (a[(i, j)] as f64 - b[(i, j)]).powi(2);
            }
        }
        num.sqrt() / b.norm_l2()
    }

    /// The polar factor, truncation and singular values of `a` in f64 through faer's f64 SVD
    /// (the reference).
    fn reference(a: MatRef<'_, f32>, k: usize) -> (Mat<f64>, Mat<f64>, Vec<f64>) {
        let a64 = Mat::<f64>::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f64);
        let f = a64.thin_svd().unwrap();
        let polar = f.U() * f.V().transpose();
        let (u, v) = (f.U().subcols(0, k), f.V().subcols(0, k));
        let s = Mat::<f64>::from_fn(k, k, |i, j| if i == j { f.S()[i] } else { 0.0 });
        let values = (0..f.S().dim()).map(|i| f.S()[i]).collect();
        (polar, u * s * v.transpose(), values)
    }

    #[test]
    fn polar_and_top_k_are_as_close_to_an_f64_svd_as_the_f32_svd_is() {
        for (m, n) in [(300, 120), (120, 300), (150, 150)] {
            let a = conditioned(m, n, 8.0, (m + n) as u64);
            let k = m.min(n) / 3;
            let (want_polar, want_top, want_s) = reference(a.as_ref(), k);
            let svd = thin_svd(a.as_ref()).unwrap();
            let mut svd_polar = Mat::<f32>::zeros(m, n);
            crate::linalg::matmul(svd_polar.as_mut(), svd.u.as_ref(), svd.v.transpose());
            let svd_err = rel(svd_polar.as_ref(), want_polar.as_ref());

            let (p, s) = polar(a.as_ref()).unwrap().expect("well-conditioned");
            let err = rel(p.as_ref(), want_polar.as_ref());
            assert!(
                err < 2.0 * svd_err.max(1e-6),
                "{m}x{n}: {err} vs svd {svd_err}"
            );
            let worst = |s: &[f32]| {
                s.iter()
                    .zip(&want_s)
                    .map(|(&x, y)| (x as f64 - y).abs())
                    .fold(0.0, f64::max)
            };
            let (ours, theirs) = (worst(&s), worst(&svd.s));
            assert!(
                ours < 2.0 * theirs.max(1e-6),
                "σ off by {ours} vs svd {theirs}"
            );

            let top = top_k(a.as_ref(), k).unwrap().expect("well-conditioned");
            assert_eq!((top.u.nrows(), top.v.nrows(), top.s.len()), (m, n, k));
            let mut back = Mat::<f32>::zeros(m, n);
            compose(back.as_mut(), top.u.as_ref(), &top.s, top.v.as_ref());
            let err = rel(back.as_ref(), want_top.as_ref());
            let mut svd_top = Mat::<f32>::zeros(m, n);
            let t = crate::linalg::truncate(svd, k);
            compose(svd_top.as_mut(), t.u.as_ref(), &t.s, t.v.as_ref());
            let svd_err = rel(svd_top.as_ref(), want_top.as_ref());
            assert!(
                err < 2.0 * svd_err.max(1e-6),
                "{m}x{n} top {k}: {err} vs svd {svd_err}"
            );
            // The left vectors come out orthonormal too (TSV-M whitens them unweighted).
            let off = |u: &Mat<f32>| (u.transpose() * u - Mat::<f32>::identity(k, k)).norm_l2();
            let (ours, svd_off) = (off(&top.u), off(&t.u));
            assert!(
                ours < 2.0 * svd_off.max(1e-6),
                "{m}x{n}: UᵀU − I {ours} vs svd {svd_off}"
            );
        }
    }

    #[test]
    fn ill_conditioned_or_zero_matrices_are_left_to_the_svd() {
        let a = conditioned(80, 60, 50.0, 3);
        assert!(polar(a.as_ref()).unwrap().is_none());
        // The top directions of the same matrix are within the bound; the last ones are not.
        assert!(top_k(a.as_ref(), 10).unwrap().is_some());
        assert!(top_k(a.as_ref(), 60).unwrap().is_none());
        let zero = Mat::<f32>::zeros(5, 4);
        assert!(polar(zero.as_ref()).unwrap().is_none());
        assert!(top_k(zero.as_ref(), 2).unwrap().is_none());
        // Rank-deficient: a zero column.
        let mut b = conditioned(30, 20, 2.0, 4);
        b.col_mut(7).fill(0.0);
        assert!(polar(b.as_ref()).unwrap().is_none());
    }

    #[test]
    fn blocked_gram_sums_every_row_block() {
        let t = conditioned(BLOCK + 37, 6, 3.0, 5);
        let g = gram(t.as_ref());
        let want = t.transpose() * &t;
        let g32 = Mat::<f32>::from_fn(6, 6, |i, j| g[(i, j)] as f32);
        assert!((g32 - want).norm_l2() < 1e-5);
    }
}
