//! Vocabulary alignment, mergekit 0.1.5's semantics (`tokenizer_source:` / `tokenizer:`): the
//! output vocabulary, each model's permutation onto it, and per vocabulary-indexed tensor the
//! rows each input supplies ([`rows::TensorRows`]), applied as the inputs are read, before any
//! method runs.
//!
//! - Output vocabulary. The tokenizer base is `base_model`, else the first model; its
//!   tokenizer is cut to its config's `vocab_size` (BPE only). `base`: that tokenizer.
//!   `MODEL`: that model's tokenizer, uncut. `union`: the base's tokens; then, model by model
//!   (base first, then the config's order), every token not yet seen as an added token
//!   (normalized, not special) at the next id; then every model's added tokens, the first
//!   definition of a content winning, keeping its flags. Then each `tokens:` key not in the
//!   vocabulary is added (normalized, not special). mergekit walks the models and each
//!   vocabulary in hash order, so its ids for appended tokens vary from run to run; amalgam uses
//!   the canonical order above (models as listed, each vocabulary by id).
//! - Permutations. A model's own vocabulary (the base's cut one; a model without a
//!   tokenizer.json is taken to share the base's) maps each output token to its row, or to
//!   none; a row at or past the model's `vocab_size` counts as none.
//! - Rows, per tensor over its inputs in slice order: a token with a `tokens:` entry takes the
//!   entry's row where a model lacks it (and everywhere with `force`); otherwise the one model
//!   that has it gives its row to the others; a token no model has gets zeros (a warning); one
//!   the base has gets the base's row; else the mean of the models that have it. A model that
//!   has the token keeps its row unless forced. `pad_to_multiple_of` rounds the row count up,
//!   each input's padding rows being the mean of its aligned rows.

pub mod rows;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{MergeConfig, TokenEntry, TokenKind, TokenSource};
use crate::error::{Error, Result};
use crate::plan::{Input, ModelSet};
pub use rows::{Fill, TensorRows};
pub use tokenizer::{Added, Tokenizer};

/// The output vocabulary and every model's permutation onto it.
#[derive(Debug)]
pub struct Alignment {
    /// The output tokenizer.
    pub tokenizer: Tokenizer,
    /// The model directory whose tokenizer_config.json and special_tokens_map.json go with it.
    pub config_from: PathBuf,
    /// Output tokens by id.
    tokens: Vec<String>,
    /// Output rows, padding included.
    pub rows: usize,
    /// Per model of the set: output id → its row, or −1.
    perms: Vec<Vec<i64>>,
    /// Per model: its own vocabulary (the base's cut), for `model_token` sources.
    originals: Vec<HashMap<String, u32>>,
    /// The `tokens:` entries.
    entries: HashMap<String, TokenEntry>,
    /// Notices for the user.
    pub warnings: Vec<String>,
}

/// The tokenizer settings of a config.
struct Settings<'a> {
    source: &'a str,
    entries: Vec<(String, TokenEntry)>,
    pad: Option<u64>,
}

fn settings(config: &MergeConfig) -> Option<Settings<'_>> {
    match (&config.tokenizer, &config.tokenizer_source) {
        (Some(t), _) => Some(Settings {
            source: t.source.as_str(),
            entries: t.tokens.clone().map(|e| e.0).unwrap_or_default(),
            pad: t.pad_to_multiple_of,
        }),
        (None, Some(s)) => Some(Settings {
            source: s.as_str(),
            entries: Vec::new(),
            pad: None,
        }),
        (None, None) => None,
    }
}

/// One vocabulary-indexed tensor to align: its output name, inputs (slice order), each
/// input's stored row count, elements per row, and the slice's base model.
pub struct VocabTensor<'a> {
    /// Output tensor name.
    pub name: &'a str,
    /// Its inputs.
    pub inputs: &'a [Input],
    /// Rows of each input as stored.
    pub stored: &'a [usize],
    /// Elements per row.
    pub cols: usize,
    /// The slice's base model (index into the model set).
    pub base: Option<usize>,
}

/// A model's `vocab_size`: its adapter's resized vocabulary, else its config's (top level,
/// else `text_config`).
fn vocab_size(set: &ModelSet, m: usize) -> Option<usize> {
    if let Some(a) = &set.adapters[m]
        && let Ok(Some(rows)) = a.vocab_rows(&set.models[m])
    {
        return Some(rows);
    }
    let cfg = set.models[m].config()?;
    cfg.get("vocab_size")
        .or_else(|| cfg.pointer("/text_config/vocab_size"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
}

impl Alignment {
    /// The alignment `config` asks for (`None` without `tokenizer_source` or `tokenizer:`).
    pub fn build(config: &MergeConfig, set: &ModelSet) -> Result<Option<Alignment>> {
        let Some(Settings {
            source,
            entries,
            pad,
        }) = settings(config)
        else {
            return Ok(None);
        };
        let base = config.base_model.as_ref().map_or(0, |b| set.index(b));
        let mut warnings = Vec::new();
        let mut toks: Vec<Option<Tokenizer>> = Vec::new();
        for m in 0..set.models.len() {
            toks.push(Tokenizer::of_model(set.tokenizer_dir(m))?);
        }
        let sizes: Vec<usize> = (0..set.models.len())
            .map(|m| {
                vocab_size(set, m)
                    .unwrap_or_else(|| toks[m].as_ref().map_or(0, |t| t.vocab().len()))
            })
            .collect();
        let Some(mut base_tok) = toks[base].take() else {
            return Err(config.error(format!(
                "tokenizer source '{source}' aligns the vocabularies by token, which needs the \
                 tokenizer of '{}' (the base, else the first model), and it has no \
                 tokenizer.json; amalgam reads fast (tokenizer.json) tokenizers only",
                set.refs[base].0
            )));
        };
        base_tok.strip(sizes[base])?;
        toks[base] = Some(base_tok);
        for (m, t) in toks.iter().enumerate() {
            if t.is_none() {
                warnings.push(format!(
                    "'{}' has no tokenizer.json; its vocabulary is taken to be the base's",
                    set.refs[m].0
                ));
            }
        }
        let base_tok = toks[base].as_ref().expect("just set");
        // Base first, then the others in the config's order.
        let order: Vec<usize> = std::iter::once(base)
            .chain((0..set.models.len()).filter(|&m| m != base))
            .collect();
        let (mut out, config_from) = match source {
            "union" => (
                union(base_tok, &toks, &sizes, &order),
                set.tokenizer_dir(base).to_path_buf(),
            ),
            "base" => (base_tok.clone(), set.tokenizer_dir(base).to_path_buf()),
            model => {
                let Some(m) = set.refs.iter().position(|r| r.0 == model) else {
                    return Err(config.error(format!(
                        "tokenizer source '{model}' is not one of the models in the config \
                         (use union, base, or one of the models)"
                    )));
                };
                let Some(t) = &toks[m] else {
                    return Err(
                        config.error(format!("tokenizer source '{model}' has no tokenizer.json"))
                    );
                };
                (t.clone(), set.tokenizer_dir(m).to_path_buf())
            }
        };
        let mut present = out.vocab();
        for (token, _) in &entries {
            if !present.contains_key(token) {
                out.add(token, Added::plain_flags());
                present = out.vocab();
            }
        }
        let by_id = out.vocab_by_id();
        let mut tokens = Vec::with_capacity(by_id.len());
        for (i, (t, id)) in by_id.into_iter().enumerate() {
            if id as usize != i {
                return Err(Error::Config {
                    path: out.path.clone(),
                    reason: format!(
                        "the output vocabulary's ids are not 0..{}: id {i} is missing (next is \
                         '{t}' at {id})",
                        tokens.len()
                    ),
                });
            }
            tokens.push(t);
        }
        let n = tokens.len();
        let rows = match pad {
            Some(p) if p > 0 => n.div_ceil(p as usize) * p as usize,
            _ => n,
        };
        let mut perms = Vec::new();
        let mut originals = Vec::new();
        for m in 0..set.models.len() {
            let vocab = toks[m].as_ref().unwrap_or(base_tok).vocab();
            let mut p = vec![-1i64; n];
            let mut beyond = 0usize;
            for (id, t) in tokens.iter().enumerate() {
                if let Some(&own) = vocab.get(t) {
                    if (own as usize) < sizes[m] {
                        p[id] = own as i64;
                    } else {
                        beyond += 1;
                    }
                }
            }
            if beyond > 0 {
                warnings.push(format!(
                    "'{}': {beyond} tokens of its tokenizer have ids at or past its vocab_size \
                     {}; they count as missing from it",
                    set.refs[m].0, sizes[m]
                ));
            }
            perms.push(p);
            originals.push(vocab);
        }
        Ok(Some(Alignment {
            tokenizer: out,
            config_from,
            tokens,
            rows,
            perms,
            originals,
            entries: entries.into_iter().collect(),
            warnings,
        }))
    }

    /// How the inputs of tensor `t` are aligned. Token-level notices go to `warnings` (once
    /// each).
    pub fn tensor_rows(
        &self,
        config: &MergeConfig,
        set: &ModelSet,
        t: &VocabTensor,
        warnings: &mut Vec<String>,
    ) -> Result<Arc<TensorRows>> {
        let VocabTensor {
            name,
            inputs,
            stored,
            cols,
            base,
        } = *t;
        let n = self.tokens.len();
        let models: Vec<usize> = inputs.iter().map(|i| i.model).collect();
        let input_of = |m: usize| models.iter().position(|&x| x == m);
        let base_k = base.and_then(input_of);
        for (k, &m) in models.iter().enumerate() {
            if let Some(&bad) = self.perms[m].iter().find(|&&r| r >= stored[k] as i64) {
                return Err(Error::Config {
                    path: set.models[m].path.clone(),
                    reason: format!(
                        "'{name}' has {} rows but its tokenizer gives a token id {bad}; the \
                         tokenizer and the weights disagree (fix the model's vocab_size or \
                         tokenizer)",
                        stored[k]
                    ),
                });
            }
        }
        let mut fills: Vec<Vec<Fill>> = vec![Vec::with_capacity(n); models.len()];
        let mut means: Vec<Vec<(u16, u32)>> = Vec::new();
        let mut zeros = 0usize;
        let mut first_zero = None;
        for (id, token) in self.tokens.iter().enumerate() {
            let own: Vec<Option<u32>> = models
                .iter()
                .map(|&m| u32::try_from(self.perms[m][id]).ok())
                .collect();
            let entry = self.entries.get(token);
            let force = entry.is_some_and(|e| e.force);
            let all = own.iter().all(Option::is_some);
            let default = if force || !all {
                Some(match entry {
                    Some(e) => self.entry_fill(config, set, t, token, id, e)?,
                    None => {
                        let present: Vec<usize> =
                            (0..models.len()).filter(|&k| own[k].is_some()).collect();
                        match (present.len(), base_k) {
                            (1, _) => row_of(present[0], own[present[0]]),
                            (0, _) => {
                                zeros += 1;
                                first_zero.get_or_insert_with(|| token.clone());
                                Fill::Zero
                            }
                            (_, Some(b)) if own[b].is_some() => row_of(b, own[b]),
                            _ => {
                                means.push(
                                    present
                                        .iter()
                                        .map(|&k| (k as u16, own[k].expect("present")))
                                        .collect(),
                                );
                                Fill::Mean(means.len() as u32 - 1)
                            }
                        }
                    }
                })
            } else {
                None
            };
            for k in 0..models.len() {
                fills[k].push(match (own[k], default) {
                    (Some(r), _) if !force => row_of(k, Some(r)),
                    (_, Some(d)) => d,
                    (Some(r), None) => row_of(k, Some(r)),
                    (None, None) => unreachable!("a missing token has a default row"),
                });
            }
        }
        if zeros > 0 {
            let w = format!(
                "{zeros} tokens of the output vocabulary are in none of the models (e.g. '{}'): \
                 their embedding and LM-head rows are zeros",
                first_zero.unwrap_or_default()
            );
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
        Ok(Arc::new(TensorRows {
            rows: self.rows,
            cols,
            fills,
            means,
        }))
    }

    /// The row a `tokens:` entry gives token `token` (output id `id`) in tensor `t`.
    fn entry_fill(
        &self,
        config: &MergeConfig,
        set: &ModelSet,
        t: &VocabTensor,
        token: &str,
        id: usize,
        e: &TokenEntry,
    ) -> Result<Fill> {
        let (name, stored) = (t.name, t.stored);
        let input = |model: &str| -> Result<(usize, usize)> {
            let m = set.refs.iter().position(|r| r.0 == model).ok_or_else(|| {
                config.error(format!(
                    "tokens: '{token}' takes its row from '{model}', which is not one of the \
                     models in the config"
                ))
            })?;
            let k = t.inputs.iter().position(|i| i.model == m).ok_or_else(|| {
                config.error(format!(
                    "tokens: '{token}' takes its row from '{model}', which is not an input of \
                     '{name}'"
                ))
            })?;
            Ok((m, k))
        };
        match e.source.as_ref().expect("checked when the config was read") {
            TokenSource::Kind(TokenKind::Zero) => Ok(Fill::Zero),
            TokenSource::Model(model) => {
                let (m, k) = input(model)?;
                let row = u32::try_from(self.perms[m][id]).map_err(|_| {
                    config.error(format!(
                        "tokens: '{token}' takes its row from '{model}', which does not have \
                         that token"
                    ))
                })?;
                Ok(row_of(k, Some(row)))
            }
            TokenSource::Kind(TokenKind::ModelToken {
                model,
                token: src,
                token_id,
            }) => {
                let (m, k) = input(model)?;
                let row = match (src, token_id) {
                    (Some(s), _) => *self.originals[m].get(s).ok_or_else(|| {
                        config.error(format!(
                            "tokens: '{token}': token '{s}' is not in the vocabulary of '{model}'"
                        ))
                    })? as i64,
                    (None, Some(id)) => *id,
                    (None, None) => unreachable!("checked when the config was read"),
                };
                if row < 0 || row >= stored[k] as i64 {
                    return Err(config.error(format!(
                        "tokens: '{token}': token id {row} is out of range for '{model}' \
                         ('{name}' has {} rows)",
                        stored[k]
                    )));
                }
                Ok(row_of(k, Some(row as u32)))
            }
        }
    }

    /// The output `config.json` with `vocab_size` set to the aligned row count.
    pub fn update_config(&self, cfg: &mut Value) {
        if let Some(obj) = cfg.as_object_mut() {
            if obj.contains_key("vocab_size") || !obj.contains_key("text_config") {
                obj.insert("vocab_size".into(), self.rows.into());
            } else if let Some(tc) = obj.get_mut("text_config").and_then(Value::as_object_mut) {
                tc.insert("vocab_size".into(), self.rows.into());
            }
        }
    }

    /// Write tokenizer.json, tokenizer_config.json (the source's, its `added_tokens_decoder`
    /// brought up to date) and special_tokens_map.json into `dir`.
    pub fn write(&self, dir: &std::path::Path) -> Result<()> {
        use crate::error::IoContext;
        let write = |name: &str, v: &Value| -> Result<()> {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(v).expect("json");
            std::fs::write(&path, text).at(&path)
        };
        write("tokenizer.json", &self.tokenizer.to_json())?;
        let cfg_path = self.config_from.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
            let mut cfg: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: cfg_path.clone(),
                reason: format!("not valid JSON: {e}"),
            })?;
            if let Some(obj) = cfg.as_object_mut()
                && obj.contains_key("added_tokens_decoder")
            {
                let decoder: serde_json::Map<String, Value> = self
                    .tokenizer
                    .added()
                    .iter()
                    .map(|a| {
                        let mut m = serde_json::Map::new();
                        m.insert("content".into(), a.content.clone().into());
                        m.extend(a.flags.clone());
                        (a.id.to_string(), Value::Object(m))
                    })
                    .collect();
                obj.insert("added_tokens_decoder".into(), Value::Object(decoder));
            }
            write("tokenizer_config.json", &cfg)?;
        }
        crate::io::modeldir::copy_present(&self.config_from, dir, &["special_tokens_map.json"])?;
        Ok(())
    }
}

fn row_of(k: usize, row: Option<u32>) -> Fill {
    Fill::Row {
        input: k as u16,
        row: row.expect("present"),
    }
}

/// The union vocabulary (see the module documentation).
fn union(
    base: &Tokenizer,
    toks: &[Option<Tokenizer>],
    sizes: &[usize],
    order: &[usize],
) -> Tokenizer {
    let mut seen = std::collections::HashSet::new();
    let mut regular: Vec<String> = Vec::new();
    let mut added: Vec<Added> = Vec::new();
    let mut added_contents = std::collections::HashSet::new();
    for &m in order {
        let Some(t) = &toks[m] else { continue };
        for (tok, id) in t.vocab_by_id() {
            if (id as usize) < sizes[m] && seen.insert(tok.clone()) {
                regular.push(tok);
            }
        }
        for a in t.added() {
            if (a.id as usize) < sizes[m] && added_contents.insert(a.content.clone()) {
                added.push(a.clone());
            }
        }
    }
    let mut out = base.clone();
    let base_vocab = base.vocab();
    for tok in &regular {
        if !added_contents.contains(tok) && !base_vocab.contains_key(tok) {
            out.add(tok, Added::plain_flags());
        }
    }
    for a in added {
        out.add(&a.content, a.flags);
    }
    out
}
