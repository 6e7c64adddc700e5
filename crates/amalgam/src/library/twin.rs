//! `twin`: Twin-Merging's shared and exclusive knowledge (Lu et al. 2024; ALGORITHMS.md §4.3).
//!
//! Shared: a merged model `θ*` from the config's `merge:` block (any amalgam merge method and
//! its parameters; Twin-Merging uses task arithmetic), stored as `θ* − θ0` (part `merged`, in
//! `shared_dtype`). Per task, for each matrix: the rank-`⌊rank_fraction · min(m, n)⌋` truncated
//! SVD of the exclusive vector `θ_t − θ*` (parts `u`, `v` as in `tsv_c`); other tensors are
//! stored as they are (`raw`). A task whose tensor equals the base stores nothing for it and
//! rebuilds the base exactly. Rebuild: `θ0 + (θ* − θ0) + u·v`. The SVDs are exact unless
//! `randomized_svd: true` (seeded range finder; much faster on large matrices such as the
//! embeddings).

use super::scheme::{self, Decoder, Encoded, Parts, Scheme, TensorInputs};
use super::tsv_c::{Factoring, LowRank, factor_dtype, factor_dtype_param, store_factors};
use crate::config::{Kind, Value};
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::{MergeJob, Method, MethodSpec, ParamSpec, Scope};

/// The Twin-Merging scheme.
pub struct Twin {
    spec: MethodSpec,
}

impl Default for Twin {
    fn default() -> Self {
        Twin {
            spec: scheme::spec(
                "twin",
                "Twin-Merging (merged model + low-rank exclusive vectors)",
                "https://arxiv.org/abs/2406.15479",
                vec![
                    ParamSpec::new(
                        "rank_fraction",
                        Kind::Float,
                        Scope::Shared,
                        Value::Float(0.1),
                    ),
                    factor_dtype_param(),
                    scheme::shared_dtype_param(),
                    ParamSpec::new(
                        "randomized_svd",
                        Kind::Bool,
                        Scope::Shared,
                        Value::Bool(false),
                    ),
                ],
            ),
        }
    }
}

impl Method for Twin {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }
}

impl Scheme for Twin {
    fn merge_block(&self) -> scheme::MergeBlock {
        scheme::MergeBlock::Required
    }

    fn check(&self, job: &MergeJob) -> std::result::Result<(), String> {
        scheme::in_range(job, job.shared, "rank_fraction", 0.0, 1.0).map(|_| ())
    }

    fn shared_parts(&self, job: &MergeJob, _out: DType) -> Vec<scheme::PartSpec> {
        scheme::shared_vector(job, "merged")
    }

    fn encode(
        &self,
        job: &MergeJob,
        inputs: &mut dyn TensorInputs,
        out: &mut dyn Encoded,
    ) -> Result<()> {
        let tasks = job.non_base();
        let (mut base, mut merged) = (Vec::new(), Vec::new());
        inputs.whole(job.base.expect("contract: a base"), &mut base)?;
        inputs.merged(&mut merged)?;
        // The shared delta as stored, so each residual is taken against what rebuild adds.
        let delta: Vec<f32> = merged.iter().zip(&base).map(|(m, b)| m - b).collect();
        let (delta, _) = scheme::stored_as(&delta, scheme::shared_dtype(job));
        out.shared(0, 0, &delta)?;
        let star: Vec<f32> = base.iter().zip(&delta).map(|(b, d)| b + d).collect();
        let matrix = scheme::matrix(job.shape);
        let mut x = Vec::new();
        for (t, &i) in tasks.iter().enumerate() {
            inputs.whole(i, &mut x)?;
            let tau: Vec<f32> = x.iter().zip(&base).map(|(x, b)| x - b).collect();
            if tau.iter().all(|&v| v == 0.0) {
                continue;
            }
            let Some((m, n)) = matrix else {
                scheme::store_raw(job, inputs, i, t, out)?;
                continue;
            };
            let residual: Vec<f32> = x.iter().zip(&star).map(|(x, s)| x - s).collect();
            let k = (job.shared.f("rank_fraction") * m.min(n) as f64).floor() as usize;
            let how = Factoring {
                k,
                energy: None,
                randomized: job.shared.b("randomized_svd"),
                dtype: factor_dtype(job),
            };
            let low = store_factors(job, &residual, (m, n), &how, t, out)?;
            let rebuilt: Vec<f32> = delta.iter().zip(&low).map(|(d, l)| d + l).collect();
            out.stats(t).observe(&rebuilt, &tau);
        }
        Ok(())
    }

    fn decoder<'a>(&self, shape: &[usize], parts: &'a dyn Parts) -> Result<Box<dyn Decoder + 'a>> {
        if let Some(raw) = scheme::raw_decoder(parts, shape)? {
            return Ok(raw);
        }
        match LowRank::of(parts, shape)? {
            Some(low) => Ok(Box::new(TwinDecoder {
                low,
                parts,
                buf: Vec::new(),
            })),
            None => Ok(Box::new(scheme::Unchanged)),
        }
    }
}

struct TwinDecoder<'a> {
    low: LowRank,
    parts: &'a dyn Parts,
    buf: Vec<f32>,
}

impl Decoder for TwinDecoder<'_> {
    fn decode(
        &mut self,
        range: std::ops::Range<usize>,
        base: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        self.parts.shared("merged", range.clone(), &mut self.buf)?;
        for ((o, &b), &d) in out.iter_mut().zip(base).zip(&self.buf) {
            *o = b + d;
        }
        self.low.add(range, out);
        Ok(())
    }
}
