//! amalgam-eval: measure what a merge did to each task, on CPU, with candle.
//!
//! Loads a model folder as amalgam writes it (memory-mapped safetensors, Hugging Face
//! `config.json`, `tokenizer.json`) and evaluates it on JSONL tasks: accuracy of a linear head
//! over mean-pooled outputs for BERT-family encoders, per-token loss and perplexity for decoder
//! LMs (Llama, Mistral, Qwen2, Qwen3). The heavy inference dependencies live only in this crate,
//! so the core library builds without them.

pub mod adamerge;
pub mod bert;
pub mod config;
pub mod decoder;
pub mod error;
pub mod eval;
pub mod gemm;
pub mod grad;
pub mod head;
pub mod measure;
pub mod moe_block;
pub mod moe_gate;
pub mod nn;
pub mod route;
pub mod task;
pub mod tokenize;
pub mod weights;

pub use error::{Error, Result};
pub use eval::{Evaluator, Metrics, Routed, TaskReport, TaskResult, Weighting};
pub use head::Head;
pub use task::{Kind, Task};
