//! Lowering: a validated model config and its file's tensors → one `ir::Graph`, used for both
//! prefill (`T > 1`) and decode (`T = 1`). The graph is the forward pass of FORMATS.md §4.5,
//! op by op, with the encoding of each weight choosing its matmul numerics.

use crate::arch::{Architecture, ModelConfig};
use crate::error::GgufError;
use crate::gguf::GgufFile;
use bitnetc_ir::op::Op;
use bitnetc_ir::types::HalfPath;
use bitnetc_ir::{DType, Dim, Encoding, Graph, IrError, TensorType, Value};

/// Choices that change the computation but not the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    /// KV cache element type: f16 (as bitnet.cpp and llama.cpp) or f32.
    pub kv_cache: DType,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            kv_cache: DType::F16,
        }
    }
}

/// The float numerics of the engine that defines a model's format, where they differ
/// (measured against each engine's own outputs on the reference fixtures).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EngineNumerics {
    /// Path of F16 block matrices.
    block: HalfPath,
    /// Path of BF16 block matrices.
    block_bf16: HalfPath,
    /// Path of an F16/BF16 output head.
    head: HalfPath,
    /// Paths of the attention's `Q·K` and `P·V`.
    kq: HalfPath,
    kqv: HalfPath,
}

impl EngineNumerics {
    fn of(config: &ModelConfig) -> EngineNumerics {
        match config.architecture {
            // bitnet.cpp: its llamafile copy multiplies F16 by F32 only, so several-token
            // steps keep activations and attention probabilities in F32; Q reaches `Q·K`
            // permuted (not contiguous), which always sends it through ggml's GEMV.
            Architecture::BitnetB158 | Architecture::Bitnet25 => EngineNumerics {
                block: HalfPath::Gemm32,
                block_bf16: HalfPath::Gemm32,
                head: HalfPath::Gemm32,
                kq: HalfPath::Gemv,
                kqv: HalfPath::Gemm32,
            },
            // llama.cpp (mid-2025, x86 with AMX): F16 block matrices live in the AMX buffer,
            // whose kernel keeps activations in F32; the tied output head stays in the CPU
            // buffer, where llamafile multiplies F16 by F16, as it does in the attention.
            // BF16 matrices are not AMX's: ggml converts the activations to BF16 (and
            // multiplies in BF16 pairs), which tinyBLAS on BF16-rounded operands follows up to
            // the accumulation order.
            Architecture::Bitnet | Architecture::Llama => EngineNumerics {
                block: HalfPath::F32,
                block_bf16: HalfPath::Gemm16,
                head: HalfPath::Gemm16,
                kq: HalfPath::Gemm16,
                kqv: HalfPath::Gemm16,
            },
        }
    }
}

struct Lowering<'a> {
    g: Graph,
    file: &'a GgufFile,
    config: &'a ModelConfig,
    numerics: EngineNumerics,
}

impl Lowering<'_> {
    fn weight(&mut self, name: &str) -> Value {
        let t = self
            .file
            .tensor(name)
            .expect("the config validated every tensor");
        let dtype = DType::of_encoding(t.encoding().expect("the config validated every encoding"));
        let shape: Vec<Dim> = t.ir_shape.iter().map(|&d| Dim::Fixed(d)).collect();
        self.g.weight(name, TensorType::new(dtype, shape))
    }

    fn rms_norm(&mut self, x: Value, gain: &str) -> Result<Value, IrError> {
        let w = self.weight(gain);
        self.g.add1(
            Op::RmsNorm {
                eps: self.config.rms_eps,
            },
            &[x, w],
        )
    }

    /// `x · Wᵀ` with the numerics of W's encoding.
    fn matmul(&mut self, x: Value, w: Value, half: HalfPath) -> Result<Value, IrError> {
        match self.g.ty(w).dtype {
            DType::Packed(Encoding::I2S) => {
                let qs = self.g.add(Op::QuantAct, &[x])?;
                self.g.add1(Op::TMatmul, &[qs[0], qs[1], w])
            }
            DType::F16 | DType::BF16 => self.g.add1(Op::Matmul { half }, &[x, w]),
            _ => self.g.add1(
                Op::Matmul {
                    half: HalfPath::F32,
                },
                &[x, w],
            ),
        }
    }

    /// `x · Wᵀ`, times the matrix's `.scale` tensor when the file has one.
    fn linear(&mut self, x: Value, matrix: &str) -> Result<Value, IrError> {
        let w = self.weight(&format!("{matrix}.weight"));
        let half = if self.g.ty(w).dtype == DType::BF16 {
            self.numerics.block_bf16
        } else {
            self.numerics.block
        };
        let y = self.matmul(x, w, half)?;
        let scale = format!("{matrix}.scale");
        if self.file.tensor(&scale).is_some() {
            let s = self.weight(&scale);
            return self.g.add1(Op::Mul, &[y, s]);
        }
        Ok(y)
    }

    fn reshape(&mut self, x: Value, shape: Vec<Dim>) -> Result<Value, IrError> {
        self.g.add1(Op::Reshape { shape }, &[x])
    }

    fn block(
        &mut self,
        layer: u64,
        x: Value,
        positions: Value,
        opts: &LowerOptions,
    ) -> Result<Value, IrError> {
        let c = self.config;
        let b = |s: &str| format!("blk.{layer}.{s}");
        let (heads, kv_heads, d) = (
            Dim::Fixed(c.heads),
            Dim::Fixed(c.kv_heads),
            Dim::Fixed(c.head_dim),
        );
        let h = self.rms_norm(x, &b("attn_norm.weight"))?;
        let q = self.linear(h, &b("attn_q"))?;
        let k = self.linear(h, &b("attn_k"))?;
        let v = self.linear(h, &b("attn_v"))?;
        let q = self.reshape(q, vec![Dim::T, heads, d])?;
        let k = self.reshape(k, vec![Dim::T, kv_heads, d])?;
        let v = self.reshape(v, vec![Dim::T, kv_heads, d])?;
        let rope = Op::Rope {
            theta: c.rope_theta,
            style: c.rope_style,
            dims: c.rope_dims as u32,
        };
        let q = self.g.add1(rope.clone(), &[q, positions])?;
        let k = self.g.add1(rope, &[k, positions])?;
        let kv = self.g.add(
            Op::KvAppend {
                layer: layer as u32,
                cache: opts.kv_cache,
            },
            &[k, v],
        )?;
        let scale = 1.0f32 / (c.head_dim as f32).sqrt();
        let (kq, kqv) = (self.numerics.kq, self.numerics.kqv);
        let a = self
            .g
            .add1(Op::Attention { scale, kq, kqv }, &[q, kv[0], kv[1]])?;
        let mut a = self.reshape(a, vec![Dim::T, Dim::Fixed(c.heads * c.head_dim)])?;
        if c.sub_norms {
            a = self.rms_norm(a, &b("attn_sub_norm.weight"))?;
        }
        let o = self.linear(a, &b("attn_output"))?;
        let x = self.g.add1(Op::Add, &[x, o])?;
        let h = self.rms_norm(x, &b("ffn_norm.weight"))?;
        let gate = self.linear(h, &b("ffn_gate"))?;
        let up = self.linear(h, &b("ffn_up"))?;
        let gate = self.g.add1(
            Op::Act {
                act: c.ffn_activation,
            },
            &[gate],
        )?;
        let mut m = self.g.add1(Op::Mul, &[gate, up])?;
        if c.sub_norms {
            m = self.rms_norm(m, &b("ffn_sub_norm.weight"))?;
        }
        let down = self.linear(m, &b("ffn_down"))?;
        self.g.add1(Op::Add, &[x, down])
    }
}

/// Lowers a model to its forward graph: inputs `tokens` and `positions`, output `logits`
/// (`f32[T, vocab]`).
pub fn lower(
    file: &GgufFile,
    config: &ModelConfig,
    opts: &LowerOptions,
) -> Result<Graph, GgufError> {
    let mut l = Lowering {
        g: Graph::new(),
        file,
        config,
        numerics: EngineNumerics::of(config),
    };
    let ir_err = |e: IrError| {
        file.model_error(crate::error::ModelError::BadValue {
            key: "general.architecture".into(),
            value: config.architecture.to_string(),
            reason: format!("lowering produced an invalid graph: {e}"),
        })
    };
    let build = |l: &mut Lowering| -> Result<(), IrError> {
        let tokens =
            l.g.input("tokens", TensorType::new(DType::I32, vec![Dim::T]));
        let positions =
            l.g.input("positions", TensorType::new(DType::I32, vec![Dim::T]));
        let embd = l.weight("token_embd.weight");
        let mut x = l.g.add1(Op::Embed, &[tokens, embd])?;
        for layer in 0..config.layers {
            x = l.block(layer, x, positions, opts)?;
        }
        let x = l.rms_norm(x, "output_norm.weight")?;
        // An untied head is used when present (as transformers does; bitnet.cpp ignores it).
        let head = if config.tied_output {
            embd
        } else {
            l.weight("output.weight")
        };
        let logits = l.matmul(x, head, l.numerics.head)?;
        l.g.output("logits", logits)
    };
    build(&mut l).map_err(ir_err)?;
    bitnetc_ir::verify::verify(&l.g).map_err(ir_err)?;
    Ok(l.g)
}
