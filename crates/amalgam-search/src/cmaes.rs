//! CMA-ES (Hansen's covariance matrix adaptation evolution strategy), ask/tell, minimising.
//!
//! The constants are those of Hansen's tutorial ("The CMA Evolution Strategy: A Tutorial",
//! 2016, table 1) and of his `purecma`: default population `4 + ⌊3 ln n⌋`, log-linear positive
//! recombination weights over the better half, cumulation for σ (CSA) and for the rank-one
//! update, rank-μ update, `h_σ` stall. Sampling is deterministic: generation `g`'s candidates
//! are drawn from counter-based normals keyed by (seed, g), so a search replays exactly from its
//! seed and the objective values it was told — which is what lets a results file resume a
//! search and a Ray run repeat a local one.

use amalgam::methods::rng::Key;

/// The state of one CMA-ES run.
#[derive(Clone, Debug)]
pub struct Cmaes {
    n: usize,
    lambda: usize,
    seed: u64,
    generation: usize,
    mean: Vec<f64>,
    sigma: f64,
    /// Covariance matrix, row-major n×n.
    c: Vec<f64>,
    /// Its eigenvectors (columns of `b`, row-major) and the square roots of its eigenvalues.
    b: Vec<f64>,
    d: Vec<f64>,
    pc: Vec<f64>,
    ps: Vec<f64>,
    weights: Vec<f64>,
    mueff: f64,
    cc: f64,
    cs: f64,
    c1: f64,
    cmu: f64,
    damps: f64,
    chi_n: f64,
    /// Candidates of the current generation (asked, not yet told).
    asked: Vec<Vec<f64>>,
}

/// The default population size for `n` dimensions.
pub fn default_population(n: usize) -> usize {
    4 + (3.0 * (n as f64).ln()).floor() as usize
}

impl Cmaes {
    /// A run from `mean` with step size `sigma`, `lambda` candidates per generation (≥ 2).
    pub fn new(mean: Vec<f64>, sigma: f64, lambda: usize, seed: u64) -> Cmaes {
        let n = mean.len();
        assert!(n > 0 && lambda >= 2 && sigma > 0.0, "checked by the caller");
        let nf = n as f64;
        let mu = lambda / 2;
        let raw: Vec<f64> = (0..mu)
            .map(|i| ((lambda as f64 + 1.0) / 2.0).ln() - ((i + 1) as f64).ln())
            .collect();
        let sum: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|w| w / sum).collect();
        let mueff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        let cc = (4.0 + mueff / nf) / (nf + 4.0 + 2.0 * mueff / nf);
        let cs = (mueff + 2.0) / (nf + mueff + 5.0);
        let c1 = 2.0 / ((nf + 1.3).powi(2) + mueff);
        let cmu = (1.0 - c1).min(2.0 * (mueff - 2.0 + 1.0 / mueff) / ((nf + 2.0).powi(2) + mueff));
        let damps = 1.0 + 2.0 * (((mueff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0) + cs;
        let chi_n = nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf));
        let mut eye = vec![0.0; n * n];
        for i in 0..n {
            eye[i * n + i] = 1.0;
        }
        Cmaes {
            n,
            lambda,
            seed,
            generation: 0,
            mean,
            sigma,
            c: eye.clone(),
            b: eye,
            d: vec![1.0; n],
            pc: vec![0.0; n],
            ps: vec![0.0; n],
            weights,
            mueff,
            cc,
            cs,
            c1,
            cmu,
            damps,
            chi_n,
            asked: Vec::new(),
        }
    }

    /// Candidates per generation.
    pub fn population(&self) -> usize {
        self.lambda
    }

    /// Generations told so far.
    pub fn generation(&self) -> usize {
        self.generation
    }

    /// The current mean.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The current step size.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// This generation's candidates (the same on every call until [`Cmaes::tell`]).
    pub fn ask(&mut self) -> Vec<Vec<f64>> {
        if self.asked.is_empty() {
            let n = self.n;
            let key = Key::new(self.seed, "cmaes", self.generation);
            self.asked = (0..self.lambda)
                .map(|k| {
                    let z: Vec<f64> = (0..n).map(|i| normal(&key, (k * n + i) as u64)).collect();
                    // y = B · (d ⊙ z); x = m + σ y
                    (0..n)
                        .map(|r| {
                            let y: f64 = (0..n).map(|j| self.b[r * n + j] * self.d[j] * z[j]).sum();
                            self.mean[r] + self.sigma * y
                        })
                        .collect()
                })
                .collect();
        }
        self.asked.clone()
    }

    /// Tell the objective values (to minimise) of the candidates [`Cmaes::ask`] gave, in order.
    pub fn tell(&mut self, values: &[f64]) {
        let xs = self.ask();
        assert_eq!(values.len(), self.lambda, "one value per candidate");
        let n = self.n;
        let mut order: Vec<usize> = (0..self.lambda).collect();
        // NaN ranks last; ties keep candidate order, so the update is deterministic.
        order.sort_by(|&a, &b| {
            let (va, vb) = (values[a], values[b]);
            va.is_nan()
                .cmp(&vb.is_nan())
                .then(va.partial_cmp(&vb).unwrap_or(std::cmp::Ordering::Equal))
        });
        let old = self.mean.clone();
        let mut mean = vec![0.0; n];
        for (w, &k) in self.weights.iter().zip(&order) {
            for i in 0..n {
                mean[i] += w * xs[k][i];
            }
        }
        self.mean = mean;
        let step: Vec<f64> = (0..n)
            .map(|i| (self.mean[i] - old[i]) / self.sigma)
            .collect();
        // C^{-1/2} · step = B · diag(1/d) · Bᵀ · step
        let bt_step: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|r| self.b[r * n + j] * step[r]).sum::<f64>() / self.d[j])
            .collect();
        let inv_sqrt_step: Vec<f64> = (0..n)
            .map(|r| (0..n).map(|j| self.b[r * n + j] * bt_step[j]).sum())
            .collect();
        let ks = (self.cs * (2.0 - self.cs) * self.mueff).sqrt();
        for (p, s) in self.ps.iter_mut().zip(&inv_sqrt_step) {
            *p = (1.0 - self.cs) * *p + ks * s;
        }
        let ps_norm = self.ps.iter().map(|v| v * v).sum::<f64>().sqrt();
        let g = (self.generation + 1) as f64;
        let hsig = ps_norm / (1.0 - (1.0 - self.cs).powf(2.0 * g)).sqrt() / self.chi_n
            < 1.4 + 2.0 / (n as f64 + 1.0);
        let hsig = if hsig { 1.0 } else { 0.0 };
        let kc = (self.cc * (2.0 - self.cc) * self.mueff).sqrt();
        for (p, s) in self.pc.iter_mut().zip(&step) {
            *p = (1.0 - self.cc) * *p + hsig * kc * s;
        }
        let dh = (1.0 - hsig) * self.cc * (2.0 - self.cc);
        let keep = 1.0 - self.c1 - self.cmu;
        let ys: Vec<Vec<f64>> = order[..self.weights.len()]
            .iter()
            .map(|&k| (0..n).map(|i| (xs[k][i] - old[i]) / self.sigma).collect())
            .collect();
        for r in 0..n {
            for j in 0..n {
                let rank_mu: f64 = self
                    .weights
                    .iter()
                    .zip(&ys)
                    .map(|(w, y)| w * y[r] * y[j])
                    .sum();
                let c = &mut self.c[r * n + j];
                *c = keep * *c + self.c1 * (self.pc[r] * self.pc[j] + dh * *c) + self.cmu * rank_mu;
            }
        }
        self.sigma *= ((self.cs / self.damps) * (ps_norm / self.chi_n - 1.0)).exp();
        let (b, eig) = jacobi_eigen(&self.c, n);
        self.b = b;
        self.d = eig.iter().map(|e| e.max(1e-300).sqrt()).collect();
        self.generation += 1;
        self.asked.clear();
    }
}

/// A standard normal from two counter-based uniforms (Box–Muller).
fn normal(key: &Key, index: u64) -> f64 {
    let bits = |i: u64| (key.bits(i) >> 11) as f64 / (1u64 << 53) as f64;
    let u1 = 1.0 - bits(2 * index); // (0, 1]
    let u2 = bits(2 * index + 1);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Eigendecomposition of the symmetric n×n matrix `a` (row-major) by cyclic Jacobi rotations:
/// the eigenvectors as the columns of a row-major matrix, and the eigenvalues. Exact to rounding
/// and deterministic; CMA-ES dimensions are small (tens to a few hundred).
fn jacobi_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = a.to_vec();
    // Symmetrise against rounding in the update.
    for r in 0..n {
        for j in r + 1..n {
            let s = 0.5 * (m[r * n + j] + m[j * n + r]);
            m[r * n + j] = s;
            m[j * n + r] = s;
        }
    }
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|r| (0..n).filter(move |&j| j != r).map(move |j| (r, j)))
            .map(|(r, j)| m[r * n + j] * m[r * n + j])
            .sum();
        let diag: f64 = (0..n).map(|i| m[i * n + i] * m[i * n + i]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let eig = (0..n).map(|i| m[i * n + i]).collect();
    (v, eig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimise(f: impl Fn(&[f64]) -> f64, x0: Vec<f64>, sigma: f64, gens: usize) -> (f64, Cmaes) {
        let lambda = default_population(x0.len());
        let mut es = Cmaes::new(x0, sigma, lambda, 7);
        let mut best = f64::INFINITY;
        for _ in 0..gens {
            let xs = es.ask();
            let v: Vec<f64> = xs.iter().map(|x| f(x)).collect();
            best = v.iter().cloned().fold(best, f64::min);
            es.tell(&v);
        }
        (best, es)
    }

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix() {
        let n = 5;
        let a: Vec<f64> = (0..n * n)
            .map(|k| {
                let (r, j) = (k / n, k % n);
                1.0 / (1.0 + r as f64 + j as f64) + if r == j { 2.0 } else { 0.0 }
            })
            .collect();
        let (v, e) = jacobi_eigen(&a, n);
        for r in 0..n {
            for j in 0..n {
                let back: f64 = (0..n).map(|k| v[r * n + k] * e[k] * v[j * n + k]).sum();
                assert!((back - a[r * n + j]).abs() < 1e-12, "{r},{j}: {back}");
            }
        }
    }

    #[test]
    fn converges_on_the_sphere() {
        let (best, es) = minimise(
            |x| x.iter().map(|v| (v - 0.3).powi(2)).sum(),
            vec![0.0; 8],
            0.5,
            150,
        );
        assert!(best < 1e-10, "{best}");
        assert!(
            es.mean().iter().all(|m| (m - 0.3).abs() < 1e-4),
            "{:?}",
            es.mean()
        );
    }

    #[test]
    fn converges_on_rosenbrock() {
        let rosen = |x: &[f64]| -> f64 {
            x.windows(2)
                .map(|w| 100.0 * (w[1] - w[0] * w[0]).powi(2) + (1.0 - w[0]).powi(2))
                .sum()
        };
        let (best, es) = minimise(rosen, vec![0.0; 6], 0.3, 600);
        assert!(best < 1e-8, "{best}");
        assert!(
            es.mean().iter().all(|m| (m - 1.0).abs() < 1e-3),
            "{:?}",
            es.mean()
        );
    }

    #[test]
    fn the_same_seed_and_values_give_the_same_candidates() {
        let f = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>();
        let (_, a) = minimise(f, vec![1.0; 4], 0.2, 10);
        let (_, b) = minimise(f, vec![1.0; 4], 0.2, 10);
        assert_eq!(a.clone().ask(), b.clone().ask());
        let mut c = Cmaes::new(vec![1.0; 4], 0.2, default_population(4), 8);
        assert_ne!(
            a.clone().ask(),
            c.ask(),
            "another seed samples other candidates"
        );
    }

    #[test]
    fn the_normals_have_unit_variance() {
        let key = Key::new(1, "t", 0);
        let xs: Vec<f64> = (0..20000).map(|i| normal(&key, i)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.04,
            "{mean} {var}"
        );
    }
}
