//! Cooperative cancellation: the binary's signal handler sets a flag that long loops check, so
//! an interrupted run unwinds normally and its temporary output is removed.

use std::sync::atomic::{AtomicBool, Ordering};

static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Ask running work to stop at the next tensor boundary.
pub fn cancel() {
    CANCELLED.store(true, Ordering::SeqCst);
}

/// Clear a cancellation (a library embedded in a long-lived process, such as the Python
/// module, runs more work after an interrupted one).
pub fn reset() {
    CANCELLED.store(false, Ordering::SeqCst);
}

/// Whether [`cancel`] was called.
pub fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::Relaxed)
}

/// An error if [`cancel`] was called.
pub fn check() -> crate::Result<()> {
    if is_cancelled() {
        Err(crate::Error::argument(
            "run",
            "interrupted; no output was written",
        ))
    } else {
        Ok(())
    }
}
