//! CUDA C for every kernel of a plan, specialized to its shapes and rendered deterministically.
//!
//! Numerics follow the CPU path (FORMATS.md §3–4) wherever a GPU can: the ternary dot is exact
//! (`__dp4a` on the I2_S codes, `Σ(c−1)·q = Σc·q − Σq`) and its epilogue is bitnet.cpp's
//! `((f32)S / s)·β`; activation quantization is bitnet.cpp's (`127/max` in double, round half
//! to even, clamp); `expf` is ggml's polynomial with the same fused multiply-adds; f16
//! conversions round to nearest even. Sums of floats (RMSNorm, f16 dots, softmax) are reduced
//! in another order than on the CPU, so float results agree within a tolerance, not bit for bit.
//!
//! Every kernel is `extern "C"` with a name that spells its specialization, so that one module
//! holds a plan's kernels once each.

use bitnetc_ir::types::{Activation, RopeStyle};
use std::fmt::Write;

/// Threads per block of the row kernels: 4 warps, one output row each at a time.
pub const ROW_THREADS: u32 = 128;
/// Threads per block of the per-token kernels (norms, quantization, attention).
pub const TOKEN_THREADS: u32 = 256;

/// One kernel, specialized to its shapes. The comments give each kernel's arguments and grid.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelSpec {
    /// `(const int* ids, const u16* table, float* out)`; grid `T`: f16 rows to f32.
    EmbedF16 { h: u64 },
    /// `(const float* x, const float* gain, float* y)`; grid `T`: RMSNorm, sum of squares in
    /// double, `1/sqrtf(mean + eps)`, `(x·scale)·gain`.
    RmsNorm { k: u64, eps: f32 },
    /// `(const float* x, const float* gain, i8* q, float* s, int* qsum)`; grid `T`: optional
    /// RMSNorm then bitnet.cpp's per-token int8 quantization.
    NormQuant { k: u64, eps: Option<f32> },
    /// `(const u8* w, const i8* q, const float* s, const int* qsum, const float* beta,
    /// const float* residual, float* out)`; grid `(⌈M/4⌉, T)`: I2_S rows in their file layout,
    /// one warp per output row; `M = n` (or `n/2` with a gated activation over rows `r` and
    /// `r + n/2`); `beta` per weight row.
    Ternary {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
    },
    /// `(const u16* w, const float* x, const float* residual, float* out)`; grid `(⌈M/4⌉, T)`:
    /// F16 rows against activations rounded to f16 (ggml's GEMV), f32 sums.
    HalfRows {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
    },
    /// `(const float* x, float* y, const int* pos)`; grid `(T, heads)`: ggml's iterative theta.
    Rope {
        heads: u64,
        d: u64,
        dims: u64,
        theta: f32,
        style: RopeStyle,
    },
    /// `(const float* k, const float* v, u16* kc, u16* vc, int pos0)`; grid `T`: f16 cache rows.
    KvAppendF16 { g: u64, d: u64 },
    /// `(const float* q, const u16* kc, const u16* vc, float* out, int pos0)`; grid `(T, h)`,
    /// dynamic shared memory `4·(pos0 + T)` bytes: causal grouped-query attention over an f16
    /// cache with ggml's roundings (q and the probabilities to f16) and softmax.
    AttentionF16 { h: u64, g: u64, d: u64, scale: f32 },
    /// `(const float* a, const float* b, float* y, long total)`; grid `⌈T·n/256⌉`: `b` of `a`'s
    /// shape, one row of `n` values, or one value.
    Binary { add: bool, n: u64, b: Broadcast },
    /// `(const float* x, float* y, long total)`; grid `⌈T·n/256⌉`.
    Act { act: Activation, n: u64 },
    /// `(const float* x, float* y, long total)`; grid `⌈T·cols/256⌉`: columns
    /// `col0..col0+cols` of rows of `row` values.
    Columns { row: u64, col0: u64, cols: u64 },
    /// `(const float* logits, int* out)`; one block of 1024: the first index of the largest.
    Argmax { vocab: u64 },
}

/// How the second operand of a [`KernelSpec::Binary`] spreads over the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    Same,
    Row,
    Scalar,
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Silu => "silu",
        Activation::Relu2 => "relu2",
    }
}

fn act_call(a: Activation, x: &str) -> String {
    format!("act_{}({x})", act_name(a))
}

impl KernelSpec {
    /// The kernel's `extern "C"` name.
    pub fn name(&self) -> String {
        let glu_res = |glu: &Option<Activation>, residual: bool| {
            format!(
                "{}{}",
                glu.map_or(String::new(), |a| format!("_glu_{}", act_name(a))),
                if residual { "_res" } else { "" }
            )
        };
        match self {
            KernelSpec::EmbedF16 { h } => format!("embed_f16_h{h}"),
            KernelSpec::RmsNorm { k, eps } => format!("rms_norm_k{k}_e{:08x}", eps.to_bits()),
            KernelSpec::NormQuant { k, eps } => match eps {
                Some(e) => format!("norm_quant_k{k}_e{:08x}", e.to_bits()),
                None => format!("quant_k{k}"),
            },
            KernelSpec::Ternary {
                k,
                n,
                glu,
                residual,
            } => format!("ternary_k{k}_n{n}{}", glu_res(glu, *residual)),
            KernelSpec::HalfRows {
                k,
                n,
                glu,
                residual,
            } => format!("f16_rows_k{k}_n{n}{}", glu_res(glu, *residual)),
            KernelSpec::Rope {
                heads,
                d,
                dims,
                theta,
                style,
            } => format!(
                "rope_{}_h{heads}_d{d}_r{dims}_t{:08x}",
                match style {
                    RopeStyle::Neox => "neox",
                    RopeStyle::Norm => "norm",
                },
                theta.to_bits()
            ),
            KernelSpec::KvAppendF16 { g, d } => format!("kv_append_f16_g{g}_d{d}"),
            KernelSpec::AttentionF16 { h, g, d, scale } => {
                format!("attention_f16_h{h}_g{g}_d{d}_s{:08x}", scale.to_bits())
            }
            KernelSpec::Binary { add, n, b } => format!(
                "{}_n{n}{}",
                if *add { "add" } else { "mul" },
                match b {
                    Broadcast::Same => "",
                    Broadcast::Row => "_row",
                    Broadcast::Scalar => "_scalar",
                }
            ),
            KernelSpec::Act { act, n } => format!("act_{}_n{n}", act_name(*act)),
            KernelSpec::Columns { row, col0, cols } => format!("columns_r{row}_c{col0}_n{cols}"),
            KernelSpec::Argmax { vocab } => format!("argmax_v{vocab}"),
        }
    }

    /// The kernel's CUDA C.
    pub fn source(&self) -> String {
        let name = self.name();
        match self {
            KernelSpec::EmbedF16 { h } => format!(
                r#"extern "C" __global__ void {name}(const int* ids, const u16* table, float* out) {{
    const long t = blockIdx.x;
    const u16* row = table + (long)ids[t] * {h};
    for (int i = threadIdx.x; i < {h}; i += blockDim.x) out[t * {h} + i] = h2f(row[i]);
}}
"#
            ),
            KernelSpec::RmsNorm { k, eps } => format!(
                r#"extern "C" __global__ void {name}(const float* x, const float* gain, float* y) {{
    const long t = blockIdx.x;
    const float scale = rms_scale(x + t * {k}, {k}, {eps});
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) y[t * {k} + i] = (x[t * {k} + i] * scale) * gain[i];
}}
"#,
                eps = float_lit(*eps)
            ),
            KernelSpec::NormQuant { k, eps } => {
                let (scale, value) = match eps {
                    Some(e) => (
                        format!("rms_scale(xt, {k}, {})", float_lit(*e)),
                        "(xt[i] * scale) * gain[i]",
                    ),
                    None => ("1.0f".to_string(), "xt[i]"),
                };
                format!(
                    r#"extern "C" __global__ void {name}(const float* x, const float* gain, i8* q, float* s, int* qsum) {{
    const long t = blockIdx.x;
    const float* xt = x + t * {k};
    const float scale = {scale};
    float amax = 0.0f;
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) amax = fmaxf(amax, fabsf({value}));
    amax = block_max(amax);
    const float st = (float)(127.0 / fmax((double)amax, 1e-5));
    int sum = 0;
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) {{
        const int c = min(127, max(-128, __float2int_rn(({value}) * st)));
        q[t * {k} + i] = (i8)c;
        sum += c;
    }}
    sum = block_sum_int(sum);
    if (threadIdx.x == 0) {{ s[t] = st; qsum[t] = sum; }}
}}
"#
                )
            }
            KernelSpec::Ternary {
                k,
                n,
                glu,
                residual,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let words = k / 16;
                let dot = |row: &str| {
                    format!(
                        r#"ternary_row(w + (long)({row}) * {rb}, qt, {words})"#,
                        rb = k / 4
                    )
                };
                let value = match glu {
                    Some(a) => format!("{} * up", act_call(*a, "gate")),
                    None => "gate".to_string(),
                };
                let up = if glu.is_some() {
                    format!(
                        "\n    const int su = {};\n    const float up = ((float)(su - qsum[t]) / s[t]) * beta[r + {m}];",
                        dot(&format!("r + {m}"))
                    )
                } else {
                    String::new()
                };
                let res = if *residual {
                    format!(" + residual[t * {m} + r]")
                } else {
                    String::new()
                };
                format!(
                    r#"extern "C" __global__ void {name}(const u8* w, const i8* q, const float* s, const int* qsum, const float* beta, const float* residual, float* out) {{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long t = blockIdx.y;
    if (r >= {m}) return;
    const i8* qt = q + t * {k};
    const int sg = {gate};
    const float gate = ((float)(sg - qsum[t]) / s[t]) * beta[r];{up}
    if ((threadIdx.x & 31) == 0) out[t * {m} + r] = {value}{res};
}}
"#,
                    gate = dot("r"),
                )
            }
            KernelSpec::HalfRows {
                k,
                n,
                glu,
                residual,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let value = match glu {
                    Some(a) => format!(
                        "{} * f16_row(w + (long)(r + {m}) * {k}, xt, {k})",
                        act_call(*a, "gate")
                    ),
                    None => "gate".to_string(),
                };
                let res = if *residual {
                    format!(" + residual[t * {m} + r]")
                } else {
                    String::new()
                };
                format!(
                    r#"extern "C" __global__ void {name}(const u16* w, const float* x, const float* residual, float* out) {{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long t = blockIdx.y;
    if (r >= {m}) return;
    const float* xt = x + t * {k};
    const float gate = f16_row(w + (long)r * {k}, xt, {k});
    const float v = {value}{res};
    if ((threadIdx.x & 31) == 0) out[t * {m} + r] = v;
}}
"#
                )
            }
            KernelSpec::Rope {
                heads,
                d,
                dims,
                theta,
                style,
            } => {
                let (a, b) = match style {
                    RopeStyle::Neox => ("i", format!("i + {}", dims / 2)),
                    RopeStyle::Norm => ("2 * i", "2 * i + 1".to_string()),
                };
                format!(
                    r#"extern "C" __global__ void {name}(const float* x, float* y, const int* pos) {{
    const long t = blockIdx.x;
    const long base = (t * {heads} + blockIdx.y) * {d};
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) y[base + j] = x[base + j];
    __syncthreads();
    const float theta_scale = {theta_scale};
    for (int i = threadIdx.x; i < {half}; i += blockDim.x) {{
        float th = (float)pos[t];
        for (int j = 0; j < i; j++) th *= theta_scale;
        const float c = cosf(th), s = sinf(th);
        const float x0 = x[base + {a}], x1 = x[base + {b}];
        y[base + {a}] = x0 * c - x1 * s;
        y[base + {b}] = x0 * s + x1 * c;
    }}
}}
"#,
                    theta_scale = float_lit(theta.powf(-2.0 / *dims as f32)),
                    half = dims / 2
                )
            }
            KernelSpec::KvAppendF16 { g, d } => format!(
                r#"extern "C" __global__ void {name}(const float* k, const float* v, u16* kc, u16* vc, int pos0) {{
    const long t = blockIdx.x;
    const long dst = (pos0 + t) * {gd};
    for (int i = threadIdx.x; i < {gd}; i += blockDim.x) {{
        kc[dst + i] = f2h(k[t * {gd} + i]);
        vc[dst + i] = f2h(v[t * {gd} + i]);
    }}
}}
"#,
                gd = g * d
            ),
            KernelSpec::AttentionF16 { h, g, d, scale } => format!(
                r#"extern "C" __global__ void {name}(const float* q, const u16* kc, const u16* vc, float* out, int pos0) {{
    extern __shared__ float p[];
    __shared__ float qh[{d}];
    const long t = blockIdx.x;
    const int head = blockIdx.y;
    const int kvh = head / {group};
    const int n = pos0 + (int)t + 1;
    for (int i = threadIdx.x; i < {d}; i += blockDim.x) qh[i] = round_f16(q[(t * {h} + head) * {d} + i]);
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {{
        const u16* kr = kc + ((long)j * {g} + kvh) * {d};
        float acc = 0.0f;
        for (int i = 0; i < {d}; i++) acc = fmaf(qh[i], h2f(kr[i]), acc);
        p[j] = acc * {scale};
        mx = fmaxf(mx, p[j]);
    }}
    mx = block_max(mx);
    double sum = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {{
        p[j] = expf_ggml(p[j] - mx);
        sum += p[j];
    }}
    sum = block_sum_double(sum);
    const float inv = (float)(1.0 / sum);
    for (int j = threadIdx.x; j < n; j += blockDim.x) p[j] = round_f16(p[j] * inv);
    __syncthreads();
    for (int i = threadIdx.x; i < {d}; i += blockDim.x) {{
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc = fmaf(p[j], h2f(vc[((long)j * {g} + kvh) * {d} + i]), acc);
        out[(t * {h} + head) * {d} + i] = acc;
    }}
}}
"#,
                group = h / g,
                scale = float_lit(*scale)
            ),
            KernelSpec::Binary { add, n, b } => format!(
                r#"extern "C" __global__ void {name}(const float* a, const float* b, float* y, long total) {{
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] = a[i] {op} b[{bi}];
}}
"#,
                op = if *add { "+" } else { "*" },
                bi = match b {
                    Broadcast::Same => "i".to_string(),
                    Broadcast::Row => format!("i % {n}"),
                    Broadcast::Scalar => "0".to_string(),
                }
            ),
            KernelSpec::Act { act, .. } => format!(
                r#"extern "C" __global__ void {name}(const float* x, float* y, long total) {{
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] = {call};
}}
"#,
                call = act_call(*act, "x[i]")
            ),
            KernelSpec::Columns { row, col0, cols } => format!(
                r#"extern "C" __global__ void {name}(const float* x, float* y, long total) {{
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] = x[(i / {cols}) * {row} + {col0} + i % {cols}];
}}
"#
            ),
            KernelSpec::Argmax { vocab } => format!(
                r#"extern "C" __global__ void {name}(const float* logits, int* out) {{
    __shared__ float bv[1024];
    __shared__ int bi[1024];
    float v = -INFINITY;
    int idx = 0;
    for (int i = threadIdx.x; i < {vocab}; i += blockDim.x)
        if (logits[i] > v) {{ v = logits[i]; idx = i; }}
    bv[threadIdx.x] = v;
    bi[threadIdx.x] = idx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {{
        if (threadIdx.x < s) {{
            const float ov = bv[threadIdx.x + s];
            const int oi = bi[threadIdx.x + s];
            if (ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x])) {{
                bv[threadIdx.x] = ov;
                bi[threadIdx.x] = oi;
            }}
        }}
        __syncthreads();
    }}
    if (threadIdx.x == 0) out[0] = bi[0];
}}
"#
            ),
        }
    }
}

/// A float as an exact CUDA literal (its bits), so that rendering round-trips every value.
fn float_lit(v: f32) -> String {
    format!("__int_as_float(0x{:08x})", v.to_bits())
}

/// Helpers every module starts with: f16 conversions (round to nearest even), block
/// reductions, ggml's `expf`, the activations, the row dots.
pub const PRELUDE: &str = r#"typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float round_f16(float f) { return h2f(f2h(f)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block reductions over blockDim.x (a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_max(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    float m = part[0];
    for (int i = 1; i < (int)(blockDim.x / 32); i++) m = fmaxf(m, part[i]);
    return m;
}
__device__ int block_sum_int(int v) {
    __shared__ int part[32];
    v = warp_sum_int(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    int s = 0;
    for (int i = 0; i < (int)(blockDim.x / 32); i++) s += part[i];
    return s;
}
__device__ double block_sum_double(double v) {
    __shared__ double part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    double s = 0.0;
    for (int i = 0; i < (int)(blockDim.x / 32); i++) s += part[i];
    return s;
}

// ggml's RMSNorm scale: the sum of squares in double, 1/sqrtf(mean + eps) in float.
__device__ float rms_scale(const float* x, int k, float eps) {
    double ss = 0.0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) ss += (double)x[i] * (double)x[i];
    ss = block_sum_double(ss);
    const float mean = (float)(ss / k);
    return 1.0f / sqrtf(mean + eps);
}

// ggml_v_expf (the Arm optimized-routines polynomial) with the CPU path's fused multiply-adds.
__device__ float expf_ggml(float x) {
    const float r = __int_as_float(0x4b400000);
    const float z = fmaf(x, __int_as_float(0x3fb8aa3b), r);
    const float n = z - r;
    const float b = fmaf(-n, __int_as_float(0x35bfbe8e), fmaf(-n, __int_as_float(0x3f317200), x));
    if (!(fabsf(n) <= 192.0f)) return n <= 0.0f ? 0.0f : INFINITY;
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(__int_as_float(0x3c072010), b, __int_as_float(0x3d2b9f17)), u,
                              fmaf(__int_as_float(0x3e2aaf33), b, __int_as_float(0x3efffedb))),
                         u, fmaf(__int_as_float(0x3f7ffff6), b, 1.0f));
    return (float)((double)j * __longlong_as_double((long long)((int)n + 1023) << 52));
}
__device__ __forceinline__ float act_silu(float x) { return x / (1.0f + expf_ggml(-x)); }
__device__ __forceinline__ float act_relu2(float x) { const float r = x > 0.0f ? x : 0.0f; return r * r; }

// Σ c·q over one I2_S row (codes 0..2 in 128/32 blocks) by one warp: each lane takes 4 bytes
// (16 codes) at a time; the 4 codes of one group meet 4 consecutive activations.
__device__ int ternary_row(const u8* w, const i8* q, int words) {
    int acc = 0;
    for (int i = threadIdx.x & 31; i < words; i += 32) {
        const unsigned int packed = ((const unsigned int*)w)[i];
        const int base = (i / 8) * 128 + (i % 8) * 4;
        #pragma unroll
        for (int g = 0; g < 4; g++) {
            const int codes = (int)((packed >> (6 - 2 * g)) & 0x03030303u);
            acc = __dp4a(codes, *(const int*)(q + base + 32 * g), acc);
        }
    }
    return warp_sum_int(acc);
}

// One f16 row against activations rounded to f16, by one warp, summed in float.
__device__ float f16_row(const u16* w, const float* x, int k) {
    float acc = 0.0f;
    for (int i = threadIdx.x & 31; i < k; i += 32) acc = fmaf(h2f(w[i]), round_f16(x[i]), acc);
    return warp_sum(acc);
}

"#;

/// One module: the prelude and each distinct kernel once, in the order given.
pub fn module(specs: &[KernelSpec]) -> String {
    let mut s = String::from(PRELUDE);
    let mut seen = std::collections::BTreeSet::new();
    for spec in specs {
        if seen.insert(spec.name()) {
            let _ = writeln!(s, "{}", spec.source());
        }
    }
    s
}
