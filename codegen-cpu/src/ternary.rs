//! Integer dot products of I2_S ternary rows with int8 activations: for every row `r` and
//! token `t`, `out[t][r] = Σ_k c[r][k] · q[t][k]` where `c ∈ {0, 1, 2}` are the stored codes
//! (the caller subtracts `Σ_k q[t][k]` to get the signed sum). Every variant is exact.
//!
//! Rows are in I2_S's 128/32 layout (FORMATS.md §3.3): 32 bytes per 128 elements, byte `j` of a
//! block holding elements `j`, `32 + j`, `64 + j` and `96 + j` in bits 7..6, 5..4, 3..2, 1..0.

/// The arguments of a row kernel. Rows are `row_bytes` apart; tokens `q_stride` bytes apart in
/// `q` and `out_stride` values apart in `out`.
#[derive(Clone, Copy, Debug)]
pub struct RowsArgs {
    pub w: *const u8,
    pub row_bytes: usize,
    pub rows: usize,
    pub q: *const i8,
    pub k: usize,
    pub tokens: usize,
    pub q_stride: usize,
    pub out: *mut i32,
    pub out_stride: usize,
}

impl RowsArgs {
    /// `rows` rows of `k` elements stored back to back, `tokens` rows of `k` activations, and
    /// `tokens` rows of `rows` results: the dense layout.
    pub fn dense(
        w: &[u8],
        rows: usize,
        k: usize,
        q: &[i8],
        tokens: usize,
        out: &mut [i32],
    ) -> Self {
        assert!(w.len() >= rows * k / 4 && q.len() >= tokens * k && out.len() >= tokens * rows);
        RowsArgs {
            w: w.as_ptr(),
            row_bytes: k / 4,
            rows,
            q: q.as_ptr(),
            k,
            tokens,
            q_stride: k,
            out: out.as_mut_ptr(),
            out_stride: rows,
        }
    }
}

/// A row kernel. Safety: every pointer must cover the ranges the arguments describe, and `k`
/// must be a multiple of 128.
pub type RowsFn = unsafe fn(&RowsArgs);

/// The portable reference: one element at a time.
///
/// # Safety
/// See [`RowsFn`].
pub unsafe fn rows_scalar(a: &RowsArgs) {
    unsafe {
        for r in 0..a.rows {
            let w = std::slice::from_raw_parts(a.w.add(r * a.row_bytes), a.k / 4);
            for t in 0..a.tokens {
                let q = std::slice::from_raw_parts(a.q.add(t * a.q_stride), a.k);
                let mut sum = 0i32;
                for (b, block) in w.chunks_exact(32).enumerate() {
                    for (j, &byte) in block.iter().enumerate() {
                        for g in 0..4 {
                            let c = ((byte >> (6 - 2 * g)) & 3) as i32;
                            sum += c * q[128 * b + 32 * g + j] as i32;
                        }
                    }
                }
                *a.out.add(t * a.out_stride + r) = sum;
            }
        }
    }
}

/// A 256-bit row kernel (`rows`, with its tiles `tiles` and `tile`) for the target features
/// `features`, where `$dot(c, x)` gives a block's four groups of codes `c` times activations
/// `x` as eight 32-bit sums. One token runs row by row; several run in tiles of 2 rows × 4
/// tokens, each block unpacked (shift and mask) once for the tile's tokens.
macro_rules! rows_256 {
    ($features:literal, $rows:ident, $tiles:ident, $tile:ident, $dot:ident) => {
        /// See [`rows_256`]'s kernels.
        ///
        /// # Safety
        /// See [`RowsFn`]; the CPU must have the features named in `target_feature`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        pub unsafe fn $rows(a: &RowsArgs) {
            unsafe {
                if a.tokens == 1 {
                    return $tiles::<1, 1>(a, 0, a.rows, 0);
                }
                let mut r = 0;
                while r < a.rows {
                    let end = (r + GEMM_CHUNK_ROWS).min(a.rows);
                    let mut t = 0;
                    while t < a.tokens {
                        let nt = a.tokens - t;
                        match nt {
                            1 => $tiles::<2, 1>(a, r, end, t),
                            2 => $tiles::<2, 2>(a, r, end, t),
                            3 => $tiles::<2, 3>(a, r, end, t),
                            _ => $tiles::<2, 4>(a, r, end, t),
                        }
                        t += nt.min(4);
                    }
                    r = end;
                }
            }
        }

        /// Rows `r0..r1` for tokens `t0..t0+T`, `R` rows at a time, then one at a time.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $tiles<const R: usize, const T: usize>(
            a: &RowsArgs,
            r0: usize,
            r1: usize,
            t0: usize,
        ) {
            unsafe {
                let mut r = r0;
                while r + R <= r1 {
                    $tile::<R, T>(a, r, t0);
                    r += R;
                }
                while r < r1 {
                    $tile::<1, T>(a, r, t0);
                    r += 1;
                }
            }
        }

        /// One tile: rows `r0..r0+R` by tokens `t0..t0+T`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const R: usize, const T: usize>(a: &RowsArgs, r0: usize, t0: usize) {
            use std::arch::x86_64::*;
            unsafe {
                let mask = _mm256_set1_epi8(3);
                let mut acc = [[_mm256_setzero_si256(); T]; R];
                let w = a.w.add(r0 * a.row_bytes);
                let q = a.q.add(t0 * a.q_stride);
                for b in 0..a.k / 128 {
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let wp = w.add(i * a.row_bytes + 32 * b);
                        if b % 2 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH) as *const i8);
                        }
                        let wb = _mm256_loadu_si256(wp as *const __m256i);
                        let c = [
                            _mm256_and_si256(_mm256_srli_epi16::<6>(wb), mask),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(wb), mask),
                            _mm256_and_si256(_mm256_srli_epi16::<2>(wb), mask),
                            _mm256_and_si256(wb, mask),
                        ];
                        for (t, acc) in acc.iter_mut().enumerate() {
                            let qb = q.add(t * a.q_stride + 128 * b);
                            let x = [0, 1, 2, 3]
                                .map(|g| _mm256_loadu_si256(qb.add(32 * g) as *const __m256i));
                            *acc = $dot(*acc, &c, &x);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    for (t, &acc) in acc.iter().enumerate() {
                        let s = _mm_add_epi32(
                            _mm256_castsi256_si128(acc),
                            _mm256_extracti128_si256(acc, 1),
                        );
                        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                        *a.out.add((t0 + t) * a.out_stride + r0 + i) = _mm_cvtsi128_si32(s);
                    }
                }
            }
        }
    };
}

/// AVX2: each group's codes times its activations by `vpmaddubsw` (codes 0..3 on the unsigned
/// side: pair sums within ±768, no saturation), the four summed in 16 bits (within ±3072) and
/// widened once per block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_avx2(
    acc: std::arch::x86_64::__m256i,
    c: &[std::arch::x86_64::__m256i; 4],
    x: &[std::arch::x86_64::__m256i; 4],
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    unsafe {
        let pairs = _mm256_add_epi16(
            _mm256_add_epi16(
                _mm256_maddubs_epi16(c[0], x[0]),
                _mm256_maddubs_epi16(c[1], x[1]),
            ),
            _mm256_add_epi16(
                _mm256_maddubs_epi16(c[2], x[2]),
                _mm256_maddubs_epi16(c[3], x[3]),
            ),
        );
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// AVX-VNNI: each group by one `vpdpbusd` (VEX, 256 bits), straight into 32-bit sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_avx_vnni(
    acc: std::arch::x86_64::__m256i,
    c: &[std::arch::x86_64::__m256i; 4],
    x: &[std::arch::x86_64::__m256i; 4],
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    unsafe {
        let acc = _mm256_dpbusd_avx_epi32(acc, c[0], x[0]);
        let acc = _mm256_dpbusd_avx_epi32(acc, c[1], x[1]);
        let acc = _mm256_dpbusd_avx_epi32(acc, c[2], x[2]);
        _mm256_dpbusd_avx_epi32(acc, c[3], x[3])
    }
}

rows_256!("avx2", rows_avx2, tiles_avx2, tile_avx2, block_avx2);
rows_256!(
    "avx2,avxvnni",
    rows_avx_vnni,
    tiles_avx_vnni,
    tile_avx_vnni,
    block_avx_vnni
);

/// AVX-512 VNNI: a block's 32 bytes are broadcast to both halves of a 512-bit register and
/// masked (then shifted by 4 and masked) per half, so each `vpdpbusd` covers 64 elements in
/// natural order.
/// Tiles of `R` rows × `T` tokens keep `R·T` independent accumulators: a block unpacked once
/// serves `T` tokens, activations loaded once serve `R` rows.
///
/// # Safety
/// See [`RowsFn`]; the CPU must have AVX-512 F/BW and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn rows_avx512_vnni(a: &RowsArgs) {
    unsafe {
        if a.tokens == 1 {
            return tiles_avx512::<GEMV_ROWS, 1>(a, 0, a.rows, 0);
        }
        // A chunk of rows stays in L1/L2 while every token passes over it.
        let mut r = 0;
        while r < a.rows {
            let end = (r + GEMM_CHUNK_ROWS).min(a.rows);
            let mut t = 0;
            while t < a.tokens {
                let nt = a.tokens - t;
                match nt {
                    1 => tiles_avx512::<4, 1>(a, r, end, t),
                    2 => tiles_avx512::<4, 2>(a, r, end, t),
                    3 => tiles_avx512::<4, 3>(a, r, end, t),
                    _ => tiles_avx512::<4, 4>(a, r, end, t),
                }
                t += nt.min(4);
            }
            r = end;
        }
    }
}

/// Rows per GEMV tile: one weight stream at a time reads fastest from memory.
const GEMV_ROWS: usize = 1;
/// Rows that every token tile visits before the next chunk: 16 rows of k = 6912 are 27 KiB.
const GEMM_CHUNK_ROWS: usize = 16;
/// How far ahead of the weight stream to prefetch, in bytes: measured on the bench host,
/// 8 KiB reaches a plain reader's bandwidth from DRAM, 512 B falls 30% short.
const PREFETCH: usize = 8192;

/// Rows `r0..r1` for tokens `t0..t0+T`, `R` rows at a time, then one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tiles_avx512<const R: usize, const T: usize>(
    a: &RowsArgs,
    r0: usize,
    r1: usize,
    t0: usize,
) {
    unsafe {
        let mut r = r0;
        while r + R <= r1 {
            tile_avx512::<R, T>(a, r, t0);
            r += R;
        }
        while r < r1 {
            tile_avx512::<1, T>(a, r, t0);
            r += 1;
        }
    }
}

/// One tile: rows `r0..r0+R` by tokens `t0..t0+T`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_avx512<const R: usize, const T: usize>(a: &RowsArgs, r0: usize, t0: usize) {
    use std::arch::x86_64::*;
    unsafe {
        // Both halves of a block's 32 bytes hold two code groups each. Shifted right by 4
        // (16-bit lanes: the mask drops what crosses a byte) and masked, the low half keeps
        // bits 3..2 (4·c) and the high half bits 1..0 (c); unshifted, the same mask gives the
        // other two groups at the same weights. So one accumulator per row and token takes
        // all four groups: its low lanes hold 4·Σ and shift right by 2 exactly at the end.
        let mask = _mm512_inserti64x4(_mm512_set1_epi8(0x0C), _mm256_set1_epi8(0x03), 1);
        let scale = _mm512_inserti64x4(_mm512_set1_epi32(2), _mm256_set1_epi32(0), 1);
        let mut acc = [[_mm512_setzero_si512(); T]; R];
        // One token has a second chain, so that two `vpdpbusd` are in flight per row; tiles of
        // several tokens have enough independent ones and need the registers.
        let mut acc2 = [[_mm512_setzero_si512(); T]; R];
        let w = a.w.add(r0 * a.row_bytes);
        let q = a.q.add(t0 * a.q_stride);
        for b in 0..a.k / 128 {
            let mut x01 = [_mm512_setzero_si512(); T];
            let mut x23 = [_mm512_setzero_si512(); T];
            for t in 0..T {
                let qb = q.add(t * a.q_stride + 128 * b);
                x01[t] = _mm512_loadu_si512(qb as *const __m512i);
                x23[t] = _mm512_loadu_si512(qb.add(64) as *const __m512i);
            }
            for i in 0..R {
                let wp = w.add(i * a.row_bytes + 32 * b);
                if b % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH) as *const i8);
                }
                let wb = _mm512_broadcast_i64x4(_mm256_loadu_si256(wp as *const __m256i));
                let c01 = _mm512_and_si512(_mm512_srli_epi16::<4>(wb), mask);
                let c23 = _mm512_and_si512(wb, mask);
                for t in 0..T {
                    acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], c01, x01[t]);
                    if T == 1 {
                        acc2[i][t] = _mm512_dpbusd_epi32(acc2[i][t], c23, x23[t]);
                    } else {
                        acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], c23, x23[t]);
                    }
                }
            }
        }
        for i in 0..R {
            for t in 0..T {
                let sum = _mm512_srav_epi32(_mm512_add_epi32(acc[i][t], acc2[i][t]), scale);
                *a.out.add((t0 + t) * a.out_stride + r0 + i) = _mm512_reduce_add_epi32(sum);
            }
        }
    }
}

/// Random rows and activations for the kernels' tests.
#[cfg(test)]
pub(crate) mod test_data {
    use super::{RowsArgs, RowsFn};

    /// `rows` I2_S rows of `k` elements, codes 0..2 only, as writers produce.
    pub fn random_rows(rows: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..rows * k / 4)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Codes 0..2 only, as writers produce.
                let c = |i: u32| ((s >> (33 + 2 * i)) % 3) as u8;
                c(0) << 6 | c(1) << 4 | c(2) << 2 | c(3)
            })
            .collect()
    }

    /// `n` int8 activations over the whole range.
    pub fn random_q(n: usize, seed: u64) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as i8
            })
            .collect()
    }

    /// `f` over dense rows and activations.
    pub fn run(f: RowsFn, w: &[u8], rows: usize, k: usize, q: &[i8], tokens: usize) -> Vec<i32> {
        let mut out = vec![0i32; rows * tokens];
        // SAFETY: the dense arguments cover the buffers (checked by `dense`).
        unsafe { f(&RowsArgs::dense(w, rows, k, q, tokens, &mut out)) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_data::{random_q, random_rows, run};
    use super::*;

    #[test]
    fn simd_kernels_equal_the_scalar_reference() {
        // Extreme activations (−128, 127) included: every variant must stay exact.
        for (rows, k, tokens) in [
            (3, 128, 1),
            (5, 256, 2),
            (7, 768, 5),
            (4, 2560, 9),
            (1, 6912, 4),
        ] {
            let mut w = random_rows(rows, k, k as u64);
            let mut q = random_q(k * tokens, rows as u64);
            q[0] = -128;
            q[1] = 127;
            // The last row all code 2 against a last token all −128: the largest sums.
            w[(rows - 1) * k / 4..].fill(0b1010_1010);
            q[(tokens - 1) * k..].fill(-128);
            let expect = run(rows_scalar, &w, rows, k, &q, tokens);
            if std::is_x86_feature_detected!("avx2") {
                assert_eq!(
                    run(rows_avx2, &w, rows, k, &q, tokens),
                    expect,
                    "avx2 {rows}x{k}x{tokens}"
                );
            }
            if std::is_x86_feature_detected!("avxvnni") {
                assert_eq!(
                    run(rows_avx_vnni, &w, rows, k, &q, tokens),
                    expect,
                    "avx-vnni {rows}x{k}x{tokens}"
                );
            }
            if std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512bw")
            {
                assert_eq!(
                    run(rows_avx512_vnni, &w, rows, k, &q, tokens),
                    expect,
                    "avx512 {rows}x{k}x{tokens}"
                );
            }
        }
    }
}
