//! `library export-lora`: a task as a PEFT LoRA adapter, since serving engines load LoRA only.
//! The task is rebuilt in f32 into a staging directory beside the output, then `lora extract`
//! factors each 2-D module's `θ̂_t − θ0` (its options: rank, energy, exact SVD, embeddings
//! saved whole unless asked), and the staging model is removed.

use std::path::Path;

use super::rebuild::{RebuildOptions, rebuild};
use crate::dtype::DType;
use crate::error::{IoContext, Result};
use crate::io::Existing;
use crate::ops::lora::{ExtractOptions, ExtractReport, extract};
use crate::progress::Progress;

/// Write task `task` of the library at `lib` as a PEFT adapter at `output`.
pub fn export_lora(
    lib: &Path,
    task: &str,
    base: Option<&Path>,
    output: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    // The rebuilt model is a staging directory of the output's: if this run is killed, the next
    // run into the output (or `amalgam clean`) removes it.
    let staging = tempfile::Builder::new()
        .prefix(crate::io::staging::STAGING_PREFIX)
        .tempdir_in(parent)
        .at(parent)?;
    crate::io::staging::mark(staging.path(), &crate::io::staging::Owner::me(output))?;
    let rebuilt = staging.path().join("model");
    let library = super::Library::open(lib)?;
    let base = base
        .map(Path::to_path_buf)
        .unwrap_or_else(|| library.manifest.base.path.clone().into());
    progress.stage(&format!("rebuilding {task}"));
    rebuild(
        lib,
        task,
        &rebuilt,
        &RebuildOptions {
            base: Some(base.clone()),
            existing: Existing::Refuse,
            out_dtype: Some(DType::F32),
            ..Default::default()
        },
        progress,
    )?;
    progress.stage("extracting the adapter");
    let report = extract(&base, &rebuilt, output, opts, progress)?;
    progress.stage("");
    Ok(report)
}
