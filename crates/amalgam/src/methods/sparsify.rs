//! Sparsification of a task vector, the first of the three parts of every generalized
//! task-arithmetic method: magnitude top-k (TIES), magnitude with outliers removed
//! (Breadcrumbs), random drop (DARE) and magnitude-ranked random drop (DELLA), each with an
//! optional rescale of what is kept.

use super::rng::Stream;

/// How the kept entries are rescaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    /// Not at all.
    None,
    /// Match the L1 norm of the tensor before masking (mergekit's `rescale: true`); skipped when
    /// either norm is below 1e-7.
    MatchL1,
    /// Divide each kept entry by its keep probability (the DARE and DELLA papers).
    InverseKeepProbability,
}

/// Which sparsification.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsify {
    /// Keep the `max(1, ⌊ρn⌋)` largest magnitudes.
    Magnitude,
    /// Drop the `⌊γn⌋` largest magnitudes, then keep the next `⌊ρn⌋`.
    MagnitudeOutliers {
        /// Fraction of the largest entries removed.
        gamma: f64,
    },
    /// Keep each entry with probability ρ.
    Random,
    /// Keep each entry with a probability from ρ−ε (smallest in its row) to ρ+ε (largest).
    DellaMagprune {
        /// Half-width of the keep-probability range.
        epsilon: f64,
    },
}

/// Indices of the `k` largest values of `keys` (ties broken by lower index), unordered.
pub fn top_k_indices(keys: &[f32], k: usize) -> Vec<usize> {
    let n = keys.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let cmp = |a: &usize, b: &usize| keys[*b].total_cmp(&keys[*a]).then(a.cmp(b));
    if k < n {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx
}

/// Sparsify `x` in place with keep fraction `density`. `stream` supplies randomness for the
/// random methods. `row` is the row length for DELLA's per-row ranking.
pub fn sparsify(
    x: &mut [f32],
    method: Sparsify,
    density: f64,
    rescale: Rescale,
    row: usize,
    stream: &mut Stream,
) -> Result<(), String> {
    if density >= 1.0 {
        return Ok(());
    }
    let n = x.len();
    let before_l1: f64 = x.iter().map(|v| v.abs() as f64).sum();
    match method {
        Sparsify::Magnitude => {
            if density <= 0.0 || n == 0 {
                x.fill(0.0);
                return Ok(());
            }
            let k = ((density * n as f64) as usize).max(1);
            let mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            keep_only(x, &top_k_indices(&mags, k));
        }
        Sparsify::MagnitudeOutliers { gamma } => {
            let target = ((density.max(0.0) * n as f64) as usize).min(n);
            let n_top = (gamma * n as f64) as usize;
            let n_bot = n.saturating_sub(target + n_top);
            // Ascending order by magnitude (ties by index); keep positions [n_bot, n_bot+target).
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()).then(a.cmp(&b)));
            let keep = &order[n_bot..(n_bot + target).min(n)];
            keep_only(x, keep);
        }
        Sparsify::Random => {
            if density <= 0.0 {
                x.fill(0.0);
                return Ok(());
            }
            for v in x.iter_mut() {
                if stream.uniform() >= density {
                    *v = 0.0;
                } else if rescale == Rescale::InverseKeepProbability {
                    *v = (*v as f64 / density) as f32;
                }
            }
        }
        Sparsify::DellaMagprune { epsilon } => {
            if density <= 0.0 {
                x.fill(0.0);
                return Ok(());
            }
            if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
                return Err(format!(
                    "della: density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}"
                ));
            }
            della_rows(x, density, epsilon, rescale, row.max(1), stream);
        }
    }
    if rescale == Rescale::MatchL1 {
        let after: f64 = x.iter().map(|v| v.abs() as f64).sum();
        if before_l1 >= 1e-7 && after >= 1e-7 {
            let s = (before_l1 / after) as f32;
            x.iter_mut().for_each(|v| *v *= s);
        }
    }
    Ok(())
}

fn keep_only(x: &mut [f32], keep: &[usize]) {
    let mut mask = vec![false; x.len()];
    keep.iter().for_each(|&i| mask[i] = true);
    x.iter_mut().zip(&mask).for_each(|(v, &k)| {
        if !k {
            *v = 0.0
        }
    });
}

fn della_rows(
    x: &mut [f32],
    density: f64,
    eps: f64,
    rescale: Rescale,
    row: usize,
    stream: &mut Stream,
) {
    for r in x.chunks_mut(row) {
        let n = r.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| r[a].abs().total_cmp(&r[b].abs()).then(a.cmp(&b)));
        let mut prob = vec![density; n];
        if n > 1 {
            for (rank, &i) in order.iter().enumerate() {
                let u = rank as f64 / (n - 1) as f64;
                prob[i] = (density - eps) + u * 2.0 * eps;
            }
        }
        for (v, &q) in r.iter_mut().zip(&prob) {
            if stream.uniform() >= q {
                *v = 0.0;
            } else if rescale == Rescale::InverseKeepProbability {
                *v = (*v as f64 / q) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(x: &[f32], m: Sparsify, d: f64, r: Rescale) -> Vec<f32> {
        let mut v = x.to_vec();
        sparsify(&mut v, m, d, r, x.len(), &mut Stream::new(0, "t", 0)).unwrap();
        v
    }

    #[test]
    fn magnitude_keeps_largest_and_at_least_one() {
        let x = [0.1, -3.0, 2.0, -0.5];
        assert_eq!(
            run(&x, Sparsify::Magnitude, 0.5, Rescale::None),
            [0.0, -3.0, 2.0, 0.0]
        );
        assert_eq!(
            run(&x, Sparsify::Magnitude, 0.01, Rescale::None),
            [0.0, -3.0, 0.0, 0.0]
        );
        assert_eq!(run(&x, Sparsify::Magnitude, 1.0, Rescale::None), x);
        assert_eq!(run(&x, Sparsify::Magnitude, 0.0, Rescale::None), [0.0; 4]);
        let l1 = run(&x, Sparsify::Magnitude, 0.5, Rescale::MatchL1);
        assert!((l1.iter().map(|v| v.abs()).sum::<f32>() - 5.6).abs() < 1e-5);
    }

    #[test]
    fn breadcrumbs_drops_outliers_and_keeps_small_tensors() {
        let x: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        // density 0.5, gamma 0.1: drop the largest 1, keep the next 5.
        let out = run(
            &x,
            Sparsify::MagnitudeOutliers { gamma: 0.1 },
            0.5,
            Rescale::None,
        );
        assert_eq!(out, [0., 0., 0., 0., 5., 6., 7., 8., 9., 0.]);
        // gamma·n < 1 (n_top = 0): mergekit's old empty-slice bug would zero everything.
        let out = run(
            &x[..4],
            Sparsify::MagnitudeOutliers { gamma: 0.01 },
            0.5,
            Rescale::None,
        );
        assert_eq!(out, [0., 0., 3., 4.]);
    }

    #[test]
    fn dare_keeps_density_fraction_and_preserves_l1() {
        let x: Vec<f32> = (0..200_000)
            .map(|i| ((i % 97) as f32 - 48.0) / 10.0)
            .collect();
        let out = run(&x, Sparsify::Random, 0.3, Rescale::MatchL1);
        let kept = out
            .iter()
            .zip(&x)
            .filter(|(o, v)| **o != 0.0 && **v != 0.0)
            .count();
        let nonzero = x.iter().filter(|v| **v != 0.0).count();
        let frac = kept as f64 / nonzero as f64;
        assert!((frac - 0.3).abs() < 0.005, "kept fraction {frac}");
        let l1 = |v: &[f32]| v.iter().map(|a| a.abs() as f64).sum::<f64>();
        assert!((l1(&out) / l1(&x) - 1.0).abs() < 1e-5);
        // Inverse-probability rescale is unbiased: the sum is preserved in expectation.
        let inv = run(&x, Sparsify::Random, 0.3, Rescale::InverseKeepProbability);
        assert!((l1(&inv) / l1(&x) - 1.0).abs() < 0.02);
    }

    #[test]
    fn della_probabilities_follow_rank() {
        let row: Vec<f32> = (0..1000).map(|i| i as f32 + 1.0).collect();
        let x: Vec<f32> = row.iter().cycle().take(200_000).copied().collect();
        let mut v = x.clone();
        sparsify(
            &mut v,
            Sparsify::DellaMagprune { epsilon: 0.2 },
            0.5,
            Rescale::None,
            1000,
            &mut Stream::new(1, "d", 0),
        )
        .unwrap();
        let kept = |lo: usize, hi: usize| {
            v.chunks(1000)
                .map(|r| r[lo..hi].iter().filter(|a| **a != 0.0).count())
                .sum::<usize>() as f64
                / (200.0 * (hi - lo) as f64)
        };
        assert!((kept(0, 100) - 0.31).abs() < 0.03, "{}", kept(0, 100));
        assert!((kept(900, 1000) - 0.69).abs() < 0.03, "{}", kept(900, 1000));
        let mut bad = x.clone();
        assert!(
            sparsify(
                &mut bad,
                Sparsify::DellaMagprune { epsilon: 0.6 },
                0.5,
                Rescale::None,
                10,
                &mut Stream::new(1, "d", 0)
            )
            .is_err()
        );
    }
}
