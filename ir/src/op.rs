//! The closed set of operations. Each op is declared once here with its operands, attributes
//! and shape rule; the verifier, printer, parser and interpreter all match on [`Op`], so an op
//! that is not handled everywhere is a compile error.

use crate::encoding::Encoding;
use crate::types::{Activation, DType, Dim, HalfPath, RopeStyle, TensorType};
use serde::{Deserialize, Serialize};

/// An operation. Attributes are fields, printed in declaration order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input, bound at run time: `tokens` or `positions`, both `i32[T]`.
    Input { name: String },
    /// A model weight, referenced by its name in the model file; typed by its encoding.
    Weight { name: String },
    /// Rows of an embedding table, decoded to f32: `(ids i32[T], table [V,H]) -> f32[T,H]`.
    Embed,
    /// RMS normalization times a gain (ggml: sum of squares in f64, `1/sqrt(mean + eps)` in
    /// f32, `x·scale`, then `·w`): `(x f32[..,N], w f32[N]) -> f32[..,N]`.
    RmsNorm { eps: f32 },
    /// Per-token absmax int8 quantization (bitnet.cpp): `s = 127/max(|x|, 1e-5)` in f64 rounded
    /// to f32, `q = clamp(round_half_even(x·s), −128, 127)`: `(x f32[T,K]) -> (i8[T,K], f32[T])`.
    QuantAct,
    /// Ternary matmul on int8 activations with bitnet.cpp's epilogue
    /// `((f32)Σ(c−1)·q / s) · β`: `(q i8[T,K], s f32[T], w i2_s[N,K]) -> f32[T,N]`.
    TMatmul,
    /// Matmul with the numerics of the weight's encoding (llama.cpp's activation quantization
    /// for Q and TQ formats, plain f32 for f32 weights). For f16/bf16 weights `half` is the
    /// engine's path; it is `f32` for other encodings: `(x f32[T,K], w [N,K]) -> f32[T,N]`.
    Matmul { half: HalfPath },
    /// Elementwise product; `b` has `a`'s shape or is `[1]`.
    Mul,
    /// Elementwise sum; `b` has `a`'s shape or is `[1]`.
    Add,
    /// Elementwise activation.
    Act { act: Activation },
    /// The same elements with a new shape (the result type says which).
    Reshape { shape: Vec<Dim> },
    /// Rotary position embedding of the first `dims` dimensions of every head, with ggml's
    /// iterative f32 theta: `(x f32[T,H,D], pos i32[T]) -> f32[T,H,D]`.
    Rope {
        theta: f32,
        style: RopeStyle,
        dims: u32,
    },
    /// Writes this step's K and V into layer `layer` of the KV cache at positions `P..P+T`
    /// (rounded to the cache dtype) and returns the whole cache:
    /// `(k f32[T,G,D], v f32[T,G,D]) -> (kc c[P+T,G,D], vc c[P+T,G,D])`, `c` = `cache`.
    KvAppend { layer: u32, cache: DType },
    /// Causal grouped-query attention with ggml's non-flash numerics: scores `Q·K` by path
    /// `kq`, times `scale`, ggml's softmax, then probabilities times V by path `kqv` (the
    /// paths matter for an f16 cache): `(q f32[T,H,D], kc [P+T,G,D], vc [P+T,G,D]) -> f32[T,H,D]`.
    Attention {
        scale: f32,
        kq: HalfPath,
        kqv: HalfPath,
    },
    /// Marks `x` as the graph output `name`. Has no result.
    Output { name: String },
    /// A fused linear layer, built by the passes: RMSNorm of `x` by `gain` when `norm` holds an
    /// epsilon; the matmul of the weight's encoding (I2_S: bitnet.cpp's per-token int8 and
    /// epilogue, as `quant_act` + `tmatmul`; others as `matmul` with path `half`); then
    /// `act(y[:, :N/2]) · y[:, N/2:]` when `glu` names an activation; then `residual + y`:
    /// `(x f32[T,K], w [N,K], [gain f32[K]], [residual f32[T,M]]) -> f32[T,M]`.
    Linear {
        norm: Option<f32>,
        glu: Option<Activation>,
        residual: bool,
        half: HalfPath,
    },
    /// Weights stacked along their output rows, each keeping its own scales:
    /// `(w0 [N0,K], w1 [N1,K], …) -> [N0+N1+…,K]`.
    WeightConcat,
    /// Consecutive column ranges: `(x f32[T,N0+N1+…]) -> (f32[T,N0], f32[T,N1], …)`.
    Split { sizes: Vec<u64> },
    /// The same weight stored in the layout `layout` that a kernel reads; the values it stands
    /// for do not change: `(w [N,K]) -> [N,K]`.
    Repack { layout: String },
}

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Embed => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::QuantAct => "quant_act",
            Op::TMatmul => "tmatmul",
            Op::Matmul { .. } => "matmul",
            Op::Mul => "mul",
            Op::Add => "add",
            Op::Act { .. } => "act",
            Op::Reshape { .. } => "reshape",
            Op::Rope { .. } => "rope",
            Op::KvAppend { .. } => "kv_append",
            Op::Attention { .. } => "attention",
            Op::Output { .. } => "output",
            Op::Linear { .. } => "linear",
            Op::WeightConcat => "weight_concat",
            Op::Split { .. } => "split",
            Op::Repack { .. } => "repack",
        }
    }

    /// Number of operands.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Weight { .. } | Op::WeightConcat => 0,
            Op::QuantAct
            | Op::Act { .. }
            | Op::Reshape { .. }
            | Op::Output { .. }
            | Op::Split { .. }
            | Op::Repack { .. } => 1,
            Op::Embed
            | Op::RmsNorm { .. }
            | Op::Matmul { .. }
            | Op::Mul
            | Op::Add
            | Op::Rope { .. }
            | Op::KvAppend { .. } => 2,
            Op::TMatmul | Op::Attention { .. } => 3,
            Op::Linear { norm, residual, .. } => 2 + norm.is_some() as usize + *residual as usize,
        }
    }

    /// Whether the op takes any number of operands (at least two); `arity` is then 0.
    pub fn is_variadic(&self) -> bool {
        matches!(self, Op::WeightConcat)
    }

    /// The string operand printed in quotes after the op name (`input "tokens"`).
    pub fn label(&self) -> Option<&str> {
        match self {
            Op::Input { name } | Op::Weight { name } | Op::Output { name } => Some(name),
            _ => None,
        }
    }

    /// Attributes as `key=value` pairs in schema order (Reshape's shape is shown by its type).
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        match self {
            Op::RmsNorm { eps } => vec![("eps", fmt_f32(*eps))],
            Op::Act { act } => vec![("act", act.name().into())],
            Op::Rope { theta, style, dims } => {
                vec![
                    ("theta", fmt_f32(*theta)),
                    ("style", style.name().into()),
                    ("dims", dims.to_string()),
                ]
            }
            Op::KvAppend { layer, cache } => {
                vec![("layer", layer.to_string()), ("cache", cache.name().into())]
            }
            Op::Matmul { half } => vec![("half", half.name().into())],
            Op::Linear {
                norm,
                glu,
                residual,
                half,
            } => vec![
                ("norm", norm.map_or("none".into(), fmt_f32)),
                ("glu", glu.map_or("none", |a| a.name()).into()),
                ("residual", residual.to_string()),
                ("half", half.name().into()),
            ],
            Op::Split { sizes } => {
                let s: Vec<String> = sizes.iter().map(u64::to_string).collect();
                vec![("sizes", format!("[{}]", s.join(",")))]
            }
            Op::Repack { layout } => vec![("layout", layout.clone())],
            Op::Attention { scale, kq, kqv } => {
                vec![
                    ("scale", fmt_f32(*scale)),
                    ("kq", kq.name().into()),
                    ("kqv", kqv.name().into()),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// Builds an op from its text-form pieces: name, label, attributes and result types.
    pub fn from_parts(
        name: &str,
        label: Option<String>,
        attrs: &[(String, String)],
        results: &[TensorType],
    ) -> Result<Op, String> {
        let attr = |k: &str| -> Result<&str, String> {
            attrs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("{name}: missing attribute '{k}'"))
        };
        let f32_attr = |k: &str| -> Result<f32, String> {
            let v = attr(k)?;
            v.parse()
                .map_err(|_| format!("{name}: attribute {k}={v} is not a number"))
        };
        let u32_attr = |k: &str| -> Result<u32, String> {
            let v = attr(k)?;
            v.parse()
                .map_err(|_| format!("{name}: attribute {k}={v} is not an integer"))
        };
        let half_attr = |k: &str| -> Result<HalfPath, String> {
            let v = attr(k)?;
            HalfPath::from_name(v).ok_or_else(|| {
                format!("{name}: attribute {k}={v} is not f32, gemv, gemm16 or gemm32")
            })
        };
        let need_label = || {
            label
                .clone()
                .ok_or_else(|| format!("{name}: expected a quoted name"))
        };
        let op = match name {
            "input" => Op::Input {
                name: need_label()?,
            },
            "weight" => Op::Weight {
                name: need_label()?,
            },
            "output" => Op::Output {
                name: need_label()?,
            },
            "embed" => Op::Embed,
            "rms_norm" => Op::RmsNorm {
                eps: f32_attr("eps")?,
            },
            "quant_act" => Op::QuantAct,
            "tmatmul" => Op::TMatmul,
            "matmul" => Op::Matmul {
                half: half_attr("half")?,
            },
            "mul" => Op::Mul,
            "add" => Op::Add,
            "act" => Op::Act {
                act: match attr("act")? {
                    "silu" => Activation::Silu,
                    "relu2" => Activation::Relu2,
                    a => return Err(format!("act: unknown activation '{a}'")),
                },
            },
            "reshape" => Op::Reshape {
                shape: results
                    .first()
                    .ok_or("reshape: missing result type")?
                    .shape
                    .clone(),
            },
            "rope" => Op::Rope {
                theta: f32_attr("theta")?,
                style: match attr("style")? {
                    "neox" => RopeStyle::Neox,
                    "norm" => RopeStyle::Norm,
                    s => return Err(format!("rope: unknown style '{s}'")),
                },
                dims: u32_attr("dims")?,
            },
            "kv_append" => Op::KvAppend {
                layer: u32_attr("layer")?,
                cache: DType::from_name(attr("cache")?).ok_or("kv_append: unknown cache dtype")?,
            },
            "attention" => Op::Attention {
                scale: f32_attr("scale")?,
                kq: half_attr("kq")?,
                kqv: half_attr("kqv")?,
            },
            "linear" => Op::Linear {
                norm: match attr("norm")? {
                    "none" => None,
                    _ => Some(f32_attr("norm")?),
                },
                glu: match attr("glu")? {
                    "none" => None,
                    a => Some(
                        Activation::from_name(a)
                            .ok_or_else(|| format!("linear: unknown activation '{a}'"))?,
                    ),
                },
                residual: match attr("residual")? {
                    "true" => true,
                    "false" => false,
                    r => return Err(format!("linear: residual={r} is not true or false")),
                },
                half: half_attr("half")?,
            },
            "weight_concat" => Op::WeightConcat,
            "split" => Op::Split {
                sizes: attr("sizes")?
                    .strip_prefix('[')
                    .and_then(|s| s.strip_suffix(']'))
                    .ok_or("split: sizes must look like [a,b,…]")?
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<u64>()
                            .map_err(|_| format!("split: bad size '{n}'"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            },
            "repack" => Op::Repack {
                layout: attr("layout")?.to_string(),
            },
            other => return Err(format!("unknown op '{other}'")),
        };
        let known: Vec<&str> = op.attributes().iter().map(|(k, _)| *k).collect();
        if let Some((k, _)) = attrs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(format!("{name}: unknown attribute '{k}'"));
        }
        Ok(op)
    }

    /// The result types of this op applied to operands of the given types, or why the operands
    /// do not fit. `Weight` and `Input` results are given by the caller (their type is data).
    pub fn infer(&self, operands: &[&TensorType]) -> Result<Vec<TensorType>, String> {
        if self.is_variadic() {
            if operands.len() < 2 {
                return Err(format!("takes at least 2 operands, got {}", operands.len()));
            }
        } else if operands.len() != self.arity() {
            return Err(format!(
                "takes {} operands, got {}",
                self.arity(),
                operands.len()
            ));
        }
        let f32_ty = |shape: Vec<Dim>| TensorType::new(DType::F32, shape);
        let expect = |ok: bool, what: &str| {
            if ok { Ok(()) } else { Err(what.to_string()) }
        };
        match self {
            Op::Input { .. } | Op::Weight { .. } => {
                Err("results are declared, not inferred".to_string())
            }
            Op::Output { .. } => {
                expect(operands[0].dtype == DType::F32, "output must be f32")?;
                Ok(Vec::new())
            }
            Op::Embed => {
                let (ids, table) = (operands[0], operands[1]);
                expect(
                    ids.dtype == DType::I32 && ids.rank() == 1,
                    "ids must be i32[T]",
                )?;
                expect(
                    table.rank() == 2 && table.dtype.encoding().is_some(),
                    "table must be a 2-D weight",
                )?;
                Ok(vec![f32_ty(vec![ids.shape[0], table.shape[1]])])
            }
            Op::RmsNorm { .. } => {
                let (x, w) = (operands[0], operands[1]);
                expect(x.dtype == DType::F32, "x must be f32")?;
                expect(
                    w.dtype.is_float() && w.rank() == 1 && Some(w.shape[0]) == x.last(),
                    "gain must be float[N] with N the last dim of x",
                )?;
                Ok(vec![x.clone()])
            }
            Op::QuantAct => {
                let x = operands[0];
                expect(x.dtype == DType::F32 && x.rank() == 2, "x must be f32[T,K]")?;
                Ok(vec![
                    TensorType::new(DType::I8, x.shape.clone()),
                    f32_ty(vec![x.shape[0]]),
                ])
            }
            Op::TMatmul => {
                let (q, s, w) = (operands[0], operands[1], operands[2]);
                expect(q.dtype == DType::I8 && q.rank() == 2, "q must be i8[T,K]")?;
                expect(
                    s.dtype == DType::F32 && s.shape == [q.shape[0]],
                    "s must be f32[T]",
                )?;
                expect(w.dtype == DType::Packed(Encoding::I2S), "w must be i2_s")?;
                expect(
                    w.rank() == 2 && w.shape[1] == q.shape[1],
                    "w must be [N,K] with q's K",
                )?;
                Ok(vec![f32_ty(vec![q.shape[0], w.shape[0]])])
            }
            Op::Matmul { half } => {
                let (x, w) = (operands[0], operands[1]);
                let half_weight = matches!(w.dtype, DType::F16 | DType::BF16);
                expect(
                    half_weight || *half == HalfPath::F32,
                    "the half path applies to f16/bf16 weights only (f32 otherwise)",
                )?;
                expect(x.dtype == DType::F32 && x.rank() == 2, "x must be f32[T,K]")?;
                let enc = w.dtype.encoding();
                expect(
                    enc.is_some() && enc != Some(Encoding::I2S),
                    "w must be a weight other than i2_s (use quant_act + tmatmul)",
                )?;
                expect(
                    w.rank() == 2 && w.shape[1] == x.shape[1],
                    "w must be [N,K] with x's K",
                )?;
                Ok(vec![f32_ty(vec![x.shape[0], w.shape[0]])])
            }
            Op::Mul | Op::Add => {
                let (a, b) = (operands[0], operands[1]);
                expect(
                    a.dtype == DType::F32 && b.dtype == DType::F32,
                    "operands must be f32",
                )?;
                expect(
                    b.shape == a.shape || b.shape == [Dim::Fixed(1)],
                    "b must have a's shape or be [1]",
                )?;
                Ok(vec![a.clone()])
            }
            Op::Act { .. } => {
                expect(operands[0].dtype == DType::F32, "x must be f32")?;
                Ok(vec![operands[0].clone()])
            }
            Op::Reshape { shape } => {
                let x = operands[0];
                expect(x.dtype == DType::F32, "x must be f32")?;
                // Symbolic dims must appear in the same order; fixed dims must multiply out.
                let syms = |s: &[Dim]| {
                    s.iter()
                        .filter(|d| d.fixed().is_none())
                        .copied()
                        .collect::<Vec<_>>()
                };
                let prod = |s: &[Dim]| s.iter().filter_map(|d| d.fixed()).product::<u64>();
                expect(
                    syms(&x.shape) == syms(shape) && prod(&x.shape) == prod(shape),
                    "the element count must not change",
                )?;
                Ok(vec![TensorType::new(DType::F32, shape.clone())])
            }
            Op::Rope { dims, .. } => {
                let (x, pos) = (operands[0], operands[1]);
                expect(
                    x.dtype == DType::F32 && x.rank() == 3,
                    "x must be f32[T,H,D]",
                )?;
                expect(
                    pos.dtype == DType::I32 && pos.shape == [x.shape[0]],
                    "pos must be i32[T]",
                )?;
                let d = x.shape[2].fixed().unwrap_or(0);
                expect(
                    *dims > 0 && dims % 2 == 0 && *dims as u64 <= d,
                    "dims must be even and at most the head size",
                )?;
                Ok(vec![x.clone()])
            }
            Op::KvAppend { cache, .. } => {
                let (k, v) = (operands[0], operands[1]);
                expect(
                    k.dtype == DType::F32 && k.rank() == 3 && k.shape[0] == Dim::T,
                    "k must be f32[T,G,D]",
                )?;
                expect(v == k, "v must have k's type")?;
                expect(
                    matches!(cache, DType::F16 | DType::F32),
                    "cache must be f16 or f32",
                )?;
                let c = TensorType::new(*cache, vec![Dim::Ctx, k.shape[1], k.shape[2]]);
                Ok(vec![c.clone(), c])
            }
            Op::Linear {
                norm,
                glu,
                residual,
                half,
            } => {
                let (x, w) = (operands[0], operands[1]);
                expect(x.dtype == DType::F32 && x.rank() == 2, "x must be f32[T,K]")?;
                expect(
                    w.dtype.encoding().is_some() && w.rank() == 2 && w.shape[1] == x.shape[1],
                    "w must be a weight [N,K] with x's K",
                )?;
                let half_weight = matches!(w.dtype, DType::F16 | DType::BF16);
                expect(
                    half_weight || *half == HalfPath::F32,
                    "the half path applies to f16/bf16 weights only (f32 otherwise)",
                )?;
                let mut next = 2;
                if norm.is_some() {
                    let g = operands[next];
                    expect(
                        g.dtype.is_float() && g.shape == [x.shape[1]],
                        "gain must be float[K]",
                    )?;
                    next += 1;
                }
                let n = w.shape[0].fixed().unwrap_or(0);
                let out = match glu {
                    Some(_) => {
                        expect(
                            n % 2 == 0,
                            "a gated activation needs an even number of rows",
                        )?;
                        n / 2
                    }
                    None => n,
                };
                let y = f32_ty(vec![x.shape[0], Dim::Fixed(out)]);
                if *residual {
                    expect(
                        *operands[next] == y,
                        "the residual must have the output's type",
                    )?;
                }
                Ok(vec![y])
            }
            Op::WeightConcat => {
                let first = operands[0];
                expect(
                    first.dtype.encoding().is_some() && first.rank() == 2,
                    "operands must be 2-D weights",
                )?;
                let mut rows = 0;
                for w in operands {
                    expect(
                        w.dtype == first.dtype && w.rank() == 2 && w.shape[1] == first.shape[1],
                        "weights must share dtype and K",
                    )?;
                    rows += w.shape[0].fixed().unwrap_or(0);
                }
                Ok(vec![TensorType::new(
                    first.dtype,
                    vec![Dim::Fixed(rows), first.shape[1]],
                )])
            }
            Op::Split { sizes } => {
                let x = operands[0];
                expect(x.dtype == DType::F32 && x.rank() == 2, "x must be f32[T,N]")?;
                expect(
                    sizes.len() >= 2 && sizes.iter().all(|&s| s > 0),
                    "sizes must be at least two positive numbers",
                )?;
                expect(
                    Some(sizes.iter().sum::<u64>()) == x.shape[1].fixed(),
                    "sizes must add up to N",
                )?;
                Ok(sizes
                    .iter()
                    .map(|&s| f32_ty(vec![x.shape[0], Dim::Fixed(s)]))
                    .collect())
            }
            Op::Repack { layout } => {
                let w = operands[0];
                expect(w.dtype.encoding().is_some(), "repack takes a weight")?;
                expect(
                    !layout.is_empty()
                        && layout
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "layout names use letters, digits and '_'",
                )?;
                Ok(vec![w.clone()])
            }
            Op::Attention { .. } => {
                let (q, kc, vc) = (operands[0], operands[1], operands[2]);
                expect(
                    q.dtype == DType::F32 && q.rank() == 3,
                    "q must be f32[T,H,D]",
                )?;
                expect(
                    kc.rank() == 3 && kc.shape[0] == Dim::Ctx && kc.shape[2] == q.shape[2],
                    "kc must be [P+T,G,D]",
                )?;
                expect(vc == kc, "vc must have kc's type")?;
                let (h, g) = (
                    q.shape[1].fixed().unwrap_or(0),
                    kc.shape[1].fixed().unwrap_or(0),
                );
                expect(
                    g > 0 && h % g == 0,
                    "query heads must be a multiple of KV heads",
                )?;
                Ok(vec![q.clone()])
            }
        }
    }
}

/// Floats in the shortest form that parses back to the same value.
pub fn fmt_f32(v: f32) -> String {
    format!("{v:?}")
}
