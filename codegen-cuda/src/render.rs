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

use bitnetc_ir::encoding::Encoding;
use bitnetc_ir::types::{Activation, DotPath, HalfPath, RopeStyle};
use std::fmt::Write;

/// Threads per block of the row kernels: 4 warps, one output row each at a time.
pub const ROW_THREADS: u32 = 128;
/// Threads per block of the per-token kernels (norms, quantization, attention).
pub const TOKEN_THREADS: u32 = 256;
/// Threads per block of the norm and quantization prologue of a linear layer: one block is a
/// one-token step's whole prologue, so it takes as many threads as a block can have.
pub const NORM_THREADS: u32 = 1024;
/// Tokens per block of [`KernelSpec::TernaryTiles`].
pub const TILE_TOKENS: u32 = 8;
/// Keys per block of the attention's score and value kernels (one thread per key).
pub const ATTENTION_CHUNK: u32 = 128;

/// One kernel, specialized to its shapes. The comments give each kernel's arguments and grid.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelSpec {
    /// `(const int* ids, const u16* table, float* out)`; grid `T`: f16 rows to f32.
    EmbedF16 { h: u64 },
    /// `(const int* ids, const float* table, float* out)`; grid `T`: f32 rows copied.
    EmbedF32 { h: u64 },
    /// `(const float* x, const float* gain, float* y)`; grid `T`: RMSNorm, sum of squares in
    /// double, `1/sqrtf(mean + eps)`, `(x·scale)·gain`.
    RmsNorm { k: u64, eps: f32 },
    /// `(const float* x, const float* gain, float* xn, i8* q, float* d)`; grid `T`,
    /// [`NORM_THREADS`] threads: optional RMSNorm into `xn`, then llama.cpp's Q8_K
    /// quantization of each 256-value block (`d = 1/(−127/max)`, `max` the first value of the
    /// largest magnitude, codes rounded half to even, at most 127), one warp per block.
    NormQ8K { k: u64, eps: Option<f32> },
    /// `(const unsigned* w, const i8* q, const float* dx, const float* sw, const float*
    /// residual, float* out)`; grid `(⌈M/4⌉, T)`: TQ1_0/TQ2_0 rows repacked at load time (per
    /// 256-value block 16 words, byte `j` of word `i` holding the codes of values
    /// `16i + 4l + j` at bits `2l`; `sw` the blocks' scales) against Q8_K activations; per block
    /// the exact integer dot, then `sum += (dx·sw)·dot` in block order, as llama.cpp.
    TernaryBlocks {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
    },
    /// `(const float* x, const float* gain, float* xn, i8* q, float* d, float* s)`; grid `T`,
    /// [`NORM_THREADS`] threads: optional RMSNorm into `xn`, then ggml's Q8_0 quantization of
    /// each 32-value block for the x86 dots (`d = max/127` and `s = d·Σq`, both rounded to
    /// f16), one warp per block.
    NormQ8 { k: u64, eps: Option<f32> },
    /// `(const u8* w, const i8* q, const float* dx, const float* sx, const float* residual,
    /// float* out)`; grid `(⌈M/16⌉, T)`, [`ROW_THREADS`] threads: Q8_0, Q4_0 or Q4_1 rows in
    /// their file layout against Q8_0 activations, eight threads per row, thread `l` holding
    /// ggml's AVX2 lane `l` (values `4l..4l+3` of each block, `acc = fma(dw·dx, Σ, acc)` in
    /// block order), then `hsum_float_8` (and Q4_1's `Σ m·s`): the CPU's sums, exactly.
    QuantRows {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
        encoding: Encoding,
    },
    /// `(const int* ids, const u8* table, float* out)`; grid `T`: Q8_0, Q4_0 or Q4_1 rows
    /// decoded to f32.
    EmbedQ { h: u64, encoding: Encoding },
    /// `(const float* x, const float* gain, i8* q, float* s)`; grid `T`, [`NORM_THREADS`]
    /// threads, each holding its values in registers: optional RMSNorm then bitnet.cpp's
    /// per-token int8 quantization.
    NormQuant { k: u64, eps: Option<f32> },
    /// `(const u8* w, const i8* q, const float* s, const float* beta, const float* residual,
    /// float* out)`; grid `(⌈M/4⌉, T)`: I2_S rows in their file layout,
    /// one warp per output row; `M = n` (or `n/2` with a gated activation over rows `r` and
    /// `r + n/2`); `beta` per weight row.
    Ternary {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
    },
    /// `(const u8* w, const float* x, const float* gain, const float* beta, const float*
    /// residual, float* out)`; grid `(⌈M/R⌉, T)`, [`ROW_THREADS`] threads, `R` =
    /// [`KernelSpec::rows_per_block`]: a [`KernelSpec::NormQuant`] and a
    /// [`KernelSpec::Ternary`] in one launch, for one-token steps (where launches, not bytes,
    /// set the time): every block quantizes the token's activations into shared memory as
    /// `NormQuant` does, then each warp computes four weight rows at once (four output rows,
    /// or two gate and up pairs) with `Ternary`'s sums and epilogue.
    NormTernary {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
        eps: Option<f32>,
    },
    /// `(const u8* w, const i8* q, const float* s, const float* beta, const float* residual,
    /// float* out, int tokens)`; grid `(⌈M/R⌉, ⌈T/8⌉)` ([`TILE_TOKENS`]), [`ROW_THREADS`] threads,
    /// `R` = [`KernelSpec::rows_per_block`]: a [`KernelSpec::Ternary`] for steps of several
    /// tokens, each warp holding two weight rows (a gate and an up row, or two output rows)
    /// against [`TILE_TOKENS`] tokens, so that each weight is read and unpacked once per tile
    /// of tokens instead of once per token. The same integer sums and epilogue, so the same
    /// bits.
    TernaryTiles {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
    },
    /// `(const W* w, const float* x, const float* residual, float* out)`; grid `(⌈M/4⌉, T)`:
    /// F16 (`W = u16`) or F32 rows against f32 activations, one warp per output row. F16 rows
    /// follow the step's [`Round`]: the activations rounded to f16 and float sums (ggml's
    /// GEMV and tinyBLAS), or kept and summed in double (ggml's f32 path, `Round::Never`);
    /// F32 rows are summed in double.
    FloatRows {
        k: u64,
        n: u64,
        glu: Option<Activation>,
        residual: bool,
        f32_weights: bool,
        round: Round,
    },
    /// `(const float* x, float* y, const int* pos)`; grid `(T, heads)`: ggml's iterative theta.
    Rope {
        heads: u64,
        d: u64,
        dims: u64,
        theta: f32,
        style: RopeStyle,
    },
    /// `(const float* qkv, float* q, u16* kc, u16* vc, const int* pos)`; grid `(T, h + g)`:
    /// the fused Q/K/V rows of a token (`h·d`, `g·d`, `g·d` values) split, Q and K rotated
    /// as by [`KernelSpec::Rope`], Q written to `q` and K and V to the f16 cache at the
    /// token's position: the split, both RoPEs and the cache append in one launch.
    QkvRopeAppendF16 {
        h: u64,
        g: u64,
        d: u64,
        dims: u64,
        theta: f32,
        style: RopeStyle,
    },
    /// `(const float* qkv, u16* kc, u16* vc, float* sc, float* cmax, const int* pos, int cap,
    /// int chunks)`; grid `(1, h, chunks)`, [`ATTENTION_CHUNK`] threads: for a one-token step,
    /// a [`KernelSpec::QkvRopeAppendF16`] and the score kernel of
    /// [`KernelSpec::AttentionF16`] in one launch. Each block rotates its head's Q itself;
    /// the block of the chunk that holds the token's position rotates the token's K too and
    /// meets it from shared memory (as the cache holds it, in f16), and the block of the first
    /// head of each KV head there writes K and V to the cache for the value kernel and later
    /// steps. The same scores, bit for bit.
    QkvScoresF16 {
        h: u64,
        g: u64,
        d: u64,
        dims: u64,
        theta: f32,
        style: RopeStyle,
        scale: f32,
        kq: Round,
    },
    /// `(const float* k, const float* v, u16* kc, u16* vc, const int* pos)`; grid `T`: f16
    /// cache rows at each token's position.
    KvAppendF16 { g: u64, d: u64 },
    /// Causal grouped-query attention over an f16 cache with ggml's roundings (q and the
    /// probabilities to f16) and softmax, split across the sequence in chunks of
    /// [`ATTENTION_CHUNK`] keys (flash-decoding), in two kernels over scratch sized for
    /// `cap` positions and `chunks = ⌈cap / ATTENTION_CHUNK⌉`:
    /// - `{name}_scores(const float* q, const u16* kc, float* sc, float* cmax, const int* pos,
    ///   int cap, int chunks)`; grid `(T, h, chunks)`, [`ATTENTION_CHUNK`] threads, one key
    ///   each: the scaled scores `sc[t,h,j]` and each chunk's maximum `cmax[t,h,c]`;
    /// - `{name}_pv(const float* sc, const float* cmax, const u16* vc, float* po, float* out,
    ///   int* done, const int* pos, int cap, int chunks)`; grid `(T, h, chunks)`,
    ///   [`attention_pv_threads`] threads: the softmax's maximum and sum (in double, the same
    ///   in every block), the chunk's probabilities (rounded to f16 as the step's path says)
    ///   and their weighted sum of values `po[t,h,c,:]`; the last block of a head to finish
    ///   (counted in `done`, zero between steps) adds the chunks' sums in order into `out`.
    ///
    /// Positions are read from `pos`, so the launches do not depend on them.
    AttentionF16 {
        h: u64,
        g: u64,
        d: u64,
        scale: f32,
        /// Whether q is rounded to f16 for the scores.
        kq: Round,
        /// Whether the probabilities are rounded to f16 for the values.
        kqv: Round,
    },
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

/// Whether a float operand is rounded to f16 before a dot with f16 values, by the number of
/// tokens the step evaluates (ggml's paths, [`HalfPath`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    Always,
    Never,
    /// For a one-token step only (GEMV), not in a batch (tinyBLAS on f32).
    OneToken,
}

impl Round {
    /// How `path` rounds in a step of one token and in one of several.
    pub fn of(path: HalfPath) -> Round {
        let rounds = |t| match path.path(t) {
            DotPath::F32 => false,
            DotPath::Gemv => true,
            DotPath::Gemm { round } => round,
        };
        match (rounds(1), rounds(2)) {
            (true, true) => Round::Always,
            (true, false) => Round::OneToken,
            _ => Round::Never,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Round::Always => "a",
            Round::Never => "n",
            Round::OneToken => "1",
        }
    }

    /// A CUDA condition; `tokens` is the step's token count in the kernel.
    fn cond(self, tokens: &str) -> String {
        match self {
            Round::Always => "true".into(),
            Round::Never => "false".into(),
            Round::OneToken => format!("({tokens} == 1)"),
        }
    }
}

/// How the second operand of a [`KernelSpec::Binary`] spreads over the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    Same,
    Row,
    Scalar,
}

fn style_name(s: RopeStyle) -> &'static str {
    match s {
        RopeStyle::Neox => "neox",
        RopeStyle::Norm => "norm",
    }
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
    /// For a kernel of output rows (a linear layer's matrix), the rows it writes per token:
    /// `n`, or `n/2` with a gated activation.
    pub fn output_rows(&self) -> Option<u64> {
        match self {
            KernelSpec::Ternary { n, glu, .. }
            | KernelSpec::NormTernary { n, glu, .. }
            | KernelSpec::TernaryTiles { n, glu, .. }
            | KernelSpec::TernaryBlocks { n, glu, .. }
            | KernelSpec::QuantRows { n, glu, .. }
            | KernelSpec::FloatRows { n, glu, .. } => Some(if glu.is_some() { n / 2 } else { *n }),
            _ => None,
        }
    }

    /// For [`KernelSpec::TernaryTiles`] and [`KernelSpec::NormTernary`], the output rows of
    /// one block: per warp, two weight rows (tiles) or four (fused), of which half are up rows
    /// with a gated activation.
    pub fn rows_per_block(&self) -> Option<u32> {
        let (weight_rows, glu) = match self {
            KernelSpec::TernaryTiles { glu, .. } => (2, glu),
            KernelSpec::NormTernary { glu, .. } => (4, glu),
            _ => return None,
        };
        Some(ROW_THREADS / 32 * weight_rows / if glu.is_some() { 2 } else { 1 })
    }

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
            KernelSpec::EmbedF32 { h } => format!("embed_f32_h{h}"),
            KernelSpec::RmsNorm { k, eps } => format!("rms_norm_k{k}_e{:08x}", eps.to_bits()),
            KernelSpec::NormQ8 { k, eps } => match eps {
                Some(e) => format!("norm_q8_k{k}_e{:08x}", e.to_bits()),
                None => format!("q8_k{k}"),
            },
            KernelSpec::QuantRows {
                k,
                n,
                glu,
                residual,
                encoding,
            } => format!("{encoding}_rows_k{k}_n{n}{}", glu_res(glu, *residual)),
            KernelSpec::EmbedQ { h, encoding } => format!("embed_{encoding}_h{h}"),
            KernelSpec::NormQ8K { k, eps } => match eps {
                Some(e) => format!("norm_q8k_k{k}_e{:08x}", e.to_bits()),
                None => format!("q8k_k{k}"),
            },
            KernelSpec::TernaryBlocks {
                k,
                n,
                glu,
                residual,
            } => format!("tq_k{k}_n{n}{}", glu_res(glu, *residual)),
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
            KernelSpec::TernaryTiles {
                k,
                n,
                glu,
                residual,
            } => format!(
                "ternary_t{TILE_TOKENS}_k{k}_n{n}{}",
                glu_res(glu, *residual)
            ),
            KernelSpec::NormTernary {
                k,
                n,
                glu,
                residual,
                eps,
            } => format!(
                "{}_ternary_k{k}_n{n}{}",
                match eps {
                    Some(e) => format!("norm_quant_e{:08x}", e.to_bits()),
                    None => "quant".into(),
                },
                glu_res(glu, *residual)
            ),
            KernelSpec::FloatRows {
                k,
                n,
                glu,
                residual,
                f32_weights: true,
                ..
            } => format!("f32_rows_k{k}_n{n}{}", glu_res(glu, *residual)),
            KernelSpec::FloatRows {
                k,
                n,
                glu,
                residual,
                round,
                ..
            } => format!(
                "f16_rows_k{k}_n{n}_r{}{}",
                round.tag(),
                glu_res(glu, *residual)
            ),
            KernelSpec::Rope {
                heads,
                d,
                dims,
                theta,
                style,
            } => format!(
                "rope_{}_h{heads}_d{d}_r{dims}_t{:08x}",
                style_name(*style),
                theta.to_bits()
            ),
            KernelSpec::KvAppendF16 { g, d } => format!("kv_append_f16_g{g}_d{d}"),
            KernelSpec::QkvRopeAppendF16 {
                h,
                g,
                d,
                dims,
                theta,
                style,
            } => format!(
                "qkv_rope_{}_append_f16_h{h}_g{g}_d{d}_r{dims}_t{:08x}",
                style_name(*style),
                theta.to_bits()
            ),
            KernelSpec::QkvScoresF16 {
                h,
                g,
                d,
                dims,
                theta,
                style,
                scale,
                kq,
            } => format!(
                "qkv_rope_{}_scores_f16_h{h}_g{g}_d{d}_r{dims}_t{:08x}_s{:08x}_r{}",
                style_name(*style),
                theta.to_bits(),
                scale.to_bits(),
                kq.tag()
            ),
            KernelSpec::AttentionF16 {
                h,
                g,
                d,
                scale,
                kq,
                kqv,
            } => format!(
                "attention_f16_h{h}_g{g}_d{d}_s{:08x}_r{}{}",
                scale.to_bits(),
                kq.tag(),
                kqv.tag()
            ),
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

    /// The kernel's CUDA C. Every kernel calls `await_inputs()` before it reads or writes
    /// anything but its weights: first thing, unless its body places the call itself (after
    /// prefetching its weights), so that launches may overlap (programmatic dependent launch).
    pub fn source(&self) -> String {
        let body = self.body();
        let mut out = String::with_capacity(body.len() + 64);
        let starts: Vec<usize> = body
            .match_indices("extern \"C\" __global__ void ")
            .map(|(i, _)| i)
            .chain([body.len()])
            .collect();
        out.push_str(&body[..starts[0]]);
        for w in starts.windows(2) {
            let f = &body[w[0]..w[1]];
            match f.find("{\n") {
                Some(open) if !f.contains("await_inputs();") => {
                    out.push_str(&f[..open + 2]);
                    out.push_str("    await_inputs();\n");
                    out.push_str(&f[open + 2..]);
                }
                _ => out.push_str(f),
            }
        }
        out
    }

    fn body(&self) -> String {
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
            KernelSpec::EmbedF32 { h } => format!(
                r#"extern "C" __global__ void {name}(const int* ids, const float* table, float* out) {{
    const long t = blockIdx.x;
    const float* row = table + (long)ids[t] * {h};
    for (int i = threadIdx.x; i < {h}; i += blockDim.x) out[t * {h} + i] = row[i];
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
            KernelSpec::NormQ8K { k, eps } => format!(
                r#"extern "C" __global__ void {name}(const float* x, const float* gain, float* xn, i8* q, float* d) {{
    const long t = blockIdx.x;
    const float* xt = x + t * {k};
    float* yt = xn + t * {k};
{norm}    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int b = threadIdx.x / 32; b < {blocks}; b += blockDim.x / 32) {{
        const float* y = yt + b * 256 + lane * 8;
        float amax = 0.0f, mx = 0.0f;
        int at = 0;
        for (int e = 0; e < 8; e++) {{
            if (fabsf(y[e]) > amax) {{ amax = fabsf(y[e]); mx = y[e]; at = lane * 8 + e; }}
        }}
        for (int o = 16; o > 0; o >>= 1) {{
            const float oa = __shfl_xor_sync(0xffffffffu, amax, o);
            const float om = __shfl_xor_sync(0xffffffffu, mx, o);
            const int oi = __shfl_xor_sync(0xffffffffu, at, o);
            if (oa > amax || (oa == amax && oi < at)) {{ amax = oa; mx = om; at = oi; }}
        }}
        i8* qb = q + t * {k} + b * 256 + lane * 8;
        if (amax == 0.0f) {{
            for (int e = 0; e < 8; e++) qb[e] = 0;
            if (lane == 0) d[t * {blocks} + b] = 0.0f;
        }} else {{
            const float iscale = -127.0f / mx;
            for (int e = 0; e < 8; e++) qb[e] = (i8)min(127, __float2int_rn(iscale * y[e]));
            if (lane == 0) d[t * {blocks} + b] = 1.0f / iscale;
        }}
    }}
}}
"#,
                blocks = k / 256,
                norm = norm_into(*k, *eps)
            ),
            KernelSpec::NormQ8 { k, eps } => format!(
                r#"extern "C" __global__ void {name}(const float* x, const float* gain, float* xn, i8* q, float* d, float* s) {{
    const long t = blockIdx.x;
    const float* xt = x + t * {k};
    float* yt = xn + t * {k};
{norm}    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int b = threadIdx.x / 32; b < {blocks}; b += blockDim.x / 32) {{
        const float v = yt[b * 32 + lane];
        float amax = fabsf(v);
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float db = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        const int c = __float2int_rn(v * id);
        q[t * {k} + b * 32 + lane] = (i8)c;
        const int sum = warp_sum_int(c);
        if (lane == 0) {{
            d[t * {blocks} + b] = round_f16(db);
            s[t * {blocks} + b] = round_f16(db * (float)sum);
        }}
    }}
}}
"#,
                blocks = k / 32,
                norm = norm_into(*k, *eps)
            ),
            KernelSpec::QuantRows {
                k,
                n,
                glu,
                residual,
                encoding,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let (bb, f) = match encoding {
                    Encoding::Q8_0 => (34, "qrow_q8_0"),
                    Encoding::Q4_0 => (18, "qrow_q4_0"),
                    _ => (20, "qrow_q4_1"),
                };
                let rb = (k / 32) * bb;
                let dot = |row: &str| {
                    format!(
                        "{f}(w + (long)({row}) * {rb}, qt, dt, st, {blocks})",
                        blocks = k / 32
                    )
                };
                let (value, res) = epilogue(*glu, *residual, m, &dot(&format!("r + {m}")));
                format!(
                    r#"extern "C" __global__ void {name}(const u8* w, const i8* q, const float* dx, const float* sx, const float* residual, float* out) {{
    const int row = blockIdx.x * (blockDim.x / 8) + threadIdx.x / 8;
    const int r = min(row, {m} - 1);
    const long t = blockIdx.y;
    const i8* qt = q + t * {k};
    const float* dt = dx + t * {blocks};
    const float* st = sx + t * {blocks};
    const float gate = {gate};
    const float v = {value}{res};
    if ((threadIdx.x & 7) == 0 && row < {m}) out[t * {m} + r] = v;
}}
"#,
                    blocks = k / 32,
                    gate = dot("r")
                )
            }
            KernelSpec::EmbedQ { h, encoding } => {
                let (bb, value) = match encoding {
                    Encoding::Q8_0 => (34, "(float)(i8)b[2 + j] * d"),
                    Encoding::Q4_0 => (
                        18,
                        "(float)((j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4) - 8) * d",
                    ),
                    _ => (
                        20,
                        "(float)(j < 16 ? b[4 + j] & 15 : b[4 + j - 16] >> 4) * d + h2f(le16(b + 2))",
                    ),
                };
                format!(
                    r#"extern "C" __global__ void {name}(const int* ids, const u8* table, float* out) {{
    const long t = blockIdx.x;
    const u8* row = table + (long)ids[t] * {rb};
    for (int i = threadIdx.x; i < {h}; i += blockDim.x) {{
        const u8* b = row + (i / 32) * {bb};
        const int j = i % 32;
        const float d = h2f(le16(b));
        out[t * {h} + i] = {value};
    }}
}}
"#,
                    rb = (h / 32) * bb
                )
            }
            KernelSpec::TernaryBlocks {
                k,
                n,
                glu,
                residual,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let blocks = k / 256;
                let dot = |row: &str| {
                    format!(
                        "tq_row(w + (long)({row}) * {words}, qt, dt, sw + (long)({row}) * {blocks}, {blocks})",
                        words = k / 16
                    )
                };
                let (value, res) = epilogue(*glu, *residual, m, &dot(&format!("r + {m}")));
                format!(
                    r#"extern "C" __global__ void {name}(const unsigned* w, const i8* q, const float* dx, const float* sw, const float* residual, float* out) {{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long t = blockIdx.y;
    if (r >= {m}) return;
    const i8* qt = q + t * {k};
    const float* dt = dx + t * {blocks};
    const float gate = {gate};
    const float v = {value}{res};
    if ((threadIdx.x & 31) == 0) out[t * {m} + r] = v;
}}
"#,
                    gate = dot("r")
                )
            }
            KernelSpec::NormQuant { k, eps } => {
                let norm = match eps {
                    Some(e) => format!(
                        r#"    double ss = 0.0;
    for (int u = 0; u < {e}; u++) ss += (double)(v[u] * v[u]);
    ss = block_sum_double(ss);
    const float scale = 1.0f / sqrtf((float)(ss / {k}) + {eps});
    for (int u = 0; u < {e}; u++) {{
        const int i = threadIdx.x + u * {bt};
        if (i < {k}) v[u] = (v[u] * scale) * gain[i];
    }}
"#,
                        e = k.div_ceil(NORM_THREADS as u64),
                        bt = NORM_THREADS,
                        eps = float_lit(*e)
                    ),
                    None => String::new(),
                };
                format!(
                    r#"extern "C" __global__ void {name}(const float* x, const float* gain, i8* q, float* s) {{
    const long t = blockIdx.x;
    const float* xt = x + t * {k};
    float v[{e}];
    #pragma unroll
    for (int u = 0; u < {e}; u++) {{
        const int i = threadIdx.x + u * {bt};
        v[u] = i < {k} ? xt[i] : 0.0f;
    }}
{norm}    float amax = 0.0f;
    for (int u = 0; u < {e}; u++) amax = fmaxf(amax, fabsf(v[u]));
    amax = block_max(amax);
    const float st = (float)(127.0 / fmax((double)amax, 1e-5));
    for (int u = 0; u < {e}; u++) {{
        const int i = threadIdx.x + u * {bt};
        if (i < {k}) q[t * {k} + i] = (i8)min(127, max(-128, __float2int_rn(v[u] * st)));
    }}
    if (threadIdx.x == 0) s[t] = st;
}}
"#,
                    e = k.div_ceil(NORM_THREADS as u64),
                    bt = NORM_THREADS
                )
            }
            KernelSpec::NormTernary {
                k,
                n,
                glu,
                residual,
                eps,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let (scale, normed) = match eps {
                    Some(e) => (
                        format!(
                            r#"    double ss = 0.0;
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) ss += (double)(xt[i] * xt[i]);
    ss = block_sum_double(ss);
    const float scale = 1.0f / sqrtf((float)(ss / {k}) + {eps});
"#,
                            eps = float_lit(*e)
                        ),
                        "((xt[i] * scale) * gain[i])",
                    ),
                    None => (String::new(), "xt[i]"),
                };
                format!(
                    r#"extern "C" __global__ void {name}(const u8* w, const float* x, const float* gain, const float* beta, const float* residual, float* out) {{
    __shared__ __align__(16) i8 qt[{k}];
    // The block's weight rows into L2 while the kernel before finishes.
    {{
        const int first = blockIdx.x * {rows}, count = min({rows}, {m} - first);
        for (int i = threadIdx.x; i < count * {lines}; i += blockDim.x) {{
            const long at = (long)(first + i / {lines}) * {rb} + (i % {lines}) * 128;
            prefetch_l2(w + at);{prefetch_up}
        }}
    }}
    await_inputs();
    const long t = blockIdx.y;
    const float* xt = x + t * {k};
{scale}    float amax = 0.0f;
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) amax = fmaxf(amax, fabsf({normed}));
    amax = block_max(amax);
    const float st = (float)(127.0 / fmax((double)amax, 1e-5));
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) qt[i] = (i8)min(127, max(-128, __float2int_rn({normed} * st)));
    __syncthreads();
    const int r0 = blockIdx.x * {rows} + (threadIdx.x / 32) * {per};
    if (r0 >= {m}) return;
    const u8* wr[4];
    #pragma unroll
    for (int i = 0; i < {per}; i++) {{
        const int r = min(r0 + i, {m} - 1);
        wr[i] = w + (long)r * {rb};{up_row}
    }}
    int sums[4];
    ternary_rows4(wr, qt, {words}, sums);
    if ((threadIdx.x & 31) == 0) {{
        for (int i = 0; i < {per}; i++) {{
            const int r = r0 + i;
            if (r >= {m}) break;
            const float gate = ((float)sums[i] / st) * beta[r];{up}
            out[t * {m} + r] = {value}{res};
        }}
    }}
}}
"#,
                    rows = self.rows_per_block().unwrap_or(0),
                    lines = (k / 4).div_ceil(128),
                    prefetch_up = if glu.is_some() {
                        format!(
                            "\n            prefetch_l2(w + at + (long){m} * {rb});",
                            rb = k / 4
                        )
                    } else {
                        String::new()
                    },
                    per = if glu.is_some() { 2 } else { 4 },
                    rb = k / 4,
                    words = k / 16,
                    up_row = if glu.is_some() {
                        format!(
                            "\n        wr[2 + i] = w + (long)(r + {m}) * {rb};",
                            rb = k / 4
                        )
                    } else {
                        String::new()
                    },
                    up = if glu.is_some() {
                        format!(
                            "\n            const float up = ((float)sums[2 + i] / st) * beta[r + {m}];"
                        )
                    } else {
                        String::new()
                    },
                    value = epilogue(*glu, *residual, m, "up").0,
                    res = epilogue(*glu, *residual, m, "up").1,
                )
            }
            KernelSpec::TernaryTiles {
                k,
                n,
                glu,
                residual,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let res = |r: &str| {
                    if *residual {
                        format!(" + residual[t * {m} + {r}]")
                    } else {
                        String::new()
                    }
                };
                let (rows, store) = match glu {
                    Some(a) => (
                        format!(
                            "const int r0 = warp, w0 = r0, w1 = r0 + {m};
    if (r0 >= {m}) return;"
                        ),
                        format!(
                            r#"const float gate = ((float)s0 / s[t]) * beta[w0];
                const float up = ((float)s1 / s[t]) * beta[w1];
                out[t * {m} + r0] = {act} * up{res0};"#,
                            act = act_call(*a, "gate"),
                            res0 = res("r0")
                        ),
                    ),
                    None => (
                        format!(
                            "const int r0 = 2 * warp, w0 = r0, w1 = min(r0 + 1, {m} - 1);
    if (r0 >= {m}) return;"
                        ),
                        format!(
                            r#"out[t * {m} + r0] = ((float)s0 / s[t]) * beta[w0]{res0};
                if (r0 + 1 < {m}) out[t * {m} + r0 + 1] = ((float)s1 / s[t]) * beta[w1]{res1};"#,
                            res0 = res("r0"),
                            res1 = res("r0 + 1")
                        ),
                    ),
                };
                format!(
                    r#"extern "C" __global__ void {name}(const u8* w, const i8* q, const float* s, const float* beta, const float* residual, float* out, int tokens) {{
    const int warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    {rows}
    const int t0 = blockIdx.y * {tb};
    const int nt = min({tb}, tokens - t0);
    const uint4* p0 = (const uint4*)(w + (long)w0 * {rb});
    const uint4* p1 = (const uint4*)(w + (long)w1 * {rb});
    int a0[{tb}], a1[{tb}];
    #pragma unroll
    for (int j = 0; j < {tb}; j++) {{ a0[j] = 0; a1[j] = 0; }}
    for (int u = threadIdx.x & 31; u < {quads}; u += 32) {{
        const uint4 x0 = p0[u], x1 = p1[u];
        const int base = (u / 2) * 128 + (u % 2) * 16;
        #pragma unroll
        for (int g = 0; g < 4; g++) {{
            const int sh = 6 - 2 * g;
            const int c0 = (int)__vsub4((x0.x >> sh) & 0x03030303u, 0x01010101u);
            const int c1 = (int)__vsub4((x0.y >> sh) & 0x03030303u, 0x01010101u);
            const int c2 = (int)__vsub4((x0.z >> sh) & 0x03030303u, 0x01010101u);
            const int c3 = (int)__vsub4((x0.w >> sh) & 0x03030303u, 0x01010101u);
            const int d0 = (int)__vsub4((x1.x >> sh) & 0x03030303u, 0x01010101u);
            const int d1 = (int)__vsub4((x1.y >> sh) & 0x03030303u, 0x01010101u);
            const int d2 = (int)__vsub4((x1.z >> sh) & 0x03030303u, 0x01010101u);
            const int d3 = (int)__vsub4((x1.w >> sh) & 0x03030303u, 0x01010101u);
            #pragma unroll
            for (int j = 0; j < {tb}; j++) {{
                if (j < nt) {{
                    const int4 a = *(const int4*)(q + (long)(t0 + j) * {k} + base + 32 * g);
                    a0[j] = __dp4a(c0, a.x, a0[j]);
                    a0[j] = __dp4a(c1, a.y, a0[j]);
                    a0[j] = __dp4a(c2, a.z, a0[j]);
                    a0[j] = __dp4a(c3, a.w, a0[j]);
                    a1[j] = __dp4a(d0, a.x, a1[j]);
                    a1[j] = __dp4a(d1, a.y, a1[j]);
                    a1[j] = __dp4a(d2, a.z, a1[j]);
                    a1[j] = __dp4a(d3, a.w, a1[j]);
                }}
            }}
        }}
    }}
    #pragma unroll
    for (int j = 0; j < {tb}; j++) {{
        if (j < nt) {{
            const int s0 = warp_sum_int(a0[j]), s1 = warp_sum_int(a1[j]);
            if ((threadIdx.x & 31) == 0) {{
                const long t = t0 + j;
                {store}
            }}
        }}
    }}
}}
"#,
                    tb = TILE_TOKENS,
                    rb = k / 4,
                    quads = k / 64
                )
            }
            KernelSpec::Ternary {
                k,
                n,
                glu,
                residual,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                format!(
                    r#"extern "C" __global__ void {name}(const u8* w, const i8* q, const float* s, const float* beta, const float* residual, float* out) {{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long t = blockIdx.y;
    if (r >= {m}) return;
    const i8* qt = q + t * {k};
{body}}}
"#,
                    body = ternary_rows_body(*k, m, *glu, *residual)
                )
            }
            KernelSpec::FloatRows {
                k,
                n,
                glu,
                residual,
                f32_weights,
                round,
            } => {
                let m = if glu.is_some() { n / 2 } else { *n };
                let (ty, row) = if *f32_weights {
                    ("float", "f32_row_f64(ROW, xt, K)".to_string())
                } else if *round == Round::Never {
                    ("u16", "f16_row_f64(ROW, xt, K)".to_string())
                } else {
                    let f = if k.is_multiple_of(8) {
                        "f16_row8"
                    } else {
                        "f16_row"
                    };
                    ("u16", format!("{f}(ROW, xt, K, round)"))
                };
                let row = |r: &str| {
                    row.replace("ROW", &format!("w + (long)({r}) * {k}"))
                        .replace("K", &k.to_string())
                };
                let (value, res) = epilogue(*glu, *residual, m, &row(&format!("r + {m}")));
                format!(
                    r#"extern "C" __global__ void {name}(const {ty}* w, const float* x, const float* residual, float* out) {{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const long t = blockIdx.y;
    if (r >= {m}) return;
    const bool round = {cond};
    const float* xt = x + t * {k};
    const float gate = {gate};
    const float v = {value}{res};
    if ((threadIdx.x & 31) == 0) out[t * {m} + r] = v;
}}
"#,
                    cond = round.cond("gridDim.y"),
                    gate = row("r"),
                )
            }
            KernelSpec::Rope {
                heads,
                d,
                dims,
                theta,
                style,
            } => format!(
                r#"extern "C" __global__ void {name}(const float* x, float* y, const int* pos) {{
    const long t = blockIdx.x;
    const long base = (t * {heads} + blockIdx.y) * {d};
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) y[base + j] = x[base + j];
    __syncthreads();
{rotate}}}
"#,
                rotate = rope_body("x + base", "y + base", *dims, *theta, *style)
            ),
            KernelSpec::QkvRopeAppendF16 {
                h,
                g,
                d,
                dims,
                theta,
                style,
            } => format!(
                r#"extern "C" __global__ void {name}(const float* qkv, float* q, u16* kc, u16* vc, const int* pos) {{
    __shared__ float y[{d}];
    const long t = blockIdx.x;
    const int head = blockIdx.y;
    const float* row = qkv + t * {row};
    const float* x = row + head * {d};
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) y[j] = x[j];
    __syncthreads();
{rotate}    __syncthreads();
    if (head < {h}) {{
        for (int j = threadIdx.x; j < {d}; j += blockDim.x) q[(t * {h} + head) * {d} + j] = y[j];
    }} else {{
        const long dst = (long)pos[t] * {gd} + (head - {h}) * {d};
        const float* v = row + ({h} + {g}) * {d} + (head - {h}) * {d};
        for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{
            kc[dst + j] = f2h(y[j]);
            vc[dst + j] = f2h(v[j]);
        }}
    }}
}}
"#,
                row = (h + 2 * g) * d,
                gd = g * d,
                rotate = rope_body("x", "y", *dims, *theta, *style)
            ),
            KernelSpec::QkvScoresF16 {
                h,
                g,
                d,
                dims,
                theta,
                style,
                scale,
                kq,
            } => format!(
                r#"extern "C" __global__ void {name}(const float* qkv, u16* kc, u16* vc, float* sc, float* cmax, const int* pos, int cap, int chunks) {{
    __shared__ float qh[{d}];
    __shared__ float kr[{d}];
    const long t = 0;
    const int head = blockIdx.y, c = blockIdx.z;
    // The chunk's cached keys (earlier steps wrote them; the positions came before every
    // kernel of the step) into L2 while the kernel before finishes.
    const int p = pos[t], n = p + 1;
    if (c * {ch} + (int)threadIdx.x < p) {{
        const u8* key = (const u8*)(kc + ((long)(c * {ch} + threadIdx.x) * {g} + head / {group}) * {d});
        for (int l = 0; l < {d} * 2; l += 128) prefetch_l2(key + l);
    }}
    await_inputs();
    if (c * {ch} >= n) {{
        if (threadIdx.x == 0) cmax[head * chunks + c] = -INFINITY;
        return;
    }}
    const int kvh = head / {group};
    const float* row = qkv;
    const bool mine = c == p / {ch};
    const float* x = row + head * {d};
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) qh[j] = x[j];
    if (mine) {{
        const float* kx = row + ({h} + kvh) * {d};
        for (int j = threadIdx.x; j < {d}; j += blockDim.x) kr[j] = kx[j];
    }}
    __syncthreads();
{rotate_q}    if (mine) {{
        const float* kx = row + ({h} + kvh) * {d};
{rotate_k}    }}
    __syncthreads();
    const bool round = {kq};
    for (int j = threadIdx.x; j < {d}; j += blockDim.x) {{
        if (round) qh[j] = round_f16(qh[j]);
        if (mine) {{
            const u16 k16 = f2h(kr[j]);
            if (head % {group} == 0) {{
                const long dst = (long)p * {gd} + kvh * {d} + j;
                kc[dst] = k16;
                vc[dst] = f2h(row[({h} + {g}) * {d} + kvh * {d} + j]);
            }}
            kr[j] = h2f(k16);
        }}
    }}
    __syncthreads();
    const int j = c * {ch} + threadIdx.x;
    float s = -INFINITY;
    if (j < n) {{
        float acc = 0.0f;
        if (j == p) {{
            for (int u = 0; u < {d}; u++) acc = fmaf(qh[u], kr[u], acc);
        }} else {{
            acc = key_dot<{d}>(qh, kc + ((long)j * {g} + kvh) * {d});
        }}
        s = acc * {scale};
        sc[head * cap + j] = s;
    }}
    s = block_max(s);
    if (threadIdx.x == 0) cmax[head * chunks + c] = s;
}}
"#,
                group = h / g,
                gd = g * d,
                ch = ATTENTION_CHUNK,
                scale = float_lit(*scale),
                kq = kq.cond("1"),
                rotate_q = rope_body("x", "qh", *dims, *theta, *style),
                rotate_k = rope_body("kx", "kr", *dims, *theta, *style)
                    .lines()
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>()
            ),
            KernelSpec::KvAppendF16 { g, d } => format!(
                r#"extern "C" __global__ void {name}(const float* k, const float* v, u16* kc, u16* vc, const int* pos) {{
    const long t = blockIdx.x;
    const long dst = (long)pos[t] * {gd};
    for (int i = threadIdx.x; i < {gd}; i += blockDim.x) {{
        kc[dst + i] = f2h(k[t * {gd} + i]);
        vc[dst + i] = f2h(v[t * {gd} + i]);
    }}
}}
"#,
                gd = g * d
            ),
            KernelSpec::AttentionF16 {
                h,
                g,
                d,
                scale,
                kq,
                kqv,
            } => format!(
                r#"extern "C" __global__ void {name}_scores(const float* q, const u16* kc, float* sc, float* cmax, const int* pos, int cap, int chunks) {{
    __shared__ float qh[{d}];
    const long t = blockIdx.x;
    const int head = blockIdx.y, c = blockIdx.z;
    const long th = t * {h} + head;
    const int n = pos[t] + 1;
    if (c * {ch} >= n) {{
        if (threadIdx.x == 0) cmax[th * chunks + c] = -INFINITY;
        return;
    }}
    const int kvh = head / {group};
    const bool round = {kq};
    for (int i = threadIdx.x; i < {d}; i += blockDim.x) qh[i] = round ? round_f16(q[th * {d} + i]) : q[th * {d} + i];
    __syncthreads();
    const int j = c * {ch} + threadIdx.x;
    float s = -INFINITY;
    if (j < n) {{
        s = key_dot<{d}>(qh, kc + ((long)j * {g} + kvh) * {d}) * {scale};
        sc[th * cap + j] = s;
    }}
    s = block_max(s);
    if (threadIdx.x == 0) cmax[th * chunks + c] = s;
}}
extern "C" __global__ void {name}_pv(const float* sc, const float* cmax, const u16* vc, float* po, float* out, int* done, const int* pos, int cap, int chunks) {{
    __shared__ float pr[{ch}];
    __shared__ float part[{groups}][{d}];
    __shared__ bool last;
    const long t = blockIdx.x;
    const int head = blockIdx.y, c = blockIdx.z;
    const long th = t * {h} + head;
    // The chunk's cached values into L2 while the kernel before finishes.
    const int n = pos[t] + 1;
    if (threadIdx.x < {ch} && c * {ch} + (int)threadIdx.x < n) {{
        const u8* value = (const u8*)(vc + ((long)(c * {ch} + threadIdx.x) * {g} + head / {group}) * {d});
        for (int l = 0; l < {d} * 2; l += 128) prefetch_l2(value + l);
    }}
    await_inputs();
    if (c * {ch} >= n) return;
    const int used = (n + {ch} - 1) / {ch};
    float mx = -INFINITY;
    for (int i = 0; i < used; i++) mx = fmaxf(mx, cmax[th * chunks + i]);
    const float* s = sc + th * cap;
    double sum = 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum += expf_ggml(s[j] - mx);
    sum = block_sum_double(sum);
    const float inv = (float)(1.0 / sum);
    const bool round = {kqv};
    const int j0 = c * {ch}, j1 = min(n, j0 + {ch});
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {{
        const float p = expf_ggml(s[j] - mx) * inv;
        pr[j - j0] = round ? round_f16(p) : p;
    }}
    __syncthreads();
    // {groups} groups of {lanes} threads, each thread two dimensions, each group every
    // {groups}th key of the chunk; the groups' sums are added in order.
    const int kvh = head / {group};
    const int grp = threadIdx.x / {lanes}, i = 2 * (threadIdx.x % {lanes});
    if (grp < {groups}) {{
        float a0 = 0.0f, a1 = 0.0f;
        #pragma unroll 4
        for (int j = j0 + grp; j < j1; j += {groups}) {{
            const unsigned int v2 = *(const unsigned int*)(vc + ((long)j * {g} + kvh) * {d} + i);
            a0 = fmaf(pr[j - j0], h2f((u16)(v2 & 0xffffu)), a0);
            a1 = fmaf(pr[j - j0], h2f((u16)(v2 >> 16)), a1);
        }}
        part[grp][i] = a0;
        part[grp][i + 1] = a1;
    }}
    __syncthreads();
    for (int e = threadIdx.x; e < {d}; e += blockDim.x) {{
        float acc = 0.0f;
        for (int q = 0; q < {groups}; q++) acc += part[q][e];
        po[(th * chunks + c) * {d} + e] = acc;
    }}
    // The last of the chunks' blocks to finish adds their sums, in order.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done + th, 1) == used - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int e = threadIdx.x; e < {d}; e += blockDim.x) {{
        float acc = 0.0f;
        for (int q = 0; q < used; q++) acc += __ldcg(po + (th * chunks + q) * {d} + e);
        out[th * {d} + e] = acc;
    }}
    if (threadIdx.x == 0) done[th] = 0;
}}
"#,
                group = h / g,
                scale = float_lit(*scale),
                ch = ATTENTION_CHUNK,
                lanes = d / 2,
                groups = attention_groups(*d),
                kq = kq.cond("gridDim.x"),
                kqv = kqv.cond("gridDim.x")
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

/// Key groups of the attention's value kernel: `d/2` threads each (two dimensions per thread),
/// as many as fit 256 threads when `d/2` divides 256.
fn attention_groups(d: u64) -> u64 {
    let lanes = (d / 2).max(1);
    if 256 % lanes == 0 { 256 / lanes } else { 1 }
}

/// Threads per block of the attention's value kernel (a multiple of 32).
pub fn attention_pv_threads(d: u64) -> u32 {
    ((d / 2).max(1) * attention_groups(d)).next_multiple_of(32) as u32
}

/// The rows part of [`KernelSpec::Ternary`], for row `r` of token `t` against the codes `qt`:
/// the exact dot (gate and up rows in one loop with a gated activation), bitnet.cpp's
/// epilogue `((f32)S / s)·β`, and lane 0 writing the row.
fn ternary_rows_body(k: u64, m: u64, glu: Option<Activation>, residual: bool) -> String {
    let (words, rb) = (k / 16, k / 4);
    let (value, res) = epilogue(glu, residual, m, "up");
    let (sums, up) = if glu.is_some() {
        (
            format!(
                "int sg, su;\n    ternary_rows2(w + (long)r * {rb}, w + (long)(r + {m}) * {rb}, qt, {words}, &sg, &su);"
            ),
            format!("\n    const float up = ((float)su / s[t]) * beta[r + {m}];"),
        )
    } else {
        (
            format!("const int sg = ternary_row(w + (long)(r) * {rb}, qt, {words});"),
            String::new(),
        )
    };
    format!(
        "    {sums}\n    const float gate = ((float)sg / s[t]) * beta[r];{up}\n    if ((threadIdx.x & 31) == 0) out[t * {m} + r] = {value}{res};\n"
    )
}

/// A rows kernel's output expression for row `r` of token `t`: `gate`, or the activation of
/// `gate` times `up` (the dot of row `r + m`), plus the residual when there is one.
fn epilogue(glu: Option<Activation>, residual: bool, m: u64, up: &str) -> (String, String) {
    let value = match glu {
        Some(a) => format!("{} * {up}", act_call(a, "gate")),
        None => "gate".to_string(),
    };
    let res = if residual {
        format!(" + residual[t * {m} + r]")
    } else {
        String::new()
    };
    (value, res)
}

/// The first phase of the Q8_0/Q8_K prologues: `yt` = the RMSNorm of `xt` times the gain
/// (or `xt` itself), by the whole block.
fn norm_into(k: u64, eps: Option<f32>) -> String {
    match eps {
        Some(e) => format!(
            r#"    const float scale = rms_scale(xt, {k}, {eps});
    for (int i = threadIdx.x; i < {k}; i += blockDim.x) yt[i] = (xt[i] * scale) * gain[i];
"#,
            eps = float_lit(e)
        ),
        None => format!("    for (int i = threadIdx.x; i < {k}; i += blockDim.x) yt[i] = xt[i];\n"),
    }
}

/// ggml's RoPE of one head (`pos[t]`, iterative theta) from `x` into `y`, which already holds a
/// copy of `x` (the dimensions past `dims` stay as they are).
fn rope_body(x: &str, y: &str, dims: u64, theta: f32, style: RopeStyle) -> String {
    let (a, b) = match style {
        RopeStyle::Neox => ("i".to_string(), format!("i + {}", dims / 2)),
        RopeStyle::Norm => ("2 * i".to_string(), "2 * i + 1".to_string()),
    };
    format!(
        r#"    const float theta_scale = {theta_scale};
    for (int i = threadIdx.x; i < {half}; i += blockDim.x) {{
        float th = (float)pos[t];
        for (int j = 0; j < i; j++) th *= theta_scale;
        const float c = cosf(th), s = sinf(th);
        const float x0 = ({x})[{a}], x1 = ({x})[{b}];
        ({y})[{a}] = x0 * c - x1 * s;
        ({y})[{b}] = x0 * s + x1 * c;
    }}
"#,
        theta_scale = float_lit(theta.powf(-2.0 / dims as f32)),
        half = dims / 2
    )
}

/// A float as an exact CUDA literal (its bits), so that rendering round-trips every value.
fn float_lit(v: f32) -> String {
    format!("__int_as_float(0x{:08x})", v.to_bits())
}

/// What every module starts with that only a GPU has: the byte types, `INFINITY`, and f16
/// conversions (round to nearest even) in PTX. Another target of the CUDA C (a CPU emulation)
/// provides its own and then takes [`HELPERS`] and the kernels as they are.
pub const PRIMITIVES: &str = r#"typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// Programmatic dependent launch (sm_90 and later): waits until the kernels before this one have
// finished and their writes are visible, then lets the next kernel's blocks start (to prefetch
// their weights, then wait here in turn). Launched without the attribute, a kernel passes
// through at once.
__device__ __forceinline__ void await_inputs() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// A hint: the 128-byte line at `p` into L2.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }
"#;

/// Helpers every module has after [`PRIMITIVES`]: block reductions, ggml's `expf`, the
/// activations, the row dots.
pub const HELPERS: &str = r#"__device__ __forceinline__ float round_f16(float f) { return h2f(f2h(f)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block reductions over blockDim.x (a multiple of 32, at most 1024); every thread gets the
// result: each warp reduces itself, then every warp reduces the warps' partials (the same
// order in each).
__device__ float block_max(float v) {
    __shared__ float part[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    float m = (threadIdx.x & 31) < blockDim.x / 32 ? part[threadIdx.x & 31] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    return m;
}
__device__ double block_sum_double(double v) {
    __shared__ double part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    double s = (threadIdx.x & 31) < blockDim.x / 32 ? part[threadIdx.x & 31] : 0.0;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// ggml's RMSNorm scale: the f32 squares summed in double, 1/sqrtf(mean + eps) in float.
__device__ float rms_scale(const float* x, int k, float eps) {
    double ss = 0.0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) ss += (double)(x[i] * x[i]);
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

// Σ (c − 1)·q over one I2_S row (codes 0..2 in 128/32 blocks) by one warp, exact. Byte b of
// word j of a block holds the codes of activations 4j + b + 32g at bits 6 − 2g; each lane
// reads 16 bytes (4 words, 64 codes) at a time and the activations they meet as 4 × 16 bytes;
// __vsub4 makes the codes signed bytes −1..1 without borrows between bytes.
__device__ int ternary_row(const u8* w, const i8* q, int words) {
    int acc = 0;
    for (int u = threadIdx.x & 31; u < words / 4; u += 32) {
        const uint4 packed = ((const uint4*)w)[u];
        const int base = (u / 2) * 128 + (u % 2) * 16;
        #pragma unroll
        for (int g = 0; g < 4; g++) {
            const int4 a = *(const int4*)(q + base + 32 * g);
            const int sh = 6 - 2 * g;
            acc = __dp4a((int)__vsub4((packed.x >> sh) & 0x03030303u, 0x01010101u), a.x, acc);
            acc = __dp4a((int)__vsub4((packed.y >> sh) & 0x03030303u, 0x01010101u), a.y, acc);
            acc = __dp4a((int)__vsub4((packed.z >> sh) & 0x03030303u, 0x01010101u), a.z, acc);
            acc = __dp4a((int)__vsub4((packed.w >> sh) & 0x03030303u, 0x01010101u), a.w, acc);
        }
    }
    return warp_sum_int(acc);
}
// Two rows against the same activations in one loop (twice the loads in flight).
__device__ void ternary_rows2(const u8* w0, const u8* w1, const i8* q, int words, int* s0, int* s1) {
    int a0 = 0, a1 = 0;
    for (int u = threadIdx.x & 31; u < words / 4; u += 32) {
        const uint4 p0 = ((const uint4*)w0)[u];
        const uint4 p1 = ((const uint4*)w1)[u];
        const int base = (u / 2) * 128 + (u % 2) * 16;
        #pragma unroll
        for (int g = 0; g < 4; g++) {
            const int4 a = *(const int4*)(q + base + 32 * g);
            const int sh = 6 - 2 * g;
            a0 = __dp4a((int)__vsub4((p0.x >> sh) & 0x03030303u, 0x01010101u), a.x, a0);
            a0 = __dp4a((int)__vsub4((p0.y >> sh) & 0x03030303u, 0x01010101u), a.y, a0);
            a0 = __dp4a((int)__vsub4((p0.z >> sh) & 0x03030303u, 0x01010101u), a.z, a0);
            a0 = __dp4a((int)__vsub4((p0.w >> sh) & 0x03030303u, 0x01010101u), a.w, a0);
            a1 = __dp4a((int)__vsub4((p1.x >> sh) & 0x03030303u, 0x01010101u), a.x, a1);
            a1 = __dp4a((int)__vsub4((p1.y >> sh) & 0x03030303u, 0x01010101u), a.y, a1);
            a1 = __dp4a((int)__vsub4((p1.z >> sh) & 0x03030303u, 0x01010101u), a.z, a1);
            a1 = __dp4a((int)__vsub4((p1.w >> sh) & 0x03030303u, 0x01010101u), a.w, a1);
        }
    }
    *s0 = warp_sum_int(a0);
    *s1 = warp_sum_int(a1);
}

// Four rows (pointers in `w`) against the same activations by one warp, every load of the
// four in flight together; `out` gets the four exact sums.
__device__ __forceinline__ void ternary_rows4(const u8* const* w, const i8* q, int words, int* out) {
    int acc[4] = {0, 0, 0, 0};
    for (int u = threadIdx.x & 31; u < words / 4; u += 32) {
        uint4 p[4];
        #pragma unroll
        for (int r = 0; r < 4; r++) p[r] = ((const uint4*)w[r])[u];
        const int base = (u / 2) * 128 + (u % 2) * 16;
        #pragma unroll
        for (int g = 0; g < 4; g++) {
            const int4 a = *(const int4*)(q + base + 32 * g);
            const int sh = 6 - 2 * g;
            #pragma unroll
            for (int r = 0; r < 4; r++) {
                acc[r] = __dp4a((int)__vsub4((p[r].x >> sh) & 0x03030303u, 0x01010101u), a.x, acc[r]);
                acc[r] = __dp4a((int)__vsub4((p[r].y >> sh) & 0x03030303u, 0x01010101u), a.y, acc[r]);
                acc[r] = __dp4a((int)__vsub4((p[r].z >> sh) & 0x03030303u, 0x01010101u), a.z, acc[r]);
                acc[r] = __dp4a((int)__vsub4((p[r].w >> sh) & 0x03030303u, 0x01010101u), a.w, acc[r]);
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < 4; r++) out[r] = warp_sum_int(acc[r]);
}

// Q8_0/Q4_0/Q4_1 rows against Q8_0 activations by eight threads, thread l = ggml's AVX2 lane l
// (values 4l..4l+3 of every block, fused multiply-add of dw·dx in block order); every thread of
// the eight gets hsum_float_8 of the lanes (plus Q4_1's Σ m·s, summed in block order).
__device__ __forceinline__ unsigned le16(const u8* b) { return b[0] | (b[1] << 8); }
__device__ __forceinline__ int le32(const u8* b) { return (int)(b[0] | (b[1] << 8) | (b[2] << 16) | ((unsigned)b[3] << 24)); }
__device__ float hsum8(float a) {
    const int base = threadIdx.x & 24;
    float v[8];
    for (int i = 0; i < 8; i++) v[i] = __shfl_sync(0xffffffffu, a, base + i);
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}
__device__ float qrow_q8_0(const u8* w, const i8* q, const float* dx, const float* sx, int blocks) {
    const int l = threadIdx.x & 7;
    float acc = 0.0f;
    for (int b = 0; b < blocks; b++) {
        const u8* wb = w + b * 34;
        const int s = __dp4a(le32(wb + 2 + 4 * l), *(const int*)(q + b * 32 + 4 * l), 0);
        acc = fmaf(h2f(le16(wb)) * dx[b], (float)s, acc);
    }
    return hsum8(acc);
}
__device__ float qrow_q4_0(const u8* w, const i8* q, const float* dx, const float* sx, int blocks) {
    const int l = threadIdx.x & 7;
    float acc = 0.0f;
    for (int b = 0; b < blocks; b++) {
        const u8* wb = w + b * 18;
        const unsigned p = (unsigned)le32(wb + 2 + 4 * (l & 3));
        const unsigned nib = l < 4 ? p & 0x0f0f0f0fu : (p >> 4) & 0x0f0f0f0fu;
        const int s = __dp4a((int)__vsub4(nib, 0x08080808u), *(const int*)(q + b * 32 + 4 * l), 0);
        acc = fmaf(h2f(le16(wb)) * dx[b], (float)s, acc);
    }
    return hsum8(acc);
}
__device__ float qrow_q4_1(const u8* w, const i8* q, const float* dx, const float* sx, int blocks) {
    const int l = threadIdx.x & 7;
    float acc = 0.0f, summs = 0.0f;
    for (int b = 0; b < blocks; b++) {
        const u8* wb = w + b * 20;
        summs += h2f(le16(wb + 2)) * sx[b];
        const unsigned p = (unsigned)le32(wb + 4 + 4 * (l & 3));
        const unsigned nib = l < 4 ? p & 0x0f0f0f0fu : (p >> 4) & 0x0f0f0f0fu;
        const int s = __dp4a((int)nib, *(const int*)(q + b * 32 + 4 * l), 0);
        acc = fmaf(h2f(le16(wb)) * dx[b], (float)s, acc);
    }
    return hsum8(acc) + summs;
}

// One repacked TQ row against Q8_K activations by one warp: two blocks at a time (a half-warp
// each, one word per lane), each block's exact dot, then the float sum in block order.
__device__ float tq_row(const unsigned* w, const i8* q, const float* dx, const float* sw, int blocks) {
    const int lane = threadIdx.x & 31, half = lane / 16, wi = lane % 16;
    float sum = 0.0f;
    for (int b0 = 0; b0 < blocks; b0 += 2) {
        const int b = b0 + half;
        int acc = 0;
        if (b < blocks) {
            const unsigned word = w[b * 16 + wi];
            const int4 a = *(const int4*)(q + b * 256 + wi * 16);
            acc = __dp4a((int)__vsub4(word & 0x03030303u, 0x01010101u), a.x, acc);
            acc = __dp4a((int)__vsub4((word >> 2) & 0x03030303u, 0x01010101u), a.y, acc);
            acc = __dp4a((int)__vsub4((word >> 4) & 0x03030303u, 0x01010101u), a.z, acc);
            acc = __dp4a((int)__vsub4((word >> 6) & 0x03030303u, 0x01010101u), a.w, acc);
        }
        for (int o = 8; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        const int s0 = __shfl_sync(0xffffffffu, acc, 0), s1 = __shfl_sync(0xffffffffu, acc, 16);
        sum += (dx[b0] * sw[b0]) * (float)s0;
        if (b0 + 1 < blocks) sum += (dx[b0 + 1] * sw[b0 + 1]) * (float)s1;
    }
    return sum;
}

// The dot of a head's query (f32, in shared memory) with one f16 cache row of D values, in
// order, reading 8 halves at a time (rows are 16-byte aligned: D is a multiple of 8).
template <int D> __device__ __forceinline__ float key_dot(const float* qh, const u16* k) {
    const uint4* kr = (const uint4*)k;
    float acc = 0.0f;
    #pragma unroll 4
    for (int u = 0; u < D / 8; u++) {
        const uint4 k8 = kr[u];
        acc = fmaf(qh[8 * u + 0], h2f((u16)(k8.x & 0xffffu)), acc);
        acc = fmaf(qh[8 * u + 1], h2f((u16)(k8.x >> 16)), acc);
        acc = fmaf(qh[8 * u + 2], h2f((u16)(k8.y & 0xffffu)), acc);
        acc = fmaf(qh[8 * u + 3], h2f((u16)(k8.y >> 16)), acc);
        acc = fmaf(qh[8 * u + 4], h2f((u16)(k8.z & 0xffffu)), acc);
        acc = fmaf(qh[8 * u + 5], h2f((u16)(k8.z >> 16)), acc);
        acc = fmaf(qh[8 * u + 6], h2f((u16)(k8.w & 0xffffu)), acc);
        acc = fmaf(qh[8 * u + 7], h2f((u16)(k8.w >> 16)), acc);
    }
    return acc;
}

// One f16 row against activations (rounded to f16 when `round`), by one warp, summed in float.
__device__ __forceinline__ float maybe_f16(float v, bool round) { return round ? round_f16(v) : v; }
__device__ float f16_row(const u16* w, const float* x, int k, bool round) {
    float acc = 0.0f;
    for (int i = threadIdx.x & 31; i < k; i += 32) acc = fmaf(h2f(w[i]), maybe_f16(x[i], round), acc);
    return warp_sum(acc);
}
// The same for k a multiple of 8 (rows 16-byte aligned): each lane reads 8 halves at a time.
__device__ float f16_row8(const u16* w, const float* x, int k, bool round) {
    float acc = 0.0f;
    for (int u = threadIdx.x & 31; u < k / 8; u += 32) {
        const uint4 h = ((const uint4*)w)[u];
        const float4 a = ((const float4*)x)[2 * u], b = ((const float4*)x)[2 * u + 1];
        acc = fmaf(h2f((u16)(h.x & 0xffffu)), maybe_f16(a.x, round), acc);
        acc = fmaf(h2f((u16)(h.x >> 16)), maybe_f16(a.y, round), acc);
        acc = fmaf(h2f((u16)(h.y & 0xffffu)), maybe_f16(a.z, round), acc);
        acc = fmaf(h2f((u16)(h.y >> 16)), maybe_f16(a.w, round), acc);
        acc = fmaf(h2f((u16)(h.z & 0xffffu)), maybe_f16(b.x, round), acc);
        acc = fmaf(h2f((u16)(h.z >> 16)), maybe_f16(b.y, round), acc);
        acc = fmaf(h2f((u16)(h.w & 0xffffu)), maybe_f16(b.z, round), acc);
        acc = fmaf(h2f((u16)(h.w >> 16)), maybe_f16(b.w, round), acc);
    }
    return warp_sum(acc);
}
__device__ __forceinline__ double warp_sum_double(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// An f16 or f32 row against f32 activations, by one warp, summed in double.
__device__ float f16_row_f64(const u16* w, const float* x, int k) {
    double acc = 0.0;
    for (int i = threadIdx.x & 31; i < k; i += 32) acc += (double)h2f(w[i]) * (double)x[i];
    return (float)warp_sum_double(acc);
}
__device__ float f32_row_f64(const float* w, const float* x, int k) {
    double acc = 0.0;
    for (int i = threadIdx.x & 31; i < k; i += 32) acc += (double)w[i] * (double)x[i];
    return (float)warp_sum_double(acc);
}

"#;

/// Whether every kernel of a module's PTX waits for its inputs (`griddepcontrol.wait`, in PTX
/// for sm_90 and later), so that it may be launched before the kernel it depends on ends.
pub fn every_kernel_awaits_inputs(ptx: &str) -> bool {
    let mut entries = ptx.split(".entry ").skip(1).peekable();
    entries.peek().is_some() && entries.all(|f| f.contains("griddepcontrol.wait"))
}

/// One module: [`PRIMITIVES`], then [`kernels`].
pub fn module(specs: &[KernelSpec]) -> String {
    format!("{PRIMITIVES}{}", kernels(specs))
}

/// [`HELPERS`] and each distinct kernel once, in the order given.
pub fn kernels(specs: &[KernelSpec]) -> String {
    let mut s = String::from(HELPERS);
    let mut seen = std::collections::BTreeSet::new();
    for spec in specs {
        if seen.insert(spec.name()) {
            let _ = writeln!(s, "{}", spec.source());
        }
    }
    s
}
