//! Observing the inputs of linear layers during a forward pass: each named layer's Gram
//! matrix `xᵀx` over the batch's token positions (padding left out unless asked for).

use candle_core::{Tensor, TensorId};

use crate::error::{Error, Result};

/// What one forward pass's linear layers saw: per named layer, in the order the layers ran,
/// the Gram matrix of its inputs (`in × in`, row-major, f32 as the matmul gives it).
pub struct Tap {
    /// `rows × 1`: 1 for a token position, 0 for padding; `None` counts every position (the
    /// reference implementations' behaviour).
    mask: Option<Tensor>,
    /// The input the last observed layer was given and where its Gram is: layers fed the same
    /// tensor (query, key and value; gate and up) share one product.
    last: Option<(TensorId, usize)>,
    /// `(layer name, Gram)`.
    pub grams: Vec<(String, Vec<f32>)>,
}

impl Tap {
    /// A tap for a batch whose token positions are weighted by `mask` (`rows × 1`), or all
    /// counted (`None`).
    pub fn new(mask: Option<Tensor>) -> Tap {
        Tap {
            mask,
            last: None,
            grams: Vec::new(),
        }
    }

    /// Layer `name` is applied to `x` (any shape `[..., in]`), flattened to `x2` (`rows × in`).
    pub fn observe(&mut self, name: &str, x: &Tensor, x2: &Tensor) -> Result<()> {
        if let Some((id, k)) = self.last
            && id == x.id()
        {
            let g = self.grams[k].1.clone();
            self.grams.push((name.to_string(), g));
            return Ok(());
        }
        let xm = match &self.mask {
            Some(m) => {
                if m.dim(0)? != x2.dim(0)? {
                    return Err(Error::Argument(format!(
                        "layer {name} sees {} input rows, not one per token position ({}); \
                         measuring mixture-of-experts layers is not supported",
                        x2.dim(0)?,
                        m.dim(0)?
                    )));
                }
                x2.broadcast_mul(m)?
            }
            None => x2.clone(),
        };
        let g = gram(&xm)?;
        self.last = Some((x.id(), self.grams.len()));
        self.grams.push((name.to_string(), g));
        Ok(())
    }
}

/// `xᵀx` of `x` (`rows × in`), row-major `in × in`: only the lower triangle is computed (half
/// the products of a full matrix product), then mirrored.
fn gram(x: &Tensor) -> Result<Vec<f32>> {
    let (rows, width) = x.dims2()?;
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let x = faer::MatRef::from_row_major_slice(&data, rows, width);
    let mut g = faer::Mat::<f32>::zeros(width, width);
    faer::linalg::matmul::triangular::matmul(
        g.as_mut(),
        faer::linalg::matmul::triangular::BlockStructure::TriangularLower,
        faer::Accum::Replace,
        x.transpose(),
        faer::linalg::matmul::triangular::BlockStructure::Rectangular,
        x,
        faer::linalg::matmul::triangular::BlockStructure::Rectangular,
        1.0,
        faer::Par::Seq,
    );
    let mut out = vec![0f32; width * width];
    for i in 0..width {
        for j in 0..=i {
            let v = g[(i, j)];
            out[i * width + j] = v;
            out[j * width + i] = v;
        }
    }
    Ok(out)
}
