//! The side path of a routed linear layer: `y = W·x + b + Σₑ gₑ(x)·(Uₑ(Vₑᵀx) + Δbₑ)`.
//!
//! Every expert of a layer is a low-rank pair (`down` = `Vₑ`, `in × r`; `up` = `Uₑ`, `r × out`,
//! scale folded in) with an optional bias delta. Each expert runs on the rows that give it a
//! weight only (gathered, then added back in place), so a top-1 gate costs one expert per
//! token, not all of them; the experts are taken in order, so the sum does not depend on the
//! thread count. The gate decides the weights `g` ([`Gate`]).

use std::cell::RefCell;

use candle_core::{Device, Tensor};

use super::gate;
use crate::error::{Error, Result};
use crate::measure::Tap;

/// One expert's factors for one layer, row-major f32.
#[derive(Clone, Debug)]
pub struct Factors {
    /// `in × rank`.
    pub down: Vec<f32>,
    /// `rank × out`.
    pub up: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// The bias delta (`out`), if any.
    pub bias: Option<Vec<f32>>,
}

/// How a layer's expert weights are chosen.
#[derive(Clone, Debug)]
pub enum Gate {
    /// SMILE: `proj` is `in × (experts · gate_k)`, each expert's top `gate_k` right singular
    /// vectors of its weight delta.
    Smile {
        /// See above.
        proj: Tensor,
        /// Singular vectors per expert in the gate.
        gate_k: usize,
        /// Experts kept per token.
        top_k: usize,
    },
    /// Arrow: `protos` is `in × experts`, each expert's top right singular vector of `B·A`.
    Arrow {
        /// See above.
        protos: Tensor,
        /// Experts kept per token.
        top_k: usize,
        /// Softmax temperature.
        temperature: f32,
    },
    /// Per-sequence weights from the routing context ([`Ctx::sequence`]).
    Sequence,
}

/// The routing state of one forward pass (one batch): per-sequence weights for sequence-level
/// gates, and a record of the token-level gates' weights.
pub struct Ctx {
    /// `batch × experts` weights, row-major, for [`Gate::Sequence`] layers.
    pub sequence: Option<Vec<f32>>,
    /// Rows and tokens per row of the batch.
    pub shape: (usize, usize),
    /// 1 for a token, 0 for padding (`batch · seq`); tokens only are recorded.
    pub mask: Option<Vec<f32>>,
    /// Leave every side path out: the shared model alone.
    pub plain: bool,
    /// `batch × experts`: the sum, over routed layers and tokens, of the token gates' weights.
    pub record: RefCell<Vec<f64>>,
    /// When set, every routed layer's weights (`rows × experts`) in the order the layers run.
    pub trace: Option<RefCell<Vec<Vec<f32>>>>,
    /// When set, every named linear layer's input is observed ([`Tap`]: `amalgam measure`).
    pub tap: Option<RefCell<Tap>>,
    /// Compute with differentiable forms only (candle's fused softmax, norm and rotary kernels
    /// record no backward op, so gradients would silently stop at them): for backward passes.
    pub grad: bool,
    /// When set (with `grad`), embedding tables are looked up detached, into a fresh `Var` per
    /// lookup recorded here: a backward pass then gives the gradient of the rows looked up, not
    /// a dense gradient the size of the whole table (a 30k-word table's 47 MB per pass).
    pub gather: Option<RefCell<Vec<Gathered>>>,
}

/// Rows of an embedding table looked up under [`Ctx::gather`].
pub struct Gathered {
    /// The table (a `Var` of the model).
    pub table: candle_core::TensorId,
    /// The row looked up for each position.
    pub ids: Vec<u32>,
    /// The rows looked up (`positions × width`), a leaf of the graph.
    pub rows: candle_core::Var,
}

impl Gathered {
    /// Look up `ids` (flat, u32) in `table`: recorded in `ctx.gather` when set, else plainly.
    pub fn lookup(table: &Tensor, ids: &Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        match &ctx.gather {
            Some(g) if ctx.grad => {
                let rows = candle_core::Var::from_tensor(&table.detach().embedding(ids)?)?;
                let t = rows.as_tensor().clone();
                g.borrow_mut().push(Gathered {
                    table: table.id(),
                    ids: ids.to_vec1::<u32>()?,
                    rows,
                });
                Ok(t)
            }
            _ => table.embedding(ids),
        }
    }
}

impl Ctx {
    /// No routing at all (models without experts, heads).
    pub fn none() -> Ctx {
        Ctx {
            sequence: None,
            shape: (0, 0),
            mask: None,
            plain: true,
            record: RefCell::new(Vec::new()),
            trace: None,
            tap: None,
            grad: false,
            gather: None,
        }
    }

    /// A batch of `batch` rows of `seq` tokens with `experts` experts.
    pub fn batch(batch: usize, seq: usize, experts: usize) -> Ctx {
        Ctx {
            sequence: None,
            shape: (batch, seq),
            mask: None,
            plain: false,
            record: RefCell::new(vec![0.0; batch * experts]),
            trace: None,
            tap: None,
            grad: false,
            gather: None,
        }
    }
}

/// A layer's experts and gate.
pub struct Side {
    experts: usize,
    /// Per expert: `in × rank` and `rank × out` (`None` for an expert that leaves the layer
    /// as it is).
    factors: Vec<Option<(Tensor, Tensor)>>,
    /// `experts × out`.
    bias: Option<Tensor>,
    gate: Gate,
    /// Bytes of f32 parameters held (factors, biases, gate).
    pub bytes: usize,
}

/// `a·b` by the AVX-512 kernel when it applies (f32 on the CPU, outside autograd), else by
/// candle.
fn mm_fast(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match crate::nn::plain_matmul(a, b)? {
        Some(p) => Ok(p),
        None => Ok(a.matmul(b)?),
    }
}

impl Side {
    /// `experts`' factors for a layer of `inp` inputs and `out` outputs.
    pub fn new(inp: usize, out: usize, experts: &[Factors], gate: Gate) -> Result<Side> {
        let e = experts.len();
        if e == 0 || experts.iter().all(|f| f.rank == 0) {
            return Err(Error::Argument("a routed layer needs experts".into()));
        }
        for f in experts {
            if f.down.len() != inp * f.rank || f.up.len() != f.rank * out {
                return Err(Error::Argument(format!(
                    "expert factors of rank {} do not fit a {out}×{inp} layer",
                    f.rank
                )));
            }
        }
        let factors = experts
            .iter()
            .map(|f| {
                if f.rank == 0 {
                    return Ok(None);
                }
                Ok(Some((
                    Tensor::from_vec(f.down.clone(), (inp, f.rank), &Device::Cpu)?,
                    Tensor::from_vec(f.up.clone(), (f.rank, out), &Device::Cpu)?,
                )))
            })
            .collect::<Result<Vec<_>>>()?;
        let bias = if experts.iter().any(|f| f.bias.is_some()) {
            let mut b = vec![0f32; e * out];
            for (k, f) in experts.iter().enumerate() {
                if let Some(d) = &f.bias {
                    b[k * out..(k + 1) * out].copy_from_slice(d);
                }
            }
            Some(Tensor::from_vec(b, (e, out), &Device::Cpu)?)
        } else {
            None
        };
        let gate_bytes = match &gate {
            Gate::Smile { proj, .. } => proj.elem_count() * 4,
            Gate::Arrow { protos, .. } => protos.elem_count() * 4,
            Gate::Sequence => 0,
        };
        let bytes = 4 * (experts.iter().map(|f| (inp + out) * f.rank).sum::<usize>())
            + bias.as_ref().map_or(0, |b| b.elem_count() * 4)
            + gate_bytes;
        Ok(Side {
            experts: e,
            factors,
            bias,
            gate,
            bytes,
        })
    }

    /// The number of experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// The weights `rows × experts` for the layer input `x` (`rows × in`).
    pub fn weights(&self, x: &Tensor, ctx: &Ctx) -> Result<Vec<f32>> {
        let rows = x.dim(0)?;
        let e = self.experts;
        let w = match &self.gate {
            Gate::Smile {
                proj,
                gate_k,
                top_k,
            } => {
                let p = mm_fast(x, proj)?.flatten_all()?.to_vec1::<f32>()?;
                gate::smile(&p, rows, e, *gate_k, *top_k)
            }
            Gate::Arrow {
                protos,
                top_k,
                temperature,
            } => {
                let s = mm_fast(x, protos)?.flatten_all()?.to_vec1::<f32>()?;
                gate::arrow(&s, rows, e, *top_k, *temperature)
            }
            Gate::Sequence => {
                let Some(seq_w) = &ctx.sequence else {
                    return Err(Error::Argument(
                        "these experts are routed per sequence, but no sequence weights were \
                         given"
                            .into(),
                    ));
                };
                let (b, t) = ctx.shape;
                gate::broadcast(seq_w, b, t, e)
            }
        };
        if !matches!(self.gate, Gate::Sequence) {
            self.record(&w, rows, ctx);
        }
        if let Some(trace) = &ctx.trace {
            trace.borrow_mut().push(w.clone());
        }
        Ok(w)
    }

    /// Add the token weights of this layer to the context's record.
    fn record(&self, w: &[f32], rows: usize, ctx: &Ctx) {
        let (b, t) = ctx.shape;
        let e = self.experts;
        let mut rec = ctx.record.borrow_mut();
        if b * t != rows || rec.len() != b * e {
            return;
        }
        for r in 0..rows {
            let m = ctx.mask.as_ref().map_or(1.0, |m| m[r]);
            if m == 0.0 {
                continue;
            }
            let seq = r / t;
            for k in 0..e {
                rec[seq * e + k] += f64::from(w[r * e + k]);
            }
        }
    }

    /// `y + Σₑ gₑ·(Uₑ(Vₑᵀx) + Δbₑ)` for `x` `rows × in`, `y` `rows × out`.
    pub fn add(&self, x: &Tensor, y: Tensor, ctx: &Ctx) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let e = self.experts;
        let w = self.weights(x, ctx)?;
        if w.iter().all(|&v| v == 0.0) {
            return Ok(y);
        }
        let mut y = y;
        for (k, f) in self.factors.iter().enumerate() {
            let Some((down, up)) = f else { continue };
            let picked: Vec<u32> = (0..rows)
                .filter(|&r| w[r * e + k] != 0.0)
                .map(|r| r as u32)
                .collect();
            if picked.is_empty() {
                continue;
            }
            let g: Vec<f32> = picked.iter().map(|&r| w[r as usize * e + k]).collect();
            let g = Tensor::from_vec(g, (picked.len(), 1), x.device())?;
            let mm = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                if ctx.grad {
                    return Ok(a.matmul(b)?);
                }
                mm_fast(a, b)
            };
            if picked.len() == rows {
                y = (y + mm(&mm(x, down)?.broadcast_mul(&g)?, up)?)?;
            } else {
                let n = picked.len();
                let idx = Tensor::from_vec(picked, n, x.device())?;
                let delta = mm(&mm(&x.index_select(&idx, 0)?, down)?.broadcast_mul(&g)?, up)?;
                y = y.index_add(&idx, &delta, 0)?;
            }
        }
        if let Some(b) = &self.bias {
            let g = Tensor::from_vec(w, (rows, e), x.device())?;
            y = (y + g.matmul(b)?)?;
        }
        Ok(y)
    }
}
