//! Multi-stage merges: a multi-document YAML in mergekit-multi's schema. Every document is a
//! merge config; each but one has a `name`, and a model path equal to a stage's name (or
//! `name+adapter`) means that stage's output, `INTERMEDIATE_DIR/name`. The one unnamed stage is
//! the final merge and goes to the output directory. Stages run one after another, each as an
//! ordinary streamed merge (inputs before the stages that read them), so an intermediate model
//! is on disk, never in memory.
//!
//! A finished stage is reused while its config and its inputs are unchanged: each stage's output
//! directory holds `amalgam-stage.json`, a stamp with the stage's key (a BLAKE3 hash of the
//! stage's config as patched, the options that change the result, amalgam's version and the
//! BLAKE3 content hash of every input file, or the key of an input stage) and the size and
//! modification time of every file it wrote. A later run recomputes the key, re-reading an input
//! file only when its size or modification time differs from the one recorded, and rebuilds a
//! stage whose key or output files differ.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::MergeConfig;
use crate::error::{Error, IoContext, Result};
use crate::io::Existing;
use crate::ops::merge::{self, MergeOptions};
use crate::plan::{self, ModelSet};
use crate::progress::Progress;

/// The stamp's file name in a stage's output directory.
pub const STAMP: &str = "amalgam-stage.json";

/// Keys whose string values are model references (mergekit-multi patches these).
const MODEL_KEYS: [&str; 4] = ["base_model", "model", "tokenizer_source", "source"];

/// Weight formats amalgam does not read; a model directory's files of these kinds are not part
/// of a stage's inputs.
const UNREAD: [&str; 11] = [
    "bin", "pt", "pth", "ckpt", "h5", "msgpack", "onnx", "gguf", "pkl", "npz", "ot",
];

/// One stage.
#[derive(Debug)]
pub struct Stage {
    /// Its name; `None` for the final stage.
    pub name: Option<String>,
    /// Its config, model references to other stages replaced by their output directories.
    pub config: MergeConfig,
    /// The document as patched (what the key hashes).
    doc: Value,
    /// The stages whose outputs it reads (indices into [`Stages::stages`]).
    pub deps: Vec<usize>,
    /// Where it writes.
    pub out: PathBuf,
}

impl Stage {
    /// "stage 'name'" or "the final stage".
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("stage '{n}'"),
            None => "the final stage".into(),
        }
    }
}

/// The stages of a multi-stage config, in the order they run.
#[derive(Debug)]
pub struct Stages {
    /// Inputs before the stages that read them; otherwise in the file's order.
    pub stages: Vec<Stage>,
}

/// Whether YAML `text` is a multi-stage config: more than one document, or a document with a
/// `name`. Text that is not YAML is not multi-stage (the single-config reader reports it).
pub fn is_multi(text: &str) -> bool {
    match serde_saphyr::from_multiple::<Value>(text) {
        Ok(docs) => {
            let docs: Vec<_> = docs.into_iter().filter(|d| !d.is_null()).collect();
            docs.len() > 1 || docs.iter().any(|d| d.get("name").is_some())
        }
        Err(_) => false,
    }
}

/// Read a multi-stage config; named stages go to `intermediate/NAME`, the final one to
/// `output`.
pub fn load(path: &Path, intermediate: &Path, output: &Path) -> Result<Stages> {
    let err = |reason: String| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).at(path)?;
    let docs = serde_saphyr::from_multiple::<Value>(&text).map_err(|e| err(format!("{e}")))?;
    let mut named: Vec<(Option<String>, Value)> = Vec::new();
    for (i, mut doc) in docs.into_iter().filter(|d| !d.is_null()).enumerate() {
        let Some(map) = doc.as_object_mut() else {
            return Err(err(format!("document {} is not a mapping", i + 1)));
        };
        let name = match map.shift_remove("name") {
            None => None,
            Some(Value::String(n)) => Some(n),
            Some(other) => {
                return Err(err(format!(
                    "document {}: 'name' must be a string, not {other}",
                    i + 1
                )));
            }
        };
        if let Some(n) = &name {
            let bad = n.is_empty()
                || n == "."
                || n == ".."
                || n.contains(['/', '\\', '+'])
                || n.starts_with('.');
            if bad {
                return Err(err(format!(
                    "stage name '{n}' is not a plain directory name (no '/', '+', or leading '.')"
                )));
            }
            if n == "base" || n == "union" {
                return Err(err(format!(
                    "stage name '{n}' would be read as the tokenizer source keyword; rename the stage"
                )));
            }
        }
        if named.iter().any(|(m, _)| *m == name) {
            return Err(err(match &name {
                Some(n) => format!("two stages are named '{n}'"),
                None => "more than one unnamed stage: only the final stage has no name".into(),
            }));
        }
        named.push((name, doc));
    }
    if !named.iter().any(|(n, _)| n.is_none()) {
        return Err(err(
            "no unnamed final stage: the one stage without a 'name' is the merge written to the \
             output directory"
                .into(),
        ));
    }
    let index: HashMap<String, usize> = named
        .iter()
        .enumerate()
        .filter_map(|(i, (n, _))| n.clone().map(|n| (n, i)))
        .collect();
    let mut stages = Vec::new();
    for (name, mut doc) in named {
        let mut deps = BTreeSet::new();
        patch(&mut doc, &index, intermediate, &mut deps);
        let out = match &name {
            Some(n) => intermediate.join(n),
            None => output.to_path_buf(),
        };
        let what = match &name {
            Some(n) => format!("stage '{n}'"),
            None => "the final stage".into(),
        };
        let config = MergeConfig::from_value(path, &what, doc.clone())?;
        stages.push(Stage {
            name,
            config,
            doc,
            deps: deps.into_iter().collect(),
            out,
        });
    }
    let order = run_order(&stages).map_err(err)?;
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
    let mut slots: Vec<Option<Stage>> = stages.into_iter().map(Some).collect();
    let stages = order
        .iter()
        .map(|&i| {
            let mut s = slots[i].take().expect("each stage once");
            s.deps = s.deps.iter().map(|d| position[d]).collect();
            s
        })
        .collect();
    Ok(Stages { stages })
}

/// Replace model references that name a stage by the stage's directory, recording which.
fn patch(v: &mut Value, index: &HashMap<String, usize>, dir: &Path, deps: &mut BTreeSet<usize>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "parameters" {
                    continue;
                }
                match child {
                    Value::String(s) if MODEL_KEYS.contains(&k.as_str()) => {
                        if let Some(p) = patched(s, index, dir, deps) {
                            *s = p;
                        }
                    }
                    _ => patch(child, index, dir, deps),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| patch(c, index, dir, deps)),
        _ => {}
    }
}

fn patched(
    s: &str,
    index: &HashMap<String, usize>,
    dir: &Path,
    deps: &mut BTreeSet<usize>,
) -> Option<String> {
    let (model, adapter) = match s.rsplit_once('+') {
        Some((m, a)) if index.contains_key(m) => (m, Some(a)),
        _ => (s, None),
    };
    let &i = index.get(model)?;
    deps.insert(i);
    let path = dir.join(model).to_string_lossy().into_owned();
    Some(match adapter {
        Some(a) => format!("{path}+{a}"),
        None => path,
    })
}

/// Depth-first order: every stage after the stages it reads, otherwise the file's order.
fn run_order(stages: &[Stage]) -> std::result::Result<Vec<usize>, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        i: usize,
        stages: &[Stage],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> std::result::Result<(), String> {
        match marks[i] {
            Mark::Done => return Ok(()),
            Mark::Open => {
                let from = path.iter().position(|&p| p == i).unwrap_or(0);
                let cycle: Vec<String> = path[from..]
                    .iter()
                    .chain(std::iter::once(&i))
                    .map(|&p| stages[p].name.clone().unwrap_or_else(|| "(final)".into()))
                    .collect();
                return Err(format!(
                    "the stages read each other in a cycle: {}",
                    cycle.join(" -> ")
                ));
            }
            Mark::New => {}
        }
        marks[i] = Mark::Open;
        path.push(i);
        for &d in &stages[i].deps {
            visit(d, stages, marks, path, order)?;
        }
        path.pop();
        marks[i] = Mark::Done;
        order.push(i);
        Ok(())
    }
    let mut marks = vec![Mark::New; stages.len()];
    let mut order = Vec::new();
    // The final stage last unless something reads it (then the cycle check reports it).
    let final_stage = stages.iter().position(|s| s.name.is_none());
    for i in (0..stages.len()).filter(|&i| Some(i) != final_stage) {
        visit(i, stages, &mut marks, &mut Vec::new(), &mut order)?;
    }
    if let Some(f) = final_stage {
        visit(f, stages, &mut marks, &mut Vec::new(), &mut order)?;
    }
    if let Some(f) = final_stage
        && stages.iter().any(|s| s.deps.contains(&f))
    {
        return Err(
            "a stage reads the final (unnamed) stage; name it and add a final stage".into(),
        );
    }
    Ok(order)
}

/// What [`run`] did with a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Merged now.
    Built,
    /// Its output was up to date.
    Reused,
}

/// Options for [`run`].
#[derive(Clone, Debug, Default)]
pub struct StageOptions {
    /// The options of every stage's merge (`existing` applies to the final output only when it
    /// is not a stage output amalgam wrote).
    pub merge: MergeOptions,
    /// Rebuild every stage even when its output is up to date.
    pub rebuild: bool,
}

/// Run the stages in order, reusing up-to-date outputs; returns each stage's outcome.
pub fn run(
    stages: &Stages,
    opts: &StageOptions,
    progress: &dyn Progress,
) -> Result<Vec<(String, Outcome)>> {
    let mut keys: Vec<String> = Vec::with_capacity(stages.stages.len());
    let mut done = Vec::new();
    for (i, stage) in stages.stages.iter().enumerate() {
        let label = stage.label();
        let stamp_path = stage.out.join(STAMP);
        let stamp = Stamp::read(&stamp_path);
        let inputs = stage_inputs(stage, stages);
        if !opts.rebuild
            && let Some(stamp) = &stamp
        {
            let files = fingerprint(&inputs, &keys, Some(stamp))?;
            let key = stage_key(stage, &files, opts);
            if stamp.key == key && stamp.outputs_intact(&stage.out) {
                let records = Stamp::records(&files);
                if records != stamp.inputs {
                    // Touched but unchanged inputs: record their new times, so that the next
                    // run does not read them again.
                    let mut fresh = Stamp::new(key.clone(), &files, &stage.out)?;
                    fresh.outputs = stamp.outputs.clone();
                    fresh.write(&stamp_path)?;
                }
                progress.note(&format!(
                    "{label}: up to date in {}, reused",
                    stage.out.display()
                ));
                keys.push(key);
                done.push((label, Outcome::Reused));
                continue;
            }
        }
        progress.stage(&format!("{label} ({}/{})", i + 1, stages.stages.len()));
        let in_stage = |e: Error| match e {
            Error::Config { path, reason } => Error::Config {
                path,
                reason: format!("{label}: {reason}"),
            },
            other => other,
        };
        let set = ModelSet::open(&stage.config).map_err(in_stage)?;
        let plan = plan::build(&stage.config, &set, opts.merge.plan).map_err(in_stage)?;
        plan.warnings
            .iter()
            .for_each(|w| progress.warn(&format!("{label}: {w}")));
        let mut merge_opts = opts.merge.clone();
        if stage.name.is_some() || stamp.is_some() {
            // Our own output (an intermediate, or a final stage written before): replace it.
            merge_opts.existing = Existing::Replace;
        }
        merge::execute(
            &stage.config,
            &set,
            &plan,
            &stage.out,
            &merge_opts,
            progress,
        )?;
        drop(set);
        let files = fingerprint(&inputs, &keys, stamp.as_ref())?;
        let key = stage_key(stage, &files, opts);
        Stamp::new(key.clone(), &files, &stage.out)?.write(&stamp_path)?;
        keys.push(key);
        progress.note(&format!("{label}: built in {}", stage.out.display()));
        done.push((label, Outcome::Built));
    }
    Ok(done)
}

/// One input of a stage: another stage's output or files on disk.
enum InputRef {
    Stage(usize),
    Path(PathBuf),
}

/// The stage's inputs in config order: models (and adapters), then statistics files.
fn stage_inputs(stage: &Stage, stages: &Stages) -> Vec<InputRef> {
    let outs: HashMap<&Path, usize> = stage
        .deps
        .iter()
        .map(|&d| (stages.stages[d].out.as_path(), d))
        .collect();
    let mut out = Vec::new();
    for r in stage.config.referenced_models() {
        let whole = PathBuf::from(&r.0);
        let (model, adapter) = match r.0.rsplit_once('+') {
            Some((m, a)) if !whole.exists() => (PathBuf::from(m), Some(PathBuf::from(a))),
            _ => (whole, None),
        };
        match outs.get(model.as_path()) {
            Some(&d) => out.push(InputRef::Stage(d)),
            None => out.push(InputRef::Path(model)),
        }
        out.extend(adapter.map(InputRef::Path));
    }
    for m in stage.config.models.iter().flatten() {
        out.extend(m.stats.clone().map(InputRef::Path));
    }
    out
}

/// A file an input is made of, as recorded in a stamp.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct FileRecord {
    path: String,
    size: u64,
    mtime_ns: i128,
    blake3: String,
}

/// What the key hashes per input: a stage's key, or the input's files.
enum Print {
    Stage(String),
    Files(Vec<FileRecord>),
}

fn fingerprint(inputs: &[InputRef], keys: &[String], stamp: Option<&Stamp>) -> Result<Vec<Print>> {
    let known: HashMap<&str, &FileRecord> = stamp
        .map(|s| s.inputs.iter().map(|f| (f.path.as_str(), f)).collect())
        .unwrap_or_default();
    inputs
        .iter()
        .map(|i| match i {
            InputRef::Stage(d) => Ok(Print::Stage(keys[*d].clone())),
            InputRef::Path(p) => files_of(p)?
                .into_iter()
                .map(|f| record(&f, &known))
                .collect::<Result<_>>()
                .map(Print::Files),
        })
        .collect()
}

/// The files of a model directory amalgam may read (top-level, not hidden, not a weight format
/// it does not read, not a stage stamp), or the file itself.
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).at(path)? {
        let entry = entry.at(path)?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let unread = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| UNREAD.contains(&e));
        if name.starts_with('.') || name == STAMP || unread || !p.is_file() {
            continue;
        }
        files.push(p);
    }
    files.sort();
    Ok(files)
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// The file's record, its hash taken from `known` when its size and time are those recorded.
fn record(path: &Path, known: &HashMap<&str, &FileRecord>) -> Result<FileRecord> {
    let canonical = std::fs::canonicalize(path).at(path)?;
    let meta = std::fs::metadata(&canonical).at(path)?;
    let key = canonical.to_string_lossy().into_owned();
    let (size, mtime_ns) = (meta.len(), mtime_ns(&meta));
    if let Some(r) = known.get(key.as_str())
        && r.size == size
        && r.mtime_ns == mtime_ns
    {
        return Ok((*r).clone());
    }
    let mut file = std::fs::File::open(&canonical).at(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(FileRecord {
        path: key,
        size,
        mtime_ns,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// The stage's key: its patched document, the options that change its output, amalgam's
/// version and its inputs' contents (file names within a model directory, and their hashes).
fn stage_key(stage: &Stage, inputs: &[Print], opts: &StageOptions) -> String {
    let m = &opts.merge;
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|p| match p {
            Print::Stage(k) => serde_json::json!({ "stage": k }),
            Print::Files(files) => Value::Array(
                files
                    .iter()
                    .map(|f| {
                        let name = Path::new(&f.path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned());
                        serde_json::json!([name, f.blake3])
                    })
                    .collect(),
            ),
        })
        .collect();
    let key = serde_json::json!({
        "format": 1,
        "amalgam": env!("CARGO_PKG_VERSION"),
        "config": stage.doc,
        "seed": m.seed,
        "shard_size": m.shard_size,
        "allow_crimes": m.plan.allow_crimes,
        "truncate_embeddings": m.plan.truncate_embeddings,
        "tensors": format!("{:?}", m.plan.tensors),
        "inputs": inputs,
    });
    blake3::hash(key.to_string().as_bytes())
        .to_hex()
        .to_string()
}

/// A stage output's stamp.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    format: u32,
    key: String,
    /// Every input file with its hash (so an unchanged file is not read again).
    inputs: Vec<FileRecord>,
    /// Every file of the output with its size and modification time.
    outputs: BTreeMap<String, (u64, i128)>,
}

impl Stamp {
    /// The file records of `inputs`.
    fn records(inputs: &[Print]) -> Vec<FileRecord> {
        inputs
            .iter()
            .filter_map(|p| match p {
                Print::Files(f) => Some(f.iter().cloned()),
                Print::Stage(_) => None,
            })
            .flatten()
            .collect()
    }

    fn new(key: String, inputs: &[Print], out: &Path) -> Result<Stamp> {
        let inputs = Stamp::records(inputs);
        let mut outputs = BTreeMap::new();
        for entry in std::fs::read_dir(out).at(out)? {
            let entry = entry.at(out)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().at(&entry.path())?;
            if meta.is_file() && name != STAMP {
                outputs.insert(name, (meta.len(), mtime_ns(&meta)));
            }
        }
        Ok(Stamp {
            format: 1,
            key,
            inputs,
            outputs,
        })
    }

    /// The stamp at `path`, if there is a readable one.
    fn read(path: &Path) -> Option<Stamp> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str::<Stamp>(&text)
            .ok()
            .filter(|s| s.format == 1)
    }

    /// Whether every file the stage wrote is still there with its size and time.
    fn outputs_intact(&self, out: &Path) -> bool {
        self.outputs.iter().all(|(name, &(size, time))| {
            std::fs::metadata(out.join(name)).is_ok_and(|m| m.len() == size && mtime_ns(&m) == time)
        })
    }

    fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a stamp serializes");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)
    }
}
