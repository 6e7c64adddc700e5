//! The executor: runs one closure per output tensor across the worker threads, each with its
//! own reusable scratch buffers, checking for cancellation and reporting progress. It knows
//! nothing of what the closure computes; the working set is one tensor's buffers per worker.

use rayon::prelude::*;

use crate::error::Result;
use crate::io::ModelWriter;
use crate::progress::Progress;

/// Buffers a worker reuses from one tensor to the next, so steady state allocates nothing.
#[derive(Default)]
pub struct Scratch {
    /// f32 working buffers (inputs decoded, results).
    pub f32s: Vec<Vec<f32>>,
    /// Encoded output bytes.
    pub bytes: Vec<u8>,
    /// Raw input bytes, one buffer per input (read-ahead windows, or whole tensors held
    /// between passes).
    pub raw: Vec<Vec<u64>>,
}

/// One [`Scratch`] per thread of the current rayon pool, kept for the whole run (rayon's
/// `*_init` adaptors make a new value for every piece of work they split off, which for large
/// buffers means fresh pages, faulted in and zeroed, per tensor).
pub struct PerThread(Vec<std::sync::Mutex<Scratch>>);

impl PerThread {
    pub fn new() -> PerThread {
        PerThread(
            (0..rayon::current_num_threads())
                .map(|_| Default::default())
                .collect(),
        )
    }

    /// Run `f` with the calling thread's scratch. Only its own thread locks a slot, so this
    /// never waits: when the slot is taken, the thread is running another piece of work while it
    /// waits inside the first (rayon steals work into nested parallel calls, such as the SVD
    /// methods'), and that piece gets a scratch of its own.
    pub fn with<R>(&self, f: impl FnOnce(&mut Scratch) -> R) -> R {
        let i = rayon::current_thread_index().unwrap_or(0) % self.0.len();
        match self.0[i].try_lock() {
            Ok(mut scratch) => f(&mut scratch),
            // A panic elsewhere leaves the buffers usable.
            Err(std::sync::TryLockError::Poisoned(e)) => f(&mut e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => f(&mut Scratch::default()),
        }
    }
}

impl Default for PerThread {
    fn default() -> Self {
        PerThread::new()
    }
}

/// The first `n` of a worker's f32 buffers (`Scratch::f32s`), created as needed.
pub fn buffers(f32s: &mut Vec<Vec<f32>>, n: usize) -> &mut [Vec<f32>] {
    if f32s.len() < n {
        f32s.resize_with(n, Vec::new);
    }
    &mut f32s[..n]
}

/// Run `produce(i, scratch)` for every output tensor `i` of `writer`, in parallel on the current
/// rayon pool. `produce` writes its result with [`ModelWriter::write`]. Stops at the first error.
pub fn run<F>(writer: &ModelWriter, progress: &dyn Progress, produce: F) -> Result<()>
where
    F: Fn(usize, &mut Scratch) -> Result<()> + Sync,
{
    let sizes: Vec<u64> = writer
        .specs()
        .iter()
        .map(|s| s.nbytes().unwrap_or(0))
        .collect();
    for_each(&sizes, progress, produce)
}

/// Run `produce(i, scratch)` for every item `i` of `sizes` (bytes each, for progress and
/// order), in parallel on the current rayon pool, largest first so that no worker is left with
/// a big one at the end. Stops at the first error.
pub fn for_each<F>(sizes: &[u64], progress: &dyn Progress, produce: F) -> Result<()>
where
    F: Fn(usize, &mut Scratch) -> Result<()> + Sync,
{
    progress.start(sizes.len() as u64, sizes.iter().sum());
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let scratch = PerThread::new();
    order.into_par_iter().with_max_len(1).try_for_each(|i| {
        crate::cancel::check()?;
        scratch.with(|s| produce(i, s))?;
        progress.advance(sizes[i]);
        Ok(())
    })?;
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_thread_scratch_does_not_deadlock_when_work_nests_on_one_thread() {
        let per_thread = PerThread::new();
        let inner = per_thread.with(|outer| {
            outer.bytes.push(1);
            // What a stolen piece of work does while the first waits in a nested parallel call.
            per_thread.with(|nested| {
                nested.bytes.push(2);
                nested.bytes.clone()
            })
        });
        assert_eq!(inner, [2]);
        assert_eq!(per_thread.with(|s| s.bytes.clone()), [1]);
    }
}
