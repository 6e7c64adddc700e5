//! The diagonal Fisher information of every parameter (Fisher merging's statistic), by
//! backward passes through the differentiable forms of the forward pass ([`Ctx::grad`]).
//!
//! - Encoder + classification head: `exact` (the default, the Fisher authors' code,
//!   mmatena/model_merging `_compute_exact_fisher_for_batch`): per example alone,
//!   `Σ_c p_c·(∇ log p_c)²`, one backward pass per class; `empirical`: `(∇ log p_y)²` of the
//!   example's label `y`; `batch` (FusionBench 0.2.33's `get_param_squared_gradients` after
//!   the backward of `Σ_rows Σ_c √p_c·log p_c` over a padded batch, `p` held constant): one
//!   backward per batch, an approximation with cross-example terms. FusionBench divides the
//!   sum by batches × batch size, counting a last partial batch as full; here it is divided
//!   by the rows measured.
//! - Decoder LM: `empirical`, per row alone, `(∇ Σ_t log p(x_{t+1} | x_≤t))²`: the Fisher of
//!   the row's own log-likelihood.
//!
//! The sums are over examples (or batches), divided by the number of examples. Parameters the
//! forward pass does not use (a BERT pooler) get zeros. The head is not part of the statistic.

use std::path::Path;

use candle_core::{D, Tensor};

use super::{Options, Summary, in_order};
use crate::error::{Error, Result};
use crate::eval::{Evaluator, Net, Progress};
use crate::grad::ParamGrad;
use crate::head::Head;
use crate::route::side::Ctx;
use crate::task::{Kind, Task};

/// The Fisher estimator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FisherVariant {
    /// The expectation over classes, per example.
    Exact,
    /// The true label's (classification) or the sequence's own (LM) log-likelihood.
    Empirical,
    /// FusionBench's batch approximation.
    Batch,
}

impl FisherVariant {
    /// The name in the stats file.
    pub fn name(self) -> &'static str {
        match self {
            FisherVariant::Exact => "exact",
            FisherVariant::Empirical => "empirical",
            FisherVariant::Batch => "batch",
        }
    }
}

impl Evaluator {
    /// Measure the diagonal Fisher of every parameter on `task` (with `head` for an encoder;
    /// none for a decoder LM) and write it to `out`. The model must have been opened with
    /// [`open_trainable`](Evaluator::open_trainable).
    pub fn measure_fisher(
        &self,
        task: &Task,
        head: Option<&Head>,
        variant: FisherVariant,
        opts: &Options,
        out: &Path,
        progress: Progress,
    ) -> Result<Summary> {
        if self.vars.is_empty() {
            return Err(Error::Argument(
                "the Fisher needs the model opened for gradients (Evaluator::open_trainable)"
                    .into(),
            ));
        }
        if self.expert_counts().is_some() {
            return Err(Error::Argument(format!(
                "{}: measuring a mixture-of-experts model is not supported",
                self.path.display()
            )));
        }
        if out.exists() && !opts.overwrite {
            return Err(Error::Argument(format!(
                "{}: already exists; pass --overwrite to replace it",
                out.display()
            )));
        }
        let needs_labels = variant == FisherVariant::Empirical;
        match (&self.net, head) {
            (Net::Bert(_), None) => {
                return Err(Error::Argument(
                    "an encoder's Fisher is that of its classifier: give the task's head".into(),
                ));
            }
            (Net::Decoder(_), Some(_)) => {
                return Err(Error::Argument(
                    "a decoder LM's Fisher is that of its own next-token predictions; it takes \
                     no head"
                        .into(),
                ));
            }
            (Net::Decoder(_), None) if variant != FisherVariant::Empirical => {
                return Err(Error::Argument(format!(
                    "a decoder LM's Fisher is the empirical one (of each row's own tokens); \
                     {} needs a classifier",
                    variant.name()
                )));
            }
            (Net::Bert(_), Some(h)) => {
                if needs_labels && task.kind != Kind::Classification {
                    return Err(Error::Task {
                        path: task.path.clone(),
                        line: 0,
                        reason: "the empirical Fisher of a classifier needs a \"label\" per row"
                            .into(),
                    });
                }
                if let Some((i, &l)) = task
                    .labels
                    .iter()
                    .enumerate()
                    .find(|(_, l)| needs_labels && **l >= h.classes)
                {
                    return Err(Error::Task {
                        path: task.path.clone(),
                        line: task.lines[i],
                        reason: format!("label {l} is outside the head's {} classes", h.classes),
                    });
                }
            }
            _ => {}
        }
        let size = if variant == FisherVariant::Batch {
            self.batch_size
        } else {
            1
        };
        let batches = self.batches_of(&task.texts, size)?;
        let mut sums: Vec<Vec<f64>> = self
            .vars
            .iter()
            .map(|(_, v)| vec![0f64; v.elem_count()])
            .collect();
        let work = |i: usize| -> Result<Vec<Acc>> {
            let (idx, b) = &batches[i];
            let mut ctx = Ctx::none();
            ctx.grad = true;
            ctx.gather = Some(std::cell::RefCell::new(Vec::new()));
            let mut acc: Vec<Acc> = (0..self.vars.len()).map(|_| Acc::None).collect();
            let ctx_ref = &ctx;
            let mut add = |scalar: &Tensor, weight: f32| -> Result<()> {
                let grads = scalar.backward()?;
                let gathered = ctx_ref.gather.as_ref().expect("set above").borrow();
                for (slot, (_, var)) in acc.iter_mut().zip(&self.vars) {
                    match crate::grad::param_grad(&grads, &gathered, var)? {
                        Some(ParamGrad::Dense(g)) => slot.add_dense(&g, weight),
                        Some(ParamGrad::Rows(rows, width)) => slot.add_rows(&rows, width, weight),
                        None => {}
                    }
                }
                Ok(())
            };
            match (&self.net, head) {
                (Net::Bert(bert), Some(h)) => {
                    let pooled = bert.embed_routed(&b.ids, &b.type_ids, &b.mask, &ctx)?;
                    let logits = h.forward(&pooled)?;
                    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                    match variant {
                        FisherVariant::Batch => {
                            let p = logp.exp()?.detach();
                            let s = (p.sqrt()? * &logp)?.sum_all()?;
                            add(&s, 1.0)?;
                        }
                        FisherVariant::Exact => {
                            let p = logp.exp()?.flatten_all()?.to_vec1::<f32>()?;
                            for (c, &pc) in p.iter().enumerate() {
                                add(&logp.get(0)?.get(c)?, pc)?;
                            }
                        }
                        FisherVariant::Empirical => {
                            let y = task.labels[idx[0]];
                            add(&logp.get(0)?.get(y)?, 1.0)?;
                        }
                    }
                }
                (Net::Decoder(dec), None) => {
                    let logits = dec.forward_routed(&b.ids, &ctx)?;
                    let t = b.lengths[0];
                    if t >= 2 {
                        let logp = candle_nn::ops::log_softmax(
                            &logits.get(0)?.narrow(0, 0, t - 1)?,
                            D::Minus1,
                        )?;
                        let targets = b.ids.get(0)?.narrow(0, 1, t - 1)?.unsqueeze(1)?;
                        let s = logp.gather(&targets.contiguous()?, 1)?.sum_all()?;
                        add(&s, 1.0)?;
                    }
                }
                _ => unreachable!("checked above"),
            }
            progress(idx.len());
            Ok(acc)
        };
        in_order(batches.len(), work, |_, acc| {
            for (s, a) in sums.iter_mut().zip(acc) {
                match a {
                    Acc::None => {}
                    Acc::Dense(a) => {
                        for (x, v) in s.iter_mut().zip(a) {
                            *x += f64::from(v);
                        }
                    }
                    Acc::Rows(rows, width) => {
                        for (id, r) in rows {
                            let at = id as usize * width;
                            for (x, &v) in s[at..at + width].iter_mut().zip(&r) {
                                *x += f64::from(v);
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        let rows = task.texts.len();
        let mut values: Vec<(String, Vec<usize>, Vec<f64>)> = self
            .vars
            .iter()
            .zip(sums)
            .map(|((name, var), s)| {
                let mean = s.into_iter().map(|v| v / rows as f64).collect();
                (name.clone(), var.dims().to_vec(), mean)
            })
            .collect();
        let model = amalgam::io::Model::open(&self.path)?;
        // Parameters the forward pass never loaded: zeros, so a merge finds every tensor.
        for t in model.tensors() {
            if t.dtype.is_float() && !values.iter().any(|(n, _, _)| *n == t.name) {
                values.push((t.name.clone(), t.shape.clone(), vec![0.0; t.numel()]));
            }
        }
        let mut options = std::collections::BTreeMap::new();
        options.insert("variant".into(), variant.name().to_string());
        options.insert("max_len".into(), self.max_len.to_string());
        options.insert("data".into(), super::file_name(&task.path));
        if variant == FisherVariant::Batch {
            options.insert("batch_size".into(), self.batch_size.to_string());
        }
        super::write_stats(
            &model,
            values,
            amalgam::stats::Kind::Fisher,
            rows,
            rows as u64,
            options,
            opts,
            out,
        )
    }
}

/// One batch's weighted squared gradients of one parameter.
enum Acc {
    /// No gradient reached it.
    None,
    /// Every element.
    Dense(Vec<f32>),
    /// Only these rows (of the given width) of an embedding table are nonzero.
    Rows(std::collections::BTreeMap<u32, Vec<f32>>, usize),
}

impl Acc {
    /// Add `weight · g²`.
    fn add_dense(&mut self, g: &[f32], weight: f32) {
        if let Acc::Rows(rows, width) = self {
            let mut dense = vec![0f32; g.len()];
            for (id, r) in std::mem::take(rows) {
                let at = id as usize * *width;
                dense[at..at + *width].copy_from_slice(&r);
            }
            *self = Acc::Dense(dense);
        }
        if let Acc::None = self {
            *self = Acc::Dense(vec![0f32; g.len()]);
        }
        let Acc::Dense(d) = self else {
            unreachable!("made dense above")
        };
        for (s, &v) in d.iter_mut().zip(g) {
            *s += weight * v * v;
        }
    }

    /// Add `weight · g²` for a gradient nonzero only on `rows`.
    fn add_rows(
        &mut self,
        rows: &std::collections::BTreeMap<u32, Vec<f32>>,
        width: usize,
        weight: f32,
    ) {
        match self {
            Acc::None => *self = Acc::Rows(Default::default(), width),
            Acc::Dense(d) => {
                for (id, r) in rows {
                    let at = *id as usize * width;
                    for (s, &v) in d[at..at + width].iter_mut().zip(r) {
                        *s += weight * v * v;
                    }
                }
                return;
            }
            Acc::Rows(..) => {}
        }
        let Acc::Rows(acc, _) = self else {
            unreachable!("rows above")
        };
        for (id, r) in rows {
            let row = acc.entry(*id).or_insert_with(|| vec![0f32; width]);
            for (s, &v) in row.iter_mut().zip(r) {
                *s += weight * v * v;
            }
        }
    }
}
