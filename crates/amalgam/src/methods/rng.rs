//! Deterministic random streams for random methods (DARE, DELLA).
//!
//! Each (seed, tensor name, input index) gets its own ChaCha8 stream, so a tensor's mask does
//! not depend on which thread computes it or in what order tensors are visited.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// A stream of uniform f64s in [0, 1) for one tensor of one input.
pub struct Stream(ChaCha8Rng);

/// FNV-1a, to fold a tensor name into the key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Stream {
    /// The stream for `input` of tensor `name` under `seed`.
    pub fn new(seed: u64, name: &str, input: usize) -> Stream {
        let mut key = [0u8; 32];
        let mut s = seed
            ^ fnv1a(name.as_bytes()).rotate_left(17)
            ^ (input as u64).wrapping_mul(0xA24B_AED4_963E_E407);
        for chunk in key.chunks_exact_mut(8) {
            s = splitmix(s);
            chunk.copy_from_slice(&s.to_le_bytes());
        }
        Stream(ChaCha8Rng::from_seed(key))
    }

    /// The next uniform value in [0, 1), with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let take = |s: &mut Stream| (0..4).map(|_| s.uniform()).collect::<Vec<_>>();
        let a = take(&mut Stream::new(1, "w", 0));
        assert_eq!(a, take(&mut Stream::new(1, "w", 0)));
        assert_ne!(a, take(&mut Stream::new(1, "w", 1)));
        assert_ne!(a, take(&mut Stream::new(1, "v", 0)));
        assert_ne!(a, take(&mut Stream::new(2, "w", 0)));
        let mut s = Stream::new(7, "m", 3);
        let mean = (0..100_000).map(|_| s.uniform()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }
}
