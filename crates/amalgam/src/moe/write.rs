//! Writing a prepared MoE: every output tensor streamed part by part, chunk by chunk, from its
//! model into its place (through the executor, the input [`Source`](crate::ops::source) that
//! adds `model+adapter` deltas and checks values, and the staging writer), so memory stays at a
//! few chunks per worker whatever the model size.

use std::path::{Path, PathBuf};

use crate::dtype::encode_f32;
use crate::error::{Error, Result};
use crate::exec::{self, Scratch, buffers};
use crate::io::{Existing, ModelWriter, TensorSpec, modeldir};
use crate::methods::rng::Key;
use crate::moe::gates::{Gates, normal};
use crate::moe::{Make, OutTensor, Part, Prepared};
use crate::ops::source::{chunks, with_source};
use crate::progress::Progress;

/// Options for [`write`].
#[derive(Clone, Debug, Default)]
pub struct MoeOptions {
    /// Shard byte budget (`None`: one file).
    pub shard_size: Option<u64>,
    /// What to do if the output exists.
    pub existing: Existing,
    /// Seed of the experts' `noise_scale` noise.
    pub seed: u64,
}

/// Elements per read and write.
const CHUNK: usize = 1 << 16;

/// Write the MoE `prepared` describes, with router weights `gates`, into `output` (staged and
/// renamed into place when complete). Returns the output directory.
pub fn write(
    prepared: &Prepared,
    gates: &Gates,
    output: &Path,
    opts: &MoeOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    if gates.layers.len() != prepared.layers
        || gates.hidden != prepared.hidden
        || gates.experts != prepared.config.gated().len()
    {
        return Err(Error::argument(
            "router weights",
            format!(
                "{} layers × {} experts × {}, the model needs {} × {} × {}",
                gates.layers.len(),
                gates.experts,
                gates.hidden,
                prepared.layers,
                prepared.config.gated().len(),
                prepared.hidden
            ),
        ));
    }
    let specs = prepared
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(output, specs, opts.shard_size, opts.existing)?;
    exec::run(&writer, progress, |i, scratch| {
        produce(
            prepared,
            gates,
            &prepared.tensors[i],
            i,
            &writer,
            scratch,
            opts.seed,
        )
    })?;
    let dir = writer.staging_dir();
    let path = dir.join("config.json");
    let text = serde_json::to_vec_pretty(&prepared.out_config).expect("json");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    let base = &prepared.set.models[0].dir;
    modeldir::copy_present(base, dir, modeldir::TOKENIZER_FILES)?;
    modeldir::copy_present(base, dir, &modeldir::CONFIG_FILES[1..])?;
    prepared.set.check_unchanged()?;
    writer.finish()
}

fn produce(
    prepared: &Prepared,
    gates: &Gates,
    t: &OutTensor,
    index: usize,
    writer: &ModelWriter,
    scratch: &mut Scratch,
    seed: u64,
) -> Result<()> {
    let Scratch { f32s, bytes, raw } = scratch;
    match &t.make {
        Make::Zeros => {
            encode_f32(t.dtype, &vec![0.0; t.numel()], bytes);
            writer.write(index, bytes)
        }
        Make::Router { layer, experts } => {
            encode_f32(t.dtype, &gates.rows(*layer, experts.clone()), bytes);
            writer.write(index, bytes)
        }
        Make::Parts(parts) => {
            for part in parts {
                let buf = &mut buffers(f32s, 1)[0];
                copy_part(prepared, t, part, index, writer, raw, buf, bytes, seed)?;
            }
            Ok(())
        }
    }
}

/// Stream `part` into its place in output tensor `index`, adding its noise and scale.
#[allow(clippy::too_many_arguments)]
fn copy_part(
    prepared: &Prepared,
    t: &OutTensor,
    part: &Part,
    index: usize,
    writer: &ModelWriter,
    raw: &mut Vec<Vec<u64>>,
    buf: &mut Vec<f32>,
    bytes: &mut Vec<u8>,
    seed: u64,
) -> Result<()> {
    let inputs = std::slice::from_ref(&part.input);
    let key = Key::new(seed, &format!("moe.noise.{}", part.input.tensor), part.slot);
    with_source(&prepared.set, inputs, raw, |source| {
        for range in chunks(part.len, CHUNK) {
            crate::cancel::check()?;
            source.read_input(0, range.clone(), buf, true)?;
            if let Some(sd) = part.noise {
                for (j, x) in buf.iter_mut().enumerate() {
                    *x = (*x as f64 + normal(&key, (range.start + j) as u64) * sd) as f32;
                }
            }
            // In f32, as torch scales a tensor by a Python float (bf16 ones computed in f32 too).
            if let Some(k) = part.scale {
                let k = k as f32;
                buf.iter_mut().for_each(|x| *x *= k);
            }
            if (part.noise.is_some() || part.scale.is_some()) && !crate::simd::all_finite(buf) {
                return Err(Error::Numeric {
                    name: t.name.clone(),
                    reason: format!(
                        "noise_scale or residual_scale made {} of {} overflow",
                        part.input.tensor,
                        prepared.set.models[part.input.model].path.display()
                    ),
                });
            }
            encode_f32(t.dtype, buf, bytes);
            let pos = ((part.offset + range.start) * t.dtype.size()) as u64;
            writer.write_part(index, pos, bytes)?;
        }
        Ok(())
    })
}
