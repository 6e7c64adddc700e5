//! Tokenization as the model's `tokenizer.json` says, truncated at a maximum length (special
//! tokens included, as transformers counts them) and right-padded per batch.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// A loaded tokenizer with the evaluation's truncation.
pub struct Tok {
    inner: Tokenizer,
    path: PathBuf,
}

/// A right-padded batch.
pub struct Batch {
    /// Token ids `[batch, seq]` (u32).
    pub ids: Tensor,
    /// Token type ids `[batch, seq]` (u32).
    pub type_ids: Tensor,
    /// Attention mask `[batch, seq]` (f32: 1 token, 0 padding).
    pub mask: Tensor,
    /// Tokens per row, before padding.
    pub lengths: Vec<usize>,
}

impl Tok {
    /// Load `dir/tokenizer.json`; inputs are truncated to `max_len` tokens. The file's own
    /// padding setting is dropped (batches are padded to their longest row) and its truncation
    /// replaced by `max_len`.
    pub fn load(dir: &Path, max_len: usize) -> Result<Tok> {
        let path = dir.join("tokenizer.json");
        let err = |reason: String| Error::Tokenizer {
            path: path.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(err(
                "not found; evaluation tokenizes with the model's tokenizer.json (copy it from \
                 the base model's folder)"
                    .into(),
            ));
        }
        let mut inner =
            Tokenizer::from_file(&path).map_err(|e| err(format!("cannot load: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| err(format!("cannot truncate at {max_len}: {e}")))?;
        Ok(Tok { inner, path })
    }

    /// Token ids, type ids and length of each text (special tokens added as the file says).
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        Ok(self
            .encodings(texts, true)?
            .into_iter()
            .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
            .collect())
    }

    /// Token ids of each text without the special tokens the file's post-processor adds
    /// (transformers' `add_special_tokens=False`).
    pub fn encode_plain(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .encodings(texts, false)?
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    fn encodings(&self, texts: &[&str], special: bool) -> Result<Vec<tokenizers::Encoding>> {
        self.inner
            .encode_batch_fast(texts.to_vec(), special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot tokenize: {e}"),
            })
    }

    /// The id of special token `key` (`bos_token`, `eos_token`, `pad_token`) as the folder's
    /// `tokenizer_config.json` names it (a string or `{"content": ...}`), if it names one that
    /// the vocabulary has.
    pub fn special(&self, key: &str) -> Option<u32> {
        let dir = self.path.parent()?;
        let text = std::fs::read(dir.join("tokenizer_config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let tok = match v.get(key)? {
            serde_json::Value::String(s) => s.clone(),
            other => other.get("content")?.as_str()?.to_string(),
        };
        self.inner.token_to_id(&tok)
    }

    /// The tokenizer file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id padding uses (the file's pad token, else 0). Padded positions are masked, so the
    /// value only has to be a valid index.
    pub fn pad_id(&self) -> u32 {
        ["[PAD]", "<pad>", "<|endoftext|>"]
            .iter()
            .find_map(|t| self.inner.token_to_id(t))
            .unwrap_or(0)
    }
}

/// Right-pad `rows` (ids, type ids) into one batch.
pub fn pad(rows: &[&(Vec<u32>, Vec<u32>)], pad_id: u32, device: &Device) -> Result<Batch> {
    let b = rows.len();
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut types = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for (i, (row_ids, row_types)) in rows.iter().map(|r| (&r.0, &r.1)).enumerate() {
        ids[i * t..i * t + row_ids.len()].copy_from_slice(row_ids);
        types[i * t..i * t + row_types.len()].copy_from_slice(row_types);
        mask[i * t..i * t + row_ids.len()].fill(1.0);
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        type_ids: Tensor::from_vec(types, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        lengths: rows.iter().map(|r| r.0.len()).collect(),
    })
}
