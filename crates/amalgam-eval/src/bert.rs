//! A BERT-family encoder (BERT, MiniLM, ...), as transformers' `BertModel` computes it, with the
//! mean pooling sentence-transformers applies.

use candle_core::{DType, Tensor};

use crate::config::BertConfig;
use crate::error::Result;
use crate::nn::{Deltas, LayerNorm, Linear, Routable, activate, mean_pool, softmax};
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
    /// Sequence-level routing's deltas of the three embedding tables.
    word_side: Option<Deltas>,
    position_side: Option<Deltas>,
    type_side: Option<Deltas>,
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
            word_side: None,
            position_side: None,
            type_side: None,
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
        let table = |table: &Tensor, side: &Option<Deltas>, ids: &Tensor| -> Result<Tensor> {
            let ids = ids.flatten_all()?;
            let mut rows = crate::route::side::Gathered::lookup(table, &ids, route)?;
            if let Some(d) = side
                && let Some(delta) = d.rows(&ids, h, route)?
            {
                rows = (rows + delta)?;
            }
            Ok(rows.reshape((b, t, h))?)
        };
        let words = table(&self.word, &self.word_side, ids)?;
        let types = table(&self.token_type, &self.type_side, type_ids)?;
        let positions = match &self.position_side {
            Some(d) => d.merged(&self.position, route)?,
            None => None,
        };
        let summed = (words + types)?;
        let summed = match positions {
            Some(p) => {
                let max = self.position.dim(0)?;
                summed.broadcast_add(&p.reshape((b, max, h))?.narrow(1, 0, t)?)?
            }
            None => summed.broadcast_add(&self.position.narrow(0, 0, t)?)?,
        };
        let mut x = self.embed_norm.forward_routed(&summed, route)?;
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
            let attn = softmax(&scores, route)?.matmul(&v)?;
            let attn = attn.transpose(1, 2)?.reshape((b, t, h))?;
            let a = l
                .attn_norm
                .forward_routed(&(l.attn_out.forward_routed(&attn, route)? + &x)?, route)?;
            let inter = activate(
                &l.inter.forward_routed(&a, route)?,
                self.cfg.hidden_act,
                route,
            )?;
            x = l
                .out_norm
                .forward_routed(&(l.out.forward_routed(&inter, route)? + a)?, route)?;
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

    /// What routing puts experts on: the linear layers (every layer's query, key, value,
    /// attention output, intermediate and output, in model order) and the parameters
    /// sequence-level routing merges per input besides them (the embedding tables and every
    /// LayerNorm).
    pub fn routing_parts(&mut self) -> (Vec<&mut Linear>, Vec<Routable<'_>>) {
        let mut routables = vec![
            Routable {
                name: "embeddings.word_embeddings.weight".into(),
                value: &self.word,
                side: &mut self.word_side,
            },
            Routable {
                name: "embeddings.position_embeddings.weight".into(),
                value: &self.position,
                side: &mut self.position_side,
            },
            Routable {
                name: "embeddings.token_type_embeddings.weight".into(),
                value: &self.token_type,
                side: &mut self.type_side,
            },
        ];
        routables.extend(self.embed_norm.routable());
        let mut linears = Vec::new();
        for l in &mut self.layers {
            let Layer {
                query,
                key,
                value,
                attn_out,
                attn_norm,
                inter,
                out,
                out_norm,
            } = l;
            linears.extend([query, key, value, attn_out, inter, out]);
            routables.extend(attn_norm.routable());
            routables.extend(out_norm.routable());
        }
        (linears, routables)
    }
}
