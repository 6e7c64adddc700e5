//! Sums whose result does not depend on how a tensor is cut into chunks, yet vectorise.

/// A sum in 8 lanes by absolute element index (lane = index mod 8): each lane adds its values in
/// f32 within aligned blocks of [`FLUSH`] elements and the block sums in f64, and the lanes are
/// combined in lane order at the end. Calls must come in index order; the partial block is
/// carried between them, so the result does not depend on how the tensor is cut into chunks,
/// and the loop vectorises (8 f32 adds per 8 elements).
#[derive(Clone, Copy, Debug, Default)]
pub struct LaneSum {
    /// The lanes' f64 sums of their flushed blocks (fields open to kernels that keep the
    /// partial sums in their own registers and flush as [`LaneSum::flush`] does).
    pub(crate) total: [f64; 8],
    /// The lanes' f32 sums since the last flush.
    pub(crate) part: [f32; 8],
}

/// Elements per f32 block of a [`LaneSum`] (32 per lane).
pub const FLUSH: usize = 256;

/// How [`LaneSum::add`] walks `n` elements that start at tensor index `offset`: `(head, blocks)`,
/// the elements to add one by one ([`LaneSum::one`]) before the first multiple of 8, then the
/// whole blocks of 8 ([`LaneSum::block`]); the rest are added one by one again. A kernel that
/// feeds several sums (and bit streams) in one loop walks the same way, so that its sums are
/// the ones `add` gives, bit for bit.
#[inline(always)]
pub fn spans(offset: usize, n: usize) -> (usize, usize) {
    let head = ((8 - offset % 8) % 8).min(n);
    (head, (n - head) / 8)
}

/// `K` sums fed aligned blocks of 8 at once, by a kernel that fills several sums in one loop:
/// the same sums as [`LaneSum::block`] block by block, bit for bit, with the partial sums held
/// in registers between flushes (through `&mut LaneSum`s they would be stored and reloaded
/// every block). Every method inlines, so it is a set of local variables in the kernel.
pub struct Blocks<'a, const K: usize> {
    sums: [&'a mut LaneSum; K],
    parts: [[f32; 8]; K],
    totals: [[f64; 8]; K],
    end: usize,
}

impl<'a, const K: usize> Blocks<'a, K> {
    /// Start feeding `sums` the block that ends at index `first_end` (a multiple of 8).
    #[inline(always)]
    pub fn new(sums: [&'a mut LaneSum; K], first_end: usize) -> Self {
        let parts = std::array::from_fn(|s| sums[s].part);
        let totals = std::array::from_fn(|s| sums[s].total);
        Blocks {
            sums,
            parts,
            totals,
            end: first_end,
        }
    }

    /// Add the next block's 8 values to each sum.
    #[inline(always)]
    pub fn add(&mut self, values: [[f32; 8]; K]) {
        for (part, v) in self.parts.iter_mut().zip(&values) {
            for (p, &v) in part.iter_mut().zip(v) {
                *p += v;
            }
        }
        if self.end.is_multiple_of(FLUSH) {
            for s in 0..K {
                for l in 0..8 {
                    self.totals[s][l] += self.parts[s][l] as f64;
                    self.parts[s][l] = 0.0;
                }
            }
        }
        self.end += 8;
    }

    /// Store the sums back.
    #[inline(always)]
    pub fn finish(self) {
        for (s, sum) in self.sums.into_iter().enumerate() {
            (sum.part, sum.total) = (self.parts[s], self.totals[s]);
        }
    }
}

impl LaneSum {
    /// Add `values`, elements `offset..` of the tensor.
    #[inline(always)]
    pub fn add(&mut self, offset: usize, values: &[f32]) {
        let (head, _) = spans(offset, values.len());
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
