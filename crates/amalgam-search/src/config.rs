//! The search config: what to search (a mergekit-evolve genome), what to score (amalgam eval
//! tasks with weights), and how (CMA-ES settings). YAML with the merge configs' conventions:
//! unknown keys are errors, paths are relative to the working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The merge methods a genome can search (mergekit-evolve's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Weighted average.
    Linear,
    /// Base plus weighted task vectors.
    TaskArithmetic,
    /// TIES (trim, elect signs, disjoint merge).
    Ties,
    /// DARE drop-and-rescale with TIES sign election.
    DareTies,
    /// Spherical interpolation of the two heaviest models per layer group.
    Slerp,
}

impl Method {
    /// The name in a merge config.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareTies => "dare_ties",
            Method::Slerp => "slerp",
        }
    }

    /// The parameters searched per model, layer group and filter (mergekit-evolve's
    /// `METHOD_PARAM_MAPS`).
    pub fn params(self) -> &'static [&'static str] {
        match self {
            Method::Linear | Method::TaskArithmetic => &["weight"],
            Method::Ties | Method::DareTies => &["weight", "density"],
            Method::Slerp => &["t"],
        }
    }
}

/// What is searched: mergekit-evolve's `genome:` block, plus the merge's dtypes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genome {
    /// The models merged (paths; `path+adapter` allowed).
    pub models: Vec<String>,
    /// The merge method.
    pub merge_method: Method,
    /// The base model (required for task_arithmetic, ties, dare_ties).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// Layers per group, each group with its own parameters; it must divide the number of
    /// layers. 0: one group for the whole model.
    #[serde(default)]
    pub layer_granularity: usize,
    /// The merge's `normalize` (default: on for linear, ties and dare_ties, as mergekit-evolve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Let weights go negative (otherwise their absolute value is used).
    #[serde(default)]
    pub allow_negative_weights: bool,
    /// Tensor-name substrings, each with parameters of its own (the rest share one more set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Parameters as gradients over the layer groups instead of one value per group.
    #[serde(default)]
    pub smooth: bool,
    /// The merge's `dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// The merge's `out_dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dtype: Option<String>,
    /// The merge's `tokenizer_source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_source: Option<String>,
}

/// One scored task: an `amalgam eval` task file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// JSONL rows `{"text", "label"}` (accuracy with `head`) or `{"text"}` (perplexity).
    pub task: PathBuf,
    /// The classification head (`.safetensors`, weight [classes, hidden] and bias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<PathBuf>,
    /// Its weight in the objective.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// CMA-ES settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// Candidates per generation (default `4 + ⌊3 ln n⌋` for n searched values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<usize>,
    /// The initial step size (mergekit-evolve's 1/6).
    #[serde(default = "sigma0")]
    pub sigma0: f64,
    /// Trials to run (rounded up to whole generations).
    #[serde(default = "max_evals")]
    pub max_evals: usize,
    /// The seed of the sampling (and of random merge methods).
    #[serde(default)]
    pub seed: u64,
}

fn sigma0() -> f64 {
    1.0 / 6.0
}

fn max_evals() -> usize {
    100
}

impl Default for SearchParams {
    fn default() -> SearchParams {
        SearchParams {
            population: None,
            sigma0: sigma0(),
            max_evals: max_evals(),
            seed: 0,
        }
    }
}

/// A whole search config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// What is searched.
    pub genome: Genome,
    /// What is scored: the objective is the weighted mean of the tasks' accuracies (negative
    /// perplexities for language-modelling tasks).
    pub tasks: Vec<TaskSpec>,
    /// Truncate inputs to this many tokens (default: as `amalgam eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Evaluate only the first N rows of each task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Rows per forward pass.
    #[serde(default = "batch_size")]
    pub batch_size: usize,
    /// CMA-ES settings.
    #[serde(default)]
    pub search: SearchParams,
}

fn batch_size() -> usize {
    32
}

impl SearchConfig {
    /// Read and check the config at `path`.
    pub fn load(path: &Path) -> Result<SearchConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        SearchConfig::parse(path, &text)
    }

    /// Parse and check config text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<SearchConfig> {
        let cfg: SearchConfig = serde_saphyr::from_str(text)
            .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        cfg.check()
            .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let g = &self.genome;
        if g.models.is_empty() {
            return Err("genome.models is empty: list the models to merge".into());
        }
        if matches!(
            g.merge_method,
            Method::TaskArithmetic | Method::Ties | Method::DareTies
        ) && g.base_model.is_none()
        {
            return Err(format!(
                "genome.merge_method {} needs genome.base_model",
                g.merge_method.name()
            ));
        }
        if g.merge_method == Method::Slerp {
            if g.models.len() < 2 {
                return Err("slerp needs at least two genome.models".into());
            }
            if g.smooth || !g.filters.is_empty() {
                return Err(
                    "slerp takes neither genome.smooth nor genome.filters (as mergekit-evolve)"
                        .into(),
                );
            }
        }
        if self.tasks.is_empty() {
            return Err("tasks is empty: give at least one task file to score merges on".into());
        }
        for t in &self.tasks {
            if !(t.weight.is_finite() && t.weight >= 0.0) {
                return Err(format!(
                    "task {}: weight {} must be a finite number ≥ 0",
                    t.task.display(),
                    t.weight
                ));
            }
        }
        if self.tasks.iter().all(|t| t.weight == 0.0) {
            return Err("every task has weight 0: the objective would be empty".into());
        }
        let s = &self.search;
        if !(s.sigma0.is_finite() && s.sigma0 > 0.0) {
            return Err(format!(
                "search.sigma0 {} must be a positive number",
                s.sigma0
            ));
        }
        if s.population.is_some_and(|p| p < 2) {
            return Err("search.population must be at least 2".into());
        }
        if s.max_evals == 0 {
            return Err("search.max_evals must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if self.limit == Some(0) {
            return Err("limit must be at least 1".into());
        }
        Ok(())
    }

    /// The config with every relative path (models, base, tasks, heads) made absolute against
    /// `cwd`, for trials that run in another directory or on another machine.
    pub fn absolute(&self, cwd: &Path) -> SearchConfig {
        let abs = |p: &Path| {
            if p.is_relative() {
                cwd.join(p)
            } else {
                p.to_path_buf()
            }
        };
        let model = |m: &String| -> String {
            m.split('+')
                .map(|part| abs(Path::new(part)).display().to_string())
                .collect::<Vec<_>>()
                .join("+")
        };
        let mut c = self.clone();
        c.genome.models = c.genome.models.iter().map(model).collect();
        c.genome.base_model = c.genome.base_model.as_ref().map(model);
        for t in &mut c.tasks {
            t.task = abs(&t.task);
            t.head = t.head.as_deref().map(abs);
        }
        c
    }

    /// A hash of everything that decides the trials (all but `search.max_evals`, so a finished
    /// search can be extended): a results file records it and refuses another config's.
    pub fn hash(&self) -> String {
        let mut c = self.clone();
        c.search.max_evals = 0;
        let json = serde_json::to_string(&c).expect("config serialises");
        blake3::hash(json.as_bytes()).to_hex()[..16].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SearchConfig> {
        SearchConfig::parse(Path::new("s.yml"), text)
    }

    const OK: &str = "genome:\n  models: [a, b]\n  merge_method: ties\n  base_model: base\n\
                      tasks:\n  - task: t.jsonl\n    head: h.safetensors\n";

    #[test]
    fn defaults_are_mergekit_evolves() {
        let c = parse(OK).unwrap();
        assert_eq!(c.search.sigma0, 1.0 / 6.0);
        assert_eq!(c.search.max_evals, 100);
        assert_eq!(c.genome.layer_granularity, 0);
        assert_eq!(c.tasks[0].weight, 1.0);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases = [
            (
                OK.replace("  base_model: base\n", ""),
                "needs genome.base_model",
            ),
            (OK.replace("tasks:", "task:"), "unknown field"),
            (OK.replace("ties", "della"), "unknown variant"),
            (format!("{OK}search: {{sigma0: -1}}\n"), "sigma0"),
            (format!("{OK}search: {{population: 1}}\n"), "population"),
            (format!("{OK}search: {{max_evals: 0}}\n"), "max_evals"),
            (OK.replace("head: h.safetensors", "weight: -2"), "weight -2"),
            (
                OK.replace("models: [a, b]", "models: []"),
                "models is empty",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("s.yml: ") && e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn the_hash_ignores_max_evals_only() {
        let a = parse(OK).unwrap();
        let b = parse(&format!("{OK}search: {{max_evals: 7}}\n")).unwrap();
        let c = parse(&format!("{OK}search: {{seed: 1}}\n")).unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn absolute_paths_keep_adapters() {
        let mut c = parse(OK).unwrap();
        c.genome.models[0] = "a+lora".into();
        let abs = c.absolute(Path::new("/w"));
        assert_eq!(abs.genome.models, ["/w/a+/w/lora", "/w/b"]);
        assert_eq!(
            abs.tasks[0].head.as_deref(),
            Some(Path::new("/w/h.safetensors"))
        );
    }
}
