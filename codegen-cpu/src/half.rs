//! Dot products of f32 activations with f16 weight rows, in exactly the order of the reference
//! engines' kernels (`numerics::dot_ggml_vec_f16`, `numerics::dot_tinyblas16`), so their
//! results are bit-identical to the interpreter's.

use bitnetc_ir::numerics::reduce16;
use half::f16;

/// `Σ x[i]·w[i]` for `k` elements; `x` in f32 (already rounded where the path rounds), `w` as
/// f16 bits.
///
/// # Safety
/// `x` and `w` must hold `k` elements; the CPU must have the features of the variant.
pub type HalfDotFn = unsafe fn(x: *const f32, w: *const u16, k: usize) -> f32;

/// Sixteen rows `w + r·stride` (`r` in `0..16`) of `k` f16 values against `heads` vectors of
/// `k` f32 values stored back to back at `x`: `out[h·out_stride + r]` is row `r` dotted with
/// vector `h`, exactly as the one-row dot gives it. Attention's scores: sixteen cached keys at
/// a time for the query heads that share them.
#[derive(Clone, Copy, Debug)]
pub struct Rows16 {
    pub x: *const f32,
    pub heads: usize,
    pub w: *const u16,
    pub stride: usize,
    pub k: usize,
    pub out: *mut f32,
    pub out_stride: usize,
}

/// One row `w` of `k` f16 values against `tokens` vectors of `k` f32 values stored back to
/// back at `x`: `out[t·out_stride]` is the row dotted with vector `t`, exactly as the one-row
/// dot gives it. A step of several tokens' output projection, each row read once for them.
///
/// # Safety
/// `x` must hold `tokens·k` values, `w` `k`, `out` the `tokens` results; the CPU must have the
/// features of the variant.
pub type HalfDotTokensFn = unsafe fn(
    x: *const f32,
    tokens: usize,
    w: *const u16,
    k: usize,
    out: *mut f32,
    out_stride: usize,
);

/// [`HalfDotTokensFn`] by the one-row dot `dot`, token by token.
///
/// # Safety
/// As [`HalfDotTokensFn`], for `dot`.
#[inline(always)]
unsafe fn tokens_by_one(
    dot: HalfDotFn,
    (x, tokens, w, k): (*const f32, usize, *const u16, usize),
    (out, out_stride): (*mut f32, usize),
) {
    for t in 0..tokens {
        unsafe { *out.add(t * out_stride) = dot(x.add(t * k), w, k) };
    }
}

/// A [`Rows16`] kernel.
///
/// # Safety
/// Every pointer must cover what [`Rows16`] describes; the CPU must have the features of the
/// variant.
pub type HalfDots16Fn = unsafe fn(&Rows16);

/// Attention's weighted sums of value rows in the reference's chain order, for `heads` score
/// rows (`x + h·x_stride`, `n` values each): for `j < n`, chain `j % chains` (16 or 64) gathers
/// `x[j]·v[j][dim]` by fused multiply-adds in order of `j`; with 64 chains, chain `l < 16` then
/// becomes `(c[l] + c[32+l]) + (c[16+l] + c[48+l])`; the sixteen are added by
/// `_mm512_reduce_add_ps`'s halving tree into `out[h·out_stride + dim]`, for every `dim < d`.
/// Rows `v + j·stride` hold `d` f16 values.
#[derive(Clone, Copy, Debug)]
pub struct Chains {
    pub x: *const f32,
    pub x_stride: usize,
    pub heads: usize,
    pub n: usize,
    pub v: *const u16,
    pub stride: usize,
    /// 0: position `j`'s row is row `j`; otherwise the rows are grouped by `j % 64`, each
    /// group `run` rows ([`value_row`]).
    pub run: usize,
    pub d: usize,
    pub chains: usize,
    pub out: *mut f32,
    pub out_stride: usize,
}

/// The row of position `j` among values grouped in runs of `run` rows by `j % 64` (ggml's
/// GEMV chains), or row `j` when `run` is 0: `(j % 64)·run + j / 64`.
#[inline(always)]
pub fn value_row(j: usize, run: usize) -> usize {
    if run == 0 { j } else { (j % 64) * run + j / 64 }
}

/// A [`Chains`] kernel.
///
/// # Safety
/// Every pointer must cover what [`Chains`] describes; `chains` is 16 or 64 and `d` a multiple
/// of 16; the CPU must have the features of the variant.
pub type HalfChainsFn = unsafe fn(&Chains);

/// ggml's GEMV ending: the chains' sum `chains`, then the elements `from..k` past the last 64
/// added in f64.
///
/// # Safety
/// `x` and `w` must hold `k` elements.
unsafe fn gemv_tail(chains: f32, x: *const f32, w: *const u16, from: usize, k: usize) -> f32 {
    let mut sum = chains as f64;
    for e in from..k {
        unsafe { sum += (*x.add(e) * f16::from_bits(*w.add(e)).to_f32()) as f64 };
    }
    sum as f32
}

/// ggml's `ggml_vec_dot_f16` order, portable.
///
/// # Safety
/// See [`HalfDotFn`].
pub unsafe fn vec_f16_scalar(x: *const f32, w: *const u16, k: usize) -> f32 {
    let (x, w) = unsafe {
        (
            std::slice::from_raw_parts(x, k),
            std::slice::from_raw_parts(w, k),
        )
    };
    let np = k & !63;
    let mut acc = [[0.0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, a) in a.iter_mut().enumerate() {
                let e = i + 16 * j + l;
                *a = x[e].mul_add(f16::from_bits(w[e]).to_f32(), *a);
            }
        }
    }
    let mut r = [0.0f32; 16];
    for (l, r) in r.iter_mut().enumerate() {
        *r = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    unsafe { gemv_tail(reduce16(r), x.as_ptr(), w.as_ptr(), np, k) }
}

/// llamafile's tinyBLAS order (16 lanes, FMAs in order), portable. `k` must be a multiple of 16.
///
/// # Safety
/// See [`HalfDotFn`].
pub unsafe fn tinyblas16_scalar(x: *const f32, w: *const u16, k: usize) -> f32 {
    let (x, w) = unsafe {
        (
            std::slice::from_raw_parts(x, k),
            std::slice::from_raw_parts(w, k),
        )
    };
    let mut acc = [0.0f32; 16];
    for (i, (&a, &b)) in x.iter().zip(w).enumerate() {
        acc[i % 16] = a.mul_add(f16::from_bits(b).to_f32(), acc[i % 16]);
    }
    reduce16(acc)
}

/// [`vec_f16_scalar`] with AVX-512: the same lanes, the same fused multiply-adds.
///
/// # Safety
/// See [`HalfDotFn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn vec_f16_avx512(x: *const f32, w: *const u16, k: usize) -> f32 {
    use std::arch::x86_64::*;
    unsafe {
        let np = k & !63;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < np {
            // Rows are streamed from memory once per token: prefetch 8 KiB ahead (the next
            // rows), as the ternary GEMV does.
            let ahead = w.wrapping_add(i + 4096) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            for (j, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(i + 16 * j));
                let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(i + 16 * j) as *const __m256i));
                *a = _mm512_fmadd_ps(xv, wv, *a);
            }
            i += 64;
        }
        let r = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
        let mut lanes = [0.0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), r);
        gemv_tail(reduce16(lanes), x, w, np, k)
    }
}

/// [`tinyblas16_scalar`] with AVX-512.
///
/// # Safety
/// See [`HalfDotFn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn tinyblas16_avx512(x: *const f32, w: *const u16, k: usize) -> f32 {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= k {
            let xv = _mm512_loadu_ps(x.add(i));
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(i) as *const __m256i));
            acc = _mm512_fmadd_ps(xv, wv, acc);
            i += 16;
        }
        let mut lanes = [0.0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        reduce16(lanes)
    }
}

/// [`vec_f16_scalar`] with AVX2, FMA and F16C: each 16-lane chain of the AVX-512 order as two
/// 8-lane halves, the same fused multiply-adds lane by lane, then the same sums.
///
/// # Safety
/// See [`HalfDotFn`]; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_f16_avx2(x: *const f32, w: *const u16, k: usize) -> f32 {
    use std::arch::x86_64::*;
    unsafe {
        let np = k & !63;
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < np {
            let ahead = w.wrapping_add(i + 4096) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            // acc[2j + half]: lanes 8·half .. 8·half + 8 of chain j.
            for (c, a) in acc.iter_mut().enumerate() {
                let e = i + 8 * c;
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(e) as *const __m128i));
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(e)), wv, *a);
            }
            i += 64;
        }
        let mut lanes = [0.0f32; 16];
        for half in 0..2 {
            let [a0, a1, a2, a3] = [0, 1, 2, 3].map(|j| acc[2 * j + half]);
            let r = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * half), r);
        }
        gemv_tail(reduce16(lanes), x, w, np, k)
    }
}

/// [`tinyblas16_scalar`] with AVX2, FMA and F16C: the 16-lane chain as two halves.
///
/// # Safety
/// See [`HalfDotFn`]; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tinyblas16_avx2(x: *const f32, w: *const u16, k: usize) -> f32 {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= k {
            for (half, a) in acc.iter_mut().enumerate() {
                let e = i + 8 * half;
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(e) as *const __m128i));
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(e)), wv, *a);
            }
            i += 16;
        }
        let mut lanes = [0.0f32; 16];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
        reduce16(lanes)
    }
}

/// [`vec_f16_avx2`] row by row.
///
/// # Safety
/// See [`HalfDots16Fn`]; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub unsafe fn vec_f16_avx2_x16(a: &Rows16) {
    unsafe { rows16_by_one(a, vec_f16_avx2) }
}

/// [`tinyblas16_avx2`] row by row.
///
/// # Safety
/// See [`HalfDots16Fn`]; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub unsafe fn tinyblas16_avx2_x16(a: &Rows16) {
    unsafe { rows16_by_one(a, tinyblas16_avx2) }
}

/// `one` for every head and row of `a`.
///
/// # Safety
/// See [`HalfDots16Fn`].
unsafe fn rows16_by_one(a: &Rows16, one: HalfDotFn) {
    for h in 0..a.heads {
        for r in 0..16 {
            unsafe {
                *a.out.add(h * a.out_stride + r) = one(a.x.add(h * a.k), a.w.add(r * a.stride), a.k)
            };
        }
    }
}

/// [`vec_f16_scalar`] row by row.
///
/// # Safety
/// See [`HalfDots16Fn`].
pub unsafe fn vec_f16_scalar_x16(a: &Rows16) {
    unsafe { rows16_by_one(a, vec_f16_scalar) }
}

/// [`tinyblas16_scalar`] row by row.
///
/// # Safety
/// See [`HalfDots16Fn`].
pub unsafe fn tinyblas16_scalar_x16(a: &Rows16) {
    unsafe { rows16_by_one(a, tinyblas16_scalar) }
}

/// Sixteen `_mm512_reduce_add_ps` at once, with the same pairs added: lane `r` of the result
/// is the sum of `v[r]`'s lanes. Each step adds, for two or four rows side by side, the halves
/// the scalar tree adds (16 → 8 → 4 → 2 → 1 lanes), so no sum is reassociated.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reduce_add_x16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Lanes i + 8 onto i: rows 2p and 2p+1 in one register (quarters 0–1 and 2–3).
    let s1: [__m512; 8] = std::array::from_fn(|p| {
        let (a, b) = (v[2 * p], v[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // Lanes i + 4 onto i: rows 4p .. 4p+3, one per quarter.
    let s2: [__m512; 4] = std::array::from_fn(|p| {
        let (a, b) = (s1[2 * p], s1[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // Lanes i + 2 onto i, within quarters: quarter q holds rows 8p+q and 8p+4+q.
    let s3: [__m512; 2] = std::array::from_fn(|p| {
        let (a, b) = (s2[2 * p], s2[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    });
    // Lane 1 onto 0: quarter q holds rows q, 4+q, 8+q, 12+q; lane 4q+m is row 4m+q.
    let s4 = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(s3[0], s3[1]),
        _mm512_shuffle_ps::<0xDD>(s3[0], s3[1]),
    );
    let rows = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(rows, s4)
}

/// Calls `f::<H>(a, h0)` for heads `h0 .. h0 + H`, four at a time (a row's f16 values are
/// converted once for all of them).
macro_rules! by_four_heads {
    ($f:ident, $a:expr) => {{
        let a = $a;
        let mut h0 = 0;
        while h0 < a.heads {
            match a.heads - h0 {
                1 => $f::<1>(a, h0),
                2 => $f::<2>(a, h0),
                3 => $f::<3>(a, h0),
                _ => $f::<4>(a, h0),
            }
            h0 += 4;
        }
    }};
}

/// How many rows ahead of the ones in use the sixteen-row kernels prefetch (attention's keys:
/// 32 rows of a head are 8 KiB at 128 dimensions).
const PREFETCH_ROWS: usize = 32;

/// Prefetches the 64-byte lines of a row of `k` f16 values into L1.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(w: *const u16, k: usize) {
    use std::arch::x86_64::*;
    for line in (0..2 * k).step_by(64) {
        // SAFETY: prefetches never fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((w as *const i8).wrapping_add(line)) };
    }
}

/// [`vec_f16_avx512`] for sixteen rows and up to four heads: per row, each head's four
/// chains, then the sixteen rows' reductions together.
///
/// # Safety
/// See [`HalfDots16Fn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn vec_f16_avx512_x16(a: &Rows16) {
    #[target_feature(enable = "avx512f")]
    unsafe fn heads<const H: usize>(a: &Rows16, h0: usize) {
        use std::arch::x86_64::*;
        unsafe {
            let np = a.k & !63;
            let x = a.x.add(h0 * a.k);
            let mut r = [[_mm512_setzero_ps(); 16]; H];
            for row in 0..16 {
                let w = a.w.add(row * a.stride);
                prefetch_row(w.wrapping_add(PREFETCH_ROWS * a.stride), a.k);
                let mut acc = [[_mm512_setzero_ps(); 4]; H];
                let mut i = 0;
                while i < np {
                    for j in 0..4 {
                        let wv = _mm512_cvtph_ps(_mm256_loadu_si256(
                            w.add(i + 16 * j) as *const __m256i
                        ));
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let xv = _mm512_loadu_ps(x.add(h * a.k + i + 16 * j));
                            acc[j] = _mm512_fmadd_ps(xv, wv, acc[j]);
                        }
                    }
                    i += 64;
                }
                for (r, acc) in r.iter_mut().zip(&acc) {
                    r[row] =
                        _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
                }
            }
            for (h, r) in r.iter().enumerate() {
                let out = a.out.add((h0 + h) * a.out_stride);
                let sums = reduce_add_x16(r);
                if np == a.k {
                    _mm512_storeu_ps(out, sums);
                    continue;
                }
                let mut lanes = [0.0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
                for (row, &lane) in lanes.iter().enumerate() {
                    let w = a.w.add(row * a.stride);
                    *out.add(row) = gemv_tail(lane, x.add(h * a.k), w, np, a.k);
                }
            }
        }
    }
    unsafe { by_four_heads!(heads, a) }
}

/// [`tinyblas16_avx512`] for sixteen rows and up to four heads: two rows at a time, one chain
/// per row and head.
///
/// # Safety
/// See [`HalfDots16Fn`]; `k` a multiple of 16; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn tinyblas16_avx512_x16(a: &Rows16) {
    #[target_feature(enable = "avx512f")]
    unsafe fn heads<const H: usize>(a: &Rows16, h0: usize) {
        use std::arch::x86_64::*;
        unsafe {
            let x = a.x.add(h0 * a.k);
            let mut r = [[_mm512_setzero_ps(); 16]; H];
            for row in (0..16).step_by(2) {
                let (w0, w1) = (a.w.add(row * a.stride), a.w.add((row + 1) * a.stride));
                // Per head, the chains of the two rows.
                let mut acc = [[_mm512_setzero_ps(); 2]; H];
                let mut i = 0;
                while i + 16 <= a.k {
                    let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(w0.add(i) as *const __m256i));
                    let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(w1.add(i) as *const __m256i));
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(x.add(h * a.k + i));
                        acc[0] = _mm512_fmadd_ps(xv, v0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(xv, v1, acc[1]);
                    }
                    i += 16;
                }
                for (r, acc) in r.iter_mut().zip(&acc) {
                    r[row] = acc[0];
                    r[row + 1] = acc[1];
                }
            }
            for (h, r) in r.iter().enumerate() {
                _mm512_storeu_ps(a.out.add((h0 + h) * a.out_stride), reduce_add_x16(r));
            }
        }
    }
    unsafe { by_four_heads!(heads, a) }
}

/// The register operations of the value chains, per register width; inlined into kernels
/// compiled with the variant's target features.
#[cfg(target_arch = "x86_64")]
trait ChainLanes {
    type V: Copy;
    /// f32 lanes per register (dimensions per accumulator).
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    /// `LANES` f16 values at `p`, as f32.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
}

/// A register width's [`ChainLanes`], from its intrinsics (`load` converts the f16 values at
/// `p`).
macro_rules! chain_lanes {
    ($(#[$doc:meta])* $name:ident: $v:ident, $lanes:expr,
     [$zero:ident, $add:ident, $fma:ident, $set1:ident, $store:ident], |$p:ident| $load:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        struct $name;

        #[cfg(target_arch = "x86_64")]
        impl ChainLanes for $name {
            type V = std::arch::x86_64::$v;
            const LANES: usize = $lanes;
            #[inline(always)]
            unsafe fn zero() -> Self::V {
                unsafe { std::arch::x86_64::$zero() }
            }
            #[inline(always)]
            unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
                unsafe { std::arch::x86_64::$add(a, b) }
            }
            #[inline(always)]
            unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
                unsafe { std::arch::x86_64::$fma(a, b, c) }
            }
            #[inline(always)]
            unsafe fn splat(x: f32) -> Self::V {
                unsafe { std::arch::x86_64::$set1(x) }
            }
            #[inline(always)]
            unsafe fn load_f16($p: *const u16) -> Self::V {
                use std::arch::x86_64::*;
                unsafe { $load }
            }
            #[inline(always)]
            unsafe fn store(p: *mut f32, v: Self::V) {
                unsafe { std::arch::x86_64::$store(p, v) }
            }
        }
    };
}

chain_lanes!(
    /// Sixteen lanes (AVX-512F).
    Zmm: __m512, 16,
    [_mm512_setzero_ps, _mm512_add_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_storeu_ps],
    |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
);

chain_lanes!(
    /// Eight lanes (AVX2, FMA, F16C).
    Ymm: __m256, 8,
    [_mm256_setzero_ps, _mm256_add_ps, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_storeu_ps],
    |p| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
);

/// One pass of [`chains_slice`]: the chains `q..q + C` of `H` heads for `D` registers of
/// dimensions from `dim`, over all their rows, every accumulator in a register; each row's
/// values converted once for every head and each score broadcast once for every register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn chains_pass<L: ChainLanes, const H: usize, const D: usize, const C: usize>(
    a: &Chains,
    (h0, dim, q): (usize, usize, usize),
    done: *mut L::V,
) {
    use std::arch::x86_64::*;
    /// Groups of `chains` rows the passes prefetch ahead of the one in use.
    const AHEAD: usize = 8;
    unsafe {
        let mut acc = [[[L::zero(); C]; D]; H];
        let v = a.v.add(dim);
        let x = a.x.add(h0 * a.x_stride);
        let at = |j: usize| value_row(j, a.run);
        let mut j0 = q;
        while j0 < a.n {
            for c in 0..C {
                let ahead = if a.run == 0 {
                    at(j0 + AHEAD * a.chains + c)
                } else {
                    at(j0 + C + c)
                };
                _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(ahead * a.stride) as *const i8);
            }
            let lanes = (a.n - j0).min(C);
            for c in 0..C {
                if C > 1 && c >= lanes {
                    break;
                }
                let j = j0 + c;
                let row = v.add(at(j) * a.stride);
                let vals: [L::V; D] = std::array::from_fn(|k| L::load_f16(row.add(L::LANES * k)));
                for (h, acc) in acc.iter_mut().enumerate() {
                    let s = L::splat(*x.add(h * a.x_stride + j));
                    for (k, acc) in acc.iter_mut().enumerate() {
                        acc[c] = L::fma(s, vals[k], acc[c]);
                    }
                }
            }
            j0 += a.chains;
        }
        for (h, acc) in acc.iter().enumerate() {
            for (k, acc) in acc.iter().enumerate() {
                let at = done.add((h * D + k) * 64 + q);
                std::ptr::copy_nonoverlapping(acc.as_ptr(), at, C);
            }
        }
    }
}

/// [`HalfChainsFn`] for `H` heads and `D` registers of dimensions from `dim`: the passes of
/// `C` chains, then each head's chains combined (64: `(c[l] + c[32+l]) + (c[16+l] + c[48+l])`)
/// and added by the halving tree.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn chains_slice<L: ChainLanes, const H: usize, const D: usize, const C: usize>(
    a: &Chains,
    h0: usize,
    dim: usize,
) {
    unsafe {
        // Each head's and register's chains: written by the passes, the ones no row reaches
        // zeroed (not the whole array: short sequences would spend their time clearing it).
        let mut done = std::mem::MaybeUninit::<[[[L::V; 64]; D]; H]>::uninit();
        let base = done.as_mut_ptr() as *mut L::V;
        let passed = a.chains.min(a.n.next_multiple_of(C));
        for q in (0..passed).step_by(C) {
            chains_pass::<L, H, D, C>(a, (h0, dim, q), base);
        }
        for hk in 0..H * D {
            for q in passed..a.chains {
                base.add(hk * 64 + q).write(L::zero());
            }
        }
        // Only the chains in use are read (the first 16 of 64 are written for 16).
        for h in 0..H {
            for k in 0..D {
                let chain = |l: usize| base.add((h * D + k) * 64 + l).read();
                let mut c: [L::V; 16] = std::array::from_fn(&chain);
                if a.chains == 64 {
                    for (l, c) in c.iter_mut().enumerate() {
                        *c = L::add(
                            L::add(chain(l), chain(32 + l)),
                            L::add(chain(16 + l), chain(48 + l)),
                        );
                    }
                }
                let mut half = 16;
                while half > 1 {
                    half /= 2;
                    for i in 0..half {
                        c[i] = L::add(c[i], c[i + half]);
                    }
                }
                let out = a.out.add((h0 + h) * a.out_stride + dim + L::LANES * k);
                L::store(out, c[0]);
            }
        }
    }
}

/// [`HalfChainsFn`] with AVX-512: slices of 32 dimensions (16 at the end), the passes'
/// chains sized to sixteen accumulators.
///
/// # Safety
/// See [`HalfChainsFn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn chains_avx512(a: &Chains) {
    #[target_feature(enable = "avx512f")]
    unsafe fn heads<const H: usize>(a: &Chains, h0: usize) {
        unsafe {
            let mut dim = 0;
            while dim < a.d {
                if a.d - dim >= 32 {
                    match H {
                        1 => chains_slice::<Zmm, 1, 2, 8>(a, h0, dim),
                        2 => chains_slice::<Zmm, 2, 2, 4>(a, h0, dim),
                        3 => chains_slice::<Zmm, 3, 2, 2>(a, h0, dim),
                        _ => chains_slice::<Zmm, 4, 2, 2>(a, h0, dim),
                    }
                    dim += 32;
                } else {
                    match H {
                        1 => chains_slice::<Zmm, 1, 1, 16>(a, h0, dim),
                        2 => chains_slice::<Zmm, 2, 1, 8>(a, h0, dim),
                        3 => chains_slice::<Zmm, 3, 1, 4>(a, h0, dim),
                        _ => chains_slice::<Zmm, 4, 1, 4>(a, h0, dim),
                    }
                    dim += 16;
                }
            }
        }
    }
    unsafe { by_four_heads!(heads, a) }
}

/// [`HalfChainsFn`] with AVX2: slices of 16 dimensions, the passes' chains sized to eight
/// accumulators (of the sixteen registers).
///
/// # Safety
/// See [`HalfChainsFn`]; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn chains_avx2(a: &Chains) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn heads<const H: usize>(a: &Chains, h0: usize) {
        unsafe {
            for dim in (0..a.d).step_by(16) {
                match H {
                    1 => chains_slice::<Ymm, 1, 2, 4>(a, h0, dim),
                    2 => chains_slice::<Ymm, 2, 2, 2>(a, h0, dim),
                    3 => chains_slice::<Ymm, 3, 2, 1>(a, h0, dim),
                    _ => chains_slice::<Ymm, 4, 2, 1>(a, h0, dim),
                }
            }
        }
    }
    unsafe { by_four_heads!(heads, a) }
}

/// [`vec_f16_scalar`] for several tokens.
///
/// # Safety
/// See [`HalfDotTokensFn`].
pub unsafe fn vec_f16_scalar_tokens(
    x: *const f32,
    tokens: usize,
    w: *const u16,
    k: usize,
    out: *mut f32,
    out_stride: usize,
) {
    unsafe { tokens_by_one(vec_f16_scalar, (x, tokens, w, k), (out, out_stride)) }
}

/// [`vec_f16_avx2`] for several tokens.
///
/// # Safety
/// See [`HalfDotTokensFn`]; the CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub unsafe fn vec_f16_avx2_tokens(
    x: *const f32,
    tokens: usize,
    w: *const u16,
    k: usize,
    out: *mut f32,
    out_stride: usize,
) {
    unsafe { tokens_by_one(vec_f16_avx2, (x, tokens, w, k), (out, out_stride)) }
}

/// [`vec_f16_avx512`] for up to four tokens at a time: each 64 values of the row converted
/// once, every token's four chains fed from them.
///
/// # Safety
/// See [`HalfDotTokensFn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn vec_f16_avx512_tokens(
    x: *const f32,
    tokens: usize,
    w: *const u16,
    k: usize,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const T: usize>(
        x: *const f32,
        w: *const u16,
        k: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe {
            let np = k & !63;
            let mut acc = [[_mm512_setzero_ps(); 4]; T];
            let mut i = 0;
            while i < np {
                // As the one-row dot: the next rows, 8 KiB ahead.
                let ahead = w.wrapping_add(i + 4096) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                for j in 0..4 {
                    let wv =
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.add(i + 16 * j) as *const __m256i));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(x.add(t * k + i + 16 * j));
                        acc[j] = _mm512_fmadd_ps(xv, wv, acc[j]);
                    }
                }
                i += 64;
            }
            for (t, acc) in acc.iter().enumerate() {
                let r = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
                let mut lanes = [0.0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), r);
                *out.add(t * out_stride) = gemv_tail(reduce16(lanes), x.add(t * k), w, np, k);
            }
        }
    }
    unsafe {
        let mut t = 0;
        while t < tokens {
            let (x, out) = (x.add(t * k), out.add(t * out_stride));
            match tokens - t {
                1 => group::<1>(x, w, k, out, out_stride),
                2 => group::<2>(x, w, k, out, out_stride),
                3 => group::<3>(x, w, k, out, out_stride),
                _ => group::<4>(x, w, k, out, out_stride),
            }
            t += 4;
        }
    }
}

/// The two f16 dot orders for one host.
#[derive(Clone, Copy, Debug)]
pub struct HalfDots {
    pub variant: &'static str,
    /// ggml's GEMV order.
    pub gemv: HalfDotFn,
    /// tinyBLAS's order (`k` a multiple of 16).
    pub gemm: HalfDotFn,
    /// `gemv` for sixteen rows.
    pub gemv16: HalfDots16Fn,
    /// `gemm` for sixteen rows.
    pub gemm16: HalfDots16Fn,
    /// `gemv` for several tokens.
    pub gemv_tokens: HalfDotTokensFn,
    /// Attention's weighted values, when the host has a vector kernel for them.
    pub chains: Option<HalfChainsFn>,
}

impl HalfDots {
    /// The fastest exact set this host runs; `portable` forces the scalar one.
    pub fn select(portable: bool) -> HalfDots {
        if portable {
            return HalfDots::SCALAR;
        }
        *HalfDots::variants().last().unwrap_or(&HalfDots::SCALAR)
    }

    /// Every set this host runs, slowest first (all give the same bits).
    pub fn variants() -> Vec<HalfDots> {
        #[allow(unused_mut)]
        let mut all = vec![HalfDots::SCALAR];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &[bool]| f.iter().all(|&b| b);
            use std::arch::is_x86_feature_detected as x86;
            if has(&[x86!("avx2"), x86!("fma"), x86!("f16c")]) {
                all.push(HalfDots {
                    variant: "avx2",
                    gemv: vec_f16_avx2,
                    gemm: tinyblas16_avx2,
                    gemv16: vec_f16_avx2_x16,
                    gemm16: tinyblas16_avx2_x16,
                    gemv_tokens: vec_f16_avx2_tokens,
                    chains: Some(chains_avx2),
                });
            }
            if x86!("avx512f") {
                all.push(HalfDots {
                    variant: "avx512",
                    gemv: vec_f16_avx512,
                    gemm: tinyblas16_avx512,
                    gemv16: vec_f16_avx512_x16,
                    gemm16: tinyblas16_avx512_x16,
                    gemv_tokens: vec_f16_avx512_tokens,
                    chains: Some(chains_avx512),
                });
            }
        }
        all
    }

    const SCALAR: HalfDots = HalfDots {
        variant: "scalar",
        gemv: vec_f16_scalar,
        gemm: tinyblas16_scalar,
        gemv16: vec_f16_scalar_x16,
        gemm16: tinyblas16_scalar_x16,
        gemv_tokens: vec_f16_scalar_tokens,
        chains: None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnetc_ir::numerics::{dot_ggml_vec_f16, dot_tinyblas16};

    #[test]
    fn every_variant_equals_the_numerics_bit_for_bit() {
        for k in [16, 32, 64, 80, 128, 200, 2560] {
            let x = floats(k, 3);
            let w = halves(k, 4);
            let wf: Vec<f32> = w.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
            let gemv = dot_ggml_vec_f16(&x, &wf);
            let gemm = dot_tinyblas16(&x, &wf);
            for dots in HalfDots::variants() {
                let got = unsafe { (dots.gemv)(x.as_ptr(), w.as_ptr(), k) };
                assert_eq!(got.to_bits(), gemv.to_bits(), "{} gemv k={k}", dots.variant);
                if k % 16 == 0 {
                    let got = unsafe { (dots.gemm)(x.as_ptr(), w.as_ptr(), k) };
                    assert_eq!(got.to_bits(), gemm.to_bits(), "{} gemm k={k}", dots.variant);
                }
            }
        }
    }

    /// `n` pseudo-random f32 values in (−5, 5) with every mantissa bit in use, so that sums in
    /// another order round differently (products of f16 values alone would add exactly).
    fn floats(n: usize, seed: u64) -> Vec<f32> {
        halves(n, seed)
            .iter()
            .map(|&b| f16::from_bits(b).to_f32() * 1.234_567_9)
            .collect()
    }

    /// `n` pseudo-random f16 values in (−4, 4), as bits.
    fn halves(n: usize, seed: u64) -> Vec<u16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0).to_bits()
            })
            .collect()
    }

    #[test]
    fn several_tokens_equal_single_dots() {
        for (k, tokens) in [
            (16, 1),
            (64, 2),
            (100, 3),
            (128, 4),
            (200, 5),
            (2560, 7),
            (64, 9),
        ] {
            let w = halves(k, k as u64);
            let x = floats(tokens * k, 5);
            for dots in HalfDots::variants() {
                let out_stride = 3;
                let mut out = vec![f32::NAN; tokens * out_stride];
                unsafe {
                    (dots.gemv_tokens)(x.as_ptr(), tokens, w.as_ptr(), k, out.as_mut_ptr(), 3)
                };
                for t in 0..tokens {
                    let expect = unsafe { (dots.gemv)(x[t * k..].as_ptr(), w.as_ptr(), k) };
                    assert_eq!(
                        out[t * out_stride].to_bits(),
                        expect.to_bits(),
                        "{} k={k} token {t}",
                        dots.variant
                    );
                    assert!(out[t * out_stride + 1].is_nan());
                }
            }
        }
    }

    #[test]
    fn sixteen_rows_equal_sixteen_single_dots() {
        for (k, heads) in [
            (16, 1),
            (48, 2),
            (64, 3),
            (80, 4),
            (128, 5),
            (200, 7),
            (128, 8),
        ] {
            let stride = k + 24;
            let w = halves(16 * stride, k as u64);
            let x = floats(heads * k, 7);
            for dots in HalfDots::variants() {
                let out_stride = 19;
                let mut out = vec![f32::NAN; heads * out_stride];
                let rows = Rows16 {
                    x: x.as_ptr(),
                    heads,
                    w: w.as_ptr(),
                    stride,
                    k,
                    out: out.as_mut_ptr(),
                    out_stride,
                };
                for (name, many, one) in [
                    ("gemv", dots.gemv16, dots.gemv),
                    ("gemm", dots.gemm16, dots.gemm),
                ] {
                    if name == "gemm" && k % 16 != 0 {
                        continue;
                    }
                    unsafe { many(&rows) };
                    for h in 0..heads {
                        for r in 0..16 {
                            let expect =
                                unsafe { one(x[h * k..].as_ptr(), w[r * stride..].as_ptr(), k) };
                            let got = out[h * out_stride + r];
                            assert_eq!(
                                got.to_bits(),
                                expect.to_bits(),
                                "{} {name} k={k} head {h} row {r}",
                                dots.variant
                            );
                        }
                    }
                }
            }
        }
    }

    /// [`HalfChainsFn`] as its definition reads, one dimension at a time.
    fn chains_reference(x: &[f32], v: &[u16], stride: usize, d: usize, chains: usize) -> Vec<f32> {
        let mut acc = vec![vec![0.0f32; d]; chains];
        for (j, &xj) in x.iter().enumerate() {
            for (dim, a) in acc[j % chains].iter_mut().enumerate() {
                *a = xj.mul_add(f16::from_bits(v[j * stride + dim]).to_f32(), *a);
            }
        }
        if chains == 64 {
            for l in 0..16 {
                acc[l] = (0..d)
                    .map(|m| (acc[l][m] + acc[32 + l][m]) + (acc[16 + l][m] + acc[48 + l][m]))
                    .collect();
            }
        }
        (0..d)
            .map(|dim| reduce16(std::array::from_fn(|l| acc[l][dim])))
            .collect()
    }

    #[test]
    fn the_chains_kernel_adds_in_the_reference_order() {
        let kernels: Vec<_> = HalfDots::variants()
            .into_iter()
            .filter_map(|v| Some((v.variant, v.chains?)))
            .collect();
        // Lengths below one group of chains, ending inside one, over many; every head count
        // a pass takes, and slices of 32 and 16 dimensions.
        for (d, n, heads) in [
            (16, 1, 1),
            (64, 17, 2),
            (128, 64, 4),
            (128, 100, 3),
            (80, 300, 5),
            (128, 601, 4),
            (32, 512, 1),
        ] {
            let stride = 5 * d;
            let x_stride = n + 7;
            let v = halves(n * stride, n as u64);
            // Scores of a softmax: small, positive, some exactly zero.
            let x: Vec<f32> = floats(heads * x_stride, 3)
                .iter()
                .enumerate()
                .map(|(j, &v)| if j % 7 == 3 { 0.0 } else { v.abs() / 4.0 })
                .collect();
            // The same rows grouped by position modulo 64, runs of `run` rows (one spare).
            let run = n.div_ceil(64) + 1;
            let mut grouped = vec![0u16; 64 * run * stride];
            for j in 0..n {
                let at = value_row(j, run);
                grouped[at * stride..][..stride].copy_from_slice(&v[j * stride..][..stride]);
            }
            for (chains, (rows, run)) in [16, 64]
                .into_iter()
                .flat_map(|c| [(c, (&v, 0)), (c, (&grouped, run))])
            {
                let out_stride = d + 3;
                for &(variant, chains_fn) in &kernels {
                    let mut got = vec![f32::NAN; heads * out_stride];
                    let a = Chains {
                        x: x.as_ptr(),
                        x_stride,
                        heads,
                        n,
                        v: rows.as_ptr(),
                        stride,
                        run,
                        d,
                        chains,
                        out: got.as_mut_ptr(),
                        out_stride,
                    };
                    unsafe { chains_fn(&a) };
                    for h in 0..heads {
                        let expect =
                            chains_reference(&x[h * x_stride..][..n], &v, stride, d, chains);
                        for dim in 0..d {
                            assert_eq!(
                                got[h * out_stride + dim].to_bits(),
                                expect[dim].to_bits(),
                                "{variant}: d={d} n={n} chains={chains} run={run} head {h} dim {dim}"
                            );
                        }
                    }
                }
            }
        }
    }
}
