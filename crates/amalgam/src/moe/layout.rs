//! Output architectures of `amalgam moe`: which one a config gets (mergekit-moe's
//! `select_output_arch`), the `config.json` it writes, and where each tensor comes from.

use serde_json::{Map, Value, json};

use crate::dtype::DType;
use crate::error::Result;
use crate::moe::config::MoeConfig;

/// An MoE architecture amalgam writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutArch {
    /// Mixtral (Llama or Mistral inputs, no shared expert).
    Mixtral,
    /// Qwen2-MoE (Llama, Mistral or Qwen2 inputs, exactly one gated shared expert).
    Qwen2Moe,
    /// Qwen3-MoE (Qwen3 inputs, no shared expert).
    Qwen3Moe,
}

/// How expert tensors are laid out on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// What mergekit-moe 0.1.5 writes, the transformers v5 model layout: Mixtral's and
    /// Qwen3-MoE's experts fused per layer (`mlp.experts.gate_up_proj` `[E, 2I, H]`,
    /// `mlp.experts.down_proj` `[E, H, I]`), the router at `mlp.gate.weight`.
    #[default]
    V5,
    /// The layout before transformers v5, which llama.cpp's converters and older transformers
    /// read: one tensor per expert (Mixtral's `block_sparse_moe.experts.N.w1/w2/w3`).
    Legacy,
}

/// mergekit-moe's output architectures in its order of preference, with the names
/// `architecture:` is matched against (DeepSeek-MoE is recognised, not written yet).
const NAMES: [(&str, Option<OutArch>); 4] = [
    ("Mixtral", Some(OutArch::Mixtral)),
    ("DeepSeek MoE", None),
    ("Qwen MoE", Some(OutArch::Qwen2Moe)),
    ("Qwen3 MoE", Some(OutArch::Qwen3Moe)),
];

impl OutArch {
    /// The name mergekit gives it.
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, a)| *a == Some(self))
            .expect("every architecture is named")
            .0
    }

    /// The `model_type` of its config.
    pub fn model_type(self) -> &'static str {
        match self {
            OutArch::Mixtral => "mixtral",
            OutArch::Qwen2Moe => "qwen2_moe",
            OutArch::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Its `architectures` entry.
    pub fn class(self) -> &'static str {
        match self {
            OutArch::Mixtral => "MixtralForCausalLM",
            OutArch::Qwen2Moe => "Qwen2MoeForCausalLM",
            OutArch::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// Whether its attention has q/k/v biases (the base's are copied, missing ones are zeros).
    pub fn qkv_bias(self) -> bool {
        self == OutArch::Qwen2Moe
    }

    /// Whether its attention normalises queries and keys per head (Qwen3).
    pub fn qk_norm(self) -> bool {
        self == OutArch::Qwen3Moe
    }
}

/// Why architecture `name` cannot hold `config` with inputs of `types` (base, routed experts,
/// shared experts), or `None` if it can (mergekit's `supports_config`).
fn unsupported(name: &str, config: &MoeConfig, types: &[String]) -> Option<String> {
    let shared = config.shared();
    let same = types.iter().all(|t| *t == types[0]);
    let of = |allowed: &[&str]| -> Option<String> {
        if !same {
            return Some(format!(
                "needs every input model to have the same architecture (model types: {})",
                types.join(", ")
            ));
        }
        (!allowed.contains(&types[0].as_str())).then(|| {
            format!(
                "needs {} input models, not {}",
                allowed.join(" or "),
                types[0]
            )
        })
    };
    match name {
        "Mixtral" => {
            if !shared.is_empty() {
                return Some("has no shared experts".into());
            }
            of(&["llama", "mistral"])
        }
        "DeepSeek MoE" => {
            if shared.len() > 1 {
                return Some("takes at most one shared expert".into());
            }
            if shared
                .iter()
                .any(|e| !e.positive().is_empty() || !e.negative().is_empty())
            {
                return Some("does not gate its shared expert (give it no prompts)".into());
            }
            of(&["llama", "mistral"])
        }
        "Qwen MoE" => {
            if shared.len() != 1 {
                return Some("needs exactly one shared expert (`shared_experts:`)".into());
            }
            if config.gate_mode != crate::moe::GateMode::Random && shared[0].positive().is_empty() {
                return Some("gates its shared expert, so it needs positive_prompts".into());
            }
            of(&["llama", "mistral", "qwen2"])
        }
        "Qwen3 MoE" => {
            if !shared.is_empty() {
                return Some("has no shared experts".into());
            }
            of(&["qwen3"])
        }
        _ => unreachable!("a listed architecture"),
    }
}

/// The output architecture for `config` whose input models have `types` (base, routed experts,
/// shared experts): those whose name starts with `architecture:` (case-insensitive), that
/// support the config; Mixtral if it is one of them, else the first.
pub fn select(config: &MoeConfig, types: &[String]) -> Result<OutArch> {
    let all = || NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    let wanted: Vec<&str> = NAMES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| match &config.architecture {
            Some(a) => n.to_lowercase().starts_with(&a.to_lowercase()),
            None => true,
        })
        .collect();
    if wanted.is_empty() {
        return Err(config.error(format!(
            "no output architecture matches architecture '{}'; the architectures: {}",
            config.architecture.as_deref().unwrap_or(""),
            all()
        )));
    }
    let mut reasons = Vec::new();
    let mut fits = Vec::new();
    for name in wanted {
        match unsupported(name, config, types) {
            Some(why) => reasons.push(format!("{name} {why}")),
            None => fits.push(name),
        }
    }
    let chosen = if fits.contains(&"Mixtral") {
        "Mixtral"
    } else {
        match fits.first() {
            Some(n) => n,
            None => {
                return Err(config.error(format!(
                    "no output architecture fits this config: {}",
                    reasons.join("; ")
                )));
            }
        }
    };
    NAMES
        .iter()
        .find(|(n, _)| *n == chosen)
        .and_then(|(_, a)| *a)
        .ok_or_else(|| {
            config.error(
                "the config fits DeepSeek-MoE (an ungated shared expert), which amalgam does not write yet; give the shared expert positive_prompts and set `architecture: qwen` for Qwen2-MoE, whose shared expert is gated",
            )
        })
}

/// What the output `config.json` needs besides the base's.
pub struct ConfigFacts {
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub per_token: usize,
    /// The MLPs' intermediate size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// The output dtype, if one is set.
    pub dtype: Option<DType>,
}

/// The output `config.json`: the base's, with the keys transformers' MoE config classes add
/// (what mergekit-moe 0.1.5 writes through them under transformers 5.24). Unlike mergekit, the
/// base's `sliding_window` is kept: mergekit sets it to null, which changes the attention of a
/// sliding-window base. `rope_parameters`/`rope_scaling` and `tie_word_embeddings` are the
/// base's, as every other key.
pub fn out_config(base: &Value, arch: OutArch, layout: Layout, f: &ConfigFacts) -> Value {
    let mut c: Map<String, Value> = base.as_object().cloned().unwrap_or_default();
    let set = |c: &mut Map<String, Value>, k: &str, v: Value| {
        c.insert(k.to_string(), v);
    };
    let default = |c: &mut Map<String, Value>, k: &str, v: Value| {
        c.entry(k.to_string()).or_insert(v);
    };
    set(&mut c, "architectures", json!([arch.class()]));
    set(&mut c, "model_type", json!(arch.model_type()));
    set(&mut c, "num_experts_per_tok", json!(f.per_token));
    set(&mut c, "output_router_logits", json!(false));
    set(&mut c, "router_aux_loss_coef", json!(0.001));
    match arch {
        OutArch::Mixtral => {
            set(&mut c, "num_local_experts", json!(f.experts));
            set(&mut c, "router_jitter_noise", json!(0.0));
            default(&mut c, "sliding_window", Value::Null);
        }
        OutArch::Qwen2Moe | OutArch::Qwen3Moe => {
            set(&mut c, "decoder_sparse_step", json!(1));
            set(&mut c, "mlp_only_layers", json!([]));
            set(&mut c, "moe_intermediate_size", json!(f.intermediate));
            set(&mut c, "norm_topk_prob", json!(true));
            default(
                &mut c,
                "layer_types",
                json!(vec!["full_attention"; f.layers]),
            );
            default(&mut c, "max_window_layers", json!(28));
            default(&mut c, "sliding_window", Value::Null);
            default(&mut c, "use_sliding_window", json!(false));
            if arch == OutArch::Qwen2Moe {
                set(&mut c, "num_experts", json!(f.experts));
                set(
                    &mut c,
                    "shared_expert_intermediate_size",
                    json!(f.intermediate),
                );
                // Qwen2-MoE's attention has q/k/v biases whatever the base (zeros for Llama).
                default(&mut c, "qkv_bias", json!(true));
            } else if layout == Layout::Legacy {
                // transformers 4 named Qwen3-MoE's expert count `num_experts`.
                set(&mut c, "num_experts", json!(f.experts));
            } else {
                set(&mut c, "num_local_experts", json!(f.experts));
            }
        }
    }
    if let Some(name) = f.dtype.and_then(DType::torch_name) {
        set(&mut c, "dtype", json!(name));
        if c.contains_key("torch_dtype") {
            set(&mut c, "torch_dtype", json!(name));
        }
    }
    let mut keys: Vec<(String, Value)> = c.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(keys.into_iter().collect())
}

/// Names of one layer's expert and router tensors.
pub struct LayerNames {
    /// The router, `[experts, hidden]`.
    pub router: String,
    /// The shared expert's gate, `[1, hidden]` (Qwen2-MoE).
    pub shared_gate: Option<String>,
    /// Fused tensors (`gate_up_proj`, `down_proj`), when the layout fuses experts.
    pub fused: Option<(String, String)>,
}

/// The tensor names of layer `l` for `arch` in `layout`.
pub fn layer_names(arch: OutArch, layout: Layout, l: usize) -> LayerNames {
    let mlp = format!("model.layers.{l}.mlp");
    let fused = layout == Layout::V5 && arch != OutArch::Qwen2Moe;
    LayerNames {
        router: if arch == OutArch::Mixtral && layout == Layout::Legacy {
            format!("model.layers.{l}.block_sparse_moe.gate.weight")
        } else {
            format!("{mlp}.gate.weight")
        },
        shared_gate: (arch == OutArch::Qwen2Moe)
            .then(|| format!("{mlp}.shared_expert_gate.weight")),
        fused: fused.then(|| {
            (
                format!("{mlp}.experts.gate_up_proj"),
                format!("{mlp}.experts.down_proj"),
            )
        }),
    }
}

/// Where unfused expert `e`'s projection `proj` (`gate_proj`, `up_proj`, `down_proj`) of layer
/// `l` goes; `e = None` is the shared expert.
pub fn expert_name(
    arch: OutArch,
    layout: Layout,
    l: usize,
    e: Option<usize>,
    proj: &str,
) -> String {
    match e {
        None => format!("model.layers.{l}.mlp.shared_expert.{proj}.weight"),
        Some(e) if arch == OutArch::Mixtral && layout == Layout::Legacy => {
            let w = match proj {
                "gate_proj" => "w1",
                "down_proj" => "w2",
                _ => "w3",
            };
            format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight")
        }
        Some(e) => format!("model.layers.{l}.mlp.experts.{e}.{proj}.weight"),
    }
}

/// Whether base tensor `name` (not an MLP tensor) has a place in `arch`: embeddings, final norm,
/// LM head, each layer's norms and attention projections, and the attention extras the
/// architecture has (Qwen2-MoE's q/k/v biases, Qwen3-MoE's q/k norms).
pub fn carries(arch: OutArch, name: &str) -> bool {
    if matches!(
        name,
        "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"
    ) {
        return true;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((index, rest)) = rest.split_once('.') else {
        return false;
    };
    if index.parse::<usize>().is_err() {
        return false;
    }
    match rest {
        "input_layernorm.weight"
        | "post_attention_layernorm.weight"
        | "self_attn.q_proj.weight"
        | "self_attn.k_proj.weight"
        | "self_attn.v_proj.weight"
        | "self_attn.o_proj.weight" => true,
        "self_attn.q_proj.bias" | "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => {
            arch.qkv_bias()
        }
        "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => arch.qk_norm(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> MoeConfig {
        MoeConfig::parse(
            Path::new("moe.yml"),
            &format!("base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [a]\n  - source_model: y\n    positive_prompts: [b]\n{extra}"),
        )
        .unwrap()
    }

    fn types(t: &str, n: usize) -> Vec<String> {
        vec![t.to_string(); n]
    }

    #[test]
    fn selection_follows_mergekit() {
        assert_eq!(
            select(&config(""), &types("llama", 3)).unwrap(),
            OutArch::Mixtral
        );
        assert_eq!(
            select(&config(""), &types("qwen3", 3)).unwrap(),
            OutArch::Qwen3Moe
        );
        let shared = "shared_experts:\n  - source_model: s\n    positive_prompts: [c]\n";
        assert_eq!(
            select(&config(shared), &types("llama", 4)).unwrap(),
            OutArch::Qwen2Moe
        );
        assert_eq!(
            select(
                &config(&format!("{shared}architecture: QWEN\n")),
                &types("qwen2", 4)
            )
            .unwrap(),
            OutArch::Qwen2Moe
        );
        let e = select(&config("architecture: qwen3\n"), &types("llama", 3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Qwen3 MoE needs qwen3 input models, not llama"),
            "{e}"
        );
        let e = select(&config("architecture: gemma\n"), &types("llama", 3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no output architecture matches architecture 'gemma'"),
            "{e}"
        );
        let e = select(
            &config(""),
            &["llama".into(), "llama".into(), "qwen2".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("same architecture"), "{e}");
        // An ungated shared expert fits only DeepSeek-MoE.
        let e = select(
            &config("shared_experts:\n  - source_model: s\n"),
            &types("llama", 4),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("DeepSeek-MoE"), "{e}");
        let e = select(&config("architecture: qwen\n"), &types("qwen2", 3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs exactly one shared expert"), "{e}");
    }

    #[test]
    fn names_per_layout() {
        let n = layer_names(OutArch::Mixtral, Layout::Legacy, 3);
        assert_eq!(n.router, "model.layers.3.block_sparse_moe.gate.weight");
        assert!(n.fused.is_none());
        assert_eq!(
            expert_name(OutArch::Mixtral, Layout::Legacy, 3, Some(1), "down_proj"),
            "model.layers.3.block_sparse_moe.experts.1.w2.weight"
        );
        let n = layer_names(OutArch::Qwen3Moe, Layout::V5, 0);
        assert_eq!(n.router, "model.layers.0.mlp.gate.weight");
        assert_eq!(
            n.fused.unwrap().0,
            "model.layers.0.mlp.experts.gate_up_proj"
        );
        let n = layer_names(OutArch::Qwen2Moe, Layout::V5, 0);
        assert!(n.fused.is_none());
        assert_eq!(
            n.shared_gate.unwrap(),
            "model.layers.0.mlp.shared_expert_gate.weight"
        );
        assert!(carries(
            OutArch::Qwen2Moe,
            "model.layers.1.self_attn.k_proj.bias"
        ));
        assert!(!carries(
            OutArch::Mixtral,
            "model.layers.1.self_attn.k_proj.bias"
        ));
        assert!(carries(
            OutArch::Qwen3Moe,
            "model.layers.0.self_attn.q_norm.weight"
        ));
        assert!(!carries(
            OutArch::Mixtral,
            "model.layers.x.input_layernorm.weight"
        ));
    }
}
