//! `lora apply`: bake a PEFT LoRA adapter into its base model, `W + scale·ΔW`, streaming.
//!
//! Every base tensor is written in its own dtype; adapted ones are decoded a block of rows at a
//! time, the rows of `ΔW` are added in f32, and the block is encoded and written in place, so
//! the working set is a block per worker plus the module's (small) factors.

use std::path::{Path, PathBuf};

use crate::arch;
use crate::dtype::{decode_f32, encode_f32};
use crate::error::{Error, IoContext, Result};
use crate::exec;
use crate::io::{Existing, Model, ModelWriter, TensorSpec, modeldir};
use crate::lora::Adapter;
use crate::progress::Progress;

/// Options for [`apply`].
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Multiplier of the adapter's delta (PEFT's `scale`; 1 for merge_and_unload).
    pub scale: f64,
    /// Shard byte budget; `None` writes a single file.
    pub shard_size: Option<u64>,
    /// What to do if the output exists.
    pub existing: Existing,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            scale: 1.0,
            shard_size: None,
            existing: Existing::Refuse,
        }
    }
}

/// Elements per block of an adapted tensor.
const BLOCK: usize = 1 << 20;

/// Apply the adapter at `adapter` to the model at `base`, writing a model directory at `output`.
pub fn apply(
    base: &Path,
    adapter: &Path,
    output: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    if !opts.scale.is_finite() {
        return Err(Error::argument("scale", "must be a finite number"));
    }
    let model = Model::open(base)?;
    let adapter = Adapter::open(adapter)?;
    adapter.check_base(&model)?;
    for name in &adapter.ignored {
        progress.warn(&format!(
            "{name} ignored: the adapter config does not set lora_bias (PEFT ignores it too)"
        ));
    }
    // A resized vocabulary (added tokens): the saved matrices' rows, and the adapter's tokenizer.
    let resized = adapter.vocab_rows(&model)?;
    let mut specs: Vec<TensorSpec> = model
        .tensors()
        .iter()
        .map(|e| {
            let mut spec = TensorSpec::from(e);
            if let (Some(rows), Some(saved)) = (resized, adapter.replaced.get(&e.name))
                && arch::is_vocabulary(&e.name)
                && adapter.file.entry(saved).is_ok()
            {
                spec.shape[0] = rows;
            }
            spec
        })
        .collect();
    // A whole LM head for a tied base (see `Adapter::check_base`) is added to the output.
    let untie = adapter
        .replaced
        .get(arch::LM_HEAD)
        .filter(|_| !model.contains(arch::LM_HEAD));
    if let Some(head) = untie {
        let entry = adapter.file.entry(head)?;
        specs.push(TensorSpec {
            name: arch::LM_HEAD.to_string(),
            ..TensorSpec::from(entry)
        });
    }
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    exec::run(&writer, progress, |i, scratch| {
        let spec = &writer.specs()[i];
        // A whole tensor saved in the adapter replaces the model's (PEFT loads it so).
        let source = match adapter.replaced.get(&spec.name) {
            Some(saved) => adapter.file.tensor(saved)?,
            None => model.tensor(&spec.name)?,
        };
        if let Some(delta) = adapter.bias_delta(&spec.name)? {
            let [w] = exec::buffers(&mut scratch.f32s, 1) else {
                unreachable!("one buffer")
            };
            decode_f32(source.dtype, source.bytes, w);
            w.iter_mut()
                .zip(&delta)
                .for_each(|(x, d)| *x += d * opts.scale as f32);
            encode_f32(spec.dtype, w, &mut scratch.bytes);
            return writer.write(i, &scratch.bytes);
        }
        let Some(m) = adapter.modules.get(&spec.name) else {
            if source.dtype == spec.dtype {
                return writer.write(i, source.bytes);
            }
            let ok = crate::dtype::convert_bytes(
                source.dtype,
                source.bytes,
                spec.dtype,
                &mut scratch.bytes,
            );
            debug_assert!(ok, "float to float");
            return writer.write(i, &scratch.bytes);
        };
        let (a, b) = adapter.factors(m)?;
        let cols = m.shape[1];
        let rows_per_block = (BLOCK / cols.max(1)).max(1);
        let (from, to) = (source.dtype.size(), spec.dtype.size());
        let [w, acc] = exec::buffers(&mut scratch.f32s, 2) else {
            unreachable!("two buffers")
        };
        for start in (0..m.shape[0]).step_by(rows_per_block) {
            crate::cancel::check()?;
            let rows = start..(start + rows_per_block).min(m.shape[0]);
            let bytes = &source.bytes[rows.start * cols * from..rows.end * cols * from];
            decode_f32(source.dtype, bytes, w);
            m.add_delta_rows(&a, &b, opts.scale, rows.clone(), w, acc);
            if !w.iter().all(|x| x.is_finite()) {
                return Err(Error::Numeric {
                    name: spec.name.clone(),
                    reason: format!(
                        "applying {} gives NaN or infinite values (check the base and the adapter's factors)",
                        adapter.dir.display()
                    ),
                });
            }
            encode_f32(spec.dtype, w, &mut scratch.bytes);
            writer.write_part(i, (rows.start * cols * to) as u64, &scratch.bytes)?;
        }
        model.release(&spec.name);
        Ok(())
    })?;
    modeldir::copy_side_files(&model.dir, writer.staging_dir(), None)?;
    if let Some(dir) = adapter.tokenizer_dir() {
        for name in modeldir::TOKENIZER_FILES {
            let stale = writer.staging_dir().join(name);
            if stale.is_file() {
                std::fs::remove_file(&stale).at(&stale)?;
            }
        }
        modeldir::copy_present(dir, writer.staging_dir(), modeldir::TOKENIZER_FILES)?;
    }
    if let Some(rows) = resized {
        modeldir::set_config_field(writer.staging_dir(), "vocab_size", rows.into())?;
    }
    if untie.is_some() {
        modeldir::set_config_field(writer.staging_dir(), "tie_word_embeddings", false.into())?;
    }
    model.check_unchanged()?;
    writer.finish()
}
