//! The rows of one vocabulary-indexed tensor (embeddings, LM head) as each input supplies it
//! after alignment: for every output token, a row of one of the tensor's inputs (its own or
//! another model's), zeros, or the mean of the models that have the token; then padding rows,
//! each input's mean row. Assembled chunk by chunk from positioned reads of the inputs' stored
//! rows, so an aligned tensor streams like any other.

use std::cell::RefCell;

use crate::error::Result;

/// Where one output row of one input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Stored row `row` of the tensor's input `input`.
    Row {
        /// Input index within the tensor.
        input: u16,
        /// Row in that input's stored tensor.
        row: u32,
    },
    /// Zeros.
    Zero,
    /// The mean of the rows listed in [`TensorRows::means`] at this index.
    Mean(u32),
}

/// How every input of one tensor is aligned to the output vocabulary.
#[derive(Debug, PartialEq)]
pub struct TensorRows {
    /// Output rows, padding included.
    pub rows: usize,
    /// Elements per row.
    pub cols: usize,
    /// Per input: the fill of each real (unpadded) output row.
    pub fills: Vec<Vec<Fill>>,
    /// Rows averaged for a [`Fill::Mean`], in model order.
    pub means: Vec<Vec<(u16, u32)>>,
}

impl TensorRows {
    /// Output rows that are tokens (the rest are padding).
    pub fn real(&self) -> usize {
        self.fills.first().map_or(0, Vec::len)
    }

    /// Whether input `k` reads as stored: every row its own, in order, no padding.
    pub fn is_identity(&self, k: usize, stored_rows: usize) -> bool {
        self.rows == stored_rows
            && self.fills[k].len() == stored_rows
            && self.fills[k].iter().enumerate().all(|(r, f)| {
                *f == Fill::Row {
                    input: k as u16,
                    row: r as u32,
                }
            })
    }
}

/// Reads stored rows of a tensor's inputs: `count` rows of input `input` from `first`, decoded
/// to f32, into `out` (`count · cols` values).
pub trait RowReader {
    /// Read the rows.
    fn read_rows(&self, input: usize, first: usize, count: usize, out: &mut [f32]) -> Result<()>;
}

/// Per input, its padding row once computed (the mean of its aligned real rows).
#[derive(Default)]
pub struct PadCache(RefCell<Vec<Option<Vec<f32>>>>);

/// Rows per read when averaging a whole input for its padding row.
const PAD_BLOCK: usize = 256;

impl TensorRows {
    /// Write output rows `r0..r1` of input `k` into `out` (`(r1 − r0) · cols` values).
    pub fn assemble(
        &self,
        k: usize,
        r0: usize,
        r1: usize,
        reader: &dyn RowReader,
        pads: &PadCache,
        out: &mut [f32],
    ) -> Result<()> {
        let cols = self.cols;
        let real = self.real();
        let mut r = r0;
        let mut tmp = Vec::new();
        while r < r1 {
            let dst = &mut out[(r - r0) * cols..];
            if r >= real {
                let pad = self.pad_row(k, reader, pads)?;
                for row in dst[..(r1 - r) * cols].chunks_exact_mut(cols) {
                    row.copy_from_slice(&pad);
                }
                break;
            }
            match self.fills[k][r] {
                Fill::Zero => {
                    dst[..cols].fill(0.0);
                    r += 1;
                }
                Fill::Mean(i) => {
                    let sources = &self.means[i as usize];
                    let row = &mut dst[..cols];
                    row.fill(0.0);
                    tmp.resize(cols, 0.0);
                    // Summed in model order, then divided: mergekit's order of operations.
                    for &(input, stored) in sources {
                        reader.read_rows(input as usize, stored as usize, 1, &mut tmp)?;
                        for (x, y) in row.iter_mut().zip(&tmp) {
                            *x += y;
                        }
                    }
                    let n = sources.len() as f32;
                    row.iter_mut().for_each(|x| *x /= n);
                    r += 1;
                }
                Fill::Row { input, row } => {
                    // One read for a run of consecutive stored rows of the same input.
                    let mut run = 1;
                    while r + run < r1.min(real)
                        && self.fills[k][r + run]
                            == (Fill::Row {
                                input,
                                row: row + run as u32,
                            })
                    {
                        run += 1;
                    }
                    reader.read_rows(input as usize, row as usize, run, &mut dst[..run * cols])?;
                    r += run;
                }
            }
        }
        Ok(())
    }

    /// Input `k`'s padding row: the mean of its aligned real rows (computed once, in f64).
    fn pad_row(&self, k: usize, reader: &dyn RowReader, pads: &PadCache) -> Result<Vec<f32>> {
        if let Some(p) = pads.0.borrow().get(k).and_then(Option::as_ref) {
            return Ok(p.clone());
        }
        let (cols, real) = (self.cols, self.real());
        let mut sum = vec![0f64; cols];
        let mut block = vec![0f32; PAD_BLOCK * cols];
        for a in (0..real).step_by(PAD_BLOCK) {
            let b = (a + PAD_BLOCK).min(real);
            let part = &mut block[..(b - a) * cols];
            self.assemble(k, a, b, reader, pads, part)?;
            for row in part.chunks_exact(cols) {
                for (s, x) in sum.iter_mut().zip(row) {
                    *s += *x as f64;
                }
            }
        }
        let pad: Vec<f32> = sum
            .iter()
            .map(|s| (s / real.max(1) as f64) as f32)
            .collect();
        let mut cache = pads.0.borrow_mut();
        if cache.len() <= k {
            cache.resize(k + 1, None);
        }
        cache[k] = Some(pad.clone());
        Ok(pad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input `i`'s stored row `r` is `[100·i + r, −(100·i + r)]`; reads are counted.
    struct Fake(RefCell<usize>);

    impl RowReader for Fake {
        fn read_rows(
            &self,
            input: usize,
            first: usize,
            count: usize,
            out: &mut [f32],
        ) -> Result<()> {
            *self.0.borrow_mut() += 1;
            for (j, row) in out[..count * 2].chunks_exact_mut(2).enumerate() {
                let v = (100 * input + first + j) as f32;
                row.copy_from_slice(&[v, -v]);
            }
            Ok(())
        }
    }

    #[test]
    fn rows_runs_means_zeros_and_padding() {
        let rows = TensorRows {
            rows: 6,
            cols: 2,
            fills: vec![vec![
                Fill::Row { input: 0, row: 0 },
                Fill::Row { input: 0, row: 1 },
                Fill::Row { input: 1, row: 7 },
                Fill::Mean(0),
                Fill::Zero,
            ]],
            means: vec![vec![(0, 2), (1, 4)]],
        };
        let reader = Fake(RefCell::new(0));
        let pads = PadCache::default();
        let mut out = vec![9.0; 12];
        rows.assemble(0, 0, 6, &reader, &pads, &mut out).unwrap();
        let mean = (2.0 + 104.0) / 2.0;
        let pad = (0.0 + 1.0 + 107.0 + mean + 0.0) / 5.0;
        assert_eq!(
            out,
            [
                0., -0., 1., -1., 107., -107., mean, -mean, 0., 0., pad, -pad
            ]
        );
        // Any split into chunks gives the same rows.
        let mut parts = vec![0.0; 12];
        for (a, b) in [(0, 1), (1, 4), (4, 6)] {
            rows.assemble(0, a, b, &reader, &pads, &mut parts[a * 2..b * 2])
                .unwrap();
        }
        assert_eq!(parts, out);
        assert!(!rows.is_identity(0, 5));
    }
}
