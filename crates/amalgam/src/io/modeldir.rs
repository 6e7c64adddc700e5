//! The side files of a Hugging Face model directory: config, generation config, tokenizer.
//! Copied from the right source model into the output; their absence is not an error.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{IoContext, Result};

/// The files a loadable model directory carries besides its weights.
pub const CONFIG_FILES: &[&str] = &["config.json", "generation_config.json"];

/// Tokenizer files, copied together from one source.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Copy those of `names` that exist in `from` into `to`. Returns the names copied.
pub fn copy_present(from: &Path, to: &Path, names: &[&str]) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in names {
        let src = from.join(name);
        if src.is_file() {
            let dst = to.join(name);
            std::fs::copy(&src, &dst).at(&src)?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// Copy `config.json` from `from` to `to`, setting `torch_dtype` to `dtype` (as transformers and
/// mergekit do) when given. A config that is not valid JSON is copied unchanged.
pub fn copy_config(from: &Path, to: &Path, dtype: Option<DType>) -> Result<bool> {
    let src = from.join("config.json");
    if !src.is_file() {
        return Ok(false);
    }
    let text = std::fs::read(&src).at(&src)?;
    let dst = to.join("config.json");
    let updated = dtype.and_then(DType::torch_name).and_then(|name| {
        let mut v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let obj = v.as_object_mut()?;
        obj.insert("torch_dtype".into(), name.into());
        serde_json::to_vec_pretty(&v).ok()
    });
    std::fs::write(&dst, updated.as_deref().unwrap_or(&text)).at(&dst)?;
    Ok(true)
}

/// Set `key` to `value` in `dir/config.json`, if there is one and it is a JSON object.
pub fn set_config_field(dir: &Path, key: &str, value: serde_json::Value) -> Result<()> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read(&path) else {
        return Ok(());
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return Ok(());
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert(key.into(), value);
        let out = serde_json::to_vec_pretty(&v).expect("json");
        std::fs::write(&path, out).at(&path)?;
    }
    Ok(())
}

/// Copy the standard side files of `from` (config with `dtype`, generation config, tokenizer).
pub fn copy_side_files(from: &Path, to: &Path, dtype: Option<DType>) -> Result<()> {
    copy_config(from, to, dtype)?;
    copy_present(from, to, &CONFIG_FILES[1..])?;
    copy_present(from, to, TOKENIZER_FILES)?;
    Ok(())
}
