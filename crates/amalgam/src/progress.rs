//! Progress reporting for long work. The library reports; the binary decides how to show it.

/// Receives progress from long-running operations. Implementations must be cheap and thread-safe.
pub trait Progress: Sync {
    /// Work is starting: `tensors` items totalling `bytes` bytes of output.
    fn start(&self, _tensors: u64, _bytes: u64) {}
    /// One tensor of `bytes` bytes is done.
    fn advance(&self, _bytes: u64) {}
    /// A named stage of the work begins (e.g. one of a method's whole-model passes); the next
    /// `start` counts that stage's work. An empty name is the main work.
    fn stage(&self, _name: &str) {}
    /// A notice worth showing the user (e.g. a skipped tensor).
    fn warn(&self, _message: &str) {}
    /// A line of information (e.g. a step that had nothing to do), not a warning.
    fn note(&self, _message: &str) {}
    /// Work is done.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
