//! `model_stock`: interpolate between the base and the average of the fine-tunes with
//! `t = N·cos φ / (1 + (N−1)·cos φ)`, `cos φ` the mean pairwise cosine of the task vectors,
//! per tensor or per row (`filter_wise`).

use super::*;
use crate::config::Kind;

/// Model Stock.
pub struct ModelStock(MethodSpec);

impl Default for ModelStock {
    /// The method with mergekit's parameters and defaults.
    fn default() -> Self {
        ModelStock(MethodSpec {
            name: "model_stock",
            pretty_name: "Model Stock",
            reference: "https://arxiv.org/abs/2403.19522",
            params: vec![ParamSpec::new(
                "filter_wise",
                Kind::Bool,
                Scope::Shared,
                Value::Bool(false),
            )],
            contract: Contract {
                min_inputs: 3,
                ..Contract::WITH_BASE
            },
        })
    }
}

/// Per-vector sums: `‖oᵢ‖²` and `⟨oᵢ, oⱼ⟩` of the task vectors `oᵢ = θᵢ − θ₀`, in f64.
#[derive(Clone, Debug)]
struct Sums {
    norms: Vec<f64>,
    dots: Vec<f64>,
}

impl Sums {
    fn new(models: usize) -> Sums {
        Sums {
            norms: vec![0.0; models],
            dots: vec![0.0; models * models.saturating_sub(1) / 2],
        }
    }

    fn add(&mut self, base: &[f32], models: &[&[f32]]) {
        for (j, &b) in base.iter().enumerate() {
            let b = b as f64;
            let mut p = 0;
            for i in 0..models.len() {
                let oi = models[i][j] as f64 - b;
                self.norms[i] += oi * oi;
                for m in &models[i + 1..] {
                    self.dots[p] += oi * (m[j] as f64 - b);
                    p += 1;
                }
            }
        }
    }

    /// The interpolation factor `t` from the mean pairwise cosine.
    fn factor(&self) -> f64 {
        let k = self.norms.len();
        let mut cos = Vec::with_capacity(self.dots.len());
        let mut p = 0;
        for i in 0..k {
            for j in i + 1..k {
                let denom = (self.norms[i].sqrt() * self.norms[j].sqrt()).max(1e-6);
                cos.push((self.dots[p] / denom).clamp(-1.0, 1.0));
                p += 1;
            }
        }
        let c = cos.iter().sum::<f64>() / cos.len() as f64;
        let n = k as f64;
        let denom = 1.0 + (n - 1.0) * c;
        if denom.abs() < 1e-6 {
            0.0
        } else {
            n * c / denom
        }
    }
}

/// Row-wise (`filter_wise`) or whole-tensor sums, then the factor of each.
struct StockState {
    row: usize,
    sums: Vec<Sums>,
    factors: Vec<f32>,
}

fn row_len(job: &MergeJob) -> usize {
    if job.shared.b("filter_wise") && job.shape.len() >= 2 {
        *job.shape.last().expect("2-D")
    } else {
        job.numel().max(1)
    }
}

impl Method for ModelStock {
    fn spec(&self) -> &MethodSpec {
        &self.0
    }

    fn streaming(&self, _job: &MergeJob) -> Option<&dyn Streaming> {
        Some(self)
    }
}

impl Streaming for ModelStock {
    fn begin(&self, job: &MergeJob) -> Result<State> {
        let row = row_len(job);
        let rows = job.numel().div_ceil(row).max(1);
        let models = job.non_base().len();
        Ok(Box::new(StockState {
            row,
            sums: vec![Sums::new(models); rows],
            factors: Vec::new(),
        }))
    }

    fn passes(&self, _state: &State) -> usize {
        1
    }

    fn granule(&self, job: &MergeJob) -> usize {
        if job.shared.b("filter_wise") {
            row_len(job)
        } else {
            1
        }
    }

    fn observe(
        &self,
        _pass: usize,
        job: &MergeJob,
        offset: usize,
        state: &mut State,
    ) -> Result<()> {
        let st = state_mut::<StockState>(state);
        let base = job.base_tensor();
        let models: Vec<&[f32]> = job.non_base().into_iter().map(|i| job.inputs[i]).collect();
        if st.sums.len() == 1 {
            st.sums[0].add(base, &models);
            return Ok(());
        }
        for (r, start) in (0..base.len()).step_by(st.row).enumerate() {
            let end = (start + st.row).min(base.len());
            let rows: Vec<&[f32]> = models.iter().map(|m| &m[start..end]).collect();
            st.sums[offset / st.row + r].add(&base[start..end], &rows);
        }
        Ok(())
    }

    fn end_pass(&self, _pass: usize, _job: &MergeJob, state: &mut State) -> Result<()> {
        let st = state_mut::<StockState>(state);
        st.factors = st.sums.iter().map(|s| s.factor() as f32).collect();
        Ok(())
    }

    fn apply(
        &self,
        job: &MergeJob,
        offset: usize,
        state: &mut State,
        out: &mut [f32],
    ) -> Result<()> {
        let st = state_mut::<StockState>(state);
        let base = job.base_tensor();
        let models: Vec<&[f32]> = job.non_base().into_iter().map(|i| job.inputs[i]).collect();
        let n = models.len() as f32;
        let factors = &st.factors;
        for (j, o) in out.iter_mut().enumerate() {
            let t = factors[if factors.len() == 1 {
                0
            } else {
                (offset + j) / st.row
            }];
            let avg = models.iter().map(|m| m[j]).sum::<f32>() / n;
            *o = t * avg + (1.0 - t) * base[j];
        }
        Ok(())
    }
}
