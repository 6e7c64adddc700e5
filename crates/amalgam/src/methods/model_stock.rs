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

/// Per-vector sums: `‖oᵢ‖²` and `⟨oᵢ, oⱼ⟩` of the task vectors `oᵢ = θᵢ − θ₀`, in f64, each in 8
/// lanes by absolute element index (lane = index mod 8, added in index order, combined in lane
/// order at the end): the loop vectorises and the result does not depend on the chunking.
#[derive(Clone, Debug)]
struct Sums {
    norms: Vec<[f64; 8]>,
    dots: Vec<[f64; 8]>,
}

impl Sums {
    fn new(models: usize) -> Sums {
        Sums {
            norms: vec![[0.0; 8]; models],
            dots: vec![[0.0; 8]; models * models.saturating_sub(1) / 2],
        }
    }

    /// Add elements `offset..` (the `base` and `models` slices).
    fn add(&mut self, offset: usize, base: &[f32], models: &[&[f32]]) {
        accumulate(self, offset, base, models);
    }

    fn total(lanes: &[f64; 8]) -> f64 {
        lanes.iter().sum()
    }

    /// The interpolation factor `t` from the mean pairwise cosine.
    fn factor(&self) -> f64 {
        let k = self.norms.len();
        let mut cos = Vec::with_capacity(self.dots.len());
        let mut p = 0;
        for i in 0..k {
            for j in i + 1..k {
                let (ni, nj) = (Sums::total(&self.norms[i]), Sums::total(&self.norms[j]));
                let denom = (ni.sqrt() * nj.sqrt()).max(1e-6);
                cos.push((Sums::total(&self.dots[p]) / denom).clamp(-1.0, 1.0));
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

crate::simd::vectorized! {
    /// [`Sums::add`].
    fn accumulate(sums: &mut Sums, offset: usize, base: &[f32], models: &[&[f32]]) {
        let n = base.len();
        let k = models.len();
        let (norms, dots) = (&mut sums.norms, &mut sums.dots);
        // Elements at `at` (absolute index `offset + at`) one at a time.
        let mut single = |at: usize| {
            let lane = (offset + at) % 8;
            let b = base[at] as f64;
            let mut p = 0;
            for i in 0..k {
                let oi = models[i][at] as f64 - b;
                norms[i][lane] += oi * oi;
                for m in &models[i + 1..] {
                    dots[p][lane] += oi * (m[at] as f64 - b);
                    p += 1;
                }
            }
        };
        let head = ((8 - offset % 8) % 8).min(n);
        (0..head).for_each(&mut single);
        let full = head + (n - head) / 8 * 8;
        (full..n).for_each(&mut single);
        // Whole blocks of 8 at indices that are multiples of 8 (lane = position in the block),
        // one pass per sum with its lanes in registers.
        fn blocks(x: &[f32], from: usize, to: usize) -> impl Iterator<Item = &[f32; 8]> {
            x[from..to].chunks_exact(8).map(|c| c.try_into().expect("8"))
        }
        let blocks = |x| blocks(x, head, full);
        let mut p = 0;
        for i in 0..k {
            let mut acc = norms[i];
            for (x, b) in blocks(models[i]).zip(blocks(base)) {
                for j in 0..8 {
                    let o = x[j] as f64 - b[j] as f64;
                    acc[j] += o * o;
                }
            }
            norms[i] = acc;
            for l in i + 1..k {
                let mut acc = dots[p];
                for ((x, y), b) in blocks(models[i]).zip(blocks(models[l])).zip(blocks(base)) {
                    for j in 0..8 {
                        let b = b[j] as f64;
                        acc[j] += (x[j] as f64 - b) * (y[j] as f64 - b);
                    }
                }
                dots[p] = acc;
                p += 1;
            }
        }
    }
}

crate::simd::vectorized! {
    /// `out = t·mean(models) + (1 − t)·base`, the mean summed in model order (from −0.0, as
    /// `Iterator::sum` does).
    fn interpolate(t: f32, base: &[f32], models: &[&[f32]], out: &mut [f32]) {
        out.fill(-0.0);
        for m in models {
            out.iter_mut().zip(*m).for_each(|(o, &x)| *o += x);
        }
        let n = models.len() as f32;
        for (o, &b) in out.iter_mut().zip(base) {
            *o = t * (*o / n) + (1.0 - t) * b;
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
            st.sums[0].add(offset, base, &models);
            return Ok(());
        }
        for (r, start) in (0..base.len()).step_by(st.row).enumerate() {
            let end = (start + st.row).min(base.len());
            let rows: Vec<&[f32]> = models.iter().map(|m| &m[start..end]).collect();
            st.sums[offset / st.row + r].add(offset + start, &base[start..end], &rows);
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
        if let [t] = st.factors[..] {
            interpolate(t, base, &models, out);
            return Ok(());
        }
        // Chunks hold whole rows (the granule).
        for (r, start) in (0..out.len()).step_by(st.row).enumerate() {
            let end = (start + st.row).min(out.len());
            let rows: Vec<&[f32]> = models.iter().map(|m| &m[start..end]).collect();
            let t = st.factors[offset / st.row + r];
            interpolate(t, &base[start..end], &rows, &mut out[start..end]);
        }
        Ok(())
    }
}
