//! `library rebuild`: one task's model from the base and the library, streamed like a merge
//! (base chunks read with positioned reads, decoded, rebuilt, encoded and written in place),
//! the same bytes for any thread count. The base is checked against the manifest's content
//! hashes as it is read, the task file against its hash before anything is written, and the
//! shared parts against theirs as they are read; any mismatch is an error and nothing is left.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::format::{self, Manifest};
use super::scheme::{self, Parts, Scheme};
use crate::arch::{EMBED_TOKENS, LM_HEAD};
use crate::dtype::{DType, decode_f32, encode_f32};
use crate::error::{Error, Result};
use crate::io::{Existing, Model, ModelWriter, TensorSpec, modeldir};
use crate::progress::Progress;

/// Options for [`rebuild`].
#[derive(Clone, Debug, Default)]
pub struct RebuildOptions {
    /// The base model (default: the path the manifest records).
    pub base: Option<PathBuf>,
    /// What to do if the output exists.
    pub existing: Existing,
    /// Output shard size (`None`: one file).
    pub shard_size: Option<u64>,
    /// Output dtype instead of the library's.
    pub out_dtype: Option<DType>,
    /// Elements per chunk (0: 64K).
    pub chunk_elements: usize,
}

/// An opened library.
pub struct Library {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    scheme: &'static dyn Scheme,
    shared: Option<Model>,
}

/// One task's module, opened and checked against the manifest.
pub struct TaskModule {
    /// Index in the manifest.
    pub index: usize,
    model: Model,
    scale: f32,
}

/// The base's tensor `name`, or its embeddings for the LM head of a base that ties them (as the
/// build's plan read them: the manifest's hash of that tensor is the embeddings', so the check
/// of the content still holds).
fn base_entry<'m>(base: &'m Model, name: &str) -> Result<&'m crate::io::TensorEntry> {
    if name == LM_HEAD && !base.contains(LM_HEAD) && base.contains(EMBED_TOKENS) {
        return base.entry(EMBED_TOKENS);
    }
    base.entry(name)
}

/// Whether a model rebuilt from `base` writes an LM head the base ties to its embeddings (its
/// config must then say the head is not tied, or loaders would ignore it).
fn unties_head(lib: &Library, base: &Model) -> bool {
    !base.contains(LM_HEAD) && lib.manifest.base.tensors.iter().any(|t| t.name == LM_HEAD)
}

impl Library {
    /// Open the library at `dir`: its manifest, scheme and shared parts.
    pub fn open(dir: &Path) -> Result<Library> {
        let manifest = Manifest::load(dir)?;
        let scheme = scheme::get(&manifest.scheme).map_err(|e| Error::Config {
            path: dir.join(format::MANIFEST),
            reason: e,
        })?;
        let shared = if manifest.shared_bytes > 0 {
            let index = dir.join(format!("{}.safetensors.index.json", format::SHARED));
            let single = dir.join(format!("{}.safetensors", format::SHARED));
            Some(Model::open(if index.exists() {
                dir.to_path_buf()
            } else {
                single
            })?)
        } else {
            None
        };
        Ok(Library {
            dir: dir.to_path_buf(),
            manifest,
            scheme,
            shared,
        })
    }

    /// Open task `name`'s module, checking its file's size and hash.
    pub fn task(&self, name: &str) -> Result<TaskModule> {
        let index = self
            .manifest
            .task(name)
            .map_err(|e| Error::argument("task", e))?;
        let info = &self.manifest.tasks[index];
        let path = self.dir.join(&info.file);
        // Hashed as it is read, in blocks: a task's module can be as large as a model.
        let file = std::fs::File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotAModel {
                    path: path.clone(),
                    reason: format!(
                        "task '{name}''s file is missing from the library (deleted?); rebuild the library or copy the file back"
                    ),
                }
            } else {
                Error::io(&path, e)
            }
        })?;
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(std::io::BufReader::with_capacity(1 << 20, file))
            .map_err(|e| Error::io(&path, e))?;
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if len != info.bytes || hasher.finalize().to_hex().as_str() != info.blake3 {
            return Err(Error::Config {
                path: path.clone(),
                reason: format!(
                    "task '{name}''s file does not match the manifest ({len} bytes, {} expected, or its content differs): it was truncated or edited; copy it back from the library it came from",
                    info.bytes
                ),
            });
        }
        Ok(TaskModule {
            index,
            model: Model::open(&path)?,
            scale: info.scale as f32,
        })
    }

    /// The base to rebuild from (`base`, else the manifest's path), checked for names, dtypes
    /// and shapes (the content is checked as it is read).
    pub fn base(&self, base: Option<&Path>) -> Result<Model> {
        let path = base
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&self.manifest.base.path));
        let model = Model::open(&path)?;
        for t in &self.manifest.base.tensors {
            let e = base_entry(&model, &t.name).map_err(|_| Error::MissingTensor {
                path: path.clone(),
                name: t.name.clone(),
            })?;
            if e.dtype != t.dtype || e.shape != t.shape {
                return Err(Error::Config {
                    path: path.clone(),
                    reason: format!(
                        "tensor '{}' is {} {:?}, the library's base has {} {:?}: this is not the base the library was built from",
                        t.name, e.dtype, e.shape, t.dtype, t.shape
                    ),
                });
            }
        }
        Ok(model)
    }

    /// The dtype tensor `index` is rebuilt in.
    pub fn out_dtype(&self, index: usize, over: Option<DType>) -> DType {
        let t = &self.manifest.base.tensors[index];
        if !t.dtype.is_float() {
            return t.dtype;
        }
        over.or(self.manifest.out_dtype).unwrap_or(t.dtype)
    }

    /// Rebuild tensor `index` of `task` from `base` in chunks of `chunk` elements:
    /// `emit(offset, values)` gets each chunk's values in f32 (before rounding to the output
    /// dtype) in order. A non-float tensor comes whole through `emit_bytes`.
    pub fn rebuild_tensor(
        &self,
        task: &TaskModule,
        base: &Model,
        index: usize,
        chunk: usize,
        emit: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
        emit_bytes: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let t = &self.manifest.base.tensors[index];
        let entry = base_entry(base, &t.name)?;
        let n: usize = t.shape.iter().product();
        let size = t.dtype.size();
        let mut hasher = blake3::Hasher::new();
        let parts = TensorParts {
            lib: self,
            task,
            tensor: &t.name,
            read: RefCell::new(HashMap::new()),
            used: RefCell::new(Vec::new()),
        };
        if !t.dtype.is_float() {
            let mut bytes = vec![0u8; entry.nbytes()];
            base.read_at(entry.shard, entry.range.start, &mut bytes)?;
            hasher.update(&bytes);
            self.check_hash(base, t, hasher)?;
            return match parts.task("raw")? {
                Some(own) => emit_bytes(own),
                None => emit_bytes(&bytes),
            };
        }
        let mut decoder = self.scheme.decoder(&t.shape, &parts)?;
        let chunk = if chunk == 0 { 1 << 16 } else { chunk };
        let (mut raw, mut values, mut out) = (Vec::new(), Vec::new(), Vec::new());
        for start in (0..n.max(1)).step_by(chunk) {
            crate::cancel::check()?;
            let end = (start + chunk).min(n);
            raw.resize((end - start) * size, 0);
            base.read_at(entry.shard, entry.range.start + start * size, &mut raw)?;
            hasher.update(&raw);
            decode_f32(t.dtype, &raw, &mut values);
            out.resize(end - start, 0.0);
            decoder.decode(start..end, &values, &mut out)?;
            if !crate::simd::all_finite(&out) {
                return Err(parts.corrupt(
                    "the rebuilt values are NaN or infinite (a base with NaN, or corrupt parts)"
                        .into(),
                ));
            }
            emit(start, &out)?;
        }
        self.check_hash(base, t, hasher)?;
        parts.check_shared_hashes()?;
        // The task file's pages of this tensor are done with (its memory map would otherwise
        // keep them resident: a dense library's task is a whole model).
        for name in parts.used.borrow().iter() {
            task.model.release(name);
        }
        Ok(())
    }

    fn check_hash(
        &self,
        base: &Model,
        t: &format::BaseTensor,
        hasher: blake3::Hasher,
    ) -> Result<()> {
        if hasher.finalize().to_hex().as_str() != t.blake3 {
            return Err(Error::Config {
                path: base.path.clone(),
                reason: format!(
                    "tensor '{}' differs from the library's base (content hash mismatch): this is not the base the library was built from",
                    t.name
                ),
            });
        }
        Ok(())
    }
}

/// Rebuild task `task` of the library at `lib` into `output`.
pub fn rebuild(
    lib: &Path,
    task: &str,
    output: &Path,
    opts: &RebuildOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let library = Library::open(lib)?;
    let module = library.task(task)?;
    let base = library.base(opts.base.as_deref())?;
    let tensors = &library.manifest.base.tensors;
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| TensorSpec {
            name: t.name.clone(),
            dtype: library.out_dtype(i, opts.out_dtype),
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    crate::exec::run(&writer, progress, |i, scratch| {
        let dtype = writer.specs()[i].dtype;
        let bytes = &mut scratch.bytes;
        library.rebuild_tensor(
            &module,
            &base,
            i,
            opts.chunk_elements,
            &mut |start, values| {
                encode_f32(dtype, values, bytes);
                writer.write_part(i, (start * dtype.size()) as u64, bytes)
            },
            &mut |raw| writer.write(i, raw),
        )
    })?;
    let dtype = opts.out_dtype.or(library.manifest.out_dtype);
    modeldir::copy_side_files(&base.dir, writer.staging_dir(), dtype)?;
    modeldir::copy_present(
        &base.dir,
        writer.staging_dir(),
        &[
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
        ],
    )?;
    if unties_head(&library, &base) {
        modeldir::set_config_field(writer.staging_dir(), "tie_word_embeddings", false.into())?;
    }
    base.check_unchanged()?;
    writer.finish()
}

/// The parts of one tensor for one task.
struct TensorParts<'a> {
    lib: &'a Library,
    task: &'a TaskModule,
    tensor: &'a str,
    /// Per shared part read in order: its hash so far and the elements read.
    read: RefCell<HashMap<String, (blake3::Hasher, usize)>>,
    /// The task's parts handed out.
    used: RefCell<Vec<String>>,
}

impl TensorParts<'_> {
    fn shared_entry(&self, suffix: &str) -> Option<(&Model, &crate::io::TensorEntry)> {
        let m = self.lib.shared.as_ref()?;
        let e = m.entry(&format::part_name(self.tensor, suffix)).ok()?;
        Some((m, e))
    }

    /// Compare the shared parts read whole and in order with the manifest's hashes.
    fn check_shared_hashes(&self) -> Result<()> {
        for (name, (hasher, count)) in self.read.borrow_mut().drain() {
            let Some((m, e)) = self
                .lib
                .shared
                .as_ref()
                .and_then(|m| Some((m, m.entry(&name).ok()?)))
            else {
                continue;
            };
            if count != e.numel() {
                continue;
            }
            if self
                .lib
                .manifest
                .shared_hashes
                .get(&name)
                .map(String::as_str)
                != Some(hasher.finalize().to_hex().as_str())
            {
                return Err(Error::Config {
                    path: m.path.clone(),
                    reason: format!(
                        "shared part '{name}' does not match the manifest's hash: the file was edited or damaged"
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Parts for TensorParts<'_> {
    fn task(&self, suffix: &str) -> Result<Option<&[u8]>> {
        let name = format::part_name(self.tensor, suffix);
        if !self.task.model.contains(&name) {
            return Ok(None);
        }
        let bytes = self.task.model.tensor(&name)?.bytes;
        self.used.borrow_mut().push(name);
        Ok(Some(bytes))
    }

    fn task_shape(&self, suffix: &str) -> Option<&[usize]> {
        let e = self
            .task
            .model
            .entry(&format::part_name(self.tensor, suffix))
            .ok()?;
        Some(&e.shape)
    }

    fn task_dtype(&self, suffix: &str) -> Option<DType> {
        let e = self
            .task
            .model
            .entry(&format::part_name(self.tensor, suffix))
            .ok()?;
        Some(e.dtype)
    }

    fn shared(
        &self,
        suffix: &str,
        range: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (m, e) = self
            .shared_entry(suffix)
            .ok_or_else(|| self.corrupt(format!("the shared part '{suffix}' is missing")))?;
        if range.end > e.numel() || !e.dtype.is_float() {
            return Err(self.corrupt(format!(
                "the shared part '{suffix}' ({} {:?}) does not cover elements {range:?}",
                e.dtype, e.shape
            )));
        }
        let size = e.dtype.size();
        let mut raw = vec![0u8; range.len() * size];
        m.read_at(e.shard, e.range.start + range.start * size, &mut raw)?;
        let mut read = self.read.borrow_mut();
        let (hasher, count) = read
            .entry(e.name.clone())
            .or_insert_with(|| (blake3::Hasher::new(), 0));
        if *count == range.start {
            hasher.update(&raw);
            *count = range.end;
        }
        decode_f32(e.dtype, &raw, out);
        Ok(())
    }

    fn shared_bytes(&self, suffix: &str) -> Result<Option<Vec<u8>>> {
        let Some((m, e)) = self.shared_entry(suffix) else {
            return Ok(None);
        };
        let mut raw = vec![0u8; e.nbytes()];
        m.read_at(e.shard, e.range.start, &mut raw)?;
        if self.lib.manifest.shared_hashes.get(&e.name) != Some(&format::hash(&raw)) {
            return Err(Error::Config {
                path: m.path.clone(),
                reason: format!(
                    "shared part '{}' does not match the manifest's hash: the file was edited or damaged",
                    e.name
                ),
            });
        }
        Ok(Some(raw))
    }

    fn scale(&self) -> f32 {
        self.task.scale
    }

    fn tensor(&self) -> &str {
        self.tensor
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Config {
            path: self
                .lib
                .dir
                .join(&self.lib.manifest.tasks[self.task.index].file),
            reason: format!("tensor '{}': {reason}", self.tensor),
        }
    }
}
