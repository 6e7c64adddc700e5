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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::decode_f32;
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
    /// Modules saved whole (not supported).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model the adapter was trained on (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
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
    /// Base weights the adapter carries (PEFT saves embedding layers it adapts as
    /// `<module>.base_layer.weight`, and loading the adapter puts them in the model): adapter
    /// tensor name by base tensor name.
    pub base_layers: BTreeMap<String, String>,
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
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(t) = &config.peft_type
            && t != "LORA"
        {
            return Err(bad(
                &dir,
                format!("peft_type {t} is not supported (only LORA)"),
            ));
        }
        if config.use_dora {
            return Err(bad(&dir, "DoRA adapters (use_dora) are not supported yet"));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(
                &dir,
                "adapters with modules_to_save are not supported yet",
            ));
        }
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
        let mut factors: BTreeMap<&str, [Option<&str>; 2]> = BTreeMap::new();
        let mut embedding: BTreeMap<&str, bool> = BTreeMap::new();
        let mut base_layers = BTreeMap::new();
        for t in file.tensors() {
            if let Some(module) = t
                .name
                .strip_prefix("base_model.model.")
                .and_then(|n| n.strip_suffix(".base_layer.weight"))
            {
                base_layers.insert(format!("{module}.weight"), t.name.clone());
                continue;
            }
            let Some((module, is_a, emb)) = classify(&t.name) else {
                return Err(Error::Adapter {
                    path: weights.clone(),
                    name: t.name.clone(),
                    reason: "not a LoRA factor (lora_A/lora_B/lora_embedding_A/B under \
                             base_model.model.); bias, DoRA and saved modules are not supported yet"
                        .into(),
                });
            };
            factors.entry(module).or_default()[usize::from(!is_a)] = Some(&t.name);
            embedding.insert(module, emb);
        }
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
                },
            );
        }
        if modules.is_empty() {
            return Err(bad(&dir, "the adapter has no LoRA factors"));
        }
        Ok(Adapter {
            dir,
            config,
            file,
            modules,
            base_layers,
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
        for (name, layer) in &adapter.base_layers {
            let saved = adapter.file.entry(layer)?;
            let shape_ok = base.entry(name).is_ok_and(|e| e.shape == saved.shape);
            if !shape_ok {
                return Err(Error::Adapter {
                    path: weights.clone(),
                    name: layer.clone(),
                    reason: format!(
                        "the adapter carries a base layer for {name} of shape {:?} that does not fit \
                         the base model (resized vocabularies are not supported yet)",
                        saved.shape
                    ),
                });
            }
        }
        Ok(())
    }

    /// The factors of `m` decoded to f32: `(A, B)`.
    pub fn factors(&self, m: &Module) -> Result<(Vec<f32>, Vec<f32>)> {
        let decode = |name: &str| -> Result<Vec<f32>> {
            let v = self.file.tensor(name)?;
            let mut out = Vec::new();
            decode_f32(v.dtype, v.bytes, &mut out);
            Ok(out)
        };
        Ok((decode(&m.a)?, decode(&m.b)?))
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
