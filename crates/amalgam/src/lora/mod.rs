//! PEFT LoRA adapters: `adapter_config.json` plus `adapter_model.safetensors`, read and mapped to
//! the base model's tensor names, and their weight deltas computed a block of rows at a time.
//!
//! For a target module with `A` (`r × in`) and `B` (`out × r`), PEFT's delta is
//! `ΔW = s·B·A` with `s = α/r` (`α/√r` with `use_rslora`), where `r` and `α` come from
//! `rank_pattern` / `alpha_pattern` when a pattern matches the module name (PEFT's rule: the
//! first pattern `p` with `^(.*\.)?(p)$` matching), else from `r` / `lora_alpha`. Embedding
//! adapters (`lora_embedding_A`: `r × vocab`, `lora_embedding_B`: `dim × r`) and
//! `fan_in_fan_out` layers (GPT-2's Conv1D) store the transpose: `ΔW = s·(B·A)ᵀ`.
//! Names map as `base_model.model.<module>.lora_A.weight` → `<module>.weight`.
//!
//! Besides the factors an adapter may carry `lora_B.bias` (PEFT's `lora_bias`: the bias grows by
//! `s·b`) and whole tensors: modules listed in `modules_to_save` (PEFT saves them as
//! `base_model.model.<module>.weight`, mergekit-extract-lora puts embeddings and norms there) and
//! the `base_layer` weights of adapted embeddings. Whole tensors replace the base's.

pub mod combine;
pub mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::Model;

/// The fields of `adapter_config.json` amalgam uses (others are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    /// PEFT's adapter type; only `LORA` is supported.
    #[serde(default)]
    pub peft_type: Option<String>,
    /// Default rank.
    #[serde(default = "default_rank")]
    pub r: usize,
    /// Default alpha.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Per-module ranks by name pattern, in file order (the first match wins).
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas by name pattern, in file order.
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    /// rsLoRA scaling `α/√r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Whether linear weights are stored `in × out` (GPT-2 Conv1D).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// DoRA (not supported).
    #[serde(default)]
    pub use_dora: bool,
    /// Modules saved whole; their tensors replace the base model's.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Whether `lora_B` has a bias that is added to the base layer's bias.
    #[serde(default)]
    pub lora_bias: bool,
    /// The base model the adapter was trained on (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// Parse and check the text of `dir`'s `adapter_config.json` (at `path`).
    pub fn parse(dir: &Path, path: &Path, text: &str) -> Result<AdapterConfig> {
        let config: AdapterConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if let Some(t) = &config.peft_type
            && t != "LORA"
        {
            return Err(bad(
                dir,
                format!("peft_type {t} is not supported (only LORA)"),
            ));
        }
        if config.use_dora {
            return Err(bad(dir, "DoRA adapters (use_dora) are not supported yet"));
        }
        Ok(config)
    }
}

fn default_rank() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

/// One adapted module.
#[derive(Clone, Debug)]
pub struct Module {
    /// Module path (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// Adapter tensor names of `A` and `B`.
    pub a: String,
    /// See `a`.
    pub b: String,
    /// Rank `r`.
    pub rank: usize,
    /// `s = α/r` (or `α/√r`).
    pub scaling: f64,
    /// Whether `ΔW = s·(B·A)ᵀ` (embeddings, fan-in-fan-out) instead of `s·B·A`.
    pub transposed: bool,
    /// Shape of `ΔW` (that of the base tensor).
    pub shape: [usize; 2],
    /// Adapter tensor name of `lora_B.bias`, if the adapter trains a bias.
    pub bias: Option<String>,
}

/// A PEFT LoRA adapter.
pub struct Adapter {
    /// The adapter directory.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: AdapterConfig,
    /// Its tensors.
    pub file: Model,
    /// Adapted modules by base tensor name (`<module>.weight`).
    pub modules: BTreeMap<String, Module>,
    /// Whole tensors the adapter carries, which replace the base model's: `modules_to_save`,
    /// and the base weights of adapted embeddings (PEFT saves them as
    /// `<module>.base_layer.weight`). Adapter tensor name by base tensor name.
    pub replaced: BTreeMap<String, String>,
    /// Bias deltas (`lora_B.bias`, times the module's scaling): module by base bias name
    /// (`<module>.bias`).
    pub biases: BTreeMap<String, String>,
    /// Tensors PEFT would not load, so neither does amalgam (`lora_B.bias` without
    /// `lora_bias: true` in the config); callers should say so.
    pub ignored: Vec<String>,
}

fn bad(dir: &Path, reason: impl Into<String>) -> Error {
    Error::NotAModel {
        path: dir.to_path_buf(),
        reason: reason.into(),
    }
}

/// PEFT's pattern lookup: the value of the first key `p` (in file order) with `^(.*\.)?(p)$`
/// matching `module`, as a number.
fn pattern(
    path: &Path,
    map: &serde_json::Map<String, serde_json::Value>,
    module: &str,
) -> Result<Option<f64>> {
    for (key, value) in map {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let re = regex::Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| {
            bad(format!(
                "pattern '{key}' is not a valid regular expression: {e}"
            ))
        })?;
        if re.is_match(module) {
            return value
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(format!("pattern '{key}' maps to {value}, not a number")));
        }
    }
    Ok(None)
}

/// Which factor an adapter tensor is: `(module, is_a, is_embedding)`.
fn classify(name: &str) -> Option<(&str, bool, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    for (suffix, a, emb) in [
        (".lora_A.weight", true, false),
        (".lora_B.weight", false, false),
        (".lora_embedding_A", true, true),
        (".lora_embedding_B", false, true),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module, a, emb));
        }
    }
    None
}

impl Adapter {
    /// Open a PEFT adapter directory and check it against itself: every module has both
    /// factors, their ranks agree with each other and with the config.
    pub fn open(dir: impl AsRef<Path>) -> Result<Adapter> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                bad(&dir, "no adapter_config.json: not a PEFT adapter directory")
            } else {
                Error::io(&cfg_path, e)
            }
        })?;
        let config = AdapterConfig::parse(&dir, &cfg_path, &text)?;
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (it has adapter_model.bin: save the adapter with safe_serialization=True)"
            } else {
                ""
            };
            return Err(bad(&dir, format!("no adapter_model.safetensors{hint}")));
        }
        let file = Model::open(&weights)?;
        let saved = config.modules_to_save.clone().unwrap_or_default();
        let is_saved = |module: &str| {
            saved
                .iter()
                .any(|k| module == k || module.ends_with(&format!(".{k}")))
        };
        let mut factors: BTreeMap<&str, [Option<&str>; 2]> = BTreeMap::new();
        let mut embedding: BTreeMap<&str, bool> = BTreeMap::new();
        let mut bias_of: BTreeMap<&str, &str> = BTreeMap::new();
        let mut replaced = BTreeMap::new();
        for t in file.tensors() {
            let stray = |reason: &str| Error::Adapter {
                path: weights.clone(),
                name: t.name.clone(),
                reason: reason.into(),
            };
            let Some(rest) = t.name.strip_prefix("base_model.model.") else {
                return Err(stray(
                    "adapter tensors are named base_model.model.<module>...; this is not a PEFT LoRA tensor",
                ));
            };
            if let Some(module) = rest.strip_suffix(".base_layer.weight") {
                replaced.insert(format!("{module}.weight"), t.name.clone());
                continue;
            }
            if let Some(module) = rest.strip_suffix(".lora_B.bias") {
                bias_of.insert(module, &t.name);
                continue;
            }
            if let Some((module, is_a, emb)) = classify(&t.name) {
                factors.entry(module).or_default()[usize::from(!is_a)] = Some(&t.name);
                embedding.insert(module, emb);
                continue;
            }
            let module = rest.rsplit_once('.').map_or(rest, |(m, _)| m);
            if !is_saved(module) {
                return Err(stray(
                    "neither a LoRA factor (lora_A/lora_B/lora_embedding_A/B) nor a module listed \
                     in modules_to_save; DoRA and other adapter types are not supported",
                ));
            }
            replaced.insert(rest.to_string(), t.name.clone());
        }
        if let Some((module, _)) = bias_of.iter().find(|(m, _)| !factors.contains_key(*m)) {
            return Err(bad(
                &dir,
                format!("module {module} has lora_B.bias but no LoRA factors"),
            ));
        }
        // PEFT loads `lora_B.bias` only with `lora_bias: true` and ignores it otherwise (as it
        // does in mergekit-extract-lora's adapters, which write them without the flag).
        let ignored: Vec<String> = if config.lora_bias {
            Vec::new()
        } else {
            std::mem::take(&mut bias_of)
                .into_values()
                .map(str::to_string)
                .collect()
        };
        let mut biases = BTreeMap::new();
        let mut modules = BTreeMap::new();
        for (module, [a, b]) in factors {
            let (Some(a), Some(b)) = (a, b) else {
                let (have, missing) = if a.is_some() { ("A", "B") } else { ("B", "A") };
                return Err(bad(
                    &dir,
                    format!("module {module} has lora_{have} but no lora_{missing}"),
                ));
            };
            let (ea, eb) = (file.entry(a)?, file.entry(b)?);
            if ea.shape.len() != 2 || eb.shape.len() != 2 {
                return Err(bad(&dir, format!("{module}: LoRA factors must be 2-D")));
            }
            if !ea.dtype.is_float() || !eb.dtype.is_float() {
                return Err(bad(&dir, format!("{module}: LoRA factors must be float")));
            }
            let rank =
                pattern(&cfg_path, &config.rank_pattern, module)?.map_or(config.r, |r| r as usize);
            if ea.shape[0] != rank || eb.shape[1] != rank {
                return Err(bad(
                    &dir,
                    format!(
                        "{module}: rank mismatch: lora_A is {:?} and lora_B {:?}, the config says r = {rank}",
                        ea.shape, eb.shape
                    ),
                ));
            }
            let alpha =
                pattern(&cfg_path, &config.alpha_pattern, module)?.unwrap_or(config.lora_alpha);
            let scaling = if config.use_rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            let emb = embedding[module];
            let transposed = emb || config.fan_in_fan_out;
            let (out, inp) = (eb.shape[0], ea.shape[1]);
            let shape = if transposed { [inp, out] } else { [out, inp] };
            modules.insert(
                format!("{module}.weight"),
                Module {
                    name: module.to_string(),
                    a: a.to_string(),
                    b: b.to_string(),
                    rank,
                    scaling,
                    transposed,
                    shape,
                    bias: bias_of.get(module).map(|b| b.to_string()),
                },
            );
            if let Some(b) = bias_of.get(module) {
                biases.insert(format!("{module}.bias"), b.to_string());
            }
        }
        if modules.is_empty() && replaced.is_empty() {
            return Err(bad(&dir, "the adapter has no LoRA factors"));
        }
        Ok(Adapter {
            dir,
            config,
            file,
            modules,
            replaced,
            biases,
            ignored,
        })
    }

    /// Check that every module of `adapter` adapts a float tensor of `base` of the same shape.
    pub fn check_base(&self, base: &Model) -> Result<()> {
        let adapter = self;
        let weights = adapter.dir.join("adapter_model.safetensors");
        for (name, m) in &adapter.modules {
            let Ok(entry) = base.entry(name) else {
                return Err(Error::Adapter {
                    path: base.path.clone(),
                    name: name.clone(),
                    reason: format!(
                        "adapter {} targets module {} but the base model has no tensor {name}; \
                         is this the adapter's base model?",
                        adapter.dir.display(),
                        m.name
                    ),
                });
            };
            if !entry.dtype.is_float() {
                return Err(Error::Adapter {
                    path: base.path.clone(),
                    name: name.clone(),
                    reason: format!("has dtype {}; a LoRA target must be float", entry.dtype),
                });
            }
            if entry.shape != m.shape {
                return Err(Error::Adapter {
                    path: weights.clone(),
                    name: m.a.clone(),
                    reason: format!(
                        "the adapter's delta for {name} is {:?} but the base tensor is {:?}",
                        m.shape, entry.shape
                    ),
                });
            }
        }
        let resized = adapter.vocab_rows(base)?;
        for (name, saved) in &adapter.replaced {
            let saved_entry = adapter.file.entry(saved)?;
            // A whole LM head for a base whose head is tied to its embeddings unties them (PEFT
            // writes the head and sets tie_word_embeddings to false). A vocabulary matrix may
            // have other rows (a resized vocabulary, see `vocab_rows`).
            let fits = |n: &str| {
                base.entry(n).is_ok_and(|e| {
                    e.shape == saved_entry.shape
                        || (resized.is_some()
                            && crate::arch::is_vocabulary(name)
                            && e.shape.get(1..) == saved_entry.shape.get(1..))
                })
            };
            let shape_ok = fits(name)
                || (name == crate::arch::LM_HEAD
                    && !base.contains(name)
                    && fits(crate::arch::EMBED_TOKENS));
            if !shape_ok {
                return Err(Error::Adapter {
                    path: weights.clone(),
                    name: saved.clone(),
                    reason: format!(
                        "the adapter carries a whole {name} of shape {:?} that does not fit the base \
                         model (missing there, or of another width)",
                        saved_entry.shape
                    ),
                });
            }
        }
        if resized.is_some() {
            for (name, m) in &adapter.modules {
                if crate::arch::is_vocabulary(name) {
                    return Err(Error::Adapter {
                        path: weights.clone(),
                        name: m.a.clone(),
                        reason: format!(
                            "LoRA factors for {name} on top of a resized vocabulary: PEFT saves a \
                             resized embedding whole (modules_to_save)"
                        ),
                    });
                }
            }
        }
        for (name, bias) in &adapter.biases {
            let delta = adapter.file.entry(bias)?;
            let fits = base
                .entry(name)
                .is_ok_and(|e| e.shape == delta.shape && e.dtype.is_float());
            if !fits {
                return Err(Error::Adapter {
                    path: weights.clone(),
                    name: bias.clone(),
                    reason: format!(
                        "a bias delta of shape {:?} for {name}, which the base model lacks or has \
                         of another shape",
                        delta.shape
                    ),
                });
            }
        }
        Ok(())
    }

    /// The vocabulary size of an adapter that resized the vocabulary (added tokens, with
    /// `modules_to_save` holding the new embeddings and LM head): the rows of its saved
    /// vocabulary matrices when they differ from `base`'s. Every vocabulary matrix `base` has
    /// must then be saved with those rows (a tied head goes with the embeddings).
    pub fn vocab_rows(&self, base: &Model) -> Result<Option<usize>> {
        let weights = self.dir.join("adapter_model.safetensors");
        let mut rows = None;
        for (name, saved) in &self.replaced {
            if !crate::arch::is_vocabulary(name) {
                continue;
            }
            let (e, b) = (self.file.entry(saved)?, base.entry(name).ok());
            let base_rows = b.map(|b| b.shape[0]).or_else(|| {
                (name == crate::arch::LM_HEAD)
                    .then(|| {
                        base.entry(crate::arch::EMBED_TOKENS)
                            .ok()
                            .map(|b| b.shape[0])
                    })
                    .flatten()
            });
            if e.shape.is_empty() || base_rows == Some(e.shape[0]) {
                continue;
            }
            match rows {
                Some(r) if r != e.shape[0] => {
                    return Err(Error::Adapter {
                        path: weights,
                        name: saved.clone(),
                        reason: format!(
                            "{} rows, but another saved vocabulary matrix has {r}; a resized \
                             vocabulary must resize embeddings and LM head alike",
                            e.shape[0]
                        ),
                    });
                }
                _ => rows = Some(e.shape[0]),
            }
        }
        if let Some(r) = rows {
            for t in base.tensors() {
                if crate::arch::is_vocabulary(&t.name) && !self.replaced.contains_key(&t.name) {
                    return Err(Error::Adapter {
                        path: weights,
                        name: t.name.clone(),
                        reason: format!(
                            "the adapter resizes the vocabulary to {r} rows but does not save \
                             {} (add it to modules_to_save)",
                            t.name
                        ),
                    });
                }
            }
        }
        Ok(rows)
    }

    /// The directory holding this adapter's tokenizer (`tokenizer.json`), if it has one: an
    /// adapter that added tokens is saved with its tokenizer.
    pub fn tokenizer_dir(&self) -> Option<&Path> {
        self.dir
            .join("tokenizer.json")
            .is_file()
            .then_some(self.dir.as_path())
    }

    /// The factors of `m` decoded to f32: `(A, B)`.
    pub fn factors(&self, m: &Module) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.file.floats(&m.a)?, self.file.floats(&m.b)?))
    }

    /// The bias delta for base tensor `name` (`s·b`), if the adapter has one.
    pub fn bias_delta(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(tensor) = self.biases.get(name) else {
            return Ok(None);
        };
        let module = name.strip_suffix(".bias").map(|m| format!("{m}.weight"));
        let scaling = module
            .and_then(|m| self.modules.get(&m))
            .map_or(1.0, |m| m.scaling) as f32;
        let mut out = self.file.floats(tensor)?;
        out.iter_mut().for_each(|x| *x *= scaling);
        Ok(Some(out))
    }
}

impl Module {
    /// Rows `rows` of `scale·ΔW` added into `out` (row-major, `rows.len() × shape[1]`), from the
    /// decoded factors. `B·A` accumulates over the rank in f32, then is scaled, as PEFT does.
    pub fn add_delta_rows(
        &self,
        a: &[f32],
        b: &[f32],
        scale: f64,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        acc: &mut Vec<f32>,
    ) {
        let r = self.rank;
        let cols = self.shape[1];
        let s = (self.scaling * scale) as f32;
        acc.resize(cols, 0.0);
        for (row, dst) in rows.zip(out.chunks_exact_mut(cols)) {
            acc.fill(0.0);
            if self.transposed {
                // ΔW[i, j] = Σ_k B[j, k]·A[k, i]: row i reads column i of A.
                for k in 0..r {
                    let a_ki = a[k * self.shape[0] + row];
                    for (x, brow) in acc.iter_mut().zip(b.chunks_exact(r)) {
                        *x += brow[k] * a_ki;
                    }
                }
            } else {
                // ΔW[i, j] = Σ_k B[i, k]·A[k, j].
                for k in 0..r {
                    let b_ik = b[row * r + k];
                    for (x, &a_kj) in acc.iter_mut().zip(&a[k * cols..(k + 1) * cols]) {
                        *x += b_ik * a_kj;
                    }
                }
            }
            for (d, &x) in dst.iter_mut().zip(acc.iter()) {
                *d += x * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_map_to_modules() {
        assert_eq!(
            classify("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", true, false))
        );
        assert_eq!(
            classify("base_model.model.model.embed_tokens.lora_embedding_B"),
            Some(("model.embed_tokens", false, true))
        );
        assert_eq!(classify("base_model.model.lm_head.weight"), None);
        assert_eq!(classify("model.layers.0.q_proj.lora_A.weight"), None);
    }

    #[test]
    fn patterns_follow_peft() {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"o_proj": 3, "layers.1.mlp.down_proj": 2, "proj": 5}"#)
                .unwrap();
        let p = Path::new("adapter_config.json");
        let at = |m| pattern(p, &map, m).unwrap();
        assert_eq!(at("model.layers.0.self_attn.o_proj"), Some(3.0));
        assert_eq!(at("model.layers.1.mlp.down_proj"), Some(2.0));
        assert_eq!(at("model.layers.0.mlp.down_proj"), None);
        // A suffix match must start at a dot: `xo_proj` is not `o_proj`.
        assert_eq!(at("model.layers.0.self_attn.xo_proj"), None);
        // File order decides between overlapping patterns.
        assert_eq!(at("model.proj"), Some(5.0));
    }

    #[test]
    fn delta_rows_are_scaled_products() {
        // A: 2×3, B: 2×2 (out 2, in 3), s = 0.5.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.5, 2.0];
        let m = Module {
            name: "m".into(),
            a: String::new(),
            b: String::new(),
            rank: 2,
            scaling: 0.5,
            transposed: false,
            shape: [2, 3],
            bias: None,
        };
        let mut out = vec![0.0; 6];
        m.add_delta_rows(&a, &b, 1.0, 0..2, &mut out, &mut Vec::new());
        // B·A = [[1, 2, 3], [8.5, 11, 13.5]].
        assert_eq!(out, vec![0.5, 1.0, 1.5, 4.25, 5.5, 6.75]);
        // Transposed: ΔW = s·(B·A)ᵀ, 3×2; row 1 only.
        let t = Module {
            transposed: true,
            shape: [3, 2],
            ..m
        };
        let mut row = vec![0.0; 2];
        t.add_delta_rows(&a, &b, 2.0, 1..2, &mut row, &mut Vec::new());
        assert_eq!(row, vec![2.0, 11.0]);
    }
}
