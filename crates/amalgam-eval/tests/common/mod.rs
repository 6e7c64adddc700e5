//! Helpers the evaluation crate's tests share: fixture tensors read back, and comparisons.

#![allow(dead_code)]

use amalgam::io::Model;

/// An I64 tensor's values and shape.
pub fn ints(m: &Model, name: &str) -> (Vec<i64>, Vec<usize>) {
    let v = m.tensor(name).unwrap();
    assert_eq!(v.dtype, amalgam::DType::I64, "{name}");
    let ints = v
        .bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ints, v.shape.to_vec())
}

/// The token ids `ids` `[rows, seq]` of a fixture's expected file, as rows.
pub fn ids_rows(m: &Model) -> Vec<Vec<u32>> {
    let (ids, shape) = ints(m, "ids");
    ids.chunks(shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect()
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tensor's values, flattened.
pub fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
