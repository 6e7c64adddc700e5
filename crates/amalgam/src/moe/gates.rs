//! Router weights, as mergekit-moe's `get_gate_params` makes them: per expert, the vector of its
//! positive prompts minus that of its negative prompts, L2-normalised per layer; or random.
//!
//! The prompt vectors need the base model's tokenizer and forward pass, which live in the
//! evaluation crate: they come through [`PromptEncoder`], so this crate stays free of the
//! inference stack.

use crate::error::{Error, Result};
use crate::methods::rng::Key;
use crate::moe::config::{ExpertConfig, GateMode, MoeConfig};

/// What the gates need from the base model.
pub trait PromptEncoder {
    /// For `prompts` (each tokenized with the base's tokenizer, BOS prepended), one vector per
    /// decoder layer (`[layers][hidden]`) as mergekit computes it for `mode`:
    /// - `hidden`/`hidden_last`: the residual stream entering each layer at the last token,
    ///   averaged over the prompts;
    /// - `hidden_avg`: the same averaged over every position of the left-padded batch;
    /// - `cheap_embed`: the sum of the prompts' token embeddings, L2-normalised, for every layer.
    ///
    /// Errors name the prompt (e.g. one that tokenizes to nothing).
    fn encode(&mut self, prompts: &[String], mode: GateMode) -> Result<Vec<Vec<f32>>>;

    /// Every prompt set [`encode`](Self::encode) will be asked for, before the first call, so
    /// that an encoder can compute them all in one pass over the model (each set still its own
    /// batch). The default does nothing.
    fn prepare(&mut self, _sets: &[&[String]], _mode: GateMode) -> Result<()> {
        Ok(())
    }
}

/// Router weights: per layer, `[experts × hidden]` row-major, for every gated expert of
/// [`MoeConfig::gated`] (routed experts first, then the shared one).
#[derive(Clone, Debug)]
pub struct Gates {
    /// Per layer.
    pub layers: Vec<Vec<f32>>,
    /// Experts per layer.
    pub experts: usize,
    /// Hidden size.
    pub hidden: usize,
}

impl Gates {
    /// Row `e` of layer `l`.
    pub fn row(&self, l: usize, e: usize) -> &[f32] {
        &self.layers[l][e * self.hidden..(e + 1) * self.hidden]
    }

    /// Rows `experts` of layer `l`, row-major.
    pub fn rows(&self, l: usize, experts: std::ops::Range<usize>) -> Vec<f32> {
        self.layers[l][experts.start * self.hidden..experts.end * self.hidden].to_vec()
    }
}

/// The gates of `config` for a base of `layers` layers and `hidden` width. `encoder` is needed
/// unless the mode is random; `seed` keys the random modes.
pub fn compute(
    config: &MoeConfig,
    layers: usize,
    hidden: usize,
    encoder: Option<&mut dyn PromptEncoder>,
    seed: u64,
) -> Result<Gates> {
    let gated = config.gated();
    let experts = gated.len();
    if config.gate_mode.is_random() {
        let layers = (0..layers)
            .map(|l| random(config.gate_mode, seed, l, experts * hidden, hidden))
            .collect();
        return Ok(Gates {
            layers,
            experts,
            hidden,
        });
    }
    let encoder = encoder.ok_or_else(|| {
        config.error(format!(
            "gate_mode {} needs the base model's forward pass, which this build of amalgam lacks (built without the `eval` feature)",
            config.gate_mode.name()
        ))
    })?;
    let sets: Vec<&[String]> = gated
        .iter()
        .flat_map(|e| [e.positive(), e.negative()])
        .filter(|p| !p.is_empty())
        .collect();
    // A failure here (a bad prompt) is reported again, naming its expert, by the calls below.
    let _ = encoder.prepare(&sets, config.gate_mode);
    let mut out = vec![vec![0f32; experts * hidden]; layers];
    let named = config.all_experts();
    for (e, expert) in gated.iter().enumerate() {
        let what = &named
            .iter()
            .find(|(_, x)| std::ptr::eq(*x, *expert))
            .expect("a gated expert is one of the config's")
            .0;
        let v = expert_vector(config, expert, encoder, layers, hidden)
            .map_err(|err| prefixed(err, what))?;
        for (l, row) in v.into_iter().enumerate() {
            out[l][e * hidden..(e + 1) * hidden].copy_from_slice(&row);
        }
    }
    Ok(Gates {
        layers: out,
        experts,
        hidden,
    })
}

/// One expert's vector per layer: positive minus negative, L2-normalised (norm clamped at
/// 1e-8, as mergekit does).
fn expert_vector(
    config: &MoeConfig,
    expert: &ExpertConfig,
    encoder: &mut dyn PromptEncoder,
    layers: usize,
    hidden: usize,
) -> Result<Vec<Vec<f32>>> {
    let mode = config.gate_mode;
    let check = |v: &Vec<Vec<f32>>| -> Result<()> {
        if v.len() != layers || v.iter().any(|r| r.len() != hidden) {
            return Err(Error::argument(
                "prompt vectors",
                format!(
                    "the encoder returned {} layers of widths {:?}; the base has {layers} layers of width {hidden}",
                    v.len(),
                    v.iter().map(Vec::len).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    };
    let mut v = encoder.encode(expert.positive(), mode)?;
    check(&v)?;
    if !expert.negative().is_empty() {
        let neg = encoder.encode(expert.negative(), mode)?;
        check(&neg)?;
        for (row, n) in v.iter_mut().zip(&neg) {
            row.iter_mut().zip(n).for_each(|(a, b)| *a -= b);
        }
    }
    // In f32, as torch computes it for an f32 forward (so cheap_embed's f32 gates match
    // mergekit's to the last bit but for reduction order).
    for row in &mut v {
        let norm = row.iter().map(|&x| x * x).sum::<f32>().sqrt().max(1e-8);
        row.iter_mut().for_each(|x| *x /= norm);
        if !crate::simd::all_finite(row) {
            return Err(Error::argument(
                "prompt vectors",
                "the base model's hidden states hold NaN or infinity for these prompts; check the base model",
            ));
        }
    }
    Ok(v)
}

/// `err` with `what` (the expert) in front of its message.
fn prefixed(err: Error, what: &str) -> Error {
    match err {
        Error::InvalidArgument { what: w, reason } => Error::InvalidArgument {
            what: format!("{what}: {w}"),
            reason,
        },
        other => Error::InvalidArgument {
            what: what.to_string(),
            reason: other.to_string(),
        },
    }
}

/// One layer's random gate (`n` entries): standard normal for `random`, uniform in ±1/√hidden for
/// `uniform_random` (mergekit draws them from torch's global generator, unseeded; these are
/// counter-based, keyed by the seed and the layer, so a seed gives the same gates everywhere).
fn random(mode: GateMode, seed: u64, layer: usize, n: usize, hidden: usize) -> Vec<f32> {
    let key = Key::new(seed, "moe.gate", layer);
    let uniform = |i: u64| ((key.bits(i) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    match mode {
        GateMode::UniformRandom => {
            let scale = (1.0 / hidden as f64).sqrt();
            (0..n as u64)
                .map(|i| ((uniform(i) * 2.0 - 1.0) * scale) as f32)
                .collect()
        }
        _ => (0..n as u64).map(|i| normal(&key, i) as f32).collect(),
    }
}

/// A standard normal draw for element `i` of `key`'s stream (Box–Muller on two counter-based
/// uniforms).
pub fn normal(key: &Key, i: u64) -> f64 {
    let u = |j: u64| ((key.bits(j) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (u1, u2) = (u(2 * i), u(2 * i + 1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// mergekit's `warn_degenerate_gates`: the layers whose gate matrix has a condition number
/// (largest over smallest singular value) above 5, where experts will be underused.
pub fn degenerate_layers(gates: &Gates) -> Vec<usize> {
    (0..gates.layers.len())
        .filter(|&l| condition(&gates.layers[l], gates.experts, gates.hidden) > 5.0)
        .collect()
}

/// The 2-norm condition number of a row-major `m × n` matrix (infinite when rank-deficient).
fn condition(a: &[f32], m: usize, n: usize) -> f64 {
    if m == 0 || n == 0 {
        return 1.0;
    }
    match crate::linalg::thin_svd(crate::linalg::rows(a, m, n)) {
        Ok(svd) => {
            let max = svd.s.first().copied().unwrap_or(0.0) as f64;
            let min = svd.s.last().copied().unwrap_or(0.0) as f64;
            if min <= 0.0 { f64::INFINITY } else { max / min }
        }
        Err(_) => f64::INFINITY,
    }
}

/// mergekit's wording for [`degenerate_layers`].
pub fn degenerate_warning(layers: &[usize], total: usize) -> Option<String> {
    let which = match layers {
        [] => return None,
        [a] => format!("layer {a} has"),
        [a, b] => format!("layers {a} and {b} have"),
        _ if layers.len() >= total => "ALL layers have".to_string(),
        [init @ .., last] => format!(
            "layers {}, and {last} have",
            init.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Some(format!(
        "{which} degenerate routing parameters (gate matrix condition number above 5) - your prompts may be too similar; one or more experts will be underused"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// An encoder that returns a fixed vector per prompt set, counting calls.
    struct Fixed(Vec<(Vec<String>, Vec<Vec<f32>>)>);

    impl PromptEncoder for Fixed {
        fn encode(&mut self, prompts: &[String], _: GateMode) -> Result<Vec<Vec<f32>>> {
            Ok(self
                .0
                .iter()
                .find(|(p, _)| p == prompts)
                .expect("known prompts")
                .1
                .clone())
        }
    }

    fn config(text: &str) -> MoeConfig {
        MoeConfig::parse(Path::new("moe.yml"), text).unwrap()
    }

    #[test]
    fn positive_minus_negative_normalised_per_layer() {
        let c = config(
            "base_model: b\ngate_mode: hidden\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n    negative_prompts: [n]\n  - source_model: y\n    positive_prompts: [b]\n",
        );
        let s = |x: &str| vec![x.to_string()];
        let mut enc = Fixed(vec![
            (s("a"), vec![vec![3.0, 4.0], vec![1.0, 1.0]]),
            (s("n"), vec![vec![3.0, 0.0], vec![1.0, 0.0]]),
            (s("b"), vec![vec![0.0, 0.0], vec![2.0, 0.0]]),
        ]);
        let g = compute(&c, 2, 2, Some(&mut enc), 0).unwrap();
        assert_eq!(g.row(0, 0), [0.0, 1.0]);
        assert_eq!(g.row(1, 0), [0.0, 1.0]);
        // A zero vector stays zero (norm clamped), as in mergekit.
        assert_eq!(g.row(0, 1), [0.0, 0.0]);
        assert_eq!(g.row(1, 1), [1.0, 0.0]);
    }

    #[test]
    fn random_gates_are_seeded_and_scaled() {
        let c = config(
            "base_model: b\ngate_mode: uniform_random\nexperts:\n  - source_model: x\n  - source_model: y\n",
        );
        let a = compute(&c, 3, 64, None, 7).unwrap();
        let b = compute(&c, 3, 64, None, 7).unwrap();
        let other = compute(&c, 3, 64, None, 8).unwrap();
        assert_eq!(a.layers, b.layers);
        assert_ne!(a.layers, other.layers);
        assert_ne!(a.layers[0], a.layers[1]);
        let bound = 1.0 / 8.0;
        assert!(a.layers.iter().flatten().all(|&x| x.abs() <= bound));
        let max = a.layers.iter().flatten().fold(0f32, |m, &x| m.max(x.abs()));
        assert!(max > 0.9 * bound, "{max}");
        let c = config(
            "base_model: b\ngate_mode: random\nexperts:\n  - source_model: x\n  - source_model: y\n",
        );
        let g = compute(&c, 4, 1000, None, 1).unwrap();
        let all: Vec<f64> = g.layers.iter().flatten().map(|&x| x as f64).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn hidden_gates_without_an_encoder_say_why() {
        let c = config(
            "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n  - source_model: y\n    positive_prompts: [b]\n",
        );
        let e = compute(&c, 1, 2, None, 0).unwrap_err().to_string();
        assert!(e.contains("eval"), "{e}");
    }

    #[test]
    fn degenerate_gates_are_found() {
        let good = Gates {
            layers: vec![vec![1.0, 0.0, 0.0, 1.0], vec![1.0, 0.0, 0.99, 0.1]],
            experts: 2,
            hidden: 2,
        };
        assert_eq!(degenerate_layers(&good), [1]);
        assert_eq!(
            degenerate_warning(&[1], 2).unwrap(),
            "layer 1 has degenerate routing parameters (gate matrix condition number above 5) - your prompts may be too similar; one or more experts will be underused"
        );
        assert!(
            degenerate_warning(&[0, 1], 2)
                .unwrap()
                .starts_with("layers 0 and 1 have")
        );
        assert!(
            degenerate_warning(&[0, 1, 2], 3)
                .unwrap()
                .starts_with("ALL layers")
        );
        assert!(
            degenerate_warning(&[0, 2, 3], 5)
                .unwrap()
                .starts_with("layers 0, 2, and 3 have")
        );
        assert!(degenerate_warning(&[], 5).is_none());
    }
}
