//! Under-trained token detection as mergekit's `--magikarp` runs it
//! (`tokensurgeon/magikarp.py`, after "Fishing for Magikarp", Land & Bartolo 2024): a token is
//! bad when its id has no token or its text names an unused/reserved token; when the model has
//! an LM head, when its input embedding's norm is below the 1 % quantile; and when its row is
//! more similar to the mean row of the unused ids than `max(99 % quantile, 0.5)` (embeddings,
//! and LM head when there is one). In f64 (mergekit: f32; a token within an f32 rounding of a
//! threshold could fall the other way).

use std::collections::{HashMap, HashSet};

use super::matrix::Matrix;
use super::tokens::Key;
use crate::error::Result;

const QUANTILE: f64 = 0.01;

/// torch.quantile's linear interpolation.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (pos - lo as f64) * (v[hi] - v[lo])
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Rows of `m` more similar to the mean of its `unused` rows than the threshold.
fn similar_to_unused(m: &Matrix<'_>, unused: &[usize], bad: &mut HashSet<usize>) -> Result<()> {
    let unused: Vec<usize> = unused.iter().copied().filter(|&i| i < m.rows).collect();
    if unused.is_empty() {
        return Ok(());
    }
    let mut mean = vec![0.0; m.cols];
    for &i in &unused {
        mean.iter_mut()
            .zip(m.row_f64(i)?)
            .for_each(|(s, x)| *s += x);
    }
    mean.iter_mut().for_each(|s| *s /= unused.len() as f64);
    let mn = norm(&mean);
    let mut cos = Vec::with_capacity(m.rows);
    for i in 0..m.rows {
        let r = m.row_f64(i)?;
        let d: f64 = r.iter().zip(&mean).map(|(a, b)| a * b).sum();
        cos.push(d / (norm(&r) * mn).max(1e-8));
    }
    let threshold = quantile(&cos, 1.0 - QUANTILE).max(0.5);
    bad.extend((0..m.rows).filter(|&i| cos[i] > threshold));
    Ok(())
}

/// The tokens of `vocab` that look well trained in a model with these matrices.
pub fn well_trained(
    vocab: &HashMap<Key, u32>,
    embed: &Matrix<'_>,
    lm_head: Option<&Matrix<'_>>,
) -> Result<HashSet<Key>> {
    let ids: HashSet<usize> = vocab.values().map(|&i| i as usize).collect();
    let mut unused: HashSet<usize> = (0..embed.rows).filter(|i| !ids.contains(i)).collect();
    for (k, &i) in vocab {
        let text = k.text();
        if (text.contains("unused_token") || text.contains("reserved_special_token"))
            && (i as usize) < embed.rows
        {
            unused.insert(i as usize);
        }
    }
    let mut unused: Vec<usize> = unused.into_iter().collect();
    unused.sort_unstable();
    let mut bad: HashSet<usize> = unused.iter().copied().collect();
    if lm_head.is_some() {
        let norms = (0..embed.rows)
            .map(|i| embed.row_f64(i).map(|r| norm(&r)))
            .collect::<Result<Vec<f64>>>()?;
        let threshold = quantile(&norms, QUANTILE);
        bad.extend((0..embed.rows).filter(|&i| norms[i] < threshold));
    }
    if !unused.is_empty() {
        similar_to_unused(embed, &unused, &mut bad)?;
        if let Some(h) = lm_head {
            similar_to_unused(h, &unused, &mut bad)?;
        }
    }
    Ok(vocab
        .iter()
        .filter(|(_, i)| !bad.contains(&(**i as usize)))
        .map(|(k, _)| k.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [3.0, 1.0, 2.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
        assert!((quantile(&v, 0.01) - 1.04).abs() < 1e-12);
        assert!((quantile(&v, 0.99) - 4.96).abs() < 1e-12);
    }
}
