//! Sparsification helpers shared by the task-vector methods: the rescale choices, exact top-k
//! indices for small per-tensor statistics (SCE), and DELLA's magnitude-ranked random mask.
//! Magnitude trimming for TIES and Breadcrumbs is streamed in [`select`](super::select).

use super::rng::Key;

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

/// DELLA's mask for task vector `x`: per row (of `row` elements; a 1-D tensor is one row) rank
/// entries by magnitude, keep each with probability from `density − ε` (smallest) to
/// `density + ε` (largest), one probability `density` for a one-element row (where mergekit
/// divides 0 by 0). Returns per element 0 (dropped) or the factor a kept entry is multiplied
/// by: `1/q` with `inverse`, else 1.
pub fn della_mask(
    x: &[f32],
    density: f64,
    eps: f64,
    row: usize,
    key: Key,
    inverse: bool,
) -> Result<Vec<f32>, String> {
    if density <= 0.0 {
        return Ok(vec![0.0; x.len()]);
    }
    if density + eps >= 1.0 || density - eps <= 0.0 {
        return Err(format!(
            "della: density ± epsilon must lie in (0, 1); got density {density}, epsilon {eps}"
        ));
    }
    let row = row.max(1);
    let mut mult = vec![0f32; x.len()];
    for (ri, (r, m)) in x.chunks(row).zip(mult.chunks_mut(row)).enumerate() {
        let n = r.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| r[a].abs().total_cmp(&r[b].abs()).then(a.cmp(&b)));
        for (rank, &i) in order.iter().enumerate() {
            let q = if n > 1 {
                (density - eps) + rank as f64 / (n - 1) as f64 * 2.0 * eps
            } else {
                density
            };
            if key.uniform((ri * row + i) as u64) < q {
                m[i] = if inverse { (1.0 / q) as f32 } else { 1.0 };
            }
        }
    }
    Ok(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn della_probabilities_follow_rank() {
        let row: Vec<f32> = (0..1000).map(|i| i as f32 + 1.0).collect();
        let x: Vec<f32> = row.iter().cycle().take(200_000).copied().collect();
        let m = della_mask(&x, 0.5, 0.2, 1000, Key::new(1, "d", 0), false).unwrap();
        let kept = |lo: usize, hi: usize| {
            m.chunks(1000)
                .map(|r| r[lo..hi].iter().filter(|a| **a != 0.0).count())
                .sum::<usize>() as f64
                / (200.0 * (hi - lo) as f64)
        };
        assert!((kept(0, 100) - 0.31).abs() < 0.03, "{}", kept(0, 100));
        assert!((kept(900, 1000) - 0.69).abs() < 0.03, "{}", kept(900, 1000));
        assert!(della_mask(&x, 0.5, 0.6, 10, Key::new(1, "d", 0), false).is_err());
        let one = della_mask(&[3.0], 0.5, 0.1, 1, Key::new(1, "d", 0), true).unwrap();
        assert!(one[0] == 0.0 || one[0] == 2.0, "{one:?}");
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let mut got = top_k_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 2);
        got.sort();
        assert_eq!(got, [1, 2]);
    }
}
