//! Deterministic, counter-based randomness for random methods (DARE, DELLA).
//!
//! Element `i` of input `m` of tensor `name` draws `hash(key(seed, name, m), i)`: a value that
//! depends on nothing else, so masks do not change with the thread count, the order tensors are
//! visited in, or how a tensor is cut into chunks. [`Key::bits`] is the SplitMix64 finaliser (a
//! bijective 64-bit mixer) applied to a Weyl sequence; [`Key::bits32`], used for DARE masks, is
//! the 32-bit Murmur3 finaliser of a keyed Weyl sequence, which vectorises (32-bit multiplies).

/// The random key of one (seed, tensor, input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key(u64);

/// FNV-1a, to fold a tensor name into the key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Key {
    /// The key for `input` of tensor `name` under `seed`.
    pub fn new(seed: u64, name: &str, input: usize) -> Key {
        let k = mix(seed ^ 0x6a09_e667_f3bc_c909)
            ^ mix(fnv1a(name.as_bytes()))
            ^ mix((input as u64).wrapping_add(0x3c6e_f372_fe94_f82b));
        Key(mix(k))
    }

    /// 64 random bits for element `index`.
    #[inline]
    pub fn bits(&self, index: u64) -> u64 {
        mix(self
            .0
            .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    /// The 32-bit key for elements whose index has high half `hi`.
    #[inline]
    fn key32(&self, hi: u32) -> u32 {
        (self.0 as u32) ^ ((self.0 >> 32) as u32).wrapping_mul(hi | 1)
    }

    /// 32 random bits for element `index` (indices past 2^32 fold their high half into the key).
    #[inline]
    pub fn bits32(&self, index: u64) -> u32 {
        self.stream32(index).bits(0)
    }

    /// Zero the entries of `values` (elements `offset..`) whose `bits32` is not below `t`: a
    /// Bernoulli mask, computed in a loop that vectorises (inlined, so it runs in its caller's
    /// instruction set).
    #[inline(always)]
    pub fn mask32(&self, offset: u64, t: u32, values: &mut [f32]) {
        let mut start = 0usize;
        while start < values.len() {
            let index = offset + start as u64;
            let end = values.len().min(start + run_length(index));
            let run = self.stream32(index);
            crate::simd::rewrite(&mut values[start..end], |j, v| {
                crate::simd::keep_if(v, run.bits(j as u32) < t)
            });
            start = end;
        }
    }

    /// The [`bits32`](Self::bits32) stream from element `index`, valid for
    /// [`run_length(index)`](run_length) elements (until the index's high half changes).
    #[inline(always)]
    pub fn stream32(&self, index: u64) -> Stream32 {
        Stream32 {
            lo: index as u32,
            k: self.key32((index >> 32) as u32),
        }
    }

    /// A uniform value in [0, 1) for element `index` (53 random bits).
    #[inline]
    pub fn uniform(&self, index: u64) -> f64 {
        (self.bits(index) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The 64-bit threshold below which `bits` counts as a success of probability `p`.
#[inline]
pub fn threshold(p: f64) -> u64 {
    if p >= 1.0 {
        u64::MAX
    } else if p <= 0.0 {
        0
    } else {
        (p * 18_446_744_073_709_551_616.0) as u64
    }
}

/// [`Key::bits32`] of the elements from some index on, while the index's high half stays the
/// same: the hash of a keyed Weyl sequence, cheap to evaluate in vector lanes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stream32 {
    lo: u32,
    k: u32,
}

impl Stream32 {
    /// The step of the keyed Weyl sequence: [`weyl`](Self::weyl)`(j + 1)` is `weyl(j)` plus
    /// this, so a loop can carry the sequence with an add instead of a multiply per element.
    pub const STEP: u32 = 0x9E37_79B9;

    /// The 32 random bits of the element `j` places after the stream's start.
    #[inline(always)]
    pub fn bits(self, j: u32) -> u32 {
        Self::finish(self.weyl(j))
    }

    /// The Weyl sequence value of the element `j` places after the stream's start.
    #[inline(always)]
    pub fn weyl(self, j: u32) -> u32 {
        self.lo
            .wrapping_add(j)
            .wrapping_mul(Self::STEP)
            .wrapping_add(self.k)
    }

    /// The random bits of a Weyl sequence value.
    #[inline(always)]
    pub fn finish(weyl: u32) -> u32 {
        fmix32(weyl)
    }
}

/// Elements from `index` up to where its high half changes (where a [`Stream32`] ends).
#[inline(always)]
pub fn run_length(index: u64) -> usize {
    ((1u64 << 32) - (index & 0xffff_ffff)).min(usize::MAX as u64) as usize
}

/// The Murmur3 32-bit finaliser.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The 32-bit threshold below which `bits32` counts as a success of probability `p`
/// (resolution 2^-32).
#[inline]
pub fn threshold32(p: f64) -> u32 {
    (threshold(p) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_reproducible_and_distinct() {
        let take = |k: Key| (0..4).map(|i| k.uniform(i)).collect::<Vec<_>>();
        let a = take(Key::new(1, "w", 0));
        assert_eq!(a, take(Key::new(1, "w", 0)));
        assert_ne!(a, take(Key::new(1, "w", 1)));
        assert_ne!(a, take(Key::new(1, "v", 0)));
        assert_ne!(a, take(Key::new(2, "w", 0)));
    }

    #[test]
    fn uniform_moments_and_bernoulli_rate() {
        let k = Key::new(7, "m", 3);
        let n = 1_000_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let u = k.uniform(i);
            s += u;
            s2 += u * u;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!((mean - 0.5).abs() < 2e-3, "{mean}");
        assert!((var - 1.0 / 12.0).abs() < 1e-3, "{var}");
        let t = threshold(0.3);
        let hits = (0..n).filter(|&i| k.bits(i) < t).count() as f64 / n as f64;
        assert!((hits - 0.3).abs() < 2e-3, "{hits}");
        let t32 = threshold32(0.3);
        let hits = (0..n).filter(|&i| k.bits32(i) < t32).count() as f64 / n as f64;
        assert!((hits - 0.3).abs() < 2e-3, "{hits}");
        // Runs of kept/dropped elements are as long as chance makes them (no striping).
        let pairs = (0..n - 1)
            .filter(|&i| (k.bits32(i) < t32) && (k.bits32(i + 1) < t32))
            .count() as f64
            / n as f64;
        assert!((pairs - 0.09).abs() < 2e-3, "{pairs}");
        // The vectorised mask agrees with bits32, also across the 2^32 index boundary.
        for offset in [0u64, 5, (1 << 32) - 3] {
            let mut v = vec![1.0f32; 10];
            k.mask32(offset, t32, &mut v);
            for (j, &x) in v.iter().enumerate() {
                assert_eq!(x != 0.0, k.bits32(offset + j as u64) < t32, "{offset} {j}");
            }
        }
        // Neighbouring elements are not correlated.
        let c = (0..n - 1)
            .map(|i| (k.uniform(i) - 0.5) * (k.uniform(i + 1) - 0.5))
            .sum::<f64>()
            / n as f64;
        assert!(c.abs() < 1e-3, "{c}");
    }
}
