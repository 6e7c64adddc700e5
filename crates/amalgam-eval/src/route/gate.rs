//! Gates: how much of each expert a routed linear layer adds, per token or per sequence.
//!
//! Token-level gates read the layer's own input `x` (one row per token):
//! - [`smile`]: `logitₑ = ‖Vₑ[:, :gate_k]ᵀ x‖₂`, softmax over the experts, the top-k of the
//!   softmaxed weights, renormalised to sum 1 (FusionBench's `SmileGate` + `SmileMoELinear`).
//! - [`arrow`]: `logitₑ = |x · vₑ|` (not normalised), the top-k logits, softmax of them divided
//!   by the temperature, 0 elsewhere (PEFT's `ArrowLoraLinearLayer`).
//!
//! Sequence-level gates (the calibrated router, the oracle, uniform weights) are computed once
//! per input and broadcast over its tokens ([`broadcast`]).
//!
//! Among equal values the top-k keeps the lower expert index.

/// The indices of the `k` largest of `v` (lower index first among equals), in descending
/// order of value.
pub fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Softmax of `v` in place (max subtracted first), computed in f32 as torch does.
fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// SMILE's weights from its projections: `proj` is `rows × (experts · gate_k)` (row-major, the
/// layer input times each expert's top `gate_k` right singular vectors), the result
/// `rows × experts`.
pub fn smile(proj: &[f32], rows: usize, experts: usize, gate_k: usize, top: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * experts];
    let mut w = vec![0f32; experts];
    for r in 0..rows {
        let row = &proj[r * experts * gate_k..(r + 1) * experts * gate_k];
        for (e, x) in w.iter_mut().enumerate() {
            let p = &row[e * gate_k..(e + 1) * gate_k];
            *x = p.iter().map(|v| v * v).sum::<f32>().sqrt();
        }
        if experts == 1 {
            // FusionBench's gate returns ones for a single expert.
            out[r] = 1.0;
            continue;
        }
        softmax(&mut w);
        let keep = top_k(&w, top);
        let total: f32 = keep.iter().map(|&e| w[e]).sum();
        for &e in &keep {
            out[r * experts + e] = w[e] / total;
        }
    }
    out
}

/// Arrow's weights from the prototype similarities `sim` (`rows × experts`, `x · vₑ`): the
/// top-k of `|sim|`, softmax over them at `temperature`, 0 elsewhere.
pub fn arrow(sim: &[f32], rows: usize, experts: usize, top: usize, temperature: f32) -> Vec<f32> {
    let mut out = vec![0f32; rows * experts];
    for r in 0..rows {
        let s: Vec<f32> = sim[r * experts..(r + 1) * experts]
            .iter()
            .map(|v| v.abs())
            .collect();
        let keep = top_k(&s, top);
        let mut z: Vec<f32> = keep.iter().map(|&e| s[e] / temperature).collect();
        softmax(&mut z);
        for (&e, &c) in keep.iter().zip(&z) {
            out[r * experts + e] = c;
        }
    }
    out
}

/// Per-sequence weights `batch × experts` repeated for each of the `seq` tokens of a row:
/// `(batch · seq) × experts`.
pub fn broadcast(weights: &[f32], batch: usize, seq: usize, experts: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * seq * experts);
    for b in 0..batch {
        let row = &weights[b * experts..(b + 1) * experts];
        for _ in 0..seq {
            out.extend_from_slice(row);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_prefers_larger_values_then_lower_indices() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[3.0, 1.0], 5), vec![0, 1]);
    }

    #[test]
    fn smile_renormalises_the_kept_softmax_weights() {
        // One row, 3 experts, gate_k 2: norms 5, 0, 1 (from (3,4), (0,0), (1,0)).
        let proj = [3.0, 4.0, 0.0, 0.0, 1.0, 0.0];
        let w = smile(&proj, 1, 3, 2, 2);
        // softmax(5, 0, 1) keeps experts 0 and 2: e^5 / (e^5 + e^1) and e^1 / (e^5 + e^1).
        let (a, c) = (5f32.exp(), 1f32.exp());
        assert!((w[0] - a / (a + c)).abs() < 1e-6, "{w:?}");
        assert_eq!(w[1], 0.0);
        assert!((w[2] - c / (a + c)).abs() < 1e-6, "{w:?}");
        // Top-1 is one-hot.
        assert_eq!(smile(&proj, 1, 3, 2, 1), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn arrow_softmaxes_the_top_k_absolute_similarities() {
        let sim = [-2.0, 0.5, 1.0];
        let w = arrow(&sim, 1, 3, 2, 0.5);
        // |sim| top-2: experts 0 (2) and 2 (1); softmax(4, 2).
        let (a, c) = (4f32.exp(), 2f32.exp());
        assert!((w[0] - a / (a + c)).abs() < 1e-6);
        assert_eq!(w[1], 0.0);
        assert!((w[2] - c / (a + c)).abs() < 1e-6);
    }

    #[test]
    fn sequence_weights_repeat_over_tokens() {
        assert_eq!(
            broadcast(&[1.0, 0.0, 0.25, 0.75], 2, 2, 2),
            vec![1.0, 0.0, 1.0, 0.0, 0.25, 0.75, 0.25, 0.75]
        );
    }
}
