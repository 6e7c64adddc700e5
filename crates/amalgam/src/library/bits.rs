//! Packed bits and fixed-width codes, as the library stores them in `U8` tensors.
//!
//! Bit order: element `i` of a packed stream is bit `i mod 8` (least significant first) of byte
//! `⌊i/8⌋`, as `numpy.packbits(..., bitorder="little")` writes it. A `b`-bit code `i` occupies
//! stream bits `i·b .. i·b + b`, least significant bit first; the last byte is padded with 0.

/// A growing stream of bits, filled through a 64-bit accumulator.
#[derive(Clone, Debug, Default)]
pub struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    pending: u32,
    len: usize,
}

impl BitWriter {
    /// A stream with room for `bits` bits.
    pub fn with_capacity(bits: usize) -> BitWriter {
        BitWriter {
            bytes: Vec::with_capacity(bits.div_ceil(8)),
            ..Default::default()
        }
    }

    /// Append one bit.
    #[inline]
    pub fn push(&mut self, bit: bool) {
        self.push_code(bit as u32, 1);
    }

    /// Append the low `width` (at most 32) bits of `code`, least significant first.
    #[inline]
    pub fn push_code(&mut self, code: u32, width: u32) {
        let mask = if width == 32 {
            u32::MAX
        } else {
            (1u32 << width) - 1
        };
        self.acc |= ((code & mask) as u64) << self.pending;
        self.pending += width;
        self.len += width as usize;
        while self.pending >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.pending -= 8;
        }
    }

    /// Append one bit per element of `values`: whether it is non-zero (8 at a time).
    pub fn push_nonzero(&mut self, values: &[f32]) {
        self.push_bits(values, |v| v != 0.0);
    }

    /// Append one bit per element of `values`: `pred` of it, packed 8 at a time (whole bytes
    /// straight into the stream when it is byte-aligned).
    #[inline(always)]
    pub fn push_bits(&mut self, values: &[f32], pred: impl Fn(f32) -> bool) {
        let mut blocks = values.chunks_exact(8);
        if self.pending == 0 {
            self.bytes.reserve(values.len() / 8);
            for block in &mut blocks {
                let mut byte = 0u8;
                for (l, &v) in block.iter().enumerate() {
                    byte |= (pred(v) as u8) << l;
                }
                self.bytes.push(byte);
            }
            self.len += values.len() / 8 * 8;
        } else {
            for block in &mut blocks {
                let mut byte = 0u8;
                for (l, &v) in block.iter().enumerate() {
                    byte |= (pred(v) as u8) << l;
                }
                self.push_code(byte as u32, 8);
            }
        }
        for &v in blocks.remainder() {
            self.push(pred(v));
        }
    }

    /// Append `width`-bit codes (width at most 8), whole bytes at a time when the stream is
    /// byte-aligned and `width` divides 8.
    pub fn push_codes(&mut self, codes: &[u8], width: u32) {
        if self.pending == 0 && 8 % width == 0 {
            let per = (8 / width) as usize;
            let mut blocks = codes.chunks_exact(per);
            self.bytes.reserve(codes.len() / per);
            for block in &mut blocks {
                let mut byte = 0u8;
                for (j, &c) in block.iter().enumerate() {
                    byte |= c << (j as u32 * width);
                }
                self.bytes.push(byte);
            }
            self.len += codes.len() / per * 8;
            for &c in blocks.remainder() {
                self.push_code(c as u32, width);
            }
        } else {
            for &c in codes {
                self.push_code(c as u32, width);
            }
        }
    }

    /// Bits written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packed bytes (the last one padded with 0).
    pub fn into_bytes(mut self) -> Vec<u8> {
        if self.pending > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

/// Bit `i` of a packed stream (`false` past its end).
#[inline]
pub fn bit(bytes: &[u8], i: usize) -> bool {
    bytes.get(i / 8).is_some_and(|b| (b >> (i % 8)) & 1 == 1)
}

/// The `width`-bit code `i` (width at most 8) of a packed stream.
#[inline]
pub fn code(bytes: &[u8], i: usize, width: u32) -> u32 {
    let start = i * width as usize;
    let (byte, shift) = (start / 8, start % 8);
    let lo = bytes.get(byte).copied().unwrap_or(0) as u32;
    let hi = bytes.get(byte + 1).copied().unwrap_or(0) as u32;
    ((lo | (hi << 8)) >> shift) & ((1u32 << width) - 1)
}

/// Where elements `start..start + n` of a packed stream begin a whole byte: the count of leading
/// elements to take one by one (0 when `start` is a multiple of 8).
#[inline(always)]
fn head(start: usize, n: usize) -> usize {
    ((8 - start % 8) % 8).min(n)
}

crate::simd::vectorized! {
    /// `out[j] = base[j] + scale·v[j]` where bit `start + j` of `mask` is set, else `base[j]`.
    pub fn masked_add(mask: &[u8], start: usize, base: &[f32], v: &[f32], scale: f32, out: &mut [f32]) {
        let h = head(start, out.len());
        for j in 0..h {
            out[j] = if bit(mask, start + j) { base[j] + scale * v[j] } else { base[j] };
        }
        let first = (start + h) / 8;
        let blocks = out[h..].chunks_exact_mut(8).zip(base[h..].chunks_exact(8)).zip(v[h..].chunks_exact(8));
        let mut done = h;
        for (k, ((o, b), x)) in blocks.enumerate() {
            let byte = mask[first + k];
            for l in 0..8 {
                o[l] = if (byte >> l) & 1 == 1 { b[l] + scale * x[l] } else { b[l] };
            }
            done += 8;
        }
        for j in done..out.len() {
            out[j] = if bit(mask, start + j) { base[j] + scale * v[j] } else { base[j] };
        }
    }
}

crate::simd::vectorized! {
    /// `out[j] = base[j] + α` where bit `start + j` of `signs` is set, else `base[j] − α`.
    pub fn signed_add(signs: &[u8], start: usize, base: &[f32], alpha: f32, out: &mut [f32]) {
        let h = head(start, out.len());
        for j in 0..h {
            out[j] = if bit(signs, start + j) { base[j] + alpha } else { base[j] - alpha };
        }
        let first = (start + h) / 8;
        let blocks = out[h..].chunks_exact_mut(8).zip(base[h..].chunks_exact(8));
        let mut done = h;
        for (k, (o, b)) in blocks.enumerate() {
            let byte = signs[first + k];
            for l in 0..8 {
                o[l] = if (byte >> l) & 1 == 1 { b[l] + alpha } else { b[l] - alpha };
            }
            done += 8;
        }
        for j in done..out.len() {
            out[j] = if bit(signs, start + j) { base[j] + alpha } else { base[j] - alpha };
        }
    }
}

/// Bytes needed for `n` codes of `width` bits.
pub fn packed_len(n: usize, width: u32) -> usize {
    (n * width as usize).div_ceil(8)
}

/// Number of set bits among the first `n` of a stream.
pub fn count_ones(bytes: &[u8], n: usize) -> usize {
    let full = n / 8;
    let mut c: usize = bytes[..full.min(bytes.len())]
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum();
    for i in full * 8..n {
        c += bit(bytes, i) as usize;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_little_endian_within_bytes() {
        let mut w = BitWriter::default();
        for b in [
            true, false, false, false, false, false, false, false, false, true,
        ] {
            w.push(b);
        }
        assert_eq!(w.len(), 10);
        assert_eq!(w.into_bytes(), vec![0b0000_0001, 0b0000_0010]);
    }

    #[test]
    fn codes_round_trip_across_byte_boundaries() {
        let mut w = BitWriter::default();
        let codes: Vec<u32> = (0..37).map(|i| (i * 5 + 3) % 8).collect();
        for &c in &codes {
            w.push_code(c, 3);
        }
        let bytes = w.into_bytes();
        assert_eq!(bytes.len(), packed_len(37, 3));
        for (i, &c) in codes.iter().enumerate() {
            assert_eq!(code(&bytes, i, 3), c);
        }
        // Code 0 is 3 = 0b011: bits 0 and 1 of byte 0; code 1 is 0 (bits 3..6).
        assert_eq!(bytes[0] & 0b111, 3);
    }

    #[test]
    fn nonzero_bits_pack_whole_bytes_and_a_tail() {
        let mut w = BitWriter::default();
        w.push(true);
        let values: Vec<f32> = (0..11)
            .map(|i| if i % 3 == 0 { 1.5 } else { 0.0 })
            .collect();
        w.push_nonzero(&values);
        let bytes = w.into_bytes();
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(bit(&bytes, i + 1), v != 0.0, "{i}");
        }
        assert!(bit(&bytes, 0));
        assert_eq!(bytes.len(), 2);
    }

    #[test]
    fn codes_pushed_in_bulk_read_back() {
        for width in [2u32, 3, 4, 8] {
            let codes: Vec<u8> = (0..29u32)
                .map(|i| ((i * 7 + 1) % (1 << width)) as u8)
                .collect();
            let mut w = BitWriter::default();
            w.push_codes(&codes[..13], width);
            w.push_codes(&codes[13..], width);
            let bytes = w.into_bytes();
            assert_eq!(bytes.len(), packed_len(codes.len(), width));
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(code(&bytes, i, width), c as u32, "width {width} code {i}");
            }
        }
    }

    #[test]
    fn masked_and_signed_adds_match_bit_by_bit_at_any_start() {
        let mask: Vec<u8> = (0..8u32).map(|i| (i * 37 + 11) as u8).collect();
        let base: Vec<f32> = (0..64).map(|i| i as f32 * 0.25 - 3.0).collect();
        let v: Vec<f32> = (0..64).map(|i| 1.0 / (i as f32 + 1.5)).collect();
        for start in [0usize, 3, 8, 13] {
            let n = 64 - start - 5;
            let (b, x) = (&base[start..start + n], &v[start..start + n]);
            let mut out = vec![0.0; n];
            masked_add(&mask, start, b, x, 0.7, &mut out);
            for j in 0..n {
                let want = if bit(&mask, start + j) {
                    b[j] + 0.7 * x[j]
                } else {
                    b[j]
                };
                assert_eq!(
                    out[j].to_bits(),
                    want.to_bits(),
                    "start {start} element {j}"
                );
            }
            signed_add(&mask, start, b, 0.3, &mut out);
            for j in 0..n {
                let want = if bit(&mask, start + j) {
                    b[j] + 0.3
                } else {
                    b[j] - 0.3
                };
                assert_eq!(
                    out[j].to_bits(),
                    want.to_bits(),
                    "start {start} element {j}"
                );
            }
        }
    }

    #[test]
    fn counting_ones_stops_at_n() {
        let bytes = [0xff, 0x0f];
        assert_eq!(count_ones(&bytes, 12), 12);
        assert_eq!(count_ones(&bytes, 10), 10);
        assert_eq!(count_ones(&bytes, 3), 3);
    }
}
