//! A Llama-style decoder LM (Llama, Mistral, Qwen2, Qwen3), as transformers computes it:
//! RMSNorm, rotary positions (non-interleaved halves), grouped-query attention with a causal
//! (optionally sliding-window) mask, and a gated MLP.

use candle_core::{D, Device, Tensor};

use crate::config::{DecoderConfig, RopeScaling};
use crate::error::Result;
use crate::moe_block::{Ffn, SparseMoe};
use crate::nn::{Deltas, Linear, RmsNorm, Routable, activate, softmax};
use crate::route::side::Ctx;
use crate::weights::Weights;

/// Prefixes under which the decoder stack is saved.
pub const PREFIXES: &[&str] = &["model.", ""];
/// The tensor whose prefix is the decoder's.
pub const PROBE: &str = "embed_tokens.weight";

struct Layer {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// A layer's feed-forward block.
enum Mlp {
    Dense(Box<Ffn>),
    Sparse(Box<SparseMoe>),
}

impl Layer {
    /// Layer `i` of `w` for `cfg`; every tensor's shape is checked.
    fn load(w: &Weights, cfg: &DecoderConfig, i: usize) -> Result<Layer> {
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let q_width = cfg.num_attention_heads * hd;
        let kv_width = cfg.num_key_value_heads * hd;
        let p = format!("layers.{i}");
        let a = format!("{p}.self_attn");
        let m = format!("{p}.mlp");
        let norm = |name: &str| RmsNorm::load(w, &format!("{a}.{name}"), hd, eps);
        let dense = |name: &str, i: usize, o: usize| {
            Linear::load(w, &format!("{m}.{name}"), i, o, cfg.mlp_bias)
        };
        let mlp = match &cfg.moe {
            Some(spec) => Mlp::Sparse(Box::new(SparseMoe::load(w, i, h, spec)?)),
            None => Mlp::Dense(Box::new(Ffn {
                gate: dense("gate_proj", h, cfg.intermediate_size)?,
                up: dense("up_proj", h, cfg.intermediate_size)?,
                down: dense("down_proj", cfg.intermediate_size, h)?,
            })),
        };
        Ok(Layer {
            input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, eps)?,
            q: Linear::load(w, &format!("{a}.q_proj"), h, q_width, cfg.qkv_bias)?,
            k: Linear::load(w, &format!("{a}.k_proj"), h, kv_width, cfg.qkv_bias)?,
            v: Linear::load(w, &format!("{a}.v_proj"), h, kv_width, cfg.qkv_bias)?,
            o: Linear::load(w, &format!("{a}.o_proj"), q_width, h, cfg.o_bias)?,
            q_norm: cfg.qk_norm.then(|| norm("q_norm")).transpose()?,
            k_norm: cfg.qk_norm.then(|| norm("k_norm")).transpose()?,
            post_norm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps)?,
            mlp,
        })
    }

    /// The residual stream after this layer, for the stream `x` `[batch, seq, hidden]` entering
    /// it.
    fn forward(
        &self,
        x: &Tensor,
        c: &DecoderConfig,
        attn: &Attention,
        route: &Ctx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = c.head_dim;
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let group = heads / kv_heads;
        let y = self.input_norm.forward_routed(x, route)?;
        let heads_of = |lin: &Linear, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let z = lin.forward_routed(&y, route)?.reshape((b, t, n, hd))?;
            let z = match norm {
                Some(nm) => nm.forward_routed(&z, route)?,
                None => z,
            };
            Ok(z.transpose(1, 2)?.contiguous()?)
        };
        let q = heads_of(&self.q, heads, &self.q_norm)?;
        let k = heads_of(&self.k, kv_heads, &self.k_norm)?;
        let v = heads_of(&self.v, kv_heads, &None)?;
        let rope = if route.grad {
            candle_nn::rotary_emb::rope_slow
        } else {
            candle_nn::rotary_emb::rope
        };
        let q = rope(&q, &attn.cos, &attn.sin)?;
        let k = rope(&k, &attn.cos, &attn.sin)?;
        // Grouped-query attention without copying keys: the `group` query heads that share
        // a key/value head are stacked along the sequence axis.
        let q = q.reshape((b, kv_heads, group * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * attn.scale)?
            .reshape((b, kv_heads, group, t, t))?
            .broadcast_add(&attn.mask)?
            .reshape((b, kv_heads, group * t, t))?;
        let mut out = softmax(&scores, route)?
            .matmul(&v)?
            .reshape((b, heads, t, hd))?;
        if let Some(keep) = &attn.keep {
            out = out.broadcast_mul(keep)?;
        }
        let out = out.transpose(1, 2)?.reshape((b, t, heads * hd))?;
        let x = (self.o.forward_routed(&out, route)? + x)?;
        let y = self.post_norm.forward_routed(&x, route)?;
        let out = match &self.mlp {
            Mlp::Dense(f) => {
                let gated = (activate(&f.gate.forward_routed(&y, route)?, c.hidden_act, route)?
                    * f.up.forward_routed(&y, route)?)?;
                f.down.forward_routed(&gated, route)?
            }
            Mlp::Sparse(moe) => moe.forward(&y, c.hidden_act)?,
        };
        Ok((out + x)?)
    }
}

/// What every layer's attention shares for one batch: rotary tables, the additive mask and, for
/// left-padded batches, which query rows are real.
struct Attention {
    cos: Tensor,
    sin: Tensor,
    /// `[seq, seq]`, or `[batch, 1, 1, seq, seq]` with padding.
    mask: Tensor,
    /// `[batch, 1, seq, 1]`: 1 for a real position, 0 for a pad, whose attention output is zero
    /// (it sees no key; SDPA, which transformers uses, returns zeros for such rows).
    keep: Option<Tensor>,
    scale: f64,
}

impl Attention {
    /// For a batch of `t` positions; `pad` marks the left-padding positions of each row
    /// (`None`: no padding, or right padding, which the causal mask already hides).
    fn new(
        cfg: &DecoderConfig,
        inv_freq: &[f64],
        t: usize,
        pad: Option<&[Vec<bool>]>,
        device: &Device,
    ) -> Result<Attention> {
        let (cos, sin) = rotary(inv_freq, t, device)?;
        let causal = causal_mask(t, cfg.sliding_window);
        let (mask, keep) = match pad {
            None => (Tensor::from_vec(causal, (t, t), device)?, None),
            Some(rows) => {
                let b = rows.len();
                let mut mask = Vec::with_capacity(b * t * t);
                let mut keep = Vec::with_capacity(b * t);
                for row in rows {
                    for i in 0..t {
                        keep.push(if row[i] { 0f32 } else { 1.0 });
                        for j in 0..t {
                            // A pad row attends to nothing; its scores are kept finite (its
                            // output is zeroed), so softmax gives no NaN.
                            let m = if row[i] {
                                0.0
                            } else if row[j] {
                                f32::NEG_INFINITY
                            } else {
                                causal[i * t + j]
                            };
                            mask.push(m);
                        }
                    }
                }
                (
                    Tensor::from_vec(mask, (b, 1, 1, t, t), device)?,
                    Some(Tensor::from_vec(keep, (b, 1, t, 1), device)?),
                )
            }
        };
        Ok(Attention {
            cos,
            sin,
            mask,
            keep,
            scale: 1.0 / (cfg.head_dim as f64).sqrt(),
        })
    }
}

/// The decoder with its LM head.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Tensor,
    /// Sequence-level routing's deltas of the token embeddings.
    embed_side: Option<Deltas>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f64>,
}

impl Decoder {
    /// Load from `w` for `cfg`; every tensor's shape is checked.
    pub fn load(w: &mut Weights, cfg: &DecoderConfig) -> Result<Decoder> {
        w.select_prefix(PREFIXES, PROBE)?;
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(w, cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let embed = w.get("embed_tokens.weight", &[cfg.vocab_size, h])?;
        // A tied head is the embedding matrix; some tied checkpoints still carry lm_head.weight,
        // which then equals it, so the stored tensor is used whenever there is one.
        let lm_head = if w.contains_absolute("lm_head.weight") {
            Linear::new(
                w.get_absolute("lm_head.weight", &[cfg.vocab_size, h])?,
                None,
            )?
        } else if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)?
        } else {
            return Err(amalgam::Error::MissingTensor {
                path: w.model().path.clone(),
                name: "lm_head.weight".into(),
            }
            .into());
        };
        Ok(Decoder {
            norm: RmsNorm::load(w, "norm", h, eps)?,
            inv_freq: inv_freq(cfg),
            embed,
            embed_side: None,
            layers,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// What routing puts experts on: the linear layers (every layer's q, k, v, o, gate, up and
    /// down projections, in model order; not the LM head) and the parameters sequence-level
    /// routing merges per input besides them (the token embeddings and every RMSNorm).
    pub fn routing_parts(&mut self) -> (Vec<&mut Linear>, Vec<Routable<'_>>) {
        let mut routables = vec![Routable {
            name: "embed_tokens.weight".into(),
            value: &self.embed,
            side: &mut self.embed_side,
        }];
        let mut linears = Vec::new();
        for l in &mut self.layers {
            let Layer {
                input_norm,
                q,
                k,
                v,
                o,
                q_norm,
                k_norm,
                post_norm,
                mlp,
            } = l;
            linears.extend([q, k, v, o]);
            // An MoE's experts are not routed again.
            if let Mlp::Dense(f) = mlp {
                let Ffn { gate, up, down } = &mut **f;
                linears.extend([gate, up, down]);
            }
            routables.push(input_norm.routable());
            routables.push(post_norm.routable());
            routables.extend(q_norm.as_mut().map(RmsNorm::routable));
            routables.extend(k_norm.as_mut().map(RmsNorm::routable));
        }
        routables.push(self.norm.routable());
        (linears, routables)
    }

    /// For an MoE model: per layer, the tokens routed to each expert over every forward pass so
    /// far.
    pub fn expert_counts(&self) -> Option<Vec<Vec<u64>>> {
        self.cfg.moe.as_ref()?;
        Some(
            self.layers
                .iter()
                .filter_map(|l| match &l.mlp {
                    Mlp::Sparse(m) => Some(m.counts()),
                    Mlp::Dense(_) => None,
                })
                .collect(),
        )
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Logits `[batch, seq, vocab]` for right-padded token ids `[batch, seq]` (u32). Padding
    /// needs no mask: with right padding, the causal mask already keeps every real position
    /// from seeing a pad; the logits at padded positions are meaningless and must be ignored.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_routed(ids, &Ctx::none())
    }

    /// [`forward`](Self::forward) with the routed layers' experts weighted as `route` says.
    pub fn forward_routed(&self, ids: &Tensor, route: &Ctx) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let device = ids.device();
        let attn = Attention::new(&self.cfg, &self.inv_freq, t, None, device)?;
        let flat = ids.flatten_all()?;
        let mut x = crate::route::side::Gathered::lookup(&self.embed, &flat, route)?;
        if let Some(d) = &self.embed_side
            && let Some(delta) = d.rows(&flat, h, route)?
        {
            x = (x + delta)?;
        }
        let mut x = x.reshape((b, t, h))?;
        for l in &self.layers {
            x = l.forward(&x, &self.cfg, &attn, route)?;
        }
        self.lm_head.forward(&self.norm.forward_routed(&x, route)?)
    }
}

/// The residual stream entering each layer (the embeddings, then every layer's output but the
/// last: transformers' `hidden_states[:-1]`), each `[batch, seq, hidden]`, for left-padded
/// `ids` whose `pad` marks each row's padding. Layers are read from `w` one at a time and
/// dropped after use (and only the embedding rows the ids need are read), so memory holds one
/// layer's weights, whatever the model's size. `progress` is told the layers done.
pub fn residual_streams(
    w: &mut Weights,
    cfg: &DecoderConfig,
    ids: &[Vec<u32>],
    pad: &[Vec<bool>],
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Tensor>> {
    w.select_prefix(PREFIXES, PROBE)?;
    w.set_single_pass(true);
    let device = Device::Cpu;
    let (b, t, h) = (ids.len(), ids.first().map_or(0, Vec::len), cfg.hidden_size);
    let embed = w.rows("embed_tokens.weight", &ids.concat(), &[cfg.vocab_size, h])?;
    let attn = Attention::new(cfg, &inv_freq(cfg), t, Some(pad), &device)?;
    let mut x = embed.reshape((b, t, h))?;
    let mut out = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        out.push(x.clone());
        if i + 1 < cfg.num_hidden_layers {
            let layer = Layer::load(w, cfg, i)?;
            x = layer.forward(&x, cfg, &attn, &Ctx::none())?;
        }
        progress(i + 1);
    }
    Ok(out)
}

/// cos and sin tables `[seq, head_dim / 2]` for positions `0..t`.
fn rotary(inv_freq: &[f64], t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for pos in 0..t {
        for f in inv_freq {
            // transformers computes the angle in f32; doing it in f64 differs by far less
            // than the tolerance and is the more accurate of the two.
            let angle = pos as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

/// Rotary inverse frequencies, scaled as the config says (transformers' `rope_init_fn`s).
fn inv_freq(cfg: &DecoderConfig) -> Vec<f64> {
    let dim = cfg.head_dim;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Additive causal mask `[seq, seq]`, row-major: 0 where query `i` may see key `j` (`j <= i`,
/// and within the sliding window if any), -inf elsewhere.
fn causal_mask(t: usize, window: Option<usize>) -> Vec<f32> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let visible = j <= i && window.is_none_or(|w| i - j < w);
            if !visible {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    m
}

/// Per-position negative log-likelihood of the next token: for logits `[n, vocab]` and targets
/// `[n]` (u32), `logsumexp(logits) - logits[target]`, as a vector.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Vec<f32>> {
    let lse = logits.log_sum_exp(D::Minus1)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((lse - picked)?.to_vec1::<f32>()?)
}
