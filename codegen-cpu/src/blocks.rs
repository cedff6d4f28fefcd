//! llama.cpp's 32-element block formats (Q8_0, Q4_0, Q4_1) times activations quantized to
//! Q8 blocks, in the order of ggml's x86 kernels: eight f32 lanes, lane `l` taking the exact
//! integer sum of elements `4l..4l+3` of each block through one fused multiply-add with the
//! block's scale product, then `hsum_float_8` (`numerics::Lanes8`); Q4_1 adds `m·s` per block
//! in a separate f32 sum.

// Kernels take their operands as raw pointers and sizes, one argument each.
#![allow(clippy::too_many_arguments)]

use bitnetc_ir::encoding::Encoding;
use bitnetc_ir::numerics::Lanes8;
use half::f16;

/// Rows `0..rows` (`row_bytes` apart) dotted with one token's quantized activations into
/// `out[0..rows]`: `xq` the int8 values, `xd` each block's scale (f16-rounded), `xs` each
/// block's `d·Σq` (Q8_1, for Q4_1).
///
/// # Safety
/// `w` holds `rows` rows of `blocks` blocks of the encoding, `xq` `32·blocks` values, `xd`
/// and `xs` `blocks` each, `out` `rows` floats; the CPU has the variant's features.
pub type BlockDotFn = unsafe fn(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    out: *mut f32,
);

fn f16_at(p: *const u8) -> f32 {
    // SAFETY: callers pass pointers to the two bytes of a block's scale.
    unsafe { f16::from_le_bytes([*p, *p.add(1)]).to_f32() }
}

/// The weight codes of one block as signed (Q8_0, Q4_0) or unsigned (Q4_1) integers.
fn block_codes(enc: Encoding, b: *const u8, q: &mut [i32; 32]) {
    // SAFETY: `b` points at a whole block of `enc`.
    unsafe {
        match enc {
            Encoding::Q8_0 => {
                for (i, q) in q.iter_mut().enumerate() {
                    *q = *b.add(2 + i) as i8 as i32;
                }
            }
            Encoding::Q4_0 => {
                for j in 0..16 {
                    q[j] = (*b.add(2 + j) & 0x0f) as i32 - 8;
                    q[j + 16] = (*b.add(2 + j) >> 4) as i32 - 8;
                }
            }
            _ => {
                for j in 0..16 {
                    q[j] = (*b.add(4 + j) & 0x0f) as i32;
                    q[j + 16] = (*b.add(4 + j) >> 4) as i32;
                }
            }
        }
    }
}

unsafe fn dot_scalar(
    enc: Encoding,
    w: *const u8,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
) -> f32 {
    let bb = enc.block_bytes();
    let mut lanes = Lanes8::default();
    let mut summs = 0.0f32;
    let mut q = [0i32; 32];
    for b in 0..blocks {
        // SAFETY: per the contract of BlockDotFn.
        unsafe {
            let wb = w.add(b * bb);
            let x: &[i8; 32] = &*(xq.add(32 * b) as *const [i8; 32]);
            block_codes(enc, wb, &mut q);
            if enc == Encoding::Q4_1 {
                summs += f16_at(wb.add(2)) * *xs.add(b);
            }
            lanes.add_block(f16_at(wb) * *xd.add(b), &q, x);
        }
    }
    lanes.sum() + summs
}

unsafe fn rows_scalar(
    enc: Encoding,
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    out: *mut f32,
) {
    for r in 0..rows {
        // SAFETY: per the contract of BlockDotFn.
        unsafe { *out.add(r) = dot_scalar(enc, w.add(r * row_bytes), blocks, xq, xd, xs) };
    }
}

/// Portable Q8_0.
///
/// # Safety
/// See [`BlockDotFn`].
pub unsafe fn q8_0_scalar(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    out: *mut f32,
) {
    unsafe { rows_scalar(Encoding::Q8_0, w, row_bytes, rows, blocks, xq, xd, xs, out) }
}

/// Portable Q4_0.
///
/// # Safety
/// See [`BlockDotFn`].
pub unsafe fn q4_0_scalar(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    out: *mut f32,
) {
    unsafe { rows_scalar(Encoding::Q4_0, w, row_bytes, rows, blocks, xq, xd, xs, out) }
}

/// Portable Q4_1.
///
/// # Safety
/// See [`BlockDotFn`].
pub unsafe fn q4_1_scalar(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    out: *mut f32,
) {
    unsafe { rows_scalar(Encoding::Q4_1, w, row_bytes, rows, blocks, xq, xd, xs, out) }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The f16 scales at byte `at` of blocks `b..b+8` (zero past the last block), converted
    /// eight at a time: the f16s of the blocks inserted into one register (a scalar
    /// conversion per block would tie each block to the previous one through the register
    /// the compiler merges it into; a copy through memory stalls on store forwarding, and a
    /// gather is slower than eight inserts).
    /// Inlined into its callers, whose target features it takes.
    #[inline(always)]
    unsafe fn halves(
        w: *const u8,
        block_bytes: usize,
        at: usize,
        b: usize,
        blocks: usize,
    ) -> __m256 {
        let n = (blocks - b).min(8);
        let p = w.wrapping_add(b * block_bytes + at);
        // SAFETY: blocks b..b+n exist; the f16 of block b + j is read only for j < n.
        let h = |j: usize| -> i32 {
            if j < n {
                unsafe { std::ptr::read_unaligned(p.add(j * block_bytes) as *const u16) as i32 }
            } else {
                0
            }
        };
        // SAFETY: the callers have F16C.
        unsafe {
            let mut v = _mm_cvtsi32_si128(h(0));
            v = _mm_insert_epi16::<1>(v, h(1));
            v = _mm_insert_epi16::<2>(v, h(2));
            v = _mm_insert_epi16::<3>(v, h(3));
            v = _mm_insert_epi16::<4>(v, h(4));
            v = _mm_insert_epi16::<5>(v, h(5));
            v = _mm_insert_epi16::<6>(v, h(6));
            v = _mm_insert_epi16::<7>(v, h(7));
            _mm256_cvtph_ps(v)
        }
    }

    /// [`halves`] times the activation scales `xd[b..b+8]` (zero past the last block).
    #[inline(always)]
    unsafe fn scales<L: Lanes>(
        w: *const u8,
        block_bytes: usize,
        at: usize,
        b: usize,
        blocks: usize,
        xd: *const f32,
    ) -> __m256 {
        let n = (blocks - b).min(8);
        // SAFETY: as `halves`; `xd` holds `blocks` scales, lanes past n are not read.
        unsafe {
            let act = L::first(n, xd.add(b));
            _mm256_mul_ps(halves(w, block_bytes, at, b, blocks), act)
        }
    }

    /// `hsum_float_8` of eight lanes.
    #[target_feature(enable = "avx2")]
    fn hsum8(v: __m256) -> f32 {
        let mut a = [0.0f32; 8];
        // SAFETY: `a` holds eight floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        let lo = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (lo[0] + lo[2]) + (lo[1] + lo[3])
    }

    /// What the 256-bit row kernels need beyond AVX2, FMA and F16C; inlined into kernels
    /// compiled with the variant's target features.
    trait Lanes {
        /// Signed weights × signed activations summed per lane of four, exactly: `|w|`
        /// (unsigned, 128 for −128) times the activations with `w`'s sign (never −128: Q8
        /// activations are within ±127).
        #[inline(always)]
        unsafe fn signed(w: __m256i, x: __m256i) -> __m256i {
            unsafe { Self::unsigned(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)) }
        }
        /// Unsigned 4-bit codes × signed activations summed per lane of four.
        unsafe fn unsigned(q: __m256i, x: __m256i) -> __m256i;
        /// The first `n` (at most 8) floats at `p`, zero in the other lanes.
        unsafe fn first(n: usize, p: *const f32) -> __m256;
    }

    /// AVX-512 VL and VNNI: one `vpdpbusd`; a masked load.
    struct Vnni;

    impl Lanes for Vnni {
        #[inline(always)]
        unsafe fn unsigned(q: __m256i, x: __m256i) -> __m256i {
            unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x) }
        }
        #[inline(always)]
        unsafe fn first(n: usize, p: *const f32) -> __m256 {
            unsafe { _mm256_maskz_loadu_ps(((1u32 << n) - 1) as u8, p) }
        }
    }

    /// AVX2: `vpmaddubsw` (pairs within ±32512: no saturation) then `vpmaddwd` by ones, the
    /// same sums of four; a masked load by lane index.
    struct Avx2;

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn unsigned(q: __m256i, x: __m256i) -> __m256i {
            unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)) }
        }
        #[inline(always)]
        unsafe fn first(n: usize, p: *const f32) -> __m256 {
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes))
            }
        }
    }

    /// `R` rows at once (independent chains: each row's sum is one serial chain of fused
    /// multiply-adds, as in ggml); encoding `E`: 0 Q8_0, 1 Q4_0, 2 Q4_1.
    #[inline(always)]
    unsafe fn rows_x<L: Lanes, const E: u8, const R: usize>(
        w: *const u8,
        row_bytes: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
    ) {
        let bb = [34, 18, 20][E as usize];
        unsafe {
            let low = _mm256_set1_epi8(0x0f);
            let eight = _mm256_set1_epi8(8);
            let mut acc = [_mm256_setzero_ps(); R];
            // The scales of eight blocks stay in registers; block `b` takes lane `b % 8`, and
            // the `m·s` sum runs in every lane of `summs` (lane 0 read at the end).
            let mut summs = [_mm256_setzero_ps(); R];
            let mut ds = [_mm256_setzero_ps(); R];
            let mut ms = [_mm256_setzero_ps(); R];
            for b in 0..blocks {
                if b % 8 == 0 {
                    for r in 0..R {
                        ds[r] = scales::<L>(w.add(r * row_bytes), bb, 0, b, blocks, xd);
                        if E == 2 {
                            ms[r] = scales::<L>(w.add(r * row_bytes), bb, 2, b, blocks, xs);
                        }
                    }
                }
                let lane = _mm256_set1_epi32((b % 8) as i32);
                let x = _mm256_loadu_si256(xq.add(32 * b) as *const __m256i);
                for r in 0..R {
                    let wb = w.add(r * row_bytes + bb * b);
                    // Rows stream from memory once per token: prefetch well ahead.
                    _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(8192) as *const i8);
                    let lanes = match E {
                        0 => L::signed(_mm256_loadu_si256(wb.add(2) as *const __m256i), x),
                        1 => {
                            let packed = _mm_loadu_si128(wb.add(2) as *const __m128i);
                            let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
                            L::signed(_mm256_sub_epi8(_mm256_and_si256(both, low), eight), x)
                        }
                        _ => {
                            summs[r] =
                                _mm256_add_ps(summs[r], _mm256_permutevar8x32_ps(ms[r], lane));
                            let packed = _mm_loadu_si128(wb.add(4) as *const __m128i);
                            let q = _mm256_and_si256(
                                _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
                                low,
                            );
                            L::unsigned(q, x)
                        }
                    };
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_permutevar8x32_ps(ds[r], lane),
                        _mm256_cvtepi32_ps(lanes),
                        acc[r],
                    );
                }
            }
            for r in 0..R {
                // The reference adds the (zero for Q8_0/Q4_0) `m·s` sum too.
                *out.add(r) = hsum8(acc[r]) + _mm256_cvtss_f32(summs[r]);
            }
        }
    }

    /// `[a | b]`: two rows' eight lanes in one 512-bit register.
    #[target_feature(enable = "avx512f")]
    fn pair(a: __m256, b: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(a)),
            _mm256_castps_pd(b),
        ))
    }

    /// The second row's eight lanes of a [`pair`].
    #[target_feature(enable = "avx512f")]
    fn high(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
    }

    /// Signed weights × signed activations per lane of four on 512 bits, as [`signed_lanes`]:
    /// `|w|` times the activations negated where `w` is negative.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn signed_lanes_z(w: __m512i, x: __m512i) -> __m512i {
        let negative = _mm512_movepi8_mask(w);
        let x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), x)
    }

    /// The 32 nibbles of a 16-byte block of each of two rows as bytes, in the order of
    /// [`rows_x`]: `[a low nibbles, a high nibbles, b low nibbles, b high nibbles]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn nibbles_z(a: *const u8, b: *const u8) -> __m512i {
        // SAFETY: the caller's blocks hold 16 bytes at `a` and at `b`.
        let ab = unsafe {
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i)),
                _mm_loadu_si128(b as *const __m128i),
            )
        };
        let z = _mm512_castsi256_si512(ab);
        let twice = _mm512_shuffle_i64x2::<0x50>(z, z);
        let shifted = _mm512_mask_srli_epi16::<4>(twice, 0xff00_ff00, twice);
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f))
    }

    /// `P` pairs of rows, each pair in 512-bit registers (the first row's eight lanes low, the
    /// second's high): every lane takes the same integer sums and the same fused multiply-adds
    /// in the same order as in [`rows_x`], with half the instructions.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows_z<const E: u8, const P: usize>(
        w: *const u8,
        row_bytes: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
    ) {
        let bb = [34, 18, 20][E as usize];
        unsafe {
            let eight = _mm512_set1_epi8(8);
            let sides = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
            let mut acc = [_mm512_setzero_ps(); P];
            // Per pair, both rows' scales of eight blocks (`[first | second]`); per row, the
            // `m·s` sum in every lane, as in `rows_x`.
            let mut ds = [_mm512_setzero_ps(); P];
            let mut ms = [[_mm256_setzero_ps(); 2]; P];
            let mut summs = [[_mm256_setzero_ps(); 2]; P];
            for b in 0..blocks {
                if b % 8 == 0 {
                    for p in 0..P {
                        let first = w.add(2 * p * row_bytes);
                        let second = first.add(row_bytes);
                        ds[p] = pair(
                            scales::<Vnni>(first, bb, 0, b, blocks, xd),
                            scales::<Vnni>(second, bb, 0, b, blocks, xd),
                        );
                        if E == 2 {
                            ms[p] = [
                                scales::<Vnni>(first, bb, 2, b, blocks, xs),
                                scales::<Vnni>(second, bb, 2, b, blocks, xs),
                            ];
                        }
                    }
                }
                let j = (b % 8) as i32;
                let lane = _mm256_set1_epi32(j);
                let lanes16 = _mm512_add_epi32(sides, _mm512_set1_epi32(j));
                let x =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(xq.add(32 * b) as *const __m256i));
                for p in 0..P {
                    let first = w.add(2 * p * row_bytes + bb * b);
                    let second = first.add(row_bytes);
                    _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(8192) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(second.wrapping_add(8192) as *const i8);
                    let lanes = match E {
                        0 => signed_lanes_z(
                            _mm512_inserti64x4::<1>(
                                _mm512_castsi256_si512(_mm256_loadu_si256(
                                    first.add(2) as *const __m256i
                                )),
                                _mm256_loadu_si256(second.add(2) as *const __m256i),
                            ),
                            x,
                        ),
                        1 => signed_lanes_z(
                            _mm512_sub_epi8(nibbles_z(first.add(2), second.add(2)), eight),
                            x,
                        ),
                        _ => {
                            for (i, m) in ms[p].iter().enumerate() {
                                summs[p][i] =
                                    _mm256_add_ps(summs[p][i], _mm256_permutevar8x32_ps(*m, lane));
                            }
                            _mm512_dpbusd_epi32(
                                _mm512_setzero_si512(),
                                nibbles_z(first.add(4), second.add(4)),
                                x,
                            )
                        }
                    };
                    acc[p] = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(lanes16, ds[p]),
                        _mm512_cvtepi32_ps(lanes),
                        acc[p],
                    );
                }
            }
            for p in 0..P {
                *out.add(2 * p) =
                    hsum8(_mm512_castps512_ps256(acc[p])) + _mm256_cvtss_f32(summs[p][0]);
                *out.add(2 * p + 1) = hsum8(high(acc[p])) + _mm256_cvtss_f32(summs[p][1]);
            }
        }
    }

    /// A pair of rows against `T` tokens (token `t`'s activations `32·blocks` values, and
    /// `blocks` scales, after token `t − 1`'s), each weight block loaded and unpacked once for
    /// the `T`: every (row, token) takes the lane sums, products and fused multiply-adds of
    /// [`rows_z`], in the same order.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn gemm_z<const E: u8, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
        out_stride: usize,
    ) {
        let bb = [34, 18, 20][E as usize];
        let k = 32 * blocks;
        unsafe {
            let eight = _mm512_set1_epi8(8);
            let sides = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
            let mut acc = [_mm512_setzero_ps(); T];
            let mut summs = [_mm512_setzero_ps(); T];
            let (mut dw, mut mw) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let second_row = w.add(row_bytes);
            for b in 0..blocks {
                if b % 8 == 0 {
                    dw = pair(
                        halves(w, bb, 0, b, blocks),
                        halves(second_row, bb, 0, b, blocks),
                    );
                    if E == 2 {
                        mw = pair(
                            halves(w, bb, 2, b, blocks),
                            halves(second_row, bb, 2, b, blocks),
                        );
                    }
                }
                let lanes16 = _mm512_add_epi32(sides, _mm512_set1_epi32((b % 8) as i32));
                let d = _mm512_permutexvar_ps(lanes16, dw);
                let m = _mm512_permutexvar_ps(lanes16, mw);
                let first = w.add(bb * b);
                let second = first.add(row_bytes);
                _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(8192) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(second.wrapping_add(8192) as *const i8);
                // The weights as unsigned bytes, and (signed encodings) where they are negative.
                let (wq, negative) = match E {
                    0 => {
                        let q = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_loadu_si256(
                                first.add(2) as *const __m256i
                            )),
                            _mm256_loadu_si256(second.add(2) as *const __m256i),
                        );
                        (_mm512_abs_epi8(q), _mm512_movepi8_mask(q))
                    }
                    1 => {
                        let q = _mm512_sub_epi8(nibbles_z(first.add(2), second.add(2)), eight);
                        (_mm512_abs_epi8(q), _mm512_movepi8_mask(q))
                    }
                    _ => (nibbles_z(first.add(4), second.add(4)), 0),
                };
                for t in 0..T {
                    let x = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        xq.add(t * k + 32 * b) as *const __m256i
                    ));
                    let x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                    let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, x);
                    if E == 2 {
                        let s = _mm512_set1_ps(*xs.add(t * blocks + b));
                        summs[t] = _mm512_add_ps(summs[t], _mm512_mul_ps(m, s));
                    }
                    acc[t] = _mm512_fmadd_ps(
                        _mm512_mul_ps(d, _mm512_set1_ps(*xd.add(t * blocks + b))),
                        _mm512_cvtepi32_ps(lanes),
                        acc[t],
                    );
                }
            }
            for t in 0..T {
                let o = out.add(t * out_stride);
                *o = hsum8(_mm512_castps512_ps256(acc[t]))
                    + _mm256_cvtss_f32(_mm512_castps512_ps256(summs[t]));
                *o.add(1) = hsum8(high(acc[t])) + _mm256_cvtss_f32(high(summs[t]));
            }
        }
    }

    /// Rows against several tokens: four tokens at a time (then one) over every pair of rows,
    /// then the last row token by token; `E` 0 Q8_0, 1 Q4_0, 2 Q4_1.
    ///
    /// # Safety
    /// See [`BlockGemmFn`](super::BlockGemmFn); the CPU must have AVX2, FMA, F16C and
    /// AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn gemm_zmm<const E: u8>(
        w: *const u8,
        row_bytes: usize,
        rows: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        tokens: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        let k = 32 * blocks;
        unsafe {
            let mut t = 0;
            while t < tokens {
                let (xq, xd, xs) = (xq.add(t * k), xd.add(t * blocks), xs.add(t * blocks));
                let o = out.add(t * out_stride);
                let four = t + 4 <= tokens;
                let mut r = 0;
                while r + 2 <= rows {
                    let (w, o) = (w.add(r * row_bytes), o.add(r));
                    if four {
                        gemm_z::<E, 4>(w, row_bytes, blocks, xq, xd, xs, o, out_stride);
                    } else {
                        gemm_z::<E, 1>(w, row_bytes, blocks, xq, xd, xs, o, out_stride);
                    }
                    r += 2;
                }
                let n = if four { 4 } else { 1 };
                if r < rows {
                    for u in 0..n {
                        let (xq, xd, xs) = (xq.add(u * k), xd.add(u * blocks), xs.add(u * blocks));
                        let o = o.add(u * out_stride + r);
                        rows_x::<Vnni, E, 1>(
                            w.add(r * row_bytes),
                            row_bytes,
                            blocks,
                            xq,
                            xd,
                            xs,
                            o,
                        );
                    }
                }
                t += n;
            }
        }
    }

    /// Four rows at a time in pairs of 512-bit registers, then a pair, then one; `E` as
    /// [`gemm_zmm`]. (One token through [`gemm_zmm`] would give the same bits, but with one
    /// pair in flight instead of two it decodes about 8% slower.)
    ///
    /// # Safety
    /// See [`BlockDotFn`](super::BlockDotFn) and [`gemm_zmm`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_zmm<const E: u8>(
        w: *const u8,
        row_bytes: usize,
        rows: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
    ) {
        let mut r = 0;
        unsafe {
            while r + 4 <= rows {
                let (w, out) = (w.add(r * row_bytes), out.add(r));
                rows_z::<E, 2>(w, row_bytes, blocks, xq, xd, xs, out);
                r += 4;
            }
            if r + 2 <= rows {
                let (w, out) = (w.add(r * row_bytes), out.add(r));
                rows_z::<E, 1>(w, row_bytes, blocks, xq, xd, xs, out);
                r += 2;
            }
            if r < rows {
                let (w, out) = (w.add(r * row_bytes), out.add(r));
                rows_x::<Vnni, E, 1>(w, row_bytes, blocks, xq, xd, xs, out);
            }
        }
    }

    /// Four rows at a time, then one at a time, through [`rows_x`] with lanes `L`.
    #[inline(always)]
    unsafe fn rows_by_four<L: Lanes, const E: u8>(
        w: *const u8,
        row_bytes: usize,
        rows: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
    ) {
        let mut r = 0;
        unsafe {
            while r + 4 <= rows {
                let wr = w.add(r * row_bytes);
                rows_x::<L, E, 4>(wr, row_bytes, blocks, xq, xd, xs, out.add(r));
                r += 4;
            }
            while r < rows {
                let wr = w.add(r * row_bytes);
                rows_x::<L, E, 1>(wr, row_bytes, blocks, xq, xd, xs, out.add(r));
                r += 1;
            }
        }
    }

    /// Four rows at a time, then one, on 256-bit registers; `E` as [`gemm_zmm`].
    ///
    /// # Safety
    /// See [`BlockDotFn`](super::BlockDotFn); the CPU must have AVX2, FMA, F16C and AVX-512 VL
    /// and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512vnni")]
    pub unsafe fn rows_vnni<const E: u8>(
        w: *const u8,
        row_bytes: usize,
        rows: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
    ) {
        unsafe { rows_by_four::<Vnni, E>(w, row_bytes, rows, blocks, xq, xd, xs, out) }
    }

    /// [`rows_vnni`] with AVX2 alone: the same sums of four by `vpmaddubsw` and `vpmaddwd`.
    ///
    /// # Safety
    /// See [`BlockDotFn`](super::BlockDotFn); the CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2<const E: u8>(
        w: *const u8,
        row_bytes: usize,
        rows: usize,
        blocks: usize,
        xq: *const i8,
        xd: *const f32,
        xs: *const f32,
        out: *mut f32,
    ) {
        unsafe { rows_by_four::<Avx2, E>(w, row_bytes, rows, blocks, xq, xd, xs, out) }
    }
}

/// Rows `0..rows` against `tokens` tokens into `out`: token `t`'s activations are
/// `xq + t·32·blocks`, `xd + t·blocks` and `xs + t·blocks` (as [`BlockDotFn`] takes one
/// token's), its results `out + t·out_stride`; each (row, token) the bits of a [`BlockDotFn`].
///
/// # Safety
/// As [`BlockDotFn`], for `tokens` tokens; `out` holds `tokens` rows of `out_stride` floats
/// (at least `rows`).
pub type BlockGemmFn = unsafe fn(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    blocks: usize,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
    tokens: usize,
    out: *mut f32,
    out_stride: usize,
);

/// The multi-token kernel for `enc` on this host (AVX-512 F/BW/VL/VNNI), if there is one.
pub fn select_gemm(enc: Encoding) -> Option<(&'static str, BlockGemmFn)> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512vnni")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        return match enc {
            Encoding::Q8_0 => Some(("avx512-vnni-zmm", x86::gemm_zmm::<0> as BlockGemmFn)),
            Encoding::Q4_0 => Some(("avx512-vnni-zmm", x86::gemm_zmm::<1>)),
            Encoding::Q4_1 => Some(("avx512-vnni-zmm", x86::gemm_zmm::<2>)),
            _ => None,
        };
    }
    let _ = enc;
    None
}

/// The block-dot variants for `enc` (Q8_0, Q4_0 or Q4_1) that run on this host, fastest
/// first; the scalar one last. Empty for other encodings.
pub fn variants(enc: Encoding) -> Vec<(&'static str, BlockDotFn)> {
    let mut out: Vec<(&'static str, BlockDotFn)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512vnni")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        if std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512f") {
            match enc {
                Encoding::Q8_0 => out.push(("avx512-vnni-zmm", x86::rows_zmm::<0>)),
                Encoding::Q4_0 => out.push(("avx512-vnni-zmm", x86::rows_zmm::<1>)),
                Encoding::Q4_1 => out.push(("avx512-vnni-zmm", x86::rows_zmm::<2>)),
                _ => {}
            }
        }
        match enc {
            Encoding::Q8_0 => out.push(("avx512-vnni", x86::rows_vnni::<0>)),
            Encoding::Q4_0 => out.push(("avx512-vnni", x86::rows_vnni::<1>)),
            Encoding::Q4_1 => out.push(("avx512-vnni", x86::rows_vnni::<2>)),
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        match enc {
            Encoding::Q8_0 => out.push(("avx2", x86::rows_avx2::<0>)),
            Encoding::Q4_0 => out.push(("avx2", x86::rows_avx2::<1>)),
            Encoding::Q4_1 => out.push(("avx2", x86::rows_avx2::<2>)),
            _ => {}
        }
    }
    match enc {
        Encoding::Q8_0 => out.push(("scalar", q8_0_scalar)),
        Encoding::Q4_0 => out.push(("scalar", q4_0_scalar)),
        Encoding::Q4_1 => out.push(("scalar", q4_1_scalar)),
        _ => {}
    }
    out
}

/// The block-dot variant for `enc` (Q8_0, Q4_0 or Q4_1) on this host, or `None` for other
/// encodings; `portable` forces the scalar one.
pub fn select(enc: Encoding, portable: bool) -> Option<(&'static str, BlockDotFn)> {
    let all = variants(enc);
    if portable { all.last() } else { all.first() }.copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnetc_ir::interp::{MatmulActs, RowScratch, WeightRef, matmul_rows};
    use bitnetc_ir::numerics::quantize_q8_x86;
    use bitnetc_ir::types::DotPath;

    #[test]
    fn every_variant_equals_the_interpreter() {
        // Whole groups of eight blocks, and 18 blocks (SmolLM2's rows of 576) with a tail.
        for (rows, k) in [(5usize, 256usize), (7, 576)] {
            variants_equal_the_interpreter(rows, k);
        }
    }

    fn variants_equal_the_interpreter(rows: usize, k: usize) {
        let mut s = 21u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let values: Vec<f32> = (0..rows * k).map(|_| next() * 3.0).collect();
        let x: Vec<f32> = (0..k).map(|_| next()).collect();
        for enc in [Encoding::Q8_0, Encoding::Q4_0, Encoding::Q4_1] {
            let mut bytes = enc.encode(&values).unwrap();
            if enc == Encoding::Q8_0 {
                bytes[2] = 0x80; // −128: |w| is 128 as an unsigned byte
            }
            let shape = [rows as u64, k as u64];
            let w = WeightRef {
                encoding: enc,
                shape: &shape,
                bytes: &bytes,
            };
            let acts = MatmulActs::new(&x, &w).unwrap();
            let mut want = vec![0.0f32; rows];
            let mut scratch = RowScratch::default();
            matmul_rows(
                &acts,
                &x,
                &w,
                DotPath::F32,
                0..rows,
                &mut scratch,
                |_, r, v| want[r] = v,
            )
            .unwrap();
            let blocks = quantize_q8_x86(&x);
            let xq: Vec<i8> = blocks.iter().flat_map(|b| b.qs).collect();
            let xd: Vec<f32> = blocks.iter().map(|b| b.d).collect();
            let xs: Vec<f32> = blocks.iter().map(|b| b.s).collect();
            let all = variants(enc);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                // zmm, 256-bit VNNI, AVX2, scalar.
                assert_eq!(all.len(), 4, "{enc}");
            }
            for (name, f) in all {
                let row_bytes = k / 32 * enc.block_bytes();
                let mut got = vec![0.0f32; rows];
                unsafe {
                    f(
                        bytes.as_ptr(),
                        row_bytes,
                        rows,
                        k / 32,
                        xq.as_ptr(),
                        xd.as_ptr(),
                        xs.as_ptr(),
                        got.as_mut_ptr(),
                    )
                };
                for r in 0..rows {
                    assert_eq!(got[r].to_bits(), want[r].to_bits(), "{enc} {name} row {r}");
                }
            }
            gemm_equals_the_dot(enc, &bytes, rows, k, &mut next);
        }
    }

    /// The multi-token kernel gives every token the bits of the one-token kernel, for token
    /// counts around its groups of four, into rows of a wider output.
    fn gemm_equals_the_dot(
        enc: Encoding,
        bytes: &[u8],
        rows: usize,
        k: usize,
        next: &mut impl FnMut() -> f32,
    ) {
        let Some((name, gemm)) = select_gemm(enc) else {
            #[cfg(target_arch = "x86_64")]
            assert!(!std::is_x86_feature_detected!("avx512bw"), "{enc}");
            return;
        };
        let (_, dot) = select(enc, false).unwrap();
        let (blocks, row_bytes, stride) = (k / 32, k / 32 * enc.block_bytes(), rows + 3);
        for tokens in [1usize, 3, 4, 6, 9] {
            let x: Vec<f32> = (0..tokens * k).map(|_| next() * 2.0).collect();
            let q = quantize_q8_x86(&x);
            let xq: Vec<i8> = q.iter().flat_map(|b| b.qs).collect();
            let xd: Vec<f32> = q.iter().map(|b| b.d).collect();
            let xs: Vec<f32> = q.iter().map(|b| b.s).collect();
            let mut got = vec![f32::NAN; tokens * stride];
            unsafe {
                gemm(
                    bytes.as_ptr(),
                    row_bytes,
                    rows,
                    blocks,
                    xq.as_ptr(),
                    xd.as_ptr(),
                    xs.as_ptr(),
                    tokens,
                    got.as_mut_ptr(),
                    stride,
                )
            };
            for t in 0..tokens {
                let mut want = vec![0.0f32; rows];
                unsafe {
                    dot(
                        bytes.as_ptr(),
                        row_bytes,
                        rows,
                        blocks,
                        xq[t * k..].as_ptr(),
                        xd[t * blocks..].as_ptr(),
                        xs[t * blocks..].as_ptr(),
                        want.as_mut_ptr(),
                    )
                };
                for r in 0..rows {
                    let g = got[t * stride + r];
                    assert_eq!(
                        g.to_bits(),
                        want[r].to_bits(),
                        "{enc} {name} {tokens} tokens: token {t} row {r}"
                    );
                }
                // Past the rows, nothing is written.
                assert!(
                    got[t * stride + rows..(t + 1) * stride]
                        .iter()
                        .all(|v| v.is_nan())
                );
            }
        }
    }
}
