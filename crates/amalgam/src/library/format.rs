//! The library on disk: a directory with a JSON manifest, the shared parts, and one
//! safetensors file per task.
//!
//! ```text
//! LIB/library.json          manifest: format and version, scheme and parameters, the base's
//!                           tensors with their BLAKE3 content hashes, the shared parts' hashes,
//!                           each task's file, hash, size, scale and reconstruction error
//! LIB/shared.safetensors    the shared parts (sharded as shared-0000i-of-0000n.safetensors with
//!                           shared.safetensors.index.json when large); absent when the scheme
//!                           shares nothing
//! LIB/tasks/NAME.safetensors  one task's module
//! ```
//!
//! A part of tensor `T` is stored as the tensor `T:PART` (e.g. `model.layers.0.mlp.up_proj.weight:mask`).
//! A task that stores no part for a tensor rebuilds the base's values there. Packed bits and
//! codes are `U8` tensors in the bit order of [`super::bits`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::io::header;

/// The manifest's `format` field.
pub const FORMAT: &str = "amalgam-task-library";
/// The manifest's format version.
pub const VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "library.json";
/// The basename of the shared parts' files.
pub const SHARED: &str = "shared";

/// One tensor of the base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseTensor {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// BLAKE3 of its bytes as stored, hex.
    pub blake3: String,
}

/// The base model a library was built from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// The path the config gave (rebuild's default base).
    pub path: String,
    /// Parameters in its float tensors.
    pub parameters: u64,
    /// Bytes of its tensors.
    pub bytes: u64,
    /// Every tensor, in output order.
    pub tensors: Vec<BaseTensor>,
}

/// One task of a library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Its name.
    pub name: String,
    /// The fine-tune it was built from, as the config named it.
    pub model: String,
    /// Its file, relative to the library.
    pub file: String,
    /// The file's size in bytes.
    pub bytes: u64,
    /// BLAKE3 of the file, hex.
    pub blake3: String,
    /// `8 · bytes / base parameters`.
    pub bits_per_parameter: f64,
    /// `‖θ̂_t − θ_t‖ / ‖θ_t − θ0‖` over every float tensor, measured at build time in f32/f64
    /// before rounding to the output dtype.
    pub relative_error: f64,
    /// The task's scale (EMR's rescaler; 1 for the other schemes).
    pub scale: f64,
    /// The scheme's per-task parameters as the config gave them.
    pub parameters: serde_json::Value,
}

/// The manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The amalgam version that built it.
    pub amalgam_version: String,
    /// The scheme.
    pub scheme: String,
    /// The scheme's global parameters as the config gave them.
    pub parameters: serde_json::Value,
    /// The merged model's method and parameters, for schemes that build on one.
    pub merge: Option<serde_json::Value>,
    /// The dtype rebuilt models are written in (`None`: each tensor's base dtype).
    pub out_dtype: Option<DType>,
    /// The base model.
    pub base: BaseInfo,
    /// Bytes of the shared parts (0: none).
    pub shared_bytes: u64,
    /// BLAKE3 of each shared part's bytes, by part name.
    pub shared_hashes: BTreeMap<String, String>,
    /// The tasks, in order.
    pub tasks: Vec<TaskInfo>,
}

impl Manifest {
    /// What `library info --json` prints: the scheme, the base, and per task its file's size,
    /// bits per parameter and error, with the library's sizes against `N` full models; `dir`
    /// is the library folder (whether each task file is present).
    pub fn summary(&self, dir: &std::path::Path) -> serde_json::Value {
        let m = self;
        let tasks: Vec<serde_json::Value> = m
            .tasks
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "model": t.model,
                    "present": dir.join(&t.file).is_file(),
                    "bytes": t.bytes,
                    "bits_per_parameter": t.bits_per_parameter,
                    "relative_error": t.relative_error,
                    "scale": t.scale,
                    "parameters": t.parameters,
                })
            })
            .collect();
        let task_bytes: u64 = m.tasks.iter().map(|t| t.bytes).sum();
        let total = m.shared_bytes + task_bytes;
        let full = m.base.bytes * m.tasks.len() as u64;
        serde_json::json!({
            "library": dir,
            "scheme": m.scheme,
            "parameters": m.parameters,
            "merge": m.merge,
            "out_dtype": m.out_dtype.map(|d| d.to_string()),
            "base": m.base.path,
            "base_parameters": m.base.parameters,
            "base_bytes": m.base.bytes,
            "shared_bytes": m.shared_bytes,
            "task_bytes": task_bytes,
            "total_bytes": total,
            "full_models_bytes": full,
            "tasks": tasks,
        })
    }

    /// Read and check the manifest of the library at `dir`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotAModel {
                    path: dir.to_path_buf(),
                    reason: format!("not a task library: it has no {MANIFEST}"),
                }
            } else {
                Error::io(&path, e)
            }
        })?;
        Manifest::parse(&path, &text)
    }

    /// Parse and check a manifest's bytes (`path` names it in errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Manifest> {
        let path = path.to_path_buf();
        let manifest: Manifest = serde_json::from_slice(text).map_err(|e| Error::Config {
            path: path.clone(),
            reason: format!("not a valid library manifest: {e}"),
        })?;
        if manifest.format != FORMAT {
            return Err(Error::Config {
                path,
                reason: format!("format is '{}', expected '{FORMAT}'", manifest.format),
            });
        }
        if manifest.version != VERSION {
            return Err(Error::Config {
                path,
                reason: format!(
                    "format version {} is not one this amalgam reads ({VERSION}); rebuild the library with this version",
                    manifest.version
                ),
            });
        }
        for t in &manifest.tasks {
            if !super::config::valid_name(&t.name) || t.file != task_file(&t.name) {
                return Err(Error::Config {
                    path,
                    reason: format!("task '{}' has an invalid name or file '{}'", t.name, t.file),
                });
            }
        }
        Ok(manifest)
    }

    /// Task `name`'s index; the error lists the tasks.
    pub fn task(&self, name: &str) -> std::result::Result<usize, String> {
        self.tasks
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.tasks.iter().map(|t| t.name.as_str()).collect();
                format!(
                    "no task '{name}' in this library; its tasks: {}",
                    names.join(", ")
                )
            })
    }
}

/// A task's file, relative to the library.
pub fn task_file(name: &str) -> String {
    format!("tasks/{name}.safetensors")
}

/// The stored name of part `suffix` of tensor `tensor`.
pub fn part_name(tensor: &str, suffix: &str) -> String {
    format!("{tensor}:{suffix}")
}

/// BLAKE3 of `bytes`, hex.
pub fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// One part waiting in a task's spill file.
struct Entry {
    /// Plan index of its tensor, then its place among the tensor's parts.
    order: (usize, usize),
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
    len: u64,
}

struct Spill {
    path: PathBuf,
    file: File,
    cursor: AtomicU64,
    entries: Mutex<Vec<Entry>>,
}

/// The task files being written. A task module's size is known only once it is computed
/// (unchanged tensors are left out, ranks may follow the spectrum), so parts are appended to a
/// spill file per task as tensors finish, in any order, and each task's safetensors file is
/// then written in plan order, header first: the same bytes whatever the thread count. The
/// copy costs the size of the task modules, which is what the library makes small.
pub struct TaskFiles {
    dir: PathBuf,
    names: Vec<String>,
    spills: Vec<Spill>,
}

impl TaskFiles {
    /// Spill files for `names` in `dir` (created).
    pub fn create(dir: &Path, names: &[String]) -> Result<TaskFiles> {
        std::fs::create_dir_all(dir).at(dir)?;
        let spills = names
            .iter()
            .map(|n| {
                let path = dir.join(format!(".{n}.spill"));
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .at(&path)?;
                Ok(Spill {
                    path,
                    file,
                    cursor: AtomicU64::new(0),
                    entries: Mutex::new(Vec::new()),
                })
            })
            .collect::<Result<_>>()?;
        Ok(TaskFiles {
            dir: dir.to_path_buf(),
            names: names.to_vec(),
            spills,
        })
    }

    /// Store part `order.1` of tensor `order.0` of task `task`.
    pub fn put(
        &self,
        task: usize,
        order: (usize, usize),
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        let expected = shape.iter().product::<usize>() * dtype.size();
        if expected != bytes.len() {
            return Err(Error::Output {
                path: self.dir.clone(),
                reason: format!(
                    "part '{name}' has {} bytes for shape {shape:?} {dtype} ({expected} expected)",
                    bytes.len()
                ),
            });
        }
        let spill = &self.spills[task];
        let len = bytes.len() as u64;
        let offset = spill.cursor.fetch_add(len, Ordering::Relaxed);
        spill.file.write_all_at(bytes, offset).at(&spill.path)?;
        spill
            .entries
            .lock()
            .expect("no panics holding it")
            .push(Entry {
                order,
                name,
                dtype,
                shape,
                offset,
                len,
            });
        Ok(())
    }

    /// Write every task's file (header, then its parts in plan order), fsync it, remove the
    /// spill files; `metadata[t]` goes into task `t`'s header. Returns each file's size and
    /// BLAKE3 hash.
    pub fn finish(self, metadata: &[BTreeMap<String, String>]) -> Result<Vec<(u64, String)>> {
        use rayon::prelude::*;
        // The tasks' files one per worker thread (each is a copy and a hash).
        let dir = &self.dir;
        self.names
            .into_par_iter()
            .zip(self.spills)
            .zip(metadata)
            .map(|((name, spill), meta)| finish_one(dir, &name, spill, meta))
            .collect()
    }
}

/// Write one task's file from its spill file (see [`TaskFiles::finish`]).
fn finish_one(
    dir: &Path,
    name: &str,
    spill: Spill,
    meta: &BTreeMap<String, String>,
) -> Result<(u64, String)> {
    let mut entries = spill.entries.into_inner().expect("no panics holding it");
    entries.sort_by_key(|e| e.order);
    let mut start = 0usize;
    let mut layout = Vec::with_capacity(entries.len());
    for e in &entries {
        layout.push((
            e.name.as_str(),
            e.dtype,
            &e.shape[..],
            start,
            start + e.len as usize,
        ));
        start += e.len as usize;
    }
    let prefix = header::serialize(layout, meta);
    let path = dir.join(format!("{name}.safetensors"));
    let mut file = File::create(&path).at(&path)?;
    let mut hasher = blake3::Hasher::new();
    file.write_all(&prefix).at(&path)?;
    hasher.update(&prefix);
    let mut buf = vec![0u8; 1 << 20];
    for e in &entries {
        let mut done = 0u64;
        while done < e.len {
            let n = (e.len - done).min(buf.len() as u64) as usize;
            spill
                .file
                .read_exact_at(&mut buf[..n], e.offset + done)
                .at(&spill.path)?;
            file.write_all(&buf[..n]).at(&path)?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
    }
    file.sync_all().at(&path)?;
    drop(spill.file);
    std::fs::remove_file(&spill.path).at(&spill.path)?;
    Ok((
        prefix.len() as u64 + start as u64,
        hasher.finalize().to_hex().to_string(),
    ))
}
