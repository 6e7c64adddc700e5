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
    let specs = writer.specs();
    let total: u64 = specs.iter().filter_map(|s| s.nbytes()).sum();
    progress.start(specs.len() as u64, total);
    // Largest tensors first, so no worker is left with a big one at the end.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(specs[i].nbytes().unwrap_or(0)));
    order
        .into_par_iter()
        .with_max_len(1)
        .try_for_each_init(Scratch::default, |scratch, i| {
            crate::cancel::check()?;
            produce(i, scratch)?;
            progress.advance(specs[i].nbytes().unwrap_or(0));
            Ok(())
        })?;
    progress.finish();
    Ok(())
}
