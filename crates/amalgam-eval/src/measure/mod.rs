//! `amalgam measure`: statistics of a model on data, written as a stats file
//! ([`amalgam::stats`]) for the data-driven merges (issue #19).
//!
//! - `gram` ([`Evaluator::measure_gram`]): for every linear layer the forward pass runs, the
//!   mean of `xᵀx` over its inputs `x` at every token position (RegMean's statistic). Padding
//!   positions are left out by default; `mask_padding: false` counts them, as the reference
//!   implementations do (their count then depends on how rows are batched and padded: here,
//!   rows sorted by length in batches of [`Evaluator::batch_size`]).
//!
//! Batches run in parallel, and their products are added to the f64 sums in batch order, so
//! the file does not depend on the thread count.

mod fisher;
mod tap;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use amalgam::DType;
use amalgam::io::Model;
use amalgam::stats::{self, Kind, Meta};
use serde::Serialize;

pub use fisher::FisherVariant;
pub use tap::Tap;

use crate::error::{Error, Result};
use crate::eval::{Evaluator, Net, Progress};
use crate::route::side::Ctx;
use crate::task::Task;

/// How to measure and store.
#[derive(Clone, Debug)]
pub struct Options {
    /// Leave padding positions out of the Gram matrices (default), or count them.
    pub mask_padding: bool,
    /// Stored dtype: F32 (default) or F64.
    pub dtype: DType,
    /// Replace an existing output file.
    pub overwrite: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mask_padding: true,
            dtype: DType::F32,
            overwrite: false,
        }
    }
}

/// What a measurement wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// `gram` or `fisher`.
    pub stats: &'static str,
    /// Data rows measured.
    pub rows: usize,
    /// Token positions counted.
    pub tokens: u64,
    /// Statistics tensors written.
    pub tensors: usize,
    /// Bytes of the output file.
    pub bytes: u64,
}

/// One batch's Gram matrices, per layer in the order they ran.
type Grams = Vec<(String, Vec<f32>)>;

/// Sums kept in f64, added to in batch order.
struct Ordered<T> {
    next: usize,
    pending: BTreeMap<usize, T>,
}

/// Run `work` on every batch index `0..n` over the rayon pool, each worker taking the next
/// index in order, and hand the results to `absorb` in index order (at most about one pending
/// result per worker is held).
fn in_order<T: Send>(
    n: usize,
    work: impl Fn(usize) -> Result<T> + Sync,
    mut absorb: impl FnMut(usize, T) -> Result<()> + Send,
) -> Result<()> {
    let counter = AtomicUsize::new(0);
    let state = Mutex::new((
        Ordered {
            next: 0,
            pending: BTreeMap::new(),
        },
        &mut absorb,
    ));
    let workers = rayon::current_num_threads().max(1).min(n.max(1));
    let results: Vec<Result<()>> = rayon::broadcast(|ctx| {
        if ctx.index() >= workers {
            return Ok(());
        }
        loop {
            let i = counter.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return Ok(());
            }
            let r = match work(i) {
                Ok(r) => r,
                Err(e) => {
                    // Let the other workers stop at their next batch.
                    counter.store(n, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let mut guard = state.lock().expect("no panics holding it");
            let (order, absorb) = &mut *guard;
            order.pending.insert(i, r);
            while let Some(r) = order.pending.remove(&order.next) {
                let k = order.next;
                order.next += 1;
                absorb(k, r)?;
            }
        }
    });
    results.into_iter().collect()
}

impl Evaluator {
    /// Measure the Gram matrices of every linear layer's inputs over `task`'s texts (labels
    /// unused) and write them to `out` ([`amalgam::stats`]); `progress` gets the rows finished.
    pub fn measure_gram(
        &self,
        task: &Task,
        opts: &Options,
        out: &Path,
        progress: Progress,
    ) -> Result<Summary> {
        if out.exists() && !opts.overwrite {
            return Err(Error::Argument(format!(
                "{}: already exists; pass --overwrite to replace it",
                out.display()
            )));
        }
        let batches = self.batches(&task.texts)?;
        // Per layer, in the order the forward pass runs them: name, width, f64 sums.
        let mut sums: Vec<(String, usize, Vec<f64>)> = Vec::new();
        let mut tokens = 0u64;
        let work = |i: usize| -> Result<(Grams, u64)> {
            let (idx, b) = &batches[i];
            let (rows, t) = b.ids.dims2()?;
            let mask = b.mask.reshape((rows * t, 1))?;
            let counted = if opts.mask_padding {
                b.lengths.iter().sum::<usize>() as u64
            } else {
                (rows * t) as u64
            };
            let mut ctx = Ctx::none();
            ctx.shape = (rows, t);
            ctx.tap = Some(std::cell::RefCell::new(Tap::new(
                opts.mask_padding.then_some(mask),
            )));
            match &self.net {
                Net::Bert(bert) => {
                    bert.forward_routed(&b.ids, &b.type_ids, &b.mask, &ctx)?;
                }
                Net::Decoder(dec) => {
                    dec.forward_routed(&b.ids, &ctx)?;
                }
            }
            progress(idx.len());
            let tap = ctx.tap.take().expect("set above").into_inner();
            Ok((tap.grams, counted))
        };
        in_order(batches.len(), work, |_, (grams, counted)| {
            if sums.is_empty() {
                sums = grams
                    .iter()
                    .map(|(name, g)| {
                        let w = (g.len() as f64).sqrt() as usize;
                        (name.clone(), w, vec![0f64; g.len()])
                    })
                    .collect();
            }
            if grams.len() != sums.len() {
                return Err(Error::Argument(
                    "the forward pass ran a different set of layers for another batch".into(),
                ));
            }
            for ((_, _, s), (_, g)) in sums.iter_mut().zip(&grams) {
                for (a, &v) in s.iter_mut().zip(g) {
                    *a += f64::from(v);
                }
            }
            tokens += counted;
            Ok(())
        })?;
        if tokens == 0 {
            return Err(Error::Task {
                path: task.path.clone(),
                line: 0,
                reason: "no token positions to measure".into(),
            });
        }
        let model = Model::open(&self.path)?;
        let values = sums
            .into_iter()
            .map(|(name, w, s)| {
                let mean = s.into_iter().map(|v| v / tokens as f64).collect();
                (format!("{}{name}.weight", self.prefix), vec![w, w], mean)
            })
            .collect();
        let mut options = BTreeMap::new();
        options.insert("mask_padding".into(), opts.mask_padding.to_string());
        options.insert("max_len".into(), self.max_len.to_string());
        options.insert("data".into(), file_name(&task.path));
        write_stats(
            &model,
            values,
            Kind::Gram,
            task.texts.len(),
            tokens,
            options,
            opts,
            out,
        )
    }
}

/// The file name of `path`, for the record.
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
}

/// Write statistic `kind` of `model`'s tensors, `values` = (tensor name, the statistic's shape,
/// its values), with the hash of every described tensor's stored bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_stats(
    model: &Model,
    values: Vec<(String, Vec<usize>, Vec<f64>)>,
    kind: Kind,
    rows: usize,
    tokens: u64,
    options: BTreeMap<String, String>,
    opts: &Options,
    out: &Path,
) -> Result<Summary> {
    let mut weights = BTreeMap::new();
    let mut sq_norm = 0f64;
    let mut tensors = Vec::with_capacity(values.len());
    for (name, shape, v) in values {
        weights.insert(name.clone(), stats::weight_hash(model.tensor(&name)?.bytes));
        // The norm of the values as stored (rounded to f32 unless kept in f64).
        sq_norm += v
            .iter()
            .map(|&x| {
                let x = if opts.dtype == DType::F64 {
                    x
                } else {
                    f64::from(x as f32)
                };
                x * x
            })
            .sum::<f64>();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Argument(format!(
                "{name}: the measured {} has a non-finite value at element {i}",
                kind.name()
            )));
        }
        tensors.push((stats::stat_name(&name, kind), shape, v));
    }
    let meta = Meta {
        kind,
        rows,
        tokens,
        options,
        weights,
        sq_norm: (kind == Kind::Fisher).then_some(sq_norm),
    };
    let count = tensors.len();
    stats::write(out, &tensors, opts.dtype, &meta, opts.overwrite)?;
    Ok(Summary {
        stats: kind.name(),
        rows,
        tokens,
        tensors: count,
        bytes: std::fs::metadata(out).map_or(0, |m| m.len()),
    })
}
