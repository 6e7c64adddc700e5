//! A GGUF file's tensors, config and tokenizer in Hugging Face's layout, as transformers' own
//! GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, `integrations/ggml.py`)
//! rebuilds them: llama.cpp's tensor names mapped back, the Q/K row permutation that
//! llama.cpp's converter applies to Llama-family attention undone, the config's fields read from
//! the `<arch>.*` keys, and a `tokenizer.json` built from the `tokenizer.ggml.*` keys.

use serde_json::{Map, Value as Json, json};

use super::{Gguf, TensorInfo};
use crate::error::Result;

/// A model family amalgam maps from GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `llama` (also Mistral models, which llama.cpp stores as `llama`) and `mistral`.
    Llama,
    /// `qwen2`.
    Qwen2,
    /// `qwen3`.
    Qwen3,
}

impl Family {
    fn of(arch: &str) -> Option<Family> {
        match arch {
            "llama" | "mistral" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }

    /// The transformers `model_type` and architecture class.
    fn hf(self, arch: &str) -> (&'static str, &'static str) {
        match (self, arch) {
            (Family::Llama, "mistral") => ("mistral", "MistralForCausalLM"),
            (Family::Llama, _) => ("llama", "LlamaForCausalLM"),
            (Family::Qwen2, _) => ("qwen2", "Qwen2ForCausalLM"),
            (Family::Qwen3, _) => ("qwen3", "Qwen3ForCausalLM"),
        }
    }
}

/// One output tensor: its Hugging Face name and shape, the GGUF tensor it comes from, and the
/// row permutation to undo.
#[derive(Clone, Debug)]
pub struct Mapped {
    /// The Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Index into [`Gguf::tensors`].
    pub source: usize,
    /// `Some(heads)`: rows are stored permuted as llama.cpp's converter permutes Q and K for
    /// `heads` heads; [`unpermute_rows`] puts them back.
    pub permute: Option<usize>,
}

/// Everything needed to write the GGUF file as a Hugging Face model directory.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Output tensors in GGUF order.
    pub tensors: Vec<Mapped>,
    /// GGUF tensors not carried over, with why (e.g. `rope_freqs.weight`, which transformers
    /// recomputes from the config).
    pub skipped: Vec<(String, &'static str)>,
    /// `config.json`.
    pub config: Json,
    /// `generation_config.json`.
    pub generation_config: Json,
    /// `tokenizer.json` and `tokenizer_config.json`, when the file carries a tokenizer amalgam
    /// can rebuild.
    pub tokenizer: Option<(Json, Json)>,
}

/// The per-layer llama.cpp tensor names and their Hugging Face counterparts.
const LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of llama.cpp tensor `name`, or `None` if it has none.
fn hf_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = stem.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (_, hf) = LAYER.iter().find(|(g, _)| *g == part)?;
            format!("model.layers.{layer}.{hf}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// Undo llama.cpp's Q/K permutation on `rows` (row-major, `cols` per row), which must hold whole
/// heads of `head_dim` rows: llama.cpp stores row `h·d + 2p + s` what Hugging Face has at row
/// `h·d + s·d/2 + p` (`convert_hf_to_gguf.py`'s `LlamaModel.permute`; transformers'
/// `reverse_permute_weights` undoes it the same way).
pub fn unpermute_rows(rows: &[f32], cols: usize, head_dim: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(rows.len(), 0.0);
    let half = head_dim / 2;
    let n_rows = rows.len() / cols.max(1);
    for head in 0..n_rows / head_dim {
        for s in 0..2 {
            for p in 0..half {
                let from = head * head_dim + 2 * p + s;
                let to = head * head_dim + s * half + p;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&rows[from * cols..(from + 1) * cols]);
            }
        }
    }
}

/// Read the architecture and plan the Hugging Face layout of `g`.
pub fn layout(g: &Gguf) -> Result<Layout> {
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| g.error("has no general.architecture string; it is not a model file"))?
        .to_string();
    let family = Family::of(&arch).ok_or_else(|| {
        g.error(format!(
            "architecture '{arch}' is not supported; amalgam maps llama, mistral, qwen2 and \
             qwen3 GGUF files to Hugging Face models"
        ))
    })?;
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |k: &str| -> Result<usize> {
        g.get(&key(k))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                g.error(format!(
                    "metadata '{}' is missing or not an integer",
                    key(k)
                ))
            })
    };
    let heads = uint("attention.head_count")?;
    let kv_heads = match g.get(&key("attention.head_count_kv")) {
        Some(_) => uint("attention.head_count_kv")?,
        None => heads,
    };
    let hidden = uint("embedding_length")?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(g.error(format!(
            "{heads} attention heads and {kv_heads} key/value heads: the heads must be a \
             positive multiple of the key/value heads"
        )));
    }
    let head_dim = match g.get(&key("attention.key_length")) {
        Some(_) => uint("attention.key_length")?,
        None => hidden / heads,
    };
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .map(|t| t.len());
    let vocab = match g.get(&key("vocab_size")) {
        Some(_) => uint("vocab_size")?,
        None => tokens
            .or_else(|| g.tensor("token_embd.weight").map(|t| t.dims[1] as usize))
            .ok_or_else(|| g.error("no vocab_size, tokenizer tokens or token_embd.weight"))?,
    };

    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    for (i, t) in g.tensors.iter().enumerate() {
        if t.name == "rope_freqs.weight" {
            skipped.push((
                t.name.clone(),
                "RoPE frequency factors, which transformers derives from the config",
            ));
            continue;
        }
        let name = hf_name(&t.name).ok_or_else(|| {
            g.error(format!(
                "tensor '{}' has no Hugging Face counterpart in a {arch} model amalgam knows",
                t.name
            ))
        })?;
        let permute = match family {
            Family::Llama
                if t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_q.bias") =>
            {
                Some(heads)
            }
            Family::Llama
                if t.name.ends_with("attn_k.weight") || t.name.ends_with("attn_k.bias") =>
            {
                Some(kv_heads)
            }
            _ => None,
        };
        if let Some(h) = permute {
            check_heads(g, t, h)?;
        }
        tensors.push(Mapped {
            name,
            shape: t.shape(),
            source: i,
            permute,
        });
    }
    let tied = g.tensor("output.weight").is_none();

    let (model_type, class) = family.hf(&arch);
    let mut c = Map::new();
    c.insert("architectures".into(), json!([class]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(uint("feed_forward_length")?),
    );
    c.insert("num_hidden_layers".into(), json!(uint("block_count")?));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv_heads));
    c.insert("head_dim".into(), json!(head_dim));
    if let Some(ctx) = g.get(&key("context_length")).and_then(|v| v.as_u64()) {
        c.insert("max_position_embeddings".into(), json!(ctx));
    }
    let eps = g
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-6);
    c.insert("rms_norm_eps".into(), json!(eps));
    let theta = g
        .get(&key("rope.freq_base"))
        .and_then(|v| v.as_f64())
        .unwrap_or(10000.0);
    c.insert("rope_theta".into(), json!(theta));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("tie_word_embeddings".into(), json!(tied));
    c.insert("hidden_act".into(), json!("silu"));
    // Norm epsilon and RoPE base are f32 in the file; widened to f64 as transformers writes
    // them (9.999999747378752e-06, not 1e-05).
    c.insert(
        "attention_bias".into(),
        json!(g.tensor("blk.0.attn_q.bias").is_some()),
    );
    if let Some(w) = g
        .get(&key("attention.sliding_window"))
        .and_then(|v| v.as_u64())
    {
        c.insert("sliding_window".into(), json!(w));
    }
    let id = |k: &str| {
        g.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
    };
    let mut gen_cfg = Map::new();
    for (gguf, hf) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ] {
        if let Some(v) = id(gguf) {
            c.insert(hf.into(), json!(v));
            if hf != "pad_token_id" {
                gen_cfg.insert(hf.into(), json!(v));
            }
        }
    }
    c.insert("torch_dtype".into(), json!("float32"));
    let tokenizer = super::tokenizer::build(g)?;
    Ok(Layout {
        tensors,
        skipped,
        config: Json::Object(c),
        generation_config: Json::Object(gen_cfg),
        tokenizer,
    })
}

fn check_heads(g: &Gguf, t: &TensorInfo, heads: usize) -> Result<()> {
    let rows = t.dims.get(1).copied().unwrap_or(t.dims[0]) as usize;
    if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(g.error(format!(
            "tensor '{}' has {rows} rows, which do not split into {heads} heads of an even \
             size; its Q/K permutation cannot be undone",
            t.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_as_transformers_maps_them() {
        for (gguf, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            (
                "blk.12.ffn_down.weight",
                "model.layers.12.mlp.down_proj.weight",
            ),
            (
                "blk.0.attn_k_norm.weight",
                "model.layers.0.self_attn.k_norm.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), Some(hf), "{gguf}");
        }
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.ffn_gate_exps.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols).
        let (heads, d, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * d * cols).map(|i| i as f32).collect();
        let mut stored = vec![0.0; hf.len()];
        for h in 0..heads {
            for p in 0..d / 2 {
                for s in 0..2 {
                    let src = h * d + s * (d / 2) + p;
                    let dst = h * d + p * 2 + s;
                    stored[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let mut out = Vec::new();
        unpermute_rows(&stored, cols, d, &mut out);
        assert_eq!(out, hf);
    }
}
