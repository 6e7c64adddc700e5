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
    let alphabet = byte_alphabet();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A token outside the byte alphabet is respelled byte by byte; a repeated token keeps its
        // last id, as transformers' `{word: i for i, word in enumerate(tokens)}` does.
        let key = if spelled(t) {
            t.clone()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    // Control tokens become special added tokens (except one spelled outside the byte alphabet,
    // a llama.cpp mislabel transformers skips), user-defined ones plain added tokens.
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (t, ty))| (**ty == CONTROL && spelled(t)) || **ty == USER_DEFINED)
        .map(|(i, (t, ty))| {
            json!({
                "id": i,
                "content": t,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty == CONTROL,
            })
        })
        .collect();
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let bos = token_of("bos_token_id")?;
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let post_processor = match (&bos, add_bos) {
        (Some(bos), true) => {
            let special = |type_id: u32| json!({"SpecialToken": {"id": bos, "type_id": type_id}});
            json!({
                "type": "TemplateProcessing",
                "single": [special(0), seq("A", 0)],
                "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                "special_tokens": {bos.as_str(): {"id": bos, "ids": [id("bos_token_id")], "tokens": [bos]}},
            })
        }
        _ => json!({
            "type": "TemplateProcessing",
            "single": [seq("A", 0)],
            "pair": [seq("A", 0), seq("B", 1)],
            "special_tokens": {},
        }),
    };
    // The split the vocabulary's merges were learned with, named by `tokenizer.ggml.pre`;
    // without one, GPT-2's byte-level regex.
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str());
    let pre_tokenizer = match pre.and_then(split_regex) {
        Some(regex) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        }),
        None => json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        }),
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
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

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the others for 256, 257, ... in byte order.
fn byte_alphabet() -> Vec<char> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).expect("a Latin-1 character")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("a character below 512")
            }
        })
        .collect()
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for llama.cpp's `tokenizer.ggml.pre` name, as transformers 5.24 maps them
/// (`GGUF_PRE_TOKENIZER_SPLITS`).
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}
