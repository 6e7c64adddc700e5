//! The merge configuration: mergekit's YAML schema, read as is.
//!
//! A parameter setting is a scalar, a gradient (a list of numbers interpolated over the layer
//! position within a slice), or `{filter, value}` conditions where the first whose filter is a
//! substring of the tensor name wins. Unknown keys are errors that list the valid ones.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// A scalar parameter value as written in YAML.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (also YAML 1.1 scientific notation such as `1e-3`, which mergekit's YAML
    /// reader leaves as a string and then validates as a number).
    Str(String),
}

/// A scalar or a gradient.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScalarOrGradient {
    /// One value everywhere.
    Scalar(Scalar),
    /// Values interpolated over the layer position.
    Gradient(Vec<Scalar>),
}

/// A value that applies to tensors whose name contains `filter` (all tensors if absent or `*`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditional {
    /// The value.
    pub value: ScalarOrGradient,
    /// Substring of the tensor name; `None` or `*` match everything.
    #[serde(default)]
    pub filter: Option<String>,
}

/// Any parameter setting.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    /// One value.
    Scalar(Scalar),
    /// A gradient.
    Gradient(Vec<Scalar>),
    /// Conditions, first match wins.
    Conditions(Vec<Conditional>),
    /// One condition.
    Condition(Conditional),
}

/// Parameters by name, in the order written, each parsed into a [`Setting`] as the config is
/// read (a value of the wrong shape is a load error naming the parameter).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parameters(Vec<(String, Setting)>);

impl Parameters {
    /// The setting for `name`, if given.
    pub fn get(&self, name: &str) -> Option<&Setting> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, s)| s)
    }

    /// The names given, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        map.into_iter()
            .map(|(k, v)| match serde_json::from_value::<Setting>(v.clone()) {
                Ok(setting) => Ok((k, setting)),
                Err(_) => Err(serde::de::Error::custom(format!(
                    "parameter '{k}': {v} is not a scalar, a list of numbers, or {{filter, value}} entries"
                ))),
            })
            .collect::<std::result::Result<_, _>>()
            .map(Parameters)
    }
}

/// A model reference: a local path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(transparent)]
pub struct ModelRef(pub String);

/// One input model of a `models:` merge.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputModel {
    /// The model.
    pub model: ModelRef,
    /// Its parameters.
    #[serde(default)]
    pub parameters: Parameters,
    /// Statistics measured on it (`amalgam measure`), for the data-driven methods (`regmean`,
    /// `fisher`).
    #[serde(default)]
    pub stats: Option<PathBuf>,
}

/// One source of an output slice.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSlice {
    /// The model.
    pub model: ModelRef,
    /// `[start, end)` layer indices.
    pub layer_range: [usize; 2],
    /// Parameters for this source.
    #[serde(default)]
    pub parameters: Parameters,
}

/// One output slice: a run of layers merged from its sources.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSlice {
    /// The sources, each with the same number of layers.
    pub sources: Vec<InputSlice>,
    /// Base model for this slice (default: the global one).
    #[serde(default)]
    pub base_model: Option<ModelRef>,
    /// Accepted for compatibility; mergekit does not use it either.
    #[serde(default)]
    pub residual_weight: Option<f64>,
    /// Slice-level parameters.
    #[serde(default)]
    pub parameters: Parameters,
}

/// The `tokenizer:` block (mergekit's `TokenizerConfig`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// `union` (the default), `base`, or a model.
    #[serde(default = "union")]
    pub source: String,
    /// Per-token settings of embedding and LM-head rows, in the order written.
    #[serde(default)]
    pub tokens: Option<TokenEntries>,
    /// Round the vocabulary up to a multiple of this; the new rows get each model's mean row.
    #[serde(default)]
    pub pad_to_multiple_of: Option<u64>,
}

fn union() -> String {
    "union".into()
}

/// `tokens:` entries in the order written.
#[derive(Clone, Debug, Default)]
pub struct TokenEntries(pub Vec<(String, TokenEntry)>);

impl<'de> Deserialize<'de> for TokenEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        map.into_iter()
            .map(|(k, v)| {
                serde_json::from_value::<TokenEntry>(v)
                    .map(|e| (k.clone(), e))
                    .map_err(|e| serde::de::Error::custom(format!("tokens: '{k}': {e}")))
            })
            .collect::<std::result::Result<_, _>>()
            .map(TokenEntries)
    }
}

/// How one token's rows are made (mergekit's `TokenEmbeddingConfig`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Where the row comes from.
    #[serde(default)]
    pub source: Option<TokenSource>,
    /// Give every model this row, also those that have the token.
    #[serde(default)]
    pub force: bool,
}

/// The source of a token's row.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenSource {
    /// That model's row of the same token.
    Model(String),
    /// `{kind: model_token, model, token | token_id}` or `{kind: zero}`.
    Kind(TokenKind),
}

/// A `kind:` token source.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenKind {
    /// A row of a model's own embedding: the row of `token` in its vocabulary, or row `token_id`.
    ModelToken {
        /// The model.
        model: String,
        /// A token of that model.
        #[serde(default)]
        token: Option<String>,
        /// A row index of that model.
        #[serde(default)]
        token_id: Option<i64>,
    },
    /// Zeros.
    Zero,
}

/// A whole merge configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    /// The merge method's name.
    pub merge_method: String,
    /// Whole-model inputs.
    #[serde(default)]
    pub models: Option<Vec<InputModel>>,
    /// Layer slices.
    #[serde(default)]
    pub slices: Option<Vec<OutputSlice>>,
    /// Multi-module models (not supported yet).
    #[serde(default)]
    pub modules: Option<serde_json::Value>,
    /// The base model.
    #[serde(default)]
    pub base_model: Option<ModelRef>,
    /// Input dtype (amalgam always computes in f32; this sets the default output dtype).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Output dtype.
    #[serde(default)]
    pub out_dtype: Option<String>,
    /// Where the tokenizer comes from.
    #[serde(default)]
    pub tokenizer_source: Option<String>,
    /// The `tokenizer:` block.
    #[serde(default)]
    pub tokenizer: Option<TokenizerConfig>,
    /// A chat template: a name, `auto`, or Jinja text.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Global parameters.
    #[serde(default)]
    pub parameters: Parameters,
    /// The path the config was read from (for error messages and relative paths).
    #[serde(skip)]
    pub path: PathBuf,
}

impl MergeConfig {
    /// Read and parse a YAML config file.
    pub fn load(path: &Path) -> Result<MergeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        MergeConfig::parse(path, &text)
    }

    /// Parse YAML text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<MergeConfig> {
        let mut cfg: MergeConfig = serde_saphyr::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("{e}"),
        })?;
        cfg.path = path.to_path_buf();
        cfg.check_structure()?;
        Ok(cfg)
    }

    /// A config from an already-parsed document (one stage of a multi-stage file); `path` and
    /// `what` ("stage 'name'") name it in errors.
    pub fn from_value(path: &Path, what: &str, value: serde_json::Value) -> Result<MergeConfig> {
        let mut cfg: MergeConfig = serde_json::from_value(value).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("{what}: {e}"),
        })?;
        cfg.path = path.to_path_buf();
        cfg.check_structure().map_err(|e| match e {
            Error::Config { path, reason } => Error::Config {
                path,
                reason: format!("{what}: {reason}"),
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// An error about this config.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn check_structure(&self) -> Result<()> {
        let given = [
            self.models.is_some(),
            self.slices.is_some(),
            self.modules.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(self.error(
                "exactly one of 'models' or 'slices' must be given ('modules' is not supported yet)",
            ));
        }
        if self.modules.is_some() {
            return Err(self.error(
                "'modules' (multi-module models) is not supported yet; use 'models' or 'slices'",
            ));
        }
        if matches!(&self.models, Some(m) if m.is_empty())
            || matches!(&self.slices, Some(s) if s.is_empty())
        {
            return Err(self.error("no input models given"));
        }
        if self.tokenizer_source.is_some() && self.tokenizer.is_some() {
            return Err(self.error("give either 'tokenizer_source' or 'tokenizer', not both"));
        }
        if let Some(t) = &self.tokenizer {
            if t.pad_to_multiple_of == Some(0) {
                return Err(self.error("tokenizer: pad_to_multiple_of must be at least 1"));
            }
            for (token, e) in t.tokens.iter().flat_map(|t| &t.0) {
                match &e.source {
                    None => {
                        return Err(self.error(format!(
                            "tokenizer: tokens: '{token}' has no source; give `source: MODEL`, \
                             `{{kind: model_token, model, token | token_id}}` or `{{kind: zero}}`"
                        )));
                    }
                    Some(TokenSource::Kind(TokenKind::ModelToken {
                        token: a,
                        token_id: b,
                        ..
                    })) if a.is_some() == b.is_some() => {
                        return Err(self.error(format!(
                            "tokenizer: tokens: '{token}': a model_token source takes exactly one \
                             of 'token' and 'token_id'"
                        )));
                    }
                    _ => {}
                }
            }
        }
        for s in self.slices.iter().flatten() {
            if s.sources.is_empty() {
                return Err(self.error("a slice has no sources"));
            }
            for src in &s.sources {
                let [a, b] = src.layer_range;
                if b < a {
                    return Err(self.error(format!(
                        "layer_range [{a}, {b}] of {} ends before it starts",
                        src.model.0
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every model the config names, base first if given, then in order of appearance.
    pub fn referenced_models(&self) -> Vec<ModelRef> {
        let mut out: Vec<ModelRef> = Vec::new();
        let mut add = |m: &ModelRef| {
            if !out.contains(m) {
                out.push(m.clone());
            }
        };
        if let Some(b) = &self.base_model {
            add(b);
        }
        for m in self.models.iter().flatten() {
            add(&m.model);
        }
        for s in self.slices.iter().flatten() {
            if let Some(b) = &s.base_model {
                add(b);
            }
            for src in &s.sources {
                add(&src.model);
            }
        }
        out
    }
}

/// A resolved parameter value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A float.
    Float(f64),
    /// A bool.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// One of a parameter's named choices.
    Choice(&'static str),
    /// Absent (an optional parameter left unset).
    None,
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Choice(c) => f.write_str(c),
            Value::None => f.write_str("none"),
        }
    }
}

/// The type a parameter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A float.
    Float,
    /// A float or nothing.
    OptionalFloat,
    /// A bool.
    Bool,
    /// An integer.
    Int,
    /// One of these names.
    Choice(&'static [&'static str]),
}

/// Validate a scalar as `kind`, as pydantic's lax mode does for mergekit.
pub fn validate(kind: Kind, s: &Scalar) -> std::result::Result<Value, String> {
    let as_float = |s: &Scalar| match s {
        Scalar::Float(x) => Some(*x),
        Scalar::Int(i) => Some(*i as f64),
        Scalar::Bool(b) => Some(*b as u8 as f64),
        Scalar::Str(t) => t.trim().parse::<f64>().ok(),
    };
    match kind {
        Kind::Float | Kind::OptionalFloat => as_float(s)
            .map(Value::Float)
            .ok_or_else(|| format!("{s:?} is not a number")),
        Kind::Int => match s {
            Scalar::Int(i) => Ok(Value::Int(*i)),
            Scalar::Float(x) if x.fract() == 0.0 => Ok(Value::Int(*x as i64)),
            Scalar::Str(t) => t
                .trim()
                .parse()
                .map(Value::Int)
                .map_err(|_| format!("'{t}' is not an integer")),
            _ => Err(format!("{s:?} is not an integer")),
        },
        Kind::Bool => match s {
            Scalar::Bool(b) => Ok(Value::Bool(*b)),
            Scalar::Int(0) => Ok(Value::Bool(false)),
            Scalar::Int(1) => Ok(Value::Bool(true)),
            Scalar::Str(t) => match t.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "off" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!("'{t}' is not a boolean")),
            },
            _ => Err(format!("{s:?} is not a boolean")),
        },
        Kind::Choice(names) => {
            let given = match s {
                Scalar::Str(t) => t.trim().to_string(),
                Scalar::Bool(b) => b.to_string(),
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(x) => x.to_string(),
            };
            names
                .iter()
                .find(|n| **n == given)
                .map(|n| Value::Choice(n))
                .ok_or_else(|| format!("'{given}' is not one of: {}", names.join(", ")))
        }
    }
}

fn is_number(s: &Scalar) -> bool {
    matches!(s, Scalar::Int(_) | Scalar::Float(_))
        || matches!(s, Scalar::Str(t) if t.trim().parse::<f64>().is_ok())
}

/// Resolve a setting for `tensor` at layer position `t ∈ [0, 1]`: filters pick a condition,
/// numeric gradients interpolate, other lists pick the value at `⌊t·(n−1)⌋`.
/// `Ok(None)` when no condition matches (the next scope is consulted).
pub fn evaluate(
    setting: &Setting,
    tensor: &str,
    t: f64,
    kind: Kind,
) -> std::result::Result<Option<Value>, String> {
    match setting {
        Setting::Scalar(s) => validate(kind, s).map(Some),
        Setting::Gradient(values) => gradient(values, t, kind),
        Setting::Condition(c) => conditions(std::slice::from_ref(c), tensor, t, kind),
        Setting::Conditions(cs) => conditions(cs, tensor, t, kind),
    }
}

fn gradient(values: &[Scalar], t: f64, kind: Kind) -> std::result::Result<Option<Value>, String> {
    if values.is_empty() {
        return Ok(None);
    }
    let numeric = matches!(kind, Kind::Float | Kind::OptionalFloat | Kind::Int)
        && values.iter().all(is_number);
    if !numeric {
        let i = (t * (values.len() - 1) as f64) as usize;
        return validate(kind, &values[i.min(values.len() - 1)]).map(Some);
    }
    let nums: Vec<f64> = values
        .iter()
        .map(|v| match validate(Kind::Float, v)? {
            Value::Float(x) => Ok(x),
            _ => unreachable!("validated as float"),
        })
        .collect::<std::result::Result<_, String>>()?;
    let scaled = t * (nums.len() - 1) as f64;
    let i0 = scaled as usize;
    let i1 = (i0 + 1).min(nums.len() - 1);
    let frac = scaled - i0 as f64;
    let x = (1.0 - frac) * nums[i0.min(nums.len() - 1)] + frac * nums[i1];
    validate(kind, &Scalar::Float(x)).map(Some)
}

fn conditions(
    cs: &[Conditional],
    tensor: &str,
    t: f64,
    kind: Kind,
) -> std::result::Result<Option<Value>, String> {
    for c in cs {
        let matches = match c.filter.as_deref() {
            None | Some("*") => true,
            Some(f) => !tensor.is_empty() && tensor.contains(f),
        };
        if matches {
            let inner = match &c.value {
                ScalarOrGradient::Scalar(s) => Setting::Scalar(s.clone()),
                ScalarOrGradient::Gradient(g) => Setting::Gradient(g.clone()),
            };
            return evaluate(&inner, tensor, t, kind);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<MergeConfig> {
        MergeConfig::parse(Path::new("c.yml"), yaml)
    }

    #[test]
    fn parses_models_config_with_all_setting_shapes() {
        let c = parse(
            r#"
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 0.5
      density: [0.2, 0.8]
  - model: b
    parameters:
      weight:
        - filter: mlp
          value: 2
        - value: 1
parameters:
  normalize: true
  lambda: 1e-1
dtype: float32
"#,
        )
        .unwrap();
        let models = c.models.as_ref().unwrap();
        let w = models[1].parameters.get("weight").unwrap();
        assert_eq!(
            evaluate(w, "model.layers.0.mlp.up_proj.weight", 0.0, Kind::Float).unwrap(),
            Some(Value::Float(2.0))
        );
        assert_eq!(
            evaluate(w, "model.norm.weight", 0.0, Kind::Float).unwrap(),
            Some(Value::Float(1.0))
        );
        let d = models[0].parameters.get("density").unwrap();
        assert_eq!(
            evaluate(d, "x", 0.5, Kind::Float).unwrap(),
            Some(Value::Float(0.5))
        );
        let l = c.parameters.get("lambda").unwrap();
        assert_eq!(
            evaluate(l, "x", 0.0, Kind::Float).unwrap(),
            Some(Value::Float(0.1))
        );
        assert_eq!(c.referenced_models()[0].0, "base");
    }

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let g = Setting::Gradient(vec![
            Scalar::Float(0.0),
            Scalar::Float(1.0),
            Scalar::Float(0.5),
        ]);
        let at = |t| match evaluate(&g, "x", t, Kind::Float).unwrap() {
            Some(Value::Float(x)) => x,
            other => panic!("{other:?}"),
        };
        assert_eq!(at(0.0), 0.0);
        assert_eq!(at(0.25), 0.5);
        assert_eq!(at(0.5), 1.0);
        assert_eq!(at(0.75), 0.75);
        assert_eq!(at(1.0), 0.5);
        let b = Setting::Gradient(vec![Scalar::Bool(true), Scalar::Bool(false)]);
        assert_eq!(
            evaluate(&b, "x", 0.9, Kind::Bool).unwrap(),
            Some(Value::Bool(true))
        );
        assert_eq!(
            evaluate(&b, "x", 1.0, Kind::Bool).unwrap(),
            Some(Value::Bool(false))
        );
    }

    #[test]
    fn unmatched_filters_fall_through() {
        let s = Setting::Conditions(vec![Conditional {
            value: ScalarOrGradient::Scalar(Scalar::Float(0.3)),
            filter: Some("self_attn".into()),
        }]);
        assert_eq!(evaluate(&s, "mlp.up", 0.0, Kind::Float).unwrap(), None);
    }

    #[test]
    fn structural_errors_are_clear() {
        let e = parse("merge_method: linear\nmodelz: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("modelz") && e.contains("models"), "{e}");
        let e = parse("merge_method: linear\n").unwrap_err().to_string();
        assert!(e.contains("exactly one of"), "{e}");
        let e = parse("merge_method: linear\nmodels: [{model: a}]\nslices: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one of"), "{e}");
        let e = parse("merge_method: linear\nmodels: [{model: a, parameters: {weight: {x: 1}}}]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("weight"), "{e}");
        let e =
            parse("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("ends before"), "{e}");
    }
}
