//! `inspect`: what a model is, from its headers and config alone (no tensor data is read).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::io::Model;

/// A summary of one model.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The path inspected.
    pub path: String,
    /// `architectures[0]` from config.json.
    pub architecture: Option<String>,
    /// `model_type` from config.json.
    pub model_type: Option<String>,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of elements over all tensors.
    pub parameters: u64,
    /// Bytes of tensor data.
    pub total_bytes: u64,
    /// Per dtype: tensor count, parameters, bytes.
    pub dtypes: BTreeMap<String, DTypeStats>,
    /// The shard files.
    pub shards: Vec<ShardReport>,
    /// The largest tensors by bytes, largest first.
    pub largest: Vec<TensorReport>,
}

/// Counts for one dtype.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DTypeStats {
    /// Tensors of this dtype.
    pub tensors: usize,
    /// Elements.
    pub parameters: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One shard file.
#[derive(Clone, Debug, Serialize)]
pub struct ShardReport {
    /// File name.
    pub file: String,
    /// Tensors in it.
    pub tensors: usize,
    /// Bytes of tensor data in it.
    pub bytes: u64,
}

/// One tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    /// Name.
    pub name: String,
    /// dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub bytes: u64,
}

/// Inspect the model at `path`, listing the `top` largest tensors.
pub fn inspect(path: &Path, top: usize) -> Result<Report> {
    let model = Model::open(path)?;
    let config = model.config();
    let text = |key: &str| {
        config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let architecture = config
        .as_ref()
        .and_then(|c| c.get("architectures"))
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .map(str::to_string);
    let mut dtypes: BTreeMap<String, DTypeStats> = BTreeMap::new();
    for t in model.tensors() {
        let s = dtypes.entry(t.dtype.to_string()).or_default();
        s.tensors += 1;
        s.parameters += t.numel() as u64;
        s.bytes += t.nbytes() as u64;
    }
    let shards = model
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| ShardReport {
            file: s.file_name.clone(),
            tensors: model.tensors().iter().filter(|t| t.shard == i).count(),
            bytes: s.header.tensors.iter().map(|t| t.nbytes() as u64).sum(),
        })
        .collect();
    let mut by_size: Vec<_> = model.tensors().iter().collect();
    by_size.sort_by(|a, b| b.nbytes().cmp(&a.nbytes()).then(a.name.cmp(&b.name)));
    let largest = by_size
        .into_iter()
        .take(top)
        .map(|t| TensorReport {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            bytes: t.nbytes() as u64,
        })
        .collect();
    Ok(Report {
        path: path.display().to_string(),
        architecture,
        model_type: text("model_type"),
        tensors: model.tensors().len(),
        parameters: model.tensors().iter().map(|t| t.numel() as u64).sum(),
        total_bytes: model.total_bytes(),
        dtypes,
        shards,
        largest,
    })
}
