//! PEFT's `add_weighted_adapter` combination types, per module, with PEFT's semantics
//! (ALGORITHMS.md §5.1), plus the exact low-rank SVD they and KnOTS build on.
//!
//! Factor-space types (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`)
//! combine the stacks of `A`s and of `B`s separately with weights `a_i = sgn(w_i s_i)·√|w_i s_i|`
//! and `b_i = √|w_i s_i|`, so `B·A` has cross terms. `cat` stacks the factors: exact, rank
//! `Σ r_i`. Delta-space types (`svd`, `*_svd`) combine the full `ΔW_i = s_i B_i A_i` and
//! re-factor the result: `B = U_r diag(σ_r)`, `A = V_rᵀ`.
//!
//! PEFT's primitives on a stack of tensors `t_i` with weights `w_i`: magnitude pruning keeps
//! the `⌊density·n⌋` largest `|t_i|` of each tensor; random pruning keeps each entry with
//! probability `density` and divides by it (DARE); a density ≥ 1 prunes nothing. TIES elects
//! per entry the sign of `Σ t_i` (`total`) or of `Σ sgn t_i` (`frequency`) over the pruned,
//! unweighted tensors, ties going to +1, and averages `w_i t_i` over the inputs whose pruned
//! entry has that sign (0 where none). DARE's mask is amalgam's seeded stream, so it is not
//! PEFT's (torch's generator) draw for draw.

use faer::Mat;

use crate::linalg;
use crate::methods::rng::{Key, threshold32};
use crate::methods::sparsify::top_k_indices;

/// A PEFT combination type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// Factors stacked: exact, rank `Σ r_i`.
    Cat,
    /// `Σ w_i ΔW_i`, re-factored.
    Svd,
    /// Factor-space weighted sums.
    Linear,
    /// Factor-space TIES.
    Ties,
    /// Delta-space TIES, re-factored.
    TiesSvd,
    /// Factor-space DARE.
    DareLinear,
    /// Factor-space DARE-TIES.
    DareTies,
    /// Delta-space DARE, re-factored.
    DareLinearSvd,
    /// Delta-space DARE-TIES, re-factored.
    DareTiesSvd,
    /// Factor-space magnitude pruning.
    MagnitudePrune,
    /// Delta-space magnitude pruning, re-factored.
    MagnitudePruneSvd,
}

/// Every combination type by PEFT's name.
pub const COMBINATIONS: &[(&str, Combination)] = &[
    ("cat", Combination::Cat),
    ("svd", Combination::Svd),
    ("linear", Combination::Linear),
    ("ties", Combination::Ties),
    ("ties_svd", Combination::TiesSvd),
    ("dare_linear", Combination::DareLinear),
    ("dare_ties", Combination::DareTies),
    ("dare_linear_svd", Combination::DareLinearSvd),
    ("dare_ties_svd", Combination::DareTiesSvd),
    ("magnitude_prune", Combination::MagnitudePrune),
    ("magnitude_prune_svd", Combination::MagnitudePruneSvd),
];

/// The primitive a combination applies to its stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `Σ w_i t_i`.
    Sum,
    /// Magnitude pruning, then TIES.
    Ties,
    /// Random pruning with rescale, then the sum.
    DareLinear,
    /// Random pruning with rescale, then TIES.
    DareTies,
    /// Magnitude pruning, then the sum.
    MagnitudePrune,
}

impl Combination {
    /// The type named `name`.
    pub fn parse(name: &str) -> Option<Combination> {
        COMBINATIONS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }

    /// Whether it combines full deltas and re-factors them (`svd`, `*_svd`).
    pub fn in_delta_space(self) -> bool {
        use Combination::*;
        matches!(
            self,
            Svd | TiesSvd | DareLinearSvd | DareTiesSvd | MagnitudePruneSvd
        )
    }

    /// The primitive it applies (`cat` has none).
    pub fn rule(self) -> Rule {
        use Combination::*;
        match self {
            Cat | Svd | Linear => Rule::Sum,
            Ties | TiesSvd => Rule::Ties,
            DareLinear | DareLinearSvd => Rule::DareLinear,
            DareTies | DareTiesSvd => Rule::DareTies,
            MagnitudePrune | MagnitudePruneSvd => Rule::MagnitudePrune,
        }
    }

    /// Whether it needs `density`.
    pub fn needs_density(self) -> bool {
        self.rule() != Rule::Sum
    }
}

/// How TIES elects the sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignMethod {
    /// Sign of the sum of values.
    Total,
    /// Sign of the sum of signs.
    Frequency,
}

/// Settings of a rule.
#[derive(Clone, Copy, Debug)]
pub struct RuleParams {
    /// Fraction kept by pruning.
    pub density: f64,
    /// TIES sign election.
    pub sign: SignMethod,
}

/// Apply `rule` to tensors `t` (equal lengths) with `weights`, into `out`. `key(i)` draws the
/// DARE mask of input `i`.
pub fn apply_rule(
    rule: Rule,
    t: &[&[f32]],
    weights: &[f64],
    p: RuleParams,
    key: impl Fn(usize) -> Key,
    out: &mut [f32],
) {
    let prune = |i: usize, x: &[f32]| -> Vec<f32> {
        let mut v = x.to_vec();
        if p.density >= 1.0 {
            return v;
        }
        match rule {
            Rule::Ties | Rule::MagnitudePrune => {
                let k = (p.density * v.len() as f64) as usize;
                let mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
                let mut keep = vec![false; v.len()];
                top_k_indices(&mags, k)
                    .into_iter()
                    .for_each(|j| keep[j] = true);
                v.iter_mut()
                    .zip(keep)
                    .for_each(|(x, k)| *x = if k { *x } else { 0.0 });
            }
            Rule::DareLinear | Rule::DareTies => {
                key(i).mask32(0, threshold32(p.density), &mut v);
                let inv = (1.0 / p.density) as f32;
                v.iter_mut().for_each(|x| *x *= inv);
            }
            Rule::Sum => {}
        }
        v
    };
    let pruned: Vec<Vec<f32>> = match rule {
        Rule::Sum => t.iter().map(|x| x.to_vec()).collect(),
        _ => t.iter().enumerate().map(|(i, x)| prune(i, x)).collect(),
    };
    let ties = matches!(rule, Rule::Ties | Rule::DareTies);
    for (j, o) in out.iter_mut().enumerate() {
        if !ties {
            *o = pruned
                .iter()
                .zip(weights)
                .map(|(x, &w)| x[j] * w as f32)
                .sum();
            continue;
        }
        let elect: f32 = match p.sign {
            SignMethod::Total => pruned.iter().map(|x| x[j]).sum(),
            SignMethod::Frequency => pruned.iter().map(|x| sign(x[j])).sum(),
        };
        let majority = if elect >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut count) = (0.0f32, 0u32);
        for (x, &w) in pruned.iter().zip(weights) {
            if sign(x[j]) == majority {
                sum += x[j] * w as f32;
                count += 1;
            }
        }
        *o = sum / count.max(1) as f32;
    }
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The exact thin SVD of `B·A` (`B`: `m × k`, `A`: `k × n`, row-major) through two QR
/// factorisations and the SVD of a `k × k` matrix: `O((m + n)·k²)` instead of a dense SVD.
pub fn low_rank_svd(
    b: &[f32],
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Result<linalg::Svd, String> {
    let bm = linalg::rows(b, m, k);
    let at = linalg::rows(a, k, n).transpose().to_owned();
    let qb = bm.qr();
    let qa = at.as_ref().qr();
    let (q_b, r_b) = (qb.compute_thin_Q(), qb.thin_R().to_owned());
    let (q_a, r_a) = (qa.compute_thin_Q(), qa.thin_R().to_owned());
    // B·A = Q_b R_b R_aᵀ Q_aᵀ.
    let mut core = Mat::<f32>::zeros(r_b.nrows(), r_a.nrows());
    linalg::matmul(core.as_mut(), r_b.as_ref(), r_a.as_ref().transpose());
    let small = linalg::thin_svd(core.as_ref())?;
    let mut u = Mat::<f32>::zeros(m, small.s.len());
    linalg::matmul(u.as_mut(), q_b.as_ref(), small.u.as_ref());
    let mut v = Mat::<f32>::zeros(n, small.s.len());
    linalg::matmul(v.as_mut(), q_a.as_ref(), small.v.as_ref());
    Ok(linalg::Svd { u, s: small.s, v })
}

/// PEFT's re-factorisation of a combined delta's SVD: `B = U_r diag(σ_r)` (`m × r`),
/// `A = V_rᵀ` (`r × n`), row-major; then, with `clamp`, both clamped to `±q` where `q` is the
/// `clamp` quantile (linear interpolation, as `torch.quantile`) of all their entries.
pub fn refactor(svd: &linalg::Svd, r: usize, clamp: Option<f64>) -> (Vec<f32>, Vec<f32>) {
    let (m, n) = (svd.u.nrows(), svd.v.nrows());
    let r = r.min(svd.s.len());
    let mut b = vec![0.0f32; m * r];
    let mut a = vec![0.0f32; r * n];
    for j in 0..r {
        for i in 0..m {
            b[i * r + j] = svd.u[(i, j)] * svd.s[j];
        }
        for (c, x) in a[j * n..(j + 1) * n].iter_mut().enumerate() {
            *x = svd.v[(c, j)];
        }
    }
    if let Some(q) = clamp {
        let mut all: Vec<f32> = b.iter().chain(&a).copied().collect();
        let hi = quantile(&mut all, q);
        // torch.clamp(x, −hi, hi) = min(max(x, −hi), hi): a negative quantile sets all to hi.
        for x in b.iter_mut().chain(a.iter_mut()) {
            *x = x.max(-hi).min(hi);
        }
    }
    (b, a)
}

/// The `q` quantile of `values` with linear interpolation between order statistics.
fn quantile(values: &mut [f32], q: f64) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (values.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(values.len() - 1);
    (f64::from(values[lo]) + frac * f64::from(values[hi] - values[lo])) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RuleParams = RuleParams {
        density: 0.5,
        sign: SignMethod::Total,
    };

    fn run(rule: Rule, t: &[&[f32]], w: &[f64], p: RuleParams) -> Vec<f32> {
        let mut out = vec![0.0; t[0].len()];
        apply_rule(rule, t, w, p, |i| Key::new(1, "t", i), &mut out);
        out
    }

    #[test]
    fn ties_follows_peft() {
        // Pruned to the top 2 of 4: [3, 0, -2, 0] and [0, 0, 4, -5].
        let a = [3.0, 1.0, -2.0, 0.5];
        let b = [0.1, 0.2, 4.0, -5.0];
        let out = run(Rule::Ties, &[&a, &b], &[1.0, 0.5], P);
        // Entry 2: total −2 + 4 > 0 → +1; only b agrees: 0.5·4 / 1. Entry 3: −5 → −1: 0.5·−5.
        assert_eq!(out, vec![3.0, 0.0, 2.0, -2.5]);
        // Frequency: entry 2 has one vote each → tie → +1.
        let f = RuleParams {
            sign: SignMethod::Frequency,
            ..P
        };
        assert_eq!(run(Rule::Ties, &[&a, &b], &[1.0, 0.5], f)[2], 2.0);
        let m = run(Rule::MagnitudePrune, &[&a, &b], &[1.0, 0.5], P);
        assert_eq!(m, vec![3.0, 0.0, 0.0, -2.5]);
        let full = RuleParams { density: 1.0, ..P };
        assert_eq!(
            run(Rule::Sum, &[&a], &[2.0], full),
            vec![6.0, 2.0, -4.0, 1.0]
        );
    }

    #[test]
    fn dare_keeps_about_density_and_rescales() {
        let x = vec![1.0f32; 10_000];
        let out = run(Rule::DareLinear, &[&x], &[1.0], P);
        let kept = out.iter().filter(|&&v| v != 0.0).count();
        assert!((4_700..5_300).contains(&kept), "{kept}");
        assert!(out.iter().all(|&v| v == 0.0 || v == 2.0));
    }

    #[test]
    fn low_rank_svd_is_exact() {
        // B: 5×2, A: 2×4.
        let b = [1.0, 0.0, 0.5, 2.0, -1.0, 1.0, 0.0, 3.0, 2.0, 2.0];
        let a = [1.0, 2.0, 0.0, -1.0, 0.5, 0.0, 1.0, 1.0];
        let svd = low_rank_svd(&b, &a, 5, 2, 4).unwrap();
        let (bb, aa) = refactor(&svd, 2, None);
        for i in 0..5 {
            for j in 0..4 {
                let want: f32 = (0..2).map(|k| b[i * 2 + k] * a[k * 4 + j]).sum();
                let got: f32 = (0..2).map(|k| bb[i * 2 + k] * aa[k * 4 + j]).sum();
                assert!((want - got).abs() < 1e-5, "{i} {j}: {want} vs {got}");
            }
        }
        assert!(svd.s[0] >= svd.s[1]);
    }

    #[test]
    fn clamp_bounds_both_factors_by_the_quantile() {
        let b = [3.0, -1.0, 0.5, 2.0, 4.0, -6.0];
        let a = [1.0, 0.0, 2.0, -1.0, 0.5, 8.0];
        let svd = low_rank_svd(&b, &a, 3, 2, 3).unwrap();
        let (_, a0) = refactor(&svd, 2, None);
        let (bc, ac) = refactor(&svd, 2, Some(0.5));
        let mut all: Vec<f32> = refactor(&svd, 2, None).0;
        all.extend(&a0);
        let hi = quantile(&mut all, 0.5);
        assert!(bc.iter().chain(&ac).all(|x| x.abs() <= hi));
        assert!(
            bc.iter().chain(&ac).any(|x| x.abs() == hi),
            "something was clamped"
        );
        // A negative quantile (most entries negative) does not panic: everything becomes it,
        // as in torch.
        let (bn, _) = refactor(&svd, 2, Some(0.0));
        let mut all: Vec<f32> = refactor(&svd, 2, None).0;
        all.extend(&a0);
        let lo = quantile(&mut all, 0.0);
        assert!(lo < 0.0 && bn.iter().all(|&x| x == lo));
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        // torch.quantile([1,2,3,4], 0.5) = 2.5; 0.9 → 3.7.
        assert_eq!(quantile(&mut v, 0.5), 2.5);
        assert!((quantile(&mut v, 0.9) - 3.7).abs() < 1e-6);
    }
}
