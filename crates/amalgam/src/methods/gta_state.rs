//! The state of one generalized task-arithmetic merge ([`gta`](super::gta)) that its passes,
//! kernels ([`gta_kernel`](super::gta_kernel)) and whole-model trim
//! ([`gta_global`](super::gta_global)) share: each model's mask, weight and rescale, the passes
//! the tensor needs, and the output pass's buffers. The leaf of the three: it imports none of
//! them.

use super::rng::Key;
use super::select::{Selection, Selector};
use super::sparsify::Rescale;
use crate::sums::LaneSum;

/// How one model's task vector is masked in the output pass.
pub(super) enum Mask {
    /// Everything kept (density ≥ 1 or no sparsification).
    All,
    /// Everything dropped.
    Nothing,
    /// Magnitude selection: pending (two passes) or final.
    Select(Option<Box<Selector>>, Selection),
    /// Random: keep element `i` when `key.bits32(i) < threshold`.
    Random(Key, u32),
    /// A factor per element (0 = dropped), computed whole (DELLA).
    Given(Vec<f32>),
}

pub(super) struct PerModel {
    pub(super) input: usize,
    pub(super) weight: f32,
    pub(super) mask: Mask,
    /// Σ|δ| and Σ|kept δ| for the L1 rescale.
    pub(super) l1: (LaneSum, LaneSum),
    /// Multiplier of kept entries (L1 match or 1/p); 1 when not rescaling.
    pub(super) scale: f32,
    pub(super) inverse_density: Option<f64>,
}

pub(super) struct GtaState {
    pub(super) models: Vec<PerModel>,
    pub(super) passes: Vec<Pass>,
    /// The sign elected where the weighted sum is exactly 0 (`sign_tie: majority`): the sign of
    /// the elected signs' sum over the trim scope; `None` until known or for `positive`.
    pub(super) majority: Option<f32>,
    /// Σ of elected signs so far (the tensor-scope majority pass).
    pub(super) votes: i64,
    pub(super) rescale_l1: bool,
    /// Output the merged delta itself (normalised, not scaled, no base): for methods built on
    /// this one (consensus merging).
    pub(super) raw: bool,
    /// Per-model masked, scaled, weighted deltas of the current tile.
    pub(super) buffers: Vec<Vec<f32>>,
    /// Per element of the tile: the sum that elects the sign, the merged delta, the divisor.
    pub(super) sums: [Vec<f32>; 3],
    /// Keys of the current chunk (selection passes).
    pub(super) keys: Vec<u32>,
    /// Whether the output pass may take the fused loop (tests turn it off to compare).
    pub(super) fuse: bool,
    /// A bf16 chunk decoded for the tiled steps (when the fused loop does not take it).
    pub(super) decoded: Vec<Vec<f32>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    HighBits,
    LowBits,
    L1Sums,
    SignVotes,
}

impl GtaState {
    /// Whether pass `pass` (the output pass when past the statistics passes) of a tensor of
    /// `n` elements can take bf16 chunks: when the kernels it runs read them: the selection
    /// histograms, the fused output loop, and the L1 sums with random masks (one Weyl stream
    /// per model over the whole tensor: `n` ≤ 2^32).
    pub(super) fn reads_bf16(&self, pass: usize, n: usize) -> bool {
        let all = |f: fn(&Mask) -> bool| {
            self.models
                .iter()
                .all(|m| f(&m.mask) && m.inverse_density.is_none())
        };
        let random = all(|m| matches!(m, Mask::Random(..)));
        let fits = n as u64 <= 1 << 32;
        match self.passes.get(pass) {
            Some(Pass::L1Sums) => random && fits,
            // The selection passes read only keys of deltas.
            Some(Pass::HighBits | Pass::LowBits) => true,
            Some(_) => false,
            // Where the fused loop applies; a chunk it does not take is decoded.
            None => {
                let select = all(|m| matches!(m, Mask::Select(..)));
                let plain = all(|m| matches!(m, Mask::All));
                self.fuse
                    && (1..=8).contains(&self.models.len())
                    && ((random && fits) || select || plain)
            }
        }
    }

    pub(super) fn new(models: Vec<PerModel>, rescale: Rescale, majority: Majority) -> GtaState {
        let selecting = models
            .iter()
            .any(|m| matches!(m.mask, Mask::Select(Some(_), _)));
        let rescale_l1 = rescale == Rescale::MatchL1
            && models
                .iter()
                .any(|m| !matches!(m.mask, Mask::All | Mask::Nothing));
        let mut passes = Vec::new();
        if selecting {
            passes.extend([Pass::HighBits, Pass::LowBits]);
        }
        if rescale_l1 {
            passes.push(Pass::L1Sums);
        }
        if majority == Majority::Tensor {
            passes.push(Pass::SignVotes);
        }
        GtaState {
            models,
            passes,
            majority: match majority {
                Majority::Known(m) => Some(m),
                _ => None,
            },
            votes: 0,
            rescale_l1,
            raw: false,
            buffers: Vec::new(),
            sums: Default::default(),
            keys: Vec::new(),
            fuse: true,
            decoded: Vec::new(),
        }
    }
}

/// Where the sign for a zero weighted sum comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Majority {
    /// `+` (mergekit, PEFT).
    Positive,
    /// The majority of elected signs over this tensor, found in a pass.
    Tensor,
    /// Already known (from the whole-model pass).
    Known(f32),
}
