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
use super::select::{BINS, Selection, key, locate};
use super::*;

/// What the whole-model passes found.
pub(super) struct GlobalTrim {
    /// Per task: elements kept by rank (`⌊ρP⌋`) and elements in scope (`P`).
    want: Vec<(u64, u64)>,
    /// Per task, after the first pass: the high bin holding the threshold and the count below.
    bins: Vec<(u32, u64)>,
    /// Per task, after the second pass: the threshold key, or `None` to keep everything.
    thresholds: Vec<Option<u32>>,
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
        match self.thresholds.get(t).copied().flatten() {
            None => Mask::All,
            Some(v) => Mask::Select(None, Selection::at_least(v)),
        }
    }

    /// The ascending rank of the threshold of task `t`, or `None` to keep everything.
    fn rank(&self, t: usize) -> Option<u64> {
        let (k, p) = self.want[t];
        (k < p).then(|| p - k - 1)
    }
}

/// Per-task histograms (one pass's accumulator).
type Hists = Vec<Vec<u64>>;

fn hists(tasks: usize) -> Hists {
    vec![vec![0u64; BINS]; tasks]
}

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
        let want = densities
            .iter()
            .map(|&d| {
                let k = if d >= 1.0 {
                    total
                } else {
                    (d.max(0.0) * total as f64) as u64
                };
                (k, total)
            })
            .collect();
        Ok(Some(Box::new(GlobalTrim {
            want,
            bins: Vec::new(),
            thresholds: vec![None; tasks],
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
            Box::new(hists(g.want.len()))
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
            return Some(Box::new(hists(g.want.len())));
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
        for (t, &i) in job.non_base().iter().enumerate() {
            if g.rank(t).is_none() {
                continue;
            }
            let keys = job.inputs[i].iter().zip(base).map(|(&a, &b)| key(a - b));
            let hist = &mut h[t];
            if pass == 0 {
                keys.for_each(|k| hist[(k >> 16) as usize] += 1);
            } else {
                let bin = g.bins[t].0;
                keys.filter(|k| k >> 16 == bin)
                    .for_each(|k| hist[(k & 0xffff) as usize] += 1);
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
                m.iter_mut().zip(t).for_each(|(a, b)| *a += b);
            }
        } else {
            let (_, votes) = *tensor.downcast::<(State, i64)>().expect("ours");
            *state_mut::<i64>(model) += votes;
        }
    }

    fn end_model_pass(&self, pass: usize, global: &mut Global, model: State) -> Result<()> {
        let g = global.downcast_mut::<GlobalTrim>().expect("ours");
        match pass {
            0 => {
                let h = model.downcast::<Hists>().expect("ours");
                g.bins = (0..g.want.len())
                    .map(|t| match g.rank(t) {
                        Some(r) => {
                            let (bin, below) = locate(&h[t], r as usize);
                            (bin, below as u64)
                        }
                        None => (0, 0),
                    })
                    .collect();
            }
            1 => {
                let h = model.downcast::<Hists>().expect("ours");
                for t in 0..g.want.len() {
                    if let Some(r) = g.rank(t) {
                        let (bin, below) = g.bins[t];
                        let (low, _) = locate(&h[t], (r - below) as usize);
                        g.thresholds[t] = Some((bin << 16) | low);
                    }
                }
            }
            _ => g.majority = model.downcast::<i64>().expect("ours").signum() as f32,
        }
        Ok(())
    }
}
