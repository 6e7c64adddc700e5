//! A BERT-family encoder (BERT, MiniLM, ...), as transformers' `BertModel` computes it, with the
//! mean pooling sentence-transformers applies.

use candle_core::{DType, Tensor};

use crate::config::BertConfig;
use crate::error::Result;
use crate::nn::{LayerNorm, Linear, activate, mean_pool, softmax};
use crate::route::side::Ctx;
use crate::weights::Weights;

/// Prefixes under which task wrappers (`BertForSequenceClassification`, ...) save the encoder.
pub const PREFIXES: &[&str] = &["", "bert.", "model."];
/// The tensor whose prefix is the encoder's.
pub const PROBE: &str = "embeddings.word_embeddings.weight";

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// The encoder.
pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    /// Load from `w` for `cfg`; every tensor's shape is checked.
    pub fn load(w: &mut Weights, cfg: &BertConfig) -> Result<Bert> {
        w.select_prefix(PREFIXES, PROBE)?;
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: Linear::load(w, &format!("{p}.attention.self.query"), h, h, true)?,
                    key: Linear::load(w, &format!("{p}.attention.self.key"), h, h, true)?,
                    value: Linear::load(w, &format!("{p}.attention.self.value"), h, h, true)?,
                    attn_out: Linear::load(w, &format!("{p}.attention.output.dense"), h, h, true)?,
                    attn_norm: LayerNorm::load(
                        w,
                        &format!("{p}.attention.output.LayerNorm"),
                        h,
                        eps,
                    )?,
                    inter: Linear::load(
                        w,
                        &format!("{p}.intermediate.dense"),
                        h,
                        cfg.intermediate_size,
                        true,
                    )?,
                    out: Linear::load(
                        w,
                        &format!("{p}.output.dense"),
                        cfg.intermediate_size,
                        h,
                        true,
                    )?,
                    out_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            word: w.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            token_type: w.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
            )?,
            embed_norm: LayerNorm::load(w, "embeddings.LayerNorm", h, eps)?,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// The hidden width.
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Last hidden states `[batch, seq, hidden]` for token ids `[batch, seq]` (u32), token type
    /// ids of the same shape, and an attention mask `[batch, seq]` (f32, 1 = token, 0 = padding).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.forward_routed(ids, type_ids, mask, &Ctx::none())
    }

    /// [`forward`](Self::forward) with the routed layers' experts weighted as `route` says.
    pub fn forward_routed(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        route: &Ctx,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        let hd = h / heads;
        let words = self
            .word
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, h))?;
        let types = self
            .token_type
            .embedding(&type_ids.flatten_all()?)?
            .reshape((b, t, h))?;
        let positions = self.position.narrow(0, 0, t)?;
        let mut x = self
            .embed_norm
            .forward(&(words + types)?.broadcast_add(&positions)?)?;
        // Additive mask over keys: 0 for tokens, -inf for padding (every row keeps its [CLS]).
        let bias = ((mask.ones_like()? - mask)? * f64::from(f32::MIN))?
            .to_dtype(DType::F32)?
            .reshape((b, 1, 1, t))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        for l in &self.layers {
            let q = split(l.query.forward_routed(&x, route)?)?;
            let k = split(l.key.forward_routed(&x, route)?)?;
            let v = split(l.value.forward_routed(&x, route)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let attn = softmax(&scores)?.matmul(&v)?;
            let attn = attn.transpose(1, 2)?.reshape((b, t, h))?;
            let a = l
                .attn_norm
                .forward(&(l.attn_out.forward_routed(&attn, route)? + &x)?)?;
            let inter = activate(&l.inter.forward_routed(&a, route)?, self.cfg.hidden_act)?;
            x = l
                .out_norm
                .forward(&(l.out.forward_routed(&inter, route)? + a)?)?;
        }
        Ok(x)
    }

    /// Mean-pooled embeddings `[batch, hidden]`.
    pub fn embed(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.embed_routed(ids, type_ids, mask, &Ctx::none())
    }

    /// [`embed`](Self::embed) with routing.
    pub fn embed_routed(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        route: &Ctx,
    ) -> Result<Tensor> {
        let hidden = self.forward_routed(ids, type_ids, mask, route)?;
        mean_pool(&hidden, mask)
    }

    /// The routable linear layers (every layer's query, key, value, attention output,
    /// intermediate and output), in model order.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.query,
                    &mut l.key,
                    &mut l.value,
                    &mut l.attn_out,
                    &mut l.inter,
                    &mut l.out,
                ]
            })
            .collect()
    }
}
