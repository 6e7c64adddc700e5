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
    let arch = g.get("general.architecture").and_then(|v| v.as_str());
    // transformers builds Gemma's and Phi-3's SentencePiece tokenizers its own way; amalgam
    // rebuilds the byte-level BPE (`gpt2`) and the other SentencePiece (`llama`) ones.
    let sentencepiece = match (kind, arch) {
        ("gpt2", _) => false,
        ("llama", Some("gemma" | "gemma2" | "gemma3" | "phi3")) => return Ok(None),
        ("llama", _) => true,
        _ => return Ok(None),
    };
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
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        // transformers: a SentencePiece file without the flag adds BOS, as llama.cpp does.
        .unwrap_or(sentencepiece);
    let add_eos = g
        .get("tokenizer.ggml.add_eos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let bos = token_of("bos_token_id")?;
    let eos = token_of("eos_token_id")?;
    let post_processor = template(
        bos.as_deref().filter(|_| add_bos).zip(id("bos_token_id")),
        eos.as_deref()
            .filter(|_| add_eos && sentencepiece)
            .zip(id("eos_token_id")),
    );
    let tokenizer = if sentencepiece {
        let scores: Vec<f64> = match g.get("tokenizer.ggml.scores") {
            None => vec![0.0; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|t| t.as_f64()).collect())
                .ok_or_else(|| g.error("metadata 'tokenizer.ggml.scores' is not a float array"))?,
        };
        if scores.len() != tokens.len() {
            return Err(g.error(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let mut t = sentencepiece_tokenizer(&tokens, &types, &scores, &merges, post_processor);
        // transformers applies a known `tokenizer.ggml.pre` split to any tokenizer type.
        if let Some(regex) = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .and_then(split_regex)
        {
            t["pre_tokenizer"] = split_pre_tokenizer(regex);
        }
        t
    } else {
        byte_level_tokenizer(g, &tokens, &types, &merges, post_processor)
    };
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    if sentencepiece {
        cfg.insert("add_eos_token".into(), json!(add_eos));
    }
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

/// `{"type": "TemplateProcessing", ...}`: BOS before each sequence and EOS after, when given
/// (transformers' `update_post_processor`).
fn template(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Json {
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let (mut single, mut pair) = (Vec::new(), Vec::new());
    let mut specials = Map::new();
    for (part, type_id) in [("A", 0), ("B", 1)] {
        if let Some((t, _)) = bos {
            if part == "A" {
                single.push(special(t, 0));
            }
            pair.push(special(t, type_id));
        }
        if part == "A" {
            single.push(seq("A", 0));
        }
        pair.push(seq(part, type_id));
        if let Some((t, _)) = eos {
            if part == "A" {
                single.push(special(t, 0));
            }
            pair.push(special(t, type_id));
        }
    }
    for (t, i) in bos.into_iter().chain(eos) {
        specials.insert(t.into(), json!({"id": t, "ids": [i], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// A merge as the file writes it (`"a b"`) as tokenizers writes it (`["a", "b"]`).
fn merge_pair(m: &str) -> Json {
    let (l, r) = m.split_once(' ').unwrap_or((m, ""));
    json!([l, r])
}

/// transformers' `set_split_regex`: the named split, then byte-level mapping.
fn split_pre_tokenizer(regex: &str) -> Json {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ],
    })
}

/// transformers' `byte_level_tokenizer` (GPT2Tokenizer over the file's vocabulary and merges).
fn byte_level_tokenizer(
    g: &Gguf,
    tokens: &[String],
    types: &[i64],
    merges: &[String],
    post_processor: Json,
) -> Json {
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
        .zip(types)
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
    // The split the vocabulary's merges were learned with, named by `tokenizer.ggml.pre`;
    // without one, GPT-2's byte-level regex.
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str());
    let pre_tokenizer = match pre.and_then(split_regex) {
        Some(regex) => split_pre_tokenizer(regex),
        None => json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        }),
    };
    json!({
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
            "merges": merges.iter().map(|m| merge_pair(m)).collect::<Vec<_>>(),
        },
    })
}

/// transformers' `sentencepiece_tokenizer`: LlamaTokenizer over the file's vocabulary, with the
/// merges the file gives or the ones its scores imply ([`generate_merges`]); byte fallback,
/// Metaspace (`▁`, prepended to the start of the input only: `prepend_scheme: first`; the
/// file's `add_space_prefix` is ignored, as transformers ignores it), and as added tokens
/// `<unk>`, `<s>`, `</s>` (LlamaTokenizer's own, appended if the vocabulary lacks them) and the
/// control (special) and user-defined (plain) tokens.
fn sentencepiece_tokenizer(
    tokens: &[String],
    types: &[i64],
    scores: &[f64],
    merges: &[String],
    post_processor: Json,
) -> Json {
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let merges: Vec<Json> = if merges.is_empty() {
        generate_merges(tokens, scores)
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect()
    } else {
        merges.iter().map(|m| merge_pair(m)).collect()
    };
    let flags = |id: usize, t: &str, special: bool| {
        json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": special})
    };
    let mut added: Vec<(usize, Json)> = Vec::new();
    let mut next = tokens.len();
    let mut seen = std::collections::HashSet::new();
    for t in ["<unk>", "<s>", "</s>"] {
        let id = match vocab.get(t).and_then(|v| v.as_u64()) {
            Some(i) => i as usize,
            None => {
                next += 1;
                next - 1
            }
        };
        seen.insert(id);
        added.push((id, flags(id, t, true)));
    }
    for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
        if (*ty == CONTROL || *ty == USER_DEFINED) && seen.insert(i) {
            added.push((i, flags(i, t, *ty == CONTROL)));
        }
    }
    added.sort_by_key(|(i, _)| *i);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_iter().map(|(_, a)| a).collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    })
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

/// The BPE merges transformers derives from a SentencePiece vocabulary without merges
/// (`tokenization_utils_base.generate_merges` with the file's scores): every split of a token
/// into two tokens of the vocabulary, per token by the two halves' ids, then all of them by
/// score, left length and right length, descending, ties in that order.
fn generate_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    // `{token: index}`: a repeated token keeps its last id.
    let vocab: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // `dict(zip(tokens, scores))`: first-seen order, last score.
    let mut order: Vec<&str> = Vec::new();
    let mut score: HashMap<&str, f64> = HashMap::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for t in order {
        let s = score[t];
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| t.split_at(i))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, s))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        // As numbers (-0.0 ties with 0.0, as in Python).
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| chars(b.0).cmp(&chars(a.0)))
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::generate_merges;

    #[test]
    fn merges_follow_scores_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .map(String::from)
            .to_vec();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = generate_merges(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        // "ab" (-1) first; then "bc" (-2); then "abc"'s splits (-3): "ab"+"c" (left 2) before
        // "a"+"bc" (left 1).
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
