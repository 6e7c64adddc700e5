//! Generalized task arithmetic: task arithmetic × a sparsification × a sign consensus.
//! `task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`,
//! `della` and `della_linear` are this one computation with different parts and defaults:
//!
//! 1. `δᵢ = sparsify(θᵢ − θ₀, densityᵢ)`, then `δᵢ ← wᵢ·δᵢ`;
//! 2. with consensus, elect a sign per element (`Σᵢ δᵢ ≥ 0 ⇒ +`) and keep only agreeing
//!    entries; the divisor is the sum of agreeing weights (0 → 1); without, `Σ wᵢ` (|·|<1e-8 → 1);
//! 3. `normalize` divides by the divisor, `lambda` scales, and `θ = θ₀ + λ·Σ δᵢ`.

use super::rng::Stream;
use super::sparsify::{Rescale, Sparsify, sparsify};
use super::*;
use crate::config::Kind;

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
                optional_policy: OptionalPolicy::Error,
            },
            sparsifier,
            consensus,
        }
    }

    fn sparsify_delta(&self, job: &MergeJob, input: usize, delta: &mut [f32]) -> Result<()> {
        let p = &job.per_input[input];
        let method = match self.sparsifier {
            Sparsifier::None => return Ok(()),
            Sparsifier::Magnitude => Sparsify::Magnitude,
            Sparsifier::Random => Sparsify::Random,
            Sparsifier::MagnitudeOutliers => Sparsify::MagnitudeOutliers {
                gamma: p.f("gamma"),
            },
            Sparsifier::DellaMagprune => Sparsify::DellaMagprune {
                epsilon: p.f("epsilon"),
            },
        };
        let rescale = match (
            job.shared.b("rescale"),
            job.shared.b("rescale_inverse_density"),
        ) {
            (false, _) => Rescale::None,
            (true, false) => Rescale::MatchL1,
            (true, true) => Rescale::InverseKeepProbability,
        };
        let row = if job.shape.len() >= 2 {
            *job.shape.last().expect("2-D")
        } else {
            delta.len()
        };
        let mut stream = Stream::new(job.seed, job.name, input);
        sparsify(delta, method, p.f("density"), rescale, row, &mut stream).map_err(|e| job.error(e))
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

impl Method for Gta {
    fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    fn merge(&self, job: &MergeJob, out: &mut [f32]) -> Result<()> {
        let base = job.base_tensor();
        let nb = job.non_base();
        if nb.is_empty() {
            out.copy_from_slice(base);
            return Ok(());
        }
        let weights: Vec<f32> = nb
            .iter()
            .map(|&i| job.per_input[i].f("weight") as f32)
            .collect();
        let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(nb.len());
        for (&i, &w) in nb.iter().zip(&weights) {
            let mut d: Vec<f32> = job.inputs[i]
                .iter()
                .zip(base)
                .map(|(&x, &b)| x - b)
                .collect();
            self.sparsify_delta(job, i, &mut d)?;
            d.iter_mut().for_each(|v| *v *= w);
            deltas.push(d);
        }
        let normalize = job.shared.b("normalize");
        let lambda = job.shared.f("lambda") as f32;
        let weight_sum: f32 = weights.iter().sum();
        for (j, o) in out.iter_mut().enumerate() {
            let (mut mixed, mut divisor) = (0f32, 0f32);
            if self.consensus {
                let sign = elect_sign_sum(deltas.iter().map(|d| d[j]));
                for (d, &w) in deltas.iter().zip(&weights) {
                    let v = d[j];
                    if v != 0.0 && (v > 0.0) == (sign > 0.0) {
                        mixed += v;
                        divisor += w;
                    }
                }
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                mixed = deltas.iter().map(|d| d[j]).sum();
                divisor = if weight_sum.abs() < 1e-8 {
                    1.0
                } else {
                    weight_sum
                };
            }
            if normalize {
                mixed /= divisor;
            }
            if lambda != 1.0 {
                mixed *= lambda;
            }
            *o = base[j] + mixed;
        }
        Ok(())
    }
}
