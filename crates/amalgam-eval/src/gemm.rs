//! `y = x·W + b` for the linear layers on AVX-512: candle's CPU matmul (the `gemm` crate on
//! stable Rust) runs 256-bit FMA kernels only, half of what this machine's cores can do. The
//! weight is packed once, at load, into panels of 32 output columns (`K × 32` floats each);
//! the kernel keeps a 6 × 32 block of outputs in twelve zmm registers over the whole inner
//! dimension (the bias as its start), rows in chunks that stay in L2. [`matmul_plain`] runs the
//! same kernel on a weight as stored (routed experts' small factors and gate projections),
//! and [`gelu_erf`] is the exact GELU over 16 lanes. Used when the CPU has
//! AVX-512F and `AMALGAM_SIMD` is not `baseline`; results differ from candle's by the
//! summation order only (checked in the tests).

/// Output columns per panel (two zmm registers).
const NR: usize = 32;
/// Rows per register block.
const MR: usize = 6;
/// Rows per cache chunk.
const MC: usize = 96;

/// A `K × N` right-hand side packed for [`matmul`].
pub struct Packed {
    k: usize,
    n: usize,
    /// Panel `p` holds columns `32p..32p+32` (zero past `n`), `k` rows of 32.
    panels: Vec<f32>,
    /// The bias, zero-padded to whole panels.
    bias: Vec<f32>,
}

/// Whether the AVX-512 path runs (decided once per process).
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("AMALGAM_SIMD").is_ok_and(|v| v == "baseline") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

impl Packed {
    /// Pack `w` (`K × N`, row-major) and `bias` (`N`).
    pub fn new(w: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Packed {
        let np = n.div_ceil(NR);
        let mut panels = vec![0.0f32; np * k * NR];
        for p in 0..np {
            let c0 = p * NR;
            let width = NR.min(n - c0);
            for kk in 0..k {
                let dst = &mut panels[(p * k + kk) * NR..][..width];
                dst.copy_from_slice(&w[kk * n + c0..][..width]);
            }
        }
        let mut b = vec![0.0f32; np * NR];
        if let Some(bias) = bias {
            b[..n].copy_from_slice(bias);
        }
        Packed {
            k,
            n,
            panels,
            bias: b,
        }
    }

    /// The `K × N` weight back, row-major.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.k * self.n];
        for p in 0..self.n.div_ceil(NR) {
            let c0 = p * NR;
            let width = NR.min(self.n - c0);
            for kk in 0..self.k {
                w[kk * self.n + c0..][..width]
                    .copy_from_slice(&self.panels[(p * self.k + kk) * NR..][..width]);
            }
        }
        w
    }

    /// Inner dimension (input width).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// `x·W + b` for `x` (`m × K`, row-major): `m × N`, row-major. Only when [`available`].
pub fn matmul(x: &[f32], m: usize, p: &Packed) -> Vec<f32> {
    assert!(
        available() && x.len() == m * p.k,
        "gemm::matmul: shape or CPU"
    );
    let len = m * p.n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (checked above); every pointer stays inside `x`, `out`'s
    // capacity and `p`'s buffers (the kernels' bounds are the shapes asserted here). The
    // kernels store every one of the `m × n` outputs (each row block writes its panel's valid
    // columns, the panels cover all n), so the vector is initialised when its length is set.
    unsafe {
        avx512::run(x, m, p, out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        out.set_len(len);
    };
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MC, MR, NR, Packed};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(x: &[f32], m: usize, p: &Packed, out: *mut f32) {
        let k = p.k;
        // SAFETY: panel c0/32 holds k·32 floats and the bias 32 from c0 (both padded).
        unsafe {
            drive(x, m, k, p.n, out, |c0| Panel {
                w: p.panels.as_ptr().add(c0 / NR * k * NR),
                ld: NR,
                bias: p.bias.as_ptr().add(c0),
            })
        }
    }

    /// `x·W` for a row-major `K × N` weight used as it is stored (for the small factors of
    /// routed experts, whose rows are short: `ld = n`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_plain(
        x: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        n: usize,
        out: *mut f32,
    ) {
        let zero = [0.0f32; NR];
        // SAFETY: column c0 < n of row 0 is inside w; blocks read columns c0..c0+width only
        // (masked loads).
        unsafe {
            drive(x, m, k, n, out, |c0| Panel {
                w: w.as_ptr().add(c0),
                ld: n,
                bias: zero.as_ptr(),
            })
        }
    }

    /// Every output block: rows in chunks of [`MC`] (kept in L2), 32-column panels from
    /// `panel(c0)`, register blocks of up to [`MR`] rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn drive(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        out: *mut f32,
        panel: impl Fn(usize) -> Panel,
    ) {
        for r0 in (0..m).step_by(MC) {
            let r1 = (r0 + MC).min(m);
            for c0 in (0..n).step_by(NR) {
                let width = NR.min(n - c0);
                let b = panel(c0);
                let mut r = r0;
                while r < r1 {
                    let rows = MR.min(r1 - r);
                    // SAFETY: rows r..r+rows of x and out exist; the panel is the caller's.
                    unsafe { rows_block(rows, x, k, r, &b, out, n, c0, width) }
                    r += rows;
                }
            }
        }
    }

    /// Where a block reads its weight columns: row `kk` at `w + kk·ld`, and its bias (32 each).
    struct Panel {
        w: *const f32,
        ld: usize,
        bias: *const f32,
    }

    /// [`block`] for `rows` (1–6) rows.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_block(
        rows: usize,
        x: &[f32],
        k: usize,
        r: usize,
        b: &Panel,
        out: *mut f32,
        n: usize,
        c0: usize,
        width: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match rows {
                6 => block::<6>(x, k, r, b, out, n, c0, width),
                5 => block::<5>(x, k, r, b, out, n, c0, width),
                4 => block::<4>(x, k, r, b, out, n, c0, width),
                3 => block::<3>(x, k, r, b, out, n, c0, width),
                2 => block::<2>(x, k, r, b, out, n, c0, width),
                _ => block::<1>(x, k, r, b, out, n, c0, width),
            }
        }
    }

    /// See [`super::gelu_erf`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu(v: &mut [f32]) {
        let c = |x: f32| _mm512_set1_ps(x);
        let chunks = v.len() / 16;
        let step = |x: __m512| -> __m512 {
            let z = _mm512_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
            let a = _mm512_abs_ps(z);
            let t = _mm512_div_ps(c(1.0), _mm512_fmadd_ps(c(0.327_591_1), a, c(1.0)));
            let mut poly = _mm512_fmadd_ps(c(1.061_405_4), t, c(-1.453_152));
            poly = _mm512_fmadd_ps(poly, t, c(1.421_413_8));
            poly = _mm512_fmadd_ps(poly, t, c(-0.284_496_74));
            poly = _mm512_fmadd_ps(poly, t, c(0.254_829_6));
            poly = _mm512_mul_ps(poly, t);
            // exp(−a²): n = round(y·log2 e), r = y − n·ln2 (two parts), e^r by its series.
            let y = _mm512_max_ps(
                _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)),
                c(-104.0),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(y, c(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, c(0.693_145_75), y);
            let r = _mm512_fnmadd_ps(n, c(1.428_606_8e-6), r);
            let mut e = _mm512_fmadd_ps(c(1.0 / 720.0), r, c(1.0 / 120.0));
            e = _mm512_fmadd_ps(e, r, c(1.0 / 24.0));
            e = _mm512_fmadd_ps(e, r, c(1.0 / 6.0));
            e = _mm512_fmadd_ps(e, r, c(0.5));
            e = _mm512_fmadd_ps(e, r, c(1.0));
            e = _mm512_fmadd_ps(e, r, c(1.0));
            let e = _mm512_scalef_ps(e, n);
            let erf_abs = _mm512_fnmadd_ps(poly, e, c(1.0));
            // copysign(erf_abs, z)
            let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
            let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
            _mm512_mul_ps(_mm512_mul_ps(c(0.5), x), _mm512_add_ps(c(1.0), erf))
        };
        let p = v.as_mut_ptr();
        for i in 0..chunks {
            // SAFETY: element 16i + 15 < v.len().
            unsafe {
                let x = _mm512_loadu_ps(p.add(16 * i));
                _mm512_storeu_ps(p.add(16 * i), step(x));
            }
        }
        let rest = v.len() - 16 * chunks;
        if rest > 0 {
            let m: __mmask16 = ((1u32 << rest) - 1) as u16;
            // SAFETY: the mask covers only the last `rest` elements.
            unsafe {
                let x = _mm512_maskz_loadu_ps(m, p.add(16 * chunks));
                _mm512_mask_storeu_ps(p.add(16 * chunks), m, step(x));
            }
        }
    }

    /// Rows `r..r+R` × the panel's 32 columns (the first `width` read and stored at `c0`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        x: &[f32],
        k: usize,
        r: usize,
        b: &Panel,
        out: *mut f32,
        n: usize,
        c0: usize,
        width: usize,
    ) {
        // SAFETY (whole body): the caller guarantees rows r..r+R of `x` (k each) and of `out`
        // (n each), the weight's k rows at stride `ld` with `width` valid columns, and 32 bias
        // floats.
        unsafe {
            let m0: __mmask16 = if width >= 16 {
                0xFFFF
            } else {
                ((1u32 << width) - 1) as u16
            };
            let m1: __mmask16 = if width >= 32 {
                0xFFFF
            } else if width > 16 {
                ((1u32 << (width - 16)) - 1) as u16
            } else {
                0
            };
            let b0 = _mm512_loadu_ps(b.bias);
            let b1 = _mm512_loadu_ps(b.bias.add(16));
            let mut acc = [[b0, b1]; R];
            let xp = x.as_ptr().add(r * k);
            for kk in 0..k {
                let row = b.w.add(kk * b.ld);
                let w0 = _mm512_maskz_loadu_ps(m0, row);
                let w1 = _mm512_maskz_loadu_ps(m1, row.add(16));
                for (i, a) in acc.iter_mut().enumerate() {
                    let v = _mm512_set1_ps(*xp.add(i * k + kk));
                    a[0] = _mm512_fmadd_ps(v, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(v, w1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let o = out.add((r + i) * n + c0);
                _mm512_mask_storeu_ps(o, m0, a[0]);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(o.add(16), m1, a[1]);
                }
            }
        }
    }
}

/// `x·W` for `x` (`m × K`) and a row-major `W` (`K × N`) used as stored: `m × N`. Only when
/// [`available`].
pub fn matmul_plain(x: &[f32], m: usize, w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert!(
        available() && x.len() == m * k && w.len() == k * n,
        "gemm::matmul_plain: shape or CPU"
    );
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `matmul`; every output is stored before the length is set.
    unsafe {
        avx512::run_plain(
            x,
            m,
            w,
            k,
            n,
            out.spare_capacity_mut().as_mut_ptr().cast::<f32>(),
        );
        out.set_len(m * n);
    };
    out
}

/// Exact GELU in place, `x (1 + erf(x/√2)) / 2` with erf by Abramowitz & Stegun 7.1.26 (as
/// [`crate::nn`]'s scalar form) and `exp` by a degree-6 polynomial on `[−ln2/2, ln2/2]` scaled
/// by `2ⁿ` (relative error below 2e-7, under A&S's 1.5e-7 absolute on erf). Only when
/// [`available`].
pub fn gelu_erf(v: &mut [f32]) {
    assert!(available(), "gemm::gelu_erf: CPU");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (checked above); the kernel stays inside `v`.
    unsafe {
        avx512::gelu(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_the_exact_function() {
        if !available() {
            return;
        }
        let xs: Vec<f32> = (-4000..4000)
            .map(|i| i as f32 * 0.003)
            .chain([-30.0, 30.0, 0.0, -1e-30])
            .collect();
        let mut v = xs.clone();
        gelu_erf(&mut v);
        for (x, g) in xs.iter().zip(&v) {
            let x64 = *x as f64;
            // Φ by erfc's relation to the normal tail, from a high-precision series via libm.
            let want = 0.5 * x64 * (1.0 + erf64(x64 / std::f64::consts::SQRT_2));
            assert!(
                (*g as f64 - want).abs() <= 3e-7 * x64.abs().max(1.0),
                "gelu({x}) = {g}, want {want}"
            );
        }
    }

    /// erf to double precision (Abramowitz & Stegun 7.1.26 is not enough here): its Taylor
    /// series below 3, 1 − erfc by a continued fraction above.
    fn erf64(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs().max(1e-300) {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * (a + f))
        };
        r.copysign(x)
    }

    #[test]
    fn matches_a_plain_product_for_every_tail() {
        if !available() {
            eprintln!("no AVX-512F here; the kernel is not exercised");
            return;
        }
        let mut s = 7u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (m, k, n) in [
            (1, 1, 1),
            (7, 5, 33),
            (13, 384, 48),
            (200, 17, 64),
            (97, 64, 31),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let packed = Packed::new(&w, k, n, Some(&b));
            assert_eq!(packed.unpack(), w, "unpack {m}x{k}x{n}");
            let got = matmul(&x, m, &packed);
            let plain = matmul_plain(&x, m, &w, k, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = b[j] as f64
                        + (0..k)
                            .map(|t| x[i * k + t] as f64 * w[t * n + j] as f64)
                            .sum::<f64>();
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                    assert!(
                        (got[i * n + j] as f64 - want).abs() <= tol,
                        "{m}x{k}x{n} at {i},{j}"
                    );
                    let unbiased = want - b[j] as f64;
                    assert!(
                        (plain[i * n + j] as f64 - unbiased).abs() <= tol,
                        "plain {m}x{k}x{n} at {i},{j}"
                    );
                }
            }
        }
    }
}
