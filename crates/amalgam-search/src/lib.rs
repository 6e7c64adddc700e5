//! amalgam-search: choose a merge's parameters by searching them against evaluations.
//!
//! A search config names a genome (mergekit-evolve's: models, method, per-layer-group and
//! per-filter weights and densities) and the tasks that score a merge; CMA-ES proposes
//! genotypes a generation at a time, each trial merges one into scratch, evaluates it with
//! `amalgam eval`'s machinery and deletes it. Every trial lands in a results file (JSON lines)
//! from which a search resumes exactly; the best config is an ordinary merge YAML.
//!
//! Data flows one way: [`config`] → [`genome`] (genotype → merge config) → [`trial`] (merge,
//! eval) → [`results`]; [`Search`] drives [`cmaes`] over them and is what the CLI's local
//! backend ([`run_local`]) and the Python package's Ray backend both use, so they give the same
//! trials.

pub mod cmaes;
pub mod config;
pub mod genome;
pub mod plot;
pub mod results;
pub mod trial;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub use config::SearchConfig;
pub use results::{Outcome, Record};

/// A search failed: the message says what and where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

/// This crate's results.
pub type Result<T> = std::result::Result<T, Error>;

/// One trial to run.
#[derive(Clone, Debug)]
pub struct Trial {
    /// Its number.
    pub trial: usize,
    /// Its generation.
    pub generation: usize,
    /// The genotype.
    pub x: Vec<f64>,
}

/// A search in progress: the CMA-ES state replayed from the results file, and what is left.
pub struct Search {
    /// The config (paths as written).
    pub config: SearchConfig,
    layout: genome::Layout,
    es: cmaes::Cmaes,
    generations: usize,
    current: Vec<Vec<f64>>,
    records: BTreeMap<usize, Record>,
    results: results::Results,
    /// Warnings from opening the results file.
    pub warnings: Vec<String>,
}

impl Search {
    /// Start or resume the search of `config` recorded in `results`.
    pub fn open(config: SearchConfig, results: &Path) -> Result<Search> {
        let layout = genome::Layout::new(&config.genome)?;
        Search::with_layout(config, layout, results)
    }

    /// [`Search::open`] with the genome's layout given.
    pub fn with_layout(
        config: SearchConfig,
        layout: genome::Layout,
        results: &Path,
    ) -> Result<Search> {
        let n = layout.dimension();
        let lambda = config
            .search
            .population
            .unwrap_or(cmaes::default_population(n));
        let header = results::Header {
            amalgam_search: 1,
            config: config.hash(),
            dimension: n,
            population: lambda,
        };
        let (file, recorded, warning) = results::Results::open(results, &header)?;
        let es = cmaes::Cmaes::new(
            layout.initial(),
            config.search.sigma0,
            lambda,
            config.search.seed,
        );
        let generations = config.search.max_evals.div_ceil(lambda);
        let mut s = Search {
            config,
            layout,
            es,
            generations,
            current: Vec::new(),
            records: BTreeMap::new(),
            results: file,
            warnings: warning.into_iter().collect(),
        };
        for r in recorded {
            if r.trial / lambda != r.generation || r.x.len() != n {
                return Err(Error::new(format!(
                    "{}: trial {} does not fit this search (generation {}, {} values)",
                    results.display(),
                    r.trial,
                    r.generation,
                    r.x.len()
                )));
            }
            s.records.insert(r.trial, r);
        }
        s.advance()?;
        Ok(s)
    }

    /// The genome's layout.
    pub fn layout(&self) -> &genome::Layout {
        &self.layout
    }

    fn lambda(&self) -> usize {
        self.es.population()
    }

    /// Tell CMA-ES every finished generation and sample the next, checking recorded trials
    /// against what the seed gives.
    fn advance(&mut self) -> Result<()> {
        loop {
            if self.es.generation() >= self.generations {
                self.current.clear();
                return Ok(());
            }
            let g = self.es.generation();
            let lambda = self.lambda();
            self.current = self.es.ask();
            let mut values = Vec::with_capacity(lambda);
            for (i, x) in self.current.iter().enumerate() {
                let Some(r) = self.records.get(&(g * lambda + i)) else {
                    return Ok(());
                };
                if &r.x != x {
                    return Err(Error::new(format!(
                        "{}: trial {}'s genotype is not the one this config's seed gives; the \
                         file was written by another search (or amalgam version) — give another \
                         --results path",
                        self.results.path().display(),
                        r.trial
                    )));
                }
                values.push(-r.outcome.objective);
            }
            self.es.tell(&values);
        }
    }

    /// Whether every generation has been run.
    pub fn finished(&self) -> bool {
        self.current.is_empty()
    }

    /// The trials of the current generation still to run (none once finished).
    pub fn pending(&self) -> Vec<Trial> {
        let g = self.es.generation();
        let lambda = self.lambda();
        self.current
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.records.contains_key(&(g * lambda + i)))
            .map(|(i, x)| Trial {
                trial: g * lambda + i,
                generation: g,
                x: x.clone(),
            })
            .collect()
    }

    /// Record a finished trial (it must be pending); the next generation starts once the
    /// current one is complete.
    pub fn record(&mut self, trial: usize, outcome: Outcome) -> Result<&Record> {
        let Some(t) = self.pending().into_iter().find(|t| t.trial == trial) else {
            return Err(Error::new(format!(
                "trial {trial} is not pending in this search"
            )));
        };
        let r = Record {
            trial,
            generation: t.generation,
            x: t.x,
            outcome,
        };
        self.results.append(&r)?;
        self.records.insert(trial, r);
        self.advance()?;
        Ok(&self.records[&trial])
    }

    /// Trials the search runs in all (whole generations).
    pub fn total_trials(&self) -> usize {
        self.generations * self.lambda()
    }

    /// The recorded trials, in trial order.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// The trial with the largest objective (the earliest among equals).
    pub fn best(&self) -> Option<&Record> {
        self.records
            .values()
            .fold(None, |best: Option<&Record>, r| match best {
                Some(b) if b.outcome.objective >= r.outcome.objective => Some(b),
                _ => Some(r),
            })
    }

    /// The merge config genotype `x` stands for.
    pub fn merge_config(&self, x: &[f64]) -> Value {
        self.layout.merge_config(x)
    }

    /// Write the best trial's merge config as YAML to `path` (a comment names the trial and
    /// its scores); returns whether there was a trial to write.
    pub fn write_best(&self, path: &Path) -> Result<bool> {
        let Some(b) = self.best() else {
            return Ok(false);
        };
        let mut text = format!(
            "# amalgam search: best of {} trials: trial {} (generation {}), objective {}\n",
            self.records.len(),
            b.trial,
            b.generation,
            b.outcome.objective
        );
        for t in &b.outcome.tasks {
            text.push_str(&format!("#   {t}\n"));
        }
        text.push_str(&trial::yaml(&self.merge_config(&b.x)));
        write_whole(path, text.as_bytes())?;
        Ok(true)
    }

    /// Write the SVG plot of objective against trials to `path`.
    pub fn write_plot(&self, path: &Path) -> Result<()> {
        let records: Vec<&Record> = self.records.values().collect();
        let title = format!(
            "amalgam search: {} ({} trials)",
            self.config.genome.merge_method.name(),
            records.len()
        );
        write_whole(path, plot::svg(&records, &title).as_bytes())
    }

    /// A JSON summary: trials, the best one with its config, mean seconds per trial.
    pub fn summary(&self) -> Value {
        let n = self.records.len().max(1) as f64;
        let merge: f64 = self.records.values().map(|r| r.outcome.merge_seconds).sum();
        let eval: f64 = self.records.values().map(|r| r.outcome.eval_seconds).sum();
        json!({
            "trials": self.records.len(),
            "total_trials": self.total_trials(),
            "finished": self.finished(),
            "dimension": self.layout.dimension(),
            "population": self.lambda(),
            "results": self.results.path(),
            "best": self.best().map(|b| json!({
                "trial": b.trial,
                "generation": b.generation,
                "objective": b.outcome.objective,
                "tasks": b.outcome.tasks,
                "x": b.x,
                "config": self.merge_config(&b.x),
            })),
            "mean_merge_seconds": merge / n,
            "mean_eval_seconds": eval / n,
        })
    }
}

/// Write `bytes` to `path` whole: beside it, then renamed over it.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let part = path.with_file_name(format!(".{name}.part"));
    std::fs::write(&part, bytes)
        .and_then(|()| std::fs::rename(&part, path))
        .map_err(|e| Error::new(format!("{}: {e}", path.display())))
}

/// Where a local search runs its trials.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Trials at once.
    pub jobs: usize,
    /// Threads in all (split between the jobs); `None`: all cores.
    pub threads: Option<usize>,
    /// Scratch directory for the trials' merged models.
    pub scratch: PathBuf,
}

/// Run the rest of `search` on this machine, `jobs` trials at a time; `on_trial` is called
/// with each recorded trial (from the calling thread).
pub fn run_local(
    search: &mut Search,
    opts: &LocalOptions,
    on_trial: &mut dyn FnMut(&Search, &Record),
) -> Result<()> {
    let jobs = opts.jobs.max(1);
    let threads = opts
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let per_job = (threads / jobs).max(1);
    let config = search.config.clone();
    let layout = search.layout.clone();
    while !search.finished() {
        if amalgam::cancel::is_cancelled() {
            return Err(Error::new("interrupted"));
        }
        let pending = search.pending();
        let queue = std::sync::Mutex::new(pending.into_iter());
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Outcome>)>();
        let mut failure = None;
        std::thread::scope(|s| {
            for _ in 0..jobs {
                let (tx, queue, config, layout) = (tx.clone(), &queue, &config, &layout);
                s.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(per_job)
                        .build()
                        .expect("a thread pool");
                    loop {
                        if amalgam::cancel::is_cancelled() {
                            return;
                        }
                        let next = queue.lock().expect("not poisoned").next();
                        let Some(t) = next else { return };
                        let out = pool
                            .install(|| trial::run(config, layout, t.trial, &t.x, &opts.scratch));
                        let failed = out.is_err();
                        if tx.send((t.trial, out)).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            for (id, out) in rx {
                match out.and_then(|o| search.record(id, o).cloned()) {
                    Ok(r) => on_trial(search, &r),
                    Err(e) => {
                        // Stop handing out trials; the running ones finish and are dropped.
                        queue.lock().expect("not poisoned").by_ref().for_each(drop);
                        failure.get_or_insert(e);
                    }
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
    }
    Ok(())
}
