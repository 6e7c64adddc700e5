//! `convert`: rewrite a model with another float dtype and/or another sharding, streaming.

use std::path::{Path, PathBuf};

use crate::dtype::{DType, convert_bytes};
use crate::error::{Error, Result};
use crate::exec;
use crate::io::{Existing, Model, ModelWriter, TensorSpec, modeldir};
use crate::progress::Progress;

/// Options for [`convert`].
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Target dtype for float tensors; `None` keeps each tensor's dtype. Integer and bool
    /// tensors are always copied unchanged.
    pub dtype: Option<DType>,
    /// Shard byte budget; `None` writes a single file.
    pub shard_size: Option<u64>,
    /// What to do if the output exists.
    pub existing: Existing,
}

/// Convert the model at `input` into a model directory at `output`.
pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    if let Some(d) = opts.dtype
        && !d.is_float()
    {
        return Err(Error::argument(
            "dtype",
            format!("{d} is not a float dtype"),
        ));
    }
    let model = Model::open(input)?;
    let specs: Vec<TensorSpec> = model
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: match opts.dtype {
                Some(d) if t.dtype.is_float() => d,
                _ => t.dtype,
            },
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    exec::run(&writer, progress, |i, scratch| {
        let spec = &writer.specs()[i];
        let view = model.tensor(&spec.name)?;
        if view.dtype == spec.dtype {
            writer.write(i, view.bytes)?;
        } else {
            let ok = convert_bytes(view.dtype, view.bytes, spec.dtype, &mut scratch.bytes);
            debug_assert!(ok, "specs only change float dtypes");
            writer.write(i, &scratch.bytes)?;
        }
        model.release(&spec.name);
        Ok(())
    })?;
    modeldir::copy_side_files(&model.dir, writer.staging_dir(), opts.dtype)?;
    writer.finish()
}
