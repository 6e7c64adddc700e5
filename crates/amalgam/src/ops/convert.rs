//! `convert`: rewrite a model with another float dtype and/or another sharding, streaming; a
//! GGUF input becomes a Hugging Face model directory ([`crate::io::gguf::convert`]).

use std::path::{Path, PathBuf};

use crate::dtype::{DType, convert_bytes};
use crate::error::{Error, Result};
use crate::exec;
use crate::io::{Existing, Model, ModelWriter, TensorSpec, modeldir};
use crate::progress::Progress;

/// Bytes of input converted at a time.
const PART_BYTES: usize = 16 << 20;

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
    if input.is_file() && crate::io::gguf::is_gguf(input) {
        let g = crate::io::gguf::Gguf::open(input)?;
        return crate::io::gguf::convert::write(
            &g,
            output,
            opts.dtype,
            opts.shard_size,
            opts.existing,
            progress,
        );
    }
    let model = Model::open(input)?;
    let specs: Vec<TensorSpec> = model
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            dtype: match opts.dtype {
                Some(d) if t.dtype.is_float() => d,
                _ => t.dtype,
            },
            ..TensorSpec::from(t)
        })
        .collect();
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    exec::run(&writer, progress, |i, scratch| {
        let spec = &writer.specs()[i];
        let entry = model.entry(&spec.name)?;
        let view = model.tensor(&spec.name)?;
        let (from, to) = (view.dtype.size(), spec.dtype.size());
        // Whole elements per part, so the working set is one part, not one tensor.
        let step = (PART_BYTES / from).max(1) * from;
        for (k, part) in view.bytes.chunks(step).enumerate() {
            let pos = (k * step / from * to) as u64;
            if view.dtype == spec.dtype {
                writer.write_part(i, pos, part)?;
            } else {
                let ok = convert_bytes(view.dtype, part, spec.dtype, &mut scratch.bytes);
                debug_assert!(ok, "specs only change float dtypes");
                writer.write_part(i, pos, &scratch.bytes)?;
            }
            let start = entry.range.start + k * step;
            model.release_range(entry.shard, start..start + part.len());
        }
        Ok(())
    })?;
    modeldir::copy_side_files(&model.dir, writer.staging_dir(), opts.dtype)?;
    model.check_unchanged()?;
    writer.finish()
}
