//! Storage dtypes as safetensors names them, and bulk conversion between float storage and the
//! f32 that every computation runs in.
//!
//! Widening (f16/bf16 → f32 → f64) is exact. Narrowing rounds to nearest, ties to even, once:
//! an f64 source is rounded straight to its target rather than through f32, so no value is
//! double-rounded. Integer and bool tensors are never converted; they pass through as bytes.

use std::fmt;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// A tensor element type, spelled as in safetensors headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte.
    #[serde(rename = "BOOL")]
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 4 exponent bits (passed through only).
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    /// 8-bit float, 5 exponent bits (passed through only).
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DType {
    /// Every dtype, for parsing and error messages.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Whether amalgam computes on this dtype (converts it to f32). Other dtypes pass through.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The safetensors spelling (`"BF16"`, `"F8_E4M3"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Parse a safetensors dtype name.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// Parse a user-facing float dtype name as mergekit and torch spell them
    /// (`bfloat16`, `bf16`, `float16`, `fp16`, `half`, `float32`, `fp32`, `float`, `float64`).
    pub fn parse_float(name: &str) -> Option<DType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            "float64" | "fp64" | "f64" | "double" => Some(DType::F64),
            _ => None,
        }
    }

    /// The name torch uses in `config.json`'s `torch_dtype`.
    pub fn torch_name(self) -> Option<&'static str> {
        match self {
            DType::BF16 => Some("bfloat16"),
            DType::F16 => Some("float16"),
            DType::F32 => Some("float32"),
            DType::F64 => Some("float64"),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// A float storage element: how to widen it to f32 and narrow f32/f64 into it.
trait FloatElem: bytemuck::Pod {
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl FloatElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        // `as` rounds to nearest, ties to even.
        x as f32
    }
}

impl FloatElem for f64 {
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl FloatElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f32(f64_to_f32_round_to_odd(x))
    }
}

impl FloatElem for bf16 {
    fn to_f32(self) -> f32 {
        f32_of_bf16(self.to_bits())
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f32(f64_to_f32_round_to_odd(x))
    }
}

/// Narrow f64 to f32 rounding to odd: truncate, then set the last bit if anything was lost.
/// Rounding that result to nearest-even in a format with at least two fewer significand bits
/// (bf16: 8, f16: 11, against f32's 24) equals rounding the f64 directly, which `half`'s own
/// f64 conversions do not do (they round twice).
fn f64_to_f32_round_to_odd(x: f64) -> f32 {
    let f = x as f32;
    if !f.is_finite() {
        return f;
    }
    let back = f as f64;
    if back == x {
        return f;
    }
    let mut bits = f.to_bits();
    if back.abs() > x.abs() {
        // Rounded away from zero: step the magnitude back one unit to truncate.
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// Run `$body` with `$t` bound to the Rust type of float dtype `$dtype`.
macro_rules! with_float_type {
    ($dtype:expr, $t:ident, $body:block, $other:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            _ => $other,
        }
    };
}

/// Read little-endian elements of `T` from possibly unaligned bytes.
fn for_each_elem<T: bytemuck::Pod>(bytes: &[u8], mut f: impl FnMut(T)) {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(slice) => slice.iter().for_each(|&x| f(x)),
        Err(_) => bytes
            .chunks_exact(std::mem::size_of::<T>())
            .for_each(|c| f(bytemuck::pod_read_unaligned(c))),
    }
}

/// Decode float tensor bytes of `dtype` into `out` (cleared first) as f32.
///
/// Returns `false`, leaving `out` empty, when `dtype` is not a float type.
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> bool {
    out.clear();
    decode_f32_append(dtype, bytes, out)
}

/// [`decode_f32_append`] that also tells whether every value decoded is finite (`false` for a
/// dtype that is not a float). bf16 is checked on its bits in the same loop that widens it.
pub fn decode_f32_append_finite(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> bool {
    if dtype == DType::BF16
        && let Ok(src) = bytemuck::try_cast_slice::<u8, u16>(bytes)
    {
        return widen_bf16_finite(src, out);
    }
    let start = out.len();
    decode_f32_append(dtype, bytes, out) && crate::simd::all_finite(&out[start..])
}

/// [`decode_f32`] appending to `out`.
pub fn decode_f32_append(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> bool {
    if !dtype.is_float() {
        return false;
    }
    let n = bytes.len() / dtype.size();
    out.reserve(n);
    match dtype {
        // Bulk paths for aligned input: a shift for bf16, F16C (when present) for f16. `extend`
        // writes each element once (no zero-fill first).
        DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(src) => widen_bf16(src, out),
            Err(_) => decode_slow::<bf16>(bytes, out),
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(src) => {
                use half::slice::HalfFloatSliceExt;
                let start = out.len();
                out.resize(start + n, 0.0);
                src.convert_to_f32_slice(&mut out[start..])
            }
            Err(_) => decode_slow::<f16>(bytes, out),
        },
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(src) => out.extend_from_slice(src),
            Err(_) => decode_slow::<f32>(bytes, out),
        },
        _ => decode_slow::<f64>(bytes, out),
    }
    true
}

/// The f32 value of bf16 bits: bf16 is the top half of an f32, so widening is a shift.
#[inline(always)]
pub fn f32_of_bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

crate::simd::vectorized! {
    /// bf16 bits → f32, appended.
    pub fn widen_bf16(src: &[u16], out: &mut Vec<f32>) {
        out.extend(src.iter().map(|&b| f32_of_bf16(b)));
    }
}

crate::simd::vectorized! {
    /// [`widen_bf16`], returning whether every value is finite (exponent not all ones).
    fn widen_bf16_finite(src: &[u16], out: &mut Vec<f32>) -> bool {
        out.extend(src.iter().map(|&b| f32_of_bf16(b)));
        bf16_all_finite(src)
    }
}

crate::simd::vectorized! {
    /// Whether every bf16 value of `bits` is finite (exponent not all ones): the largest
    /// exponent field, in blocks, stays below all ones (a max, not a mix of booleans, so the
    /// loop stays in vector registers).
    pub fn bf16_all_finite(bits: &[u16]) -> bool {
        bits.chunks(1024)
            .all(|c| c.iter().fold(0u16, |m, &b| m.max(b & 0x7f80)) < 0x7f80)
    }
}

crate::simd::vectorized! {
    /// f32 → bf16 bits, rounding to nearest even.
    fn narrow_bf16(values: &[f32], dst: &mut [u16]) {
        dst.iter_mut()
            .zip(values)
            .for_each(|(d, &v)| *d = bf16_bits(v));
    }
}

fn decode_slow<T: FloatElem>(bytes: &[u8], out: &mut Vec<f32>) {
    for_each_elem::<T>(bytes, |x| out.push(FloatElem::to_f32(x)));
}

/// Encode f32 values as `dtype` bytes, appended to `out` (cleared first).
///
/// Returns `false` when `dtype` is not a float type.
pub fn encode_f32(dtype: DType, values: &[f32], out: &mut Vec<u8>) -> bool {
    if !dtype.is_float() {
        out.clear();
        return false;
    }
    // Every byte is written below: only growth is zeroed, not the reused part.
    out.resize(values.len() * dtype.size(), 0);
    // The byte buffer may not be aligned for wider elements (an empty Vec never is): fall back
    // to element-wise writes then.
    match dtype {
        DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, u16>(out) {
            Ok(dst) => narrow_bf16(values, dst),
            Err(_) => encode_slow(out, values, |v| bf16_bits(v).to_le_bytes()),
        },
        DType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(out) {
            Ok(dst) => {
                use half::slice::HalfFloatSliceExt;
                dst.convert_from_f32_slice(values)
            }
            Err(_) => encode_slow(out, values, |v| f16::from_f32(v).to_le_bytes()),
        },
        DType::F32 => encode_slow(out, values, f32::to_le_bytes),
        _ => encode_slow(out, values, |v| (v as f64).to_le_bytes()),
    }
    true
}

fn encode_slow<const N: usize>(out: &mut [u8], values: &[f32], f: impl Fn(f32) -> [u8; N]) {
    for (d, &v) in out.chunks_exact_mut(N).zip(values) {
        d.copy_from_slice(&f(v));
    }
}

/// f32 → bf16 bits, round to nearest even; NaN stays NaN (quietened). Branch-light so the
/// encode loop vectorises; equal to `half::bf16::from_f32` (tested on every class of input).
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    if (x & 0x7fff_ffff) > 0x7f80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    let round = 0x7fff + ((x >> 16) & 1);
    (x.wrapping_add(round) >> 16) as u16
}

/// Convert float tensor bytes from `from` to `to`, appended to `out` (cleared first), with a
/// single rounding step. Same dtype copies the bytes. Returns `false` if either is not a float.
pub fn convert_bytes(from: DType, bytes: &[u8], to: DType, out: &mut Vec<u8>) -> bool {
    out.clear();
    if from == to {
        out.extend_from_slice(bytes);
        return true;
    }
    if !from.is_float() || !to.is_float() {
        return false;
    }
    let n = bytes.len() / from.size();
    out.reserve(n * to.size());
    with_float_type!(
        from,
        S,
        {
            with_float_type!(
                to,
                D,
                {
                    // Widening through f64 is exact for every source, and narrowing from f64
                    // rounds once, so this path never double-rounds.
                    for_each_elem::<S>(bytes, |x| {
                        out.extend_from_slice(bytemuck::bytes_of(&<D as FloatElem>::from_f64(
                            FloatElem::to_f64(x),
                        )))
                    });
                    true
                },
                false
            )
        },
        false
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(dtype: DType, bits: &[u8]) {
        let mut f = Vec::new();
        assert!(decode_f32(dtype, bits, &mut f));
        let mut back = Vec::new();
        assert!(encode_f32(dtype, &f, &mut back));
        assert_eq!(back, bits, "{dtype} round trip through f32");
    }

    #[test]
    fn decoding_with_the_finite_check_finds_every_non_finite_pattern() {
        // Every bf16 and f16 bit pattern, alone: finite exactly when its f32 value is.
        for dtype in [DType::BF16, DType::F16] {
            for b in 0..=u16::MAX {
                let mut out = vec![7.0];
                let finite = decode_f32_append_finite(dtype, &b.to_le_bytes(), &mut out);
                assert_eq!(out.len(), 2, "appends");
                assert_eq!(finite, out[1].is_finite(), "{dtype} {b:#06x}");
            }
        }
        // One bad value among many, at any position; f32 and f64 too.
        for dtype in [DType::BF16, DType::F16, DType::F32, DType::F64] {
            for at in [0, 1000, 4095] {
                let mut v = vec![0.5f32; 4096];
                let mut bytes = Vec::new();
                encode_f32(dtype, &v, &mut bytes);
                assert!(decode_f32_append_finite(dtype, &bytes, &mut Vec::new()));
                v[at] = f32::NAN;
                encode_f32(dtype, &v, &mut bytes);
                assert!(
                    !decode_f32_append_finite(dtype, &bytes, &mut Vec::new()),
                    "{dtype} {at}"
                );
            }
        }
    }

    #[test]
    fn every_bf16_and_f16_pattern_round_trips_through_f32() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        // NaN payloads may be canonicalised; compare only non-NaN patterns bit-exactly.
        for dtype in [DType::BF16, DType::F16] {
            let finite: Vec<u8> = all
                .chunks_exact(2)
                .filter(|c| {
                    let b = u16::from_le_bytes([c[0], c[1]]);
                    match dtype {
                        DType::BF16 => !bf16::from_bits(b).is_nan(),
                        _ => !f16::from_bits(b).is_nan(),
                    }
                })
                .flatten()
                .copied()
                .collect();
            roundtrip(dtype, &finite);
        }
    }

    #[test]
    fn fast_bf16_encoding_matches_half() {
        let mut s = 99u64;
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        for _ in 0..1_000_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            vals.push(f32::from_bits((s >> 32) as u32));
        }
        for v in vals {
            let want = bf16::from_f32(v);
            let got = bf16::from_bits(bf16_bits(v));
            if want.is_nan() {
                assert!(got.is_nan(), "{v:e}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even mantissa (1.0).
        let halfway = 1.0f32 + 2f32.powi(-8);
        let mut out = Vec::new();
        encode_f32(DType::BF16, &[halfway], &mut out);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3f80);
        // Slightly above halfway rounds up.
        let above = f32::from_bits(halfway.to_bits() + 1);
        encode_f32(DType::BF16, &[above], &mut out);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3f81);
    }

    #[test]
    fn f64_narrowing_rounds_once() {
        // x lies just above the midpoint between two bf16 values, but rounding it to f32 first
        // lands exactly on the midpoint, which would then round down to even: double rounding.
        let x = 1.0f64 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(x as f32, 1.0f32 + 2f32.powi(-8));
        let mut out = Vec::new();
        assert!(convert_bytes(
            DType::F64,
            &x.to_le_bytes(),
            DType::BF16,
            &mut out
        ));
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3f81);
    }

    #[test]
    fn f64_narrowing_matches_exact_rounding_on_many_values() {
        // Compare against a reference that rounds the exact f64 value to nearest-even bf16.
        let reference = |x: f64| -> u16 {
            let f = x as f32; // only used for the bracket
            let b = bf16::from_f32(f).to_bits();
            let cands = [b.wrapping_sub(1), b, b.wrapping_add(1)];
            let dist = |c: u16| (bf16::from_bits(c).to_f64() - x).abs();
            let best = cands.iter().copied().min_by(|&a, &c| {
                dist(a)
                    .partial_cmp(&dist(c))
                    .unwrap()
                    .then((a & 1).cmp(&(c & 1)))
            });
            best.unwrap()
        };
        let mut s = 12345u64;
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f64::from_bits((s >> 2) | 0x3f00_0000_0000_0000)
                * if s & 1 == 0 { 1.0 } else { -1.0 };
            assert_eq!(bf16::from_f64(0.0).to_bits(), 0);
            assert_eq!(
                <bf16 as FloatElem>::from_f64(x).to_bits(),
                reference(x),
                "{x:e}"
            );
        }
    }

    #[test]
    fn unaligned_input_decodes() {
        let vals = [1.5f32, -2.25, 3.0];
        let mut bytes = vec![0u8];
        bytes.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        let mut out = Vec::new();
        assert!(decode_f32(DType::F32, &bytes[1..], &mut out));
        assert_eq!(out, vals);
    }

    #[test]
    fn integers_are_not_converted() {
        let mut out = Vec::new();
        assert!(!decode_f32(DType::I64, &[0; 8], &mut out));
        let mut bytes = Vec::new();
        assert!(!convert_bytes(DType::I64, &[0; 8], DType::F32, &mut bytes));
        assert!(convert_bytes(DType::I64, &[1; 8], DType::I64, &mut bytes));
        assert_eq!(bytes, [1; 8]);
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        assert_eq!(DType::parse_float("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse_float("int8"), None);
    }
}
