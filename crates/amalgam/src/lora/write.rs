//! Writing PEFT adapter directories: `adapter_model.safetensors` and `adapter_config.json`.
//!
//! An adapter's tensors are produced module by module, in any order and on any thread, and
//! their ranks may only be known once each module's SVD is done (energy thresholds), while a
//! safetensors header must come first. So [`AdapterBuilder`] spills each tensor to an unnamed
//! temporary file next to the output as it arrives (the working set stays one module), then
//! writes the adapter through [`ModelWriter`] in one sequential copy: atomic, fsynced, never
//! half-written.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::io::writer::{check_target, parent_dir};
use crate::io::{Existing, ModelWriter, TensorSpec};

/// Bytes copied per step from the spill file to the adapter.
const COPY_STEP: usize = 16 << 20;

/// An adapter being assembled; see the module docs.
pub struct AdapterBuilder {
    target: PathBuf,
    existing: Existing,
    spill: File,
    spill_path: PathBuf,
    /// Bytes used in the spill file, and each tensor's spec and offset there.
    state: Mutex<(u64, Vec<(TensorSpec, u64)>)>,
}

impl AdapterBuilder {
    /// Start an adapter at `target` (checked now, so a refused output fails before any work).
    pub fn create(target: &Path, existing: Existing) -> Result<AdapterBuilder> {
        check_target(target, existing)?;
        let parent = parent_dir(target);
        std::fs::create_dir_all(&parent).at(&parent)?;
        let spill = tempfile::tempfile_in(&parent).at(&parent)?;
        Ok(AdapterBuilder {
            target: target.to_path_buf(),
            existing,
            spill,
            spill_path: parent,
            state: Mutex::new((0, Vec::new())),
        })
    }

    /// Add tensor `name` (`dtype`, `shape`) with its encoded `bytes`.
    pub fn put(&self, name: String, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<()> {
        let spec = TensorSpec { name, dtype, shape };
        if spec.nbytes() != Some(bytes.len() as u64) {
            return Err(Error::Output {
                path: self.target.clone(),
                reason: format!(
                    "tensor '{}' has {} bytes for shape {:?} {}",
                    spec.name,
                    bytes.len(),
                    spec.shape,
                    spec.dtype
                ),
            });
        }
        let offset = {
            let mut state = self.state.lock().expect("spill state");
            let offset = state.0;
            state.0 += bytes.len() as u64;
            state.1.push((spec, offset));
            offset
        };
        self.spill.write_all_at(bytes, offset).at(&self.spill_path)
    }

    /// Names of the tensors added so far.
    pub fn names(&self) -> Vec<String> {
        let state = self.state.lock().expect("spill state");
        state.1.iter().map(|(s, _)| s.name.clone()).collect()
    }

    /// Write the adapter: its tensors (sorted by name) and `config` as `adapter_config.json`,
    /// plus `side_files` (name, contents) in the same directory.
    pub fn finish(
        self,
        config: &serde_json::Value,
        side_files: &[(&str, String)],
    ) -> Result<PathBuf> {
        let (_, mut tensors) = self.state.into_inner().expect("spill state");
        tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
        let writer =
            ModelWriter::create_named(&self.target, specs, None, self.existing, "adapter_model")?;
        let mut buf = Vec::new();
        for (i, (spec, offset)) in tensors.iter().enumerate() {
            crate::cancel::check()?;
            let len = spec.nbytes().expect("checked in put") as usize;
            for start in (0..len).step_by(COPY_STEP) {
                let n = COPY_STEP.min(len - start);
                buf.resize(n, 0);
                self.spill
                    .read_exact_at(&mut buf, offset + start as u64)
                    .at(&self.spill_path)?;
                writer.write_part(i, start as u64, &buf)?;
            }
            if len == 0 {
                writer.write(i, &[])?;
            }
        }
        let staging = writer.staging_dir().to_path_buf();
        let text = serde_json::to_string_pretty(config).expect("json") + "\n";
        let files = std::iter::once(("adapter_config.json", text)).chain(
            side_files
                .iter()
                .map(|(name, contents)| (*name, contents.clone())),
        );
        for (name, contents) in files {
            let path = staging.join(name);
            std::fs::write(&path, contents).at(&path)?;
        }
        writer.finish()
    }
}

/// PEFT's `adapter_config.json` for a LoRA adapter whose scalings are folded into the factors
/// (`lora_alpha = r`, so `s = 1`, as PEFT's `add_weighted_adapter` and mergekit-extract-lora
/// write them). `r` is the largest rank; modules of another rank get `rank_pattern` and
/// `alpha_pattern` entries under their full module name. `template` (another adapter's config)
/// supplies the fields amalgam does not set, as PEFT copies the first adapter's config.
pub fn folded_config(
    template: Option<&serde_json::Value>,
    base_model: Option<&str>,
    ranks: &BTreeMap<String, usize>,
    modules_to_save: &[String],
    lora_bias: bool,
) -> serde_json::Value {
    let r = ranks.values().copied().max().unwrap_or(0);
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, k)| **k != r)
        .map(|(m, &k)| (m.clone(), k.into()))
        .collect();
    let mut targets: Vec<&str> = ranks
        .keys()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let mut config = match template {
        Some(serde_json::Value::Object(map)) => map.clone(),
        _ => serde_json::Map::from_iter([
            ("peft_type".to_string(), "LORA".into()),
            ("lora_dropout".to_string(), 0.0.into()),
            ("fan_in_fan_out".to_string(), false.into()),
            ("bias".to_string(), "none".into()),
            ("inference_mode".to_string(), true.into()),
            ("init_lora_weights".to_string(), true.into()),
        ]),
    };
    let saved = (!modules_to_save.is_empty()).then(|| serde_json::json!(modules_to_save));
    for (key, value) in [
        ("r", r.into()),
        ("lora_alpha", r.into()),
        ("use_rslora", false.into()),
        ("rank_pattern", pattern.clone().into()),
        ("alpha_pattern", pattern.into()),
        ("target_modules", serde_json::json!(targets)),
        ("modules_to_save", saved.unwrap_or(serde_json::Value::Null)),
        ("lora_bias", lora_bias.into()),
        ("use_dora", false.into()),
    ] {
        config.insert(key.to_string(), value);
    }
    if let Some(base) = base_model {
        config.insert("base_model_name_or_path".into(), base.into());
    }
    serde_json::Value::Object(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_config_patterns_the_odd_ranks() {
        let ranks = BTreeMap::from([
            ("model.layers.0.self_attn.q_proj".to_string(), 8),
            ("model.layers.0.mlp.down_proj".to_string(), 3),
            ("model.layers.1.self_attn.q_proj".to_string(), 8),
        ]);
        let c = folded_config(None, Some("base"), &ranks, &[], false);
        assert_eq!(c["r"], 8);
        assert_eq!(c["lora_alpha"], 8);
        assert_eq!(
            c["rank_pattern"],
            serde_json::json!({"model.layers.0.mlp.down_proj": 3})
        );
        assert_eq!(c["alpha_pattern"], c["rank_pattern"]);
        assert_eq!(
            c["target_modules"],
            serde_json::json!(["down_proj", "q_proj"])
        );
        assert_eq!(c["modules_to_save"], serde_json::Value::Null);
        assert_eq!(c["peft_type"], "LORA");
    }

    #[test]
    fn spilled_tensors_come_back_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let b = AdapterBuilder::create(&out, Existing::Refuse).unwrap();
        let two: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let one: Vec<u8> = 3.0f32.to_le_bytes().to_vec();
        b.put("z".into(), DType::F32, vec![2], &two).unwrap();
        b.put("a".into(), DType::F32, vec![1, 1], &one).unwrap();
        assert!(b.put("bad".into(), DType::F32, vec![3], &one).is_err());
        b.finish(&serde_json::json!({"r": 1}), &[]).unwrap();
        let m = crate::io::Model::open(out.join("adapter_model.safetensors")).unwrap();
        let names: Vec<_> = m.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "z"]);
        assert_eq!(m.tensor("z").unwrap().bytes, &two[..]);
        let cfg = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
        assert!(cfg.contains("\"r\": 1"));
    }
}
