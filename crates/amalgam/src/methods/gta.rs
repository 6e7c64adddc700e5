//! Generalized task arithmetic: task arithmetic × a sparsification × a sign consensus.
//! `task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`,
//! `della` and `della_linear` are this one computation with different parts and defaults:
//!
//! 1. `δᵢ = sparsify(θᵢ − θ₀, densityᵢ)`, then `δᵢ ← wᵢ·δᵢ`;
//! 2. with consensus, elect a sign per element (`Σᵢ δᵢ ≥ 0 ⇒ +`) and keep only agreeing
//!    entries; the divisor is the sum of agreeing weights (0 → 1); without, `Σ wᵢ` (|·|<1e-8 → 1);
//! 3. `normalize` divides by the divisor, `lambda` scales, and `θ = θ₀ + λ·Σ δᵢ`.
//!
//! Everything but DELLA's per-row ranking is streamed: magnitude trimming finds each model's
//! exact top-k boundary in two histogram passes ([`select`](super::select)), the L1 rescale
//! sums in one more, and the output pass applies masks, election and merge in one sweep.

use super::gta_global::{GlobalTrim, Hists};
use super::gta_kernel::{Finish, apply_chunk, l1_chunk};
use super::gta_state::{GtaState, Majority, Mask, Pass, PerModel};
use super::rng::{Key, threshold32};
use super::select::{ModelRanks, Selection, Selector, Want, delta_keys, delta_keys_bf16, key};
use super::sparsify::{Rescale, della_mask};
use super::*;
use crate::config::Kind;
use crate::sums::LaneSum;

/// Which sparsification a GTA method uses (parameters are resolved per model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sparsifier {
    None,
    Magnitude,
    Random,
    MagnitudeOutliers,
    DellaMagprune,
}

/// One generalized task-arithmetic method.
pub struct Gta {
    spec: MethodSpec,
    sparsifier: Sparsifier,
    consensus: bool,
}

/// The eight GTA methods mergekit registers.
pub fn all() -> Vec<Gta> {
    use Sparsifier::*;
    let m = |name, pretty, reference, sparsifier, consensus, normalize, rescale| {
        Gta::new(
            name, pretty, reference, sparsifier, consensus, normalize, rescale,
        )
    };
    vec![
        m(
            "task_arithmetic",
            "Task Arithmetic",
            "https://arxiv.org/abs/2212.04089",
            None,
            false,
            false,
            false,
        ),
        m(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            Magnitude,
            true,
            true,
            false,
        ),
        m(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            Random,
            true,
            false,
            true,
        ),
        m(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            Random,
            false,
            false,
            true,
        ),
        m(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            MagnitudeOutliers,
            false,
            false,
            false,
        ),
        m(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
            MagnitudeOutliers,
            true,
            false,
            false,
        ),
        m(
            "della",
            "DELLA",
            "https://arxiv.org/abs/2406.11617",
            DellaMagprune,
            true,
            true,
            true,
        ),
        m(
            "della_linear",
            "Linear DELLA",
            "https://arxiv.org/abs/2406.11617",
            DellaMagprune,
            false,
            false,
            true,
        ),
    ]
}

impl Gta {
    fn new(
        name: &'static str,
        pretty_name: &'static str,
        reference: &'static str,
        sparsifier: Sparsifier,
        consensus: bool,
        normalize: bool,
        rescale: bool,
    ) -> Gta {
        let mut params = vec![
            ParamSpec::new("int8_mask", Kind::Bool, Scope::Shared, Value::Bool(false)),
            ParamSpec::new(
                "normalize",
                Kind::Bool,
                Scope::Shared,
                Value::Bool(normalize),
            ),
            ParamSpec::new("rescale", Kind::Bool, Scope::Shared, Value::Bool(rescale)),
            ParamSpec::new("lambda", Kind::Float, Scope::Shared, Value::Float(1.0)),
            ParamSpec::required("weight", Kind::Float, Scope::NonBase),
            ParamSpec::new("density", Kind::Float, Scope::NonBase, Value::Float(1.0)),
        ];
        match sparsifier {
            Sparsifier::MagnitudeOutliers => params.push(ParamSpec::new(
                "gamma",
                Kind::Float,
                Scope::NonBase,
                Value::Float(0.01),
            )),
            Sparsifier::DellaMagprune => params.push(ParamSpec::new(
                "epsilon",
                Kind::Float,
                Scope::NonBase,
                Value::Float(0.15),
            )),
            _ => {}
        }
        if sparsifier == Sparsifier::Magnitude {
            // amalgam's option: the TIES paper's threshold over the whole model per task.
            params.push(ParamSpec::new(
                "trim_scope",
                Kind::Choice(&["tensor", "global"]),
                Scope::Shared,
                Value::Choice("tensor"),
            ));
        }
        if consensus {
            // amalgam's options: the TIES paper's sign election and disjoint mean.
            params.push(ParamSpec::new(
                "sign_tie",
                Kind::Choice(&["positive", "majority"]),
                Scope::Shared,
                Value::Choice("positive"),
            ));
            params.push(ParamSpec::new(
                "mean_divisor",
                Kind::Choice(&["weight", "count"]),
                Scope::Shared,
                Value::Choice("weight"),
            ));
        }
        if matches!(sparsifier, Sparsifier::Random | Sparsifier::DellaMagprune) {
            // amalgam's option: the papers' unbiased 1/p rescale instead of L1-norm matching.
            params.push(ParamSpec::new(
                "rescale_inverse_density",
                Kind::Bool,
                Scope::Shared,
                Value::Bool(false),
            ));
        }
        Gta {
            spec: MethodSpec {
                name,
                pretty_name,
                reference,
                params,
                contract: Contract::WITH_BASE,
            },
            sparsifier,
            consensus,
        }
    }

    /// Whether `job`'s tensor is trimmed against the whole-model threshold.
    pub(super) fn global_scope(&self, job: &MergeJob) -> bool {
        self.sparsifier == Sparsifier::Magnitude && job.shared.choice("trim_scope") == "global"
    }

    pub(super) fn rescale(job: &MergeJob) -> Rescale {
        match (
            job.shared.b("rescale"),
            job.shared.b("rescale_inverse_density"),
        ) {
            (false, _) => Rescale::None,
            (true, false) => Rescale::MatchL1,
            (true, true) => Rescale::InverseKeepProbability,
        }
    }
}

/// The sign elected by the weighted sum: `+1` when `Σ ≥ 0`, else `−1` (mergekit's rule).
pub fn elect_sign_sum(values: impl Iterator<Item = f32>) -> f32 {
    if values.sum::<f32>() >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

impl Streaming for Gta {
    fn begin(&self, job: &MergeJob) -> Result<State> {
        let n = job.numel();
        let rescale = Gta::rescale(job);
        let global = if self.global_scope(job) {
            Some(
                job.global
                    .and_then(|g| g.downcast_ref::<GlobalTrim>())
                    .ok_or_else(|| {
                        job.error(
                            "trim_scope: global needs the whole-model pass of `amalgam merge`",
                        )
                    })?,
            )
        } else {
            None
        };
        let majority = match (
            self.consensus && job.shared.choice("sign_tie") == "majority",
            global,
        ) {
            (false, _) => Majority::Positive,
            (true, Some(g)) => Majority::Known(g.majority),
            (true, None) => Majority::Tensor,
        };
        let models = job
            .non_base()
            .into_iter()
            .enumerate()
            .map(|(pos, i)| {
                let p = &job.per_input[i];
                let density = p.f("density");
                let mask = if let Some(g) = global {
                    g.mask(pos)
                } else if self.sparsifier == Sparsifier::None || density >= 1.0 {
                    Mask::All
                } else {
                    match self.sparsifier {
                        Sparsifier::Magnitude if density <= 0.0 || n == 0 => Mask::Nothing,
                        Sparsifier::Magnitude => {
                            let k = ((density * n as f64) as usize).max(1);
                            selector(n, Want::TopK(k))
                        }
                        Sparsifier::MagnitudeOutliers => {
                            let target = ((density.max(0.0) * n as f64) as usize).min(n);
                            let top = (p.f("gamma") * n as f64) as usize;
                            let bottom = n.saturating_sub(target + top);
                            selector(n, Want::Window(bottom, bottom + target))
                        }
                        Sparsifier::Random if density <= 0.0 => Mask::Nothing,
                        Sparsifier::Random => {
                            Mask::Random(Key::new(job.seed, job.name, i), threshold32(density))
                        }
                        // Filled in by `merge_della`, which has the whole tensor.
                        Sparsifier::DellaMagprune => Mask::Given(Vec::new()),
                        Sparsifier::None => unreachable!("no sparsification"),
                    }
                };
                let sparse = !matches!(mask, Mask::All);
                PerModel {
                    input: i,
                    weight: p.f("weight") as f32,
                    mask,
                    l1: (LaneSum::default(), LaneSum::default()),
                    scale: 1.0,
                    inverse_density: (sparse && rescale == Rescale::InverseKeepProbability)
                        .then_some(density),
                }
            })
            .collect::<Vec<_>>();
        Ok(Box::new(GtaState::new(models, rescale, majority)))
    }

    fn passes(&self, state: &State) -> usize {
        state
            .downcast_ref::<GtaState>()
            .map_or(0, |s| s.passes.len())
    }

    fn reads_bf16(&self, pass: usize, job: &MergeJob, state: &State) -> bool {
        state
            .downcast_ref::<GtaState>()
            .is_some_and(|s| s.reads_bf16(pass, job.numel()))
    }

    fn observe(&self, pass: usize, job: &MergeJob, offset: usize, state: &mut State) -> Result<()> {
        let st = state_mut::<GtaState>(state);
        let kind = st.passes[pass];
        match kind {
            Pass::SignVotes => {
                st.votes += st.vote(job, offset);
                return Ok(());
            }
            Pass::L1Sums => {
                l1_chunk(st, job, offset);
                return Ok(());
            }
            _ => {}
        }
        for m in &mut st.models {
            let Mask::Select(Some(s), _) = &mut m.mask else {
                continue;
            };
            match job.base_bf16() {
                Some(b) => delta_keys_bf16(job.bf16[m.input], b, &mut st.keys),
                None => delta_keys(job.inputs[m.input], job.base_tensor(), &mut st.keys),
            }
            match kind {
                Pass::HighBits => s.count_high(&st.keys),
                _ => s.count_low(&st.keys),
            }
        }
        Ok(())
    }

    fn end_pass(&self, pass: usize, _job: &MergeJob, state: &mut State) -> Result<()> {
        let st = state_mut::<GtaState>(state);
        match st.passes[pass] {
            Pass::HighBits => {
                for m in &mut st.models {
                    if let Mask::Select(Some(s), _) = &mut m.mask {
                        s.end_high();
                    }
                }
            }
            Pass::LowBits => {
                for m in &mut st.models {
                    if let Mask::Select(s, sel) = &mut m.mask
                        && let Some(s) = s.take()
                    {
                        *sel = s.finish();
                    }
                }
            }
            Pass::SignVotes => st.majority = Some(st.votes.signum() as f32),
            Pass::L1Sums => {
                for m in &mut st.models {
                    let (before, after) = (m.l1.0.total(), m.l1.1.total());
                    if !matches!(m.mask, Mask::All) && before >= 1e-7 && after >= 1e-7 {
                        m.scale = (before / after) as f32;
                    }
                }
            }
        }
        // Every pass walks the tensor from its start: tie counters start over.
        for m in &mut st.models {
            if let Mask::Select(None, sel) = &mut m.mask {
                sel.rewind();
            }
        }
        Ok(())
    }

    fn apply(
        &self,
        job: &MergeJob,
        offset: usize,
        state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let st = state_mut::<GtaState>(state);
        if st.models.is_empty() {
            if st.raw {
                out.fill(0.0);
            } else {
                out.copy_from_slice(job.base_tensor());
            }
            return Ok(());
        }
        let finish = Finish {
            normalize: job.shared.b("normalize"),
            lambda: job.shared.f("lambda") as f32,
            raw: st.raw,
            // `+` by mergekit's rule; with `sign_tie: majority`, the majority of the elected
            // signs, and when that is 0 too, `−` as the paper's code has it.
            tie_up: st.majority.is_none_or(|m| m > 0.0),
            by_count: self.consensus && job.shared.choice("mean_divisor") == "count",
        };
        apply_chunk(st, job, offset, self.consensus, finish, out);
        Ok(())
    }
}

fn selector(n: usize, want: Want) -> Mask {
    match Selector::new(n, want) {
        Ok(s) => Mask::Select(Some(Box::new(s)), Selection::all()),
        Err(done) => Mask::Select(None, done),
    }
}

impl Gta {
    /// DELLA's per-row ranking is not streamed: draw each model's mask on its whole task
    /// vector, then run the same passes as the other methods over the tensor as one chunk.
    fn merge_della(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let base = job.base_tensor();
        let rescale = Gta::rescale(job);
        let row = if job.shape.len() >= 2 {
            *job.shape.last().expect("2-D")
        } else {
            base.len()
        };
        let mut state = self.begin(&MergeJob {
            inputs: Vec::new(),
            ..job.clone()
        })?;
        let st = state_mut::<GtaState>(&mut state);
        let mut models = std::mem::take(&mut st.models);
        for m in &mut models {
            if let Mask::Given(f) = &mut m.mask {
                let p = &job.per_input[m.input];
                let delta: Vec<f32> = job.inputs[m.input]
                    .iter()
                    .zip(base)
                    .map(|(&x, &b)| x - b)
                    .collect();
                let inverse = rescale == Rescale::InverseKeepProbability;
                *f = della_mask(
                    &delta,
                    p.f("density"),
                    p.f("epsilon"),
                    row,
                    Key::new(job.seed, job.name, m.input),
                    inverse,
                )
                .map_err(|e| job.error(e))?;
                // The factor carries 1/q; no uniform 1/density on top.
                m.inverse_density = None;
            }
        }
        *st = GtaState::new(models, rescale, Majority::Positive);
        merge_whole_from(self, job, state, out)
    }
}

impl Method for Gta {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        if self.sparsifier == Sparsifier::DellaMagprune {
            return self.merge_della(job, out);
        }
        merge_whole(self, job, out)
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        (self.sparsifier != Sparsifier::DellaMagprune).then_some(self as &dyn Streaming)
    }

    fn whole_model(&self) -> Option<&dyn WholeModel> {
        (self.sparsifier == Sparsifier::Magnitude).then_some(self as &dyn WholeModel)
    }
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
