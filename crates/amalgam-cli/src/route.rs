//! `amalgam eval --experts ... --route ...`: routed evaluation (one shared model plus per-task
//! experts chosen per input). The options, the experts' attachment and each task's weights.

use std::path::PathBuf;

use amalgam_eval::route::experts::{Expert, Truncation};
use amalgam_eval::route::router::{Classifier, MIN_ROWS, Router};
use amalgam_eval::route::{Attached, GateKind};
use amalgam_eval::{Evaluator, Task};
use anyhow::{Context, Result, bail};
use serde::Serialize;

/// The router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// Zero-shot, per token: the norm of each layer input's projection on each expert's top
    /// right singular vectors (SMILE). Dense fine-tunes, library tasks or adapters.
    Smile,
    /// Zero-shot, per token: |x·v| with v the top right singular vector of each LoRA's B·A
    /// (Arrow, as PEFT). LoRA adapters of one rank and the same target modules.
    Arrow,
    /// Calibrated, per input: a classifier on the shared model's mean-pooled output, fitted on
    /// --calibrate rows of each task (Twin-Merging's router). Encoders only.
    Twin,
    /// Each input gets its own task's expert (the ceiling; experts named like the tasks).
    Oracle,
    /// Every expert at weight 1/N for every input (a merge of the experts' deltas).
    Uniform,
}

/// Routing options of `amalgam eval`.
#[derive(clap::Args, Debug)]
pub struct RouteArgs {
    /// Experts over MODEL (the shared model): fine-tuned model folders, PEFT adapter folders,
    /// task libraries (every task) or LIB:TASK. An expert's name is its folder name or library
    /// task name; a task file NAME.test.jsonl belongs to the expert NAME (router accuracy and
    /// the oracle use this).
    #[arg(long, num_args = 1.., requires = "route")]
    experts: Vec<String>,
    /// How experts are chosen per input.
    #[arg(long, value_enum, requires = "experts")]
    route: Option<RouteKind>,
    /// Rank of each dense expert's truncated SVD (its weight delta against MODEL), or `full`
    /// for the exact delta. Adapters routed by Arrow keep their own rank.
    #[arg(long, default_value = "32")]
    rank: String,
    /// smile: singular vectors per expert in the gate.
    #[arg(long, default_value_t = 16)]
    gate_k: usize,
    /// Experts kept per token (smile: default 1; arrow: default 3, or the expert count if
    /// smaller) or per input (twin: default all, weighted by the router's probabilities; the
    /// kept weights are renormalised).
    #[arg(long)]
    top_k: Option<usize>,
    /// arrow: general-domain LoRA adapters whose mean A and mean B are subtracted from every
    /// expert's before routing (GenKnowSub, PEFT's `use_gks`).
    #[arg(long, num_args = 1..)]
    general: Vec<String>,
    /// arrow: softmax temperature over the top-k similarities.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// twin: calibration rows of a task, TASK=FILE.jsonl (rows {"text"}; a "label" is ignored).
    /// Give one per expert.
    #[arg(long = "calibrate", value_name = "TASK=FILE")]
    calibrate: Vec<String>,
    /// twin: rows read from each calibration file.
    #[arg(long, default_value_t = 300)]
    calibrate_rows: usize,
    /// twin: the classifier on pooled features.
    #[arg(long, default_value = "logistic", value_parser = parse_classifier)]
    router: Classifier,
}

fn parse_classifier(s: &str) -> std::result::Result<Classifier, String> {
    s.parse()
}

/// What routing adds to the report.
#[derive(Debug, Serialize)]
pub struct RouteReport {
    /// The router.
    pub route: RouteKind,
    /// The experts, in order.
    pub experts: Vec<String>,
    /// Linear layers carrying experts.
    pub layers: usize,
    /// Parameters of the experts held in memory (factors, bias deltas, gates).
    pub expert_parameters: usize,
    /// Parameters of the shared model.
    pub shared_parameters: usize,
    /// `(shared + experts) / shared`.
    pub memory_multiple: f64,
    /// Rank of dense experts (`null`: full).
    pub rank: Option<usize>,
    /// Gate options.
    #[serde(flatten)]
    pub gate: GateKind,
    /// twin: the classifier and its calibration rows per expert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router: Option<Classifier>,
    /// twin: calibration rows per expert.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calibration_rows: Vec<usize>,
    /// arrow: the GenKnowSub adapters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub general: Vec<String>,
}

/// A routed model ready to evaluate tasks.
pub struct Routing {
    /// The router.
    pub kind: RouteKind,
    /// The experts' names.
    pub experts: Vec<String>,
    router: Option<Router>,
    top_k: Option<usize>,
    /// For the report.
    pub report: RouteReport,
}

impl RouteArgs {
    /// Whether routing was asked for.
    pub fn enabled(&self) -> bool {
        self.route.is_some()
    }

    fn rank(&self) -> Result<Option<usize>> {
        if self.rank == "full" {
            return Ok(None);
        }
        match self.rank.parse::<usize>() {
            Ok(0) | Err(_) => bail!(
                "--rank must be a positive integer or 'full', not '{}'",
                self.rank
            ),
            Ok(r) => Ok(Some(r)),
        }
    }

    /// Attach the experts to `ev` and fit the router (twin), for evaluating `tasks`.
    pub fn attach(
        &self,
        ev: &mut Evaluator,
        tasks: &[Task],
        shared_parameters: usize,
        quiet: bool,
    ) -> Result<Routing> {
        let kind = self.route.expect("enabled");
        let mut experts = Vec::new();
        for arg in &self.experts {
            experts.extend(Expert::from_arg(arg).with_context(|| format!("expert {arg}"))?);
        }
        if kind == RouteKind::Oracle
            && let Some(t) = tasks
                .iter()
                .find(|t| !experts.iter().any(|e| e.name == t.name))
        {
            bail!(
                "--route oracle: task '{}' ({}) has no expert of its name; the experts: {}",
                t.name,
                t.path.display(),
                experts
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let n = experts.len();
        let rank = self.rank()?;
        let top_k = match (kind, self.top_k) {
            (_, Some(k)) if k == 0 || k > n => {
                bail!("--top-k {k} must be between 1 and the number of experts ({n})")
            }
            (RouteKind::Smile, k) => Some(k.unwrap_or(1)),
            (RouteKind::Arrow, k) => Some(k.unwrap_or(3.min(n))),
            (RouteKind::Twin, k) => k,
            (_, Some(_)) => bail!("--top-k applies to smile, arrow and twin routing"),
            (_, None) => None,
        };
        if kind != RouteKind::Twin && !self.calibrate.is_empty() {
            bail!("--calibrate is for --route twin");
        }
        let gate = match kind {
            RouteKind::Smile => GateKind::Smile {
                gate_k: self.gate_k,
                top_k: top_k.expect("set"),
            },
            RouteKind::Arrow => GateKind::Arrow {
                top_k: top_k.expect("set"),
                temperature: self.temperature,
            },
            _ => GateKind::Sequence,
        };
        let trunc = Truncation {
            rank,
            gate_k: self.gate_k,
        };
        // Fail on calibration input before the (slow) expert construction.
        let calibration = if kind == RouteKind::Twin {
            Some(self.calibration(&experts)?)
        } else {
            None
        };
        let mut general = Vec::new();
        for arg in &self.general {
            general
                .extend(Expert::from_arg(arg).with_context(|| format!("general adapter {arg}"))?);
        }
        let bar = crate::progress::counter("experts", 0, "layers", quiet);
        let attached: Attached = ev
            .attach(&experts, &general, gate, trunc, &|done, total| {
                if let Some(b) = &bar {
                    b.set_length(total as u64);
                    b.set_position(done as u64);
                }
            })?
            .clone();
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let mut calibration_rows = Vec::new();
        let router = match calibration {
            Some(cal) => {
                let mut features = Vec::new();
                let mut labels = Vec::new();
                for (e, texts) in cal.iter().enumerate() {
                    calibration_rows.push(texts.len());
                    let f = ev.embed(texts, &|_| {})?;
                    labels.extend(std::iter::repeat_n(e, f.len()));
                    features.extend(f);
                }
                Some(Router::fit(self.router, &features, &labels, n)?)
            }
            None => None,
        };
        let expert_parameters = attached.bytes / 4;
        Ok(Routing {
            kind,
            experts: attached.experts.clone(),
            router,
            top_k,
            report: RouteReport {
                route: kind,
                experts: attached.experts.clone(),
                layers: attached.layers,
                expert_parameters,
                shared_parameters,
                memory_multiple: (shared_parameters + expert_parameters) as f64
                    / shared_parameters.max(1) as f64,
                rank: if kind == RouteKind::Arrow { None } else { rank },
                gate,
                router: (kind == RouteKind::Twin).then_some(self.router),
                calibration_rows,
                general: general.iter().map(|e| e.name.clone()).collect(),
            },
        })
    }

    /// Each expert's calibration texts, in expert order.
    fn calibration(&self, experts: &[Expert]) -> Result<Vec<Vec<String>>> {
        let names: Vec<&str> = experts.iter().map(|e| e.name.as_str()).collect();
        let mut files: Vec<Option<PathBuf>> = vec![None; experts.len()];
        for arg in &self.calibrate {
            let Some((task, file)) = arg.split_once('=') else {
                bail!("--calibrate {arg}: expected TASK=FILE.jsonl");
            };
            let Some(e) = names.iter().position(|&n| n == task) else {
                bail!(
                    "--calibrate {arg}: no expert is named '{task}'; the experts: {}",
                    names.join(", ")
                );
            };
            if files[e].is_some() {
                bail!("--calibrate names task '{task}' twice");
            }
            files[e] = Some(PathBuf::from(file));
        }
        if self.calibrate_rows < MIN_ROWS {
            bail!("--calibrate-rows must be at least {MIN_ROWS}");
        }
        files
            .into_iter()
            .zip(&names)
            .map(|(f, name)| {
                let Some(f) = f else {
                    bail!(
                        "--route twin needs calibration rows for every expert: give \
                         --calibrate {name}=FILE.jsonl"
                    );
                };
                let task = Task::load(&f, Some(self.calibrate_rows))?;
                if task.texts.len() < MIN_ROWS {
                    bail!(
                        "{}: {} calibration rows for task '{name}'; the router needs at least \
                         {MIN_ROWS}",
                        f.display(),
                        task.texts.len()
                    );
                }
                Ok(task.texts)
            })
            .collect()
    }
}

impl Routing {
    /// The expert a task belongs to (by name), if any.
    pub fn expert_of(&self, task: &Task) -> Option<usize> {
        self.experts.iter().position(|e| *e == task.name)
    }

    /// The weights for `task`'s rows: `None` for token gates, else one vector per row.
    pub fn weights(&self, ev: &Evaluator, task: &Task) -> Result<Option<Vec<Vec<f32>>>> {
        let n = self.experts.len();
        let rows = task.texts.len();
        Ok(match self.kind {
            RouteKind::Smile | RouteKind::Arrow => None,
            RouteKind::Uniform => Some(vec![vec![1.0 / n as f32; n]; rows]),
            RouteKind::Oracle => {
                let Some(e) = self.expert_of(task) else {
                    bail!(
                        "--route oracle: task '{}' ({}) has no expert of its name; the experts: {}",
                        task.name,
                        task.path.display(),
                        self.experts.join(", ")
                    );
                };
                let mut w = vec![0.0; n];
                w[e] = 1.0;
                Some(vec![w; rows])
            }
            RouteKind::Twin => {
                let router = self.router.as_ref().expect("fitted for twin");
                let features = ev.embed(&task.texts, &|_| {})?;
                Some(
                    features
                        .iter()
                        .map(|f| {
                            let p = router.probabilities(f);
                            let keep = match self.top_k {
                                Some(k) => {
                                    let p32: Vec<f32> = p.iter().map(|&v| v as f32).collect();
                                    amalgam_eval::route::gate::top_k(&p32, k)
                                }
                                None => (0..n).collect(),
                            };
                            let total: f64 = keep.iter().map(|&e| p[e]).sum();
                            let mut w = vec![0f32; n];
                            for e in keep {
                                w[e] = (p[e] / total) as f32;
                            }
                            w
                        })
                        .collect(),
                )
            }
        })
    }
}
