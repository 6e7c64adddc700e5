//! The gradient of one model parameter after a backward pass, for what reads gradients
//! (`amalgam measure --stats fisher`, `amalgam adamerge`): dense, or, for an embedding table
//! looked up under [`Ctx::gather`](crate::route::side::Ctx::gather), only the rows looked up.

use std::collections::BTreeMap;

use candle_core::Var;
use candle_core::backprop::GradStore;

use crate::error::Result;
use crate::route::side::Gathered;

/// A parameter's gradient.
pub enum ParamGrad {
    /// Every element, row-major.
    Dense(Vec<f32>),
    /// Only these rows (of `width` elements) are nonzero: row → gradient.
    Rows(BTreeMap<u32, Vec<f32>>, usize),
}

impl ParamGrad {
    /// `Σ g·x` with `x` the parameter-shaped `values`, in f64.
    pub fn dot(&self, values: &[f32]) -> f64 {
        match self {
            ParamGrad::Dense(g) => g
                .iter()
                .zip(values)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum(),
            ParamGrad::Rows(rows, width) => rows
                .iter()
                .map(|(&id, r)| {
                    let at = id as usize * width;
                    r.iter()
                        .zip(&values[at..at + width])
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                })
                .sum(),
        }
    }
}

/// The gradient of `var` in `grads`: its dense gradient plus, summed per row, the gradients of
/// the rows of it that `gathered` looked up; `None` when no gradient reached it.
pub fn param_grad(
    grads: &GradStore,
    gathered: &[Gathered],
    var: &Var,
) -> Result<Option<ParamGrad>> {
    let width = var.dims().last().copied().unwrap_or(1);
    let mut rows: BTreeMap<u32, Vec<f32>> = BTreeMap::new();
    for g in gathered.iter().filter(|g| g.table == var.id()) {
        let Some(rg) = grads.get(g.rows.as_tensor()) else {
            continue;
        };
        let rg = rg.flatten_all()?.to_vec1::<f32>()?;
        for (&id, r) in g.ids.iter().zip(rg.chunks_exact(width)) {
            let row = rows.entry(id).or_insert_with(|| vec![0f32; width]);
            for (a, &v) in row.iter_mut().zip(r) {
                *a += v;
            }
        }
    }
    match grads.get(var.as_tensor()) {
        Some(g) => {
            let mut g = g.flatten_all()?.to_vec1::<f32>()?;
            for (id, r) in &rows {
                let at = *id as usize * width;
                for (a, v) in g[at..at + width].iter_mut().zip(r) {
                    *a += v;
                }
            }
            Ok(Some(ParamGrad::Dense(g)))
        }
        None if !rows.is_empty() => Ok(Some(ParamGrad::Rows(rows, width))),
        None => Ok(None),
    }
}
