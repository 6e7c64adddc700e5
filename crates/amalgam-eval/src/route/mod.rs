//! Routing: one shared model in memory plus small per-task experts on its linear layers,
//! chosen per input (issue #16).
//!
//! One routed linear layer serves every method: `y = W·x + Σₑ gₑ(x)·Uₑ(Vₑᵀx)` ([`side`]),
//! each expert a low-rank pair built from what the user holds ([`experts`]: a LoRA's factors, a
//! truncated SVD of a dense fine-tune's or a library task's weight delta). The methods differ
//! only in the gate ([`gate`]): SMILE and Arrow read each token's layer input (zero-shot);
//! the calibrated router ([`router`]), the oracle and uniform weights give one set of weights
//! per input sequence.

pub mod experts;
pub mod gate;
pub mod router;
pub mod side;

use std::collections::BTreeSet;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::nn::{Deltas, Linear, Routable};
use experts::{Expert, LayerExpert, Opened, Truncation};
use side::{Factors, Gate, Side};

/// The gate every routed layer gets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "gate", rename_all = "snake_case")]
pub enum GateKind {
    /// SMILE, per token.
    Smile {
        /// Singular vectors per expert in the gate.
        gate_k: usize,
        /// Experts per token.
        top_k: usize,
    },
    /// Arrow, per token.
    Arrow {
        /// Experts per token.
        top_k: usize,
        /// Softmax temperature.
        temperature: f32,
    },
    /// Weights given per sequence (calibrated router, oracle, uniform).
    Sequence,
}

/// What [`attach`] put on the model.
#[derive(Clone, Debug, Serialize)]
pub struct Attached {
    /// The experts, in order (their weights' order).
    pub experts: Vec<String>,
    /// Linear layers that got a side path.
    pub layers: usize,
    /// Bytes of f32 expert parameters held (factors, bias deltas, gates).
    pub bytes: usize,
}

/// The delta of one expert at one layer, or `None` where it leaves the layer as it is.
fn layer_expert(
    opened: &Opened,
    expert: &Expert,
    linear: &Linear,
    prefix: &str,
    kind: GateKind,
    trunc: Truncation,
    general: &[Opened],
) -> Result<Option<LayerExpert>> {
    let (out, inp) = linear.shape()?;
    let name = &linear.name;
    let module_err = |reason: String| {
        Error::Argument(format!(
            "{}: module {prefix}{name}: {reason}",
            expert.describe()
        ))
    };
    match opened {
        Opened::Dense(w) => {
            let we = w.get(&format!("{name}.weight"), &[out, inp])?;
            let mut dw = we.flatten_all()?.to_vec1::<f32>()?;
            for (d, s) in dw.iter_mut().zip(linear.weight()?) {
                *d -= s;
            }
            let db = match linear.bias()? {
                Some(bs) => {
                    let be = w.get(&format!("{name}.bias"), &[out])?.to_vec1::<f32>()?;
                    Some(be.iter().zip(&bs).map(|(e, s)| e - s).collect())
                }
                None => None,
            };
            experts::dense(&dw, db, (out, inp), trunc).map_err(module_err)
        }
        Opened::Adapter(a) => {
            let key = format!("{prefix}{name}.weight");
            let Some(m) = a.modules.get(&key) else {
                return Ok(None);
            };
            if m.shape != [out, inp] {
                return Err(module_err(format!(
                    "the adapter's delta has shape {:?}, the shared model's layer [{out}, {inp}]; \
                     is the adapter for this model?",
                    m.shape
                )));
            }
            if m.transposed {
                return Err(module_err(
                    "fan-in-fan-out (transposed) adapters are not supported for routing".into(),
                ));
            }
            let (mut fa, mut fb) = a.factors(m)?;
            let bias = a.bias_delta(&format!("{prefix}{name}.bias"))?;
            if !general.is_empty() {
                // GenKnowSub: the general adapters' mean A and mean B (their raw factors, no
                // scaling) subtracted from this adapter's own, as PEFT does before it builds
                // the prototypes; the output uses the subtracted factors too.
                let (ma, mb) = general_means(general, &key, fa.len(), fb.len())?;
                fa.iter_mut().zip(&ma).for_each(|(x, m)| *x -= m);
                fb.iter_mut().zip(&mb).for_each(|(x, m)| *x -= m);
            }
            if matches!(kind, GateKind::Arrow { .. }) {
                return experts::lora(&fa, &fb, (out, inp, m.rank), m.scaling as f32, bias)
                    .map(Some)
                    .map_err(module_err);
            }
            // Other gates see the adapter as its dense delta s·B·A (as `lora apply` adds it).
            let mut dw = vec![0f32; out * inp];
            m.add_delta_rows(&fa, &fb, 1.0, 0..out, &mut dw, &mut Vec::new());
            experts::dense(&dw, bias, (out, inp), trunc).map_err(module_err)
        }
    }
}

/// The mean `A` and mean `B` of module `key` over the general adapters (GenKnowSub).
fn general_means(
    general: &[Opened],
    key: &str,
    a_len: usize,
    b_len: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut ma, mut mb) = (vec![0f32; a_len], vec![0f32; b_len]);
    for g in general {
        let Opened::Adapter(g) = g else {
            unreachable!("checked by attach")
        };
        let Some(m) = g.modules.get(key) else {
            return Err(Error::Argument(format!(
                "{}: the general adapter does not adapt {key}; GenKnowSub needs general \
                 adapters on the task adapters' modules",
                g.dir.display()
            )));
        };
        let (a, b) = g.factors(m)?;
        if a.len() != a_len || b.len() != b_len {
            return Err(Error::Argument(format!(
                "{}: module {key} has rank {}, unlike the task adapters; GenKnowSub needs one \
                 rank",
                g.dir.display(),
                m.rank
            )));
        }
        ma.iter_mut().zip(&a).for_each(|(s, v)| *s += v);
        mb.iter_mut().zip(&b).for_each(|(s, v)| *s += v);
    }
    let n = general.len() as f32;
    ma.iter_mut().for_each(|v| *v /= n);
    mb.iter_mut().for_each(|v| *v /= n);
    Ok((ma, mb))
}

/// Put `experts` on `linears` (the shared model's routable layers, under `prefix`) with gate
/// `kind`, and, for sequence-level weights, their deltas of the other `routables` (norms,
/// embeddings: a sequence's parameters are then wholly its weighted merge); `arch` is the
/// architecture's `(prefixes, probe)` for opening dense experts. `general`: LoRA adapters whose
/// mean factors are subtracted from every adapter expert's (Arrow's GenKnowSub option).
/// `progress(done, total)` after each layer.
#[allow(clippy::too_many_arguments)]
pub fn attach(
    (linears, routables): (Vec<&mut Linear>, Vec<Routable<'_>>),
    prefix: &str,
    experts: &[Expert],
    general: &[Expert],
    kind: GateKind,
    trunc: Truncation,
    arch: (&[&str], &str),
    progress: &dyn Fn(usize, usize),
) -> Result<Attached> {
    if experts.is_empty() {
        return Err(Error::Argument("routing needs at least one expert".into()));
    }
    let mut seen = BTreeSet::new();
    for e in experts {
        if !seen.insert(e.name.as_str()) {
            return Err(Error::Argument(format!(
                "two experts are named '{}' ({}); expert names must be distinct",
                e.name,
                e.describe()
            )));
        }
    }
    let n = experts.len();
    match kind {
        GateKind::Smile { top_k, gate_k } => {
            if top_k == 0 || top_k > n {
                return Err(Error::Argument(format!(
                    "--top-k {top_k} must be between 1 and the number of experts ({n})"
                )));
            }
            if gate_k == 0 {
                return Err(Error::Argument("--gate-k must be at least 1".into()));
            }
        }
        GateKind::Arrow { top_k, temperature } => {
            if top_k == 0 || top_k > n {
                return Err(Error::Argument(format!(
                    "--top-k {top_k} must be between 1 and the number of experts ({n})"
                )));
            }
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::Argument(format!(
                    "--temperature {temperature} must be a positive number"
                )));
            }
        }
        GateKind::Sequence => {}
    }
    if trunc.rank == Some(0) {
        return Err(Error::Argument("--rank must be at least 1".into()));
    }
    if !general.is_empty() && !matches!(kind, GateKind::Arrow { .. }) {
        return Err(Error::Argument(
            "general adapters (GenKnowSub) are an option of Arrow routing".into(),
        ));
    }
    let open = |list: &[Expert]| {
        list.iter()
            .map(|e| Opened::open(e, arch.0, arch.1))
            .collect::<Result<Vec<_>>>()
    };
    let (opened, general_opened) = (open(experts)?, open(general)?);
    if matches!(kind, GateKind::Arrow { .. }) {
        check_arrow(
            experts
                .iter()
                .zip(&opened)
                .chain(general.iter().zip(&general_opened)),
        )?;
    }
    // Every layer's side is built before any is put on the model: an error leaves the model as
    // it was.
    let total = linears.len();
    let mut layers = 0;
    let mut bytes = 0;
    let mut sides: Vec<Option<Side>> = Vec::with_capacity(total);
    for (done, linear) in linears.iter().enumerate() {
        let (out, inp) = linear.shape()?;
        let per: Vec<Option<LayerExpert>> = opened
            .iter()
            .zip(experts)
            .map(|(o, e)| layer_expert(o, e, linear, prefix, kind, trunc, &general_opened))
            .collect::<Result<_>>()?;
        if per.iter().all(Option::is_none) {
            sides.push(None);
            progress(done + 1, total);
            continue;
        }
        let empty = Factors {
            down: Vec::new(),
            up: Vec::new(),
            rank: 0,
            bias: None,
        };
        let factors: Vec<Factors> = per
            .iter()
            .map(|p| p.as_ref().map_or(empty.clone(), |p| p.factors.clone()))
            .collect();
        let gate = match kind {
            GateKind::Smile { gate_k, top_k } => {
                let mut proj = vec![0f32; inp * n * gate_k];
                for (e, p) in per.iter().enumerate() {
                    if let Some(p) = p {
                        for i in 0..inp {
                            let dst = i * n * gate_k + e * gate_k;
                            proj[dst..dst + gate_k]
                                .copy_from_slice(&p.gate[i * gate_k..(i + 1) * gate_k]);
                        }
                    }
                }
                Gate::Smile {
                    proj: candle_core::Tensor::from_vec(
                        proj,
                        (inp, n * gate_k),
                        &candle_core::Device::Cpu,
                    )?,
                    gate_k,
                    top_k,
                }
            }
            GateKind::Arrow { top_k, temperature } => {
                let mut protos = vec![0f32; inp * n];
                for (e, p) in per.iter().enumerate() {
                    if let Some(p) = p {
                        for i in 0..inp {
                            protos[i * n + e] = p.prototype[i];
                        }
                    }
                }
                Gate::Arrow {
                    protos: candle_core::Tensor::from_vec(
                        protos,
                        (inp, n),
                        &candle_core::Device::Cpu,
                    )?,
                    top_k,
                    temperature,
                }
            }
            GateKind::Sequence => Gate::Sequence,
        };
        let side = Side::new(inp, out, &factors, gate)?;
        bytes += side.bytes;
        layers += 1;
        sides.push(Some(side));
        progress(done + 1, total);
    }
    let mut vectors: Vec<Option<Deltas>> = Vec::with_capacity(routables.len());
    if kind == GateKind::Sequence {
        for r in &routables {
            let shared = r.value.flatten_all()?.to_vec1::<f32>()?;
            let mut deltas = Vec::with_capacity(n * shared.len());
            let mut any = false;
            for o in &opened {
                let value = vector_of(o, r, prefix)?;
                match value {
                    Some(v) => {
                        for (a, b) in v.iter().zip(&shared) {
                            let d = a - b;
                            any |= d != 0.0;
                            deltas.push(d);
                        }
                    }
                    None => deltas.extend(std::iter::repeat_n(0.0, shared.len())),
                }
            }
            if any {
                let d = Deltas::new(candle_core::Tensor::from_vec(
                    deltas,
                    (n, shared.len()),
                    &candle_core::Device::Cpu,
                )?);
                bytes += d.bytes();
                vectors.push(Some(d));
            } else {
                vectors.push(None);
            }
        }
    }
    if layers == 0 {
        return Err(Error::Argument(
            "no expert differs from the shared model in any linear layer; nothing to route".into(),
        ));
    }
    for (linear, side) in linears.into_iter().zip(sides) {
        linear.side = side;
    }
    for (r, d) in routables.into_iter().zip(vectors) {
        *r.side = d;
    }
    Ok(Attached {
        experts: experts.iter().map(|e| e.name.clone()).collect(),
        layers,
        bytes,
    })
}

/// An expert's value of the routable `r` (flattened), or `None` where it keeps the shared one
/// (an adapter that does not replace it).
fn vector_of(o: &Opened, r: &Routable, prefix: &str) -> Result<Option<Vec<f32>>> {
    let shape = r.value.dims().to_vec();
    Ok(match o {
        Opened::Dense(w) => Some(w.get(&r.name, &shape)?.flatten_all()?.to_vec1::<f32>()?),
        Opened::Adapter(a) => match a.replaced.get(&format!("{prefix}{}", r.name)) {
            Some(t) => {
                let v = a.file.floats(t)?;
                if v.len() != r.value.elem_count() {
                    return Err(Error::Argument(format!(
                        "{}: {t} replaces {prefix}{} with {} values; the shared model has {}",
                        a.dir.display(),
                        r.name,
                        v.len(),
                        r.value.elem_count()
                    )));
                }
                Some(v)
            }
            None => None,
        },
    })
}

/// Arrow's requirements (PEFT's `check_loaded_lora_compatibility_arrow`): every expert a LoRA
/// adapter, all of one rank and the same target modules.
fn check_arrow<'a>(experts: impl Iterator<Item = (&'a Expert, &'a Opened)>) -> Result<()> {
    let mut first: Option<(&Expert, BTreeSet<&String>, BTreeSet<usize>)> = None;
    for (e, o) in experts {
        let Opened::Adapter(a) = o else {
            return Err(Error::Argument(format!(
                "{}: Arrow routes LoRA adapters; this expert is a dense model (use --route \
                 smile for dense fine-tunes)",
                e.describe()
            )));
        };
        let modules: BTreeSet<&String> = a.modules.keys().collect();
        let ranks: BTreeSet<usize> = a.modules.values().map(|m| m.rank).collect();
        match &first {
            None => first = Some((e, modules, ranks)),
            Some((f, fm, fr)) => {
                if &modules != fm {
                    let only: Vec<&&String> = modules.symmetric_difference(fm).take(3).collect();
                    return Err(Error::Argument(format!(
                        "{} and {} adapt different modules (e.g. {only:?}); Arrow needs every \
                         adapter on the same target modules",
                        e.describe(),
                        f.describe()
                    )));
                }
                if &ranks != fr {
                    return Err(Error::Argument(format!(
                        "{} has rank(s) {ranks:?}, {} has {fr:?}; Arrow needs adapters of one \
                         rank",
                        e.describe(),
                        f.describe()
                    )));
                }
            }
        }
    }
    Ok(())
}
