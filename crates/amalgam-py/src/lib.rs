//! Python bindings of amalgam: the `amalgam._amalgam` extension module, wrapped by the
//! `amalgam` package (`python/amalgam/__init__.py`). Work runs on a thread of its own without
//! the GIL while the calling thread watches for Ctrl-C; errors become `amalgam.AmalgamError`
//! with the message the CLI prints.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use amalgam::DType;
use amalgam::io::{Existing, Model, parse_shard_size};
use amalgam::ops::{convert as convert_op, diff, inspect, merge as merge_op};
use amalgam::progress::Progress;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    _amalgam,
    AmalgamError,
    PyException,
    "An amalgam operation failed; the message says what and where, as the CLI prints it."
);

fn to_py(e: amalgam::Error) -> PyErr {
    AmalgamError::new_err(e.to_string())
}

/// Progress reported to an optional Python callable `progress(done_bytes, total_bytes)`;
/// warnings go to Python's `warnings.warn`. A callback that raises stops the work.
struct PyProgress {
    callback: Option<Py<PyAny>>,
    total: AtomicU64,
    done: AtomicU64,
    failed: Mutex<Option<PyErr>>,
}

impl PyProgress {
    fn new(callback: Option<Py<PyAny>>) -> PyProgress {
        PyProgress {
            callback,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: Mutex::new(None),
        }
    }

    fn report(&self) {
        let Some(cb) = &self.callback else { return };
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        Python::attach(|py| {
            if let Err(e) = cb.call1(py, (done, total)) {
                amalgam::cancel::cancel();
                self.failed.lock().expect("not poisoned").get_or_insert(e);
            }
        });
    }
}

impl Progress for PyProgress {
    fn start(&self, _tensors: u64, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.report();
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.report();
    }
    fn warn(&self, message: &str) {
        Python::attach(|py| {
            let _ = py
                .import("warnings")
                .and_then(|w| w.call_method1("warn", (message,)));
        });
    }
}

/// Run `f` on a thread of its own, on a pool of `threads` workers (default: all cores), without
/// the GIL; the calling thread checks for signals (Ctrl-C) every 50 ms and cancels the work,
/// which then removes its partial output.
fn run<T: Send, E: std::fmt::Display + Send>(
    py: Python<'_>,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    f: impl FnOnce(&dyn Progress) -> Result<T, E> + Send,
) -> PyResult<T> {
    let progress = &PyProgress::new(progress);
    amalgam::cancel::reset();
    let result = std::thread::scope(|s| {
        let worker = s.spawn(move || -> Result<T, String> {
            let mut pool = rayon::ThreadPoolBuilder::new();
            if let Some(n) = threads {
                pool = pool.num_threads(n);
            }
            let pool = pool.build().map_err(|e| format!("invalid threads: {e}"))?;
            pool.install(|| f(progress)).map_err(|e| e.to_string())
        });
        let mut interrupted = None;
        while !worker.is_finished() {
            py.detach(|| std::thread::sleep(std::time::Duration::from_millis(50)));
            if interrupted.is_none()
                && let Err(e) = py.check_signals()
            {
                amalgam::cancel::cancel();
                interrupted = Some(e);
            }
        }
        let out = py
            .detach(|| worker.join())
            .expect("the worker does not panic");
        match interrupted {
            Some(e) => Err(e),
            None => out.map_err(AmalgamError::new_err),
        }
    });
    amalgam::cancel::reset();
    if let Some(e) = progress.failed.lock().expect("not poisoned").take() {
        return Err(e);
    }
    result
}

fn existing(overwrite: bool) -> Existing {
    if overwrite {
        Existing::Replace
    } else {
        Existing::Refuse
    }
}

/// A float dtype by name (bf16, f16, f32, f64 or the torch names).
fn float_dtype(name: Option<&str>) -> PyResult<Option<DType>> {
    name.map(|d| {
        DType::parse_float(d).ok_or_else(|| {
            AmalgamError::new_err(format!(
                "invalid dtype: '{d}' is not a float dtype (bf16, f16, f32, f64)"
            ))
        })
    })
    .transpose()
}

fn shard(size: Option<&str>) -> PyResult<Option<u64>> {
    size.map(parse_shard_size).transpose().map_err(to_py)
}

/// Merge as the YAML config at `config` says into `output`; returns the output directory.
#[pyfunction]
#[pyo3(signature = (config, output, *, threads=None, seed=0, out_shard_size="5B", overwrite=false, allow_crimes=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    config: PathBuf,
    output: PathBuf,
    threads: Option<usize>,
    seed: u64,
    out_shard_size: Option<&str>,
    overwrite: bool,
    allow_crimes: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = merge_op::MergeOptions {
        shard_size: shard(out_shard_size)?,
        existing: existing(overwrite),
        seed,
        plan: amalgam::plan::PlanOptions {
            allow_crimes,
            ..Default::default()
        },
        ..Default::default()
    };
    let out = run(py, threads, progress, |bar| {
        merge_op::merge(&config, &output, &opts, bar)
    })?;
    Ok(out.display().to_string())
}

/// `amalgam inspect --json` as a JSON string.
#[pyfunction]
#[pyo3(signature = (path, *, top=10))]
fn inspect_json(py: Python<'_>, path: PathBuf, top: usize) -> PyResult<String> {
    let r = py.detach(|| inspect::inspect(&path, top)).map_err(to_py)?;
    Ok(serde_json::to_string(&r).expect("json"))
}

/// `amalgam diff --json` as a JSON string.
#[pyfunction]
#[pyo3(signature = (a, b, *, rtol=0.0))]
fn diff_json(py: Python<'_>, a: PathBuf, b: PathBuf, rtol: f64) -> PyResult<String> {
    let r = py.detach(|| diff::diff(&a, &b, rtol)).map_err(to_py)?;
    Ok(serde_json::to_string(&r).expect("json"))
}

/// Rewrite a model with another float dtype and/or sharding.
#[pyfunction]
#[pyo3(signature = (input, output, *, dtype=None, out_shard_size=None, overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    dtype: Option<&str>,
    out_shard_size: Option<&str>,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = convert_op::ConvertOptions {
        dtype: float_dtype(dtype)?,
        shard_size: shard(out_shard_size)?,
        existing: existing(overwrite),
    };
    let out = run(py, threads, progress, |bar| {
        convert_op::convert(&input, &output, &opts, bar)
    })?;
    Ok(out.display().to_string())
}

/// Bake a PEFT adapter into its base model.
#[pyfunction]
#[pyo3(signature = (base, adapter, output, *, scale=1.0, out_shard_size=None, overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn lora_apply(
    py: Python<'_>,
    base: PathBuf,
    adapter: PathBuf,
    output: PathBuf,
    scale: f64,
    out_shard_size: Option<&str>,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = amalgam::ops::lora::ApplyOptions {
        scale,
        shard_size: shard(out_shard_size)?,
        existing: existing(overwrite),
    };
    let out = run(py, threads, progress, |bar| {
        amalgam::ops::lora::apply(&base, &adapter, &output, &opts, bar)
    })?;
    Ok(out.display().to_string())
}

/// `lora extract`: a PEFT adapter approximating `model − base`; returns `lora extract --json`'s
/// report as a JSON string.
#[pyfunction]
#[pyo3(signature = (base, model, output, *, rank=128, energy=None, distribute_scale=true, embed_lora=false, save_modules=Vec::new(), include=Vec::new(), exclude=Vec::new(), sv_epsilon=0.0, skip_undecomposable=false, exact=false, seed=0, overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn lora_extract(
    py: Python<'_>,
    base: PathBuf,
    model: PathBuf,
    output: PathBuf,
    rank: usize,
    energy: Option<f64>,
    distribute_scale: bool,
    embed_lora: bool,
    save_modules: Vec<String>,
    include: Vec<String>,
    exclude: Vec<String>,
    sv_epsilon: f64,
    skip_undecomposable: bool,
    exact: bool,
    seed: u64,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = amalgam::ops::lora::ExtractOptions {
        rank,
        energy,
        distribute_scale,
        embed_lora,
        save_modules,
        include,
        exclude,
        sv_epsilon,
        skip_undecomposable,
        exact,
        seed,
        existing: existing(overwrite),
    };
    let report = run(py, threads, progress, |bar| {
        amalgam::ops::lora::extract(&base, &model, &output, &opts, bar)
    })?;
    Ok(report.to_json().to_string())
}

/// `lora merge`: compose adapters as the YAML config at `config` says; returns each module's
/// rank as a JSON object.
#[pyfunction]
#[pyo3(signature = (config, output, *, overwrite=false, threads=None, progress=None))]
fn lora_merge(
    py: Python<'_>,
    config: PathBuf,
    output: PathBuf,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let ranks = run(py, threads, progress, |bar| {
        let cfg = amalgam::ops::lora::LoraMergeConfig::load(&config)?;
        amalgam::ops::lora::merge(&config, &cfg, &output, existing(overwrite), bar)
    })?;
    Ok(serde_json::to_string(&ranks).expect("json"))
}

/// `library export-lora`: task `task` of a library as a PEFT adapter; returns the extraction
/// report as a JSON string.
#[pyfunction]
#[pyo3(signature = (library, task, output, *, rank, energy=None, base=None, exact=false, embed_lora=false, overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn library_export_lora(
    py: Python<'_>,
    library: PathBuf,
    task: String,
    output: PathBuf,
    rank: usize,
    energy: Option<f64>,
    base: Option<PathBuf>,
    exact: bool,
    embed_lora: bool,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = amalgam::ops::lora::ExtractOptions {
        rank,
        energy,
        exact,
        embed_lora,
        existing: existing(overwrite),
        ..Default::default()
    };
    let report = run(py, threads, progress, |bar| {
        amalgam::library::export_lora(&library, &task, base.as_deref(), &output, &opts, bar)
    })?;
    Ok(report.to_json().to_string())
}

/// Build a task library from its YAML config into `output`; returns the library's summary as
/// JSON (what `library info --json` prints).
#[pyfunction]
#[pyo3(signature = (config, output, *, seed=0, shard_size="5B", overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn library_build(
    py: Python<'_>,
    config: PathBuf,
    output: PathBuf,
    seed: u64,
    shard_size: Option<&str>,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = amalgam::library::BuildOptions {
        existing: existing(overwrite),
        seed,
        chunk_elements: 0,
        input_cache: None,
        shard_size: shard(shard_size)?,
    };
    let manifest = run(py, threads, progress, |bar| {
        amalgam::library::build(&config, &output, &opts, bar)
    })?;
    Ok(manifest.summary(&output).to_string())
}

/// Rebuild task `task` of the library at `library` into `output`.
#[pyfunction]
#[pyo3(signature = (library, task, output, *, base=None, dtype=None, out_shard_size="5B", overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn library_rebuild(
    py: Python<'_>,
    library: PathBuf,
    task: String,
    output: PathBuf,
    base: Option<PathBuf>,
    dtype: Option<&str>,
    out_shard_size: Option<&str>,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = amalgam::library::RebuildOptions {
        base,
        existing: existing(overwrite),
        shard_size: shard(out_shard_size)?,
        out_dtype: float_dtype(dtype)?,
        chunk_elements: 0,
    };
    let out = run(py, threads, progress, |bar| {
        amalgam::library::rebuild(&library, &task, &output, &opts, bar)
    })?;
    Ok(out.display().to_string())
}

/// `library info --json` of the library at `library`.
#[pyfunction]
fn library_info_json(py: Python<'_>, library: PathBuf) -> PyResult<String> {
    let lib = py
        .detach(|| amalgam::library::Library::open(&library))
        .map_err(to_py)?;
    Ok(lib.manifest.summary(&library).to_string())
}

/// `amalgam eval --json` (without routing) as a JSON string: each task's accuracy (with a
/// head) or loss and perplexity, and an MoE's expert fractions.
#[pyfunction]
#[pyo3(signature = (model, tasks, *, heads=Vec::new(), max_len=None, limit=None, batch_size=32, library_task=None, base=None, threads=None))]
#[allow(clippy::too_many_arguments)]
fn eval_json(
    py: Python<'_>,
    model: PathBuf,
    tasks: Vec<PathBuf>,
    heads: Vec<PathBuf>,
    max_len: Option<usize>,
    limit: Option<usize>,
    batch_size: usize,
    library_task: Option<String>,
    base: Option<PathBuf>,
    threads: Option<usize>,
) -> PyResult<String> {
    use amalgam_eval::{Evaluator, Task};
    // The CLI's checks and messages.
    if batch_size == 0 {
        return Err(AmalgamError::new_err("--batch-size must be at least 1"));
    }
    if limit == Some(0) {
        return Err(AmalgamError::new_err("--limit must be at least 1"));
    }
    if tasks.is_empty() {
        return Err(AmalgamError::new_err("no task given"));
    }
    let rows = run(py, threads, None, |_| -> Result<_, String> {
        let tasks = tasks
            .iter()
            .map(|p| Task::load(p, limit))
            .collect::<amalgam_eval::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let mut ev = match &library_task {
            Some(t) => Evaluator::open_library(&model, t, base.as_deref(), max_len),
            None => Evaluator::open(&model, max_len),
        }
        .map_err(|e| format!("loading {}: {e}", model.display()))?;
        ev.batch_size = batch_size;
        let heads = amalgam_eval::head::heads_for(&tasks, &heads, ev.hidden_size())
            .map_err(|e| e.to_string())?;
        tasks
            .iter()
            .zip(&heads)
            .map(|(t, h)| ev.evaluate(t, h.as_ref(), &|_| {}))
            .collect::<amalgam_eval::Result<Vec<_>>>()
            .map_err(|e| e.to_string())
    })?;
    Ok(serde_json::json!({ "tasks": rows }).to_string())
}

/// Build a mixture-of-experts model from a mergekit-moe config; returns `amalgam moe --json`'s
/// report as a JSON string.
#[pyfunction]
#[pyo3(signature = (config, output, *, layout="v5", seed=0, allow_identical_experts=false, out_shard_size="5B", overwrite=false, threads=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn moe(
    py: Python<'_>,
    config: PathBuf,
    output: PathBuf,
    layout: &str,
    seed: u64,
    allow_identical_experts: bool,
    out_shard_size: Option<&str>,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    use amalgam::moe::{Layout, MoeOptions, PrepareOptions};
    let layout = match layout {
        "v5" => Layout::V5,
        "legacy" => Layout::Legacy,
        other => {
            return Err(AmalgamError::new_err(format!(
                "invalid layout: '{other}' (v5 or legacy)"
            )));
        }
    };
    let opts = MoeOptions {
        shard_size: shard(out_shard_size)?,
        existing: existing(overwrite),
        seed,
    };
    let report = run(py, threads, progress, |bar| {
        let prepared = amalgam::moe::prepare(
            &config,
            PrepareOptions {
                layout,
                allow_identical: allow_identical_experts,
            },
        )?;
        amalgam::moe::build(
            &prepared,
            &output,
            &opts,
            &mut |p| amalgam_eval::moe_gate::encoder_for(p, Box::new(|_| {})),
            bar,
        )
    })?;
    Ok(serde_json::to_string(&report).expect("json"))
}

/// A model opened for reading: a lazy mapping from tensor names to numpy arrays.
#[pyclass(name = "Model", module = "amalgam", frozen)]
struct PyModel {
    inner: Model,
}

/// The numpy dtype string of a stored dtype numpy holds as it is (`None`: converted).
fn numpy_dtype(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::Bool => "?",
        DType::U8 => "u1",
        DType::I8 => "i1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::F16 => "<f2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        _ => return None,
    })
}

#[pymethods]
impl PyModel {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<PyModel> {
        let inner = py.detach(|| Model::open(&path)).map_err(to_py)?;
        Ok(PyModel { inner })
    }

    /// Tensor names, in file order.
    fn keys(&self) -> Vec<String> {
        self.inner
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    fn __len__(&self) -> usize {
        self.inner.tensors().len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    /// The tensor as a numpy array: its own dtype, except bfloat16 and 8-bit floats, which
    /// numpy lacks, as float32 (bfloat16 exactly; 8-bit floats refused).
    fn __getitem__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let view = self
            .inner
            .tensor(name)
            .map_err(|_| PyKeyError::new_err(name.to_string()))?;
        let shape = view.shape.to_vec();
        let np = py.import("numpy")?;
        let (bytes, dtype) = match numpy_dtype(view.dtype) {
            Some(d) => (PyBytes::new(py, view.bytes), d),
            None if view.dtype == DType::BF16 => {
                let mut values = Vec::new();
                amalgam::dtype::decode_f32(DType::BF16, view.bytes, &mut values);
                let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (PyBytes::new(py, &raw), "<f4")
            }
            None => {
                return Err(AmalgamError::new_err(format!(
                    "{}: tensor {name} has dtype {}, which numpy cannot hold",
                    self.inner.path.display(),
                    view.dtype
                )));
            }
        };
        self.inner.release(name);
        let array = np.call_method1("frombuffer", (bytes, dtype))?;
        array.call_method1("reshape", (shape,))
    }

    /// The stored dtype of tensor `name` (safetensors' name: `F32`, `BF16`, ...).
    fn dtype(&self, name: &str) -> PyResult<String> {
        let e = self
            .inner
            .entry(name)
            .map_err(|_| PyKeyError::new_err(name.to_string()))?;
        Ok(e.dtype.safetensors_name().to_string())
    }

    /// The shape of tensor `name`.
    fn shape(&self, name: &str) -> PyResult<Vec<usize>> {
        let e = self
            .inner
            .entry(name)
            .map_err(|_| PyKeyError::new_err(name.to_string()))?;
        Ok(e.shape.clone())
    }

    /// The folder's `config.json` as a JSON string, if it has one.
    fn config_json(&self) -> Option<String> {
        self.inner.config().map(|c| c.to_string())
    }

    /// The path it was opened from.
    #[getter]
    fn path(&self) -> String {
        self.inner.path.display().to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "amalgam.Model({:?}, {} tensors)",
            self.inner.path.display().to_string(),
            self.inner.tensors().len()
        )
    }
}

/// Whether `p` exists (used by the Python wrapper to tell a config path from YAML text).
#[pyfunction]
fn _is_file(p: &str) -> bool {
    Path::new(p).is_file()
}

/// A search in progress (`amalgam search`'s driver): CMA-ES replayed from its results file.
/// Backends ask it for the pending trials of the current generation, run them anywhere
/// (`search_trial`), and record each outcome; only this object writes the results file.
#[pyclass(name = "Search", module = "amalgam._amalgam")]
struct PySearch {
    inner: amalgam_search::Search,
}

fn search_err(e: amalgam_search::Error) -> PyErr {
    AmalgamError::new_err(e.to_string())
}

#[pymethods]
impl PySearch {
    /// Start, or resume, the search of the config file `config` recorded in `results`.
    #[new]
    fn new(py: Python<'_>, config: PathBuf, results: PathBuf) -> PyResult<PySearch> {
        let inner = py
            .detach(|| {
                let cfg = amalgam_search::SearchConfig::load(&config)?;
                amalgam_search::Search::open(cfg, &results)
            })
            .map_err(search_err)?;
        Ok(PySearch { inner })
    }

    /// Whether every generation has run.
    #[getter]
    fn finished(&self) -> bool {
        self.inner.finished()
    }

    /// Trials the search runs in all.
    #[getter]
    fn total_trials(&self) -> usize {
        self.inner.total_trials()
    }

    /// The config's hash (what the results file is tied to).
    #[getter]
    fn config_hash(&self) -> String {
        self.inner.config.hash()
    }

    /// Warnings from opening the results file (a torn last line dropped).
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings.clone()
    }

    /// The current generation's trials still to run: `[(trial, genotype)]`.
    fn pending(&self) -> Vec<(usize, Vec<f64>)> {
        self.inner
            .pending()
            .into_iter()
            .map(|t| (t.trial, t.x))
            .collect()
    }

    /// Record trial `trial`'s outcome (`search_trial`'s JSON); returns the record as JSON.
    fn record(&mut self, trial: usize, outcome: &str) -> PyResult<String> {
        let outcome: amalgam_search::Outcome = serde_json::from_str(outcome)
            .map_err(|e| AmalgamError::new_err(format!("trial {trial}: bad outcome: {e}")))?;
        let r = self.inner.record(trial, outcome).map_err(search_err)?;
        Ok(serde_json::to_string(r).expect("json"))
    }

    /// Every recorded trial as JSON lines' objects, in trial order (a JSON array).
    fn records_json(&self) -> String {
        serde_json::to_string(&self.inner.records().collect::<Vec<_>>()).expect("json")
    }

    /// The merge config of genotype `x` (JSON).
    fn merge_config_json(&self, x: Vec<f64>) -> PyResult<String> {
        if x.len() != self.inner.layout().dimension() {
            return Err(AmalgamError::new_err(format!(
                "a genotype of this search has {} values, not {}",
                self.inner.layout().dimension(),
                x.len()
            )));
        }
        Ok(self.inner.merge_config(&x).to_string())
    }

    /// Write the best trial's merge config (YAML); returns whether there was one.
    fn write_best(&self, path: PathBuf) -> PyResult<bool> {
        self.inner.write_best(&path).map_err(search_err)
    }

    /// Write the SVG plot of the objective against trials.
    fn write_plot(&self, path: PathBuf) -> PyResult<()> {
        self.inner.write_plot(&path).map_err(search_err)
    }

    /// The summary `amalgam search --json` prints (JSON).
    fn summary_json(&self) -> String {
        self.inner.summary().to_string()
    }

    /// Run the rest of the search here, `jobs` trials at a time; `progress(record_json)` is
    /// called after each trial.
    #[pyo3(signature = (*, scratch, jobs=1, threads=None, progress=None))]
    fn run_local(
        &mut self,
        py: Python<'_>,
        scratch: PathBuf,
        jobs: usize,
        threads: Option<usize>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        if jobs == 0 {
            return Err(AmalgamError::new_err("--jobs must be at least 1"));
        }
        let inner = &mut self.inner;
        let failed: Mutex<Option<PyErr>> = Mutex::new(None);
        let result = run(py, threads, None, |_| {
            let opts = amalgam_search::LocalOptions {
                jobs,
                threads,
                scratch,
            };
            amalgam_search::run_local(inner, &opts, &mut |_, r| {
                let Some(cb) = &progress else { return };
                let line = serde_json::to_string(r).expect("json");
                Python::attach(|py| {
                    if let Err(e) = cb.call1(py, (line,)) {
                        amalgam::cancel::cancel();
                        failed.lock().expect("not poisoned").get_or_insert(e);
                    }
                });
            })
        });
        if let Some(e) = failed.lock().expect("not poisoned").take() {
            return Err(e);
        }
        result
    }
}

/// Run one trial of the search config `config` (YAML text; `name` names it in errors, `cwd`
/// is where its relative paths start): merge genotype `x` into `scratch`, evaluate, delete;
/// returns the outcome as JSON for `Search.record`. What a Ray task runs.
#[pyfunction]
#[pyo3(signature = (config, name, cwd, trial, x, scratch, *, threads=None))]
#[allow(clippy::too_many_arguments)]
fn search_trial(
    py: Python<'_>,
    config: String,
    name: PathBuf,
    cwd: PathBuf,
    trial: usize,
    x: Vec<f64>,
    scratch: PathBuf,
    threads: Option<usize>,
) -> PyResult<String> {
    let outcome = run(py, threads, None, |_| -> Result<_, amalgam_search::Error> {
        let cfg = amalgam_search::SearchConfig::parse(&name, &config)?.absolute(&cwd);
        let layout = amalgam_search::genome::Layout::new(&cfg.genome)?;
        if x.len() != layout.dimension() {
            return Err(amalgam_search::Error::new(format!(
                "trial {trial}: a genotype of this search has {} values, not {}",
                layout.dimension(),
                x.len()
            )));
        }
        amalgam_search::trial::run(&cfg, &layout, trial, &x, &scratch)
    })?;
    Ok(serde_json::to_string(&outcome).expect("json"))
}

#[pymodule]
fn _amalgam(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("AmalgamError", m.py().get_type::<AmalgamError>())?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_json, m)?)?;
    m.add_function(wrap_pyfunction!(diff_json, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(lora_apply, m)?)?;
    m.add_function(wrap_pyfunction!(library_build, m)?)?;
    m.add_function(wrap_pyfunction!(library_rebuild, m)?)?;
    m.add_function(wrap_pyfunction!(library_info_json, m)?)?;
    m.add_function(wrap_pyfunction!(eval_json, m)?)?;
    m.add_function(wrap_pyfunction!(moe, m)?)?;
    m.add_function(wrap_pyfunction!(lora_extract, m)?)?;
    m.add_function(wrap_pyfunction!(lora_merge, m)?)?;
    m.add_function(wrap_pyfunction!(library_export_lora, m)?)?;
    m.add_function(wrap_pyfunction!(_is_file, m)?)?;
    m.add_function(wrap_pyfunction!(search_trial, m)?)?;
    m.add_class::<PySearch>()?;
    m.add_class::<PyModel>()?;
    Ok(())
}
