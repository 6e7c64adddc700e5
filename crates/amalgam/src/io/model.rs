//! A model on disk: one safetensors file, a directory with `model.safetensors`, or a directory
//! of shards with a `*.safetensors.index.json`. Shards are memory-mapped; tensor data is
//! borrowed straight from the maps and nothing is read until asked for. Streaming readers copy
//! chunks out with [`Model::read_at`] instead, so no input page stays mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::io::header::{self, Header};

/// One memory-mapped shard file.
#[derive(Debug)]
pub struct Shard {
    /// The file.
    pub path: PathBuf,
    /// File name relative to the model directory (as the index names it).
    pub file_name: String,
    map: Mmap,
    /// The open file, for positioned reads.
    file: File,
    /// The file as it was opened, to notice it changing while it is read.
    stamp: Option<Stamp>,
    /// The shard's validated header.
    pub header: Header,
}

/// What identifies a file's contents cheaply: its inode, length and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// The granularity at which a sequential reader can safely release pages behind it: the largest
/// block the kernel maps around one fault (a PMD-sized large folio).
pub const RELEASE_BLOCK: usize = 2 << 20;

/// Where a tensor lives in a model.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// The name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index into [`Model::shards`].
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub range: std::ops::Range<usize>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.range.len()
    }
}

/// A borrowed tensor: metadata and raw little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [usize],
    /// Raw bytes, possibly unaligned.
    pub bytes: &'a [u8],
}

/// A readable model.
#[derive(Debug)]
pub struct Model {
    /// The path the user gave (a file or a directory).
    pub path: PathBuf,
    /// The directory holding `config.json` and tokenizer files, if the model is a directory
    /// (for a single file: its parent directory).
    pub dir: PathBuf,
    /// Shards in index order.
    pub shards: Vec<Shard>,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

/// Map `file` read-only.
///
/// # Safety
/// The map is only valid while nobody truncates or rewrites the file. amalgam never writes its
/// inputs, and every offset read through the map was validated against the file's length at
/// open time; a concurrent external writer is outside what any mmap-based reader can guard
/// against (the same contract as safetensors and ripgrep).
fn map_file(path: &Path) -> Result<(File, Mmap)> {
    let file = File::open(path).at(path)?;
    // SAFETY: read-only map of a file we do not modify; see the function's safety note.
    let map = unsafe { Mmap::map(&file) }.at(path)?;
    Ok((file, map))
}

impl Shard {
    fn open(path: PathBuf, file_name: String) -> Result<Shard> {
        let (file, map) = map_file(&path)?;
        let stamp = file.metadata().ok().map(|m| Stamp::of(&m));
        let header = header::parse(&path, &map)?;
        Ok(Shard {
            path,
            file_name,
            map,
            file,
            stamp,
            header,
        })
    }
}

/// Shows a GGUF input's one-time conversion on stderr, as the writer shows its notes.
struct NoteToStderr;

impl crate::progress::Progress for NoteToStderr {
    fn warn(&self, message: &str) {
        eprintln!("note: {message}");
    }
}

/// Names of index files we recognise, most common first.
fn find_index(dir: &Path) -> Result<Option<PathBuf>> {
    let standard = dir.join("model.safetensors.index.json");
    if standard.is_file() {
        return Ok(Some(standard));
    }
    let mut found: Vec<PathBuf> = list_dir(dir)?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".safetensors.index.json"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::NotAModel {
            path: dir.to_path_buf(),
            reason: format!(
                "several shard indexes ({}); pass the one to use",
                found
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)
        .at(dir)?
        .map(|e| e.map(|e| e.path()).at(dir))
        .collect()
}

impl Model {
    /// Check that no shard file changed since it was opened: written in place (its length or
    /// modification time moved) or replaced (another file now at its path). Called before an
    /// output is put in place, so that an input overwritten during a run is an error rather than
    /// a silently mixed output.
    pub fn check_unchanged(&self) -> Result<()> {
        for shard in &self.shards {
            let Some(then) = shard.stamp else { continue };
            let now = shard.file.metadata().ok().map(|m| Stamp::of(&m));
            let at_path = std::fs::metadata(&shard.path).ok().map(|m| Stamp::of(&m));
            let how = if now != Some(then) {
                "was written to while it was being read"
            } else if at_path != Some(then) {
                "was replaced by another file while it was being read"
            } else {
                continue;
            };
            return Err(Error::NotAModel {
                path: shard.path.clone(),
                reason: format!(
                    "{how}; the output was not written. Run again once the input is complete"
                ),
            });
        }
        Ok(())
    }

    /// Open a model: a `.safetensors` file, a directory holding `model.safetensors`, a shard
    /// index, or `.safetensors` files, or a GGUF file (read through its converted copy in the
    /// cache, [`gguf::convert::cached`](crate::io::gguf::convert::cached)). Validates every header (and the index against its shards)
    /// before returning.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).at(&path)?;
        if meta.is_file() && crate::io::gguf::is_gguf(&path) {
            let dir = crate::io::gguf::convert::cached(&path, &NoteToStderr)?;
            let mut model = Model::open(&dir)?;
            model.path = path;
            return Ok(model);
        }
        if meta.is_file() {
            let name = file_name(&path);
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let shard = Shard::open(path.clone(), name)?;
            return Model::from_shards(path, dir, vec![shard], None);
        }
        if let Some(index) = find_index(&path)? {
            return Model::open_indexed(path, index);
        }
        let single = path.join("model.safetensors");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else {
            let mut f: Vec<PathBuf> = list_dir(&path)?
                .into_iter()
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            f.sort();
            f
        };
        if files.is_empty() {
            let hint = if path.join("pytorch_model.bin").exists() {
                " (it has pytorch_model.bin: amalgam reads only safetensors; convert it first, e.g. with transformers' save_pretrained(safe_serialization=True))"
            } else {
                ""
            };
            return Err(Error::NotAModel {
                path,
                reason: format!("no .safetensors files in this directory{hint}"),
            });
        }
        let shards = files
            .into_iter()
            .map(|p| {
                let n = file_name(&p);
                Shard::open(p, n)
            })
            .collect::<Result<Vec<_>>>()?;
        Model::from_shards(path.clone(), path, shards, None)
    }

    fn open_indexed(dir: PathBuf, index: PathBuf) -> Result<Model> {
        let text = std::fs::read(&index).at(&index)?;
        let parsed = crate::io::index::parse(&index, &text)?;
        let files = parsed.files;
        let expected: HashMap<&str, &str> = parsed
            .weight_map
            .iter()
            .map(|(n, f)| (n.as_str(), f.as_str()))
            .collect();
        let shards = files
            .iter()
            .map(|f| {
                let p = dir.join(f);
                if !p.is_file() {
                    return Err(Error::index(
                        &index,
                        format!("shard '{f}' named in weight_map does not exist"),
                    ));
                }
                Shard::open(p, f.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Model::from_shards(dir.clone(), dir, shards, Some(&index))?;
        for (name, file) in &expected {
            let entry = model.entry(name).map_err(|_| {
                Error::index(
                    &index,
                    format!(
                        "tensor '{name}' is mapped to '{file}' but that shard does not contain it"
                    ),
                )
            })?;
            let actual = &model.shards[entry.shard].file_name;
            if actual != file {
                return Err(Error::index(
                    &index,
                    format!("tensor '{name}' is mapped to '{file}' but is stored in '{actual}'"),
                ));
            }
        }
        if let Some(t) = model
            .tensors
            .iter()
            .find(|t| !expected.contains_key(t.name.as_str()))
        {
            return Err(Error::index(
                &index,
                format!(
                    "tensor '{}' in shard '{}' is missing from weight_map",
                    t.name, model.shards[t.shard].file_name
                ),
            ));
        }
        Ok(model)
    }

    fn from_shards(
        path: PathBuf,
        dir: PathBuf,
        shards: Vec<Shard>,
        index: Option<&Path>,
    ) -> Result<Model> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (si, shard) in shards.iter().enumerate() {
            for t in &shard.header.tensors {
                if let Some(&prev) = by_name.get(&t.name) {
                    let other: &TensorEntry = &tensors[prev];
                    let place = index.unwrap_or(&shard.path);
                    return Err(Error::index(
                        place,
                        format!(
                            "tensor '{}' is stored in both '{}' and '{}'",
                            t.name, shards[other.shard].file_name, shard.file_name
                        ),
                    ));
                }
                by_name.insert(t.name.clone(), tensors.len());
                let base = shard.header.data_start;
                tensors.push(TensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    shard: si,
                    range: base + t.start..base + t.end,
                });
            }
        }
        Ok(Model {
            path,
            dir,
            shards,
            tensors,
            by_name,
        })
    }

    /// Every tensor, shard by shard in header order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Whether the model has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The entry for `name`.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Borrow the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let e = self.entry(name)?;
        Ok(TensorView {
            name: &e.name,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.shards[e.shard].map[e.range.clone()],
        })
    }

    /// The tensor called `name` decoded to f32 (a float tensor; other dtypes give an empty
    /// vector, as [`decode_f32`](crate::dtype::decode_f32) does).
    pub fn floats(&self, name: &str) -> Result<Vec<f32>> {
        let v = self.tensor(name)?;
        let mut out = Vec::new();
        crate::dtype::decode_f32(v.dtype, v.bytes, &mut out);
        Ok(out)
    }

    /// Tell the kernel we are done with `name`'s pages, so resident memory does not grow with
    /// the model. The data stays readable; touching it again faults it back in from disk.
    pub fn release(&self, name: &str) {
        if let Ok(e) = self.entry(name) {
            self.release_range(e.shard, e.range.clone());
        }
    }

    /// [`release`](Self::release) for bytes `range` (absolute, in shard `shard`'s file), widened
    /// to whole pages.
    ///
    /// The kernel maps file pages in blocks around a fault (64 KiB, or a whole large folio of up
    /// to 2 MiB), so pages just before a released range can come back when the next bytes are
    /// read: a reader walking a tensor should release only whole [`RELEASE_BLOCK`]s behind it
    /// and the rest once done (see the merge executor).
    pub fn release_range(&self, shard: usize, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let map = &self.shards[shard].map;
        let start = range.start / PAGE * PAGE;
        let end = range.end.div_ceil(PAGE).saturating_mul(PAGE).min(map.len());
        if start >= end {
            return;
        }
        // SAFETY: the map is read-only and file-backed, so dropping its pages loses nothing:
        // later reads fault the same bytes back from the file.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }

    /// Copy bytes `offset..offset + buf.len()` (absolute, in shard `shard`'s file) into `buf`
    /// with a positioned read: nothing is mapped, so a streaming reader's resident memory is
    /// its buffers, and a file cut short since it was opened is an error, not a crash.
    pub fn read_at(&self, shard: usize, offset: usize, buf: &mut [u8]) -> Result<()> {
        let s = &self.shards[shard];
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            s.file.read_exact_at(buf, offset as u64).at(&s.path)
        }
        #[cfg(not(unix))]
        {
            let _ = &s.file;
            let end = offset + buf.len();
            let src = s.map.get(offset..end).ok_or_else(|| {
                Error::io(
                    &s.path,
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                )
            })?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// `config.json` parsed, if the model directory has one that parses.
    pub fn config(&self) -> Option<serde_json::Value> {
        let text = std::fs::read(self.dir.join("config.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
