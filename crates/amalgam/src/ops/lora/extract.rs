//! `lora extract`: a PEFT LoRA adapter approximating a fine-tune, from the truncated SVD of each
//! weight difference, with mergekit-extract-lora's conventions.
//!
//! For each module with a 2-D weight, `Δ = W_ft − W_base` (in f32; the transpose for input
//! embeddings, which PEFT stores as `lora_embedding_A: r × vocab`) is factored as
//! `Δ ≈ U_k diag(σ_k) V_kᵀ`, and with the scale distributed (the default) `A = diag(√σ) Vᵀ`,
//! `B = U diag(√σ)`, else `A = diag(σ) Vᵀ`, `B = U`. The adapter has `lora_alpha = r`, so its
//! scaling is 1. As in mergekit-extract-lora:
//! - embeddings (input embeddings and the LM head) are saved whole (`modules_to_save`) unless
//!   `embed_lora`; modules named in `save_modules` are saved whole;
//! - `include` / `exclude` regular expressions (searched in the module name) select modules;
//! - weights that are not 2-D (norms) are saved whole unless `skip_undecomposable`;
//! - biases of extracted modules become `lora_B.bias` (the config then sets `lora_bias`, which
//!   mergekit omits, so PEFT would ignore them);
//! - `sv_epsilon` drops singular values at or below it; factors are stored in the fine-tune's
//!   dtype.
//!
//! Deliberate differences: modules whose tensors equal the base's exactly are left out (saved
//! whole or factored, they would change nothing); `energy` picks per module the smallest rank
//! keeping that fraction of `‖Δ‖²_F` (at most `rank`); the SVD is randomized (seeded) unless
//! `exact`. The reconstruction error reported is measured from the factors as stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use regex::Regex;

use crate::arch;
use crate::dtype::{DType, decode_f32, encode_f32};
use crate::error::{Error, Result};
use crate::io::{Existing, Model};
use crate::linalg;
use crate::lora::write::{AdapterBuilder, folded_config};
use crate::methods::rng::Key;
use crate::progress::Progress;

/// Options for [`extract`]; the defaults are mergekit-extract-lora's.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Largest rank per module.
    pub rank: usize,
    /// Per-module rank: the smallest keeping this fraction of the difference's energy.
    pub energy: Option<f64>,
    /// `A = √σ·Vᵀ`, `B = U·√σ` (else `A = σ·Vᵀ`, `B = U`).
    pub distribute_scale: bool,
    /// Factor embeddings too, instead of saving them whole.
    pub embed_lora: bool,
    /// Module-name patterns to save whole (full name or last component).
    pub save_modules: Vec<String>,
    /// Only modules matching one of these regular expressions (all when empty).
    pub include: Vec<String>,
    /// Never modules matching one of these.
    pub exclude: Vec<String>,
    /// Singular values at or below this are dropped.
    pub sv_epsilon: f64,
    /// Leave out modules that cannot be factored (norms) instead of saving them whole.
    pub skip_undecomposable: bool,
    /// Exact SVD instead of randomized.
    pub exact: bool,
    /// Seed of the randomized SVD's sketches.
    pub seed: u64,
    /// What to do if the output exists.
    pub existing: Existing,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: 128,
            energy: None,
            distribute_scale: true,
            embed_lora: false,
            save_modules: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
            sv_epsilon: 0.0,
            skip_undecomposable: false,
            exact: false,
            seed: 0,
            existing: Existing::Refuse,
        }
    }
}

/// How well one module's factors reproduce its difference.
#[derive(Clone, Debug)]
pub struct ModuleError {
    /// Module name.
    pub module: String,
    /// Rank kept.
    pub rank: usize,
    /// `‖Δ‖_F`.
    pub norm: f64,
    /// `‖Δ − B·A‖_F` (with the factors as stored).
    pub residual: f64,
}

impl ModuleError {
    /// `‖Δ − B·A‖_F / ‖Δ‖_F` (0 for a zero difference).
    pub fn relative(&self) -> f64 {
        if self.norm > 0.0 {
            self.residual / self.norm
        } else {
            0.0
        }
    }
}

/// What [`extract`] did.
#[derive(Clone, Debug)]
pub struct ExtractReport {
    /// The adapter directory.
    pub path: PathBuf,
    /// Factored modules, by name.
    pub modules: Vec<ModuleError>,
    /// Tensors saved whole.
    pub saved: Vec<String>,
    /// Modules left out because they equal the base.
    pub unchanged: Vec<String>,
}

impl ExtractReport {
    /// What `lora extract --json` prints: each factored module's rank, norm and relative
    /// error, the tensors saved whole, the unchanged modules and the overall error.
    pub fn to_json(&self) -> serde_json::Value {
        let modules: Vec<_> = self
            .modules
            .iter()
            .map(|m| {
                serde_json::json!({
                    "module": m.module, "rank": m.rank, "norm": m.norm,
                    "relative_error": m.relative(),
                })
            })
            .collect();
        serde_json::json!({
            "path": self.path, "modules": modules, "saved": self.saved,
            "unchanged": self.unchanged, "overall_relative_error": self.overall(),
        })
    }

    /// `‖Δ − B·A‖_F / ‖Δ‖_F` over all factored modules together.
    pub fn overall(&self) -> f64 {
        let (n, r) = self.modules.iter().fold((0.0, 0.0), |(n, r), m| {
            (n + m.norm * m.norm, r + m.residual * m.residual)
        });
        if n > 0.0 { (r / n).sqrt() } else { 0.0 }
    }
}

/// What happens to one module.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    /// Factor the weight (`transposed` for input embeddings).
    Factor { transposed: bool },
    /// Save its tensors whole.
    Save,
    /// Leave it out.
    Skip,
}

/// One module of the fine-tune: its weight (if any) and bias.
#[derive(Debug, Default)]
struct ModuleTensors {
    weight: Option<String>,
    bias: Option<String>,
    other: Vec<String>,
}

impl ModuleTensors {
    /// Every tensor of the module.
    fn names(&self) -> impl Iterator<Item = &String> {
        self.weight.iter().chain(&self.bias).chain(&self.other)
    }

    /// Their bytes in `model`.
    fn bytes(&self, model: &Model) -> u64 {
        self.names()
            .map(|n| model.entry(n).map_or(0, |e| e.nbytes() as u64))
            .sum()
    }
}

/// Output embeddings are linear layers to PEFT (plain `lora_A`/`lora_B`).
fn is_output_head(weight: &str) -> bool {
    weight == arch::LM_HEAD || weight.ends_with("embed_out.weight")
}

/// Embedding-like modules (mergekit: the model's input and output embeddings and every
/// `nn.Embedding`), judged by name.
fn is_embedding(module: &str, weight: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    arch::is_vocabulary(weight) || last.contains("embed") || last == "wpe"
}

fn regexes(what: &str, patterns: &[String]) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|e| {
                Error::argument(what, format!("'{p}' is not a regular expression: {e}"))
            })
        })
        .collect()
}

/// Extract an adapter approximating `finetuned − base`, written at `output`.
pub fn extract(
    base: &Path,
    finetuned: &Path,
    output: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    if opts.rank == 0 {
        return Err(Error::argument("rank", "must be at least 1"));
    }
    if let Some(e) = opts.energy
        && !(e > 0.0 && e <= 1.0)
    {
        return Err(Error::argument("energy", "must be in (0, 1]"));
    }
    if opts.sv_epsilon.is_nan() || opts.sv_epsilon < 0.0 {
        return Err(Error::argument("sv-epsilon", "must be a number ≥ 0"));
    }
    let include = regexes("include regex", &opts.include)?;
    let exclude = regexes("exclude regex", &opts.exclude)?;
    let base_model = Model::open(base)?;
    let ft = Model::open(finetuned)?;
    let builder = AdapterBuilder::create(output, opts.existing)?;

    // Group the fine-tune's tensors by module and check them against the base.
    let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
    for t in ft.tensors() {
        let b = base_model
            .entry(&t.name)
            .map_err(|_| Error::MissingTensor {
                path: base_model.path.clone(),
                name: t.name.clone(),
            })?;
        if b.shape != t.shape {
            return Err(Error::ShapeMismatch {
                path: ft.path.clone(),
                name: t.name.clone(),
                expected: b.shape.clone(),
                found: t.shape.clone(),
            });
        }
        if !t.dtype.is_float() || !b.dtype.is_float() {
            progress.warn(&format!("{}: not a float tensor, left out", t.name));
            continue;
        }
        let (module, field) = t.name.rsplit_once('.').unwrap_or(("", &t.name));
        let entry = modules.entry(module.to_string()).or_default();
        match field {
            "weight" => entry.weight = Some(t.name.clone()),
            "bias" => entry.bias = Some(t.name.clone()),
            _ => entry.other.push(t.name.clone()),
        }
    }

    let saved_by_name = |module: &str| {
        let last = module.rsplit('.').next().unwrap_or(module);
        opts.save_modules.iter().any(|k| k == module || k == last)
    };
    let selected = |module: &str| {
        (include.is_empty() || include.iter().any(|r| r.is_match(module)))
            && !exclude.iter().any(|r| r.is_match(module))
    };
    let mut plan: Vec<(&str, &ModuleTensors, Action)> = Vec::new();
    for (module, tensors) in &modules {
        let action = match &tensors.weight {
            _ if saved_by_name(module) => Action::Save,
            Some(w)
                if is_embedding(module, w)
                    && !opts.embed_lora
                    && !exclude.iter().any(|r| r.is_match(module)) =>
            {
                Action::Save
            }
            _ if !selected(module) => Action::Skip,
            Some(w) if ft.entry(w)?.shape.len() == 2 => Action::Factor {
                transposed: is_embedding(module, w) && !is_output_head(w),
            },
            _ if opts.skip_undecomposable => Action::Skip,
            _ => Action::Save,
        };
        plan.push((module, tensors, action));
    }

    let work: Vec<_> = plan.iter().filter(|p| p.2 != Action::Skip).collect();
    let total: u64 = work.iter().map(|(_, t, _)| t.bytes(&ft)).sum();
    progress.start(work.len() as u64, total);
    let mut order: Vec<usize> = (0..work.len()).collect();
    let size = |i: &usize| {
        work[*i]
            .1
            .weight
            .as_ref()
            .and_then(|w| ft.entry(w).ok())
            .map_or(0, |e| e.numel())
    };
    order.sort_by_key(|i| std::cmp::Reverse(size(i)));
    let outcomes: Vec<(usize, Outcome)> = order
        .into_par_iter()
        .with_max_len(1)
        .map(|i| {
            crate::cancel::check()?;
            let (module, tensors, action) = *work[i];
            let out = match action {
                Action::Factor { transposed } => factor(
                    &base_model,
                    &ft,
                    module,
                    tensors,
                    transposed,
                    opts,
                    &builder,
                )?,
                _ => save(&base_model, &ft, tensors, &builder)?,
            };
            progress.advance(tensors.bytes(&ft));
            Ok((i, out))
        })
        .collect::<Result<_>>()?;
    progress.finish();

    let mut report = ExtractReport {
        path: output.to_path_buf(),
        modules: Vec::new(),
        saved: Vec::new(),
        unchanged: Vec::new(),
    };
    let mut ranks = BTreeMap::new();
    let mut saved_keys: Vec<String> = Vec::new();
    let mut lora_bias = false;
    let mut outcomes = outcomes;
    outcomes.sort_by_key(|o| o.0);
    for (i, outcome) in outcomes {
        let module = work[i].0.to_string();
        match outcome {
            Outcome::Unchanged => report.unchanged.push(module),
            Outcome::Saved(names) => {
                let last = module.rsplit('.').next().unwrap_or(&module).to_string();
                if !saved_keys.contains(&last) {
                    saved_keys.push(last);
                }
                report.saved.extend(names);
            }
            Outcome::Factored { error, bias } => {
                ranks.insert(module, error.rank);
                lora_bias |= bias;
                report.modules.push(error);
            }
        }
    }
    if ranks.is_empty() && report.saved.is_empty() {
        return Err(Error::argument(
            "models",
            format!(
                "{} and {} do not differ in any selected module: there is nothing to extract",
                ft.path.display(),
                base_model.path.display()
            ),
        ));
    }
    let mut config = folded_config(
        None,
        Some(&base.display().to_string()),
        &ranks,
        &saved_keys,
        lora_bias,
    );
    config["task_type"] = task_type(&ft);
    let readme = format!(
        "# LoRA adapter extracted by amalgam\n\nBase: `{}`\nFine-tune: `{}`\nMax rank: {}{}\n\n\
         Overall relative reconstruction error of the factored modules: {:.6}\n",
        base.display(),
        finetuned.display(),
        opts.rank,
        opts.energy
            .map_or(String::new(), |e| format!(", energy threshold {e}")),
        report.overall()
    );
    builder.finish(&config, &[("README.md", readme)])?;
    Ok(report)
}

/// PEFT's task type from the fine-tune's architecture (`CAUSAL_LM` for `*ForCausalLM`).
fn task_type(model: &Model) -> serde_json::Value {
    let arch = model.config().and_then(|c| {
        c.get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str().map(str::to_string))
    });
    match arch {
        Some(a) if a.ends_with("ForCausalLM") => "CAUSAL_LM".into(),
        Some(a) if a.ends_with("ForSequenceClassification") => "SEQ_CLS".into(),
        _ => serde_json::Value::Null,
    }
}

enum Outcome {
    Unchanged,
    Saved(Vec<String>),
    Factored { error: ModuleError, bias: bool },
}

/// `name` decoded, refusing NaN and infinity.
fn decode(model: &Model, name: &str) -> Result<Vec<f32>> {
    let out = model.floats(name)?;
    if !out.iter().all(|x| x.is_finite()) {
        return Err(Error::Numeric {
            name: name.to_string(),
            reason: format!(
                "{} holds NaN or infinite values; fix or exclude that module",
                model.path.display()
            ),
        });
    }
    Ok(out)
}

fn same(base: &Model, ft: &Model, name: &str) -> Result<bool> {
    let (a, b) = (base.tensor(name)?, ft.tensor(name)?);
    Ok(if a.dtype == b.dtype {
        a.bytes == b.bytes
    } else {
        decode(base, name)? == decode(ft, name)?
    })
}

/// Save a module's tensors whole, unless all equal the base's.
fn save(base: &Model, ft: &Model, t: &ModuleTensors, out: &AdapterBuilder) -> Result<Outcome> {
    let names: Vec<&String> = t.names().collect();
    let mut changed = false;
    for n in &names {
        changed |= !same(base, ft, n)?;
    }
    if !changed {
        return Ok(Outcome::Unchanged);
    }
    for n in &names {
        let v = ft.tensor(n)?;
        out.put(
            format!("base_model.model.{n}"),
            v.dtype,
            v.shape.to_vec(),
            v.bytes,
        )?;
        ft.release(n);
    }
    Ok(Outcome::Saved(names.into_iter().cloned().collect()))
}

/// Factor a module's weight difference (and keep its bias difference).
fn factor(
    base: &Model,
    ft: &Model,
    module: &str,
    t: &ModuleTensors,
    transposed: bool,
    opts: &ExtractOptions,
    out: &AdapterBuilder,
) -> Result<Outcome> {
    let weight = t.weight.as_ref().expect("factored modules have a weight");
    let bias_changed = match &t.bias {
        Some(b) => !same(base, ft, b)?,
        None => false,
    };
    let entry = ft.entry(weight)?;
    let dtype = entry.dtype;
    let (rows, cols) = (entry.shape[0], entry.shape[1]);
    let mut delta = decode(ft, weight)?;
    let w0 = decode(base, weight)?;
    delta.iter_mut().zip(&w0).for_each(|(d, b)| *d -= b);
    drop(w0);
    base.release(weight);
    ft.release(weight);
    if !bias_changed && delta.iter().all(|&d| d == 0.0) {
        return Ok(Outcome::Unchanged);
    }
    // The matrix PEFT factors: `out × in`, or `dim × vocab` for an embedding.
    let (m, n) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    if transposed {
        let mut t = vec![0.0f32; delta.len()];
        for (r, row) in delta.chunks_exact(cols).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                t[c * rows + r] = x;
            }
        }
        delta = t;
    }
    let d = linalg::rows(&delta, m, n);
    let norm2: f64 = delta.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let k = opts.rank.min(m).min(n);
    let svd = if opts.exact {
        linalg::thin_svd(d).map(|s| linalg::truncate(s, k))
    } else {
        let key = Key::new(opts.seed, weight, 0);
        linalg::truncated_svd(d, k, k.div_ceil(2).max(10), 2, key)
    }
    .map_err(|e| Error::Numeric {
        name: weight.clone(),
        reason: e,
    })?;
    let keep = kept_rank(&svd.s, norm2, opts.energy, opts.sv_epsilon);
    // A = scale_a·Vᵀ (keep × n), B = U·scale_b (m × keep).
    let mut a = vec![0.0f32; keep * n];
    let mut b = vec![0.0f32; m * keep];
    for j in 0..keep {
        let s = svd.s[j];
        let (sa, sb) = if opts.distribute_scale {
            (s.sqrt(), s.sqrt())
        } else {
            (s, 1.0)
        };
        for (c, x) in a[j * n..(j + 1) * n].iter_mut().enumerate() {
            *x = svd.v[(c, j)] * sa;
        }
        for r in 0..m {
            b[r * keep + j] = svd.u[(r, j)] * sb;
        }
    }
    drop(svd);
    // Store in the fine-tune's dtype and measure the error of what is stored.
    let (a_bytes, a) = round_trip(dtype, &a);
    let (b_bytes, b) = round_trip(dtype, &b);
    let (kind, suffix) = if transposed {
        ("lora_embedding", "")
    } else {
        ("lora", ".weight")
    };
    out.put(
        format!("base_model.model.{module}.{kind}_A{suffix}"),
        dtype,
        vec![keep, n],
        &a_bytes,
    )?;
    out.put(
        format!("base_model.model.{module}.{kind}_B{suffix}"),
        dtype,
        vec![m, keep],
        &b_bytes,
    )?;
    linalg::sub_product(
        linalg::rows_mut(&mut delta, m, n),
        linalg::rows(&b, m, keep),
        linalg::rows(&a, keep, n),
    );
    let residual: f64 = delta.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let bias = match &t.bias {
        Some(name) if bias_changed => {
            let mut db = decode(ft, name)?;
            let b0 = decode(base, name)?;
            db.iter_mut().zip(&b0).for_each(|(d, b)| *d -= b);
            let bias_dtype = ft.entry(name)?.dtype;
            let (bytes, _) = round_trip(bias_dtype, &db);
            out.put(
                format!("base_model.model.{module}.lora_B.bias"),
                bias_dtype,
                vec![db.len()],
                &bytes,
            )?;
            true
        }
        _ => false,
    };
    Ok(Outcome::Factored {
        error: ModuleError {
            module: module.to_string(),
            rank: keep,
            norm: norm2.sqrt(),
            residual: residual.sqrt(),
        },
        bias,
    })
}

/// `values` encoded in `dtype`, and decoded back.
fn round_trip(dtype: DType, values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    encode_f32(dtype, values, &mut bytes);
    let mut back = Vec::new();
    decode_f32(dtype, &bytes, &mut back);
    (bytes, back)
}

/// How many of the leading singular values `s` (of a matrix with `‖Δ‖²_F = norm2`) to keep:
/// all, or the fewest holding `energy` of `norm2`, and none at or below `epsilon`. At least one
/// is kept so the module stays in the adapter.
fn kept_rank(s: &[f32], norm2: f64, energy: Option<f64>, epsilon: f64) -> usize {
    let mut keep = s.len();
    if let Some(e) = energy {
        let target = e * norm2;
        let mut acc = 0.0;
        for (i, &x) in s.iter().enumerate() {
            acc += f64::from(x) * f64::from(x);
            // A relative slack absorbs the rounding of the two sums being compared.
            if acc >= target * (1.0 - 1e-6) {
                keep = i + 1;
                break;
            }
        }
    }
    if epsilon > 0.0 {
        keep = keep.min(s.iter().filter(|&&x| f64::from(x) > epsilon).count());
    }
    keep.max(1).min(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_picks_the_fewest_values() {
        // Energies 16, 9, 1 of 26.
        let s = [4.0, 3.0, 1.0];
        assert_eq!(kept_rank(&s, 26.0, None, 0.0), 3);
        assert_eq!(kept_rank(&s, 26.0, Some(0.5), 0.0), 1);
        assert_eq!(kept_rank(&s, 26.0, Some(0.9), 0.0), 2);
        assert_eq!(kept_rank(&s, 26.0, Some(1.0), 0.0), 3);
        // Energy beyond what the top values hold keeps them all.
        assert_eq!(kept_rank(&s[..2], 26.0, Some(0.99), 0.0), 2);
        assert_eq!(kept_rank(&s, 26.0, None, 2.0), 2);
        assert_eq!(kept_rank(&s, 26.0, None, 10.0), 1);
    }

    #[test]
    fn modules_are_classified_like_mergekit() {
        assert!(is_embedding(
            "model.embed_tokens",
            "model.embed_tokens.weight"
        ));
        assert!(!is_output_head("model.embed_tokens.weight"));
        assert!(is_embedding("lm_head", "lm_head.weight"));
        assert!(is_output_head("lm_head.weight"));
        assert!(is_embedding(
            "embeddings.position_embeddings",
            "embeddings.position_embeddings.weight"
        ));
        assert!(!is_embedding(
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.q_proj.weight"
        ));
    }
}
