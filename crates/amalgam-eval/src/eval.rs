//! Evaluation of a model folder on tasks: accuracy of a linear head on mean-pooled encoder
//! outputs, or per-token loss and perplexity of a decoder LM.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::bert::Bert;
use crate::config::Arch;
use crate::decoder::{Decoder, token_nll};
use crate::error::{Error, Result};
use crate::head::Head;
use crate::route::experts::{Expert, Truncation};
use crate::route::side::Ctx;
use crate::route::{Attached, GateKind};
use crate::task::{Kind, Task};
use crate::tokenize::{Batch, Tok, pad};
use crate::weights::Weights;

/// Longest default input for decoders (their context is usually far longer than evaluation
/// needs, and attention cost grows with its square).
pub const DEFAULT_DECODER_MAX_LEN: usize = 1024;

/// Called with the number of rows finished after each batch (from any worker thread).
pub type Progress<'a> = &'a (dyn Fn(usize) + Sync);

/// What one task measured.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Metrics {
    /// Classification.
    Accuracy {
        /// Examples evaluated.
        examples: usize,
        /// Fraction classified correctly.
        accuracy: f64,
    },
    /// Language modelling.
    Perplexity {
        /// Examples evaluated.
        examples: usize,
        /// Mean negative log-likelihood per predicted token (nats).
        loss: f64,
        /// `exp(loss)`.
        perplexity: f64,
    },
}

/// One task's line of `amalgam eval`'s report (what `--json` prints per task).
#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    /// The task's result.
    #[serde(flatten)]
    pub result: TaskResult,
    /// Routed: the fraction of rows whose top expert is the task's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_accuracy: Option<f64>,
    /// An MoE model: per layer, the fraction of this task's routed tokens each expert received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_fractions: Option<Vec<Vec<f64>>>,
}

/// One task's result.
#[derive(Clone, Debug, Serialize)]
pub struct TaskResult {
    /// The task name (file name without `.jsonl` / `.test.jsonl`).
    pub name: String,
    /// Its metrics.
    #[serde(flatten)]
    pub metrics: Metrics,
}

pub(crate) enum Net {
    Bert(Box<Bert>),
    Decoder(Box<Decoder>),
}

/// A model ready to evaluate.
pub struct Evaluator {
    /// The model path as given.
    pub path: PathBuf,
    /// Inputs are truncated to this many tokens.
    pub max_len: usize,
    /// Rows per forward pass.
    pub batch_size: usize,
    pub(crate) net: Net,
    tok: Tok,
    vocab_size: usize,
    device: Device,
    /// The name prefix of the model's tensors (`"bert."`, `"model."`, ...).
    pub(crate) prefix: String,
    /// Parameters in the model's float tensors.
    parameters: usize,
    /// The experts on the routed layers, if any.
    routed: Option<Attached>,
    /// Every parameter as a candle `Var`, by stored name, when opened for gradients
    /// ([`open_trainable`](Self::open_trainable)).
    pub(crate) vars: Vec<(String, candle_core::Var)>,
}

/// How the experts of a routed model are weighted for an evaluation.
#[derive(Clone, Copy, Debug)]
pub enum Weighting<'a> {
    /// The layers' own token gates (SMILE, Arrow).
    Token,
    /// The same weights for every input (`experts` long: uniform, or the oracle's one-hot).
    Fixed(&'a [f32]),
    /// One weight vector per input row (a calibrated router's), in task order.
    PerRow(&'a [Vec<f32>]),
}

/// A routed evaluation's result: the task's metrics and each row's top expert.
pub struct Routed {
    /// The metrics.
    pub result: TaskResult,
    /// Per row (task order): the expert with the largest weight (token gates: summed over
    /// tokens and routed layers).
    pub top: Vec<usize>,
}

impl Evaluator {
    /// Load the model at `path` (a folder with `config.json`, `tokenizer.json` and safetensors,
    /// or a safetensors file or index inside such a folder). `max_len` defaults to the
    /// sentence-transformers setting (`sentence_bert_config.json`) or the position table for
    /// encoders, and [`DEFAULT_DECODER_MAX_LEN`] for decoders.
    pub fn open(path: &Path, max_len: Option<usize>) -> Result<Evaluator> {
        Evaluator::from_weights(path, Weights::open(path)?, max_len)
    }

    /// [`open`](Self::open) with every parameter a candle `Var`, so that backward passes give
    /// each a gradient (`amalgam measure --stats fisher`).
    pub fn open_trainable(path: &Path, max_len: Option<usize>) -> Result<Evaluator> {
        let mut w = Weights::open(path)?;
        w.set_trainable();
        Evaluator::from_weights(path, w, max_len)
    }

    /// [`open`](Self::open) for task `task` of the library at `lib`, rebuilt in memory from
    /// `base` (default: the library's base), whose folder gives the config and tokenizer.
    pub fn open_library(
        lib: &Path,
        task: &str,
        base: Option<&Path>,
        max_len: Option<usize>,
    ) -> Result<Evaluator> {
        Evaluator::from_weights(lib, Weights::library(lib, task, base)?, max_len)
    }

    fn from_weights(
        path: &Path,
        mut weights: Weights,
        max_len: Option<usize>,
    ) -> Result<Evaluator> {
        let dir = weights.model().dir.clone();
        let arch = Arch::load(&dir)?;
        let max_len = match (max_len, arch.max_positions()) {
            (Some(0), _) => return Err(Error::Argument("--max-len must be at least 1".into())),
            (Some(n), Some(p)) if n > p => {
                return Err(Error::Argument(format!(
                    "--max-len {n} exceeds the model's {p} positions (max_position_embeddings \
                     in {})",
                    dir.join("config.json").display()
                )));
            }
            (Some(n), _) => n,
            (None, Some(p)) => sentence_transformers_max_len(&dir).unwrap_or(p).min(p),
            (None, None) => DEFAULT_DECODER_MAX_LEN,
        };
        let net = match &arch {
            Arch::Bert(c) => Net::Bert(Box::new(Bert::load(&mut weights, c)?)),
            Arch::Decoder(c) => Net::Decoder(Box::new(Decoder::load(&mut weights, c)?)),
        };
        let prefix = weights.prefix().to_string();
        let vars = weights.take_vars();
        let parameters = weights
            .model()
            .tensors()
            .iter()
            .filter(|t| t.dtype.is_float())
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        Ok(Evaluator {
            path: path.to_path_buf(),
            max_len,
            batch_size: 32,
            tok: Tok::load(&dir, max_len)?,
            net,
            vocab_size: arch.vocab_size(),
            device: Device::Cpu,
            prefix,
            parameters,
            routed: None,
            vars,
        })
    }

    /// For an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE): per layer, the tokens its router has
    /// sent to each expert over every forward pass so far (a token counts once per expert of its
    /// top-k, padding included).
    pub fn expert_counts(&self) -> Option<Vec<Vec<u64>>> {
        match &self.net {
            Net::Decoder(d) => d.expert_counts(),
            Net::Bert(_) => None,
        }
    }

    /// For an MoE model: per layer, the fraction of the tokens routed since `before` (what
    /// [`expert_counts`](Self::expert_counts) said then) that each expert received.
    pub fn expert_fractions_since(&self, before: Option<Vec<Vec<u64>>>) -> Option<Vec<Vec<f64>>> {
        let after = self.expert_counts()?;
        let before = before?;
        Some(
            before
                .iter()
                .zip(&after)
                .map(|(b, a)| {
                    let d: Vec<u64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
                    let total = d.iter().sum::<u64>().max(1) as f64;
                    d.iter().map(|&c| c as f64 / total).collect()
                })
                .collect(),
        )
    }

    /// Evaluate `task`: accuracy of `head` (classification) or loss and perplexity (language
    /// modelling, `head` `None`), with an MoE model's expert fractions.
    pub fn evaluate(
        &self,
        task: &Task,
        head: Option<&Head>,
        progress: Progress,
    ) -> Result<TaskReport> {
        let before = self.expert_counts();
        let result = match head {
            Some(h) => self.classify(task, h, progress)?,
            None => self.perplexity(task, progress)?,
        };
        Ok(TaskReport {
            result,
            router_accuracy: None,
            expert_fractions: self.expert_fractions_since(before),
        })
    }

    /// Parameters in the model's float tensors (a library task's: its base's).
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    /// Put `experts` on the model's linear layers with gate `kind` (see [`crate::route`]);
    /// `general`: Arrow's GenKnowSub adapters (or none); `progress(done, total)` after each
    /// layer. Replaces any experts attached before.
    pub fn attach(
        &mut self,
        experts: &[Expert],
        general: &[Expert],
        kind: GateKind,
        trunc: Truncation,
        progress: &dyn Fn(usize, usize),
    ) -> Result<&Attached> {
        let (parts, arch) = match &mut self.net {
            Net::Bert(b) => (
                b.routing_parts(),
                (crate::bert::PREFIXES, crate::bert::PROBE),
            ),
            Net::Decoder(d) => (
                d.routing_parts(),
                (crate::decoder::PREFIXES, crate::decoder::PROBE),
            ),
        };
        let attached = crate::route::attach(
            parts,
            &self.prefix,
            experts,
            general,
            kind,
            trunc,
            arch,
            progress,
        )?;
        Ok(self.routed.insert(attached))
    }

    /// The attached experts, if any.
    pub fn routed(&self) -> Option<&Attached> {
        self.routed.as_ref()
    }

    /// The routing context of one batch (`idx`: its rows' task indices).
    fn ctx(&self, batch: &Batch, idx: &[usize], weighting: Weighting) -> Result<Ctx> {
        let Some(routed) = &self.routed else {
            return Ok(Ctx::none());
        };
        let e = routed.experts.len();
        let (b, t) = batch.ids.dims2()?;
        let mut ctx = Ctx::batch(b, t, e);
        ctx.mask = Some(batch.mask.flatten_all()?.to_vec1::<f32>()?);
        ctx.sequence = match weighting {
            Weighting::Token => None,
            Weighting::Fixed(w) => Some(w.repeat(b)),
            Weighting::PerRow(rows) => Some(idx.iter().flat_map(|&i| rows[i].clone()).collect()),
        };
        if let Some(w) = &ctx.sequence
            && w.len() != b * e
        {
            return Err(Error::Argument(format!(
                "routing weights have {} values per row; the model has {e} experts",
                w.len() / b.max(1)
            )));
        }
        Ok(ctx)
    }

    /// The top expert of each row of a batch after its forward pass.
    fn top_experts(&self, ctx: &Ctx, rows: usize) -> Vec<usize> {
        let Some(routed) = &self.routed else {
            return vec![0; rows];
        };
        let e = routed.experts.len();
        let argmax = |w: &[f64]| {
            (0..w.len())
                .max_by(|&a, &b| w[a].total_cmp(&w[b]).then(b.cmp(&a)))
                .unwrap_or(0)
        };
        match &ctx.sequence {
            Some(seq) => seq
                .chunks(e)
                .map(|w| argmax(&w.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()))
                .collect(),
            None => ctx.record.borrow().chunks(e).map(argmax).collect(),
        }
    }

    /// The encoder's hidden width (heads must match it), or `None` for a decoder.
    pub fn hidden_size(&self) -> Option<usize> {
        match &self.net {
            Net::Bert(b) => Some(b.hidden_size()),
            Net::Decoder(_) => None,
        }
    }

    fn encoder(&self) -> Result<&Bert> {
        match &self.net {
            Net::Bert(b) => Ok(b),
            Net::Decoder(_) => Err(Error::Argument(format!(
                "{}: embeddings and classification need an encoder (model_type bert); this is a \
                 decoder LM: evaluate it on {{\"text\"}} rows for perplexity",
                self.path.display()
            ))),
        }
    }

    /// Tokenize `texts` and yield right-padded batches in order of decreasing length (less
    /// padding), with the original index of each row.
    pub(crate) fn batches(&self, texts: &[String]) -> Result<Vec<(Vec<usize>, Batch)>> {
        self.batches_of(texts, self.batch_size)
    }

    /// [`batches`](Self::batches) of `size` rows.
    pub(crate) fn batches_of(
        &self,
        texts: &[String],
        size: usize,
    ) -> Result<Vec<(Vec<usize>, Batch)>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encoded = self.tok.encode(&refs)?;
        if let Some(id) = encoded
            .iter()
            .flat_map(|e| &e.0)
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(Error::Tokenizer {
                path: self.tok.path().to_path_buf(),
                reason: format!(
                    "token id {id} is outside the model's vocabulary of {} (config.json \
                     vocab_size); is this the model's own tokenizer?",
                    self.vocab_size
                ),
            });
        }
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].0.len()));
        let pad_id = self.tok.pad_id();
        order
            .chunks(size.max(1))
            .map(|idx| {
                let rows: Vec<_> = idx.iter().map(|&i| &encoded[i]).collect();
                Ok((idx.to_vec(), pad(&rows, pad_id, &self.device)?))
            })
            .collect()
    }

    /// Run `f` on every batch of `texts`, batches in parallel on the rayon pool (each batch's
    /// work is independent, so results do not depend on the thread count), and return each
    /// batch's rows (original indices) with its result, in batch order.
    fn map_batches<T: Send>(
        &self,
        texts: &[String],
        progress: Progress,
        f: impl Fn(&[usize], &Batch) -> Result<T> + Sync,
    ) -> Result<Vec<(Vec<usize>, T)>> {
        self.batches(texts)?
            .into_par_iter()
            .map(|(idx, batch)| {
                let out = f(&idx, &batch)?;
                progress(idx.len());
                Ok((idx, out))
            })
            .collect()
    }

    /// Mean-pooled embeddings of `texts` (an encoder only), in input order; `progress` gets the
    /// number of rows finished after each batch.
    pub fn embed(&self, texts: &[String], progress: Progress) -> Result<Vec<Vec<f32>>> {
        let bert = self.encoder()?;
        let pooled = self.map_batches(texts, progress, |_, b| {
            Ok(bert.embed(&b.ids, &b.type_ids, &b.mask)?.to_vec2::<f32>()?)
        })?;
        let mut out = vec![Vec::new(); texts.len()];
        for (idx, rows) in pooled {
            for (row, v) in idx.into_iter().zip(rows) {
                out[row] = v;
            }
        }
        Ok(out)
    }

    /// Accuracy of `head` on a classification task (the shared model alone if experts are
    /// attached).
    pub fn classify(&self, task: &Task, head: &Head, progress: Progress) -> Result<TaskResult> {
        self.classify_routed(task, head, None, progress)
            .map(|r| r.result)
    }

    /// [`classify`](Self::classify) with the attached experts weighted as `weighting` says
    /// (`None`: the shared model alone).
    pub fn classify_routed(
        &self,
        task: &Task,
        head: &Head,
        weighting: Option<Weighting>,
        progress: Progress,
    ) -> Result<Routed> {
        if task.kind != Kind::Classification {
            return Err(Error::Argument(format!(
                "{}: rows have no \"label\"; a head needs a classification task",
                task.path.display()
            )));
        }
        if let Some((i, &label)) = task
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l >= head.classes)
        {
            return Err(Error::Task {
                path: task.path.clone(),
                line: task.lines[i],
                reason: format!(
                    "label {label} is outside the head's {} classes ({}); is this the head \
                     for this task?",
                    head.classes,
                    head.path.display()
                ),
            });
        }
        let bert = self.encoder()?;
        let predicted = self.map_batches(&task.texts, progress, |idx, b| {
            let ctx = match weighting {
                Some(w) => self.ctx(b, idx, w)?,
                None => Ctx::none(),
            };
            let pooled = bert.embed_routed(&b.ids, &b.type_ids, &b.mask, &ctx)?;
            let p = head.forward(&pooled)?.argmax(1)?.to_vec1::<u32>()?;
            Ok((p, self.top_experts(&ctx, idx.len())))
        })?;
        let mut correct = 0;
        let mut top = vec![0; task.texts.len()];
        for (idx, (p, t)) in &predicted {
            for ((&i, &p), &t) in idx.iter().zip(p).zip(t) {
                correct += usize::from(task.labels[i] == p as usize);
                top[i] = t;
            }
        }
        Ok(Routed {
            result: TaskResult {
                name: task.name.clone(),
                metrics: Metrics::Accuracy {
                    examples: task.texts.len(),
                    accuracy: correct as f64 / task.texts.len() as f64,
                },
            },
            top,
        })
    }

    /// Per-token loss and perplexity of a decoder LM on a language-modelling task: the mean,
    /// over every predicted token of every row, of the next-token negative log-likelihood (what
    /// transformers' `labels=input_ids` loss averages within a batch).
    pub fn perplexity(&self, task: &Task, progress: Progress) -> Result<TaskResult> {
        self.perplexity_routed(task, None, progress)
            .map(|r| r.result)
    }

    /// [`perplexity`](Self::perplexity) with the attached experts weighted as `weighting`
    /// says (`None`: the shared model alone).
    pub fn perplexity_routed(
        &self,
        task: &Task,
        weighting: Option<Weighting>,
        progress: Progress,
    ) -> Result<Routed> {
        let Net::Decoder(dec) = &self.net else {
            return Err(Error::Argument(format!(
                "{}: rows have no \"label\", which asks for perplexity, but this model is an \
                 encoder; give classification rows {{\"text\", \"label\"}} and a --head",
                task.path.display()
            )));
        };
        let per_batch = self.map_batches(&task.texts, progress, |idx, batch| {
            let ctx = match weighting {
                Some(w) => self.ctx(batch, idx, w)?,
                None => Ctx::none(),
            };
            let logits = dec.forward_routed(&batch.ids, &ctx)?;
            let top = self.top_experts(&ctx, idx.len());
            let (b, t, v) = logits.dims3()?;
            let (mut total, mut tokens) = (0f64, 0usize);
            if t < 2 {
                return Ok((total, tokens, top));
            }
            let predict = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
            let targets = batch.ids.narrow(1, 1, t - 1)?.flatten_all()?;
            let nll = token_nll(&predict, &targets)?;
            for (row, &len) in batch.lengths.iter().enumerate() {
                // Position j predicts token j + 1: a row of `len` tokens has len - 1 targets.
                for j in 0..len.saturating_sub(1) {
                    total += f64::from(nll[row * (t - 1) + j]);
                    tokens += 1;
                }
            }
            Ok((total, tokens, top))
        })?;
        // Summed in batch order, so the result does not depend on the number of threads.
        let (total, tokens) = per_batch
            .iter()
            .fold((0f64, 0usize), |(a, n), (_, (t, k, _))| (a + t, n + k));
        let mut top = vec![0; task.texts.len()];
        for (idx, (_, _, t)) in &per_batch {
            for (&i, &e) in idx.iter().zip(t) {
                top[i] = e;
            }
        }
        if tokens == 0 {
            return Err(Error::Task {
                path: task.path.clone(),
                line: 0,
                reason: "no row has two or more tokens; nothing to predict".into(),
            });
        }
        let loss = total / tokens as f64;
        Ok(Routed {
            result: TaskResult {
                name: task.name.clone(),
                metrics: Metrics::Perplexity {
                    examples: task.texts.len(),
                    loss,
                    perplexity: loss.exp(),
                },
            },
            top,
        })
    }

    /// Raw logits `[batch, seq, vocab]` (decoder) or last hidden states `[batch, seq, hidden]`
    /// (encoder) for explicit token ids, unpadded (`ids` rows of equal length). For parity tests.
    pub fn forward_ids(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        Ok(self.forward_ids_routed(ids, None)?.0)
    }

    /// [`forward_ids`](Self::forward_ids) with the attached experts weighted as `weighting`
    /// says, and every routed layer's weights (`rows·seq × experts`) in the order the layers
    /// ran. For parity tests.
    pub fn forward_ids_routed(
        &self,
        ids: &[Vec<u32>],
        weighting: Option<Weighting>,
    ) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let t = ids.first().map_or(0, Vec::len);
        if ids.iter().any(|r| r.len() != t) || t == 0 {
            return Err(Error::Argument(
                "forward_ids needs non-empty rows of equal length".into(),
            ));
        }
        let flat: Vec<u32> = ids.concat();
        let ids_t = Tensor::from_vec(flat, (ids.len(), t), &self.device)?;
        let zeros = ids_t.zeros_like()?;
        let mask = Tensor::ones((ids.len(), t), candle_core::DType::F32, &self.device)?;
        let batch = Batch {
            ids: ids_t,
            type_ids: zeros,
            mask,
            lengths: vec![t; ids.len()],
        };
        let rows: Vec<usize> = (0..ids.len()).collect();
        let mut ctx = match weighting {
            Some(w) => self.ctx(&batch, &rows, w)?,
            None => Ctx::none(),
        };
        ctx.trace = Some(Default::default());
        let out = match &self.net {
            Net::Bert(b) => b.forward_routed(&batch.ids, &batch.type_ids, &batch.mask, &ctx)?,
            Net::Decoder(d) => d.forward_routed(&batch.ids, &ctx)?,
        };
        let trace = ctx.trace.take().map(|t| t.into_inner()).unwrap_or_default();
        Ok((out, trace))
    }
}

/// `max_seq_length` from sentence-transformers' `sentence_bert_config.json`, if present.
fn sentence_transformers_max_len(dir: &Path) -> Option<usize> {
    let text = std::fs::read(dir.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|n| n as usize)
}
