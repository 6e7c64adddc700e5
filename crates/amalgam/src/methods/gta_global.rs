//! `trim_scope: global` for TIES: the magnitude threshold of each task vector over the whole
//! model, as the TIES paper, FusionBench, tall_masks and MergeLM compute it (ALGORITHMS.md §1.3),
//! next to mergekit's per-tensor default.
//!
//! For task `t` with `P` elements in the participating tensors and density `ρ`, the reference
//! keeps every element with `|τ| ≥` the `(P − ⌊ρP⌋)`-th smallest `|τ|` (`kthvalue`), ties at the
//! threshold included; so it keeps at least `⌊ρP⌋ + 1` elements. amalgam matches that exactly.
//! `ρ ≥ 1` keeps everything (the reference crashes there). The threshold is found in two
//! streamed whole-model passes of 65,536-bin histograms over the magnitude bits (high 16 bits,
//! then low 16 bits inside the located bin), counts in u64 so that the fold is exact and
//! order-free. With `sign_tie: majority`, a third pass counts the elected signs over the whole
//! model: the paper's rule for elements whose sum is exactly zero.
//!
//! This module holds what the passes find; [`Gta`](super::gta::Gta)'s `WholeModel` passes
//! fill it.

use super::gta_state::Mask;
use super::select::{ModelRanks, RankCounts, Selection};

/// What the whole-model passes found.
pub(super) struct GlobalTrim {
    /// Per task: the threshold's rank (`P − ⌊ρP⌋ − 1` ascending), or `None` to keep
    /// everything.
    pub(super) thresholds: Vec<Option<ModelRanks>>,
    /// Whether a third pass counts the elected signs.
    pub(super) vote: bool,
    /// The sign of the sum of elected signs over the model (0 when it is 0).
    pub majority: f32,
    /// Which tensors take part (trim_scope: global), by plan index.
    pub(super) part: Vec<bool>,
}

impl GlobalTrim {
    /// The final mask of task `t`.
    pub fn mask(&self, t: usize) -> Mask {
        match self.thresholds.get(t).and_then(Option::as_ref) {
            None => Mask::All,
            Some(r) => Mask::Select(None, Selection::at_least(r.key(0))),
        }
    }

    /// Zeroed counts of the current histogram pass, per task.
    pub(super) fn counts(&self) -> Hists {
        self.thresholds
            .iter()
            .map(|r| r.as_ref().map(ModelRanks::counts))
            .collect()
    }
}

/// Per-task histogram counts (one pass's accumulator; `None` for tasks that keep everything).
pub(super) type Hists = Vec<Option<RankCounts>>;
