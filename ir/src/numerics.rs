//! The exact arithmetic of the reference engines (FORMATS.md §3.3, §4.5, §8b), one function
//! per step. The interpreter is built from these, and compiled kernels are tested against them.

use half::{bf16, f16};

/// ggml's `nearest_int`: round half to even (the `x + 1.5·2^23` trick, valid for |x| < 2^22).
pub fn nearest_int(x: f32) -> i32 {
    round_small(x) as i32
}

/// `x` rounded half to even, for |x| < 2^22: adding and taking away `1.5·2^23` leaves no
/// fraction bits (`f32::round_ties_even` is a libm call on the x86-64 baseline).
#[inline]
pub fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12582912.0;
    (x + MAGIC) - MAGIC
}

/// ggml RMSNorm of one row, times a gain: the sum of `(f32)(x·x)` in f64, `mean` rounded to
/// f32, `scale = 1/sqrtf(mean + eps)`, `y = (x·scale)·w`.
#[inline]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0f32 / (mean + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = (x * scale) * w;
    }
}

/// bitnet.cpp's per-token int8 quantization (`quantize_row_i8_s`): `s = (f32)(127/max(|x|,
/// 1e-5))` with the max and the division in f64, `q = clamp(nearest_int(x·s), −128, 127)`.
/// Returns the multiplier `s`.
pub fn quant_act_i8(x: &[f32], q: &mut [i8]) -> f32 {
    let max = x
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()))
        .max(1e-5);
    let s = (127.0 / max) as f32;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest_int(v * s).clamp(-128, 127) as i8;
    }
    s
}

/// bitnet.cpp's I2_S epilogue: `(((f32)S1 − (f32)S0) / s) · β` with `S1 − S0 = Σ(c−1)·q`.
pub fn i2s_epilogue(sum: i32, act_scale: f32, weight_scale: f32) -> f32 {
    (sum as f32 / act_scale) * weight_scale
}

/// Rounds to f16 and back, as ggml does when it converts activations for an F16 dot product.
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds to bf16 and back.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// A 32-element activation block in Q8_0/Q8_1 form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Q8Block {
    /// Scale, already rounded to f16 (as stored).
    pub d: f32,
    /// `f16(d·Σq)` with the unrounded d (Q8_1 only).
    pub s: f32,
    pub qs: [i8; 32],
}

/// llama.cpp's x86 activation quantization for Q8_0 and Q8_1 (`quantize_row_q8_0/1`, AVX2
/// path): `d = amax/127` stored as f16, `q = round_half_even(x · (127/amax))`.
pub fn quantize_q8_x86(x: &[f32]) -> Vec<Q8Block> {
    let mut out = Vec::with_capacity(x.len() / 32);
    quantize_q8_x86_into(x, &mut out);
    out
}

/// [`quantize_q8_x86`], appending the blocks to `out`.
pub fn quantize_q8_x86_into(x: &[f32], out: &mut Vec<Q8Block>) {
    out.extend(x.chunks_exact(32).map(|b| {
        let mut block = Q8Block {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        };
        (block.d, block.s) = quantize_q8_block(b, &mut block.qs);
        block
    }));
}

/// One 32-element block of [`quantize_q8_x86`]: fills `qs`, returns `(d, s)`.
pub fn quantize_q8_block(b: &[f32], qs: &mut [i8]) -> (f32, f32) {
    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(b) {
        *q = round_small(v * id) as i8;
        sum += *q as i32;
    }
    (round_f16(d), round_f16(d * sum as f32))
}

/// A 256-element activation block in Q8_K form (llama.cpp `quantize_row_q8_K_ref`, also used
/// on x86): the element of largest magnitude maps to −127.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; 256],
}

pub fn quantize_q8_k(x: &[f32]) -> Vec<Q8KBlock> {
    let mut out = Vec::with_capacity(x.len() / 256);
    quantize_q8_k_into(x, &mut out);
    out
}

/// [`quantize_q8_k`], appending the blocks to `out`.
pub fn quantize_q8_k_into(x: &[f32], out: &mut Vec<Q8KBlock>) {
    out.extend(x.chunks_exact(256).map(|b| {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in b {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let mut block = Q8KBlock {
            d: 0.0,
            qs: [0; 256],
        };
        if amax != 0.0 {
            let iscale = -127.0f32 / max;
            for (q, &v) in block.qs.iter_mut().zip(b) {
                *q = nearest_int(iscale * v).min(127) as i8;
            }
            block.d = 1.0 / iscale;
        }
        block
    }));
}

/// ggml's AVX2 block-dot accumulation: eight f32 lanes, lane `l` holding the integer sum of
/// elements `4l..4l+3` of each 32-element block, `acc[l] = fma(d, lane, acc[l])`, then
/// `hsum_float_8`.
pub struct Lanes8 {
    acc: [f32; 8],
}

impl Default for Lanes8 {
    fn default() -> Self {
        Lanes8 { acc: [0.0; 8] }
    }
}

impl Lanes8 {
    /// Adds one block: `d` times the per-lane sums of `a[i]·b[i]`.
    pub fn add_block(&mut self, d: f32, a: &[i32; 32], b: &[i8; 32]) {
        for l in 0..8 {
            let s: i32 = (4 * l..4 * l + 4).map(|i| a[i] * b[i] as i32).sum();
            self.acc[l] = d.mul_add(s as f32, self.acc[l]);
        }
    }

    /// `hsum_float_8`: `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
    pub fn sum(&self) -> f32 {
        let a = &self.acc;
        let lo = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (lo[0] + lo[2]) + (lo[1] + lo[3])
    }
}

/// One sinf/cosf pair per rotated pair of dimensions, with ggml's iterative theta:
/// `theta_scale = powf(base, −2/dims)`, theta starts at `(f32)pos` and is multiplied by
/// `theta_scale` after each pair.
pub fn rope_cache(pos: i32, base: f32, dims: usize) -> Vec<(f32, f32)> {
    let mut cache = vec![(0.0, 0.0); dims / 2];
    rope_cache_into(pos, base, dims, &mut cache);
    cache
}

/// [`rope_cache`] into `cache`, whose length is `dims / 2`.
pub fn rope_cache_into(pos: i32, base: f32, dims: usize, cache: &mut [(f32, f32)]) {
    let theta_scale = base.powf(-2.0 / dims as f32);
    let mut theta = pos as f32;
    for cs in cache {
        *cs = (theta.cos(), theta.sin());
        theta *= theta_scale;
    }
}

/// Rotates one head in place. NEOX pairs `(i, i + dims/2)`, NORM pairs `(2i, 2i + 1)`.
pub fn rope_head(x: &mut [f32], cache: &[(f32, f32)], neox: bool) {
    let half = cache.len();
    for (i, &(c, s)) in cache.iter().enumerate() {
        let (a, b) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

/// ggml's vectorized `expf` (`ggml_v_expf`, AVX-512 variant: an Arm optimized-routines
/// polynomial, max error 1.45 ulp + 0.5), evaluated lane by lane with the same fused
/// multiply-adds. ggml's softmax and SiLU use it, so their results depend on it.
#[inline(always)]
pub fn expf_ggml(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    // b = x − n·ln2, with ln2 split in two parts.
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),
        (-n).mul_add(f32::from_bits(0x3f31_7200), x),
    );
    if n.abs() > 192.0 || n.is_nan() {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17))
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)),
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0));
    // _mm512_scalef_ps: j·2^n, exact, then one rounding (f64 holds the product exactly).
    // |n| <= 192, so 2^n is a normal f64 built from its exponent bits.
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// `_mm512_reduce_add_ps`: halves added pairwise, 16 → 8 → 4 → 2 → 1.
#[inline(always)]
pub fn reduce16(mut a: [f32; 16]) -> f32 {
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

/// ggml's softmax of one row of scaled, masked scores (`ggml_vec_soft_max_f32`, AVX-512):
/// `e = expf_ggml(x − max)` sixteen at a time, each block summed in f32 by a tree and the
/// block sums added in f64, then every `e` times `(f32)(1/sum)`. Masked positions (−inf)
/// give 0 and may be left out.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f64;
    for chunk in x.chunks_mut(16) {
        let mut block = [0.0f32; 16];
        for (v, b) in chunk.iter_mut().zip(block.iter_mut()) {
            *v = expf_ggml(*v - max);
            *b = *v;
        }
        sum += reduce16(block) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x·sigmoid(x)` as ggml computes it (`ggml_v_silu`): `x / (1 + expf_ggml(−x))`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf_ggml(-x))
}

/// `relu(x)²`: ggml's `relu` then `sqr`.
#[inline]
pub fn relu2(x: f32) -> f32 {
    let r = if x > 0.0 { x } else { 0.0 };
    r * r
}

/// ggml's `ggml_vec_dot_f16` (AVX-512: steps of 64 in four 16-lane FMA accumulators, reduced
/// `(a0+a2)+(a1+a3)` then by `_mm512_reduce_add_ps`, the leftover elements added in f64).
/// Inputs are the f16 values widened to f32.
pub fn dot_ggml_vec_f16(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len();
    let np = n & !63;
    let mut acc = [[0.0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, a) in a.iter_mut().enumerate() {
                let k = i + 16 * j + l;
                *a = x[k].mul_add(y[k], *a);
            }
        }
    }
    let mut r = [0.0f32; 16];
    for l in 0..16 {
        r[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = reduce16(r) as f64;
    for k in np..n {
        sum += (x[k] * y[k]) as f64;
    }
    sum as f32
}

/// llamafile's tinyBLAS dot (AVX-512, 16 lanes): lane `l` accumulates elements `l, l+16, …`
/// with FMAs in order, then `_mm512_reduce_add_ps`.
pub fn dot_tinyblas16(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for (i, (&a, &b)) in x.iter().zip(y).enumerate() {
        acc[i % 16] = a.mul_add(b, acc[i % 16]);
    }
    reduce16(acc)
}

/// A float dot product accumulated in f64 and rounded once.
pub fn dot_f64(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_small_is_round_half_to_even_below_2_to_22() {
        let halves = (-4000..=4000).map(|k| k as f32 / 8.0);
        let large = [
            4194303.5f32,
            -4194303.5,
            4194302.5,
            2097152.5,
            -0.5,
            0.5,
            1.5,
            2.5,
        ];
        let steps = (0..1000).map(|i| (i as f32 * 0.37).sin() * 127.49);
        for x in halves.chain(large).chain(steps) {
            assert_eq!(round_small(x), x.round_ties_even(), "{x}");
        }
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(3.5), 4);
    }

    #[test]
    fn quant_act_matches_bitnet_cpp_rules() {
        // max 127 gives s = 1, so the products are the inputs: halves round to even.
        let x = [0.5f32, -127.0, 1.5, 2.5, -0.5, 200.0 / 3.0];
        let mut q = [0i8; 6];
        assert_eq!(quant_act_i8(&x, &mut q), 1.0);
        assert_eq!(q, [0, -127, 2, 2, 0, 67]);
        let mut q = [0i8; 2];
        assert_eq!(quant_act_i8(&[0.0, 0.0], &mut q), (127.0f64 / 1e-5) as f32);
        assert_eq!(q, [0, 0]);
    }

    #[test]
    fn q8_k_maps_the_extreme_to_minus_127() {
        let mut x = vec![0.0f32; 256];
        x[3] = 2.0;
        x[4] = -1.0;
        let b = &quantize_q8_k(&x)[0];
        assert_eq!((b.qs[3], b.qs[4]), (-127, 64));
        assert_eq!(b.d, -2.0 / 127.0);
    }

    #[test]
    fn rope_theta_is_iterative() {
        let c = rope_cache(3, 10000.0, 4);
        let scale = 10000f32.powf(-0.5);
        assert_eq!(c[0], (3f32.cos(), 3f32.sin()));
        assert_eq!(c[1], ((3.0 * scale).cos(), (3.0 * scale).sin()));
        let mut h = [1.0, 2.0, 3.0, 4.0];
        rope_head(&mut h, &rope_cache(0, 10000.0, 4), true);
        assert_eq!(h, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn expf_ggml_is_close_to_libm() {
        for i in -2000..2000 {
            let x = i as f32 * 0.0437;
            let (a, b) = (expf_ggml(x), x.exp());
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * b, "{x}: {a} vs {b}");
        }
        assert_eq!(expf_ggml(0.0), 1.0);
        assert_eq!(expf_ggml(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf_ggml(-200.0), 0.0);
        assert_eq!(expf_ggml(100.0), f32::INFINITY);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert_eq!(x[3], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
