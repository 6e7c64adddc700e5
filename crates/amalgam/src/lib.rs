//! amalgam: compose task-specific fine-tunes of one base model into a single model.
//!
//! Data flows one way: a configuration becomes a plan (every output tensor with its inputs and
//! resolved parameters), the executor streams tensors through the plan's operations, and the
//! writer puts each result at its final place on disk. Models are memory-mapped and never held
//! whole in memory.

pub mod arch;
pub mod cancel;
pub mod chat_template;
pub mod config;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod io;
pub mod linalg;
pub mod lora;
pub mod methods;
pub mod ops;
pub mod plan;
pub mod progress;
pub mod simd;

pub use dtype::DType;
pub use error::{Error, Result};
