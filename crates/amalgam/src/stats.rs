//! Measured statistics of a model on data, as files (issue #19): what `amalgam measure`
//! writes and the data-driven merge methods (`regmean`, `fisher`) read.
//!
//! A stats file is one safetensors file. Its tensors are named after the model tensor they
//! describe and the statistic: `{weight}:gram` (`[in, in]`, the mean of `xᵀx` over the inputs
//! `x` of the linear layer whose weight is `{weight}`) or `{tensor}:fisher` (the tensor's shape,
//! its diagonal Fisher). Its `__metadata__` says what was measured ([`Meta`]) and holds the
//! BLAKE3 hash of every described model tensor's stored bytes, so that a merge refuses the
//! statistics of another model (or of a model that changed since).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::{Model, header};

/// The metadata key that marks a stats file and names its kind.
pub const KIND_KEY: &str = "amalgam_stats";
/// The format version written.
pub const VERSION: &str = "1";

/// What a stats file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Gram matrices of linear layers' inputs (RegMean).
    Gram,
    /// Diagonal Fisher information of every parameter (Fisher merging).
    Fisher,
}

impl Kind {
    /// The name in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gram => "gram",
            Kind::Fisher => "fisher",
        }
    }

    /// From [`name`](Self::name).
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "gram" => Some(Kind::Gram),
            "fisher" => Some(Kind::Fisher),
            _ => None,
        }
    }
}

/// The stored name of statistic `kind` of model tensor `tensor`.
pub fn stat_name(tensor: &str, kind: Kind) -> String {
    format!("{tensor}:{}", kind.name())
}

/// A stats file's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// What it holds.
    pub kind: Kind,
    /// Data rows measured.
    pub rows: usize,
    /// Token positions counted (Gram: the rows of every `xᵀx` summed).
    pub tokens: u64,
    /// Options of the measurement, for the record (`mask_padding`, `max_len`, `data`,
    /// `variant`, ...), as strings.
    pub options: BTreeMap<String, String>,
    /// BLAKE3 of each described model tensor's stored bytes.
    pub weights: BTreeMap<String, String>,
    /// Fisher: the sum of squares of every stored Fisher value (the model's squared Fisher
    /// norm, which Fisher merging's normalisation divides by).
    pub sq_norm: Option<f64>,
}

impl Meta {
    fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(KIND_KEY.into(), self.kind.name().into());
        m.insert("version".into(), VERSION.into());
        m.insert("rows".into(), self.rows.to_string());
        m.insert("tokens".into(), self.tokens.to_string());
        m.insert(
            "options".into(),
            serde_json::to_string(&self.options).expect("string map"),
        );
        m.insert(
            "weights".into(),
            serde_json::to_string(&self.weights).expect("string map"),
        );
        if let Some(n) = self.sq_norm {
            m.insert("sq_norm".into(), format!("{n:e}"));
        }
        m
    }

    fn from_map(path: &Path, m: &BTreeMap<String, String>) -> Result<Meta> {
        let err = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let kind = m.get(KIND_KEY).ok_or_else(|| {
            err("not an amalgam stats file (no amalgam_stats metadata); make one with `amalgam measure`".into())
        })?;
        let kind = Kind::parse(kind)
            .ok_or_else(|| err(format!("unknown statistics kind '{kind}' (gram, fisher)")))?;
        if m.get("version").map(String::as_str) != Some(VERSION) {
            return Err(err(format!(
                "stats format version {:?}; this amalgam reads version {VERSION}",
                m.get("version")
            )));
        }
        let num = |key: &str| -> Result<u64> {
            m.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| err(format!("metadata '{key}' is missing or not a number")))
        };
        let json = |key: &str| -> Result<BTreeMap<String, String>> {
            serde_json::from_str(m.get(key).map_or("{}", String::as_str))
                .map_err(|e| err(format!("metadata '{key}': {e}")))
        };
        let sq_norm = match m.get("sq_norm") {
            Some(v) => Some(
                v.parse::<f64>()
                    .map_err(|_| err("metadata 'sq_norm' is not a number".into()))?,
            ),
            None => None,
        };
        Ok(Meta {
            kind,
            rows: num("rows")? as usize,
            tokens: num("tokens")?,
            options: json("options")?,
            weights: json("weights")?,
            sq_norm,
        })
    }
}

/// BLAKE3 of a tensor's stored bytes, hex (what [`Meta::weights`] records).
pub fn weight_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Write a stats file: `tensors` (name, shape, values) in `dtype` (F32 or F64), with `meta`.
/// The file is written beside `path` and renamed into place, so an interrupted run leaves no
/// stats file behind; an existing `path` is an error unless `overwrite`.
pub fn write(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f64>)],
    dtype: DType,
    meta: &Meta,
    overwrite: bool,
) -> Result<()> {
    let out_err = |reason: String| Error::Output {
        path: path.to_path_buf(),
        reason,
    };
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(out_err(format!(
            "statistics are stored as F32 or F64, not {dtype:?}"
        )));
    }
    if path.exists() && !overwrite {
        return Err(out_err(
            "already exists; pass --overwrite to replace it".into(),
        ));
    }
    let size = dtype.size();
    let mut layout = Vec::with_capacity(tensors.len());
    let mut start = 0usize;
    for (name, shape, values) in tensors {
        let n = values.len() * size;
        layout.push((name.as_str(), dtype, &shape[..], start, start + n));
        start += n;
    }
    let prefix = header::serialize(layout, &meta.to_map());
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(crate::io::staging::STAGING_PREFIX)
        .suffix(".safetensors")
        .tempfile_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let io = |e| Error::io(path, e);
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        w.write_all(&prefix).map_err(io)?;
        for (_, _, values) in tensors {
            for &v in values {
                match dtype {
                    DType::F64 => w.write_all(&v.to_le_bytes()).map_err(io)?,
                    _ => w.write_all(&(v as f32).to_le_bytes()).map_err(io)?,
                }
            }
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path)
        .map_err(|e| out_err(format!("could not move the finished file into place: {e}")))?;
    Ok(())
}

/// An opened stats file.
#[derive(Debug)]
pub struct Stats {
    /// Its path.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: Meta,
    file: Model,
}

impl Stats {
    /// Open and validate `path` (a stats file of any kind).
    pub fn open(path: &Path) -> Result<Stats> {
        if !path.is_file() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                reason: "stats file not found (make one with `amalgam measure`)".into(),
            });
        }
        let file = Model::open(path)?;
        let meta = Meta::from_map(path, &file.shards[0].header.metadata)?;
        for t in file.tensors() {
            if !matches!(t.dtype, DType::F32 | DType::F64) {
                return Err(Error::DTypeMismatch {
                    path: path.to_path_buf(),
                    name: t.name.clone(),
                    found: t.dtype,
                    expected: "F32 or F64".into(),
                });
            }
        }
        Ok(Stats {
            path: path.to_path_buf(),
            meta,
            file,
        })
    }

    /// [`open`](Self::open), requiring statistics of `kind`.
    pub fn open_kind(path: &Path, kind: Kind) -> Result<Stats> {
        let s = Stats::open(path)?;
        if s.meta.kind != kind {
            return Err(Error::Config {
                path: path.to_path_buf(),
                reason: format!(
                    "holds {} statistics; this needs {} (amalgam measure --stats {})",
                    s.meta.kind.name(),
                    kind.name(),
                    kind.name()
                ),
            });
        }
        Ok(s)
    }

    /// Whether statistic `kind` of model tensor `tensor` is stored.
    pub fn has(&self, tensor: &str, kind: Kind) -> bool {
        self.file.contains(&stat_name(tensor, kind))
    }

    /// Statistic `kind` of model tensor `tensor`, checked to have `shape`, as f64; `None` if the
    /// file does not describe that tensor. `stored` is the model tensor's stored bytes: they
    /// must hash to what the measurement recorded, or the statistics belong to another model.
    pub fn get(
        &self,
        tensor: &str,
        kind: Kind,
        shape: &[usize],
        stored: &[u8],
    ) -> Result<Option<Vec<f64>>> {
        let name = stat_name(tensor, kind);
        if !self.file.contains(&name) {
            return Ok(None);
        }
        let err = |reason: String| Error::Config {
            path: self.path.clone(),
            reason: format!("{name}: {reason}"),
        };
        match self.meta.weights.get(tensor) {
            None => return Err(err("no hash of the model tensor recorded".into())),
            Some(h) if *h != weight_hash(stored) => {
                return Err(err(format!(
                    "measured on another model: tensor '{tensor}' differs from the one these \
                     statistics were measured on (measure this model again)"
                )));
            }
            Some(_) => {}
        }
        let entry = self.file.entry(&name)?;
        if entry.shape != shape {
            return Err(Error::ShapeMismatch {
                name,
                path: self.path.clone(),
                found: entry.shape.to_vec(),
                expected: shape.to_vec(),
            });
        }
        // A positioned read, not the file's map: no mapped pages stay behind, and a file cut
        // short since it was opened is an error here, not a crash.
        let mut bytes = vec![0u8; entry.range.len()];
        self.file
            .read_at(entry.shard, entry.range.start, &mut bytes)?;
        let values: Vec<f64> = match entry.dtype {
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
                .collect(),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(err("holds NaN or infinite values".into()));
        }
        Ok(Some(values))
    }
}
