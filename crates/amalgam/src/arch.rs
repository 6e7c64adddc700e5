//! Model layout: which tensors belong to which transformer layer, which come before the layers
//! (embeddings) and which after (final norm, LM head), and the tied LM head of the families
//! that tie it to the embeddings.
//!
//! Rather than a table of every architecture, the layout is read off the tensor names: a layer
//! tensor is `PREFIX.N.SUFFIX` where `PREFIX` ends in `layers`, `h`, `blocks` or `layer` (Llama,
//! Mistral, Qwen2/3, Gemma, Phi-3: `model.layers.N.`; GPT-2: `transformer.h.N.`; BERT:
//! `encoder.layer.N.`). `config.json` supplies the layer count and the architecture name.

use std::collections::BTreeSet;

use regex::Regex;

use crate::io::Model;

/// Where a tensor sits in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// Before the layers (embeddings).
    Pre,
    /// In layer `index`; `prefix` + index + `.` + `suffix` is its name.
    Layer {
        /// Text before the layer index, e.g. `model.layers.`.
        prefix: String,
        /// The layer index.
        index: usize,
        /// Text after the index and its dot, e.g. `mlp.up_proj.weight`.
        suffix: String,
    },
    /// After the layers (final norm, LM head).
    Post,
}

fn layer_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)\.(.+)$").expect("valid regex")
    })
}

/// Classify a tensor name.
pub fn place(name: &str) -> Place {
    if let Some(c) = layer_regex().captures(name)
        && let Ok(index) = c[2].parse()
    {
        return Place::Layer {
            prefix: c[1].to_string(),
            index,
            suffix: c[3].to_string(),
        };
    }
    let lower = name.to_ascii_lowercase();
    if lower.contains("embed") || lower.contains("wte") || lower.contains("wpe") {
        Place::Pre
    } else {
        Place::Post
    }
}

/// Whether a tensor is indexed by token id along its first axis (input embeddings, LM head).
pub fn is_vocabulary(name: &str) -> bool {
    name == LM_HEAD
        || name.ends_with("embed_tokens.weight")
        || name.ends_with("wte.weight")
        || name.ends_with("word_embeddings.weight")
        || name.ends_with("embed_out.weight")
}

/// The name of the LM head that some families tie to the input embeddings.
pub const LM_HEAD: &str = "lm_head.weight";
/// The input embeddings an absent LM head is read from.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

/// Model types whose layout has an optional LM head tied to `model.embed_tokens.weight`: when
/// some inputs store `lm_head.weight` and others tie it, the others' embeddings stand in for it
/// (as in mergekit); when no input stores one, none is written.
const TIED_HEAD_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "olmo2",
    "granite",
    "starcoder2",
    "cohere",
    "cohere2",
    "exaone",
    "internlm2",
    "solar",
    "stablelm",
];

/// What amalgam knows of one model's layout.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `model_type` from config.json.
    pub model_type: Option<String>,
    /// `architectures[0]` from config.json.
    pub architecture: Option<String>,
    /// Number of layers (config, else one more than the largest index seen).
    pub num_layers: usize,
    /// The config key that holds the layer count, when there is one.
    pub num_layers_key: Option<&'static str>,
    /// Whether this family's LM head may be tied to the embeddings.
    pub tied_head: bool,
}

const LAYER_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

impl Layout {
    /// Read the layout of `model`.
    pub fn of(model: &Model) -> Layout {
        let config = model.config();
        let get = |k: &str| config.as_ref().and_then(|c| c.get(k)).cloned();
        let model_type = get("model_type").and_then(|v| v.as_str().map(str::to_string));
        let architecture = get("architectures")
            .and_then(|a| a.get(0).and_then(|v| v.as_str()).map(str::to_string));
        let seen = model
            .tensors()
            .iter()
            .filter_map(|t| match place(&t.name) {
                Place::Layer { index, .. } => Some(index + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let (num_layers_key, from_config) = LAYER_KEYS
            .iter()
            .find_map(|k| {
                get(k)
                    .and_then(|v| v.as_u64())
                    .map(|n| (Some(*k), n as usize))
            })
            .unwrap_or((None, seen));
        let tied_head = model_type
            .as_deref()
            .is_some_and(|t| TIED_HEAD_TYPES.contains(&t));
        Layout {
            model_type,
            architecture,
            num_layers: from_config.max(seen),
            num_layers_key,
            tied_head,
        }
    }
}

/// The suffixes of the tensors of layer `index` in `model` (e.g. `mlp.up_proj.weight`),
/// with the prefix they use, in file order.
pub fn layer_tensors(model: &Model, index: usize) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    model
        .tensors()
        .iter()
        .filter_map(|t| match place(&t.name) {
            Place::Layer {
                prefix,
                index: i,
                suffix,
            } if i == index && seen.insert(suffix.clone()) => Some((prefix, suffix)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_common_layouts() {
        assert_eq!(
            place("model.layers.12.mlp.up_proj.weight"),
            Place::Layer {
                prefix: "model.layers.".into(),
                index: 12,
                suffix: "mlp.up_proj.weight".into()
            }
        );
        assert!(matches!(
            place("transformer.h.3.attn.c_attn.weight"),
            Place::Layer { index: 3, .. }
        ));
        assert!(matches!(
            place("encoder.layer.0.attention.self.query.weight"),
            Place::Layer { index: 0, .. }
        ));
        assert_eq!(place("model.embed_tokens.weight"), Place::Pre);
        assert_eq!(place("transformer.wte.weight"), Place::Pre);
        assert_eq!(place("model.norm.weight"), Place::Post);
        assert_eq!(place("lm_head.weight"), Place::Post);
        assert_eq!(place("mylayers.3.x"), Place::Post);
    }
}
