//! ggml's storage types and their decoding to f32, block by block, exactly as ggml's reference
//! `dequantize_row_*` functions (and the `gguf` Python package's numpy ports, which transformers
//! uses) compute them: each product in f32, in the same order, so the values are bit-identical.
//!
//! A block of `block_len()` elements takes `block_bytes()` bytes; rows are whole blocks, so any
//! run of whole rows decodes on its own.

use half::{bf16, f16};

/// A ggml tensor type amalgam can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    F64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

/// Elements per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The type with ggml's numeric id `id`, or why it cannot be read.
    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            28 => F64,
            30 => BF16,
            _ => {
                let name = match id {
                    4 | 5 => "Q4_2/Q4_3 (removed from ggml in 2023)",
                    9 => "Q8_1",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => "unknown",
                };
                return Err(format!(
                    "storage type {id} ({name}) is not supported; amalgam reads F32, F16, BF16, \
                     F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K-Q8_K (requantize the file with \
                     llama.cpp's llama-quantize to one of them)"
                ));
            }
        })
    }

    /// The name llama.cpp uses.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            BF16 => "BF16",
            F64 => "F64",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            F64 => 8,
            Q4_0 => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q2_K => 16 + 64 + 2 + 2,
            Q3_K => 32 + 64 + 12 + 2,
            Q4_K => 2 + 2 + 12 + 128,
            Q5_K => 2 + 2 + 12 + 32 + 128,
            Q6_K => 128 + 64 + 16 + 2,
            Q8_K => 4 + 256 + 32,
        }
    }

    /// Whether the type is a block quantization (not a plain float).
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes taken by `n` elements (`n` a multiple of the block length).
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decode `bytes` (whole blocks of `ty`) to f32, appending to `out`.
pub fn decode_append(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    use GgmlType::*;
    let per = ty.block_bytes();
    debug_assert_eq!(bytes.len() % per, 0);
    out.reserve(bytes.len() / per * ty.block_len());
    match ty {
        F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4"))),
        ),
        F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        F64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32),
        ),
        _ => {
            let mut y = [0f32; QK_K];
            let n = ty.block_len();
            for b in bytes.chunks_exact(per) {
                block(ty, b, &mut y[..n]);
                out.extend_from_slice(&y[..n]);
            }
        }
    }
}

/// The six-bit scale and min `j` of a Q4_K/Q5_K block's packed 12 scale bytes (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decode one quantized block `b` into `y`.
fn block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    use GgmlType::*;
    match ty {
        Q4_0 => {
            let d = h(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        Q4_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0xF) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        Q5_0 => {
            let d = h(b, 0);
            let qh = u32::from_le_bytes(b[2..6].try_into().expect("4"));
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        Q5_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qh = u32::from_le_bytes(b[4..8].try_into().expect("4"));
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((qs[j] & 0xF) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }
        Q8_0 => {
            let d = h(b, 0);
            for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                *o = (q as i8) as f32 * d;
            }
        }
        Q2_K => {
            let scales = &b[..16];
            let qs = &b[16..80];
            let (d, min) = (h(b, 80), h(b, 82));
            let mut is = 0;
            for n in 0..2 {
                let q = &qs[n * 32..n * 32 + 32];
                for j in 0..4 {
                    let shift = 2 * j;
                    for half in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let dl = d * (sc & 0xF) as f32;
                        let ml = min * (sc >> 4) as f32;
                        let base = n * 128 + j * 32 + half * 16;
                        for l in 0..16 {
                            let v = (q[l + half * 16] >> shift) & 3;
                            y[base + l] = dl * v as f32 - ml;
                        }
                    }
                }
            }
        }
        Q3_K => {
            let hmask = &b[..32];
            let qs = &b[32..96];
            let raw = &b[96..108];
            let d_all = h(b, 108);
            let aux = |i: usize| u32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().expect("4"));
            let (a0, a1, tmp) = (aux(0), aux(1), aux(2));
            const KMASK1: u32 = 0x0303_0303;
            const KMASK2: u32 = 0x0f0f_0f0f;
            let words = [
                (a0 & KMASK2) | ((tmp & KMASK1) << 4),
                (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
                ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
                ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
            ];
            let mut scales = [0i8; 16];
            for (i, w) in words.iter().enumerate() {
                for (k, byte) in w.to_le_bytes().iter().enumerate() {
                    scales[4 * i + k] = *byte as i8;
                }
            }
            let mut is = 0;
            let mut m = 1u8;
            for n in 0..2 {
                let q = &qs[n * 32..n * 32 + 32];
                for j in 0..4 {
                    let shift = 2 * j;
                    for half in 0..2 {
                        let dl = d_all * (scales[is] as i32 - 32) as f32;
                        is += 1;
                        let base = n * 128 + j * 32 + half * 16;
                        for l in 0..16 {
                            let k = l + half * 16;
                            let low = ((q[k] >> shift) & 3) as i32;
                            let sub = if hmask[k] & m != 0 { 0 } else { 4 };
                            y[base + l] = dl * (low - sub) as f32;
                        }
                    }
                    m <<= 1;
                }
            }
        }
        Q4_K | Q5_K => {
            let (d, min) = (h(b, 0), h(b, 2));
            let sc = &b[4..16];
            let (qh, ql) = if ty == Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..4 {
                let (s1, m1) = scale_min_k4(2 * j, sc);
                let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                let (d1, m1) = (d * s1 as f32, min * m1 as f32);
                let (d2, m2) = (d * s2 as f32, min * m2 as f32);
                let q = &ql[j * 32..j * 32 + 32];
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                for l in 0..32 {
                    let (hi1, hi2) = match qh {
                        Some(qh) => (
                            if qh[l] & u1 != 0 { 16 } else { 0 },
                            if qh[l] & u2 != 0 { 16 } else { 0 },
                        ),
                        None => (0, 0),
                    };
                    y[j * 64 + l] = d1 * ((q[l] & 0xF) + hi1) as f32 - m1;
                    y[j * 64 + 32 + l] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
                }
            }
        }
        Q6_K => {
            let ql = &b[..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = h(b, 208);
            for n in 0..2 {
                let (ql, qh) = (&ql[n * 64..n * 64 + 64], &qh[n * 32..n * 32 + 32]);
                let sc = &sc[n * 8..n * 8 + 8];
                let y = &mut y[n * 128..n * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    let s = |k: usize| d * (sc[k] as i8) as f32;
                    y[l] = s(is) * q1 as f32;
                    y[l + 32] = s(is + 2) * q2 as f32;
                    y[l + 64] = s(is + 4) * q3 as f32;
                    y[l + 96] = s(is + 6) * q4 as f32;
                }
            }
        }
        Q8_K => {
            let d = f32::from_le_bytes(b[..4].try_into().expect("4"));
            for (o, &q) in y.iter_mut().zip(&b[4..260]) {
                *o = d * (q as i8) as f32;
            }
        }
        F32 | F16 | BF16 | F64 => unreachable!("plain floats are decoded in bulk"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_0_decode_as_ggml_defines_them() {
        // d = 0.5 (f16 0x3800), quants 0..31 - 16.
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = Vec::new();
        decode_append(GgmlType::Q8_0, &b, &mut out);
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        assert_eq!(out, want);

        // d = 2: element j is the low nibble of byte j, element j + 16 its high nibble.
        let mut b = vec![0x00, 0x40];
        b.extend((0..16).map(|j| (j as u8) | (15 - j as u8) << 4));
        out.clear();
        decode_append(GgmlType::Q4_0, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn block_sizes_match_ggml() {
        // ggml.c's type_traits: (blck_size, type_size).
        for (ty, len, bytes) in [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q2_K, 256, 84),
            (GgmlType::Q3_K, 256, 110),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
            (GgmlType::Q8_K, 256, 292),
        ] {
            assert_eq!((ty.block_len(), ty.block_bytes()), (len, bytes), "{ty:?}");
        }
    }
}
