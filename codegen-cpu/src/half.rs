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

/// The same dot for sixteen rows `w + r·stride` (`r` in `0..16`) into `out[r]`, each exactly as
/// the row alone gives it: attention's scores, sixteen cached keys at a time.
///
/// # Safety
/// `x` must hold `k` elements, each row `k` elements, `out` 16; the CPU must have the features
/// of the variant.
pub type HalfDots16Fn =
    unsafe fn(x: *const f32, w: *const u16, stride: usize, k: usize, out: *mut f32);

/// Attention's weighted sum of value rows in the reference's chain order: for `j < n`, chain
/// `j % chains` (16 or 64) gathers `x[j]·v[j][dim]` by fused multiply-adds in order of `j`;
/// with 64 chains, chain `l < 16` then becomes `(c[l] + c[32+l]) + (c[16+l] + c[48+l])`; the
/// sixteen are added by `_mm512_reduce_add_ps`'s halving tree into `out[dim]`, for every
/// `dim < d`. Rows `v + j·stride` hold `d` f16 values.
///
/// # Safety
/// `x` must hold `n` values, every row `d`, `out` `d`; `chains` is 16 or 64 and `d` a multiple
/// of 16; the CPU must have the features of the variant.
pub type HalfChainsFn = unsafe fn(
    x: *const f32,
    n: usize,
    v: *const u16,
    stride: usize,
    d: usize,
    chains: usize,
    out: *mut f32,
);

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
    let mut sum = reduce16(r) as f64;
    for e in np..k {
        sum += (x[e] * f16::from_bits(w[e]).to_f32()) as f64;
    }
    sum as f32
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
        let mut sum = reduce16(lanes) as f64;
        for e in np..k {
            sum += (*x.add(e) * f16::from_bits(*w.add(e)).to_f32()) as f64;
        }
        sum as f32
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

/// [`vec_f16_scalar`] row by row.
///
/// # Safety
/// See [`HalfDots16Fn`].
pub unsafe fn vec_f16_scalar_x16(
    x: *const f32,
    w: *const u16,
    stride: usize,
    k: usize,
    out: *mut f32,
) {
    for r in 0..16 {
        unsafe { *out.add(r) = vec_f16_scalar(x, w.add(r * stride), k) };
    }
}

/// [`tinyblas16_scalar`] row by row.
///
/// # Safety
/// See [`HalfDots16Fn`].
pub unsafe fn tinyblas16_scalar_x16(
    x: *const f32,
    w: *const u16,
    stride: usize,
    k: usize,
    out: *mut f32,
) {
    for r in 0..16 {
        unsafe { *out.add(r) = tinyblas16_scalar(x, w.add(r * stride), k) };
    }
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

/// [`vec_f16_avx512`] for sixteen rows: four rows at a time through the same four chains per
/// row, then the sixteen reductions together.
///
/// # Safety
/// See [`HalfDots16Fn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn vec_f16_avx512_x16(
    x: *const f32,
    w: *const u16,
    stride: usize,
    k: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    unsafe {
        let np = k & !63;
        let mut r = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut i = 0;
            while i < np {
                for j in 0..4 {
                    let xv = _mm512_loadu_ps(x.add(i + 16 * j));
                    for (row, a) in acc.iter_mut().enumerate() {
                        let wr = w.add((4 * g + row) * stride + i + 16 * j);
                        let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wr as *const __m256i));
                        a[j] = _mm512_fmadd_ps(xv, wv, a[j]);
                    }
                }
                i += 64;
            }
            for (row, a) in acc.iter().enumerate() {
                r[4 * g + row] =
                    _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            }
        }
        let sums = reduce_add_x16(&r);
        if np == k {
            return _mm512_storeu_ps(out, sums);
        }
        let mut lanes = [0.0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
        for (row, &lane) in lanes.iter().enumerate() {
            let mut sum = lane as f64;
            for e in np..k {
                let wv = f16::from_bits(*w.add(row * stride + e)).to_f32();
                sum += (*x.add(e) * wv) as f64;
            }
            *out.add(row) = sum as f32;
        }
    }
}

/// [`tinyblas16_avx512`] for sixteen rows, one chain each.
///
/// # Safety
/// See [`HalfDots16Fn`]; `k` a multiple of 16; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn tinyblas16_avx512_x16(
    x: *const f32,
    w: *const u16,
    stride: usize,
    k: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut i = 0;
        while i + 16 <= k {
            let xv = _mm512_loadu_ps(x.add(i));
            for (row, a) in acc.iter_mut().enumerate() {
                let wv =
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.add(row * stride + i) as *const __m256i));
                *a = _mm512_fmadd_ps(xv, wv, *a);
            }
            i += 16;
        }
        _mm512_storeu_ps(out, reduce_add_x16(&acc));
    }
}

/// [`HalfChainsFn`] with AVX-512: sixteen dimensions at a time, each chain a register.
///
/// # Safety
/// See [`HalfChainsFn`]; the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn chains_avx512(
    x: *const f32,
    n: usize,
    v: *const u16,
    stride: usize,
    d: usize,
    chains: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    /// Chains `c[i]` += `x[j]·v[j]` for `j = first + i`, `first + chains + i`, … below `n`.
    #[inline(always)]
    unsafe fn run(
        c: &mut [__m512; 16],
        x: *const f32,
        n: usize,
        v: *const u16,
        stride: usize,
        first: usize,
        step: usize,
    ) {
        unsafe {
            let mut j0 = first;
            while j0 + 16 <= n {
                for (i, c) in c.iter_mut().enumerate() {
                    let vr = v.add((j0 + i) * stride) as *const __m256i;
                    let vv = _mm512_cvtph_ps(_mm256_loadu_si256(vr));
                    *c = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(j0 + i)), vv, *c);
                }
                j0 += step;
            }
            for (i, c) in c.iter_mut().enumerate().take(n.saturating_sub(j0)) {
                let vv = _mm512_cvtph_ps(_mm256_loadu_si256(
                    v.add((j0 + i) * stride) as *const __m256i
                ));
                *c = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(j0 + i)), vv, *c);
            }
        }
    }
    unsafe {
        for dim in (0..d).step_by(16) {
            let vd = v.add(dim);
            let mut c = [_mm512_setzero_ps(); 16];
            if chains == 64 {
                // Chains 16m + i, m = 0..3, a quarter at a time.
                let mut part = [[_mm512_setzero_ps(); 16]; 4];
                for (m, p) in part.iter_mut().enumerate() {
                    run(p, x, n, vd, stride, 16 * m, 64);
                }
                for (l, c) in c.iter_mut().enumerate() {
                    *c = _mm512_add_ps(
                        _mm512_add_ps(part[0][l], part[2][l]),
                        _mm512_add_ps(part[1][l], part[3][l]),
                    );
                }
            } else {
                run(&mut c, x, n, vd, stride, 0, 16);
            }
            let mut half = 16;
            while half > 1 {
                half /= 2;
                for i in 0..half {
                    c[i] = _mm512_add_ps(c[i], c[i + half]);
                }
            }
            _mm512_storeu_ps(out.add(dim), c[0]);
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
    /// Attention's weighted values, when the host has a vector kernel for them.
    pub chains: Option<HalfChainsFn>,
}

impl HalfDots {
    /// The fastest exact pair this host runs; `portable` forces the scalar pair.
    pub fn select(portable: bool) -> HalfDots {
        #[cfg(target_arch = "x86_64")]
        if !portable && std::is_x86_feature_detected!("avx512f") {
            return HalfDots {
                variant: "avx512",
                gemv: vec_f16_avx512,
                gemm: tinyblas16_avx512,
                gemv16: vec_f16_avx512_x16,
                gemm16: tinyblas16_avx512_x16,
                chains: Some(chains_avx512),
            };
        }
        let _ = portable;
        HalfDots {
            variant: "scalar",
            gemv: vec_f16_scalar,
            gemm: tinyblas16_scalar,
            gemv16: vec_f16_scalar_x16,
            gemm16: tinyblas16_scalar_x16,
            chains: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnetc_ir::numerics::{dot_ggml_vec_f16, dot_tinyblas16};

    #[test]
    fn every_variant_equals_the_numerics_bit_for_bit() {
        let mut s = 3u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        };
        for k in [16, 32, 64, 80, 128, 200, 2560] {
            let x: Vec<f32> = (0..k).map(|_| f16::from_f32(next()).to_f32()).collect();
            let w: Vec<u16> = (0..k).map(|_| f16::from_f32(next()).to_bits()).collect();
            let wf: Vec<f32> = w.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
            let gemv = dot_ggml_vec_f16(&x, &wf);
            let gemm = dot_tinyblas16(&x, &wf);
            for dots in [HalfDots::select(true), HalfDots::select(false)] {
                let got = unsafe { (dots.gemv)(x.as_ptr(), w.as_ptr(), k) };
                assert_eq!(got.to_bits(), gemv.to_bits(), "{} gemv k={k}", dots.variant);
                if k % 16 == 0 {
                    let got = unsafe { (dots.gemm)(x.as_ptr(), w.as_ptr(), k) };
                    assert_eq!(got.to_bits(), gemm.to_bits(), "{} gemm k={k}", dots.variant);
                }
            }
        }
    }

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
    fn sixteen_rows_equal_sixteen_single_dots() {
        for k in [16, 48, 64, 80, 128, 200] {
            let stride = k + 24;
            let w = halves(16 * stride, k as u64);
            let x: Vec<f32> = halves(k, 7)
                .iter()
                .map(|&b| f16::from_bits(b).to_f32())
                .collect();
            for dots in [HalfDots::select(true), HalfDots::select(false)] {
                let mut out = [0.0f32; 16];
                unsafe { (dots.gemv16)(x.as_ptr(), w.as_ptr(), stride, k, out.as_mut_ptr()) };
                for (r, &got) in out.iter().enumerate() {
                    let one = unsafe { (dots.gemv)(x.as_ptr(), w[r * stride..].as_ptr(), k) };
                    assert_eq!(
                        got.to_bits(),
                        one.to_bits(),
                        "{} gemv16 k={k} row {r}",
                        dots.variant
                    );
                }
                if k % 16 == 0 {
                    unsafe { (dots.gemm16)(x.as_ptr(), w.as_ptr(), stride, k, out.as_mut_ptr()) };
                    for (r, &got) in out.iter().enumerate() {
                        let one = unsafe { (dots.gemm)(x.as_ptr(), w[r * stride..].as_ptr(), k) };
                        assert_eq!(
                            got.to_bits(),
                            one.to_bits(),
                            "{} gemm16 k={k} row {r}",
                            dots.variant
                        );
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
        let Some(chains_fn) = HalfDots::select(false).chains else {
            return;
        };
        for (d, n) in [
            (16, 1),
            (64, 17),
            (128, 64),
            (128, 100),
            (80, 200),
            (128, 301),
        ] {
            let stride = 5 * d;
            let v = halves(n * stride, n as u64);
            // Scores of a softmax: small, positive, some exactly zero.
            let x: Vec<f32> = halves(n, 3)
                .iter()
                .enumerate()
                .map(|(j, &b)| {
                    if j % 7 == 3 {
                        0.0
                    } else {
                        f16::from_bits(b).to_f32().abs() / 4.0
                    }
                })
                .collect();
            for chains in [16, 64] {
                let expect = chains_reference(&x, &v, stride, d, chains);
                let mut got = vec![0.0f32; d];
                unsafe {
                    chains_fn(
                        x.as_ptr(),
                        n,
                        v.as_ptr(),
                        stride,
                        d,
                        chains,
                        got.as_mut_ptr(),
                    )
                };
                for dim in 0..d {
                    assert_eq!(
                        got[dim].to_bits(),
                        expect[dim].to_bits(),
                        "d={d} n={n} chains={chains} dim {dim}"
                    );
                }
            }
        }
    }
}
