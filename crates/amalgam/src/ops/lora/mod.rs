//! The `lora` subcommands: bake an adapter into its base, extract one from a fine-tune, and
//! compose several into one.

mod apply;
mod extract;
mod merge;

pub use apply::{ApplyOptions, apply};
pub use extract::{ExtractOptions, ExtractReport, ModuleError, extract};
pub use merge::{AdapterEntry, LoraMergeConfig, merge};
