//! Whole-model operations behind the CLI's subcommands.

pub mod convert;
pub mod diff;
pub mod inspect;
pub mod lora;
pub mod merge;
pub(crate) mod source;
pub mod stages;
