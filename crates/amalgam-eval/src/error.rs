//! Errors of evaluation: each names the file (and the tensor, line or field) and what to do.

use std::path::PathBuf;

/// An evaluation error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the model's tensors failed (bad safetensors, missing tensor, ...).
    #[error(transparent)]
    Model(#[from] amalgam::Error),

    /// `config.json` is missing, malformed or inconsistent.
    #[error("{path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The model's architecture is not one this crate runs.
    #[error(
        "{path}: model_type {model_type:?} is not supported for evaluation \
         (supported: encoders {encoders}; decoder LMs {decoders})"
    )]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The `model_type` found.
        model_type: String,
        /// Supported encoder types.
        encoders: &'static str,
        /// Supported decoder types.
        decoders: &'static str,
    },

    /// A tensor has the wrong shape for the architecture `config.json` describes.
    #[error("{path}: tensor {name} has shape {found:?}, but config.json implies {expected:?}")]
    Shape {
        /// The model.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// `tokenizer.json` is missing or does not load, or a text does not tokenize.
    #[error("{path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },

    /// A task file is unreadable or a row is malformed.
    #[error("{path}:{line}: {reason}")]
    Task {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number (0 for the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },

    /// A classification head is missing, malformed or does not fit the model or task.
    #[error("{path}: {reason}")]
    Head {
        /// The head file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A bad option.
    #[error("{0}")]
    Argument(String),

    /// The tensor library failed (a bug or an out-of-memory condition, not bad input).
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, Error>;
