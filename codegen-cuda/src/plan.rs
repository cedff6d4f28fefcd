//! The kernels a plan needs on the GPU: one or two [`KernelSpec`]s per step, or an error that
//! names the step and what has no CUDA kernel yet.

use crate::CudaError;
use crate::render::{Broadcast, KernelSpec, Round};
use bitnetc_ir::encoding::Encoding;
use bitnetc_ir::op::Op;
use bitnetc_ir::plan::{BufferId, Plan};
use bitnetc_ir::types::{DType, Dim};

/// The kernels of every step of `plan`, in step order, then `argmax` over the logits (greedy
/// decoding on the device).
pub fn plan_kernels(plan: &Plan) -> Result<Vec<KernelSpec>, CudaError> {
    plan_kernels_with(plan, None)
}

/// The step that computes the logits (the output projection), if any.
pub fn head_step(plan: &Plan) -> Option<usize> {
    let logits = plan.steps.iter().find_map(|s| match &s.op {
        Op::Output { name } if name == "logits" => s.operands.first().copied(),
        _ => None,
    })?;
    plan.steps
        .iter()
        .position(|s| s.results.first() == Some(&logits))
}

/// As [`plan_kernels`], with the output projection's matrix re-encoded to `head` (Q8_0, Q4_0
/// or Q4_1) when asked: its kernels are then those of that encoding.
pub fn plan_kernels_with(
    plan: &Plan,
    head: Option<Encoding>,
) -> Result<Vec<KernelSpec>, CudaError> {
    let mut out = Vec::new();
    let head_at = head.and(head_step(plan));
    let fusions = qkv_fusions(plan);
    for (i, step) in plan.steps.iter().enumerate() {
        if fusions.iter().any(|f| f.absorbs(i)) {
            continue;
        }
        if let Some(f) = fusions.iter().find(|f| f.split == i) {
            out.push(f.spec.clone());
            continue;
        }
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
            let enc = match head {
                Some(h) if head_at == Some(i) => {
                    if !matches!(h, Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1) {
                        return Err(unsupported(format!(
                            "an output projection re-encoded to {h}"
                        )));
                    }
                    h
                }
                _ => enc,
            };
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
                (Encoding::F32, _, h) => out.push(KernelSpec::EmbedF32 { h }),
                (e @ (Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1), _, h) => {
                    out.push(KernelSpec::EmbedQ { h, encoding: e })
                }
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
            Op::Matmul { half } => match weight(1)? {
                (e @ (Encoding::F16 | Encoding::F32), n, k) => out.push(KernelSpec::FloatRows {
                    k,
                    n,
                    glu: None,
                    residual: false,
                    f32_weights: e == Encoding::F32,
                    round: Round::of(*half),
                }),
                (e, _, _) => return Err(unsupported(format!("{e} weights"))),
            },
            Op::Linear {
                norm,
                glu,
                residual,
                half,
            } => {
                let (enc, n, k) = weight(1)?;
                if enc == Encoding::I2S && !k.is_multiple_of(128) {
                    return Err(unsupported(format!("i2_s rows of {k} elements")));
                }
                match enc {
                    Encoding::I2S => {
                        // The two kernels; both in one for one-token steps; the rows in tiles
                        // of tokens for steps of several.
                        out.push(KernelSpec::NormQuant { k, eps: *norm });
                        out.push(KernelSpec::Ternary {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                        });
                        out.push(KernelSpec::NormTernary {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                            eps: *norm,
                        });
                        out.push(KernelSpec::TernaryTiles {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                        });
                    }
                    Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1 => {
                        out.push(KernelSpec::NormQ8 { k, eps: *norm });
                        out.push(KernelSpec::QuantRows {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                            encoding: enc,
                        });
                    }
                    Encoding::TQ1_0 | Encoding::TQ2_0 => {
                        out.push(KernelSpec::NormQ8K { k, eps: *norm });
                        out.push(KernelSpec::TernaryBlocks {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                        });
                    }
                    Encoding::F16 | Encoding::F32 => {
                        if let Some(eps) = norm {
                            out.push(KernelSpec::RmsNorm { k, eps: *eps });
                        }
                        out.push(KernelSpec::FloatRows {
                            k,
                            n,
                            glu: *glu,
                            residual: *residual,
                            f32_weights: enc == Encoding::F32,
                            round: Round::of(*half),
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
            Op::Attention { scale, kq, kqv } => {
                if dtype(operand(1)?)? != DType::F16 {
                    return Err(unsupported("an f32 KV cache".into()));
                }
                let q = shape(operand(0)?)?;
                let kc = shape(operand(1)?)?;
                if !fixed(&q, 2)?.is_multiple_of(8) {
                    return Err(unsupported(format!(
                        "heads of {} values (the attention kernel reads 8 at a time)",
                        fixed(&q, 2)?
                    )));
                }
                out.push(KernelSpec::AttentionF16 {
                    h: fixed(&q, 1)?,
                    g: fixed(&kc, 1)?,
                    d: fixed(&q, 2)?,
                    scale: *scale,
                    kq: Round::of(*kq),
                    kqv: Round::of(*kqv),
                });
                if let Some(f) = fusions.iter().find(|f| f.attention == Some(i))
                    && let KernelSpec::QkvRopeAppendF16 {
                        h,
                        g,
                        d,
                        dims,
                        theta,
                        style,
                    } = f.spec
                {
                    out.push(KernelSpec::QkvScoresF16 {
                        h,
                        g,
                        d,
                        dims,
                        theta,
                        style,
                        scale: *scale,
                        kq: Round::of(*kq),
                    });
                }
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

/// A split of fused Q/K/V rows whose parts only feed two RoPEs (Q and K, through reshapes) and
/// the f16 cache append of the rotated K and of V: run as one [`KernelSpec::QkvRopeAppendF16`]
/// at the split's step, the RoPE and append steps then launch nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct QkvFusion {
    pub split: usize,
    pub rope_q: usize,
    pub rope_k: usize,
    pub append: usize,
    pub spec: KernelSpec,
    /// The attention step that alone reads the rotated Q, when the f16 cache the append
    /// writes is what it reads: one-token steps then do the whole fusion inside attention's
    /// score kernel ([`KernelSpec::QkvScoresF16`]).
    pub attention: Option<usize>,
}

impl QkvFusion {
    /// Whether step `i` is one of the steps the fused kernel does.
    pub fn absorbs(&self, i: usize) -> bool {
        i == self.rope_q || i == self.rope_k || i == self.append
    }
}

/// Every [`QkvFusion`] of `plan`.
pub fn qkv_fusions(plan: &Plan) -> Vec<QkvFusion> {
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); plan.buffers.len()];
    for (i, step) in plan.steps.iter().enumerate() {
        for &b in &step.operands {
            if let Some(c) = consumers.get_mut(b as usize) {
                c.push(i);
            }
        }
    }
    // The one step that reads `b` (through reshapes), and the buffer it reads.
    let sole = |mut b: BufferId| -> Option<(usize, BufferId)> {
        loop {
            let [c] = consumers.get(b as usize)?.as_slice() else {
                return None;
            };
            let step = &plan.steps[*c];
            match step.op {
                Op::Reshape { .. } => b = *step.results.first()?,
                _ => return Some((*c, b)),
            }
        }
    };
    let dims = |b: BufferId| -> Option<Vec<u64>> {
        plan.buffers
            .get(b as usize)?
            .ty
            .shape
            .iter()
            .skip(1)
            .map(|d| d.fixed())
            .collect()
    };
    let mut out = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let found = (|| {
            let Op::Split { sizes } = &step.op else {
                return None;
            };
            let [r0, r1, r2] = step.results.as_slice() else {
                return None;
            };
            let (rq, q_in) = sole(*r0)?;
            let (rk, k_in) = sole(*r1)?;
            let (append, v_in) = sole(*r2)?;
            let (
                Op::Rope {
                    theta,
                    style,
                    dims: rd,
                },
                Op::Rope {
                    theta: tk,
                    style: sk,
                    dims: dk,
                },
            ) = (&plan.steps[rq].op, &plan.steps[rk].op)
            else {
                return None;
            };
            if (theta, style, rd) != (tk, sk, dk) || plan.steps[rq].operands.first() != Some(&q_in)
            {
                return None;
            }
            let (a, k_at) = sole(*plan.steps[rk].results.first()?)?;
            let Op::KvAppend { cache, .. } = &plan.steps[append].op else {
                return None;
            };
            let ops = &plan.steps[append].operands;
            if a != append
                || *cache != DType::F16
                || plan.steps[rk].operands.first() != Some(&k_in)
                || ops.first() != Some(&k_at)
                || ops.get(1) != Some(&v_in)
            {
                return None;
            }
            let [h, d] = <[u64; 2]>::try_from(dims(q_in)?).ok()?;
            let [g, dk2] = <[u64; 2]>::try_from(dims(k_in)?).ok()?;
            let [g2, dv] = <[u64; 2]>::try_from(dims(v_in)?).ok()?;
            if (dk2, dv, g2) != (d, d, g) || sizes.as_slice() != [h * d, g * d, g * d] {
                return None;
            }
            let q_out = *plan.steps[rq].results.first()?;
            let readers: Vec<usize> = consumers.get(q_out as usize)?.clone();
            let attention = match readers.as_slice() {
                [a] if matches!(plan.steps[*a].op, Op::Attention { .. })
                    && plan.steps[*a].operands.first() == Some(&q_out)
                    && plan.steps[*a].operands.get(1..3) == plan.steps[append].results.get(..2) =>
                {
                    Some(*a)
                }
                _ => None,
            };
            Some(QkvFusion {
                attention,
                split: i,
                rope_q: rq,
                rope_k: rk,
                append,
                spec: KernelSpec::QkvRopeAppendF16 {
                    h,
                    g,
                    d,
                    dims: *rd as u64,
                    theta: *theta,
                    style: *style,
                },
            })
        })();
        out.extend(found);
    }
    out
}
