//! The library's one error type. Every variant names the file and, where there is one, the
//! tensor, so that a message read in a terminal tells the user what broke and where.

use std::path::PathBuf;

use crate::dtype::DType;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in amalgam's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error on a file, with the file it happened on.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file whose structure is wrong (header, offsets, lengths).
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor when one is involved.
        reason: String,
    },

    /// A GGUF file whose structure is wrong or that amalgam cannot map to a Hugging Face model.
    #[error("{}: {reason}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor or metadata key when one is involved.
        reason: String,
    },

    /// A `model.safetensors.index.json` that is malformed or disagrees with its shards.
    #[error("{}: invalid shard index: {reason}", path.display())]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A path that holds no model amalgam can read.
    #[error("{}: {reason}", path.display())]
    NotAModel {
        /// The path given.
        path: PathBuf,
        /// Why it was not recognised.
        reason: String,
    },

    /// A LoRA adapter that does not fit itself or its base model.
    #[error("{}: {name}: {reason}", path.display())]
    Adapter {
        /// The adapter (or base model) file.
        path: PathBuf,
        /// The tensor or module concerned.
        name: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A tensor that was asked for and is not in the model.
    #[error("{}: tensor '{name}' not found", path.display())]
    MissingTensor {
        /// The model.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },

    /// A tensor whose dtype cannot be used where it is asked for.
    #[error("{}: tensor '{name}' has dtype {found}, expected {expected}", path.display())]
    DTypeMismatch {
        /// The model.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// What the operation needs.
        expected: String,
        /// What the file has.
        found: DType,
    },

    /// Tensors that must agree in shape and do not.
    #[error("tensor '{name}': shape {found:?} in {} does not match {expected:?}", path.display())]
    ShapeMismatch {
        /// The model whose tensor is off.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape that was expected.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },

    /// A merge configuration that cannot be carried out.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong and, where possible, what is valid.
        reason: String,
    },

    /// A value the user passed on the command line or in a config that is out of range.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: String,
        /// What is wrong.
        reason: String,
    },

    /// A numeric problem during computation, e.g. a NaN produced by a method.
    #[error("tensor '{name}': {reason}")]
    Numeric {
        /// The tensor.
        name: String,
        /// What went wrong.
        reason: String,
    },

    /// The output location cannot be used.
    #[error("{}: {reason}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidSafetensors`] for `path`.
    pub fn safetensors(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidSafetensors {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidGguf`] for `path`.
    pub fn gguf(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidGguf {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidIndex`] for `path`.
    pub fn index(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidIndex {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::InvalidArgument`].
    pub fn argument(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Attach a path to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Map an I/O error to [`Error::Io`] naming `path`.
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
