//! The `amalgam moe` config: mergekit-moe 0.1.5's YAML schema, with unknown keys refused (mergekit
//! ignores them, so a misspelt `experts_per_tokens` silently means the default there).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// How the router weights are made (mergekit's `gate_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMode {
    /// The residual stream entering each layer at the prompts' last token (mergekit's default;
    /// its `hidden` takes the last token, as `hidden_last` does).
    #[default]
    Hidden,
    /// The residual stream entering each layer averaged over the padded sequence (left padding
    /// included, as mergekit averages it).
    HiddenAvg,
    /// The same as `hidden`.
    HiddenLast,
    /// The normalised sum of the prompts' token embeddings, the same for every layer.
    CheapEmbed,
    /// Standard normal entries (seeded by `--seed`).
    Random,
    /// Uniform in ±1/√hidden, nn.Linear's initialisation (seeded by `--seed`).
    UniformRandom,
}

impl GateMode {
    /// The name the config uses.
    pub fn name(self) -> &'static str {
        match self {
            GateMode::Hidden => "hidden",
            GateMode::HiddenAvg => "hidden_avg",
            GateMode::HiddenLast => "hidden_last",
            GateMode::CheapEmbed => "cheap_embed",
            GateMode::Random => "random",
            GateMode::UniformRandom => "uniform_random",
        }
    }

    /// Whether the gates come from forward passes of the base model.
    pub fn needs_forward(self) -> bool {
        matches!(
            self,
            GateMode::Hidden | GateMode::HiddenAvg | GateMode::HiddenLast
        )
    }

    /// Whether the gates are random (no prompts read).
    pub fn is_random(self) -> bool {
        matches!(self, GateMode::Random | GateMode::UniformRandom)
    }
}

/// One expert: a model whose MLPs become one expert of every layer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertConfig {
    /// The model (a folder, or `path+adapter`).
    pub source_model: String,
    /// Prompts that should be routed to this expert.
    #[serde(default)]
    pub positive_prompts: Option<Vec<String>>,
    /// Prompts that should not (their vector is subtracted).
    #[serde(default)]
    pub negative_prompts: Option<Vec<String>>,
    /// Standard deviation of Gaussian noise added to the expert's MLP weights.
    #[serde(default)]
    pub noise_scale: Option<f64>,
    /// Factor on the expert's `down_proj` (its contribution to the residual stream).
    #[serde(default)]
    pub residual_scale: Option<f64>,
}

impl ExpertConfig {
    /// The positive prompts (none given: empty).
    pub fn positive(&self) -> &[String] {
        self.positive_prompts.as_deref().unwrap_or(&[])
    }

    /// The negative prompts (none given: empty).
    pub fn negative(&self) -> &[String] {
        self.negative_prompts.as_deref().unwrap_or(&[])
    }
}

fn two() -> usize {
    2
}

/// A mergekit-moe config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// The model that gives attention, norms, embeddings and LM head.
    pub base_model: String,
    /// The routed experts, in slot order.
    pub experts: Vec<ExpertConfig>,
    /// How the router weights are made.
    #[serde(default)]
    pub gate_mode: GateMode,
    /// Output dtype (mergekit's key).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Output dtype (as in merge configs; wins over `dtype`).
    #[serde(default)]
    pub out_dtype: Option<String>,
    /// Experts each token is routed to.
    #[serde(default = "two")]
    pub experts_per_token: usize,
    /// Experts every token goes through (Qwen2-MoE: exactly one).
    #[serde(default)]
    pub shared_experts: Option<Vec<ExpertConfig>>,
    /// Output architecture, a case-insensitive prefix of `Mixtral`, `Qwen MoE`, `Qwen3 MoE`
    /// (default: Mixtral when it fits, else the first that does).
    #[serde(default)]
    pub architecture: Option<String>,
    /// The file this came from (errors name it).
    #[serde(skip)]
    pub path: PathBuf,
}

impl MoeConfig {
    /// Read and parse a YAML config file.
    pub fn load(path: &Path) -> Result<MoeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        MoeConfig::parse(path, &text)
    }

    /// Parse YAML text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MoeConfig> {
        let mut cfg: MoeConfig = serde_saphyr::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("{e}"),
        })?;
        cfg.path = path.to_path_buf();
        Ok(cfg)
    }

    /// An error about this config.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The shared experts (none given: empty).
    pub fn shared(&self) -> &[ExpertConfig] {
        self.shared_experts.as_deref().unwrap_or(&[])
    }

    /// Every expert that needs a gate vector, routed experts first: the shared expert too when
    /// it has prompts or the gates are random (mergekit's `need_gates`).
    pub fn gated(&self) -> Vec<&ExpertConfig> {
        let mut out: Vec<&ExpertConfig> = self.experts.iter().collect();
        let shared = self.shared();
        if shared.iter().any(|e| !e.positive().is_empty()) || self.gate_mode.is_random() {
            out.extend(shared);
        }
        out
    }

    /// mergekit's `is_bad_config` and the checks of its `build`, with an error naming what to
    /// change. `allow_identical` is mergekit's `--i-understand-this-is-not-useful-without-training`.
    pub fn validate(&self, allow_identical: bool) -> Result<()> {
        let n = self.experts.len();
        if self.experts_per_token < 1 {
            return Err(self.error("experts_per_token must be at least 1"));
        }
        if n < self.experts_per_token {
            return Err(self.error(format!(
                "experts_per_token is {} but there are only {n} experts; give at least as many experts",
                self.experts_per_token
            )));
        }
        let shared = self.shared();
        if shared.len() > 1 {
            return Err(self.error(format!(
                "{} shared experts given; the output architectures take at most one",
                shared.len()
            )));
        }
        let with_prompts = shared.iter().filter(|e| !e.positive().is_empty()).count();
        if with_prompts != 0 && with_prompts != shared.len() {
            return Err(self.error("give prompts for all shared experts or for none, not a mix"));
        }
        for (what, e) in self.all_experts() {
            for (key, v) in [
                ("noise_scale", e.noise_scale),
                ("residual_scale", e.residual_scale),
            ] {
                if let Some(v) = v
                    && !v.is_finite()
                {
                    return Err(self.error(format!("{what}: {key} is {v}; give a finite number")));
                }
            }
            if matches!(e.noise_scale, Some(v) if v < 0.0) {
                return Err(self.error(format!(
                    "{what}: noise_scale is negative; it is a standard deviation"
                )));
            }
        }
        // mergekit exempts only `random`; `uniform_random` reads no prompts either, so amalgam
        // does not ask for them there.
        if self.gate_mode.is_random() {
            return Ok(());
        }
        for (i, e) in self.experts.iter().enumerate() {
            if e.positive().is_empty() {
                return Err(self.error(format!(
                    "expert {i} ({}) has no positive_prompts; gate_mode {} needs prompts that show what to route to it",
                    e.source_model,
                    self.gate_mode.name()
                )));
            }
        }
        let prompts = |e: &ExpertConfig| (e.positive().to_vec(), e.negative().to_vec());
        if n > 1
            && self.experts[1..]
                .iter()
                .all(|e| prompts(e) == prompts(&self.experts[0]))
        {
            return Err(self.error(
                "the positive and negative prompts are identical for all experts, which cannot make a working router; give each expert prompts that reflect what should be routed to it",
            ));
        }
        if !allow_identical
            && n > 1
            && self.experts[1..]
                .iter()
                .all(|e| e.source_model == self.experts[0].source_model)
        {
            return Err(self.error(
                "all experts are the same model: the MoE would cost more and compute the same; pass --allow-identical-experts (mergekit's --i-understand-this-is-not-useful-without-training) if you will train it",
            ));
        }
        Ok(())
    }

    /// Every expert with how errors name it: routed ones, then shared ones.
    pub fn all_experts(&self) -> Vec<(String, &ExpertConfig)> {
        let routed = self
            .experts
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("expert {i} ({})", e.source_model), e));
        let shared = self
            .shared()
            .iter()
            .map(|e| (format!("shared expert ({})", e.source_model), e));
        routed.chain(shared).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MoeConfig> {
        MoeConfig::parse(Path::new("moe.yml"), text)
    }

    const TWO: &str = "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n  - source_model: y\n    positive_prompts: [b]\n";

    #[test]
    fn defaults_are_mergekits() {
        let c = parse(TWO).unwrap();
        assert_eq!(c.gate_mode, GateMode::Hidden);
        assert_eq!(c.experts_per_token, 2);
        assert!(c.shared().is_empty());
        c.validate(false).unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse(&format!("{TWO}experts_per_tokens: 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("experts_per_tokens"), "{e}");
        let e = parse("base_model: b\nexperts:\n  - source_model: x\n    positive_prompt: [a]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("positive_prompt"), "{e}");
        let e = parse(&format!("{TWO}gate_mode: hiddenn\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hiddenn"), "{e}");
    }

    #[test]
    fn validation_follows_mergekit() {
        let bad = |extra: &str| {
            parse(&format!("{TWO}{extra}"))
                .unwrap()
                .validate(false)
                .unwrap_err()
                .to_string()
        };
        assert!(bad("experts_per_token: 3\n").contains("only 2 experts"));
        assert!(bad("experts_per_token: 0\n").contains("at least 1"));
        let same = "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n  - source_model: x\n    positive_prompts: [b]\n";
        let e = parse(same)
            .unwrap()
            .validate(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--allow-identical-experts"), "{e}");
        parse(same).unwrap().validate(true).unwrap();
        let identical = "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n  - source_model: y\n    positive_prompts: [a]\n";
        let e = parse(identical)
            .unwrap()
            .validate(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("identical for all experts"), "{e}");
        let none = "base_model: b\nexperts:\n  - source_model: x\n  - source_model: y\n";
        let e = parse(none)
            .unwrap()
            .validate(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expert 0 (x) has no positive_prompts"), "{e}");
        for mode in ["random", "uniform_random"] {
            let c = parse(&format!("{none}gate_mode: {mode}\n")).unwrap();
            c.validate(false).unwrap();
        }
        assert!(
            bad("shared_experts:\n  - source_model: s\n  - source_model: t\n")
                .contains("at most one")
        );
        let noisy = "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n    noise_scale: -1\n  - source_model: y\n    positive_prompts: [b]\n";
        let e = parse(noisy)
            .unwrap()
            .validate(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expert 0 (x): noise_scale is negative"), "{e}");
    }

    #[test]
    fn the_shared_expert_is_gated_when_it_has_prompts() {
        let c = parse(&format!(
            "{TWO}shared_experts:\n  - source_model: s\n    positive_prompts: [c]\n"
        ))
        .unwrap();
        assert_eq!(c.gated().len(), 3);
        let c = parse(&format!("{TWO}shared_experts:\n  - source_model: s\n")).unwrap();
        assert_eq!(c.gated().len(), 2);
    }
}
