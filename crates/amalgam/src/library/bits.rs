//! Packed bits and fixed-width codes, as the library stores them in `U8` tensors.
//!
//! Bit order: element `i` of a packed stream is bit `i mod 8` (least significant first) of byte
//! `⌊i/8⌋`, as `numpy.packbits(..., bitorder="little")` writes it. A `b`-bit code `i` occupies
//! stream bits `i·b .. i·b + b`, least significant bit first; the last byte is padded with 0.

/// A growing stream of bits.
#[derive(Clone, Debug, Default)]
pub struct BitWriter {
    bytes: Vec<u8>,
    len: usize,
}

impl BitWriter {
    /// A stream with room for `bits` bits.
    pub fn with_capacity(bits: usize) -> BitWriter {
        BitWriter {
            bytes: Vec::with_capacity(bits.div_ceil(8)),
            len: 0,
        }
    }

    /// Append one bit.
    #[inline]
    pub fn push(&mut self, bit: bool) {
        if self.len.is_multiple_of(8) {
            self.bytes.push(0);
        }
        *self.bytes.last_mut().expect("pushed") |= (bit as u8) << (self.len % 8);
        self.len += 1;
    }

    /// Append the low `width` bits of `code`, least significant first.
    #[inline]
    pub fn push_code(&mut self, code: u32, width: u32) {
        for j in 0..width {
            self.push((code >> j) & 1 == 1);
        }
    }

    /// Append a byte-aligned run of 8 bits at once when the stream is aligned, else bit by bit.
    #[inline]
    pub fn push_byte(&mut self, byte: u8) {
        if self.len.is_multiple_of(8) {
            self.bytes.push(byte);
            self.len += 8;
        } else {
            self.push_code(byte as u32, 8);
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

    /// The packed bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Bit `i` of a packed stream (`false` past its end).
#[inline]
pub fn bit(bytes: &[u8], i: usize) -> bool {
    bytes.get(i / 8).is_some_and(|b| (b >> (i % 8)) & 1 == 1)
}

/// The `width`-bit code `i` of a packed stream.
#[inline]
pub fn code(bytes: &[u8], i: usize, width: u32) -> u32 {
    let start = i * width as usize;
    let mut c = 0u32;
    for j in 0..width as usize {
        c |= (bit(bytes, start + j) as u32) << j;
    }
    c
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
    fn counting_ones_stops_at_n() {
        let bytes = [0xff, 0x0f];
        assert_eq!(count_ones(&bytes, 12), 12);
        assert_eq!(count_ones(&bytes, 10), 10);
        assert_eq!(count_ones(&bytes, 3), 3);
    }
}
