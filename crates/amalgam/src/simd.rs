//! Run-time choice of vector instructions for the hot loops.
//!
//! The crate is compiled for the baseline x86-64 target (SSE2), so one binary runs anywhere.
//! [`vectorized!`] compiles a loop twice, once more with the x86-64-v3 features (AVX2, FMA,
//! F16C, BMI2, POPCNT), and picks at run time. Both copies perform the same IEEE operations in the same
//! order (Rust never fuses a multiply and an add on its own), so the choice never changes a
//! result; setting `AMALGAM_SIMD=baseline` forces the baseline copies, which the tests use to
//! check exactly that.

use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const BASELINE: u8 = 1;
const V3: u8 = 2;

static LEVEL: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the x86-64-v3 copies run (the CPU has the features and `AMALGAM_SIMD` is not
/// `baseline`). Decided once per process.
#[inline]
pub fn v3() -> bool {
    match LEVEL.load(Ordering::Relaxed) {
        UNKNOWN => {
            let level = detect();
            LEVEL.store(level, Ordering::Relaxed);
            level == V3
        }
        level => level == V3,
    }
}

#[cold]
fn detect() -> u8 {
    if std::env::var("AMALGAM_SIMD").is_ok_and(|v| v == "baseline") {
        return BASELINE;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("bmi1")
            && std::arch::is_x86_feature_detected!("bmi2")
            && std::arch::is_x86_feature_detected!("lzcnt")
            && std::arch::is_x86_feature_detected!("popcnt")
        {
            return V3;
        }
    }
    BASELINE
}

/// Define a function whose body is compiled for the baseline target and for x86-64-v3, the
/// copy chosen at run time by [`v3`]. The body should be the whole loop (a call per chunk, not
/// per element) and call only code that inlines into it (iterators, closures, `#[inline]`
/// helpers), or other `vectorized!` functions. In the body, the constant `V3: bool` tells which
/// copy it is, for helpers that use an instruction the compiler would not choose on its own
/// ([`top_bits`]).
macro_rules! vectorized {
    ($(#[$attr:meta])* $vis:vis fn $name:ident $(<$($lt:lifetime),+>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(non_snake_case)]
            fn body<$($($lt,)+)? const V3: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
                fn v3 $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                if $crate::simd::v3() {
                    // SAFETY: `v3()` checked that the CPU has every feature `v3` uses.
                    return unsafe { v3($($arg),*) };
                }
            }
            body::<false>($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// The top bit of each of 8 lanes, lane `l`'s at bit `l`: one `vmovmskps` in the x86-64-v3
/// copies of a [`vectorized!`] body (`V3` true there), a fold elsewhere (which the compiler
/// builds from shifts and ORs: several instructions a lane).
///
/// # Safety
/// `V3` may be true only where the CPU has AVX: pass a `vectorized!` body's own `V3`.
#[inline(always)]
pub unsafe fn top_bits<const V3: bool>(lanes: [u32; 8]) -> u8 {
    #[cfg(target_arch = "x86_64")]
    if V3 {
        #[target_feature(enable = "avx")]
        #[inline]
        fn movemask(lanes: [u32; 8]) -> u8 {
            use std::arch::x86_64::{_mm256_castsi256_ps, _mm256_loadu_si256, _mm256_movemask_ps};
            // SAFETY: an unaligned load of the 32 bytes of `lanes`.
            let v = unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) };
            _mm256_movemask_ps(_mm256_castsi256_ps(v)) as u8
        }
        // SAFETY: the caller's promise.
        return unsafe { movemask(lanes) };
    }
    lanes
        .iter()
        .enumerate()
        .fold(0u8, |m, (l, &v)| m | (((v >> 31) as u8) << l))
}

/// `v` when `keep`, else `+0.0`.
#[inline(always)]
pub fn keep_if(v: f32, keep: bool) -> f32 {
    f32::from_bits(v.to_bits() & (keep as u32).wrapping_neg())
}

/// `values[j] = f(j, values[j])` for every `j`, read through a copy on the stack, tile by tile.
/// Written in place, a loop that keeps some values and zeroes others compiles to a masked store
/// (only the zeros are written), which is microcoded and slow on AMD processors; from a copy,
/// every store is a plain one.
#[inline(always)]
pub fn rewrite(values: &mut [f32], mut f: impl FnMut(usize, f32) -> f32) {
    const TILE: usize = 256;
    let mut copy = [0f32; TILE];
    for (i, tile) in values.chunks_mut(TILE).enumerate() {
        let src = &mut copy[..tile.len()];
        src.copy_from_slice(tile);
        for (j, (d, &v)) in tile.iter_mut().zip(src.iter()).enumerate() {
            *d = f(i * TILE + j, v);
        }
    }
}

vectorized! {
    /// Whether every value is finite (no NaN, no infinity).
    pub fn all_finite(x: &[f32]) -> bool {
        // Branch-free over blocks, so the check runs at memory speed.
        x.chunks(1024)
            .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
    }
}

vectorized! {
    /// `out = Σ wᵢ·xᵢ`, accumulated input by input from 0 (the order a scalar loop has).
    pub fn weighted_sum(inputs: &[&[f32]], weights: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        for (x, &w) in inputs.iter().zip(weights) {
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o += w * v;
            }
        }
    }
}

/// One input of a chunk as the fused loops read it: f32 values, or bf16 bits widened as they
/// are read ([`MergeJob::bf16`](crate::methods::MergeJob::bf16)), which saves writing and reading back an f32 copy.
pub(crate) trait Elems: Copy {
    /// How many elements.
    fn len(self) -> usize;
    /// The first `n` elements.
    fn prefix(self, n: usize) -> Self;
    /// Elements `start..end`.
    fn range(self, start: usize, end: usize) -> Self;
    /// Element `i` as f32.
    fn at(self, i: usize) -> f32;
    /// Elements `i..i + 8` as f32 (one bounds check for the eight).
    fn eight(self, i: usize) -> [f32; 8];
}

impl Elems for &[f32] {
    #[inline(always)]
    fn len(self) -> usize {
        <[f32]>::len(self)
    }
    #[inline(always)]
    fn prefix(self, n: usize) -> Self {
        &self[..n]
    }
    #[inline(always)]
    fn range(self, start: usize, end: usize) -> Self {
        &self[start..end]
    }
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        self[i]
    }
    #[inline(always)]
    fn eight(self, i: usize) -> [f32; 8] {
        self[i..i + 8].try_into().expect("8")
    }
}

/// bf16 bits.
#[derive(Clone, Copy)]
pub(crate) struct Bf16<'a>(pub &'a [u16]);

impl Elems for Bf16<'_> {
    #[inline(always)]
    fn len(self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn prefix(self, n: usize) -> Self {
        Bf16(&self.0[..n])
    }
    #[inline(always)]
    fn range(self, start: usize, end: usize) -> Self {
        Bf16(&self.0[start..end])
    }
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        crate::dtype::f32_of_bf16(self.0[i])
    }
    #[inline(always)]
    fn eight(self, i: usize) -> [f32; 8] {
        let b: &[u16; 8] = self.0[i..i + 8].try_into().expect("8");
        b.map(crate::dtype::f32_of_bf16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_check_finds_any_bad_value() {
        let mut x = vec![1.0f32; 5000];
        assert!(all_finite(&x));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1023, 1024, 4999] {
                x[at] = bad;
                assert!(!all_finite(&x), "{bad} at {at}");
                x[at] = 1.0;
            }
        }
        assert!(all_finite(&[]));
    }
}
