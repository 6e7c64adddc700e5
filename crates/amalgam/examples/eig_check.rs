//! Accuracy of faer's f32 and f64 symmetric eigendecompositions on this machine:
//! `cargo run --release -p amalgam --example eig_check [N]` (default 2048) prints
//! `‖VᵀV − I‖_F` and `‖GV − VΛ‖_F/‖G‖_F` for a Gram matrix `AᵀA` (A uniform in ±½), a
//! tridiagonal and a Wigner matrix. Compare LAPACK through torch:
//! `torch.linalg.eigh` on the same kind of Gram matrix gives 1.4e-6 at N = 2048.

use faer::Mat;

fn check<T: faer::traits::RealField + Copy + Into<f64>>(name: &str, g: &Mat<T>) {
    let n = g.nrows();
    let e = g.self_adjoint_eigen(faer::Side::Lower).unwrap();
    let (v, s) = (e.U(), e.S());
    let lam = Mat::<T>::from_fn(n, n, |i, j| if i == j { s[i] } else { T::zero_impl() });
    let res: f64 = (g * v - v * &lam).norm_l2().into() / g.norm_l2().into();
    let orth: f64 = (v.transpose() * v - Mat::<T>::identity(n, n))
        .norm_l2()
        .into();
    println!("{name:<24} n {n}: |VtV-I| {orth:.2e}, |GV-VL|/|G| {res:.2e}");
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(2048);
    let rnd = |i: usize, j: usize, salt: u64| {
        let mut x = (i * n + j) as u64 ^ 0x9e37_79b9_7f4a_7c15 ^ salt;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let a = Mat::<f32>::from_fn(n, n, |i, j| rnd(i, j, 0));
    let g = a.transpose() * &a;
    check("gram f32", &g);
    check(
        "gram f64",
        &Mat::<f64>::from_fn(n, n, |i, j| g[(i, j)] as f64),
    );
    let t = Mat::<f32>::from_fn(n, n, |i, j| match i.abs_diff(j) {
        0 => 2.0 + rnd(i, i, 1),
        1 => rnd(i.min(j), i.max(j), 2),
        _ => 0.0,
    });
    check("tridiagonal f32", &t);
    let w = Mat::<f32>::from_fn(n, n, |i, j| rnd(i.min(j), i.max(j), 3));
    check("wigner f32", &w);
}
