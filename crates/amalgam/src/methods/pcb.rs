//! `pcb`: Parameter Competition Balancing (Du et al. 2024, ALGORITHMS.md §2.10).
//!
//! Each task vector `τ_t` is one row over the whole model (all merged tensors flattened, as the
//! authors' code does). With `T` tasks, per task and element:
//!
//! 1. clamp `|τ_t|` to its own order statistics at ranks `⌊P·c⌋` and `⌊P(1−c) − 1⌋`
//!    (`clamp_ratio` c); `τ̃_t = sgn(τ_t)·clamped`; `N_t` = the clamped magnitude min-max
//!    normalised over the row;
//! 2. intra-balancing `exp(T·N_t²)`; inter-balancing `tanh(τ_t · S)` with
//!    `S = Σ_j sgn(τ_j)·N_j` (`variant: vision`, the authors' ViT code) or `S = Σ_j τ_j`
//!    (`variant: nlp`, their T5 code); `β_t` = their product;
//! 3. drop: `β_t` clamped from below at its order statistic of rank `⌊P(1−r)⌋` (`pcb_ratio` r)
//!    and min-max normalised, so only the top `r` fraction keeps a positive score `s_t`;
//! 4. `θ = θ₀ + Σ_t w_t τ̃_t s_t / max(Σ_t s_t, 1e-12)` (`weight` w_t, the authors' λ_t).
//!
//! The order statistics are exact: four streamed whole-model passes of 65,536-bin histograms
//! (high then low 16 bits of an order-preserving key) find the magnitude quantiles, then the
//! β threshold and maximum; the output pass recomputes β per element. Memory stays a few
//! histograms per task and one chunk per worker, where the reference holds four `T × P`
//! matrices. Where a row is constant (max = min) the reference divides 0 by 0; amalgam uses 0.

use super::select::{ModelRanks, RankCounts};
use super::*;
use crate::config::Kind;

/// PCB-Merging.
pub struct Pcb {
    spec: MethodSpec,
}

impl Default for Pcb {
    fn default() -> Self {
        Pcb {
            spec: MethodSpec {
                name: "pcb",
                pretty_name: "Parameter Competition Balancing",
                reference: "https://arxiv.org/abs/2410.02396",
                params: vec![
                    ParamSpec::new(
                        "variant",
                        Kind::Choice(&["vision", "nlp"]),
                        Scope::Shared,
                        Value::Choice("vision"),
                    ),
                    // Defaults by variant: vision 0.01 and 0.05, nlp 0.0001 and 0.1.
                    ParamSpec::new(
                        "clamp_ratio",
                        Kind::OptionalFloat,
                        Scope::Shared,
                        Value::None,
                    ),
                    ParamSpec::new("pcb_ratio", Kind::OptionalFloat, Scope::Shared, Value::None),
                    ParamSpec::new("weight", Kind::Float, Scope::NonBase, Value::Float(1.2)),
                ],
                contract: Contract::WITH_BASE,
            },
        }
    }
}

impl Method for Pcb {
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

/// An order-preserving key of any f32 (negative values below positive ones).
#[inline]
fn skey(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

#[inline]
fn from_skey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

/// Min-max normalisation with a constant row giving 0 (the reference: 0/0).
#[inline]
fn unit(x: f32, lo: f32, hi: f32) -> f32 {
    if hi > lo { (x - lo) / (hi - lo) } else { 0.0 }
}

/// What the whole-model passes found.
struct GlobalPcb {
    nlp: bool,
    /// Per task: |τ| ranks (clamp low, clamp high), found in passes 0 and 1.
    abs: Vec<ModelRanks>,
    /// Per task: the β rank (drop threshold), found in passes 2 and 3.
    beta: Vec<ModelRanks>,
    /// Per task: the largest β.
    beta_max: Vec<f32>,
}

impl GlobalPcb {
    fn tasks(&self) -> usize {
        self.abs.len()
    }

    /// `(lo, hi)` clamp bounds of task `t`'s magnitudes.
    fn clamp(&self, t: usize) -> (f32, f32) {
        let r = &self.abs[t];
        (f32::from_bits(r.key(0)), f32::from_bits(r.key(1)))
    }

    /// The ranks passes `pass` and `pass + 1` (or `pass − 1` and `pass`) look for.
    fn ranks(&self, pass: usize) -> &[ModelRanks] {
        if pass < 2 { &self.abs } else { &self.beta }
    }

    /// β of every task at one element (`taus`: the task vectors there) into `beta`, and the
    /// clamped, signed task values into `clamped`.
    fn balance(&self, taus: &[f32], beta: &mut [f32], clamped: &mut [f32]) {
        let t_count = taus.len() as f32;
        let mut s = 0.0f32;
        for (t, &x) in taus.iter().enumerate() {
            let (lo, hi) = self.clamp(t);
            // torch.clamp(x, min, max) = min(max(x, min), max), even if min > max.
            let a = x.abs().max(lo).min(hi);
            let n = unit(a, lo, hi);
            let sign = if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            };
            clamped[t] = sign * a;
            // β holds N for now; the intra term is finished below.
            beta[t] = n;
            s += if self.nlp { x } else { sign * n };
        }
        for (t, &x) in taus.iter().enumerate() {
            let n = beta[t];
            beta[t] = (t_count * (n * n)).exp() * (x * s).tanh();
        }
    }
}

/// Per-task counts of one pass; for the first β pass also each task's largest β.
struct Acc {
    counts: Vec<RankCounts>,
    max: Vec<f32>,
}

impl Acc {
    fn new(g: &GlobalPcb, pass: usize) -> Acc {
        Acc {
            counts: g.ranks(pass).iter().map(ModelRanks::counts).collect(),
            max: vec![f32::NEG_INFINITY; g.tasks()],
        }
    }
}

fn ratio(job: &MergeJob, name: &str, vision: f64, nlp: f64) -> f64 {
    job.shared
        .opt_f(name)
        .unwrap_or(if job.shared.choice("variant") == "nlp" {
            nlp
        } else {
            vision
        })
}

impl WholeModel for Pcb {
    fn begin_model(&self, jobs: &[MergeJob]) -> Result<Option<Global>> {
        let Some(first) = jobs.first() else {
            return Ok(None);
        };
        let tasks = first.non_base().len();
        let total: u64 = jobs.iter().map(|j| j.numel() as u64).sum();
        for job in jobs {
            if job.non_base().len() != tasks {
                return Err(job.error(format!(
                    "pcb ranks each model over the whole model: every tensor needs the same {tasks} models"
                )));
            }
        }
        let c = ratio(first, "clamp_ratio", 0.01, 0.0001);
        let r = ratio(first, "pcb_ratio", 0.05, 0.1);
        if !(0.0..0.5).contains(&c) || !(0.0..=1.0).contains(&r) || r == 0.0 {
            return Err(first.error(format!(
                "pcb needs 0 ≤ clamp_ratio < 0.5 and 0 < pcb_ratio ≤ 1, got {c} and {r}"
            )));
        }
        if total == 0 || tasks == 0 {
            return Ok(None);
        }
        // The authors' indices, in f64 as Python computes them.
        let p = total as f64;
        let last = total - 1;
        let lo = ((p * c) as u64).min(last);
        let hi = ((p * (1.0 - c) - 1.0).max(0.0) as u64).min(last);
        let drop = ((p * (1.0 - r)) as u64).min(last);
        Ok(Some(Box::new(GlobalPcb {
            nlp: first.shared.choice("variant") == "nlp",
            abs: vec![ModelRanks::new(vec![lo, hi]); tasks],
            beta: vec![ModelRanks::new(vec![drop]); tasks],
            beta_max: vec![f32::NEG_INFINITY; tasks],
        })))
    }

    fn model_passes(&self, _global: &Global) -> usize {
        4
    }

    fn begin_pass(&self, pass: usize, global: &Global) -> State {
        let g = global.downcast_ref::<GlobalPcb>().expect("ours");
        Box::new(Acc::new(g, pass))
    }

    fn begin_tensor(
        &self,
        pass: usize,
        global: &Global,
        _index: usize,
        _job: &MergeJob,
    ) -> Option<State> {
        let g = global.downcast_ref::<GlobalPcb>().expect("ours");
        Some(Box::new(Acc::new(g, pass)))
    }

    fn observe_tensor(
        &self,
        pass: usize,
        global: &Global,
        job: &MergeJob,
        _offset: usize,
        acc: &mut State,
    ) -> Result<()> {
        let g = global.downcast_ref::<GlobalPcb>().expect("ours");
        let acc = state_mut::<Acc>(acc);
        let base = job.base_tensor();
        let nb = job.non_base();
        let tasks = nb.len();
        let mut taus = vec![0.0f32; tasks];
        let (mut beta, mut clamped) = (vec![0.0f32; tasks], vec![0.0f32; tasks]);
        for (j, &b) in base.iter().enumerate() {
            for (t, &i) in nb.iter().enumerate() {
                taus[t] = job.inputs[i][j] - b;
            }
            let values: &[f32] = if pass < 2 {
                &taus
            } else {
                g.balance(&taus, &mut beta, &mut clamped);
                &beta
            };
            for (t, (ranks, counts)) in g.ranks(pass).iter().zip(&mut acc.counts).enumerate() {
                let x = values[t];
                ranks.count(counts, if pass < 2 { x.abs().to_bits() } else { skey(x) });
                if pass == 2 && x > acc.max[t] {
                    acc.max[t] = x;
                }
            }
        }
        Ok(())
    }

    fn absorb(
        &self,
        _pass: usize,
        _global: &Global,
        model: &mut State,
        _index: usize,
        tensor: State,
    ) {
        let model = state_mut::<Acc>(model);
        let tensor = tensor.downcast::<Acc>().expect("ours");
        for (m, t) in model.counts.iter_mut().zip(&tensor.counts) {
            m.add(t);
        }
        for (m, &t) in model.max.iter_mut().zip(&tensor.max) {
            *m = m.max(t);
        }
    }

    fn end_model_pass(&self, pass: usize, global: &mut Global, model: State) -> Result<()> {
        let g = global.downcast_mut::<GlobalPcb>().expect("ours");
        let acc = model.downcast::<Acc>().expect("ours");
        let ranks = if pass < 2 { &mut g.abs } else { &mut g.beta };
        for (r, counts) in ranks.iter_mut().zip(&acc.counts) {
            r.end_pass(counts);
        }
        if pass == 2 {
            g.beta_max = acc.max;
        }
        Ok(())
    }
}

impl Streaming for Pcb {
    fn apply(
        &self,
        job: &MergeJob,
        _offset: usize,
        _state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let base = job.base_tensor();
        let nb = job.non_base();
        let Some(g) = job.global.and_then(|g| g.downcast_ref::<GlobalPcb>()) else {
            // No task vectors, or an empty model: nothing to merge.
            out.copy_from_slice(base);
            return Ok(());
        };
        let tasks = nb.len();
        let weights: Vec<f32> = nb
            .iter()
            .map(|&i| job.per_input[i].f("weight") as f32)
            .collect();
        let floor: Vec<f32> = g.beta.iter().map(|r| from_skey(r.key(0))).collect();
        let mut taus = vec![0.0f32; tasks];
        let (mut beta, mut clamped) = (vec![0.0f32; tasks], vec![0.0f32; tasks]);
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            for (t, &i) in nb.iter().enumerate() {
                taus[t] = job.inputs[i][j] - b;
            }
            g.balance(&taus, &mut beta, &mut clamped);
            let (mut num, mut den) = (0.0f32, 0.0f32);
            for t in 0..tasks {
                let (lo, hi) = (floor[t], g.beta_max[t]);
                let s = unit(beta[t].max(lo).min(hi), lo, hi);
                num += clamped[t] * weights[t] * s;
                den += s;
            }
            *o = b + num / den.max(1e-12);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_key_orders_like_the_values() {
        let xs = [-3.5f32, -1.0, -0.0, 0.0, 1e-30, 2.0, f32::MAX, f32::MIN];
        for &a in &xs {
            assert_eq!(from_skey(skey(a)).to_bits(), a.to_bits());
            for &b in &xs {
                if a < b {
                    assert!(skey(a) < skey(b), "{a} < {b}");
                }
            }
        }
    }
}
