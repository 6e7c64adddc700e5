//! amalgam: compose task-specific fine-tunes of one base model into a single model.
//!
//! Data flows one way: a configuration becomes a plan (every output tensor with its inputs and
//! resolved parameters), the executor streams tensors through the plan's operations, and the
//! writer puts each result at its final place on disk. Models are never held whole in memory:
//! headers are validated from a memory map, and streamed methods read tensor data in small
//! positioned reads. Hot loops are compiled twice and picked at run time ([`simd`]).

pub mod arch;
pub mod cancel;
pub mod chat_template;
pub mod config;
pub mod dtype;
pub mod error;
pub mod exec;
#[doc(hidden)]
pub mod fuzz;
pub mod io;
pub mod library;
pub mod linalg;
pub mod lora;
pub mod methods;
pub mod moe;
pub mod ops;
pub mod plan;
pub mod progress;
pub mod simd;
pub mod stats;
pub mod sums;
pub mod surgeon;
pub mod vocab;

pub use dtype::DType;
pub use error::{Error, Result};
