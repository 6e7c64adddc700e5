//! Tokens as mergekit's tokensurgeon compares them (`mergekit/tokenizer/normalization.py`): a
//! token that starts with its tokenizer's word-start marker (`Ġ` for byte-level BPE, `▁` for
//! SentencePiece) is keyed by the text after it, so `Ġfoo` and `▁foo` are the same token; a
//! named special token (bos, eos, unk, sep, pad, cls, mask) is keyed by its role, so one
//! model's `<s>` and another's `<|begin_of_text|>` are the same token; anything else by its text.
//! Plus the byte and prefix matches tried for a token the model lacks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::vocab::Tokenizer;

/// The named special-token roles, in the order mergekit matches them.
pub const ROLES: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A token as compared across vocabularies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A token that starts a word: the text after the marker.
    WordStart(String),
    /// A named special token: its role (`bos_token`, ...).
    Special(&'static str),
    /// Any other token, as stored.
    Raw(String),
}

impl Key {
    /// The text mergekit re-tokenizes for this token (`unnormalize_token`): a space and the
    /// text for a word start, the role's name for a special token, else the token.
    pub fn text(&self) -> String {
        match self {
            Key::WordStart(s) => format!(" {s}"),
            Key::Special(role) => role.to_string(),
            Key::Raw(s) => s.clone(),
        }
    }
}

/// One model's vocabulary, normalised.
#[derive(Debug)]
pub struct Vocab {
    /// The model directory.
    pub dir: PathBuf,
    /// Key → token id.
    pub ids: HashMap<Key, u32>,
    /// The word-start marker used.
    pub marker: char,
    /// How the marker was chosen, for the report.
    pub marker_reason: String,
}

/// Classes transformers maps to byte-level BPE (their `Fast` names are aliases).
const BYTE_LEVEL_CLASSES: &[&str] = &["GPT2Tokenizer", "OpenAIGPTTokenizer", "Qwen2Tokenizer"];
/// Classes transformers maps to SentencePiece-style tokenizers.
const METASPACE_CLASSES: &[&str] = &["LlamaTokenizer", "T5Tokenizer", "GemmaTokenizer"];

/// A JSON file, `None` when absent.
pub(crate) fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })
}

/// A special token's text as tokenizer configs store it: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Vocab {
    /// Read the tokenizer of model directory `dir` (`tokenizer.json`, with
    /// `tokenizer_config.json` and `special_tokens_map.json` for the class and special tokens).
    pub fn open(dir: &Path) -> Result<Vocab> {
        let tokenizer = Tokenizer::of_model(dir)?.ok_or_else(|| Error::NotAModel {
            path: dir.to_path_buf(),
            reason: "no tokenizer.json: tokensurgeon needs both models' tokenizers (the \
                     Hugging Face tokenizers format)"
                .into(),
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let mut named: Vec<(&'static str, String)> = Vec::new();
        for role in ROLES {
            let from = |v: &Option<Value>| v.as_ref().and_then(|c| c.get(*role)).cloned();
            // tokenizer_config.json first (an explicit null there means none), then the map.
            let text = match from(&config) {
                Some(v) => token_text(&v),
                None => from(&map).as_ref().and_then(token_text),
            };
            if let Some(t) = text {
                named.push((role, t));
            }
        }
        let vocab = tokenizer.vocab_by_id();
        let named_class = config
            .as_ref()
            .and_then(|c| c.get("tokenizer_class"))
            .and_then(Value::as_str);
        let class = named_class.map(|c| c.strip_suffix("Fast").unwrap_or(c));
        let (marker, marker_reason) = match class {
            Some(c) if BYTE_LEVEL_CLASSES.contains(&c) => ('Ġ', format!("class {c}")),
            Some(c) if METASPACE_CLASSES.contains(&c) => {
                if vocab.iter().any(|(t, _)| t == "Ġhello") {
                    ('Ġ', format!("class {c}, but its vocabulary has 'Ġhello'"))
                } else {
                    ('▁', format!("class {c}"))
                }
            }
            // mergekit assumes `Ġ` for any other class; amalgam reads the pipeline instead,
            // so a SentencePiece tokenizer saved under a generic class keeps its marker.
            other => {
                let metaspace = ["normalizer", "pre_tokenizer"].iter().any(|k| {
                    tokenizer.json().get(*k).is_some_and(|v| {
                        v.to_string().contains("Metaspace") || v.to_string().contains('▁')
                    })
                });
                let what = named_class
                    .filter(|_| other.is_some())
                    .map_or("no tokenizer_class".to_string(), |c| format!("class {c}"));
                if metaspace {
                    ('▁', format!("{what}, Metaspace pipeline"))
                } else {
                    ('Ġ', format!("{what}, no Metaspace in its pipeline"))
                }
            }
        };
        let mut ids = HashMap::with_capacity(vocab.len());
        for (token, id) in vocab {
            // Two tokens with one key: the one with the higher id is kept (mergekit keeps the
            // last in hash order, which varies from run to run).
            ids.insert(normalize(&token, marker, &named), id);
        }
        Ok(Vocab {
            dir: dir.to_path_buf(),
            ids,
            marker,
            marker_reason,
        })
    }

    /// Entries by id (ties by key), the deterministic order every pass walks.
    pub fn by_id(&self) -> Vec<(&Key, u32)> {
        let mut v: Vec<(&Key, u32)> = self.ids.iter().map(|(k, &i)| (k, i)).collect();
        v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
        v
    }
}

/// mergekit's `normalize_token`.
fn normalize(token: &str, marker: char, named: &[(&'static str, String)]) -> Key {
    if let Some(rest) = token.strip_prefix(marker) {
        return Key::WordStart(rest.to_string());
    }
    match named.iter().find(|(_, t)| t == token) {
        Some((role, _)) => Key::Special(role),
        None => Key::Raw(token.to_string()),
    }
}

/// Python's `str.isspace` (Rust's `char::is_whitespace` lacks the four separators U+001C–U+001F).
fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// mergekit's `match_byte_token`: a one-character token below U+0100 takes the row of the
/// byte token `<0xNN>`, and a byte token `<0xNN>` the row of the character U+00NN.
pub fn byte_match(key: &Key, ids: &HashMap<Key, u32>) -> Option<u32> {
    let Key::Raw(s) = key else { return None };
    let mut chars = s.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        if (c as u32) < 256 {
            return ids.get(&Key::Raw(format!("<0x{:02X}>", c as u32))).copied();
        }
        return None;
    }
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    if s.chars().count() != 6 {
        return None;
    }
    let b = u8::from_str_radix(hex, 16).ok()?;
    ids.get(&Key::Raw(char::from(b).to_string())).copied()
}

/// mergekit's `match_prefix`: the longest proper prefix of the token's text (a word start
/// keeps its marker) the model has, stopping at the first prefix that is only whitespace.
/// Special tokens have no prefixes.
pub fn prefix_match(key: &Key, ids: &HashMap<Key, u32>) -> Option<u32> {
    let (s, word_start) = match key {
        Key::WordStart(s) => (s, true),
        Key::Raw(s) => (s, false),
        Key::Special(_) => return None,
    };
    let ends: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(1).collect();
    for &end in ends.iter().rev() {
        let pre = &s[..end];
        if pre.chars().all(is_space) {
            return None;
        }
        let k = if word_start {
            Key::WordStart(pre.to_string())
        } else {
            Key::Raw(pre.to_string())
        };
        if let Some(&id) = ids.get(&k) {
            return Some(id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(keys: &[(Key, u32)]) -> HashMap<Key, u32> {
        keys.iter().cloned().collect()
    }

    #[test]
    fn normalisation_follows_mergekit() {
        let named = vec![
            ("bos_token", "<s>".to_string()),
            ("eos_token", "</s>".to_string()),
        ];
        assert_eq!(normalize("Ġfoo", 'Ġ', &named), Key::WordStart("foo".into()));
        assert_eq!(normalize("Ġ", 'Ġ', &named), Key::WordStart(String::new()));
        assert_eq!(normalize("▁foo", 'Ġ', &named), Key::Raw("▁foo".into()));
        assert_eq!(normalize("<s>", 'Ġ', &named), Key::Special("bos_token"));
        assert_eq!(normalize("<pad>", 'Ġ', &named), Key::Raw("<pad>".into()));
        assert_eq!(Key::Special("bos_token").text(), "bos_token");
        assert_eq!(Key::WordStart("a".into()).text(), " a");
    }

    #[test]
    fn byte_tokens_match_characters_both_ways() {
        let v = ids(&[(Key::Raw("<0x61>".into()), 7), (Key::Raw("é".into()), 9)]);
        assert_eq!(byte_match(&Key::Raw("a".into()), &v), Some(7));
        assert_eq!(byte_match(&Key::Raw("<0xE9>".into()), &v), Some(9));
        assert_eq!(byte_match(&Key::Raw("<0xZZ>".into()), &v), None);
        assert_eq!(byte_match(&Key::Raw("ab".into()), &v), None);
        assert_eq!(byte_match(&Key::WordStart("a".into()), &v), None);
    }

    #[test]
    fn prefixes_are_longest_first_and_stop_at_whitespace() {
        let v = ids(&[
            (Key::WordStart("to".into()), 1),
            (Key::WordStart("tok".into()), 2),
            (Key::Raw("a".into()), 3),
        ]);
        assert_eq!(prefix_match(&Key::WordStart("token".into()), &v), Some(2));
        assert_eq!(prefix_match(&Key::WordStart("tok".into()), &v), Some(1));
        assert_eq!(prefix_match(&Key::Raw("tok".into()), &v), None);
        // " a..." stops at the whitespace prefix " " before reaching "a".
        assert_eq!(prefix_match(&Key::Raw(" ab".into()), &v), None);
        assert_eq!(prefix_match(&Key::Raw("ab".into()), &v), Some(3));
        assert_eq!(prefix_match(&Key::Special("bos_token"), &v), None);
    }
}
