//! Timings of the dense kernels the SVD methods are built from, on this machine:
//! `cargo run --release -p amalgam --example linalg_timing [N] [M]` (default 4096, 14336).
//! Set `RAYON_NUM_THREADS` for the thread count (default: all cores).

use std::time::Instant;

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{ComputeEigenvectors, self_adjoint_evd, self_adjoint_evd_scratch};
use faer::traits::RealField;
use faer::{Accum, Mat, Par};

fn time<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    println!("{what:<40} {:8.2} s", t.elapsed().as_secs_f64());
    out
}

/// `aᵀa`, then `a·u` with `u` the Gram matrix's eigenvectors: the Gram route's three steps.
fn gram_route<T: RealField + Copy>(name: &str, a: &Mat<T>, vectors: ComputeEigenvectors) {
    let (m, n) = a.shape();
    let par = Par::rayon(0);
    let mut g = Mat::<T>::zeros(n, n);
    time(&format!("{name} gram {m}x{n}"), || {
        faer::linalg::matmul::matmul(
            g.as_mut(),
            Accum::Replace,
            a.transpose(),
            a.as_ref(),
            T::one_impl(),
            par,
        )
    });
    let mut s = faer::diag::Diag::<T>::zeros(n);
    let mut u = Mat::<T>::zeros(n, n);
    let with = vectors == ComputeEigenvectors::Yes;
    time(&format!("{name} eigh {n} (vectors: {with})"), || {
        let params = Default::default();
        let mut buf = MemBuffer::new(self_adjoint_evd_scratch::<T>(n, vectors, par, params));
        let u = if with { Some(u.as_mut()) } else { None };
        self_adjoint_evd(
            g.as_ref(),
            s.as_mut(),
            u,
            par,
            MemStack::new(&mut buf),
            params,
        )
        .unwrap()
    });
    let mut p = Mat::<T>::zeros(m, n);
    time(&format!("{name} matmul {m}x{n}x{n}"), || {
        faer::linalg::matmul::matmul(
            p.as_mut(),
            Accum::Replace,
            a.as_ref(),
            u.as_ref(),
            T::one_impl(),
            par,
        )
    });
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let n = args.first().copied().unwrap_or(4096);
    let m = args.get(1).copied().unwrap_or(14336);
    let a32 = Mat::<f32>::from_fn(m, n, |i, j| {
        let mut x = (i * n + j) as u64 ^ 0x9e37_79b9_7f4a_7c15;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    });
    let a64 = Mat::<f64>::from_fn(m, n, |i, j| a32[(i, j)] as f64);
    gram_route("f32", &a32, ComputeEigenvectors::Yes);
    gram_route("f32", &a32, ComputeEigenvectors::No);
    gram_route("f64", &a64, ComputeEigenvectors::Yes);
    let sq = a32.as_ref().subrows(0, n).to_owned();
    time(&format!("f32 thin svd {n}x{n}"), || {
        amalgam::linalg::thin_svd(sq.as_ref()).unwrap()
    });
}
