//! The architecture a model folder's `config.json` describes, reduced to what inference needs.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Encoder `model_type`s this crate runs.
pub const ENCODERS: &str = "bert (BERT, MiniLM, ...)";
/// Decoder `model_type`s this crate runs.
pub const DECODERS: &str = "llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe";

/// A supported architecture.
#[derive(Clone, Debug)]
pub enum Arch {
    /// A BERT-family encoder.
    Bert(BertConfig),
    /// A decoder language model.
    Decoder(DecoderConfig),
}

/// The activation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// Exact GELU (`gelu`).
    Gelu,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    Silu,
}

/// A BERT encoder.
#[derive(Clone, Debug)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Position table length.
    pub max_position_embeddings: usize,
    /// Token-type table length.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Feed-forward activation.
    pub hidden_act: Activation,
}

/// The MoE block of a Mixtral, Qwen2-MoE or Qwen3-MoE decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeSpec {
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Whether the top-k weights are renormalised to sum to 1.
    pub normalize: bool,
    /// Each routed expert's intermediate size.
    pub intermediate: usize,
    /// The shared expert's intermediate size (Qwen2-MoE).
    pub shared: Option<usize>,
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// The factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// A Llama-style decoder (Llama, Mistral, Qwen2, Qwen3 differ only in these switches).
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// `model_type` as given.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on the q, k, v projections (always for Qwen2; `attention_bias` for the others).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Keys further back than this are not attended to (Mistral).
    pub sliding_window: Option<usize>,
    /// The LM head shares the input embedding matrix.
    pub tie_word_embeddings: bool,
    /// Feed-forward activation.
    pub hidden_act: Activation,
    /// A sparse MoE block in place of every layer's MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).
    pub moe: Option<MoeSpec>,
}

impl Arch {
    /// Read `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Arch> {
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| Error::Config {
            path: path.clone(),
            reason: format!(
                "cannot read ({e}); evaluation needs the model's Hugging Face config.json \
                 next to its safetensors"
            ),
        })?;
        let value: Value = serde_json::from_slice(&text).map_err(|e| Error::Config {
            path: path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Arch::from_json(&value, &path)
    }

    /// Interpret a parsed `config.json` (`path` for error messages).
    pub fn from_json(v: &Value, path: &Path) -> Result<Arch> {
        let c = Fields { v, path };
        let model_type = c.string("model_type")?;
        match model_type.as_str() {
            "bert" => Ok(Arch::Bert(BertConfig {
                vocab_size: c.usize("vocab_size")?,
                hidden_size: c.usize("hidden_size")?,
                num_hidden_layers: c.usize("num_hidden_layers")?,
                num_attention_heads: c.heads("num_attention_heads", "hidden_size")?,
                intermediate_size: c.usize("intermediate_size")?,
                max_position_embeddings: c.usize("max_position_embeddings")?,
                type_vocab_size: c.usize_or("type_vocab_size", 2)?,
                layer_norm_eps: c.f64_or("layer_norm_eps", 1e-12)?,
                hidden_act: c.activation("gelu")?,
            })),
            "llama" | "mistral" | "qwen2" | "qwen3" | "mixtral" | "qwen2_moe" | "qwen3_moe" => {
                c.decoder(model_type)
            }
            _ => Err(Error::Unsupported {
                path: path.to_path_buf(),
                model_type,
                encoders: ENCODERS,
                decoders: DECODERS,
            }),
        }
    }

    /// The vocabulary size (token ids must be below it).
    pub fn vocab_size(&self) -> usize {
        match self {
            Arch::Bert(c) => c.vocab_size,
            Arch::Decoder(c) => c.vocab_size,
        }
    }

    /// The longest input the position embeddings allow (encoders), or `None` (RoPE decoders).
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            Arch::Bert(c) => Some(c.max_position_embeddings),
            Arch::Decoder(_) => None,
        }
    }
}

/// Typed access to config fields with errors that name the file and field.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, reason: String) -> Error {
        Error::Config {
            path: PathBuf::from(self.path),
            reason,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(format!("{key} is {other}, expected a string"))),
            None => Err(self.err(format!(
                "no {key}; is this a Hugging Face model folder? (supported: {ENCODERS}; {DECODERS})"
            ))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(format!("{key} is {v}, expected a positive integer"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        if self.get(key).is_none() {
            return Err(self.err(format!("{key} is missing")));
        }
        self.usize_or(key, 0)
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(format!("{key} is {v}, expected a number"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("{key} is {v}, expected true or false"))),
        }
    }

    /// A head count that divides `width_key`'s value.
    fn heads(&self, key: &str, width_key: &str) -> Result<usize> {
        let heads = self.usize(key)?;
        let width = self.usize(width_key)?;
        if width % heads != 0 {
            return Err(self.err(format!(
                "{width_key} {width} is not a multiple of {key} {heads}"
            )));
        }
        Ok(heads)
    }

    fn activation(&self, default: &str) -> Result<Activation> {
        let name = match self
            .get("hidden_act")
            .or_else(|| self.get("hidden_activation"))
        {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(self.err(format!("hidden_act is {v}, expected a string"))),
        };
        Ok(match name.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => {
                return Err(self.err(format!(
                    "hidden_act {name:?} is not supported (gelu, gelu_new, relu, silu)"
                )));
            }
        })
    }

    /// RoPE settings: transformers 4 writes `rope_theta` and `rope_scaling`, transformers 5
    /// `rope_parameters` (`{"rope_type", "rope_theta", ...}`).
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"));
        let mut theta = self.f64_or("rope_theta", 10000.0)?;
        let Some(p) = params else {
            return Ok((theta, RopeScaling::None));
        };
        let sub = Fields {
            v: p,
            path: self.path,
        };
        theta = sub.f64_or("rope_theta", theta)?;
        let kind = match sub.get("rope_type").or_else(|| sub.get("type")) {
            None => "default".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(self.err(format!("rope_type is {v}, expected a string"))),
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: sub.f64_or("factor", 1.0)?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: sub.f64_or("factor", 8.0)?,
                low_freq_factor: sub.f64_or("low_freq_factor", 1.0)?,
                high_freq_factor: sub.f64_or("high_freq_factor", 4.0)?,
                original_max_position_embeddings: sub
                    .f64_or("original_max_position_embeddings", 8192.0)?,
            },
            _ => {
                return Err(self.err(format!(
                    "rope type {kind:?} is not supported (default, linear, llama3)"
                )));
            }
        };
        Ok((theta, scaling))
    }

    /// The MoE block of an MoE `model_type` (every layer sparse: `decoder_sparse_step` 1 and no
    /// `mlp_only_layers`, as `amalgam moe` and mergekit write them).
    fn moe(&self, model_type: &str) -> Result<Option<MoeSpec>> {
        let spec = match model_type {
            "mixtral" => MoeSpec {
                experts: self.usize("num_local_experts")?,
                top_k: self.usize_or("num_experts_per_tok", 2)?,
                normalize: true,
                intermediate: self.usize("intermediate_size")?,
                shared: None,
            },
            "qwen2_moe" | "qwen3_moe" => {
                let experts = match self.get("num_experts") {
                    Some(_) => self.usize("num_experts")?,
                    None => self.usize("num_local_experts")?,
                };
                let sparse_step = self.usize_or("decoder_sparse_step", 1)?;
                let dense = self
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
                if sparse_step != 1 || dense {
                    return Err(self.err(
                        "MoE models with dense layers (decoder_sparse_step > 1 or mlp_only_layers) are not supported".into(),
                    ));
                }
                MoeSpec {
                    experts,
                    top_k: self.usize_or("num_experts_per_tok", 2)?,
                    normalize: self.bool_or("norm_topk_prob", false)?,
                    intermediate: self.usize("moe_intermediate_size")?,
                    shared: (model_type == "qwen2_moe")
                        .then(|| self.usize("shared_expert_intermediate_size"))
                        .transpose()?,
                }
            }
            _ => return Ok(None),
        };
        if spec.top_k > spec.experts {
            return Err(self.err(format!(
                "num_experts_per_tok {} exceeds the {} experts",
                spec.top_k, spec.experts
            )));
        }
        Ok(Some(spec))
    }

    fn decoder(&self, model_type: String) -> Result<Arch> {
        let hidden_size = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        let kv_heads = self.usize_or("num_key_value_heads", heads)?;
        if heads % kv_heads != 0 {
            return Err(self.err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match self.get("head_dim") {
            Some(_) => self.usize("head_dim")?,
            None => self
                .heads("num_attention_heads", "hidden_size")
                .map(|h| hidden_size / h)?,
        };
        if head_dim % 2 != 0 {
            return Err(self.err(format!("head_dim {head_dim} is odd; RoPE needs it even")));
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        let attention_bias = self.bool_or("attention_bias", false)?;
        let sliding_window = match model_type.as_str() {
            "mistral" | "mixtral" => match self.get("sliding_window") {
                None => None,
                Some(_) => Some(self.usize("sliding_window")?),
            },
            _ => {
                let sliding_layers = self
                    .get("layer_types")
                    .and_then(Value::as_array)
                    .is_some_and(|t| t.iter().any(|l| l.as_str() == Some("sliding_attention")));
                if sliding_layers || self.bool_or("use_sliding_window", false)? {
                    return Err(self.err(
                        "use_sliding_window: true is not supported for qwen models".to_string(),
                    ));
                }
                None
            }
        };
        let qwen2 = matches!(model_type.as_str(), "qwen2" | "qwen2_moe");
        let qkv_bias = match model_type.as_str() {
            "qwen2" => true,
            "qwen2_moe" => self.bool_or("qkv_bias", true)?,
            _ => attention_bias,
        };
        let moe = self.moe(&model_type)?;
        Ok(Arch::Decoder(DecoderConfig {
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            num_hidden_layers: self.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            intermediate_size: self.usize("intermediate_size")?,
            rms_norm_eps: self.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias: attention_bias && !qwen2 && model_type != "mixtral",
            mlp_bias: self.bool_or("mlp_bias", false)?,
            qk_norm: matches!(model_type.as_str(), "qwen3" | "qwen3_moe"),
            moe,
            sliding_window,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            hidden_act: self.activation("silu")?,
            model_type,
        }))
    }
}
