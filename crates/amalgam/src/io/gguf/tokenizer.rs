//! `tokenizer.json` and `tokenizer_config.json` rebuilt from a GGUF file's `tokenizer.ggml.*`
//! metadata, as transformers' GGUF tokenizer converters build them.

use serde_json::{Map, Value as Json, json};

use super::Gguf;
use crate::error::Result;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer files of `g`, or `None` when it carries no tokenizer or one of a kind amalgam
/// does not rebuild (then the converted model has no tokenizer files).
pub fn build(g: &Gguf) -> Result<Option<(Json, Json)>> {
    let Some(kind) = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    if kind != "gpt2" {
        return Ok(None);
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let Some(v) = g.get(key) else {
            return Ok(Vec::new());
        };
        v.as_array()
            .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect())
            .ok_or_else(|| g.error(format!("metadata '{key}' is not an array of strings")))
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|t| t.as_i64()).collect())
            .ok_or_else(|| {
                g.error("metadata 'tokenizer.ggml.token_type' is not an integer array")
            })?,
    };
    if types.len() != tokens.len() {
        return Err(g.error(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let id = |k: &str| {
        g.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    let token_of = |k: &str| -> Result<Option<String>> {
        match id(k) {
            None => Ok(None),
            Some(i) => tokens.get(i).cloned().map(Some).ok_or_else(|| {
                g.error(format!(
                    "tokenizer.ggml.{k} is {i}, beyond the {} tokens",
                    tokens.len()
                ))
            }),
        }
    };
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A repeated token keeps its last id, as transformers' `{word: i for i, word in
        // enumerate(tokens)}` does.
        vocab.insert(t.clone(), json!(i));
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == CONTROL || **ty == USER_DEFINED)
        .map(|(i, (t, ty))| {
            json!({
                "id": i,
                "content": t,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": *ty != CONTROL,
                "special": *ty == CONTROL,
            })
        })
        .collect();
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let bos = token_of("bos_token_id")?;
    let post_processor = match (&bos, add_bos) {
        (Some(bos), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {bos.as_str(): {"id": bos, "ids": [id("bos_token_id")], "tokens": [bos]}},
        }),
        _ => json!({
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": false,
            "use_regex": true,
        }),
    };
    let add_prefix_space = g
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": add_prefix_space,
            "trim_offsets": true,
            "use_regex": true,
        },
        "post_processor": post_processor,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    for (k, key) in [
        ("bos_token_id", "bos_token"),
        ("eos_token_id", "eos_token"),
        ("unknown_token_id", "unk_token"),
        ("padding_token_id", "pad_token"),
    ] {
        if let Some(t) = token_of(k)? {
            cfg.insert(key.into(), json!(t));
        }
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        cfg.insert("chat_template".into(), json!(t));
    }
    Ok(Some((tokenizer, Json::Object(cfg))))
}
