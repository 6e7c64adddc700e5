//! `diff`: compare two models tensor by tensor (names, shapes, dtypes, values).
//!
//! Values are compared in f32 after decoding each side from its own dtype, so a bf16 model can
//! be checked against an f32 one. The figure of merit is the norm-relative error
//! `‖a − b‖₂ / max(‖a‖₂, ‖b‖₂)` (0 when both are zero), accumulated in f64; a NaN on one side
//! only counts as an infinite error.

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::dtype::decode_f32;
use crate::error::Result;
use crate::io::{Model, TensorView};

/// The comparison of one tensor present in both models.
#[derive(Clone, Debug, Serialize)]
pub struct TensorDiff {
    /// Name.
    pub name: String,
    /// dtype in A and in B.
    pub dtypes: [String; 2],
    /// Shape in A and in B.
    pub shapes: [Vec<usize>; 2],
    /// Largest absolute elementwise difference (`null` in JSON when shapes differ).
    pub max_abs: Option<f64>,
    /// Norm-relative error (`null` when shapes differ).
    pub rel: Option<f64>,
}

impl TensorDiff {
    /// Whether this tensor counts as different at tolerance `rtol`.
    pub fn differs(&self, rtol: f64) -> bool {
        self.shapes[0] != self.shapes[1] || self.rel.is_none_or(|r| r.is_nan() || r > rtol)
    }
}

/// The comparison of two models.
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    /// Tensors only in A.
    pub only_in_a: Vec<String>,
    /// Tensors only in B.
    pub only_in_b: Vec<String>,
    /// Tensors in both, in A's order.
    pub tensors: Vec<TensorDiff>,
    /// The tolerance used.
    pub rtol: f64,
    /// Whether the models differ: missing names, shapes, or an error above `rtol`.
    pub differ: bool,
}

/// Compare the models at `a` and `b`.
pub fn diff(a: &Path, b: &Path, rtol: f64) -> Result<DiffReport> {
    let ma = Model::open(a)?;
    let mb = Model::open(b)?;
    let only_in_a = names_missing(&ma, &mb);
    let only_in_b = names_missing(&mb, &ma);
    let common: Vec<&str> = ma
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| mb.contains(n))
        .collect();
    let tensors = common
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(fa, fb), name| -> Result<TensorDiff> {
                let (va, vb) = (ma.tensor(name)?, mb.tensor(name)?);
                let d = compare(va, vb, fa, fb);
                ma.release(name);
                mb.release(name);
                Ok(d)
            },
        )
        .collect::<Result<Vec<_>>>()?;
    let differ =
        !only_in_a.is_empty() || !only_in_b.is_empty() || tensors.iter().any(|t| t.differs(rtol));
    Ok(DiffReport {
        only_in_a,
        only_in_b,
        tensors,
        rtol,
        differ,
    })
}

fn names_missing(from: &Model, other: &Model) -> Vec<String> {
    from.tensors()
        .iter()
        .filter(|t| !other.contains(&t.name))
        .map(|t| t.name.clone())
        .collect()
}

fn compare(a: TensorView, b: TensorView, fa: &mut Vec<f32>, fb: &mut Vec<f32>) -> TensorDiff {
    let mut d = TensorDiff {
        name: a.name.to_string(),
        dtypes: [a.dtype.to_string(), b.dtype.to_string()],
        shapes: [a.shape.to_vec(), b.shape.to_vec()],
        max_abs: None,
        rel: None,
    };
    if a.shape != b.shape {
        return d;
    }
    if a.dtype == b.dtype && a.bytes == b.bytes {
        d.max_abs = Some(0.0);
        d.rel = Some(0.0);
        return d;
    }
    if !(decode_f32(a.dtype, a.bytes, fa) && decode_f32(b.dtype, b.bytes, fb)) {
        // Non-float tensors that are not byte-identical: different, with no numeric measure.
        d.max_abs = Some(f64::INFINITY);
        d.rel = Some(f64::INFINITY);
        return d;
    }
    let (max_abs, rel) = errors(fa, fb);
    d.max_abs = Some(max_abs);
    d.rel = Some(rel);
    d
}

/// Largest absolute difference and norm-relative error of two equal-length slices.
pub fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut na, mut nb, mut nd, mut max_abs) = (0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            if x.is_nan() != y.is_nan() {
                return (f64::INFINITY, f64::INFINITY);
            }
            continue;
        }
        let (x, y) = (x as f64, y as f64);
        let diff = if x == y { 0.0 } else { (x - y).abs() };
        na += x * x;
        nb += y * y;
        nd += diff * diff;
        max_abs = max_abs.max(diff);
    }
    let denom = na.max(nb).sqrt();
    let rel = if nd == 0.0 {
        0.0
    } else if denom == 0.0 || !denom.is_finite() {
        f64::INFINITY
    } else {
        nd.sqrt() / denom
    };
    (max_abs, rel)
}

#[cfg(test)]
mod tests {
    use super::errors;

    #[test]
    fn relative_error_is_normalised_by_the_larger_norm() {
        let (m, r) = errors(&[3.0, 4.0], &[3.0, 4.5]);
        assert_eq!(m, 0.5);
        assert!((r - 0.5 / (3f64 * 3.0 + 4.5 * 4.5).sqrt()).abs() < 1e-12);
        assert_eq!(errors(&[0.0, 0.0], &[0.0, 0.0]), (0.0, 0.0));
        assert_eq!(errors(&[f32::NAN], &[f32::NAN]), (0.0, 0.0));
        assert_eq!(errors(&[f32::NAN], &[1.0]).1, f64::INFINITY);
        assert_eq!(errors(&[f32::INFINITY], &[f32::INFINITY]).1, 0.0);
    }
}
