//! The sparse MoE block of Mixtral, Qwen2-MoE and Qwen3-MoE decoders, as transformers 5
//! computes it: router logits `x·Wᵀ`, softmax in f32, the top-k experts per token (their
//! weights renormalised to sum to 1 for Mixtral, and when `norm_topk_prob` says so for the
//! Qwen ones), each expert a gated MLP run on the tokens routed to it; Qwen2-MoE adds a shared
//! expert scaled by `sigmoid(x·w_shared)`.

use std::sync::Mutex;

use candle_core::Tensor;

use crate::config::{Activation, MoeSpec};
use crate::error::Result;
use crate::nn::{Linear, activate};
use crate::route::side::Ctx;
use crate::weights::Weights;

/// A gated MLP: `down(act(gate(x)) · up(x))`.
pub struct Ffn {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Ffn {
    /// Apply to `x` `[..., hidden]`.
    pub fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let gated = (activate(&self.gate.forward(x)?, act, &Ctx::none())? * self.up.forward(x)?)?;
        self.down.forward(&gated)
    }
}

/// One layer's sparse MoE block.
pub struct SparseMoe {
    /// `[experts, hidden]`, transposed for the matmul.
    router_t: Tensor,
    experts: Vec<Ffn>,
    /// The shared expert and its gate `[hidden, 1]` (Qwen2-MoE).
    shared: Option<(Ffn, Tensor)>,
    top_k: usize,
    normalize: bool,
    /// Tokens routed to each expert so far (over every forward pass).
    counts: Mutex<Vec<u64>>,
}

impl SparseMoe {
    /// Layer `l`'s block from `w` (names under the decoder prefix): the fused v5 layout
    /// (`mlp.experts.gate_up_proj` `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`) or one
    /// tensor per expert (`mlp.experts.N.{gate,up,down}_proj`, Mixtral's
    /// `block_sparse_moe.experts.N.w1/w3/w2`).
    pub fn load(w: &Weights, l: usize, h: usize, spec: &MoeSpec) -> Result<SparseMoe> {
        let (e, im) = (spec.experts, spec.intermediate);
        let mlp = format!("layers.{l}.mlp");
        let legacy = format!("layers.{l}.block_sparse_moe");
        let (router, experts) = if w.contains(&format!("{mlp}.experts.gate_up_proj")) {
            let gate_up = w.get(&format!("{mlp}.experts.gate_up_proj"), &[e, 2 * im, h])?;
            let down = w.get(&format!("{mlp}.experts.down_proj"), &[e, h, im])?;
            let experts = (0..e)
                .map(|i| -> Result<Ffn> {
                    let gu = gate_up.get(i)?;
                    Ok(Ffn {
                        gate: Linear::new(gu.narrow(0, 0, im)?, None)?,
                        up: Linear::new(gu.narrow(0, im, im)?, None)?,
                        down: Linear::new(down.get(i)?, None)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (w.get(&format!("{mlp}.gate.weight"), &[e, h])?, experts)
        } else if w.contains(&format!("{legacy}.gate.weight")) {
            let experts = (0..e)
                .map(|i| -> Result<Ffn> {
                    let p = format!("{legacy}.experts.{i}");
                    Ok(Ffn {
                        gate: Linear::load(w, &format!("{p}.w1"), h, im, false)?,
                        up: Linear::load(w, &format!("{p}.w3"), h, im, false)?,
                        down: Linear::load(w, &format!("{p}.w2"), im, h, false)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (w.get(&format!("{legacy}.gate.weight"), &[e, h])?, experts)
        } else {
            let experts = (0..e)
                .map(|i| ffn(w, &format!("{mlp}.experts.{i}"), h, im))
                .collect::<Result<Vec<_>>>()?;
            (w.get(&format!("{mlp}.gate.weight"), &[e, h])?, experts)
        };
        let shared = spec
            .shared
            .map(|si| -> Result<(Ffn, Tensor)> {
                let f = ffn(w, &format!("{mlp}.shared_expert"), h, si)?;
                let g = w.get(&format!("{mlp}.shared_expert_gate.weight"), &[1, h])?;
                Ok((f, g.t()?.contiguous()?))
            })
            .transpose()?;
        Ok(SparseMoe {
            router_t: router.t()?.contiguous()?,
            experts,
            shared,
            top_k: spec.top_k,
            normalize: spec.normalize,
            counts: Mutex::new(vec![0; e]),
        })
    }

    /// Apply to `x` `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let h = *dims.last().expect("a hidden axis");
        let flat = x.reshape(((), h))?;
        let probs =
            crate::nn::softmax(&flat.matmul(&self.router_t)?, &Ctx::none())?.to_vec2::<f32>()?;
        let n = probs.len();
        // Per expert: the tokens routed to it and their weights.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (t, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            // torch.topk: largest first; ties to the lower index.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let top = &order[..self.top_k.min(order.len())];
            let sum: f32 = top.iter().map(|&e| p[e]).sum();
            for &e in top {
                rows[e].push(t as u32);
                weights[e].push(if self.normalize { p[e] / sum } else { p[e] });
            }
        }
        {
            let mut c = self.counts.lock().expect("no panics holding it");
            c.iter_mut()
                .zip(&rows)
                .for_each(|(c, r)| *c += r.len() as u64);
        }
        let mut out = flat.zeros_like()?;
        for ((ffn, idx), wts) in self.experts.iter().zip(&rows).zip(&weights) {
            if idx.is_empty() {
                continue;
            }
            let device = x.device();
            let idx = Tensor::from_slice(idx, idx.len(), device)?;
            let wts = Tensor::from_slice(wts, (wts.len(), 1), device)?;
            let y = ffn
                .forward(&flat.index_select(&idx, 0)?, act)?
                .broadcast_mul(&wts)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        if let Some((f, g)) = &self.shared {
            let gate = candle_nn::ops::sigmoid(&flat.matmul(g)?)?;
            out = (out + f.forward(&flat, act)?.broadcast_mul(&gate)?)?;
        }
        debug_assert_eq!(out.dim(0)?, n);
        Ok(out.reshape(dims)?)
    }

    /// Tokens routed to each expert so far.
    pub fn counts(&self) -> Vec<u64> {
        self.counts.lock().expect("no panics holding it").clone()
    }
}

/// A gated MLP stored as `{name}.{gate,up,down}_proj.weight`, without biases.
pub fn ffn(w: &Weights, name: &str, h: usize, im: usize) -> Result<Ffn> {
    Ok(Ffn {
        gate: Linear::load(w, &format!("{name}.gate_proj"), h, im, false)?,
        up: Linear::load(w, &format!("{name}.up_proj"), h, im, false)?,
        down: Linear::load(w, &format!("{name}.down_proj"), im, h, false)?,
    })
}
