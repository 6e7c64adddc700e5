//! Sums whose result does not depend on how a tensor is cut into chunks, yet vectorise.

/// A sum in 8 lanes by absolute element index (lane = index mod 8): each lane adds its values in
/// f32 within aligned blocks of [`FLUSH`] elements and the block sums in f64, and the lanes are
/// combined in lane order at the end. Calls must come in index order; the partial block is
/// carried between them, so the result does not depend on how the tensor is cut into chunks,
/// and the loop vectorises (8 f32 adds per 8 elements).
#[derive(Clone, Copy, Debug, Default)]
pub struct LaneSum {
    total: [f64; 8],
    part: [f32; 8],
}

/// Elements per f32 block of a [`LaneSum`] (32 per lane).
pub const FLUSH: usize = 256;

impl LaneSum {
    /// Add `values`, elements `offset..` of the tensor.
    #[inline(always)]
    pub fn add(&mut self, offset: usize, values: &[f32]) {
        let head = ((8 - offset % 8) % 8).min(values.len());
        for (j, &v) in values[..head].iter().enumerate() {
            self.one(offset + j, v);
        }
        let mut end = offset + head;
        let mut blocks = values[head..].chunks_exact(8);
        for block in &mut blocks {
            end += 8;
            self.block(end, block.try_into().expect("8"));
        }
        for (j, &v) in blocks.remainder().iter().enumerate() {
            self.one(end + j, v);
        }
    }

    /// Add element `index`.
    #[inline(always)]
    pub(crate) fn one(&mut self, index: usize, v: f32) {
        self.part[index % 8] += v;
        if (index + 1).is_multiple_of(FLUSH) {
            self.flush();
        }
    }

    /// Add the 8 elements before index `end` (a multiple of 8).
    #[inline(always)]
    pub(crate) fn block(&mut self, end: usize, values: &[f32; 8]) {
        self.eight(values);
        if end.is_multiple_of(FLUSH) {
            self.flush();
        }
    }

    /// Add 8 elements that start at a multiple of 8, without the flush at a block's end (the
    /// caller flushes there).
    #[inline(always)]
    pub(crate) fn eight(&mut self, values: &[f32; 8]) {
        for (p, &v) in self.part.iter_mut().zip(values) {
            *p += v;
        }
    }

    #[inline(always)]
    pub(crate) fn flush(&mut self) {
        for (t, p) in self.total.iter_mut().zip(&mut self.part) {
            *t += *p as f64;
            *p = 0.0;
        }
    }

    /// The sum.
    pub fn total(&self) -> f64 {
        self.total
            .iter()
            .zip(&self.part)
            .map(|(&t, &p)| t + p as f64)
            .sum()
    }
}
