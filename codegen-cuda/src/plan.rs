//! The kernels a plan needs on the GPU: one or two [`KernelSpec`]s per step, or an error that
//! names the step and what has no CUDA kernel yet.

use crate::CudaError;
use crate::render::{Broadcast, KernelSpec};
use bitnetc_ir::encoding::Encoding;
use bitnetc_ir::op::Op;
use bitnetc_ir::plan::{BufferId, Plan};
use bitnetc_ir::types::{DType, Dim};

/// The kernels of every step of `plan`, in step order, then `argmax` over the logits (greedy
/// decoding on the device).
pub fn plan_kernels(plan: &Plan) -> Result<Vec<KernelSpec>, CudaError> {
    let mut out = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let unsupported = |what: String| CudaError::Unsupported {
            step: i,
            op: step.op.name(),
            what,
        };
        let shape = |b: BufferId| -> Result<Vec<Dim>, CudaError> {
            plan.buffers
                .get(b as usize)
                .map(|b| b.ty.shape.clone())
                .ok_or_else(|| unsupported(format!("buffer {b} does not exist")))
        };
        let dtype = |b: BufferId| -> Result<DType, CudaError> {
            plan.buffers
                .get(b as usize)
                .map(|b| b.ty.dtype)
                .ok_or_else(|| unsupported(format!("buffer {b} does not exist")))
        };
        let fixed = |d: &[Dim], i: usize| -> Result<u64, CudaError> {
            d.get(i)
                .and_then(|d| d.fixed())
                .ok_or_else(|| unsupported(format!("dimension {i} of {d:?} is not fixed")))
        };
        let last = |d: &[Dim]| fixed(d, d.len().saturating_sub(1));
        let operand = |j: usize| -> Result<BufferId, CudaError> {
            step.operands
                .get(j)
                .copied()
                .ok_or_else(|| unsupported(format!("operand {j} is missing")))
        };
        let weight = |j: usize| -> Result<(Encoding, u64, u64), CudaError> {
            let b = operand(j)?;
            let s = shape(b)?;
            let enc = dtype(b)?
                .encoding()
                .ok_or_else(|| unsupported("the weight has no encoding".into()))?;
            Ok((enc, fixed(&s, 0)?, fixed(&s, 1)?))
        };
        match &step.op {
            Op::Input { .. }
            | Op::Weight { .. }
            | Op::Output { .. }
            | Op::Reshape { .. }
            | Op::WeightConcat
            | Op::Repack { .. } => {}
            Op::Embed => match weight(1)? {
                (Encoding::F16, _, h) => out.push(KernelSpec::EmbedF16 { h }),
                (e, _, _) => return Err(unsupported(format!("{e} embedding tables"))),
            },
            Op::RmsNorm { eps } => out.push(KernelSpec::RmsNorm {
                k: last(&shape(operand(0)?)?)?,
                eps: *eps,
            }),
            Op::QuantAct => out.push(KernelSpec::NormQuant {
                k: last(&shape(operand(0)?)?)?,
                eps: None,
            }),
            Op::TMatmul => {
                let (_, n, k) = weight(2)?;
                out.push(KernelSpec::Ternary {
                    k,
                    n,
                    glu: None,
                    residual: false,
                });
            }
            Op::Matmul { .. } => match weight(1)? {
                (Encoding::F16, n, k) => out.push(KernelSpec::HalfRows {
                    k,
                    n,
                    glu: None,
                    residual: false,
                }),
                (e, _, _) => return Err(unsupported(format!("{e} weights"))),
            },
            Op::Linear {
                norm,
                glu,
                residual,
                ..
            } => {
                let (enc, n, k) = weight(1)?;
                if enc == Encoding::I2S && !k.is_multiple_of(128) {
                    return Err(unsupported(format!("i2_s rows of {k} elements")));
                }
                match enc {
                    Encoding::I2S => {
                        out.push(KernelSpec::NormQuant { k, eps: *norm });
                        out.push(KernelSpec::Ternary {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                        });
                    }
                    Encoding::F16 => {
                        if let Some(eps) = norm {
                            out.push(KernelSpec::RmsNorm { k, eps: *eps });
                        }
                        out.push(KernelSpec::HalfRows {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                        });
                    }
                    e => return Err(unsupported(format!("{e} weights"))),
                }
            }
            Op::Mul | Op::Add => {
                let a = shape(operand(0)?)?;
                let n = last(&a)?;
                let b = shape(operand(1)?)?;
                let b = if b == a {
                    Broadcast::Same
                } else if b == [Dim::Fixed(1)] {
                    Broadcast::Scalar
                } else if b == [Dim::Fixed(n)] {
                    Broadcast::Row
                } else {
                    return Err(unsupported(format!("operands of shapes {a:?} and {b:?}")));
                };
                out.push(KernelSpec::Binary {
                    add: matches!(step.op, Op::Add),
                    n,
                    b,
                });
            }
            Op::Act { act } => out.push(KernelSpec::Act {
                act: *act,
                n: last(&shape(operand(0)?)?)?,
            }),
            Op::Rope { theta, style, dims } => {
                let s = shape(operand(0)?)?;
                out.push(KernelSpec::Rope {
                    heads: fixed(&s, 1)?,
                    d: fixed(&s, 2)?,
                    dims: *dims as u64,
                    theta: *theta,
                    style: *style,
                });
            }
            Op::KvAppend { cache, .. } => {
                if *cache != DType::F16 {
                    return Err(unsupported(format!("a {cache} KV cache")));
                }
                let s = shape(operand(0)?)?;
                out.push(KernelSpec::KvAppendF16 {
                    g: fixed(&s, 1)?,
                    d: fixed(&s, 2)?,
                });
            }
            Op::Attention { scale, .. } => {
                if dtype(operand(1)?)? != DType::F16 {
                    return Err(unsupported("an f32 KV cache".into()));
                }
                let q = shape(operand(0)?)?;
                let kc = shape(operand(1)?)?;
                out.push(KernelSpec::AttentionF16 {
                    h: fixed(&q, 1)?,
                    g: fixed(&kc, 1)?,
                    d: fixed(&q, 2)?,
                    scale: *scale,
                });
            }
            Op::Split { sizes } => {
                let row: u64 = sizes.iter().sum();
                let mut col0 = 0;
                for &cols in sizes {
                    out.push(KernelSpec::Columns { row, col0, cols });
                    col0 += cols;
                }
            }
        }
    }
    let logits = plan.steps.iter().find_map(|s| match &s.op {
        Op::Output { name } if name == "logits" => s.operands.first().copied(),
        _ => None,
    });
    if let Some(b) = logits
        && let Some(v) = plan
            .buffers
            .get(b as usize)
            .and_then(|b| b.ty.shape.last())
            .and_then(|d| d.fixed())
    {
        out.push(KernelSpec::Argmax { vocab: v });
    }
    Ok(out)
}
