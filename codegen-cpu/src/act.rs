//! Per-token activation quantization for the ternary matmul: bitnet.cpp's absmax int8
//! (`numerics::quant_act_i8`), exactly, with the row's sum of codes that the I2_S epilogue
//! subtracts.

use bitnetc_ir::numerics;

/// Quantizes `x` into `q` (same length); returns the multiplier `s` and `Σ q`.
///
/// # Safety
/// The CPU must have the features of the variant.
pub type QuantFn = unsafe fn(x: &[f32], q: &mut [i8]) -> (f32, i32);

/// The reference, element by element.
///
/// # Safety
/// Always safe to call; `unsafe` only to share [`QuantFn`]'s type.
pub unsafe fn quant_scalar(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let s = numerics::quant_act_i8(x, q);
    (s, q.iter().map(|&v| v as i32).sum())
}

/// The multiplier from the vector part's max `max` and the elements past it (`tail`), or
/// `None` where a NaN or an infinity sends the row to the scalar path.
#[cfg(target_arch = "x86_64")]
fn multiplier(max: f32, unordered: bool, tail: &[f32]) -> Option<f32> {
    let max = tail.iter().fold(max, |m, &v| m.max(v.abs()));
    if unordered || tail.iter().any(|v| v.is_nan()) || !max.is_finite() {
        return None;
    }
    Some((127.0 / (max as f64).max(1e-5)) as f32)
}

/// The elements from `from` on, one at a time, as the reference; returns their codes' sum.
#[cfg(target_arch = "x86_64")]
fn quant_tail(x: &[f32], q: &mut [i8], from: usize, s: f32) -> i32 {
    let mut total = 0;
    for (q, &x) in q[from..].iter_mut().zip(&x[from..]) {
        let v = numerics::nearest_int(x * s).clamp(-128, 127);
        *q = v as i8;
        total += v;
    }
    total
}

/// AVX-512: the same max (an f32 max is exact), the same f64 division, then per element the
/// same f32 product, round-half-even conversion (MXCSR's default) and saturation to int8.
/// Rows holding a NaN or an infinity take the scalar path, whose NaN handling differs.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn quant_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = x.len().min(q.len());
    let body = n & !15;
    let mut vmax = _mm512_setzero_ps();
    let mut unordered: u16 = 0;
    unsafe {
        for i in (0..body).step_by(16) {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        }
    }
    let max = _mm512_reduce_max_ps(vmax);
    let Some(s) = multiplier(max, unordered != 0, &x[body..n]) else {
        // SAFETY: the scalar variant has no requirements.
        return unsafe { quant_scalar(x, q) };
    };
    let sv = _mm512_set1_ps(s);
    let (lo, hi) = (_mm512_set1_epi32(-128), _mm512_set1_epi32(127));
    let mut sum = _mm512_setzero_si512();
    unsafe {
        for i in (0..body).step_by(16) {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), sv);
            let r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
            sum = _mm512_add_epi32(sum, r);
            _mm_storeu_si128(
                q.as_mut_ptr().add(i) as *mut __m128i,
                _mm512_cvtepi32_epi8(r),
            );
        }
    }
    (
        s,
        _mm512_reduce_add_epi32(sum) + quant_tail(&x[..n], &mut q[..n], body, s),
    )
}

/// [`quant_avx512`] with AVX2, eight lanes at a time: the same max, product, rounding and
/// saturation.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn quant_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = x.len().min(q.len());
    let body = n & !7;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut vmax = _mm256_setzero_ps();
    let mut unordered = 0;
    unsafe {
        for i in (0..body).step_by(8) {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            unordered |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs));
        }
    }
    let mut lanes = [0.0f32; 8];
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
    let max = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    let Some(s) = multiplier(max, unordered != 0, &x[body..n]) else {
        // SAFETY: the scalar variant has no requirements.
        return unsafe { quant_scalar(x, q) };
    };
    let sv = _mm256_set1_ps(s);
    let (lo, hi) = (_mm256_set1_epi32(-128), _mm256_set1_epi32(127));
    let mut sum = _mm256_setzero_si256();
    let mut codes = [0i32; 8];
    unsafe {
        for i in (0..body).step_by(8) {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sv);
            let r = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(v), lo), hi);
            sum = _mm256_add_epi32(sum, r);
            _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, r);
            for (d, &c) in q[i..i + 8].iter_mut().zip(&codes) {
                *d = c as i8;
            }
        }
    }
    let mut sums = [0i32; 8];
    unsafe { _mm256_storeu_si256(sums.as_mut_ptr() as *mut __m256i, sum) };
    (
        s,
        sums.iter().sum::<i32>() + quant_tail(&x[..n], &mut q[..n], body, s),
    )
}

/// Every variant this host runs, slowest first.
pub fn quant_variants() -> Vec<(&'static str, QuantFn)> {
    #[allow(unused_mut)]
    let mut all: Vec<(&'static str, QuantFn)> = vec![("scalar", quant_scalar)];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            all.push(("avx2", quant_avx2));
        }
        if std::is_x86_feature_detected!("avx512f") {
            all.push(("avx512", quant_avx512));
        }
    }
    all
}

/// The fastest exact variant for this host; `portable` forces the scalar one.
pub fn select_quant(portable: bool) -> (&'static str, QuantFn) {
    let all = quant_variants();
    if portable { all[0] } else { all[all.len() - 1] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_equals_the_reference() {
        let mut s = 11u64;
        let mut rows: Vec<Vec<f32>> = (0..50)
            .map(|r| {
                (0..(16 * r + r % 7))
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1.0 + r as f32)
                    })
                    .collect()
            })
            .collect();
        // Halves that round to even, zeros, a NaN and an infinity.
        rows.push(vec![
            0.5,
            -127.0,
            1.5,
            2.5,
            -0.5,
            200.0 / 3.0,
            0.0,
            3.0,
            0.5,
            0.5,
            1.0,
            2.0,
            9.0,
            1.0,
            1.0,
            1.0,
            5.5,
        ]);
        rows.push(vec![0.0; 32]);
        rows.push(
            (0..32)
                .map(|i| if i == 3 { f32::NAN } else { i as f32 })
                .collect(),
        );
        rows.push(
            (0..32)
                .map(|i| if i == 5 { f32::INFINITY } else { i as f32 })
                .collect(),
        );
        for (name, f) in quant_variants() {
            for x in &rows {
                let mut want = vec![0i8; x.len()];
                let s = numerics::quant_act_i8(x, &mut want);
                let mut got = vec![0i8; x.len()];
                let (gs, sum) = unsafe { f(x, &mut got) };
                assert_eq!(gs.to_bits(), s.to_bits(), "{name}");
                assert_eq!(got, want, "{name}");
                assert_eq!(sum, want.iter().map(|&v| v as i32).sum::<i32>(), "{name}");
            }
        }
    }
}
