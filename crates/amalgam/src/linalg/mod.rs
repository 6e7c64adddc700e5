//! Dense linear algebra for the SVD-based methods, through faer: thin SVD, randomized truncated
//! SVD, the orthogonal polar factor, and row-major views of tensors.
//!
//! Tensors are row-major `out × in` (PyTorch's `nn.Linear` layout); faer views them with
//! [`rows`] and [`rows_mut`] without copying. All work is in f32, as the reference
//! implementations do it (FusionBench upcasts half precision to f32 for its SVDs).
//!
//! Truncations and polar factors take one of two routes ([`Solver`]): the thin SVD, as the
//! references do, or the Gram matrix of the smaller side ([`gram`]), cheaper by 1.3× (square)
//! to several times (tall), taken only where its accuracy bound holds and falling back to the
//! SVD elsewhere.

pub mod gram;

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{ComputeSvdVectors, svd, svd_scratch};
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::methods::rng::Key;

/// A thin SVD `A = U diag(s) Vᵀ`: `U` is `m × r`, `V` is `n × r`, `s` descending.
pub struct Svd {
    /// Left singular vectors, one per column.
    pub u: Mat<f32>,
    /// Singular values, descending.
    pub s: Vec<f32>,
    /// Right singular vectors, one per column.
    pub v: Mat<f32>,
}

/// A row-major `m × n` slice as a matrix.
pub fn rows(data: &[f32], m: usize, n: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, m, n)
}

/// A mutable row-major `m × n` slice as a matrix.
pub fn rows_mut(data: &mut [f32], m: usize, n: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(data, m, n)
}

pub(crate) fn par() -> Par {
    Par::rayon(0)
}

/// The thin SVD of `a`, computed exactly (to working precision).
pub fn thin_svd(a: MatRef<'_, f32>) -> Result<Svd, String> {
    let (m, n) = a.shape();
    let r = m.min(n);
    let mut u = Mat::<f32>::zeros(m, r);
    let mut v = Mat::<f32>::zeros(n, r);
    let mut s = faer::diag::Diag::<f32>::zeros(r);
    if r > 0 {
        let params = Default::default();
        let mut buf = MemBuffer::new(svd_scratch::<f32>(
            m,
            n,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            par(),
            params,
        ));
        svd(
            a,
            s.as_mut(),
            Some(u.as_mut()),
            Some(v.as_mut()),
            par(),
            MemStack::new(&mut buf),
            params,
        )
        .map_err(|e| format!("the SVD did not converge ({e:?})"))?;
    }
    let s = (0..r).map(|i| s[i]).collect();
    Ok(Svd { u, s, v })
}

/// The top `k` singular triplets of `a` by randomized range finding (Halko, Martinsson and
/// Tropp 2011): a Gaussian sketch with `oversample` extra columns, `power` subspace iterations
/// re-orthonormalised by QR, then the exact SVD of the small projected matrix. The sketch is
/// drawn from `key`, so the result is reproducible. When the sketch would not be much smaller
/// than the matrix, the exact SVD is cheaper and is used instead.
pub fn truncated_svd(
    a: MatRef<'_, f32>,
    k: usize,
    oversample: usize,
    power: usize,
    key: Key,
) -> Result<Svd, String> {
    let (m, n) = a.shape();
    let r = m.min(n);
    let l = (k + oversample).min(r);
    if k == 0 || 2 * l >= r {
        return Ok(truncate(thin_svd(a)?, k));
    }
    // Ω: n × l standard normal entries (Box–Muller on two uniforms per entry).
    let omega = Mat::<f32>::from_fn(n, l, |i, j| {
        let idx = 2 * (i * l + j) as u64;
        let u1 = key.uniform(idx).max(f64::MIN_POSITIVE);
        let u2 = key.uniform(idx + 1);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    });
    let mut y = Mat::<f32>::zeros(m, l);
    matmul(y.as_mut(), a, omega.as_ref());
    let mut q = orthonormal(y.as_ref());
    let mut z = Mat::<f32>::zeros(n, l);
    for _ in 0..power {
        matmul(z.as_mut(), a.transpose(), q.as_ref());
        let zq = orthonormal(z.as_ref());
        matmul(y.as_mut(), a, zq.as_ref());
        q = orthonormal(y.as_ref());
    }
    // B = Qᵀ A (l × n); B = Ũ Σ Vᵀ; U = Q Ũ.
    let mut b = Mat::<f32>::zeros(q.ncols(), n);
    matmul(b.as_mut(), q.transpose(), a);
    let small = thin_svd(b.as_ref())?;
    let mut u = Mat::<f32>::zeros(m, small.u.ncols());
    matmul(u.as_mut(), q.as_ref(), small.u.as_ref());
    Ok(truncate(
        Svd {
            u,
            s: small.s,
            v: small.v,
        },
        k,
    ))
}

/// Keep the first `k` triplets.
pub fn truncate(svd: Svd, k: usize) -> Svd {
    let k = k.min(svd.s.len());
    Svd {
        u: svd.u.as_ref().subcols(0, k).to_owned(),
        s: svd.s[..k].to_vec(),
        v: svd.v.as_ref().subcols(0, k).to_owned(),
    }
}

/// An orthonormal basis of the column space of `y` (thin Q of its QR factorisation).
fn orthonormal(y: MatRef<'_, f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// `dst = lhs · rhs` (f32, or f64 where the Gram route needs it).
pub fn matmul<T: faer::traits::ComplexField>(
    dst: MatMut<'_, T>,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
) {
    faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, T::one_impl(), par());
}

/// `dst −= lhs · rhs`.
pub fn sub_product(dst: MatMut<'_, f32>, lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) {
    faer::linalg::matmul::matmul(dst, Accum::Add, lhs, rhs, -1.0f32, par());
}

/// How truncations and polar factors are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solver {
    /// The Gram route where the singular values it needs are within its bound, the thin SVD
    /// where they are not.
    Auto,
    /// Always the thin SVD (the reference implementations' route).
    Svd,
}

impl Solver {
    /// The `solver` parameter's value (`auto` or `svd`).
    pub fn from_name(name: &str) -> Self {
        if name == "svd" {
            Solver::Svd
        } else {
            Solver::Auto
        }
    }
}

/// An orthogonal polar factor and the singular values of the matrix it came from, descending.
pub type Polar = (Mat<f32>, Vec<f32>);

/// The orthogonal polar factor `P Qᵀ` of `a = P S Qᵀ` (the nearest matrix with orthonormal
/// columns, or rows for a wide `a`) and `a`'s singular values, descending.
pub fn polar(a: MatRef<'_, f32>, solver: Solver) -> Result<Polar, String> {
    if solver == Solver::Auto
        && let Some(found) = gram::polar(a)?
    {
        return Ok(found);
    }
    let f = thin_svd(a)?;
    let mut out = Mat::<f32>::zeros(a.nrows(), a.ncols());
    matmul(out.as_mut(), f.u.as_ref(), f.v.transpose());
    Ok((out, f.s))
}

/// The top `k` singular triplets of `a`, exactly (to working precision).
pub fn top_k(a: MatRef<'_, f32>, k: usize, solver: Solver) -> Result<Svd, String> {
    if k == 0 {
        let (u, v) = (Mat::zeros(a.nrows(), 0), Mat::zeros(a.ncols(), 0));
        return Ok(Svd {
            u,
            s: Vec::new(),
            v,
        });
    }
    if solver == Solver::Auto
        && let Some(found) = gram::top_k(a, k)?
    {
        return Ok(found);
    }
    Ok(truncate(thin_svd(a)?, k))
}

/// `dst = U diag(s) Vᵀ` for `U` (`m × k`), `s` (`k`) and `V` (`n × k`).
pub fn compose(dst: MatMut<'_, f32>, u: MatRef<'_, f32>, s: &[f32], v: MatRef<'_, f32>) {
    let us = Mat::<f32>::from_fn(u.nrows(), u.ncols(), |i, j| u[(i, j)] * s[j]);
    matmul(dst, us.as_ref(), v.transpose());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(m: usize, n: usize, seed: u64) -> Mat<f32> {
        let key = Key::new(seed, "test", 0);
        Mat::from_fn(m, n, |i, j| (key.uniform((i * n + j) as u64) - 0.5) as f32)
    }

    fn rel(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f32 {
        (a - b).norm_l2() / b.norm_l2()
    }

    #[test]
    fn thin_svd_reconstructs_tall_wide_and_square() {
        for (m, n) in [(7, 3), (3, 7), (5, 5), (1, 4)] {
            let a = random(m, n, (m * 10 + n) as u64);
            let f = thin_svd(a.as_ref()).unwrap();
            assert_eq!((f.u.nrows(), f.u.ncols(), f.v.nrows()), (m, m.min(n), n));
            assert!(f.s.windows(2).all(|w| w[0] >= w[1]));
            let mut back = Mat::<f32>::zeros(m, n);
            compose(back.as_mut(), f.u.as_ref(), &f.s, f.v.as_ref());
            assert!(rel(back.as_ref(), a.as_ref()) < 1e-5, "{m}x{n}");
        }
    }

    #[test]
    fn truncated_svd_finds_the_top_of_a_decaying_spectrum() {
        // A = Σ 2^-i u_i v_iᵀ with random orthonormal u, v: a fast-decaying spectrum.
        let (m, n, k) = (120, 90, 6);
        let u = orthonormal(random(m, 40, 1).as_ref());
        let v = orthonormal(random(n, 40, 2).as_ref());
        let s: Vec<f32> = (0..40).map(|i| 0.5f32.powi(i)).collect();
        let mut a = Mat::<f32>::zeros(m, n);
        compose(a.as_mut(), u.as_ref(), &s, v.as_ref());
        let approx = truncated_svd(a.as_ref(), k, 8, 2, Key::new(0, "a", 0)).unwrap();
        let exact = truncate(thin_svd(a.as_ref()).unwrap(), k);
        for (x, y) in approx.s.iter().zip(&exact.s) {
            assert!((x - y).abs() <= 1e-5 * exact.s[0], "{x} vs {y}");
        }
        let (mut pa, mut pe) = (Mat::<f32>::zeros(m, n), Mat::<f32>::zeros(m, n));
        compose(pa.as_mut(), approx.u.as_ref(), &approx.s, approx.v.as_ref());
        compose(pe.as_mut(), exact.u.as_ref(), &exact.s, exact.v.as_ref());
        assert!(rel(pa.as_ref(), pe.as_ref()) < 1e-4);
    }

    #[test]
    fn polar_factor_is_orthonormal_and_nearest() {
        let a = random(9, 4, 3);
        let (p, _) = polar(a.as_ref(), Solver::Svd).unwrap();
        let gram = p.transpose() * &p;
        let id = Mat::<f32>::identity(4, 4);
        assert!((gram - id).norm_l2() < 1e-5);
        // P is the orthonormal factor of A: Pᵀ A is symmetric positive semi-definite.
        let h = p.transpose() * &a;
        assert!((&h - h.transpose()).norm_l2() < 1e-5);
    }

    #[test]
    fn zero_matrix_has_zero_spectrum() {
        let f = thin_svd(Mat::<f32>::zeros(4, 3).as_ref()).unwrap();
        assert!(f.s.iter().all(|&x| x == 0.0));
    }
}
