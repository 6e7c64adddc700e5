//! The streaming, sharded safetensors writer.
//!
//! The full layout (which tensor goes in which shard, at which offset) is computed from names,
//! dtypes and shapes before any data exists, so every header is written first and each tensor's
//! bytes can then be written at its final position, by any thread, in any order, as soon as it is
//! computed. Nothing is buffered beyond the tensor being written.
//!
//! Output goes to a temporary directory beside the target. [`ModelWriter::finish`] checks that
//! every tensor was written, fsyncs the files, writes the index and renames the directory into
//! place. Dropping the writer without finishing removes the temporary directory, so a failed or
//! interrupted run leaves no partial output and never touches an existing target.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::io::{header, staging};

/// Name, dtype and shape of one output tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl From<&super::TensorEntry> for TensorSpec {
    /// The same tensor, to be written as it is stored.
    fn from(e: &super::TensorEntry) -> TensorSpec {
        TensorSpec {
            name: e.name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
        }
    }
}

impl TensorSpec {
    /// Bytes of data, or `None` on overflow.
    pub fn nbytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
    }
}

/// What to do with an existing output directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Existing {
    /// Refuse unless it is empty.
    #[default]
    Refuse,
    /// Replace it atomically once the new output is complete.
    Replace,
}

/// Where one tensor goes.
#[derive(Clone, Debug)]
struct Slot {
    shard: usize,
    offset: u64,
    len: u64,
}

struct ShardFile {
    name: String,
    file: File,
    /// Bytes written so far, to start writeback every [`WRITEBACK_STEP`].
    written: AtomicU64,
}

/// Start writing a shard's dirty pages to disk after each this many bytes written to it, so the
/// disk works while the merge computes and the fsync at the end has little left to wait for.
const WRITEBACK_STEP: u64 = 64 << 20;

/// Size `file` to `len` bytes with its blocks allocated up front where the file system can
/// (fallocate): a disk too small for the output is an error now, before any work, and the
/// writes that follow skip the file system's per-page block reservation. Elsewhere the file is
/// only sized (sparse).
fn reserve(file: &File, len: u64, path: &Path, target: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(signed) = libc::off_t::try_from(len) else {
            return file.set_len(len).at(path);
        };
        // SAFETY: a plain system call on an open descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, signed) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSPC) {
            let dir = path.parent().unwrap_or(path).display();
            return Err(Error::Output {
                path: target.to_path_buf(),
                reason: format!(
                    "not enough free disk space in {dir} for the output ({len} bytes); free some space or write the output elsewhere"
                ),
            });
        }
        // Not supported here (or refused): size the file without reserving its blocks.
    }
    file.set_len(len).at(path)
}

/// Ask the kernel to start writing back the dirty pages of `file`, without waiting (Linux
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing: the final fsync does it all).
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor; offset 0 and length 0 mean the
        // whole file. A failure only means the final fsync has more to do.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// A model being written; see the module docs.
pub struct ModelWriter {
    target: PathBuf,
    existing: Existing,
    tmp: tempfile::TempDir,
    /// Held until the output is in place (dropped after `tmp`, which a failed run removes).
    lock: staging::TargetLock,
    shards: Vec<ShardFile>,
    specs: Vec<TensorSpec>,
    slots: Vec<Slot>,
    written: Vec<AtomicU64>,
    basename: &'static str,
}

/// Parse a shard size as mergekit spells it: a number with an optional suffix `K` (10³), `M`
/// (10⁶) or `B`/`G` (10⁹); `5B` is five billion bytes, not five bytes.
pub fn parse_shard_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = || {
        Error::argument(
            "shard size",
            format!(
                "'{text}' is not a size; use a byte count or a number with K, M or B (10^9), e.g. 5B or 500M"
            ),
        )
    };
    let (digits, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let value: f64 = digits.trim().parse().map_err(|_| bad())?;
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Assign tensors to shards in order: a shard takes tensors until the next would push it past
/// `budget`; a tensor larger than the budget gets a shard of its own.
fn assign_shards(sizes: &[u64], budget: Option<u64>) -> Vec<usize> {
    let mut out = Vec::with_capacity(sizes.len());
    let (mut shard, mut used) = (0usize, 0u64);
    for &s in sizes {
        if let Some(b) = budget
            && used > 0
            && used.saturating_add(s) > b
        {
            shard += 1;
            used = 0;
        }
        used += s;
        out.push(shard);
    }
    out
}

fn shard_file_name(basename: &str, i: usize, n: usize) -> String {
    if n == 1 {
        format!("{basename}.safetensors")
    } else {
        format!("{basename}-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

impl ModelWriter {
    /// Plan the output and write every shard's header. `shard_size` is the byte budget per shard
    /// (`None`: one file).
    pub fn create(
        target: &Path,
        specs: Vec<TensorSpec>,
        shard_size: Option<u64>,
        existing: Existing,
    ) -> Result<ModelWriter> {
        Self::create_named(target, specs, shard_size, existing, "model")
    }

    /// [`create`](Self::create) with files named `<basename>.safetensors` (or
    /// `<basename>-00001-of-0000N.safetensors` and `<basename>.safetensors.index.json`), e.g.
    /// `adapter_model` for a PEFT adapter.
    pub fn create_named(
        target: &Path,
        specs: Vec<TensorSpec>,
        shard_size: Option<u64>,
        existing: Existing,
        basename: &'static str,
    ) -> Result<ModelWriter> {
        check_target(target, existing)?;
        let parent = parent_dir(target);
        std::fs::create_dir_all(&parent).at(&parent)?;
        let lock = staging::TargetLock::acquire(target, &parent)?;
        for f in staging::sweep(&parent, Some(target), false) {
            if let (true, Some(o)) = (f.stale, &f.owner) {
                eprintln!(
                    "note: removed {} ({:.1} MB), the staging directory of an earlier run into {} (process {}) that ended before finishing",
                    f.path.display(),
                    f.bytes as f64 / 1e6,
                    target.display(),
                    o.pid
                );
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix(staging::STAGING_PREFIX)
            .tempdir_in(&parent)
            .at(&parent)?;
        staging::mark(tmp.path(), &staging::Owner::me(target))?;
        let mut seen = std::collections::HashSet::new();
        let mut sizes = Vec::with_capacity(specs.len());
        for s in &specs {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::Output {
                    path: target.to_path_buf(),
                    reason: format!("tensor '{}' would be written twice", s.name),
                });
            }
            sizes.push(s.nbytes().ok_or_else(|| Error::Output {
                path: target.to_path_buf(),
                reason: format!("tensor '{}' shape {:?} is too large", s.name, s.shape),
            })?);
        }
        let assignment = assign_shards(&sizes, shard_size);
        let n_shards = assignment.last().map_or(1, |&s| s + 1);
        let mut slots = vec![None; specs.len()];
        let mut shards = Vec::with_capacity(n_shards);
        for shard in 0..n_shards {
            let members: Vec<usize> = (0..specs.len())
                .filter(|&i| assignment[i] == shard)
                .collect();
            let mut cursor = 0usize;
            let mut entries = Vec::with_capacity(members.len());
            for &i in &members {
                let start = cursor;
                cursor += sizes[i] as usize;
                entries.push((
                    specs[i].name.as_str(),
                    specs[i].dtype,
                    &specs[i].shape[..],
                    start,
                    cursor,
                ));
            }
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            let prefix = header::serialize(entries, &meta);
            let name = shard_file_name(basename, shard, n_shards);
            let path = tmp.path().join(&name);
            let mut file = File::create(&path).at(&path)?;
            file.write_all(&prefix).at(&path)?;
            reserve(&file, prefix.len() as u64 + cursor as u64, &path, target)?;
            let mut offset = prefix.len() as u64;
            for &i in &members {
                slots[i] = Some(Slot {
                    shard,
                    offset,
                    len: sizes[i],
                });
                offset += sizes[i];
            }
            shards.push(ShardFile {
                name,
                file,
                written: AtomicU64::new(0),
            });
        }
        let written = specs.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(ModelWriter {
            target: target.to_path_buf(),
            existing,
            tmp,
            lock,
            shards,
            specs,
            slots: slots
                .into_iter()
                .map(|s| s.expect("every tensor assigned"))
                .collect(),
            written,
            basename,
        })
    }

    /// The output tensors in order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The temporary directory the output is assembled in; put side files (config, tokenizer)
    /// here before [`finish`](Self::finish).
    pub fn staging_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Write the whole data of tensor `index` (position in the specs). Safe to call from many
    /// threads at once for different tensors.
    pub fn write(&self, index: usize, bytes: &[u8]) -> Result<()> {
        let expected = self.slots[index].len;
        if bytes.len() as u64 != expected {
            let spec = &self.specs[index];
            return Err(self.output_error(format!(
                "tensor '{}' produced {} bytes, expected {expected} for shape {:?} {}",
                spec.name,
                bytes.len(),
                spec.shape,
                spec.dtype
            )));
        }
        self.write_part(index, 0, bytes)
    }

    /// Write `bytes` at byte `pos` within tensor `index`, so a tensor can be produced in parts
    /// with a working set of one part. The parts must not overlap and must cover the tensor.
    pub fn write_part(&self, index: usize, pos: u64, bytes: &[u8]) -> Result<()> {
        let slot = &self.slots[index];
        let spec = &self.specs[index];
        let end = pos + bytes.len() as u64;
        if end > slot.len {
            return Err(self.output_error(format!(
                "tensor '{}': write of bytes {pos}..{end} runs past its {} bytes",
                spec.name, slot.len
            )));
        }
        let before = self.written[index].fetch_add(bytes.len() as u64, Ordering::AcqRel);
        if before + bytes.len() as u64 > slot.len {
            return Err(self.output_error(format!("tensor '{}' written twice", spec.name)));
        }
        let shard = &self.shards[slot.shard];
        shard
            .file
            .write_all_at(bytes, slot.offset + pos)
            .at(&self.tmp.path().join(&shard.name))?;
        let len = bytes.len() as u64;
        let total = shard.written.fetch_add(len, Ordering::Relaxed) + len;
        if total / WRITEBACK_STEP != (total - len) / WRITEBACK_STEP {
            start_writeback(&shard.file);
        }
        Ok(())
    }

    fn output_error(&self, reason: String) -> Error {
        Error::Output {
            path: self.target.clone(),
            reason,
        }
    }

    /// Check every tensor was written, write the index, fsync, and move the output into place.
    pub fn finish(self) -> Result<PathBuf> {
        if let Some(i) = self
            .written
            .iter()
            .zip(&self.slots)
            .position(|(w, s)| w.load(Ordering::Acquire) != s.len)
        {
            return Err(Error::Output {
                path: self.target.clone(),
                reason: format!("tensor '{}' was never written", self.specs[i].name),
            });
        }
        for s in &self.shards {
            s.file.sync_all().at(&self.tmp.path().join(&s.name))?;
        }
        if self.shards.len() > 1 {
            self.write_index()?;
        }
        let marker = self.tmp.path().join(staging::MARKER);
        std::fs::remove_file(&marker).at(&marker)?;
        sync_dir(self.tmp.path())?;
        let ModelWriter {
            target,
            existing,
            tmp,
            lock,
            ..
        } = self;
        let staged = tmp.keep();
        install(&staged, &target, existing).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&staged);
        })?;
        drop(lock);
        Ok(target)
    }

    fn write_index(&self) -> Result<()> {
        let mut weight_map = serde_json::Map::new();
        for (spec, slot) in self.specs.iter().zip(&self.slots) {
            weight_map.insert(
                spec.name.clone(),
                self.shards[slot.shard].name.clone().into(),
            );
        }
        let total: u64 = self.slots.iter().map(|s| s.len).sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total, "amalgam_version": env!("CARGO_PKG_VERSION")},
            "weight_map": weight_map,
        });
        let path = self
            .tmp
            .path()
            .join(format!("{}.safetensors.index.json", self.basename));
        let mut f = File::create(&path).at(&path)?;
        f.write_all(
            serde_json::to_string_pretty(&index)
                .expect("json")
                .as_bytes(),
        )
        .at(&path)?;
        f.sync_all().at(&path)
    }
}

pub(crate) fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub(crate) fn check_target(target: &Path, existing: Existing) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(target) else {
        return Ok(());
    };
    let refuse = |reason: &str| Error::Output {
        path: target.to_path_buf(),
        reason: reason.to_string(),
    };
    if !meta.is_dir() {
        return Err(refuse(
            "exists and is not a directory; choose another output path",
        ));
    }
    let empty = std::fs::read_dir(target).at(target)?.next().is_none();
    if !empty && existing == Existing::Refuse {
        return Err(refuse(
            "exists and is not empty; pass --overwrite to replace it (it is replaced only once the new output is complete)",
        ));
    }
    Ok(())
}

/// Move `staged` to `target`. An existing target is renamed aside first and removed only after
/// the new output is in place, so at no point is a half-written directory visible at `target`.
fn install(staged: &Path, target: &Path, existing: Existing) -> Result<()> {
    check_target(target, existing)?;
    let parent = parent_dir(target);
    let backup = if target.exists() {
        let b = parent.join(format!(
            ".amalgam-old-{}",
            staged
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        std::fs::rename(target, &b).at(target)?;
        Some(b)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(staged, target) {
        if let Some(b) = &backup {
            let _ = std::fs::rename(b, target);
        }
        return Err(Error::io(target, e));
    }
    sync_dir(&parent)?;
    if let Some(b) = backup {
        std::fs::remove_dir_all(&b).at(&b)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_parse_like_mergekit() {
        assert_eq!(parse_shard_size("5B").unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size("500M").unwrap(), 500_000_000);
        assert_eq!(parse_shard_size("1.5k").unwrap(), 1500);
        assert_eq!(parse_shard_size("4096").unwrap(), 4096);
        for bad in ["", "x", "-1M", "0", "5T"] {
            assert!(parse_shard_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn output_blocks_are_reserved_when_created() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![1 << 18],
        };
        let writer =
            ModelWriter::create(&dir.path().join("out"), vec![spec], None, Existing::Refuse)
                .unwrap();
        let meta = writer.shards[0].file.metadata().unwrap();
        assert!(meta.len() > 1 << 20);
        // Where this file system allocates on request (a probe file tells), the output's blocks
        // are allocated before anything is written.
        let probe = File::create(dir.path().join("probe")).unwrap();
        // SAFETY: a plain system call on an open descriptor.
        if unsafe { libc::fallocate(probe.as_raw_fd(), 0, 0, 4096) } == 0 {
            assert!(
                meta.blocks() * 512 >= meta.len(),
                "{} blocks",
                meta.blocks()
            );
        }
    }

    #[test]
    fn shards_fill_to_budget() {
        assert_eq!(assign_shards(&[4, 4, 4, 4], Some(8)), [0, 0, 1, 1]);
        assert_eq!(assign_shards(&[10, 1, 1], Some(8)), [0, 1, 1]);
        assert_eq!(assign_shards(&[1, 10, 1], Some(8)), [0, 1, 2]);
        assert_eq!(assign_shards(&[5, 5], None), [0, 0]);
        assert_eq!(assign_shards(&[0, 0, 9], Some(8)), [0, 0, 0]);
    }
}
