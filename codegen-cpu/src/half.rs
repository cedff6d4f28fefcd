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

/// The two f16 dot orders for one host.
#[derive(Clone, Copy, Debug)]
pub struct HalfDots {
    pub variant: &'static str,
    /// ggml's GEMV order.
    pub gemv: HalfDotFn,
    /// tinyBLAS's order (`k` a multiple of 16).
    pub gemm: HalfDotFn,
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
            };
        }
        let _ = portable;
        HalfDots {
            variant: "scalar",
            gemv: vec_f16_scalar,
            gemm: tinyblas16_scalar,
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
}
