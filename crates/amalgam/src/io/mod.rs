//! Reading and writing models as the Hugging Face ecosystem stores them: safetensors files,
//! sharded directories with an index, and the side files of a model directory.

pub mod gguf;
pub mod header;
pub mod index;
pub mod model;
pub mod modeldir;
pub mod staging;
pub mod writer;

pub use model::{Model, RELEASE_BLOCK, TensorEntry, TensorView};
pub use writer::{Existing, ModelWriter, TensorSpec, parse_shard_size};
