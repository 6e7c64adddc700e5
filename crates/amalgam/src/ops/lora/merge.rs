//! `lora merge`: compose PEFT adapters into one, module by module.
//!
//! The YAML config:
//!
//! ```yaml
//! base_model: path            # optional: checks every adapter fits it
//! combination_type: svd       # PEFT's types (see lora::combine); or instead
//! # merge_method: ties        # any per-tensor amalgam method on the full ΔW_i, re-factored
//! svd_rank: 16                # rank of re-factored results (default: the largest input rank)
//! svd_clamp: 0.99             # PEFT's quantile clamp of re-factored factors
//! density: 0.5                # for the pruning types
//! majority_sign_method: total # or frequency
//! knots: false                # KnOTS: align the deltas in a shared basis before merging
//! randomized_svd: false       # randomized instead of exact re-factoring of dense deltas
//! seed: 0                     # DARE masks, randomized SVD
//! parameters: {}              # merge_method parameters (scalars or {filter, value})
//! adapters:
//!   - adapter: path
//!     weight: 0.7
//!     parameters: {}          # per-adapter merge_method parameters
//! ```
//!
//! `merge_method` treats each `ΔW_i = s_i B_i A_i` as a task vector over a zero base, so methods
//! defined on task vectors (task arithmetic, TIES, DARE, Breadcrumbs, …) give exactly what they
//! give on full models. KnOTS (ALGORITHMS.md §5.4) stacks `[ΔW_1 | … | ΔW_T] = U diag(σ) [V_1ᵀ
//! | … | V_Tᵀ]`, merges the aligned `R_t = diag(σ) V_tᵀ` (per module; the paper trims over the
//! whole model) and maps back with `U`. The SVDs of low-rank stacks are exact and cheap
//! (`combine::low_rank_svd`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Deserialize;

use crate::config::{self, Parameters};
use crate::dtype::encode_f32;
use crate::error::{Error, Result};
use crate::io::{Existing, Model};
use crate::linalg;
use crate::lora::combine::{self, Combination, RuleParams, SignMethod};
use crate::lora::write::{AdapterBuilder, folded_config};
use crate::lora::{Adapter, Module};
use crate::methods::rng::Key;
use crate::methods::{self, BasePolicy, MergeJob, Method, Params, Scope};
use crate::progress::Progress;

/// One adapter of a `lora merge` config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterEntry {
    /// The PEFT adapter directory.
    pub adapter: PathBuf,
    /// Its weight `w_i`.
    #[serde(default = "one")]
    pub weight: f64,
    /// Its `merge_method` parameters.
    #[serde(default)]
    pub parameters: Parameters,
}

fn one() -> f64 {
    1.0
}

/// A `lora merge` config; see the module docs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraMergeConfig {
    /// The base model the adapters were trained on.
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// PEFT's combination type.
    #[serde(default)]
    pub combination_type: Option<String>,
    /// An amalgam merge method applied to the full deltas.
    #[serde(default)]
    pub merge_method: Option<String>,
    /// Rank of re-factored results.
    #[serde(default)]
    pub svd_rank: Option<usize>,
    /// Quantile clamp of re-factored factors.
    #[serde(default)]
    pub svd_clamp: Option<f64>,
    /// Fraction kept by the pruning types.
    #[serde(default)]
    pub density: Option<f64>,
    /// `total` or `frequency`.
    #[serde(default)]
    pub majority_sign_method: Option<String>,
    /// KnOTS alignment before merging.
    #[serde(default)]
    pub knots: bool,
    /// Randomized SVD for re-factoring dense deltas.
    #[serde(default)]
    pub randomized_svd: bool,
    /// Seed of DARE masks and randomized SVDs.
    #[serde(default)]
    pub seed: u64,
    /// `merge_method` parameters.
    #[serde(default)]
    pub parameters: Parameters,
    /// The adapters.
    pub adapters: Vec<AdapterEntry>,
}

/// How modules are combined.
enum How {
    /// A PEFT combination type.
    Peft(Combination, RuleParams),
    /// An amalgam method on the deltas.
    Method(&'static dyn Method),
}

struct Plan<'a> {
    how: How,
    knots: bool,
    /// Rank of re-factored results: `svd_rank`, else the largest rank of any adapter (PEFT).
    new_rank: usize,
    clamp: Option<f64>,
    randomized: bool,
    seed: u64,
    config: &'a LoraMergeConfig,
    adapters: Vec<Adapter>,
    path: PathBuf,
}

impl LoraMergeConfig {
    /// Read a config file; relative adapter and base paths are taken from the working
    /// directory, as in merge configs.
    pub fn load(path: &Path) -> Result<LoraMergeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_saphyr::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// Merge the adapters `config` (read from `path`) lists into one adapter at `output`. Returns
/// the ranks of the modules written.
pub fn merge(
    path: &Path,
    config: &LoraMergeConfig,
    output: &Path,
    existing: Existing,
    progress: &dyn Progress,
) -> Result<BTreeMap<String, usize>> {
    let plan = Plan::new(path, config)?;
    let builder = AdapterBuilder::create(output, existing)?;
    // Every adapted module, with the adapters that adapt it.
    let mut modules: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, a) in plan.adapters.iter().enumerate() {
        for name in a.modules.keys() {
            modules.entry(name).or_default().push(i);
        }
    }
    let total = modules.len() as u64;
    progress.start(total, 0);
    let list: Vec<(&str, Vec<usize>)> = modules.into_iter().collect();
    let ranks: Vec<(String, usize)> = list
        .par_iter()
        .with_max_len(1)
        .map(|(name, present)| {
            crate::cancel::check()?;
            let r = plan.module(name, present, &builder)?;
            progress.advance(0);
            Ok(r)
        })
        .collect::<Result<_>>()?;
    progress.finish();
    let saved = plan.copy_whole_tensors(&builder)?;
    let ranks: BTreeMap<String, usize> = ranks.into_iter().collect();
    let template = std::fs::read_to_string(plan.adapters[0].dir.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let base = config.base_model.as_ref().map(|b| b.display().to_string());
    let cfg = folded_config(template.as_ref(), base.as_deref(), &ranks, &saved, false);
    builder.finish(&cfg, &[])?;
    Ok(ranks)
}

impl<'a> Plan<'a> {
    fn new(path: &Path, config: &'a LoraMergeConfig) -> Result<Plan<'a>> {
        let err = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        if config.adapters.is_empty() {
            return Err(err("adapters: list at least one adapter".into()));
        }
        let density = config.density;
        if let Some(d) = density
            && !(0.0..=1.0).contains(&d)
        {
            return Err(err(format!("density {d} must be in [0, 1]")));
        }
        if let Some(c) = config.svd_clamp
            && !(0.0..=1.0).contains(&c)
        {
            return Err(err(format!("svd_clamp {c} must be in [0, 1]")));
        }
        if config.svd_rank == Some(0) {
            return Err(err("svd_rank must be at least 1".into()));
        }
        let sign = match config.majority_sign_method.as_deref() {
            None | Some("total") => SignMethod::Total,
            Some("frequency") => SignMethod::Frequency,
            Some(other) => {
                return Err(err(format!(
                    "majority_sign_method '{other}': use total or frequency"
                )));
            }
        };
        let how = match (&config.combination_type, &config.merge_method) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "give combination_type (PEFT's) or merge_method (amalgam's), not both".into(),
                ));
            }
            (_, Some(m)) => {
                let method = methods::get(m).map_err(err)?;
                How::Method(method)
            }
            (c, None) => {
                let name = c.as_deref().unwrap_or("svd");
                let mut c = Combination::parse(name).ok_or_else(|| {
                    let names: Vec<&str> = combine::COMBINATIONS.iter().map(|(n, _)| *n).collect();
                    err(format!(
                        "combination_type '{name}' is not one of {}",
                        names.join(", ")
                    ))
                })?;
                // PEFT: one adapter is always a linear combination.
                if config.adapters.len() == 1 {
                    c = Combination::Linear;
                }
                if c.needs_density() && density.is_none() {
                    return Err(err(format!("combination_type '{name}' needs density")));
                }
                let params = RuleParams {
                    density: density.unwrap_or(1.0),
                    sign,
                };
                How::Peft(c, params)
            }
        };
        if config.knots
            && let How::Peft(c, _) = &how
            && !c.in_delta_space()
        {
            return Err(err(
                "knots aligns full deltas: use it with merge_method or a delta-space combination \
                 type (svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd)"
                    .into(),
            ));
        }
        let base = config.base_model.as_ref().map(Model::open).transpose()?;
        let mut adapters = Vec::new();
        for entry in &config.adapters {
            if !entry.weight.is_finite() {
                return Err(err(format!(
                    "adapter {}: weight must be a finite number",
                    entry.adapter.display()
                )));
            }
            let a = Adapter::open(&entry.adapter)?;
            if let Some(base) = &base {
                a.check_base(base)?;
            }
            if let Some(bias) = a.biases.values().next() {
                return Err(Error::Adapter {
                    path: a.dir.clone(),
                    name: bias.clone(),
                    reason: "adapters with lora_bias cannot be merged yet; bake them with `amalgam lora apply`".into(),
                });
            }
            adapters.push(a);
        }
        let fan = adapters[0].config.fan_in_fan_out;
        if let Some(a) = adapters.iter().find(|a| a.config.fan_in_fan_out != fan) {
            return Err(err(format!(
                "{} and {} disagree on fan_in_fan_out",
                adapters[0].dir.display(),
                a.dir.display()
            )));
        }
        let largest = adapters
            .iter()
            .map(|a| {
                a.modules
                    .values()
                    .map(|m| m.rank)
                    .fold(a.config.r, usize::max)
            })
            .max()
            .unwrap_or(1);
        Ok(Plan {
            how,
            knots: config.knots,
            new_rank: config.svd_rank.unwrap_or(largest),
            clamp: config.svd_clamp,
            randomized: config.randomized_svd,
            seed: config.seed,
            config,
            adapters,
            path: path.to_path_buf(),
        })
    }

    fn module_error(&self, module: &str, reason: String) -> Error {
        Error::Adapter {
            path: self.path.clone(),
            name: module.to_string(),
            reason,
        }
    }

    /// Merge module `name` (base tensor name) over the adapters `present`; returns its module
    /// name and rank.
    fn module(
        &self,
        name: &str,
        present: &[usize],
        out: &AdapterBuilder,
    ) -> Result<(String, usize)> {
        let mods: Vec<&Module> = present
            .iter()
            .map(|&i| &self.adapters[i].modules[name])
            .collect();
        let first = mods[0];
        if let Some(m) = mods
            .iter()
            .find(|m| m.shape != first.shape || m.transposed != first.transposed)
        {
            return Err(self.module_error(
                name,
                format!(
                    "adapters disagree on this module: delta {:?} vs {:?} (embedding: {} vs {})",
                    first.shape, m.shape, first.transposed, m.transposed
                ),
            ));
        }
        // Work in PEFT's B·A orientation: p × q.
        let (p, q) = if first.transposed {
            (first.shape[1], first.shape[0])
        } else {
            (first.shape[0], first.shape[1])
        };
        let mut factors = Vec::with_capacity(present.len());
        for (&i, m) in present.iter().zip(&mods) {
            factors.push(self.adapters[i].factors(m)?);
        }
        let scalings: Vec<f64> = mods.iter().map(|m| m.scaling).collect();
        let scaled: Vec<f64> = self
            .weights_of(present)
            .iter()
            .zip(&scalings)
            .map(|(w, s)| w * s)
            .collect();
        let ranks: Vec<usize> = mods.iter().map(|m| m.rank).collect();
        let (b, a, r) = match &self.how {
            How::Peft(Combination::Cat, _) => {
                // B = [B_1 | … | B_T], A = [w_1 s_1 A_1; …; w_T s_T A_T].
                let r: usize = ranks.iter().sum();
                let b = stack_b(&factors, &ranks, &vec![1.0; ranks.len()], p);
                let a = factors
                    .iter()
                    .zip(&scaled)
                    .flat_map(|((fa, _), &s)| fa.iter().map(move |x| x * s as f32))
                    .collect();
                (b, a, r)
            }
            How::Peft(c, params) if !c.in_delta_space() => {
                if ranks.iter().any(|&r| r != ranks[0]) {
                    return Err(self.module_error(
                        name,
                        format!(
                            "combination_type {c:?} needs equal ranks (PEFT's rule), got {ranks:?}; \
                             use cat, svd or a delta-space type"
                        ),
                    ));
                }
                let wa: Vec<f64> = scaled.iter().map(|s| s.signum() * s.abs().sqrt()).collect();
                let wb: Vec<f64> = scaled.iter().map(|s| s.abs().sqrt()).collect();
                let stack = |k: usize| -> Vec<&[f32]> {
                    factors
                        .iter()
                        .map(|f| if k == 0 { &f.0[..] } else { &f.1[..] })
                        .collect()
                };
                let mut a = vec![0.0f32; ranks[0] * q];
                let mut b = vec![0.0f32; p * ranks[0]];
                let key = |part: &str| {
                    let tensor = format!("{name}.{part}");
                    let seed = self.seed;
                    move |i: usize| Key::new(seed, &tensor, present[i])
                };
                combine::apply_rule(c.rule(), &stack(0), &wa, *params, key("lora_A"), &mut a);
                combine::apply_rule(c.rule(), &stack(1), &wb, *params, key("lora_B"), &mut b);
                (b, a, ranks[0])
            }
            _ => {
                let svd = self.delta_space(name, present, &factors, &ranks, &scalings, p, q)?;
                let (b, a) = combine::refactor(&svd, self.new_rank, self.clamp);
                let r = a.len() / q.max(1);
                (b, a, r)
            }
        };
        if !a.iter().chain(&b).all(|x| x.is_finite()) {
            return Err(Error::Numeric {
                name: name.to_string(),
                reason: "the merged factors hold NaN or infinite values (check the adapters)"
                    .into(),
            });
        }
        let dtype = self.adapters[present[0]].file.entry(&first.a)?.dtype;
        let (kind, suffix) = if first.transposed && !self.adapters[present[0]].config.fan_in_fan_out
        {
            ("lora_embedding", "")
        } else {
            ("lora", ".weight")
        };
        let module = first.name.clone();
        let mut bytes = Vec::new();
        encode_f32(dtype, &a, &mut bytes);
        out.put(
            format!("base_model.model.{module}.{kind}_A{suffix}"),
            dtype,
            vec![r, q],
            &bytes,
        )?;
        encode_f32(dtype, &b, &mut bytes);
        out.put(
            format!("base_model.model.{module}.{kind}_B{suffix}"),
            dtype,
            vec![p, r],
            &bytes,
        )?;
        Ok((module, r))
    }

    /// The SVD of the combined delta of one module (`p × q`).
    #[allow(clippy::too_many_arguments)]
    fn delta_space(
        &self,
        name: &str,
        present: &[usize],
        factors: &[(Vec<f32>, Vec<f32>)],
        ranks: &[usize],
        scalings: &[f64],
        p: usize,
        q: usize,
    ) -> Result<linalg::Svd> {
        let weights = self.weights_of(present);
        let numeric = |e: String| Error::Numeric {
            name: name.to_string(),
            reason: e,
        };
        let total: usize = ranks.iter().sum();
        // [s_1 B_1 | … | s_T B_T] (p × Σr).
        if let How::Peft(Combination::Svd, _) = self.how
            && !self.knots
        {
            // Σ w_i s_i B_i A_i = [w s B] · [A]: exact through the small core.
            let a: Vec<f32> = factors.iter().flat_map(|f| f.0.iter().copied()).collect();
            let scaled: Vec<f64> = weights.iter().zip(scalings).map(|(w, s)| w * s).collect();
            return combine::low_rank_svd(&stack_b(factors, ranks, &scaled, p), &a, p, total, q)
                .map_err(numeric);
        }
        let t = present.len();
        // The inputs the rule or method merges: the deltas, or their KnOTS coordinates.
        // With KnOTS, `basis` is the shared `U` (p × k) the coordinates are in.
        let (inputs, basis): (Vec<Vec<f32>>, Option<faer::Mat<f32>>) = if self.knots {
            // [s_1 B_1 A_1 | … | s_T B_T A_T] = [s B] · blockdiag(A_i), p × T·q.
            let mut blk = vec![0.0f32; total * t * q];
            let mut row0 = 0;
            for (i, ((fa, _), &rk)) in factors.iter().zip(ranks).enumerate() {
                for k in 0..rk {
                    let dst = (row0 + k) * t * q + i * q;
                    blk[dst..dst + q].copy_from_slice(&fa[k * q..(k + 1) * q]);
                }
                row0 += rk;
            }
            let svd =
                combine::low_rank_svd(&stack_b(factors, ranks, scalings, p), &blk, p, total, t * q)
                    .map_err(numeric)?;
            let k = svd.s.iter().filter(|&&x| x > 1e-5).count();
            // R_i = diag(σ) V_iᵀ: k × q.
            let coords = (0..t)
                .map(|i| {
                    let mut r = vec![0.0f32; k * q];
                    for j in 0..k {
                        for c in 0..q {
                            r[j * q + c] = svd.s[j] * svd.v[(i * q + c, j)];
                        }
                    }
                    r
                })
                .collect();
            let u = svd.u.as_ref().subcols(0, k).to_owned();
            (coords, Some(u))
        } else {
            let deltas = factors
                .iter()
                .zip(ranks.iter().zip(scalings))
                .map(|((fa, fb), (&rk, &s))| {
                    let mut d = vec![0.0f32; p * q];
                    linalg::matmul(
                        linalg::rows_mut(&mut d, p, q),
                        linalg::rows(fb, p, rk),
                        linalg::rows(fa, rk, q),
                    );
                    d.iter_mut().for_each(|x| *x *= s as f32);
                    d
                })
                .collect();
            (deltas, None)
        };
        let rows = basis.as_ref().map_or(p, |u| u.ncols());
        let mut merged = vec![0.0f32; rows * q];
        let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        match &self.how {
            How::Peft(c, params) => {
                let key = |i: usize| Key::new(self.seed, name, present[i]);
                combine::apply_rule(c.rule(), &refs, &weights, *params, key, &mut merged);
            }
            How::Method(m) => self.run_method(*m, name, present, &refs, [rows, q], &mut merged)?,
        }
        match basis {
            // ΔW = U·R with U orthonormal: the SVD of R carries over.
            Some(u) => {
                let small = self.svd(name, &merged, rows, q)?;
                let mut uu = faer::Mat::<f32>::zeros(p, small.s.len());
                linalg::matmul(uu.as_mut(), u.as_ref(), small.u.as_ref());
                Ok(linalg::Svd {
                    u: uu,
                    s: small.s,
                    v: small.v,
                })
            }
            None => self.svd(name, &merged, p, q),
        }
    }

    fn weights_of(&self, present: &[usize]) -> Vec<f64> {
        present
            .iter()
            .map(|&i| self.config.adapters[i].weight)
            .collect()
    }

    /// The SVD of a dense `m × n` merged delta, truncated to what re-factoring keeps.
    fn svd(&self, name: &str, d: &[f32], m: usize, n: usize) -> Result<linalg::Svd> {
        let k = self.new_rank.min(m).min(n);
        let a = linalg::rows(d, m, n);
        if self.randomized {
            let key = Key::new(self.seed, name, usize::MAX);
            linalg::truncated_svd(a, k, k.div_ceil(2).max(10), 2, key)
        } else {
            linalg::thin_svd(a).map(|s| linalg::truncate(s, k))
        }
        .map_err(|e| Error::Numeric {
            name: name.to_string(),
            reason: e,
        })
    }

    /// Merge `inputs` (each `shape`) with an amalgam method over a zero base.
    fn run_method(
        &self,
        method: &dyn Method,
        name: &str,
        present: &[usize],
        inputs: &[&[f32]],
        shape: [usize; 2],
        out: &mut [f32],
    ) -> Result<()> {
        let spec = method.spec();
        let with_base = spec.contract.base != BasePolicy::Ignored;
        let zeros = vec![0.0f32; shape[0] * shape[1]];
        let mut all: Vec<&[f32]> = Vec::new();
        if with_base {
            all.push(&zeros);
        }
        all.extend_from_slice(inputs);
        spec.contract
            .check(all.len(), with_base)
            .map_err(|e| self.module_error(name, format!("merge_method {}: {e}", spec.name)))?;
        // An adapter's own parameters, then its `weight` (for a `weight` parameter), then the
        // global parameters, then the method's default.
        let resolve = |own: Option<&AdapterEntry>, p: &methods::ParamSpec| {
            let evaluate = |scope: &Parameters| -> Result<Option<config::Value>> {
                match scope.get(p.name) {
                    Some(setting) => config::evaluate(setting, name, 0.0, p.kind).map_err(|e| {
                        self.module_error(name, format!("parameter '{}': {e}", p.name))
                    }),
                    None => Ok(None),
                }
            };
            if let Some(e) = own {
                if let Some(v) = evaluate(&e.parameters)? {
                    return Ok(v);
                }
                if p.name == "weight" {
                    return Ok(config::Value::Float(e.weight));
                }
            }
            if let Some(v) = evaluate(&self.config.parameters)? {
                return Ok(v);
            }
            p.default.clone().ok_or_else(|| {
                self.module_error(
                    name,
                    format!("merge_method {} needs parameter '{}'", spec.name, p.name),
                )
            })
        };
        let mut shared = Params::default();
        for p in spec.params.iter().filter(|p| p.scope == Scope::Shared) {
            shared.values.push((p.name, resolve(None, p)?));
        }
        let mut per_input = Vec::new();
        for k in 0..all.len() {
            let is_base = with_base && k == 0;
            let own =
                (!is_base).then(|| &self.config.adapters[present[k - usize::from(with_base)]]);
            let mut params = Params::default();
            for p in spec.params.iter().filter(|p| match p.scope {
                Scope::Shared => false,
                Scope::Input => true,
                Scope::NonBase => !is_base,
            }) {
                params.values.push((p.name, resolve(own, p)?));
            }
            per_input.push(params);
        }
        let job = MergeJob {
            name,
            shape: &shape,
            inputs: all,
            bf16: Vec::new(),
            base: with_base.then_some(0),
            shared: &shared,
            per_input: &per_input,
            seed: self.seed,
            global: None,
        };
        // Whole-model statistics (global TIES, PCB, ...) need every module first.
        if let Some(wm) = method.whole_model()
            && wm.begin_model(std::slice::from_ref(&job))?.is_some()
        {
            return Err(self.module_error(
                name,
                format!(
                    "merge_method {} with these parameters needs whole-model passes, which lora \
                     merge does not run (it merges module by module)",
                    spec.name
                ),
            ));
        }
        method.merge(&job, out)
    }

    /// Whole tensors the adapters carry (modules_to_save, embedding base layers) are copied
    /// once; several adapters carrying different values for one tensor is an error, as in PEFT.
    fn copy_whole_tensors(&self, out: &AdapterBuilder) -> Result<Vec<String>> {
        let mut seen: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        let mut keys = Vec::new();
        for (i, a) in self.adapters.iter().enumerate() {
            for (base_name, tensor) in &a.replaced {
                if let Some(&(j, other)) = seen.get(base_name.as_str()) {
                    let x = self.adapters[j].file.tensor(other)?;
                    let y = a.file.tensor(tensor)?;
                    if crate::arch::is_vocabulary(base_name) && x.shape != y.shape {
                        return Err(Error::Adapter {
                            path: a.dir.clone(),
                            name: tensor.clone(),
                            reason: format!(
                                "{} and this adapter have different vocabularies ({base_name} of \
                                 {:?} and {:?}); an adapter cannot hold two, so merge them as \
                                 `BASE+ADAPTER` models with `amalgam merge` and \
                                 `tokenizer_source: union`",
                                self.adapters[j].dir.display(),
                                x.shape,
                                y.shape
                            ),
                        });
                    }
                    if x.dtype != y.dtype || x.bytes != y.bytes {
                        return Err(Error::Adapter {
                            path: a.dir.clone(),
                            name: tensor.clone(),
                            reason: format!(
                                "{} and this adapter both carry a whole {base_name} with different \
                                 values; such modules cannot be merged (PEFT refuses too)",
                                self.adapters[j].dir.display()
                            ),
                        });
                    }
                    continue;
                }
                seen.insert(base_name, (i, tensor));
                let v = a.file.tensor(tensor)?;
                out.put(tensor.clone(), v.dtype, v.shape.to_vec(), v.bytes)?;
                if !tensor.ends_with(".base_layer.weight") {
                    let module = base_name.rsplit_once('.').map_or(&base_name[..], |m| m.0);
                    let key = module.rsplit('.').next().unwrap_or(module).to_string();
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// `[c_1 B_1 | … | c_T B_T]` (`p × Σ r_i`, row-major) from each adapter's `(A, B)` factors.
fn stack_b(factors: &[(Vec<f32>, Vec<f32>)], ranks: &[usize], c: &[f64], p: usize) -> Vec<f32> {
    let total: usize = ranks.iter().sum();
    let mut b = vec![0.0f32; p * total];
    let mut col = 0;
    for ((_, fb), (&rk, &s)) in factors.iter().zip(ranks.iter().zip(c)) {
        for row in 0..p {
            let dst = &mut b[row * total + col..row * total + col + rk];
            for (d, x) in dst.iter_mut().zip(&fb[row * rk..(row + 1) * rk]) {
                *d = x * s as f32;
            }
        }
        col += rk;
    }
    b
}
