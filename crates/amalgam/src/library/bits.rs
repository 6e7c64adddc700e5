//! Packed bits and fixed-width codes, as the library stores them in `U8` tensors.
//!
//! Bit order: element `i` of a packed stream is bit `i mod 8` (least significant first) of byte
//! `⌊i/8⌋`, as `numpy.packbits(..., bitorder="little")` writes it. A `b`-bit code `i` occupies
//! stream bits `i·b .. i·b + b`, least significant bit first; the last byte is padded with 0.

/// A growing stream of bits, filled through a 64-bit accumulator that is written out a whole
/// word at a time.
#[derive(Clone, Debug, Default)]
pub struct BitWriter {
    bytes: Vec<u8>,
    /// The bits not yet in `bytes`: the low `pending` (fewer than 64).
    acc: u64,
    pending: u32,
    len: usize,
}

impl BitWriter {
    /// A stream with room for `bits` bits.
    pub fn with_capacity(bits: usize) -> BitWriter {
        BitWriter {
            bytes: Vec::with_capacity(bits.div_ceil(8) + 8),
            ..Default::default()
        }
    }

    /// Append one bit.
    #[inline]
    pub fn push(&mut self, bit: bool) {
        self.push_wide(bit as u64, 1);
    }

    /// Append the low `width` (at most 32) bits of `code`, least significant first.
    #[inline]
    pub fn push_code(&mut self, code: u32, width: u32) {
        self.push_wide(code as u64, width.min(32));
    }

    /// Append the low `width` (at most 64) bits of `code`, least significant first.
    #[inline(always)]
    pub fn push_wide(&mut self, code: u64, width: u32) {
        let code = if width >= 64 {
            code
        } else {
            code & ((1u64 << width) - 1)
        };
        let width = width.min(64);
        self.len += width as usize;
        if width == 0 {
            return;
        }
        self.acc |= code << self.pending;
        let total = self.pending + width;
        if total >= 64 {
            self.bytes.extend_from_slice(&self.acc.to_le_bytes());
            // The bits of `code` that did not fit.
            self.acc = if self.pending == 0 {
                0
            } else {
                code >> (64 - self.pending)
            };
            self.pending = total - 64;
        } else {
            self.pending = total;
        }
    }

    /// Write out the accumulator's whole bytes; whether the stream is then byte-aligned
    /// (nothing left pending).
    #[inline(always)]
    fn settle(&mut self) -> bool {
        if self.pending > 0 && self.pending.is_multiple_of(8) {
            let n = (self.pending / 8) as usize;
            self.bytes.extend_from_slice(&self.acc.to_le_bytes()[..n]);
            self.acc = 0;
            self.pending = 0;
        }
        self.pending == 0
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
        let byte_of = |block: &[f32]| {
            let mut byte = 0u8;
            for (l, &v) in block.iter().enumerate() {
                byte |= (pred(v) as u8) << l;
            }
            byte
        };
        if self.settle() {
            let out = self.extend_bytes(values.len() / 8);
            for (o, block) in out.iter_mut().zip(&mut blocks) {
                *o = byte_of(block);
            }
        } else {
            for block in &mut blocks {
                self.push_wide(byte_of(block) as u64, 8);
            }
        }
        for &v in blocks.remainder() {
            self.push(pred(v));
        }
    }

    /// Append 8 bits.
    #[inline(always)]
    pub fn push_byte(&mut self, byte: u8) {
        self.push_wide(byte as u64, 8);
    }

    /// Append `n` whole bytes to a byte-aligned stream and hand them over to be filled (zero
    /// until then).
    ///
    /// # Panics
    /// When the stream is not byte-aligned.
    #[inline(always)]
    pub fn extend_bytes(&mut self, n: usize) -> &mut [u8] {
        assert!(
            self.settle(),
            "extend_bytes on a stream that is not byte-aligned"
        );
        let start = self.bytes.len();
        self.bytes.resize(start + n, 0);
        self.len += 8 * n;
        &mut self.bytes[start..]
    }

    /// Append the first `n` bits of the packed stream `bytes`.
    pub fn push_stream(&mut self, bytes: &[u8], n: usize) {
        let whole = n / 64;
        for w in bytes[..whole * 8].chunks_exact(8) {
            self.push_wide(u64::from_le_bytes(w.try_into().expect("8")), 64);
        }
        for i in whole * 64..n {
            self.push(bit(bytes, i));
        }
    }

    /// Append, for each of the first `n` elements whose bit in `mask` is set, its bit in
    /// `values` (both packed streams): the values of the selected elements, in order.
    pub fn push_selected(&mut self, values: &[u8], mask: &[u8], n: usize) {
        let whole = n / 64;
        let word =
            |b: &[u8], k: usize| u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().expect("8"));
        for k in 0..whole {
            let m = word(mask, k);
            self.push_wide(pext(word(values, k), m), m.count_ones());
        }
        for i in whole * 64..n {
            if bit(mask, i) {
                self.push(bit(values, i));
            }
        }
    }

    /// Append `width`-bit codes (width at most 8, each code below `2^width`), 8 codes at a time
    /// (their bytes gathered with [`pext`]).
    pub fn push_codes(&mut self, codes: &[u8], width: u32) {
        if width == 8 {
            if self.settle() {
                self.extend_bytes(codes.len()).copy_from_slice(codes);
            } else {
                codes.iter().for_each(|&c| self.push_byte(c));
            }
            return;
        }
        // The low `width` bits of every byte.
        let low = 0x0101_0101_0101_0101u64 * ((1u64 << width) - 1);
        let mut blocks = codes.chunks_exact(8);
        self.bytes.reserve(codes.len() * width as usize / 8 + 8);
        for block in &mut blocks {
            let w = u64::from_le_bytes(block.try_into().expect("8"));
            self.push_wide(pext(w, low), 8 * width);
        }
        for &c in blocks.remainder() {
            self.push_code(c as u32, width);
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
        let n = self.pending.div_ceil(8) as usize;
        self.bytes.extend_from_slice(&self.acc.to_le_bytes()[..n]);
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

/// The bits of `x` where `mask` is set, gathered into the low bits in order (BMI2's `pext`; a
/// loop over the mask's set bits on processors without it).
#[inline(always)]
pub fn pext(x: u64, mask: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "bmi2")]
        fn hw(x: u64, mask: u64) -> u64 {
            std::arch::x86_64::_pext_u64(x, mask)
        }
        if crate::simd::v3() {
            // SAFETY: `v3()` checked that the CPU has BMI2.
            return unsafe { hw(x, mask) };
        }
    }
    let (mut out, mut m, mut k) = (0u64, mask, 0);
    while m != 0 {
        let low = m.trailing_zeros();
        out |= ((x >> low) & 1) << k;
        k += 1;
        m &= m - 1;
    }
    out
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
    let full = (n / 8).min(bytes.len());
    let mut c = count_bytes(&bytes[..full]);
    for i in full * 8..n {
        c += bit(bytes, i) as usize;
    }
    c
}

crate::simd::vectorized! {
    /// Set bits in `bytes`, a word at a time (POPCNT in the x86-64-v3 copy).
    fn count_bytes(bytes: &[u8]) -> usize {
        let words = bytes.chunks_exact(8);
        let tail: usize = words.remainder().iter().map(|b| b.count_ones() as usize).sum();
        words
            .map(|w| u64::from_le_bytes(w.try_into().expect("8")).count_ones() as usize)
            .sum::<usize>()
            + tail
    }
}

crate::simd::vectorized! {
    /// Set bits in `a`, in `b`, and in both (streams of equal length).
    pub fn count_pair(a: &[u8], b: &[u8]) -> [usize; 3] {
        let (mut ca, mut cb, mut both) = (0usize, 0usize, 0usize);
        let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("8"));
        for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            let (x, y) = (word(x), word(y));
            ca += x.count_ones() as usize;
            cb += y.count_ones() as usize;
            both += (x & y).count_ones() as usize;
        }
        let done = a.len().min(b.len()) / 8 * 8;
        for (&x, &y) in a[done..].iter().zip(&b[done..]) {
            ca += x.count_ones() as usize;
            cb += y.count_ones() as usize;
            both += (x & y).count_ones() as usize;
        }
        [ca, cb, both]
    }
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
    fn pext_gathers_masked_bits_in_order() {
        let cases = [
            (0xdead_beef_u64, 0xff00_ff00u64),
            (u64::MAX, 0x8000_0000_0000_0001),
            (0x1234, 0),
        ];
        for (x, m) in cases {
            let mut want = 0u64;
            let mut k = 0;
            for i in 0..64 {
                if (m >> i) & 1 == 1 {
                    want |= ((x >> i) & 1) << k;
                    k += 1;
                }
            }
            assert_eq!(pext(x, m), want, "{x:#x} {m:#x}");
        }
    }

    #[test]
    fn streams_and_selections_append_at_any_alignment() {
        let values: Vec<u8> = (0..40u32).map(|i| (i * 73 + 5) as u8).collect();
        let mask: Vec<u8> = (0..40u32).map(|i| (i * 151 + 29) as u8).collect();
        for lead in [0usize, 3, 8] {
            for n in [0usize, 7, 64, 200, 317] {
                let mut w = BitWriter::default();
                (0..lead).for_each(|_| w.push(true));
                w.push_stream(&values, n);
                let mut s = BitWriter::default();
                (0..lead).for_each(|_| s.push(false));
                s.push_selected(&values, &mask, n);
                let (wb, sl) = (w.len(), s.len());
                let (wb_bytes, s_bytes) = (w.into_bytes(), s.into_bytes());
                assert_eq!(wb, lead + n);
                let mut k = lead;
                for i in 0..n {
                    assert_eq!(
                        bit(&wb_bytes, lead + i),
                        bit(&values, i),
                        "lead {lead} n {n} bit {i}"
                    );
                    if bit(&mask, i) {
                        assert_eq!(
                            bit(&s_bytes, k),
                            bit(&values, i),
                            "lead {lead} n {n} selected {i}"
                        );
                        k += 1;
                    }
                }
                assert_eq!(sl, k);
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
