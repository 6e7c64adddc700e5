//! The task library: one base model plus a compact module per task, built once from N
//! fine-tunes, from which any task's model is rebuilt on demand (`library build`, `rebuild`,
//! `info`, `export-lora`).
//!
//! Data flows as in a merge: the config becomes a plan (the scheme's parameters resolved per
//! tensor and task by the merge planner), the executor's input side streams each tensor's
//! inputs to the scheme (one file per scheme: [`emr`], [`tall`], [`tsv_c`], [`sign`],
//! [`ternary`], [`quant`], [`twin`], [`dense`]), which writes the shared parts in place and
//! hands back each task's parts; [`format`] describes the files.

pub mod bits;
mod build;
pub mod config;
pub mod dense;
pub mod emr;
mod export;
pub mod format;
pub mod quant;
mod rebuild;
pub mod scheme;
pub mod sign;
pub mod tall;
pub mod ternary;
mod ternary_binned;
pub mod tsv_c;
pub mod twin;

pub use build::{BuildOptions, build};
pub use export::export_lora;
pub use format::Manifest;
pub use rebuild::{Library, RebuildOptions, TaskModule, rebuild};
