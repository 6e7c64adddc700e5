//! Exact rank selection over magnitudes, streamed: no sort and no copy of the tensor.
//!
//! The key of an element is the bit pattern of `|x|` as f32, which orders non-negative floats
//! like their values. A first pass counts the top 16 bits of every key (65,536 bins), which
//! locates the bin holding each wanted rank; a second pass counts the low 16 bits inside those
//! bins, which gives the exact value at the rank and how many elements lie below it. Elements
//! equal to a boundary value are then kept or dropped by their position among those ties in
//! index order, which reproduces a stable sort: "top k, lower index first among ties" for TIES
//! and "ascending positions [a, b), lower index first" for Breadcrumbs.

/// The sort key of `x`: `|x|` as bits.
#[inline]
pub fn key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Bins of each histogram pass (16 bits of the key).
pub const BINS: usize = 1 << 16;

/// A boundary: elements equal to `value` are kept when their tie position (in index order) is
/// in `[lo_t, hi_t)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Edge {
    value: u32,
    lo_t: u64,
    hi_t: u64,
}

/// Which elements survive: those strictly between the edges, and ties at an edge by position.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    lower: Option<Edge>,
    upper: Option<Edge>,
    none: bool,
    seen_lower: u64,
    seen_upper: u64,
    /// Scratch: boundary ties of the current chunk (position, value).
    ties: Vec<(usize, f32)>,
}

impl Selection {
    /// Keep everything.
    pub fn all() -> Selection {
        Selection {
            lower: None,
            upper: None,
            none: false,
            seen_lower: 0,
            seen_upper: 0,
            ties: Vec::new(),
        }
    }

    /// Keep every element whose key is at least `value`, ties included (the papers' global
    /// TIES rule: `|x| ≥ threshold`).
    pub fn at_least(value: u32) -> Selection {
        Selection {
            lower: Some(Edge {
                value,
                lo_t: 0,
                hi_t: u64::MAX,
            }),
            ..Selection::all()
        }
    }

    /// Keep nothing.
    pub fn nothing() -> Selection {
        Selection {
            none: true,
            ..Selection::all()
        }
    }

    /// Restart the tie counters for another pass over the tensor.
    pub fn rewind(&mut self) {
        self.seen_lower = 0;
        self.seen_upper = 0;
    }

    /// Zero the entries of `x` (the next elements in index order) that are not kept. Chunks
    /// without boundary ties take a branch-free path that vectorises (inlined, so it runs in its
    /// caller's instruction set).
    #[inline(always)]
    pub fn apply(&mut self, x: &mut [f32]) {
        let (lo, hi) = self.edges();
        let (n_lo, n_hi) = count_equal(x, lo, hi);
        match self.window(n_lo, n_hi) {
            Some(w) => {
                self.advance(n_lo, n_hi);
                if !w.keeps_all() {
                    crate::simd::rewrite(x, |_, v| crate::simd::keep_if(v, w.keeps(key(v))));
                }
            }
            None => {
                for v in x.iter_mut() {
                    if !self.keep(key(*v)) {
                        *v = 0.0;
                    }
                }
            }
        }
    }

    /// The keys at the edges, whose ties in a chunk [`window`](Self::window) needs counted
    /// (`u32::MAX`, which no key equals, for a missing edge).
    #[inline(always)]
    pub fn edges(&self) -> (u32, u32) {
        let value = |e: Option<Edge>| e.map_or(u32::MAX, |e| e.value);
        (value(self.lower), value(self.upper))
    }

    /// The branch-free rule for the next chunk, which has `n_lo` and `n_hi` elements equal to
    /// the [`edges`](Self::edges): usually all or none of an edge's ties in a chunk are kept.
    /// `None` when the chunk is where an edge's quota runs out (walk it with [`keep`]).
    /// Follow with [`advance`](Self::advance).
    ///
    /// [`keep`]: Self::keep
    #[inline(always)]
    pub fn window(&self, n_lo: u64, n_hi: u64) -> Option<Window> {
        if self.none {
            return Some(Window::NOTHING);
        }
        // The ties at each edge in this chunk are tie positions [seen, seen + n) of that edge;
        // the edge keeps positions [lo_t, hi_t).
        let decide = |e: Option<Edge>, seen: u64, n: u64| -> Option<bool> {
            let Some(e) = e else { return Some(false) };
            if n == 0 || (seen >= e.lo_t && seen + n <= e.hi_t) {
                Some(true)
            } else if seen + n <= e.lo_t || seen >= e.hi_t {
                Some(false)
            } else {
                None
            }
        };
        let same = self.same_edge();
        let keep_lo = decide(self.lower, self.seen_lower, n_lo)?;
        let keep_hi = if same {
            // One tie sequence under both edges' ranges.
            decide(self.upper, self.seen_lower, n_lo)?
        } else {
            decide(self.upper, self.seen_upper, n_hi)?
        };
        let mut w = Window::ALL;
        if let Some(e) = self.lower {
            w.lo = e.value as i32;
            w.tie_lo = keep_lo && (!same || keep_hi);
        }
        if let Some(e) = self.upper {
            w.hi = e.value as i32;
            w.tie_hi = keep_hi && (!same || keep_lo);
        }
        Some(w)
    }

    /// Count a chunk's ties at the edges as seen (after [`window`](Self::window) gave its rule).
    #[inline(always)]
    pub fn advance(&mut self, n_lo: u64, n_hi: u64) {
        self.seen_lower += n_lo;
        if !self.same_edge() {
            self.seen_upper += n_hi;
        }
    }

    fn same_edge(&self) -> bool {
        self.lower.is_some() && self.lower.map(|e| e.value) == self.upper.map(|e| e.value)
    }

    /// Whether the next element (in index order) with key `k` is kept.
    #[inline]
    pub fn keep(&mut self, k: u32) -> bool {
        if self.none {
            return false;
        }
        let mut ok = true;
        let mut at_lower = false;
        if let Some(e) = self.lower {
            if k < e.value {
                return false;
            }
            if k == e.value {
                at_lower = true;
                let t = self.seen_lower;
                self.seen_lower += 1;
                ok &= t >= e.lo_t && t < e.hi_t;
                if let Some(u) = self.upper
                    && u.value == k
                {
                    ok &= t >= u.lo_t && t < u.hi_t;
                }
            }
        }
        if let Some(e) = self.upper {
            if k > e.value {
                return false;
            }
            if k == e.value && !at_lower {
                let t = self.seen_upper;
                self.seen_upper += 1;
                ok &= t >= e.lo_t && t < e.hi_t;
            }
        }
        ok
    }
}

/// How many keys of `x` equal `a`, and how many equal `b`.
#[inline(always)]
pub fn count_equal(x: &[f32], a: u32, b: u32) -> (u64, u64) {
    // u32 counts per block vectorise; blocks keep them from overflowing.
    x.chunks(1 << 20).fold((0, 0), |(na, nb), c| {
        let (ca, cb) = c.iter().fold((0u32, 0u32), |(ca, cb), &v| {
            let k = key(v);
            (ca + (k == a) as u32, cb + (k == b) as u32)
        });
        (na + ca as u64, nb + cb as u64)
    })
}

/// A selection's rule over one chunk, branch-free: a key passes when it is above `lo` (or equal
/// and `tie_lo`) and below `hi` (or equal and `tie_hi`). A missing lower edge is `0` with ties
/// kept, a missing upper edge [`KEY_MAX`] with ties kept. Keys fit in 31 bits, so they compare
/// as signed integers (one vector instruction each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    lo: i32,
    tie_lo: bool,
    hi: i32,
    tie_hi: bool,
}

/// The largest key (`|x|` as bits never has the sign bit).
const KEY_MAX: i32 = i32::MAX;

impl Default for Window {
    fn default() -> Window {
        Window::ALL
    }
}

impl Window {
    /// Keeps everything.
    pub const ALL: Window = Window {
        lo: 0,
        tie_lo: true,
        hi: KEY_MAX,
        tie_hi: true,
    };
    /// Keeps nothing (no key is above [`KEY_MAX`]).
    pub const NOTHING: Window = Window {
        lo: KEY_MAX,
        tie_lo: false,
        hi: KEY_MAX,
        tie_hi: true,
    };

    /// Whether every key passes.
    #[inline(always)]
    pub fn keeps_all(self) -> bool {
        self == Window::ALL
    }

    /// Whether key `k` passes. Two comparisons with bounds that fold the tie flags in (keys
    /// are ≥ 0, so neither bound overflows): a mix of comparisons and the flags as booleans
    /// compiles to packing and unpacking vector masks in the loops over it.
    #[inline(always)]
    pub fn keeps(self, k: u32) -> bool {
        let k = k as i32;
        let above = self.lo - self.tie_lo as i32;
        let up_to = self.hi - !self.tie_hi as i32;
        (k > above) & (k <= up_to)
    }
}

crate::simd::vectorized! {
    /// Add the top 16 bits of each key to `hist` (4 interleaved histograms of [`BINS`], summed
    /// by [`Selector::end_high`]): neighbouring elements often share a bin, and one counter
    /// per element position mod 4 keeps their increments from waiting on each other.
    fn histogram_high(keys: &[u32], hist: &mut [u32]) {
        let (h0, rest) = hist.split_at_mut(BINS);
        let (h1, rest) = rest.split_at_mut(BINS);
        let (h2, h3) = rest.split_at_mut(BINS);
        let h3 = &mut h3[..BINS];
        let mut quads = keys.chunks_exact(4);
        for q in &mut quads {
            h0[(q[0] >> 16) as usize] += 1;
            h1[(q[1] >> 16) as usize] += 1;
            h2[(q[2] >> 16) as usize] += 1;
            h3[(q[3] >> 16) as usize] += 1;
        }
        for &k in quads.remainder() {
            h0[(k >> 16) as usize] += 1;
        }
    }
}

/// Add the low 16 bits of the keys whose top 16 bits are `b0` to `h0`, and of those whose top
/// bits are `b1` to `h1` (if given). Few keys are in either bin: they are first gathered (a
/// vector compare and compress), then counted.
fn histogram_low(
    keys: &[u32],
    b0: u32,
    h0: &mut [u32],
    b1: u32,
    h1: Option<&mut Vec<u32>>,
    gathered: &mut Vec<u32>,
) {
    gathered.clear();
    gather_bins(keys, b0, b1, gathered);
    let h0 = &mut h0[..BINS];
    match h1 {
        None => {
            for &k in gathered.iter() {
                h0[(k & 0xffff) as usize] += 1;
            }
        }
        Some(h1) => {
            for &k in gathered.iter() {
                let h = if k >> 16 == b0 { &mut *h0 } else { &mut *h1 };
                h[(k & 0xffff) as usize] += 1;
            }
        }
    }
}

/// Append to `out`, in order, the keys whose top 16 bits are `b0` or `b1`.
fn gather_bins(keys: &[u32], b0: u32, b1: u32, out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::v3() {
        // SAFETY: `v3()` checked that the CPU has AVX2.
        unsafe { gather_bins_avx2(keys, b0, b1, out) };
        return;
    }
    out.extend(keys.iter().filter(|&&k| (k >> 16 == b0) | (k >> 16 == b1)));
}

/// Per 8-bit mask, the positions of its set bits, in order (the lanes to keep, packed first).
#[cfg(target_arch = "x86_64")]
const COMPRESS: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut bit, mut n) = (0, 0);
        while bit < 8 {
            if m & (1 << bit) != 0 {
                table[m][n] = bit as u32;
                n += 1;
            }
            bit += 1;
        }
        m += 1;
    }
    table
};

/// [`gather_bins`] with AVX2: per 8 keys, compare, pack the matches to the front with one
/// permute and store them all; the length advances by the number of matches.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn gather_bins_avx2(keys: &[u32], b0: u32, b1: u32, out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    // Room for every key plus one full store past the last match.
    out.reserve(keys.len() + 8);
    let mut len = out.len();
    let v0 = _mm256_set1_epi32(b0 as i32);
    let v1 = _mm256_set1_epi32(b1 as i32);
    let mut blocks = keys.chunks_exact(8);
    for block in &mut blocks {
        // SAFETY: `block` holds 8 u32s; the store writes 8 u32s at `len`, and `len + 8` is
        // within the reserved capacity because `len` grows by at most 8 per block.
        unsafe {
            let k = _mm256_loadu_si256(block.as_ptr().cast());
            let hi = _mm256_srli_epi32::<16>(k);
            let hit = _mm256_or_si256(_mm256_cmpeq_epi32(hi, v0), _mm256_cmpeq_epi32(hi, v1));
            let mask = _mm256_movemask_ps(_mm256_castsi256_ps(hit)) as usize;
            let order = _mm256_loadu_si256(COMPRESS[mask].as_ptr().cast());
            let packed = _mm256_permutevar8x32_epi32(k, order);
            _mm256_storeu_si256(out.as_mut_ptr().add(len).cast(), packed);
            len += mask.count_ones() as usize;
        }
    }
    // SAFETY: the first `len` elements were written above (or were already there).
    unsafe { out.set_len(len) };
    out.extend(
        blocks
            .remainder()
            .iter()
            .filter(|&&k| (k >> 16 == b0) | (k >> 16 == b1)),
    );
}

crate::simd::vectorized! {
    /// The keys of `x − b` into `keys` (cleared first).
    pub fn delta_keys(x: &[f32], b: &[f32], keys: &mut Vec<u32>) {
        keys.clear();
        keys.extend(x.iter().zip(b).map(|(&x, &b)| key(x - b)));
    }
}

crate::simd::vectorized! {
    /// [`delta_keys`] of bf16 bits, widened as they are read.
    pub fn delta_keys_bf16(x: &[u16], b: &[u16], keys: &mut Vec<u32>) {
        let f = crate::dtype::f32_of_bf16;
        keys.clear();
        keys.extend(x.iter().zip(b).map(|(&x, &b)| key(f(x) - f(b))));
    }
}

/// What is wanted of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// The `k` largest (ties: lower index first).
    TopK(usize),
    /// Ascending positions `[a, b)` (ties: lower index first).
    Window(usize, usize),
}

/// The streamed two-pass selection of one tensor of `n` elements.
pub struct Selector {
    n: usize,
    want: Want,
    /// Ascending ranks whose values are needed.
    ranks: Vec<usize>,
    hi: Vec<u32>,
    /// Per rank: (top-16 bin, elements below that bin).
    bins: Vec<(u32, usize)>,
    lo: Vec<Vec<u32>>,
    /// Scratch: the keys of a chunk inside the wanted bins (pass 2).
    gathered: Vec<u32>,
}

/// The ascending ranks whose values `want` needs, or the selection when it needs none.
fn ranks_of(n: usize, want: Want) -> Result<Vec<usize>, Selection> {
    match want {
        Want::TopK(k) if k >= n => Err(Selection::all()),
        Want::TopK(0) => Err(Selection::nothing()),
        Want::TopK(k) => Ok(vec![n - k]),
        Want::Window(a, b) if a >= b || a >= n => Err(Selection::nothing()),
        Want::Window(0, b) if b >= n => Err(Selection::all()),
        Want::Window(a, b) => Ok(vec![a, b.min(n) - 1]),
    }
}

/// The value at an ascending rank and how many elements are below it.
#[derive(Clone, Copy, Debug)]
struct Located {
    value: u32,
    less: usize,
    count: usize,
}

/// The bin holding ascending `rank` of a histogram, and how many elements lie in lower bins.
pub fn locate<C: Copy + Into<u64>>(hist: &[C], rank: usize) -> (u32, usize) {
    let mut below = 0usize;
    for (b, &c) in hist.iter().enumerate() {
        let c = c.into() as usize;
        if rank < below + c {
            return (b as u32, below);
        }
        below += c;
    }
    unreachable!("rank {rank} beyond the {below} counted elements")
}

impl Selector {
    /// A selector for a tensor of `n` elements, or the final selection when no pass is needed.
    pub fn new(n: usize, want: Want) -> Result<Selector, Selection> {
        let ranks = ranks_of(n, want)?;
        Ok(Selector {
            n,
            want,
            ranks,
            hi: vec![0; 4 * BINS],
            gathered: Vec::new(),
            bins: Vec::new(),
            lo: Vec::new(),
        })
    }

    /// Change what is wanted, before [`end_high`](Self::end_high): for a count known only
    /// after the first pass (e.g. a fraction of the positive elements). Gives the final
    /// selection when no second pass is needed.
    pub fn retarget(&mut self, want: Want) -> Option<Selection> {
        match ranks_of(self.n, want) {
            Ok(ranks) => {
                self.ranks = ranks;
                self.want = want;
                None
            }
            Err(done) => Some(done),
        }
    }

    /// Pass 1: count the top bits of `keys`.
    pub fn count_high(&mut self, keys: &[u32]) {
        histogram_high(keys, &mut self.hi);
    }

    /// Between the passes: find the bins of the wanted ranks.
    pub fn end_high(&mut self) {
        let (first, rest) = self.hi.split_at_mut(BINS);
        for part in rest.chunks_exact(BINS) {
            first.iter_mut().zip(part).for_each(|(a, &b)| *a += b);
        }
        self.hi.truncate(BINS);
        self.bins = self.ranks.iter().map(|&r| locate(&self.hi, r)).collect();
        self.lo = self.bins.iter().map(|_| vec![0; BINS]).collect();
        self.hi = Vec::new();
    }

    /// Pass 2: count the low bits of the keys inside the wanted bins.
    pub fn count_low(&mut self, keys: &[u32]) {
        let (b0, b1) = (self.bins[0].0, self.bins.last().expect("a rank").0);
        // Two ranks in one bin share the first histogram.
        let (first, rest) = self.lo.split_first_mut().expect("a rank");
        let second = rest.last_mut().filter(|_| b1 != b0);
        histogram_low(keys, b0, first, b1, second, &mut self.gathered);
    }

    /// After pass 2: the selection.
    pub fn finish(self) -> Selection {
        // Two ranks in one bin share its low histogram (counted into the first).
        let shared = self.bins.len() == 2 && self.bins[0].0 == self.bins[1].0;
        let at = |i: usize| {
            let (bin, below) = self.bins[i];
            let hist = &self.lo[if shared { 0 } else { i }];
            let (low, below_low) = locate(hist, self.ranks[i] - below);
            Located {
                value: (bin << 16) | low,
                less: below + below_low,
                count: hist[low as usize] as usize,
            }
        };
        match self.want {
            Want::TopK(k) => {
                let t = at(0);
                let greater = self.n - t.less - t.count;
                Selection {
                    lower: Some(Edge {
                        value: t.value,
                        lo_t: 0,
                        hi_t: (k - greater) as u64,
                    }),
                    ..Selection::all()
                }
            }
            Want::Window(a, b) => {
                let (l, u) = (at(0), at(1));
                Selection {
                    lower: Some(Edge {
                        value: l.value,
                        lo_t: (a - l.less) as u64,
                        hi_t: u64::MAX,
                    }),
                    upper: Some(Edge {
                        value: u.value,
                        lo_t: 0,
                        hi_t: (b.min(self.n) - u.less) as u64,
                    }),
                    ..Selection::all()
                }
            }
        }
    }
}

/// Exact order statistics of keys gathered over many tensors (a whole model), in two passes:
/// the high pass counts the top 16 bits of every key, the low pass the low 16 bits of the keys
/// in each wanted rank's bin. Counts are u64 histograms that add up across tensors in any order
/// ([`RankCounts::add`]), so the result does not depend on the thread count.
#[derive(Clone, Debug, Default)]
pub struct ModelRanks {
    /// Wanted ascending ranks.
    ranks: Vec<u64>,
    /// After the high pass: per rank, its bin and the count below the bin.
    bins: Vec<(u32, u64)>,
    /// After the low pass: per rank, the key at that rank.
    keys: Vec<u32>,
}

/// One pass's counts for a [`ModelRanks`]: one histogram in the high pass, one per rank in the
/// low pass (ranks sharing a bin count into the first one's).
#[derive(Clone, Debug)]
pub struct RankCounts(Vec<Vec<u64>>);

impl RankCounts {
    /// Fold another tensor's counts into these.
    pub fn add(&mut self, other: &RankCounts) {
        for (m, t) in self.0.iter_mut().zip(&other.0) {
            m.iter_mut().zip(t).for_each(|(a, b)| *a += b);
        }
    }
}

impl ModelRanks {
    /// Find the keys at these ascending ranks.
    pub fn new(ranks: Vec<u64>) -> ModelRanks {
        ModelRanks {
            ranks,
            ..ModelRanks::default()
        }
    }

    fn high_done(&self) -> bool {
        !self.bins.is_empty()
    }

    /// Zeroed counts for the current pass.
    pub fn counts(&self) -> RankCounts {
        let n = if self.high_done() {
            self.ranks.len()
        } else {
            1
        };
        RankCounts(vec![vec![0u64; BINS]; n])
    }

    /// Count key `k` in the current pass.
    #[inline]
    pub fn count(&self, c: &mut RankCounts, k: u32) {
        if !self.high_done() {
            c.0[0][(k >> 16) as usize] += 1;
        } else if let Some(w) = self.bins.iter().position(|&(b, _)| b == k >> 16) {
            c.0[w][(k & 0xffff) as usize] += 1;
        }
    }

    /// End of a pass over every key: locate the bins (high pass), then the keys (low pass).
    pub fn end_pass(&mut self, c: &RankCounts) {
        if !self.high_done() {
            self.bins = self
                .ranks
                .iter()
                .map(|&r| {
                    let (bin, below) = locate(&c.0[0], r as usize);
                    (bin, below as u64)
                })
                .collect();
        } else {
            self.keys = self
                .ranks
                .iter()
                .zip(&self.bins)
                .map(|(&r, &(bin, below))| {
                    let w = self
                        .bins
                        .iter()
                        .position(|&(b, _)| b == bin)
                        .expect("own bin");
                    let (low, _) = locate(&c.0[w], (r - below) as usize);
                    (bin << 16) | low
                })
                .collect();
        }
    }

    /// The key at wanted rank `i` (after both passes).
    pub fn key(&self, i: usize) -> u32 {
        self.keys[i]
    }
}

/// Run a whole selection over an in-memory slice (used by tests and small tensors).
pub fn select(x: &[f32], want: Want) -> Selection {
    match Selector::new(x.len(), want) {
        Err(done) => done,
        Ok(mut s) => {
            let keys: Vec<u32> = x.iter().map(|&v| key(v)).collect();
            s.count_high(&keys);
            s.end_high();
            s.count_low(&keys);
            s.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ranks_over_several_tensors_are_exact() {
        let tensors: Vec<Vec<u32>> = vec![
            (0..1000).map(|i| (i * 7919 % 1000) << 12).collect(),
            vec![5 << 12; 300],
            (0..77).map(|i| i * 0x1_0001).collect(),
        ];
        let mut all: Vec<u32> = tensors.concat();
        all.sort();
        let ranks = vec![0, 400, 401, 1376];
        let mut m = ModelRanks::new(ranks.clone());
        for _ in 0..2 {
            let mut total = m.counts();
            for t in &tensors {
                let mut c = m.counts();
                t.iter().for_each(|&k| m.count(&mut c, k));
                total.add(&c);
            }
            m.end_pass(&total);
        }
        for (i, &r) in ranks.iter().enumerate() {
            assert_eq!(m.key(i), all[r as usize], "rank {r}");
        }
    }

    /// Reference: a stable sort by (|x|, index).
    fn reference(x: &[f32], want: Want) -> Vec<bool> {
        let mut order: Vec<usize> = (0..x.len()).collect();
        let mut keep = vec![false; x.len()];
        match want {
            Want::TopK(k) => {
                order.sort_by(|&a, &b| key(x[b]).cmp(&key(x[a])).then(a.cmp(&b)));
                order.iter().take(k).for_each(|&i| keep[i] = true);
            }
            Want::Window(a, b) => {
                order.sort_by(|&p, &q| key(x[p]).cmp(&key(x[q])).then(p.cmp(&q)));
                order[a.min(x.len())..b.min(x.len())]
                    .iter()
                    .for_each(|&i| keep[i] = true);
            }
        }
        keep
    }

    fn check(x: &[f32], want: Want) {
        let expected = reference(x, want);
        let mut sel = select(x, want);
        let got: Vec<bool> = x.iter().map(|&v| sel.keep(key(v))).collect();
        assert_eq!(got, expected, "{want:?} on {x:?}");
        // The chunked path agrees, for any chunking (nonzero inputs, so kept = nonzero).
        let nz: Vec<f32> = x
            .iter()
            .map(|&v| if v == 0.0 { 1e-30 } else { v })
            .collect();
        let expected = reference(&nz, want);
        for chunk in [1, 3, nz.len().max(1)] {
            let mut sel = select(&nz, want);
            let mut y = nz.clone();
            y.chunks_mut(chunk).for_each(|c| sel.apply(c));
            let got: Vec<bool> = y.iter().map(|&v| v != 0.0).collect();
            assert_eq!(got, expected, "{want:?} chunk {chunk} on {nz:?}");
        }
    }

    #[test]
    fn matches_a_stable_sort_with_many_ties() {
        let mut s = 1u64;
        for trial in 0..40 {
            let n = 1 + trial % 37;
            let levels = 1 + trial % 5;
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let v = ((s >> 33) % levels as u64) as f32 * 0.25;
                    if s & 1 == 0 { v } else { -v }
                })
                .collect();
            for k in 0..=n + 1 {
                check(&x, Want::TopK(k));
            }
            for a in (0..=n).step_by(3) {
                for b in (a..=n + 1).step_by(2) {
                    check(&x, Want::Window(a, b));
                }
            }
        }
    }

    #[test]
    fn distinguishes_values_sharing_high_bits() {
        let x: Vec<f32> = (0..1000).map(|i| 1.0 + i as f32 * 1e-6).collect();
        check(&x, Want::TopK(10));
        check(&x, Want::Window(100, 900));
        let x: Vec<f32> = (0..1000)
            .map(|i| if i % 2 == 0 { 1e30 } else { -1e-30 * i as f32 })
            .collect();
        check(&x, Want::TopK(600));
    }
}
