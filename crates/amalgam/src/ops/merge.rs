//! `merge`: carry out a merge config. Config → plan → executor → writer: the plan is built and
//! every output header written before any tensor data is read; then each worker decodes one
//! output's inputs to f32, runs the method, encodes the result and writes it in place.

use std::path::{Path, PathBuf};

use crate::config::MergeConfig;
use crate::dtype::{decode_f32, encode_f32};
use crate::error::{Error, Result};
use crate::exec::{self, Scratch};
use crate::io::{Existing, ModelWriter, TensorSpec, modeldir};
use crate::methods::MergeJob;
use crate::plan::{self, ModelSet, Op, Plan, PlannedTensor};
use crate::progress::Progress;

/// Options for [`merge`].
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Shard byte budget (`None`: one file).
    pub shard_size: Option<u64>,
    /// What to do if the output exists.
    pub existing: Existing,
    /// Seed for random methods.
    pub seed: u64,
    /// Planning flags.
    pub plan: plan::PlanOptions,
}

/// Load `config_path` and open its models; returns the config, the models and the plan.
pub fn prepare(
    config_path: &Path,
    opts: plan::PlanOptions,
) -> Result<(MergeConfig, ModelSet, Plan)> {
    let config = MergeConfig::load(config_path)?;
    let set = ModelSet::open(&config)?;
    let plan = plan::build(&config, &set, opts)?;
    Ok((config, set, plan))
}

/// Run the merge described by `config_path` into `output`.
pub fn merge(
    config_path: &Path,
    output: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let (config, set, plan) = prepare(config_path, opts.plan)?;
    plan.warnings.iter().for_each(|w| progress.warn(w));
    execute(&config, &set, &plan, output, opts, progress)
}

/// Execute a prepared plan.
pub fn execute(
    config: &MergeConfig,
    set: &ModelSet,
    plan: &Plan,
    output: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let specs = plan
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
        let t = &plan.tensors[i];
        produce(set, plan, t, opts.seed, scratch, &writer, i)
    })?;
    write_side_files(config, set, plan, writer.staging_dir())?;
    writer.finish()
}

fn produce(
    set: &ModelSet,
    plan: &Plan,
    t: &PlannedTensor,
    seed: u64,
    scratch: &mut Scratch,
    writer: &ModelWriter,
    index: usize,
) -> Result<()> {
    match &t.op {
        Op::CopyBuffer { inputs } => {
            let first = set.models[inputs[0].model].tensor(&inputs[0].tensor)?;
            for i in &inputs[1..] {
                let other = set.models[i.model].tensor(&i.tensor)?;
                if other.dtype != first.dtype || other.bytes != first.bytes {
                    return Err(Error::Numeric {
                        name: t.name.clone(),
                        reason: format!(
                            "non-float buffer differs between {} and {}; make them agree before merging",
                            set.models[inputs[0].model].path.display(),
                            set.models[i.model].path.display()
                        ),
                    });
                }
            }
            writer.write(index, first.bytes)
        }
        Op::Merge {
            inputs,
            base,
            shared,
            per_input,
            ..
        } => {
            let n = t.shape.iter().product::<usize>();
            if scratch.f32s.len() < inputs.len() + 1 {
                scratch.f32s.resize_with(inputs.len() + 1, Vec::new);
            }
            let bufs = &mut scratch.f32s[..inputs.len() + 1];
            let (ins, rest) = bufs.split_at_mut(inputs.len());
            for (buf, input) in ins.iter_mut().zip(inputs) {
                let model = &set.models[input.model];
                let view = model.tensor(&input.tensor)?;
                decode_f32(view.dtype, view.bytes, buf);
                // A vocabulary cut to the smallest input keeps each input's leading rows.
                buf.truncate(n);
                model.release(&input.tensor);
            }
            let out = &mut rest[0];
            out.clear();
            out.resize(n, 0.0);
            let job = MergeJob {
                name: &t.name,
                shape: &t.shape,
                inputs: ins.iter().map(|b| b.as_slice()).collect(),
                base: *base,
                shared,
                per_input,
                seed,
            };
            plan.method.merge(&job, out)?;
            if out.iter().any(|v| !v.is_finite()) {
                return Err(non_finite(set, t, inputs, &job));
            }
            encode_f32(t.dtype, out, &mut scratch.bytes);
            writer.write(index, &scratch.bytes)
        }
    }
}

/// Name the culprit of a NaN or infinity in a merge result: an input, or the method.
fn non_finite(set: &ModelSet, t: &PlannedTensor, inputs: &[plan::Input], job: &MergeJob) -> Error {
    for (input, data) in inputs.iter().zip(&job.inputs) {
        if data.iter().any(|v| !v.is_finite()) {
            return Error::Numeric {
                name: input.tensor.clone(),
                reason: format!(
                    "input {} holds NaN or infinite values; fix or exclude that model",
                    set.models[input.model].path.display()
                ),
            };
        }
    }
    Error::Numeric {
        name: t.name.clone(),
        reason: "the merge produced NaN or infinite values from finite inputs; check the parameters (e.g. weights summing to zero)".into(),
    }
}

fn write_side_files(config: &MergeConfig, set: &ModelSet, plan: &Plan, dir: &Path) -> Result<()> {
    let donor = &set.models[plan.donor];
    if let Some(cfg) = &plan.out_config {
        let path = dir.join("config.json");
        let text = serde_json::to_vec_pretty(cfg).expect("json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    let tokenizer_from = tokenizer_source(config, set)?.unwrap_or(plan.donor);
    let src = &set.models[tokenizer_from].dir;
    modeldir::copy_present(src, dir, modeldir::TOKENIZER_FILES)?;
    modeldir::copy_present(&donor.dir, dir, &modeldir::CONFIG_FILES[1..])?;
    if let Some(template) = &config.chat_template {
        crate::chat_template::apply(config, set, dir, template)?;
    }
    Ok(())
}

fn tokenizer_source(config: &MergeConfig, set: &ModelSet) -> Result<Option<usize>> {
    let source = config
        .tokenizer
        .as_ref()
        .map(|t| t.source.clone())
        .or(config.tokenizer_source.clone());
    match source.as_deref() {
        None => Ok(None),
        Some("base") => Ok(config.base_model.as_ref().map(|b| set.index(b))),
        Some(m) => set
            .refs
            .iter()
            .position(|r| r.0 == m)
            .map(Some)
            .ok_or_else(|| {
                config.error(format!(
                    "tokenizer source '{m}' is not one of the models in the config"
                ))
            }),
    }
}
