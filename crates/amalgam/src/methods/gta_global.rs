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

use super::gta::{Gta, GtaState, Mask};
use super::select::{ModelRanks, RankCounts, Selection, key};
use super::*;

/// What the whole-model passes found.
pub(super) struct GlobalTrim {
    /// Per task: the threshold's rank (`P − ⌊ρP⌋ − 1` ascending), or `None` to keep
    /// everything.
    thresholds: Vec<Option<ModelRanks>>,
    /// Whether a third pass counts the elected signs.
    vote: bool,
    /// The sign of the sum of elected signs over the model (0 when it is 0).
    pub majority: f32,
    /// Which tensors take part (trim_scope: global), by plan index.
    part: Vec<bool>,
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
    fn counts(&self) -> Hists {
        self.thresholds
            .iter()
            .map(|r| r.as_ref().map(ModelRanks::counts))
            .collect()
    }
}

/// Per-task histogram counts (one pass's accumulator; `None` for tasks that keep everything).
type Hists = Vec<Option<RankCounts>>;

impl WholeModel for Gta {
    fn begin_model(&self, jobs: &[MergeJob]) -> Result<Option<Global>> {
        let part: Vec<bool> = jobs.iter().map(|j| self.global_scope(j)).collect();
        let Some(first) = jobs.iter().zip(&part).find(|(_, p)| **p).map(|(j, _)| j) else {
            return Ok(None);
        };
        let tasks = first.non_base().len();
        let densities: Vec<f64> = first
            .non_base()
            .iter()
            .map(|&i| first.per_input[i].f("density"))
            .collect();
        let mut total = 0u64;
        let mut vote = false;
        for (job, _) in jobs.iter().zip(&part).filter(|(_, p)| **p) {
            let nb = job.non_base();
            let same = nb.len() == tasks
                && nb
                    .iter()
                    .zip(&densities)
                    .all(|(&i, &d)| job.per_input[i].f("density") == d);
            if !same {
                return Err(job.error(format!(
                    "trim_scope: global needs the same models and one density per model in every \
                     tensor it covers; this tensor differs from {}",
                    first.name
                )));
            }
            let majority = job.shared.choice("sign_tie") == "majority";
            if majority && job.shared.b("rescale") {
                return Err(job.error(
                    "sign_tie: majority with trim_scope: global does not combine with rescale: true",
                ));
            }
            vote |= majority;
            total += job.numel() as u64;
        }
        let thresholds = densities
            .iter()
            .map(|&d| {
                let kept = (d.max(0.0) * total as f64) as u64;
                (d < 1.0 && kept < total).then(|| ModelRanks::new(vec![total - kept - 1]))
            })
            .collect();
        Ok(Some(Box::new(GlobalTrim {
            thresholds,
            vote,
            majority: 0.0,
            part,
        })))
    }

    fn model_passes(&self, global: &Global) -> usize {
        let g = global.downcast_ref::<GlobalTrim>().expect("ours");
        2 + g.vote as usize
    }

    fn begin_pass(&self, pass: usize, global: &Global) -> State {
        let g = global.downcast_ref::<GlobalTrim>().expect("ours");
        if pass < 2 {
            Box::new(g.counts())
        } else {
            Box::new(0i64)
        }
    }

    fn begin_tensor(
        &self,
        pass: usize,
        global: &Global,
        index: usize,
        job: &MergeJob,
    ) -> Option<State> {
        let g = global.downcast_ref::<GlobalTrim>().expect("ours");
        if !g.part[index] {
            return None;
        }
        if pass < 2 {
            return Some(Box::new(g.counts()));
        }
        // The vote pass runs the tensor's own election with the final thresholds.
        let job = MergeJob {
            global: Some(global),
            ..job.clone()
        };
        let state = self.begin(&job).ok()?;
        Some(Box::new((state, 0i64)))
    }

    fn observe_tensor(
        &self,
        pass: usize,
        global: &Global,
        job: &MergeJob,
        offset: usize,
        acc: &mut State,
    ) -> Result<()> {
        let g = global.downcast_ref::<GlobalTrim>().expect("ours");
        let base = job.base_tensor();
        if pass == 2 {
            let (state, votes) = state_mut::<(State, i64)>(acc);
            *votes += state_mut::<GtaState>(state).vote(job, offset);
            return Ok(());
        }
        let h = state_mut::<Hists>(acc);
        for ((&i, ranks), counts) in job.non_base().iter().zip(&g.thresholds).zip(h.iter_mut()) {
            if let (Some(ranks), Some(counts)) = (ranks, counts) {
                let x = job.inputs[i];
                x.iter()
                    .zip(base)
                    .for_each(|(&a, &b)| ranks.count(counts, key(a - b)));
            }
        }
        Ok(())
    }

    fn absorb(
        &self,
        pass: usize,
        _global: &Global,
        model: &mut State,
        _index: usize,
        tensor: State,
    ) {
        if pass < 2 {
            let tensor = tensor.downcast::<Hists>().expect("ours");
            for (m, t) in state_mut::<Hists>(model).iter_mut().zip(tensor.iter()) {
                if let (Some(m), Some(t)) = (m, t) {
                    m.add(t);
                }
            }
        } else {
            let (_, votes) = *tensor.downcast::<(State, i64)>().expect("ours");
            *state_mut::<i64>(model) += votes;
        }
    }

    fn end_model_pass(&self, pass: usize, global: &mut Global, model: State) -> Result<()> {
        let g = global.downcast_mut::<GlobalTrim>().expect("ours");
        match pass {
            0 | 1 => {
                let h = model.downcast::<Hists>().expect("ours");
                for (ranks, counts) in g.thresholds.iter_mut().zip(h.iter()) {
                    if let (Some(ranks), Some(counts)) = (ranks, counts) {
                        ranks.end_pass(counts);
                    }
                }
            }
            _ => g.majority = model.downcast::<i64>().expect("ours").signum() as f32,
        }
        Ok(())
    }
}
