//! Weight encodings: exact byte layouts, scalar reference decoders and encoders.
//!
//! These functions are the oracle every kernel is tested against. They follow the reference
//! implementations byte for byte (FORMATS.md §3): ggml's `*_ref` quantizers for the Q and TQ
//! formats, bitnet.cpp's `quantize_i2_s` for I2_S. Nothing here is fast; everything is exact.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A weight encoding the engine can compute with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Encoding {
    F32,
    F16,
    BF16,
    /// 32 elements: f16 scale `d`, 32 × i8. Value = q·d.
    Q8_0,
    /// 32 elements: f16 scale `d`, 16 bytes of 4-bit codes. Value = (q − 8)·d.
    Q4_0,
    /// 32 elements: f16 `d`, f16 `m`, 16 bytes of 4-bit codes. Value = q·d + m.
    Q4_1,
    /// 256 ternary elements in 54 bytes (base-3 packing), f16 scale at the end.
    TQ1_0,
    /// 256 ternary elements in 66 bytes (2 bits each), f16 scale at the end.
    TQ2_0,
    /// bitnet.cpp's I2_S: 2-bit codes in flattened 128-element / 32-byte blocks, then one f32
    /// scale for the whole tensor and 28 bytes of padding.
    I2S,
}

/// Number of trailing bytes of an I2_S tensor: the f32 scale plus 28 bytes of padding.
pub const I2S_TRAILER_BYTES: usize = 32;
/// Elements per I2_S block.
pub const I2S_BLOCK: usize = 128;
/// Elements per TQ1_0/TQ2_0 super-block.
pub const QK_K: usize = 256;
/// Elements per Q8_0/Q4_0/Q4_1 block.
pub const QK: usize = 32;

/// What went wrong while encoding or decoding weights.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodingError {
    #[error("{encoding} needs a multiple of {block} elements, got {n}")]
    NotBlockMultiple {
        encoding: Encoding,
        n: u64,
        block: usize,
    },
    #[error("{n} elements of {encoding} do not fit in 64-bit byte counts")]
    TooLarge { encoding: Encoding, n: u64 },
    #[error("{encoding} data for {n} elements must be {expected} bytes, got {actual}")]
    ByteLength {
        encoding: Encoding,
        n: u64,
        expected: u64,
        actual: usize,
    },
    #[error("{encoding} element {index} has code {code}, which no writer produces")]
    InvalidCode {
        encoding: Encoding,
        index: u64,
        code: u8,
    },
    #[error("value {value} at element {index} is not ternary (expected one of -s, 0, +s)")]
    NotTernary { index: u64, value: f32 },
    #[error(
        "TQ2_0 block {block} has scale {found}, but I2_S holds one scale per tensor ({expected} in block 0)"
    )]
    ScaleMismatch {
        block: u64,
        expected: f32,
        found: f32,
    },
    #[error("{0} is not a ternary encoding")]
    NotTernaryEncoding(Encoding),
    #[error("element range {start}..{end} is outside a tensor of {n} elements")]
    Range { start: u64, end: u64, n: u64 },
}

impl Encoding {
    /// Every encoding, in a fixed order.
    pub const ALL: [Encoding; 9] = [
        Encoding::F32,
        Encoding::F16,
        Encoding::BF16,
        Encoding::Q8_0,
        Encoding::Q4_0,
        Encoding::Q4_1,
        Encoding::TQ1_0,
        Encoding::TQ2_0,
        Encoding::I2S,
    ];

    /// The lower-case name used in the IR text form and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::BF16 => "bf16",
            Encoding::Q8_0 => "q8_0",
            Encoding::Q4_0 => "q4_0",
            Encoding::Q4_1 => "q4_1",
            Encoding::TQ1_0 => "tq1_0",
            Encoding::TQ2_0 => "tq2_0",
            Encoding::I2S => "i2_s",
        }
    }

    /// Parses a name as printed by [`Encoding::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<Encoding> {
        Encoding::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block: the granularity a tensor's element count must respect.
    pub fn block_elems(self) -> usize {
        match self {
            Encoding::F32 | Encoding::F16 | Encoding::BF16 => 1,
            Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1 => QK,
            Encoding::TQ1_0 | Encoding::TQ2_0 => QK_K,
            Encoding::I2S => I2S_BLOCK,
        }
    }

    /// Bytes per block (for I2_S, without the per-tensor trailer).
    pub fn block_bytes(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 | Encoding::BF16 => 2,
            Encoding::Q8_0 => 34,
            Encoding::Q4_0 => 18,
            Encoding::Q4_1 => 20,
            Encoding::TQ1_0 => 54,
            Encoding::TQ2_0 => 66,
            Encoding::I2S => 32,
        }
    }

    /// True for the ternary encodings (weights in {−1, 0, +1} times a scale).
    pub fn is_ternary(self) -> bool {
        matches!(self, Encoding::TQ1_0 | Encoding::TQ2_0 | Encoding::I2S)
    }

    /// Exact byte size of a tensor of `n` elements.
    pub fn byte_size(self, n: u64) -> Result<u64, EncodingError> {
        let block = self.block_elems() as u64;
        if !n.is_multiple_of(block) {
            return Err(EncodingError::NotBlockMultiple {
                encoding: self,
                n,
                block: block as usize,
            });
        }
        let extra = if self == Encoding::I2S {
            I2S_TRAILER_BYTES as u64
        } else {
            0
        };
        (n / block)
            .checked_mul(self.block_bytes() as u64)
            .and_then(|b| b.checked_add(extra))
            .ok_or(EncodingError::TooLarge { encoding: self, n })
    }

    fn check_len(self, data: &[u8], n: u64) -> Result<(), EncodingError> {
        let expected = self.byte_size(n)?;
        if data.len() as u64 != expected {
            return Err(EncodingError::ByteLength {
                encoding: self,
                n,
                expected,
                actual: data.len(),
            });
        }
        Ok(())
    }

    /// Decodes a whole tensor of `n` elements to f32.
    pub fn decode(self, data: &[u8], n: u64) -> Result<Vec<f32>, EncodingError> {
        let mut out = vec![0.0f32; n as usize];
        self.decode_range(data, n, 0, &mut out)?;
        Ok(out)
    }

    /// Rows `first ..` of a `[rows, k]` matrix in this encoding (`data`, the whole matrix)
    /// re-encoded to `target` into `out`, as many rows as it holds (whole rows of `target`):
    /// each row decoded to f32, then encoded as [`Encoding::encode`] does.
    pub fn reencode_rows(
        self,
        data: &[u8],
        rows: u64,
        k: u64,
        first: u64,
        target: Encoding,
        out: &mut [u8],
    ) -> Result<(), EncodingError> {
        let row_out = target.byte_size(k)? as usize;
        if row_out == 0 || !out.len().is_multiple_of(row_out) {
            return Err(EncodingError::ByteLength {
                encoding: target,
                n: k,
                expected: row_out as u64,
                actual: out.len(),
            });
        }
        let n = rows.checked_mul(k).ok_or(EncodingError::TooLarge {
            encoding: self,
            n: u64::MAX,
        })?;
        let mut row = vec![0f32; k as usize];
        for (j, dst) in out.chunks_exact_mut(row_out).enumerate() {
            self.decode_range(data, n, (first + j as u64) * k, &mut row)?;
            dst.copy_from_slice(&target.encode(&row)?);
        }
        Ok(())
    }

    /// Decodes elements `start .. start + out.len()` of a tensor of `n` elements (flattened
    /// order). `data` is the whole tensor.
    pub fn decode_range(
        self,
        data: &[u8],
        n: u64,
        start: u64,
        out: &mut [f32],
    ) -> Result<(), EncodingError> {
        self.check_len(data, n)?;
        let end = start + out.len() as u64;
        if end > n {
            return Err(EncodingError::Range { start, end, n });
        }
        let block = self.block_elems() as u64;
        let first_block = start / block;
        let last_block = end.div_ceil(block);
        // The largest block (QK_K) on the stack: decoding rows allocates nothing.
        let mut block_buf = [0.0f32; QK_K];
        let buf = &mut block_buf[..block as usize];
        let i2s_scale = if self == Encoding::I2S {
            i2s_scale(data, n)
        } else {
            0.0
        };
        for b in first_block..last_block {
            let bb = self.block_bytes() as u64;
            let bytes = &data[(b * bb) as usize..((b + 1) * bb) as usize];
            match self {
                Encoding::F32 => buf[0] = f32::from_le_bytes(bytes.try_into().unwrap()),
                Encoding::F16 => buf[0] = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
                Encoding::BF16 => buf[0] = bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
                Encoding::Q8_0 => decode_q8_0(bytes, buf),
                Encoding::Q4_0 => decode_q4_0(bytes, buf),
                Encoding::Q4_1 => decode_q4_1(bytes, buf),
                Encoding::TQ1_0 | Encoding::TQ2_0 | Encoding::I2S => {
                    let mut codes = [0u8; QK_K];
                    let codes = &mut codes[..block as usize];
                    let scale = match self {
                        Encoding::TQ1_0 => tq1_0_block_codes(bytes, codes),
                        Encoding::TQ2_0 => tq2_0_block_codes(bytes, codes),
                        _ => {
                            i2s_block_codes(bytes, codes);
                            i2s_scale
                        }
                    };
                    for (i, (&c, y)) in codes.iter().zip(buf.iter_mut()).enumerate() {
                        if c > 2 {
                            return Err(EncodingError::InvalidCode {
                                encoding: self,
                                index: b * block + i as u64,
                                code: c,
                            });
                        }
                        *y = (c as f32 - 1.0) * scale;
                    }
                }
            }
            let lo = (b * block).max(start);
            let hi = ((b + 1) * block).min(end);
            let src = &buf[(lo - b * block) as usize..(hi - b * block) as usize];
            out[(lo - start) as usize..(hi - start) as usize].copy_from_slice(src);
        }
        Ok(())
    }

    /// Encodes `values` with the reference quantizer of this encoding.
    ///
    /// For the ternary encodings the values must already be ternary per scale group (see
    /// [`ternarize_absmean`]); I2_S takes the tensor-wide `max |x|` as its scale exactly as
    /// bitnet.cpp's `quantize_i2_s` does, TQ1_0/TQ2_0 the per-block `max |x|` as llama.cpp does.
    pub fn encode(self, values: &[f32]) -> Result<Vec<u8>, EncodingError> {
        let n = values.len() as u64;
        let mut out = vec![0u8; self.byte_size(n)? as usize];
        match self {
            Encoding::F32 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            Encoding::F16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            Encoding::BF16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
            Encoding::Q8_0 => blockwise(values, &mut out, QK, 34, encode_q8_0),
            Encoding::Q4_0 => blockwise(values, &mut out, QK, 18, encode_q4_0),
            Encoding::Q4_1 => blockwise(values, &mut out, QK, 20, encode_q4_1),
            Encoding::TQ2_0 => blockwise(values, &mut out, QK_K, 66, encode_tq2_0),
            Encoding::TQ1_0 => blockwise(values, &mut out, QK_K, 54, encode_tq1_0),
            Encoding::I2S => encode_i2s(values, &mut out),
        }
        Ok(out)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn blockwise(values: &[f32], out: &mut [u8], qk: usize, bytes: usize, f: fn(&[f32], &mut [u8])) {
    for (x, y) in values.chunks_exact(qk).zip(out.chunks_exact_mut(bytes)) {
        f(x, y);
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn put_f16(bytes: &mut [u8], at: usize, v: f32) {
    bytes[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// C's `roundf`/`lroundf`: round half away from zero.
fn round_away(x: f32) -> f32 {
    x.round()
}

// ---------------------------------------------------------------------------------------------
// Q8_0, Q4_0, Q4_1 (ggml-common.h, ggml-quants.c `quantize_row_*_ref` / `dequantize_row_*`)

fn decode_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (i, y) in y.iter_mut().enumerate() {
        *y = b[2 + i] as i8 as f32 * d;
    }
}

fn encode_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for (i, v) in x.iter().enumerate() {
        b[2 + i] = round_away(v * id) as i8 as u8;
    }
}

fn decode_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn encode_q4_0(x: &[f32], b: &mut [u8]) {
    // The value of largest magnitude, with its sign.
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

fn decode_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

fn encode_q4_1(x: &[f32], b: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

// ---------------------------------------------------------------------------------------------
// TQ2_0 and TQ1_0 (llama.cpp ggml-quants.c)

/// Codes 0..=2 of one TQ2_0 block and its scale.
fn tq2_0_block_codes(b: &[u8], codes: &mut [u8]) -> f32 {
    for (e, c) in codes.iter_mut().enumerate() {
        let (j, l, m) = (e / 128, (e % 128) / 32, e % 32);
        *c = (b[32 * j + m] >> (2 * l)) & 3;
    }
    f16_at(b, 64)
}

fn ternary_code(v: f32, id: f32) -> u8 {
    (round_away(v * id) as i32 + 1) as u8
}

fn encode_tq2_0(x: &[f32], b: &mut [u8]) {
    let d = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (e, &v) in x.iter().enumerate() {
        let (j, l, m) = (e / 128, (e % 128) / 32, e % 32);
        b[32 * j + m] |= (ternary_code(v, id) & 3) << (2 * l);
    }
    put_f16(b, 64, d);
}

const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];

/// Trit `n` (0 = most significant) of a TQ1_0 byte.
fn tq1_trit(byte: u8, n: usize) -> u8 {
    let q = byte.wrapping_mul(POW3[n]);
    ((q as u16 * 3) >> 8) as u8
}

/// Element index of trit `n` of TQ1_0 byte `byte_index` within a block.
fn tq1_0_element(byte_index: usize, n: usize) -> usize {
    match byte_index {
        0..32 => n * 32 + byte_index,
        32..48 => 160 + n * 16 + (byte_index - 32),
        _ => 240 + n * 4 + (byte_index - 48),
    }
}

fn tq1_0_block_codes(b: &[u8], codes: &mut [u8]) -> f32 {
    for (i, &byte) in b[..48].iter().enumerate() {
        for n in 0..5 {
            codes[tq1_0_element(i, n)] = tq1_trit(byte, n);
        }
    }
    for (j, &byte) in b[48..52].iter().enumerate() {
        for n in 0..4 {
            codes[tq1_0_element(48 + j, n)] = tq1_trit(byte, n);
        }
    }
    f16_at(b, 52)
}

fn encode_tq1_0(x: &[f32], b: &mut [u8]) {
    let d = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (i, byte) in b[..52].iter_mut().enumerate() {
        let trits = if i < 48 { 5 } else { 4 };
        let mut q: u8 = 0;
        for n in 0..trits {
            q = q
                .wrapping_mul(3)
                .wrapping_add(ternary_code(x[tq1_0_element(i, n)], id));
        }
        if trits == 4 {
            // The fifth, implicit trit is 0: shift the first value to the most significant trit.
            q = q.wrapping_mul(3);
        }
        // Ceiling division by 3^5 = 243, so that decoding by multiplication is exact.
        *byte = (q as u16 * 256).div_ceil(243) as u8;
    }
    put_f16(b, 52, d);
}

// ---------------------------------------------------------------------------------------------
// I2_S (bitnet.cpp src/ggml-bitnet-mad.cpp `quantize_i2_s`; FORMATS.md §3.3)

/// The per-tensor f32 scale of an I2_S tensor of `n` elements (`data` already length-checked).
pub fn i2s_scale(data: &[u8], n: u64) -> f32 {
    let at = (n / 4) as usize;
    f32::from_le_bytes(data[at..at + 4].try_into().unwrap())
}

fn i2s_block_codes(b: &[u8], codes: &mut [u8]) {
    for (j, &byte) in b.iter().enumerate() {
        for g in 0..4 {
            codes[32 * g + j] = (byte >> (6 - 2 * g)) & 3;
        }
    }
}

fn encode_i2s(x: &[f32], out: &mut [u8]) {
    let n = x.len();
    let max = x.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    for (i, &v) in x.iter().enumerate() {
        let code: u8 = if (v as f64).abs() < 1e-6 {
            1
        } else if (v as f64) * max > 0.0 {
            2
        } else {
            0
        };
        let (block, j) = (i / I2S_BLOCK, i % I2S_BLOCK);
        out[block * 32 + j % 32] |= code << (6 - 2 * (j / 32));
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&(max as f32).to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Ternary helpers

/// A ternary tensor: codes in {0, 1, 2} meaning {−1, 0, +1}, with one scale per group.
#[derive(Clone, Debug, PartialEq)]
pub struct Ternary {
    pub codes: Vec<u8>,
    /// Elements per scale: the whole tensor for I2_S, 256 for TQ1_0/TQ2_0.
    pub group: usize,
    pub scales: Vec<f32>,
}

impl Ternary {
    /// The signed values {−1, 0, +1} of every element.
    pub fn signs(&self) -> impl Iterator<Item = i8> + '_ {
        self.codes.iter().map(|&c| c as i8 - 1)
    }
}

/// The codes (0..=2, unchecked) and per-block scales of whole TQ1_0/TQ2_0 blocks `data`.
fn tq_blocks_codes(encoding: Encoding, data: &[u8], codes: &mut [u8], scales: &mut [f32]) {
    let bb = encoding.block_bytes();
    for ((chunk, c), scale) in data
        .chunks_exact(bb)
        .zip(codes.chunks_exact_mut(QK_K))
        .zip(scales.iter_mut())
    {
        *scale = if encoding == Encoding::TQ2_0 {
            tq2_0_block_codes(chunk, c)
        } else {
            tq1_0_block_codes(chunk, c)
        };
    }
}

/// The ternary values (−1, 0, 1) and per-block scales of one TQ1_0/TQ2_0 row of
/// `values.len()` elements (a whole number of blocks), into buffers the caller reuses;
/// an invalid code is an error naming its index in the row.
pub fn tq_row_values(
    encoding: Encoding,
    data: &[u8],
    codes: &mut [u8],
    values: &mut [i32],
    scales: &mut [f32],
) -> Result<(), EncodingError> {
    let n = values.len() as u64;
    encoding.check_len(data, n)?;
    if !matches!(encoding, Encoding::TQ1_0 | Encoding::TQ2_0) {
        return Err(EncodingError::NotTernaryEncoding(encoding));
    }
    tq_blocks_codes(encoding, data, codes, scales);
    for (i, (v, &c)) in values.iter_mut().zip(codes.iter()).enumerate() {
        if c > 2 {
            return Err(EncodingError::InvalidCode {
                encoding,
                index: i as u64,
                code: c,
            });
        }
        *v = c as i32 - 1;
    }
    Ok(())
}

/// Extracts the ternary codes and scales of a TQ1_0, TQ2_0 or I2_S tensor, checking every code.
pub fn ternary_codes(encoding: Encoding, data: &[u8], n: u64) -> Result<Ternary, EncodingError> {
    encoding.check_len(data, n)?;
    let n = n as usize;
    let mut codes = vec![0u8; n];
    let mut scales = Vec::new();
    let group = match encoding {
        Encoding::I2S => {
            for (b, chunk) in data[..n / 4].chunks_exact(32).enumerate() {
                i2s_block_codes(chunk, &mut codes[b * I2S_BLOCK..(b + 1) * I2S_BLOCK]);
            }
            scales.push(i2s_scale(data, n as u64));
            n
        }
        Encoding::TQ2_0 | Encoding::TQ1_0 => {
            scales.resize(n / QK_K, 0.0);
            tq_blocks_codes(encoding, data, &mut codes, &mut scales);
            QK_K
        }
        _ => return Err(EncodingError::NotTernaryEncoding(encoding)),
    };
    if let Some(i) = codes.iter().position(|&c| c > 2) {
        return Err(EncodingError::InvalidCode {
            encoding,
            index: i as u64,
            code: codes[i],
        });
    }
    Ok(Ternary {
        codes,
        group,
        scales,
    })
}

/// Absmean ternarization (BitNet b1.58; bitnet.cpp's `preprocess-huggingface-bitnet.py`):
/// `s = 1 / max(mean |W|, 1e-5)`, `W' = clamp(round(W·s), −1, 1) / s`.
/// Returns the ternarized values, i.e. ternary × (1/s).
pub fn ternarize_absmean(values: &[f32]) -> Vec<f32> {
    if values.is_empty() {
        return Vec::new();
    }
    let mean = values.iter().map(|v| v.abs() as f64).sum::<f64>() / values.len() as f64;
    let s = (1.0 / mean.max(1e-5)) as f32;
    values
        .iter()
        .map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) / s)
        .collect()
}

/// True when every value is 0 or ±m for one magnitude m (already ternary × scale).
pub fn is_ternary(values: &[f32]) -> bool {
    let mut mag: Option<f32> = None;
    for &v in values {
        let a = v.abs();
        if a == 0.0 {
            continue;
        }
        match mag {
            None => mag = Some(a),
            Some(m) if m == a => {}
            Some(_) => return false,
        }
    }
    true
}

/// Repacks an I2_S tensor as TQ2_0 without touching a single ternary code. TQ2_0 stores its
/// scale as f16 per 256-element block, so the tensor scale is rounded to f16 (exact when the
/// scale is representable, as it is for any file that came from TQ2_0).
pub fn repack_i2s_to_tq2_0(data: &[u8], n: u64) -> Result<Vec<u8>, EncodingError> {
    Encoding::TQ2_0.byte_size(n)?;
    let t = ternary_codes(Encoding::I2S, data, n)?;
    let d = f16::from_f32(t.scales[0]);
    let mut out = vec![0u8; Encoding::TQ2_0.byte_size(n)? as usize];
    for (codes, b) in t.codes.chunks_exact(QK_K).zip(out.chunks_exact_mut(66)) {
        for (e, &c) in codes.iter().enumerate() {
            let (j, l, m) = (e / 128, (e % 128) / 32, e % 32);
            b[32 * j + m] |= c << (2 * l);
        }
        b[64..66].copy_from_slice(&d.to_le_bytes());
    }
    Ok(out)
}

/// Repacks a TQ2_0 tensor as I2_S. I2_S has one scale per tensor, so every block must carry the
/// same scale (all-zero blocks may carry any); otherwise the repack would change values.
pub fn repack_tq2_0_to_i2s(data: &[u8], n: u64) -> Result<Vec<u8>, EncodingError> {
    Encoding::I2S.byte_size(n)?;
    let t = ternary_codes(Encoding::TQ2_0, data, n)?;
    let mut scale: Option<(u64, f32)> = None;
    for (b, (&d, codes)) in t.scales.iter().zip(t.codes.chunks_exact(QK_K)).enumerate() {
        if codes.iter().all(|&c| c == 1) {
            continue;
        }
        match scale {
            None => scale = Some((b as u64, d)),
            Some((_, s)) if s == d => {}
            Some((_, s)) => {
                return Err(EncodingError::ScaleMismatch {
                    block: b as u64,
                    expected: s,
                    found: d,
                });
            }
        }
    }
    let scale = scale.map_or(0.0, |(_, s)| s);
    let mut out = vec![0u8; Encoding::I2S.byte_size(n)? as usize];
    for (i, &c) in t.codes.iter().enumerate() {
        let (block, j) = (i / I2S_BLOCK, i % I2S_BLOCK);
        out[block * 32 + j % 32] |= c << (6 - 2 * (j / 32));
    }
    let at = (n / 4) as usize;
    out[at..at + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn ternary_values(n: usize, beta: f32, seed: u64) -> Vec<f32> {
        let mut r = lcg(seed);
        (0..n)
            .map(|_| {
                let v = r();
                if v < -0.33 {
                    -beta
                } else if v > 0.33 {
                    beta
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(Encoding::F32.byte_size(10).unwrap(), 40);
        assert_eq!(Encoding::BF16.byte_size(3).unwrap(), 6);
        assert_eq!(Encoding::Q8_0.byte_size(64).unwrap(), 68);
        assert_eq!(Encoding::Q4_0.byte_size(64).unwrap(), 36);
        assert_eq!(
            Encoding::Q4_1.byte_size(576 * 1536).unwrap(),
            576 * 1536 / 32 * 20
        );
        assert_eq!(Encoding::TQ1_0.byte_size(512).unwrap(), 108);
        assert_eq!(Encoding::TQ2_0.byte_size(512).unwrap(), 132);
        // The 2B-4T shapes quoted in FORMATS.md §4.3.
        assert_eq!(Encoding::I2S.byte_size(2560 * 2560).unwrap(), 1_638_432);
        assert_eq!(Encoding::I2S.byte_size(2560 * 640).unwrap(), 409_632);
        assert_eq!(Encoding::I2S.byte_size(2560 * 6912).unwrap(), 4_423_712);
        assert!(matches!(
            Encoding::Q8_0.byte_size(33),
            Err(EncodingError::NotBlockMultiple { block: 32, .. })
        ));
        assert!(Encoding::I2S.byte_size(64).is_err());
    }

    #[test]
    fn names_round_trip() {
        for e in Encoding::ALL {
            assert_eq!(Encoding::from_name(e.name()), Some(e));
        }
        assert_eq!(Encoding::from_name("I2_S"), Some(Encoding::I2S));
        assert_eq!(Encoding::from_name("q4_k"), None);
    }

    #[test]
    fn i2s_layout_is_128_32() {
        // Element 128b + 32g + j lives in byte 32b + j at shift 6 − 2g.
        let mut v = vec![0.0f32; 256];
        v[0] = 1.0; // block 0, group 0, byte 0, bits 7..6 -> code 2
        v[33] = -1.0; // block 0, group 1, byte 1, bits 5..4 -> code 0
        v[128 + 127] = 1.0; // block 1, group 3, byte 31, bits 1..0 -> code 2
        let bytes = Encoding::I2S.encode(&v).unwrap();
        assert_eq!(bytes.len(), 64 + 32);
        assert_eq!(bytes[0], 0b10_01_01_01);
        assert_eq!(bytes[1], 0b01_00_01_01);
        assert_eq!(bytes[32 + 31], 0b01_01_01_10);
        assert_eq!(bytes[2], 0b01_01_01_01);
        assert_eq!(f32::from_le_bytes(bytes[64..68].try_into().unwrap()), 1.0);
        assert!(bytes[68..].iter().all(|&b| b == 0));
        assert_eq!(Encoding::I2S.decode(&bytes, 256).unwrap(), v);
    }

    #[test]
    fn i2s_code_3_is_refused() {
        let mut bytes = Encoding::I2S.encode(&[0.0; 128]).unwrap();
        bytes[5] = 0b11_01_01_01;
        let err = Encoding::I2S.decode(&bytes, 128).unwrap_err();
        assert_eq!(
            err,
            EncodingError::InvalidCode {
                encoding: Encoding::I2S,
                index: 5,
                code: 3
            }
        );
    }

    #[test]
    fn ternary_encodings_round_trip() {
        let beta = 0.0123f32;
        let v = ternary_values(1024, beta, 7);
        for enc in [Encoding::I2S, Encoding::TQ2_0, Encoding::TQ1_0] {
            let bytes = enc.encode(&v).unwrap();
            let back = enc.decode(&bytes, 1024).unwrap();
            let beta_stored = if enc == Encoding::I2S {
                beta
            } else {
                f16::from_f32(beta).to_f32()
            };
            for (a, b) in v.iter().zip(&back) {
                assert_eq!(
                    a.signum() * beta_stored * (a.abs() > 0.0) as u8 as f32,
                    *b,
                    "{enc}"
                );
            }
            let t = ternary_codes(enc, &bytes, 1024).unwrap();
            let signs: Vec<i8> = t.signs().collect();
            let expect: Vec<i8> = v.iter().map(|x| (x / beta).round() as i8).collect();
            assert_eq!(signs, expect, "{enc}");
        }
    }

    #[test]
    fn tq1_0_trits_pack_exactly() {
        // Every byte value a 5-trit group can produce decodes back to its trits.
        for q in 0u16..243 {
            let byte = (q * 256).div_ceil(243) as u8;
            let mut rest = q;
            for n in (0..5).rev() {
                assert_eq!(tq1_trit(byte, n) as u16, rest % 3, "q={q} n={n}");
                rest /= 3;
            }
        }
    }

    #[test]
    fn decode_range_matches_whole_decode() {
        let mut r = lcg(3);
        let v: Vec<f32> = (0..512).map(|_| r()).collect();
        for enc in [
            Encoding::F16,
            Encoding::Q8_0,
            Encoding::Q4_0,
            Encoding::Q4_1,
        ] {
            let bytes = enc.encode(&v).unwrap();
            let all = enc.decode(&bytes, 512).unwrap();
            let mut part = vec![0.0; 77];
            enc.decode_range(&bytes, 512, 45, &mut part).unwrap();
            assert_eq!(&all[45..122], &part[..], "{enc}");
        }
    }

    #[test]
    fn q_formats_quantize_like_ggml() {
        let mut x = [0.0f32; 32];
        for (i, v) in x.iter_mut().enumerate() {
            *v = i as f32 - 10.0;
        }
        // Q8_0: d = 21/127, q = roundf(x·127/21).
        let b = Encoding::Q8_0.encode(&x).unwrap();
        assert_eq!(f16_at(&b, 0), f16::from_f32(21.0 / 127.0).to_f32());
        assert_eq!(b[2] as i8, -60);
        assert_eq!(b[2 + 31] as i8, 127);
        // Q4_0: the largest magnitude is 21 (positive): d = −21/8.
        let b = Encoding::Q4_0.encode(&x).unwrap();
        assert_eq!(f16_at(&b, 0), f16::from_f32(-21.0 / 8.0).to_f32());
        // x = −10 -> −10·(−8/21) + 8.5 = 12.309 -> 12; x = 21 -> −8 + 8.5 -> 0.
        assert_eq!(b[2] & 0x0f, 12);
        assert_eq!(b[2 + 15] >> 4, 0);
        // Q4_1: min −10, d = 31/15.
        let b = Encoding::Q4_1.encode(&x).unwrap();
        assert_eq!(f16_at(&b, 2), -10.0);
        let y = Encoding::Q4_1.decode(&b, 32).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 31.0 / 15.0 / 2.0 + 0.01, "{a} {b}");
        }
    }

    #[test]
    fn absmean_is_idempotent_on_the_ternary_pattern() {
        let mut r = lcg(11);
        let w: Vec<f32> = (0..4096).map(|_| r() * 0.05).collect();
        let t = ternarize_absmean(&w);
        assert!(is_ternary(&t));
        assert!(!is_ternary(&w));
        let signs = |v: &[f32]| {
            v.iter()
                .map(|x| x.signum() as i8 * (*x != 0.0) as i8)
                .collect::<Vec<_>>()
        };
        assert_eq!(signs(&ternarize_absmean(&t)), signs(&t));
    }

    #[test]
    fn i2s_tq2_0_repack_is_lossless() {
        let beta = 0.5f32; // representable in f16
        let v = ternary_values(2048, beta, 5);
        let i2s = Encoding::I2S.encode(&v).unwrap();
        let tq2 = Encoding::TQ2_0.encode(&v).unwrap();
        assert_eq!(repack_i2s_to_tq2_0(&i2s, 2048).unwrap(), tq2);
        assert_eq!(repack_tq2_0_to_i2s(&tq2, 2048).unwrap(), i2s);
        // A TQ2_0 tensor whose blocks disagree on the scale cannot become I2_S.
        let mut w = v.clone();
        for x in &mut w[256..512] {
            *x *= 2.0;
        }
        let tq2 = Encoding::TQ2_0.encode(&w).unwrap();
        assert!(matches!(
            repack_tq2_0_to_i2s(&tq2, 2048),
            Err(EncodingError::ScaleMismatch { block: 1, .. })
        ));
    }

    /// Builds a Q-format block by hand: the f16 fields as raw little-endian bits, then `rest`.
    fn block(halves: &[u16], rest: &[u8]) -> Vec<u8> {
        let mut b: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn rows_reencode_as_each_row_would_encode() {
        let mut next = lcg(11);
        let values: Vec<f32> = (0..4 * 64).map(|_| next()).collect();
        let f16 = Encoding::F16.encode(&values).unwrap();
        let row = Encoding::Q4_1.byte_size(64).unwrap() as usize;
        assert_eq!(row, 40);
        // Rows 1 and 2 of the four.
        let mut out = vec![0u8; 2 * row];
        Encoding::F16
            .reencode_rows(&f16, 4, 64, 1, Encoding::Q4_1, &mut out)
            .unwrap();
        for (j, got) in out.chunks_exact(row).enumerate() {
            let r = 1 + j;
            let decoded: Vec<f32> = values[r * 64..(r + 1) * 64]
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            assert_eq!(got, Encoding::Q4_1.encode(&decoded).unwrap(), "row {r}");
        }
        // Part of a row, and rows past the matrix, are errors.
        let e = Encoding::F16
            .reencode_rows(&f16, 4, 64, 0, Encoding::Q4_1, &mut out[..row + 1])
            .unwrap_err();
        assert!(e.to_string().contains("must be 40 bytes, got 41"), "{e}");
        assert!(
            Encoding::F16
                .reencode_rows(&f16, 4, 64, 3, Encoding::Q4_1, &mut out)
                .is_err()
        );
    }

    #[test]
    fn bf16_decodes_exactly_from_hand_made_bytes() {
        // BF16 is the high half of an f32: 0x3f80 = 1.0, 0xc0c0 = −6.0, 0x4049 = 3.140625,
        // 0x8000 = −0.0, 0x0001 = 2^−133 (an f32 subnormal), 0x7f80 = +∞, 0x3f81 = 1 + 2^−7.
        let bytes = [
            0x80, 0x3f, 0xc0, 0xc0, 0x49, 0x40, 0x00, 0x80, 0x01, 0x00, 0x80, 0x7f, 0x81, 0x3f,
        ];
        let v = Encoding::BF16.decode(&bytes, 7).unwrap();
        let expected = [
            1.0,
            -6.0,
            3.140625,
            -0.0,
            f32::from_bits(0x0001_0000),
            f32::INFINITY,
            1.0078125,
        ];
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&v), bits(&expected));
        assert_eq!(expected[4], 2f32.powi(-133));
        let mut part = [0.0f32; 2];
        Encoding::BF16
            .decode_range(&bytes, 7, 1, &mut part)
            .unwrap();
        assert_eq!(part, [-6.0, 3.140625]);
    }

    #[test]
    fn q8_0_decodes_exactly_from_hand_made_bytes() {
        // Block 0: d = 0.5 (f16 0x3800), q = i − 16 except q0 = −128 and q31 = 127.
        let mut qs: Vec<u8> = (0..32).map(|i| (i as i8 - 16) as u8).collect();
        qs[0] = 0x80;
        qs[31] = 0x7f;
        let mut bytes = block(&[0x3800], &qs);
        // Block 1: d = 2^−24 (the smallest f16 subnormal, 0x0001), q = 3, −3, 0, 0, …
        let mut qs1 = [0u8; 32];
        qs1[0] = 3;
        qs1[1] = (-3i8) as u8;
        bytes.extend(block(&[0x0001], &qs1));
        assert_eq!(bytes.len(), 68);
        let v = Encoding::Q8_0.decode(&bytes, 64).unwrap();
        assert_eq!(v[0], -64.0);
        assert_eq!(v[1], -7.5);
        assert_eq!(v[16], 0.0);
        assert_eq!(v[17], 0.5);
        assert_eq!(v[30], 7.0);
        assert_eq!(v[31], 63.5);
        for (i, &x) in v.iter().enumerate().take(31).skip(1) {
            assert_eq!(x, (i as f32 - 16.0) * 0.5, "element {i}");
        }
        assert_eq!(v[32], 3.0 * 2f32.powi(-24));
        assert_eq!(v[33], -3.0 * 2f32.powi(-24));
        assert!(v[34..].iter().all(|&x| x == 0.0));
        // A range across the block boundary.
        let mut part = [0.0f32; 4];
        Encoding::Q8_0
            .decode_range(&bytes, 64, 30, &mut part)
            .unwrap();
        assert_eq!(
            part,
            [7.0, 63.5, 3.0 * 2f32.powi(-24), -3.0 * 2f32.powi(-24)]
        );
        // One byte short is refused, naming both lengths.
        assert_eq!(
            Encoding::Q8_0.decode(&bytes[..67], 64).unwrap_err(),
            EncodingError::ByteLength {
                encoding: Encoding::Q8_0,
                n: 64,
                expected: 68,
                actual: 67
            }
        );
    }

    #[test]
    fn q4_0_decodes_exactly_from_hand_made_bytes() {
        // d = −2.0 (f16 0xc000); byte j holds element j in its low nibble (q = j) and element
        // j + 16 in its high nibble (q = 15 − j); value = (q − 8)·d.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let bytes = block(&[0xc000], &qs);
        assert_eq!(bytes.len(), 18);
        let v = Encoding::Q4_0.decode(&bytes, 32).unwrap();
        let expected = [
            16.0, 14.0, 12.0, 10.0, 8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0, -10.0, -12.0,
            -14.0, // low nibbles
            -14.0, -12.0, -10.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0,
            16.0, // high nibbles
        ];
        assert_eq!(v, expected);
        // Elements 15 and 16: the low nibble of byte 15 and the high nibble of byte 0.
        let mut part = [0.0f32; 2];
        Encoding::Q4_0
            .decode_range(&bytes, 32, 15, &mut part)
            .unwrap();
        assert_eq!(part, [-14.0, -14.0]);
    }

    #[test]
    fn q4_1_decodes_exactly_from_hand_made_bytes() {
        // d = 0.5 (f16 0x3800), m = −1.0 (f16 0xbc00); value = q·d + m.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut bytes = block(&[0x3800, 0xbc00], &qs);
        // A second block: d = 0, m = 0.25 (0x3400): every value is m whatever the codes.
        bytes.extend(block(&[0x0000, 0x3400], &[0xa5; 16]));
        assert_eq!(bytes.len(), 40);
        let v = Encoding::Q4_1.decode(&bytes, 64).unwrap();
        let expected = [
            -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 6.5,
            6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0,
        ];
        assert_eq!(v[..32], expected);
        assert!(v[32..].iter().all(|&x| x == 0.25));
        let mut part = [0.0f32; 3];
        Encoding::Q4_1
            .decode_range(&bytes, 64, 31, &mut part)
            .unwrap();
        assert_eq!(part, [-1.0, 0.25, 0.25]);
        assert_eq!(
            Encoding::Q4_1
                .decode_range(&bytes, 64, 62, &mut part)
                .unwrap_err(),
            EncodingError::Range {
                start: 62,
                end: 65,
                n: 64
            }
        );
    }
}
