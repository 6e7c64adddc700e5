//! GGUF files (llama.cpp's container) as one more model source: the container parsed and
//! validated here, its block formats decoded in [`quant`], its tensors, config and tokenizer
//! mapped back to Hugging Face's layout in [`hf`], and a whole file written out as a safetensors
//! model directory in [`convert`] (what `amalgam convert model.gguf out/` runs, and what
//! [`Model::open`](crate::io::Model::open) runs once into a cache when a merge names a `.gguf`).
//!
//! The layout (version 2 and 3; version 1's 32-bit counts are refused): the magic `GGUF`, a u32
//! version, u64 tensor and metadata counts, the metadata as typed key/value pairs, one info
//! record per tensor (name, dimensions fastest-first, ggml type, offset into the data section),
//! then the data section at the next multiple of `general.alignment` (32 by default). Nothing
//! here trusts the file: every length is checked against the bytes that exist before anything
//! is allocated for it, and every tensor's bytes must lie inside the file.

pub mod convert;
pub mod hf;
pub mod quant;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
pub use quant::GgmlType;

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// Whether the file at `path` starts with the GGUF magic (false if it cannot be read).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An unsigned integer (u8, u16, u32 or u64 in the file).
    Uint(u64),
    /// A signed integer (i8, i16, i32 or i64 in the file).
    Int(i64),
    /// A float (f32 or f64 in the file).
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Uint(v) => i64::try_from(v).ok(),
            Value::Int(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::Uint(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's info record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The llama.cpp name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF stores them: fastest-varying first (a `[rows, cols]` matrix is
    /// `[cols, rows]` here).
    pub dims: Vec<u64>,
    /// The storage type.
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// The shape in row-major order (slowest first), as safetensors and PyTorch give it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Length of a row (the fastest dimension; 1 for a scalar).
    pub fn row_len(&self) -> usize {
        self.dims.first().map_or(1, |&d| d as usize)
    }
}

/// A parsed, validated GGUF file, memory-mapped.
#[derive(Debug)]
pub struct Gguf {
    /// The file.
    pub path: PathBuf,
    /// The format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    file: std::fs::File,
    map: memmap2::Mmap,
}

impl Gguf {
    /// Open and validate the GGUF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).at(&path)?;
        // SAFETY: a read-only map of a file amalgam never writes; every offset read through it
        // is validated against the file's length below (the contract of `io::model`'s maps).
        let map = unsafe { memmap2::Mmap::map(&file) }.at(&path)?;
        let (version, metadata, tensors) = parse(&path, &map)?;
        Ok(Gguf {
            path,
            version,
            metadata,
            tensors,
            file,
            map,
        })
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of `tensor` (borrowed from the map).
    pub fn bytes(&self, tensor: &TensorInfo) -> &[u8] {
        &self.map[tensor.range.clone()]
    }

    /// Read `buf.len()` bytes at `offset` with a positioned read (nothing stays mapped).
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset as u64).at(&self.path)
    }

    /// The file's length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the file is empty (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// An error about this file.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::gguf(&self.path, reason)
    }
}

/// Metadata and tensor records are refused beyond these counts: real files have a few dozen
/// keys and a few thousand tensors, and a huge declared count is the cheapest way to make a
/// reader allocate without bound (each record takes at least 8 bytes, checked as well).
const MAX_COUNT: u64 = 1 << 24;
/// Tensors have at most this many dimensions (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// A cursor over the file's bytes that never reads past the end.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()) {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::gguf(
                self.path,
                format!(
                    "{what} at byte {} runs past the end of the file ({} bytes); it is truncated",
                    self.pos,
                    self.bytes.len()
                ),
            )),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    /// A length that must fit in the bytes left, at `unit` bytes per item.
    fn len(&mut self, unit: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n > MAX_COUNT.max(left) || n.saturating_mul(unit as u64) > left {
            return Err(Error::gguf(
                self.path,
                format!(
                    "{what} at byte {at} declares {n} items, more than the {left} bytes left \
                     can hold; the file is corrupt or truncated"
                ),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(1, what)?;
        let at = self.pos;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| Error::gguf(self.path, format!("{what} at byte {at} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u8) -> Result<Value> {
        let what = format!("metadata value of '{key}'");
        Ok(match ty {
            0 => Value::Uint(u64::from(self.take(1, &what)?[0])),
            1 => Value::Int(i64::from(self.take(1, &what)?[0] as i8)),
            2 => Value::Uint(u64::from(u16::from_le_bytes(
                self.take(2, &what)?.try_into().expect("2"),
            ))),
            3 => Value::Int(i64::from(i16::from_le_bytes(
                self.take(2, &what)?.try_into().expect("2"),
            ))),
            4 => Value::Uint(u64::from(self.u32(&what)?)),
            5 => Value::Int(i64::from(self.u32(&what)? as i32)),
            6 => Value::Float(f64::from(f32::from_bits(self.u32(&what)?))),
            7 => match self.take(1, &what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::gguf(
                        self.path,
                        format!("{what} is a bool stored as {b}, not 0 or 1"),
                    ));
                }
            },
            8 => Value::Str(self.string(&what)?),
            9 => {
                if depth > 0 {
                    return Err(Error::gguf(
                        self.path,
                        format!("{what} nests arrays, which GGUF readers do not support"),
                    ));
                }
                let inner = self.u32(&what)?;
                let n = self.len(1, &what)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Uint(self.u64(&what)?),
            11 => Value::Int(self.u64(&what)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(&what)?)),
            t => {
                return Err(Error::gguf(
                    self.path,
                    format!("{what} has value type {t}, which is not a GGUF type (0-12)"),
                ));
            }
        })
    }
}

type Parsed = (u32, Vec<(String, Value)>, Vec<TensorInfo>);

/// Parse and validate a whole GGUF file's bytes. `path` is only used in messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let mut c = Cursor {
        path,
        bytes,
        pos: 0,
    };
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Err(Error::gguf(
            path,
            "does not start with the GGUF magic bytes; it is not a GGUF file",
        ));
    }
    c.pos = 4;
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        return Err(Error::gguf(
            path,
            format!(
                "GGUF version {version}; amalgam reads versions 2 and 3 (convert a version-1 \
                 file with a current llama.cpp first)"
            ),
        ));
    }
    let n_tensors = c.len(8, "tensor count")?;
    let n_kv = c.len(8, "metadata count")?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(Error::gguf(
                path,
                format!("metadata key '{key}' appears twice"),
            ));
        }
        let ty = c.u32(&format!("type of metadata '{key}'"))?;
        let value = c.value(ty, &key, 0)?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => 32,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(Error::gguf(
                    path,
                    format!("general.alignment is {v:?}, not a power of two up to 1 MiB"),
                ));
            }
        },
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&format!("dimension count of tensor '{name}'"))?;
        if n_dims > MAX_DIMS {
            return Err(Error::gguf(
                path,
                format!("tensor '{name}' has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}"),
            ));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64(&format!("dimensions of tensor '{name}'")))
            .collect::<Result<Vec<u64>>>()?;
        let ty_id = c.u32(&format!("type of tensor '{name}'"))?;
        let offset = c.u64(&format!("offset of tensor '{name}'"))?;
        infos.push((name, dims, ty_id, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(infos.len());
    for (name, dims, ty_id, offset) in infos {
        if tensors.iter().any(|t| t.name == name) {
            return Err(Error::gguf(path, format!("tensor '{name}' appears twice")));
        }
        let ty = GgmlType::from_id(ty_id)
            .map_err(|why| Error::gguf(path, format!("tensor '{name}': {why}")))?;
        let numel = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= bytes.len() as u64 * 8)
            .ok_or_else(|| {
                Error::gguf(
                    path,
                    format!("tensor '{name}' has dimensions {dims:?}, more elements than the file can hold"),
                )
            })?;
        let row = dims.first().copied().unwrap_or(1);
        if row % ty.block_len() as u64 != 0 {
            return Err(Error::gguf(
                path,
                format!(
                    "tensor '{name}' ({}) has rows of {row} elements, not a multiple of its \
                     {}-element blocks",
                    ty.name(),
                    ty.block_len()
                ),
            ));
        }
        let nbytes = numel / ty.block_len() as u64 * ty.block_bytes() as u64;
        if offset % alignment as u64 != 0 {
            return Err(Error::gguf(
                path,
                format!(
                    "tensor '{name}' starts at data offset {offset}, not a multiple of the alignment {alignment}"
                ),
            ));
        }
        let start = (data_start as u64).checked_add(offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        let range = match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => s as usize..e as usize,
            _ => {
                return Err(Error::gguf(
                    path,
                    format!(
                        "tensor '{name}' ({}, {nbytes} bytes at data offset {offset}) runs past \
                         the end of the file ({} bytes); it is truncated",
                        ty.name(),
                        bytes.len()
                    ),
                ));
            }
        };
        if let Some(other) = tensors
            .iter()
            .find(|t| t.range.start < range.end && range.start < t.range.end)
        {
            return Err(Error::gguf(
                path,
                format!("tensors '{}' and '{name}' overlap in the file", other.name),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            range,
        });
    }
    Ok((version, metadata, tensors))
}
