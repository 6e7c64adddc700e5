//! AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
//! Learning"; research/data-driven-merging.md §3): task-arithmetic coefficients learned by
//! minimising the prediction entropy of the merged model on unlabelled rows of every task.
//!
//! The merged model is `θ = θ₀ + Σₖ clamp(λₖ,g, 0, 1)·τₖ` with `τₖ = θₖ − θ₀`, one coefficient
//! per task (`task`-wise) or per task and tensor (`layer`-wise, FusionBench's
//! `LayerWiseMergedModel`: every parameter tensor its own). Every step takes the next batch of
//! every task, adds the gradients of each task's mean entropy `−Σ_c p_c log(p_c + 1e-8)` of its
//! head's predictions (FusionBench 0.2.33 `entropy_loss`), and takes one Adam step (torch's
//! defaults, β = (0.9, 0.999), ε = 1e-8) on the unclamped coefficients; the clamp passes no
//! gradient outside [0, 1], as torch's does.
//!
//! The coefficients' gradients come from one backward pass per task through the model with
//! every parameter a `Var`: `∂L/∂λₖ,g = Σ_{tensors of g} ⟨∂L/∂θ, τₖ⟩ · 1[0 ≤ λₖ,g ≤ 1]`.
//! Tensors no fine-tune changes (frozen embeddings) get no coefficient.

use std::path::PathBuf;

use amalgam::io::Model;
use candle_core::{D, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::eval::{Evaluator, Net};
use crate::grad::param_grad;
use crate::head::Head;
use crate::route::side::Ctx;
use crate::task::Task;

/// Coefficients per task, or per task and tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One coefficient per task.
    Task,
    /// One per task and parameter tensor.
    Layer,
}

/// The optimisation's settings.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    /// Task- or layer-wise.
    pub granularity: Granularity,
    /// Every coefficient's starting value.
    pub init: f64,
    /// Adam's learning rate.
    pub lr: f64,
    /// Optimisation steps (each takes one batch of every task).
    pub steps: usize,
    /// Rows per task per step.
    pub batch_size: usize,
    /// Seed of the row order (each task's rows are shuffled, then taken in turn, reshuffled
    /// every pass).
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            granularity: Granularity::Layer,
            init: 0.3,
            lr: 1e-3,
            steps: 500,
            batch_size: 16,
            seed: 0,
        }
    }
}

/// What the optimisation learned.
#[derive(Clone, Debug, Serialize)]
pub struct Learned {
    /// The coefficient groups: the tensors of each layer-wise coefficient, or `["*"]`.
    pub groups: Vec<String>,
    /// `lambdas[k][g]`: model `k`'s coefficient of group `g`, clamped to [0, 1] (what the
    /// merged model uses).
    pub lambdas: Vec<Vec<f64>>,
    /// The summed entropy over tasks at each step, before its update.
    pub losses: Vec<f64>,
}

/// A merged tensor: its base values, every model's task vector, its coefficient group.
struct Entry {
    var: usize,
    base: Vec<f32>,
    tau: Vec<Vec<f32>>,
    group: usize,
}

/// The state of an AdaMerging run over an evaluator opened on the base for gradients
/// ([`Evaluator::open_trainable`]).
pub struct AdaMerge<'a> {
    ev: &'a Evaluator,
    entries: Vec<Entry>,
    groups: Vec<String>,
    /// Unclamped coefficients, `[model][group]`.
    lambda: Vec<Vec<f64>>,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    t: i32,
    opts: Options,
}

impl<'a> AdaMerge<'a> {
    /// Set up over `ev` (the base, opened trainable) for the fine-tunes `models`.
    pub fn new(ev: &'a Evaluator, models: &[PathBuf], opts: Options) -> Result<AdaMerge<'a>> {
        if ev.vars.is_empty() {
            return Err(Error::Argument(
                "AdaMerging needs the base opened for gradients (Evaluator::open_trainable)".into(),
            ));
        }
        if !matches!(ev.net, Net::Bert(_)) {
            return Err(Error::Argument(format!(
                "{}: AdaMerging is implemented for encoders with classification heads; decoder \
                 LMs are not supported yet",
                ev.path.display()
            )));
        }
        if models.is_empty() {
            return Err(Error::Argument(
                "AdaMerging needs at least one fine-tune".into(),
            ));
        }
        if !(opts.init.is_finite() && (0.0..=1.0).contains(&opts.init)) {
            return Err(Error::Argument(format!(
                "the initial coefficient must be in [0, 1], got {}",
                opts.init
            )));
        }
        if !(opts.lr.is_finite() && opts.lr > 0.0) {
            return Err(Error::Argument(format!(
                "the learning rate must be > 0, got {}",
                opts.lr
            )));
        }
        if opts.batch_size == 0 {
            return Err(Error::Argument("the batch size must be at least 1".into()));
        }
        let opened: Vec<Model> = models
            .iter()
            .map(Model::open)
            .collect::<amalgam::Result<_>>()?;
        let mut entries = Vec::new();
        let mut groups = Vec::new();
        for (i, (name, var)) in ev.vars.iter().enumerate() {
            let base = var.flatten_all()?.to_vec1::<f32>()?;
            let mut tau = Vec::with_capacity(opened.len());
            for m in &opened {
                let t = m.tensor(name).map_err(|_| {
                    Error::Argument(format!(
                        "{}: no tensor {name}, which the base has; AdaMerging needs fine-tunes of \
                         the same architecture",
                        m.path.display()
                    ))
                })?;
                if t.shape != var.dims() {
                    return Err(Error::Argument(format!(
                        "{}: {name} has shape {:?}, the base {:?}",
                        m.path.display(),
                        t.shape,
                        var.dims()
                    )));
                }
                let values = m.floats(name)?;
                if let Some(j) = values.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Argument(format!(
                        "{}: {name} has a non-finite value at element {j}",
                        m.path.display()
                    )));
                }
                tau.push(
                    values
                        .iter()
                        .zip(&base)
                        .map(|(a, b)| a - b)
                        .collect::<Vec<f32>>(),
                );
            }
            if tau.iter().all(|t| t.iter().all(|&x| x == 0.0)) {
                continue;
            }
            let group = match opts.granularity {
                Granularity::Task => {
                    if groups.is_empty() {
                        groups.push("*".to_string());
                    }
                    0
                }
                Granularity::Layer => {
                    groups.push(name.clone());
                    groups.len() - 1
                }
            };
            entries.push(Entry {
                var: i,
                base,
                tau,
                group,
            });
        }
        if entries.is_empty() {
            return Err(Error::Argument(
                "no fine-tune differs from the base: nothing to merge".into(),
            ));
        }
        let shape = vec![vec![0.0; groups.len()]; opened.len()];
        let lambda = vec![vec![opts.init; groups.len()]; opened.len()];
        let ada = AdaMerge {
            ev,
            entries,
            groups,
            lambda,
            m: shape.clone(),
            v: shape,
            t: 0,
            opts,
        };
        ada.load()?;
        Ok(ada)
    }

    /// The clamped coefficients, `[model][group]`.
    pub fn lambdas(&self) -> Vec<Vec<f64>> {
        self.lambda
            .iter()
            .map(|l| l.iter().map(|x| x.clamp(0.0, 1.0)).collect())
            .collect()
    }

    /// Set the (unclamped) coefficients, `[model][group]`, and reload the model.
    pub fn set_lambdas(&mut self, lambda: Vec<Vec<f64>>) -> Result<()> {
        if lambda.len() != self.lambda.len() || lambda.iter().any(|l| l.len() != self.groups.len())
        {
            return Err(Error::Argument(format!(
                "coefficients must be {} models × {} groups",
                self.lambda.len(),
                self.groups.len()
            )));
        }
        self.lambda = lambda;
        self.load()
    }

    /// The coefficient groups (tensor names, or `["*"]`).
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// Put the merged weights of the current coefficients into the model's `Var`s.
    fn load(&self) -> Result<()> {
        let lambdas = self.lambdas();
        for e in &self.entries {
            let mut merged = e.base.clone();
            for (k, tau) in e.tau.iter().enumerate() {
                let l = lambdas[k][e.group] as f32;
                for (m, &t) in merged.iter_mut().zip(tau) {
                    *m += l * t;
                }
            }
            let var = &self.ev.vars[e.var].1;
            var.set(&Tensor::from_vec(merged, var.dims(), var.device())?)?;
        }
        Ok(())
    }

    /// The summed mean entropy of `tasks[j]`'s rows `rows[j]` under `heads[j]`, and its
    /// gradient with respect to every coefficient (clamp included), `[model][group]`.
    pub fn gradient(
        &self,
        tasks: &[&Task],
        heads: &[&Head],
        rows: &[Vec<usize>],
    ) -> Result<(f64, Vec<Vec<f64>>)> {
        let Net::Bert(bert) = &self.ev.net else {
            unreachable!("checked in new")
        };
        let mut grad = vec![vec![0.0; self.groups.len()]; self.lambda.len()];
        let mut loss = 0.0;
        for ((task, head), rows) in tasks.iter().zip(heads).zip(rows) {
            let texts: Vec<String> = rows.iter().map(|&i| task.texts[i].clone()).collect();
            for (_, b) in self.ev.batches_of(&texts, texts.len())? {
                let mut ctx = Ctx::none();
                ctx.grad = true;
                ctx.gather = Some(std::cell::RefCell::new(Vec::new()));
                let pooled = bert.embed_routed(&b.ids, &b.type_ids, &b.mask, &ctx)?;
                let logits = head.forward(&pooled)?;
                let p = crate::nn::softmax(&logits, &ctx)?;
                let h = (p.clone() * (p + 1e-8)?.log()?)?
                    .sum(D::Minus1)?
                    .mean_all()?
                    .neg()?;
                loss += f64::from(h.to_scalar::<f32>()?);
                let grads = h.backward()?;
                let gathered = ctx.gather.as_ref().expect("set above").borrow();
                for e in &self.entries {
                    let var = &self.ev.vars[e.var].1;
                    let Some(g) = param_grad(&grads, &gathered, var)? else {
                        continue;
                    };
                    for (k, tau) in e.tau.iter().enumerate() {
                        grad[k][e.group] += g.dot(tau);
                    }
                }
            }
        }
        for (g, l) in grad.iter_mut().zip(&self.lambda) {
            for (g, &l) in g.iter_mut().zip(l) {
                if !(0.0..=1.0).contains(&l) {
                    *g = 0.0;
                }
            }
        }
        Ok((loss, grad))
    }

    /// One Adam step with gradient `grad` (`[model][group]`), and the model reloaded.
    pub fn step(&mut self, grad: &[Vec<f64>]) -> Result<()> {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = (1.0 - b2.powi(self.t)).sqrt();
        for (k, row) in grad.iter().enumerate() {
            if let Some(g) = row.iter().position(|d| !d.is_finite()) {
                return Err(Error::Argument(format!(
                    "the gradient of model {k}'s coefficient for {} is not finite",
                    self.groups[g]
                )));
            }
        }
        let rows = self.lambda.iter_mut().zip(&mut self.m).zip(&mut self.v);
        for (((lambda, m), v), grad) in rows.zip(grad) {
            for (((l, m), v), &d) in lambda.iter_mut().zip(m).zip(v).zip(grad) {
                *m = b1 * *m + (1.0 - b1) * d;
                *v = b2 * *v + (1.0 - b2) * d * d;
                *l -= self.opts.lr / c1 * *m / (v.sqrt() / c2 + eps);
            }
        }
        self.load()
    }

    /// Run every step over `tasks` (unlabelled rows suffice) with `heads`, one per task;
    /// `progress` gets (step, loss).
    pub fn run(
        &mut self,
        tasks: &[&Task],
        heads: &[&Head],
        progress: &dyn Fn(usize, f64),
    ) -> Result<Learned> {
        if tasks.len() != heads.len() || tasks.is_empty() {
            return Err(Error::Argument(format!(
                "{} task(s) but {} head(s): give one head per task",
                tasks.len(),
                heads.len()
            )));
        }
        for t in tasks {
            if t.texts.is_empty() {
                return Err(Error::Task {
                    path: t.path.clone(),
                    line: 0,
                    reason: "no rows".into(),
                });
            }
        }
        let mut orders: Vec<Order> = tasks
            .iter()
            .enumerate()
            .map(|(j, t)| Order::new(t.texts.len(), self.opts.seed.wrapping_add(j as u64)))
            .collect();
        let mut losses = Vec::with_capacity(self.opts.steps);
        for s in 0..self.opts.steps {
            let rows: Vec<Vec<usize>> = orders
                .iter_mut()
                .map(|o| o.take(self.opts.batch_size))
                .collect();
            let (loss, grad) = self.gradient(tasks, heads, &rows)?;
            self.step(&grad)?;
            losses.push(loss);
            progress(s + 1, loss);
        }
        Ok(Learned {
            groups: self.groups.clone(),
            lambdas: self.lambdas(),
            losses,
        })
    }
}

/// A task's rows in a seeded shuffled order, taken in turn, reshuffled at every pass. A batch
/// as large as the task is every row, in file order.
struct Order {
    n: usize,
    rng: u64,
    order: Vec<usize>,
    at: usize,
}

impl Order {
    fn new(n: usize, seed: u64) -> Order {
        Order {
            n,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            order: Vec::new(),
            at: n,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn take(&mut self, size: usize) -> Vec<usize> {
        if size >= self.n {
            return (0..self.n).collect();
        }
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.at >= self.n {
                self.order = (0..self.n).collect();
                for i in (1..self.n).rev() {
                    let j = (self.next_u64() % (i as u64 + 1)) as usize;
                    self.order.swap(i, j);
                }
                self.at = 0;
            }
            out.push(self.order[self.at]);
            self.at += 1;
        }
        out
    }
}

/// The merge config that reproduces the learned model with `amalgam merge`: `task_arithmetic`
/// (no normalisation, λ 1) of `base` and `models` with the coefficients as per-model `weight`s,
/// per tensor for layer-wise ones (each tensor's full name as its filter, longest first, so a
/// filter matches its own tensor only; tensors without a coefficient fall through to `init`,
/// which does not matter where the fine-tunes equal the base).
pub fn merge_config(
    base: &str,
    models: &[String],
    learned: &Learned,
    init: f64,
    dtype: Option<&str>,
) -> String {
    let mut y = String::from("# Written by amalgam adamerge: the learned coefficients.\n");
    y += "merge_method: task_arithmetic\n";
    y += &format!("base_model: {}\n", yaml_str(base));
    y += "models:\n";
    let mut order: Vec<usize> = (0..learned.groups.len()).collect();
    order.sort_by_key(|&g| std::cmp::Reverse(learned.groups[g].len()));
    for (k, m) in models.iter().enumerate() {
        y += &format!("  - model: {}\n    parameters:\n", yaml_str(m));
        if learned.groups == ["*"] {
            y += &format!("      weight: {}\n", float(learned.lambdas[k][0]));
            continue;
        }
        y += "      weight:\n";
        for &g in &order {
            y += &format!(
                "        - filter: {}\n          value: {}\n",
                yaml_str(&learned.groups[g]),
                float(learned.lambdas[k][g])
            );
        }
        y += &format!("        - value: {}\n", float(init));
    }
    y += "parameters:\n  normalize: false\n  lambda: 1.0\n";
    if let Some(d) = dtype {
        y += &format!("dtype: {d}\n");
    }
    y
}

/// A YAML double-quoted string.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// A float that reads back as the same f64.
fn float(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}
