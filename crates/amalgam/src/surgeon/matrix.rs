//! Vocabulary matrices (rows indexed by token id) read row by row from a model's memory map,
//! and small dense row sets gathered from them.

use crate::dtype::{DType, decode_f32_append_finite};
use crate::error::{Error, Result};
use crate::io::Model;

/// Rows of equal width, row-major.
#[derive(Clone, Debug)]
pub struct Rows<T> {
    /// The values.
    pub data: Vec<T>,
    /// Row width.
    pub cols: usize,
}

impl<T> Rows<T> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

impl<T: Copy + Into<f64>> Rows<T> {
    /// The euclidean norm of each row, in f64.
    pub fn norms(&self) -> Vec<f64> {
        (0..self.len())
            .map(|j| {
                self.row(j)
                    .iter()
                    .map(|&x| x.into().powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }
}

/// A dictionary of rows kept in the precision they were stored in (f32 holds bf16, f16 and f32
/// exactly; f64 stays f64), read as f64.
pub enum Dict {
    /// From a bf16, f16 or f32 tensor.
    F32(Rows<f32>),
    /// From an f64 tensor.
    F64(Rows<f64>),
}

impl Dict {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Dict::F32(r) => r.len(),
            Dict::F64(r) => r.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` as f64.
    pub fn row(&self, i: usize) -> Vec<f64> {
        match self {
            Dict::F32(r) => r.row(i).iter().map(|&x| x as f64).collect(),
            Dict::F64(r) => r.row(i).to_vec(),
        }
    }
}

/// One vocabulary matrix of a model: `rows` token rows of `cols` values.
pub struct Matrix<'a> {
    /// Tensor name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Rows (token ids).
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    bytes: &'a [u8],
    model: &'a Model,
}

impl<'a> Matrix<'a> {
    /// Tensor `name` of `model`, which must be a 2-D float tensor.
    pub fn open(model: &'a Model, name: &str) -> Result<Matrix<'a>> {
        let v = model.tensor(name)?;
        let bad = |reason: String| Error::InvalidSafetensors {
            path: model.path.clone(),
            reason: format!("tensor '{name}': {reason}"),
        };
        if v.shape.len() != 2 {
            return Err(bad(format!(
                "a vocabulary matrix must be 2-D (tokens × hidden), it has shape {:?}",
                v.shape
            )));
        }
        if !v.dtype.is_float() {
            return Err(bad(format!("dtype {} is not a float type", v.dtype)));
        }
        Ok(Matrix {
            name: name.to_string(),
            dtype: v.dtype,
            rows: v.shape[0],
            cols: v.shape[1],
            bytes: v.bytes,
            model,
        })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size()
    }

    /// Row `i` as stored.
    pub fn raw(&self, i: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.bytes[i * n..(i + 1) * n]
    }

    fn non_finite(&self, i: usize) -> Error {
        Error::InvalidSafetensors {
            path: self.model.path.clone(),
            reason: format!(
                "tensor '{}' row {i} holds NaN or infinity; tokensurgeon needs finite \
                 embeddings (check the model file)",
                self.name
            ),
        }
    }

    /// Append row `i` as f32 to `out` (exact for bf16, f16 and f32), refusing NaN or infinity.
    pub fn row_f32_into(&self, i: usize, out: &mut Vec<f32>) -> Result<()> {
        if !decode_f32_append_finite(self.dtype, self.raw(i), out) {
            return Err(self.non_finite(i));
        }
        Ok(())
    }

    /// Row `i` as f64, refusing NaN or infinity.
    pub fn row_f64(&self, i: usize) -> Result<Vec<f64>> {
        let out: Vec<f64> = if self.dtype == DType::F64 {
            self.raw(i)
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        } else {
            let mut f = Vec::with_capacity(self.cols);
            self.row_f32_into(i, &mut f)?;
            f.into_iter().map(f64::from).collect()
        };
        if out.iter().any(|x| !x.is_finite()) {
            return Err(self.non_finite(i));
        }
        Ok(out)
    }

    /// Rows `ids`, in their precision.
    pub fn gather(&self, ids: &[u32]) -> Result<Dict> {
        if self.dtype == DType::F64 {
            let mut data = Vec::with_capacity(ids.len() * self.cols);
            for &i in ids {
                data.extend(self.row_f64(i as usize)?);
            }
            return Ok(Dict::F64(Rows {
                data,
                cols: self.cols,
            }));
        }
        let mut data = Vec::with_capacity(ids.len() * self.cols);
        for &i in ids {
            self.row_f32_into(i as usize, &mut data)?;
        }
        Ok(Dict::F32(Rows {
            data,
            cols: self.cols,
        }))
    }

    /// The mean of every row (padding rows included, as mergekit's `mean`), in f64.
    pub fn mean(&self) -> Result<Vec<f64>> {
        let mut sum = vec![0.0f64; self.cols];
        for i in 0..self.rows {
            sum.iter_mut()
                .zip(self.row_f64(i)?)
                .for_each(|(s, x)| *s += x);
        }
        let n = self.rows.max(1) as f64;
        Ok(sum.into_iter().map(|s| s / n).collect())
    }
}
