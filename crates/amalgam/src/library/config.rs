//! The library configuration: which base, which tasks, which scheme with which parameters.
//! The conventions of merge configs: YAML, unknown keys are errors, model paths relative to the
//! working directory (`path+adapter` allowed), parameters as in merge configs (scalars,
//! gradients over the layers, `{filter, value}` conditions; per task under its `parameters:`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{InputModel, MergeConfig, ModelRef, Parameters};
use crate::error::{Error, Result};

/// One task: its name (what `rebuild` and `eval` take) and its fine-tuned model.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// The task's name.
    pub name: String,
    /// The fine-tune.
    pub model: ModelRef,
    /// Per-task scheme parameters.
    #[serde(default)]
    pub parameters: Parameters,
}

/// The merged model a scheme builds on (`twin`'s shared model).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeBlockConfig {
    /// Any amalgam merge method.
    pub merge_method: String,
    /// Its global parameters.
    #[serde(default)]
    pub parameters: Parameters,
}

/// A whole library configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibraryConfig {
    /// The base model.
    pub base_model: ModelRef,
    /// The tasks, in order.
    pub tasks: Vec<TaskConfig>,
    /// The storage scheme.
    pub scheme: String,
    /// The scheme's global parameters.
    #[serde(default)]
    pub parameters: Parameters,
    /// The dtype of rebuilt models (default: the base's).
    #[serde(default)]
    pub out_dtype: Option<String>,
    /// The merged model for schemes that build on one.
    #[serde(default)]
    pub merge: Option<MergeBlockConfig>,
    /// The path the config was read from.
    #[serde(skip)]
    pub path: PathBuf,
    /// The whole config as JSON (what the manifest records of its parameters).
    #[serde(skip)]
    pub raw: serde_json::Value,
}

impl LibraryConfig {
    /// Read and check a YAML config file.
    pub fn load(path: &Path) -> Result<LibraryConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        LibraryConfig::parse(path, &text)
    }

    /// Parse and check YAML text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<LibraryConfig> {
        let mut cfg: LibraryConfig = serde_saphyr::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("{e}"),
        })?;
        cfg.path = path.to_path_buf();
        cfg.raw = serde_saphyr::from_str(text).unwrap_or_default();
        cfg.check()?;
        Ok(cfg)
    }

    /// An error about this config.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn check(&self) -> Result<()> {
        if self.tasks.is_empty() {
            return Err(self.error("no tasks given"));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tasks {
            if !valid_name(&t.name) {
                return Err(self.error(format!(
                    "task name '{}' must be non-empty and made of letters, digits, '_', '-' and '.' (it names a file), not starting with '.'",
                    t.name
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(self.error(format!("task '{}' is named twice", t.name)));
            }
        }
        Ok(())
    }

    /// The global scheme parameters as written (`{}` if none).
    pub fn raw_parameters(&self) -> serde_json::Value {
        self.raw
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}))
    }

    /// Task `k`'s parameters as written (`{}` if none).
    pub fn raw_task_parameters(&self, k: usize) -> serde_json::Value {
        self.raw
            .get("tasks")
            .and_then(|t| t.get(k))
            .and_then(|t| t.get("parameters"))
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}))
    }

    /// The `merge:` block as written.
    pub fn raw_merge(&self) -> Option<serde_json::Value> {
        self.raw.get("merge").cloned()
    }

    /// The config as a merge config over the base and the tasks, for the planner: method
    /// `method`, the tasks as models in order, and `parameters` as its global parameters.
    pub fn as_merge(&self, method: &str, parameters: &Parameters, per_task: bool) -> MergeConfig {
        MergeConfig {
            merge_method: method.to_string(),
            models: Some(
                self.tasks
                    .iter()
                    .map(|t| InputModel {
                        model: t.model.clone(),
                        parameters: if per_task {
                            t.parameters.clone()
                        } else {
                            Parameters::default()
                        },
                        stats: None,
                    })
                    .collect(),
            ),
            slices: None,
            modules: None,
            base_model: Some(self.base_model.clone()),
            dtype: None,
            out_dtype: None,
            tokenizer_source: None,
            tokenizer: None,
            chat_template: None,
            parameters: parameters.clone(),
            path: self.path.clone(),
        }
    }
}

/// Whether `name` can name a task (and its file).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}
