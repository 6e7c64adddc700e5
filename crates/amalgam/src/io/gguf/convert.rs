//! A GGUF file written out as a Hugging Face model directory (safetensors, `config.json`,
//! tokenizer), streamed: each tensor is read, decoded and written a few MiB of rows at a time
//! by the executor's workers, so memory stays a few buffers per worker however large the file.
//! Also the cache through which merges and evaluations read a `.gguf` path: converted once,
//! reused while the file is unchanged.

use std::path::{Path, PathBuf};

use super::hf::{self, Layout};
use super::{GgmlType, Gguf};
use crate::dtype::{DType, encode_f32};
use crate::error::{Error, IoContext, Result};
use crate::exec;
use crate::io::{Existing, ModelWriter, TensorSpec};
use crate::progress::Progress;

/// Bytes of stored data decoded at a time per worker.
const PART_BYTES: usize = 8 << 20;

/// The dtype a tensor stored as `ty` is written in when no dtype is asked for: plain floats
/// keep theirs; block quantizations become f32, which holds every dequantized value exactly
/// (what transformers' loader produces in f32).
pub fn default_dtype(ty: GgmlType) -> DType {
    match ty {
        GgmlType::F16 => DType::F16,
        GgmlType::BF16 => DType::BF16,
        GgmlType::F64 => DType::F64,
        _ => DType::F32,
    }
}

fn plain(ty: GgmlType) -> Option<DType> {
    match ty {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        GgmlType::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Write `g` as a model directory at `output`: tensors in `dtype` (`None`:
/// [`default_dtype`] per tensor), sharded at `shard_size` bytes.
pub fn write(
    g: &Gguf,
    output: &Path,
    dtype: Option<DType>,
    shard_size: Option<u64>,
    existing: Existing,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let layout = hf::layout(g)?;
    for (name, why) in &layout.skipped {
        progress.warn(&format!(
            "{}: not carried over: '{name}' ({why})",
            g.path.display()
        ));
    }
    if layout.tokenizer.is_none()
        && let Some(kind) = g.get("tokenizer.ggml.model").and_then(|v| v.as_str())
    {
        progress.warn(&format!(
            "{}: its tokenizer (tokenizer.ggml.model '{kind}') is not rebuilt; the converted \
             model has no tokenizer files",
            g.path.display()
        ));
    }
    let specs: Vec<TensorSpec> = layout
        .tensors
        .iter()
        .map(|m| TensorSpec {
            name: m.name.clone(),
            dtype: dtype.unwrap_or_else(|| default_dtype(g.tensors[m.source].ty)),
            shape: m.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(output, specs, shard_size, existing)?;
    exec::run(&writer, progress, |i, scratch| {
        let m = &layout.tensors[i];
        let t = &g.tensors[m.source];
        let to = writer.specs()[i].dtype;
        let row = t.row_len();
        let row_bytes = t.ty.bytes_for(row);
        let rows = t.numel() / row.max(1);
        // Whole heads per part when rows are permuted within heads.
        let unit = m.permute.map_or(1, |heads| rows / heads);
        let per_part = ((PART_BYTES / row_bytes.max(1)).max(1)).div_ceil(unit) * unit;
        let raw = exec::buffers(&mut scratch.f32s, 2);
        let (decoded, rest) = raw.split_at_mut(1);
        let (decoded, permuted) = (&mut decoded[0], &mut rest[0]);
        let mut input: Vec<u8> = Vec::new();
        let mut r0 = 0;
        while r0 < rows.max(1) {
            let r1 = (r0 + per_part).min(rows);
            let n_bytes = (r1 - r0) * row_bytes;
            let start = t.range.start + r0 * row_bytes;
            input.resize(n_bytes, 0);
            g.read_at(start, &mut input)?;
            let pos = (r0 * row * to.size()) as u64;
            if plain(t.ty) == Some(to) && m.permute.is_none() {
                writer.write_part(i, pos, &input)?;
            } else {
                decoded.clear();
                super::quant::decode_append(t.ty, &input, decoded);
                if let Some(bad) = decoded.iter().position(|v| !v.is_finite()) {
                    return Err(g.error(format!(
                        "tensor '{}' ({}) decodes to {} at element {}; the file is corrupt",
                        t.name,
                        t.ty.name(),
                        decoded[bad],
                        r0 * row + bad
                    )));
                }
                let values: &[f32] = match m.permute {
                    Some(_) => {
                        hf::unpermute_rows(decoded, row, unit, permuted);
                        permuted
                    }
                    None => decoded,
                };
                encode_f32(to, values, &mut scratch.bytes);
                writer.write_part(i, pos, &scratch.bytes)?;
            }
            if rows == 0 {
                break;
            }
            r0 = r1;
        }
        Ok(())
    })?;
    write_side_files(&layout, writer.staging_dir(), dtype)?;
    writer.finish()
}

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_vec_pretty(value).expect("json values serialize");
    std::fs::write(&path, text).at(&path)
}

fn write_side_files(layout: &Layout, dir: &Path, dtype: Option<DType>) -> Result<()> {
    let mut config = layout.config.clone();
    if let (Some(d), Some(obj)) = (dtype.and_then(DType::torch_name), config.as_object_mut()) {
        obj.insert("torch_dtype".into(), d.into());
    }
    write_json(dir, "config.json", &config)?;
    write_json(dir, "generation_config.json", &layout.generation_config)?;
    if let Some((tokenizer, tokenizer_config)) = &layout.tokenizer {
        write_json(dir, "tokenizer.json", tokenizer)?;
        write_json(dir, "tokenizer_config.json", tokenizer_config)?;
    }
    Ok(())
}

/// Where converted GGUF files are kept: `$AMALGAM_CACHE_DIR`, else `$XDG_CACHE_HOME/amalgam`,
/// else `~/.cache/amalgam`.
pub fn cache_root() -> Result<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("AMALGAM_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("amalgam")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("amalgam")))
        .ok_or_else(|| {
            Error::argument(
                "cache directory",
                "none of AMALGAM_CACHE_DIR, XDG_CACHE_HOME or HOME is set; set AMALGAM_CACHE_DIR \
                 to where converted GGUF files may be kept",
            )
        })
}

/// The model directory a `.gguf` input is read through: converted into the cache the first
/// time (f32 for quantized tensors, so the values are exact; plain floats keep their dtype),
/// reused while the file's identity (path, device, inode, length, modification time) is
/// unchanged.
pub fn cached(path: &Path, progress: &dyn Progress) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(path).at(path)?;
    let meta = std::fs::metadata(&canonical).at(path)?;
    let identity = format!(
        "{}\n{}\n{}\n{}\n{}.{}\nformat 1",
        canonical.display(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let key = blake3::hash(identity.as_bytes()).to_hex();
    let stem = canonical
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    let dir = cache_root()?
        .join("gguf")
        .join(format!("{stem}-{}", &key.as_str()[..16]));
    let stamp = dir.join("amalgam-gguf-source.txt");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == identity) {
        return Ok(dir);
    }
    progress.warn(&format!(
        "converting {} to safetensors in {} (once; later runs reuse it while the file is unchanged)",
        path.display(),
        dir.display()
    ));
    let g = Gguf::open(path)?;
    let parent = dir.parent().expect("cache path has a parent");
    std::fs::create_dir_all(parent).at(parent)?;
    write(
        &g,
        &dir,
        None,
        None,
        Existing::Replace,
        &crate::progress::Silent,
    )?;
    std::fs::write(&stamp, &identity).at(&stamp)?;
    Ok(dir)
}
