//! `consensus`: Consensus Merging from TALL masks (Wang et al. 2024, ALGORITHMS.md §2.13).
//!
//! A multi-task vector `τ_MTL` is merged first, by task arithmetic (the plain sum) or by TIES
//! (`base_merge: ties`; the paper's form by default: whole-model trimming, majority sign for
//! zero sums, disjoint sum). Each task's TALL mask marks the weights it relies on,
//! `m_t = |θ₀ − θ_t| > λ_t·|θ₀ + τ_MTL − θ_t|` (strict, computed in that order as the authors
//! do). Weights used by fewer than `k` tasks are dropped: `θ = θ₀ + α·τ_MTL·[Σ_t m_t ≥ k]`.
//! `k = 0` is plain TA/TIES, `k = 1` drops the "catastrophic" weights no task uses, `k = 2`
//! (the default) also drops the "selfish" ones only one task uses.
//!
//! `λ_t` is chosen per task on validation data in the paper (from 0.2–0.6); here it is the
//! per-model parameter `tall_mask_lambda` (default 0.6, FusionBench's). `α` is `lambda`.

use super::gta::Gta;
use super::gta_state::GtaState;
use super::*;
use crate::config::Kind;

/// Consensus merging over TA or TIES.
pub struct Consensus {
    spec: MethodSpec,
    task_arithmetic: Gta,
    ties: Gta,
}

impl Default for Consensus {
    fn default() -> Self {
        let mut inner = gta::all().into_iter();
        let task_arithmetic = inner.next().expect("task_arithmetic first");
        let ties = inner.next().expect("ties second");
        let choice = |name, names, value| {
            ParamSpec::new(
                name,
                Kind::Choice(names),
                Scope::Shared,
                Value::Choice(value),
            )
        };
        let params = vec![
            choice(
                "base_merge",
                &["task_arithmetic", "ties"],
                "task_arithmetic",
            ),
            ParamSpec::new("k", Kind::Int, Scope::Shared, Value::Int(2)),
            ParamSpec::new(
                "tall_mask_lambda",
                Kind::Float,
                Scope::NonBase,
                Value::Float(0.6),
            ),
            ParamSpec::new("lambda", Kind::Float, Scope::Shared, Value::Float(1.0)),
            ParamSpec::new("weight", Kind::Float, Scope::NonBase, Value::Float(1.0)),
            // The TIES multi-task vector, as in the paper's code.
            ParamSpec::new("density", Kind::Float, Scope::NonBase, Value::Float(0.2)),
            choice("trim_scope", &["tensor", "global"], "global"),
            choice("sign_tie", &["positive", "majority"], "majority"),
            ParamSpec::new("normalize", Kind::Bool, Scope::Shared, Value::Bool(false)),
            choice("mean_divisor", &["weight", "count"], "count"),
            ParamSpec::new("rescale", Kind::Bool, Scope::Shared, Value::Bool(false)),
        ];
        Consensus {
            spec: MethodSpec {
                name: "consensus",
                pretty_name: "Consensus Merging (TALL masks)",
                reference: "https://arxiv.org/abs/2405.07813",
                params,
                contract: Contract::WITH_BASE,
            },
            task_arithmetic,
            ties,
        }
    }
}

impl Consensus {
    fn inner(&self, job: &MergeJob) -> &Gta {
        if job.shared.choice("base_merge") == "ties" {
            &self.ties
        } else {
            &self.task_arithmetic
        }
    }
}

impl Method for Consensus {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }

    fn whole_model(&self) -> Option<&dyn WholeModel> {
        Some(self)
    }
}

impl Streaming for Consensus {
    fn begin(&self, job: &MergeJob) -> Result<State> {
        let k = job.shared.i("k");
        if k < 0 {
            return Err(job.error(format!("k must be 0 or more, got {k}")));
        }
        let mut state = self.inner(job).begin(job)?;
        state_mut::<GtaState>(&mut state).raw = true;
        Ok(state)
    }

    fn passes(&self, state: &State) -> usize {
        // The pass list lives in the GtaState itself, whichever inner method made it.
        self.ties.passes(state)
    }

    fn observe(&self, pass: usize, job: &MergeJob, offset: usize, state: &mut State) -> Result<()> {
        self.inner(job).observe(pass, job, offset, state)
    }

    fn end_pass(&self, pass: usize, job: &MergeJob, state: &mut State) -> Result<()> {
        self.inner(job).end_pass(pass, job, state)
    }

    fn apply(
        &self,
        job: &MergeJob,
        offset: usize,
        state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        // out ← τ_MTL, then masked and added to the base.
        self.inner(job).apply(job, offset, state, out)?;
        let base = job.base_tensor();
        let k = job.shared.i("k") as u32;
        let alpha = job.shared.f("lambda") as f32;
        let tasks: Vec<(&[f32], f32)> = job
            .non_base()
            .iter()
            .map(|&i| (job.inputs[i], job.per_input[i].f("tall_mask_lambda") as f32))
            .collect();
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let merged = *o;
            let multi = b + merged;
            let used = tasks
                .iter()
                .filter(|(x, l)| (b - x[j]).abs() > (multi - x[j]).abs() * l)
                .count() as u32;
            *o = if used >= k { b + alpha * merged } else { b };
        }
        Ok(())
    }
}

impl WholeModel for Consensus {
    fn begin_model(&self, jobs: &[MergeJob]) -> Result<Option<Global>> {
        let on_ties = |j: &MergeJob| j.shared.choice("base_merge") == "ties";
        match (
            jobs.iter().find(|j| on_ties(j)),
            jobs.iter().find(|j| !on_ties(j)),
        ) {
            (None, _) => Ok(None),
            (Some(_), None) => self.ties.begin_model(jobs),
            (Some(a), Some(b)) => Err(b.error(format!(
                "base_merge must be the same for every tensor ({} uses ties, this one does not)",
                a.name
            ))),
        }
    }

    fn model_passes(&self, global: &Global) -> usize {
        self.ties.model_passes(global)
    }

    fn begin_pass(&self, pass: usize, global: &Global) -> State {
        self.ties.begin_pass(pass, global)
    }

    fn begin_tensor(
        &self,
        pass: usize,
        global: &Global,
        index: usize,
        job: &MergeJob,
    ) -> Option<State> {
        self.ties.begin_tensor(pass, global, index, job)
    }

    fn observe_tensor(
        &self,
        pass: usize,
        global: &Global,
        job: &MergeJob,
        offset: usize,
        acc: &mut State,
    ) -> Result<()> {
        self.ties.observe_tensor(pass, global, job, offset, acc)
    }

    fn absorb(&self, pass: usize, global: &Global, model: &mut State, index: usize, tensor: State) {
        self.ties.absorb(pass, global, model, index, tensor)
    }

    fn end_model_pass(&self, pass: usize, global: &mut Global, model: State) -> Result<()> {
        self.ties.end_model_pass(pass, global, model)
    }
}
