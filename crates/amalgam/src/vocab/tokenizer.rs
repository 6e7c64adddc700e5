//! A `tokenizer.json` (the Hugging Face `tokenizers` format) as data: its vocabulary as the
//! library's `get_vocab()` gives it (the model's tokens, then the added tokens over them), its
//! added tokens, mergekit's stripping of ids past a model's `vocab_size` (BPE only, as there),
//! and adding tokens with the library's id rule. Everything else in the file is kept as it is.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, IoContext, Result};

/// One added token: its id, content and flags (`single_word`, `lstrip`, `rstrip`,
/// `normalized`, `special`), as the file stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct Added {
    /// Its id.
    pub id: u32,
    /// Its text.
    pub content: String,
    /// The flags object (without `id` and `content`).
    pub flags: Map<String, Value>,
}

impl Added {
    /// The flags `tokenizers` gives a token added as a plain string: normalized, not special.
    pub fn plain_flags() -> Map<String, Value> {
        let mut m = Map::new();
        for (k, v) in [
            ("single_word", false),
            ("lstrip", false),
            ("rstrip", false),
            ("normalized", true),
            ("special", false),
        ] {
            m.insert(k.into(), v.into());
        }
        m
    }

    /// Whether it is a special token.
    pub fn special(&self) -> bool {
        self.flags.get("special").and_then(Value::as_bool) == Some(true)
    }
}

/// A parsed tokenizer.json.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// The file it was read from.
    pub path: PathBuf,
    json: Value,
    /// The model's tokens with their ids (the `model.vocab` entries).
    model: Vec<(String, u32)>,
    /// Added tokens, by id.
    added: Vec<Added>,
    /// Lookups: the model's tokens by content, the added tokens' contents.
    model_ids: HashMap<String, u32>,
    added_contents: HashSet<String>,
    /// Whether `model.vocab` and `model.merges` must be written back (after stripping).
    stripped: bool,
}

impl Tokenizer {
    /// The tokenizer.json of a model directory, if it has one.
    pub fn of_model(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        Tokenizer::open(&path).map(Some)
    }

    /// Read `path`.
    pub fn open(path: &Path) -> Result<Tokenizer> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).at(path)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a tokenizer.json (JSON error: {e})")))?;
        let model_obj = json
            .get("model")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no 'model' object: not a tokenizers tokenizer.json".into()))?;
        let mut model = Vec::new();
        match model_obj.get("vocab") {
            Some(Value::Object(map)) => {
                for (tok, id) in map {
                    let id = id
                        .as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| bad(format!("vocab entry '{tok}' has id {id}")))?;
                    model.push((tok.clone(), id));
                }
            }
            // Unigram: a list of [piece, score], the id being the position.
            Some(Value::Array(list)) => {
                for (i, e) in list.iter().enumerate() {
                    let tok = e
                        .get(0)
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("vocab entry {i} is not [piece, score]")))?;
                    model.push((tok.to_string(), i as u32));
                }
            }
            _ => return Err(bad("model has no 'vocab'".into())),
        }
        model.sort_by_key(|(_, id)| *id);
        let mut added = Vec::new();
        for (i, e) in json
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mut flags = e
                .as_object()
                .cloned()
                .ok_or_else(|| bad(format!("added_tokens[{i}] is not an object")))?;
            let id = flags
                .remove("id")
                .and_then(|v| v.as_u64())
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| bad(format!("added_tokens[{i}] has no valid id")))?;
            let content = match flags.remove("content") {
                Some(Value::String(s)) => s,
                _ => return Err(bad(format!("added_tokens[{i}] has no content"))),
            };
            added.push(Added { id, content, flags });
        }
        added.sort_by_key(|a| a.id);
        let mut t = Tokenizer {
            path: path.to_path_buf(),
            json,
            model,
            added,
            model_ids: HashMap::new(),
            added_contents: HashSet::new(),
            stripped: false,
        };
        t.index();
        Ok(t)
    }

    /// Rebuild the lookups from `model` and `added`.
    fn index(&mut self) {
        self.model_ids = self.model.iter().cloned().collect();
        self.added_contents = self.added.iter().map(|a| a.content.clone()).collect();
    }

    /// The whole file as parsed.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The model type (`BPE`, `Unigram`, `WordPiece`, `WordLevel`).
    pub fn kind(&self) -> &str {
        self.json
            .pointer("/model/type")
            .and_then(Value::as_str)
            .unwrap_or("BPE")
    }

    /// Token → id over the model's tokens and the added tokens (an added token's id wins).
    pub fn vocab(&self) -> HashMap<String, u32> {
        let mut v: HashMap<String, u32> = self.model.iter().cloned().collect();
        for a in &self.added {
            v.insert(a.content.clone(), a.id);
        }
        v
    }

    /// Every (token, id) of [`vocab`](Self::vocab), by id (ties: model token first).
    pub fn vocab_by_id(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self.vocab().into_iter().collect();
        v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// The added tokens, by id.
    pub fn added(&self) -> &[Added] {
        &self.added
    }

    /// Drop every token whose id is `vocab_size` or more (mergekit's stripped tokenizer: the
    /// model has no rows for them). Only BPE tokenizers can be stripped, as in mergekit.
    pub fn strip(&mut self, vocab_size: usize) -> Result<()> {
        let beyond = |id: u32| id as usize >= vocab_size;
        let unused: std::collections::HashSet<String> = self
            .vocab()
            .into_iter()
            .filter(|(_, id)| beyond(*id))
            .map(|(t, _)| t)
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        if self.kind() != "BPE" {
            return Err(Error::Config {
                path: self.path.clone(),
                reason: format!(
                    "{} tokens have ids past the model's vocab_size {vocab_size}, and only a BPE \
                     tokenizer can be cut to it (this one is {})",
                    unused.len(),
                    self.kind()
                ),
            });
        }
        self.added.retain(|a| !beyond(a.id));
        self.model.retain(|(t, _)| !unused.contains(t));
        if let Some(merges) = self
            .json
            .pointer_mut("/model/merges")
            .and_then(Value::as_array_mut)
        {
            merges.retain(|m| {
                let parts: Vec<&str> = match m {
                    Value::String(s) => s.split(' ').collect(),
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                !parts.iter().any(|p| unused.contains(*p))
            });
        }
        self.stripped = true;
        self.index();
        Ok(())
    }

    /// Add a token as `tokenizers`' `add_tokens` does: content already an added token is left
    /// as it is; content that is a model token becomes an added token at that id; anything
    /// else gets the next id (the model's token count, or one past the largest added id).
    pub fn add(&mut self, content: &str, flags: Map<String, Value>) {
        if content.is_empty() || self.added_contents.contains(content) {
            return;
        }
        let id = match self.model_ids.get(content) {
            Some(id) => *id,
            None => {
                let count = self.model.len() as u32;
                match self.added.iter().map(|a| a.id).max() {
                    Some(max) if max >= count => max + 1,
                    _ => count,
                }
            }
        };
        let at = self.added.partition_point(|a| a.id <= id);
        self.added.insert(
            at,
            Added {
                id,
                content: content.to_string(),
                flags,
            },
        );
        self.added_contents.insert(content.to_string());
    }

    /// The file's JSON with the added tokens (and, if stripped, the model's vocab) as they are
    /// now.
    pub fn to_json(&self) -> Value {
        let mut json = self.json.clone();
        let added: Vec<Value> = self
            .added
            .iter()
            .map(|a| {
                let mut m = Map::new();
                m.insert("id".into(), a.id.into());
                m.insert("content".into(), a.content.clone().into());
                m.extend(a.flags.clone());
                Value::Object(m)
            })
            .collect();
        if let Some(obj) = json.as_object_mut() {
            obj.insert("added_tokens".into(), Value::Array(added));
        }
        if self.stripped
            && let Some(Value::Object(vocab)) = json.pointer_mut("/model/vocab")
        {
            *vocab = self
                .model
                .iter()
                .map(|(t, id)| (t.clone(), Value::from(*id)))
                .collect();
        }
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(json: &str) -> Tokenizer {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokenizer.json");
        std::fs::write(&p, json).unwrap();
        Tokenizer::open(&p).unwrap()
    }

    const BPE: &str = r#"{"added_tokens":[{"id":0,"content":"<s>","special":true,"normalized":false}],
        "model":{"type":"BPE","vocab":{"<s>":0,"a":1,"b":2,"ab":3,"c":4},"merges":["a b","ab c"]}}"#;

    #[test]
    fn add_follows_the_tokenizers_id_rule() {
        let mut t = tok(BPE);
        t.add("zz", Added::plain_flags());
        assert_eq!(t.vocab()["zz"], 5, "the model's token count");
        t.add("yy", Added::plain_flags());
        assert_eq!(t.vocab()["yy"], 6, "one past the largest added id");
        t.add("ab", Added::plain_flags());
        assert_eq!(t.vocab()["ab"], 3, "a model token keeps its id");
        assert!(t.added().iter().any(|a| a.content == "ab" && a.id == 3));
        let before = t.added().len();
        t.add("zz", Map::new());
        assert_eq!(t.added().len(), before, "an added token is left as it is");
    }

    #[test]
    fn strip_drops_ids_past_the_vocab_size_and_their_merges() {
        let mut t = tok(BPE);
        t.strip(4).unwrap();
        let v = t.vocab();
        assert!(!v.contains_key("c") && v.len() == 4);
        let json = t.to_json();
        assert_eq!(
            json.pointer("/model/merges").unwrap(),
            &serde_json::json!(["a b"])
        );
        let uni = tok(r#"{"model":{"type":"Unigram","vocab":[["a",0.0],["b",-1.0]]}}"#);
        assert_eq!(uni.vocab()["b"], 1);
        let mut uni = uni;
        assert!(uni.strip(1).unwrap_err().to_string().contains("only a BPE"));
    }
}
