//! Fusion into `linear` ops and weight repacking. Every fusion keeps each float operation and
//! its order (additions and products of two operands are commutative in IEEE arithmetic), so
//! a fused graph computes bit-identical results.

use crate::Pass;
use bitnetc_ir::graph::{Graph, IrError, NodeId, Value};
use bitnetc_ir::op::Op;
use bitnetc_ir::types::{DType, Dim};
use std::collections::BTreeMap;
use std::sync::Arc;

fn result(id: NodeId) -> Value {
    Value { node: id, index: 0 }
}

/// Fields of a `linear` node, with its operands named.
#[derive(Clone, Debug)]
struct LinearNode {
    x: Value,
    w: Value,
    gain: Option<Value>,
    residual: Option<Value>,
    op: Op,
}

fn as_linear(g: &Graph, id: NodeId) -> Option<LinearNode> {
    let node = g.node(id);
    let Op::Linear { norm, residual, .. } = &node.op else {
        return None;
    };
    let mut next = 2;
    let gain = norm.map(|_| {
        next += 1;
        node.operands[next - 1]
    });
    let residual = residual.then(|| node.operands[next]);
    Some(LinearNode {
        x: node.operands[0],
        w: node.operands[1],
        gain,
        residual,
        op: node.op.clone(),
    })
}

/// Adds a linear node placed where `like` was, and sends `like`'s users to it.
fn replace_with_linear(g: &mut Graph, like: NodeId, l: &LinearNode) -> Result<Value, IrError> {
    let mut operands = vec![l.x, l.w];
    operands.extend(l.gain);
    operands.extend(l.residual);
    let new = g.add1(l.op.clone(), &operands)?;
    g.place_like(new.node, like);
    g.replace_all_uses(result(like), new);
    Ok(new)
}

/// `rms_norm` feeding only `linear` ops becomes the prologue of each of them.
pub struct FuseNorm;

impl Pass for FuseNorm {
    fn name(&self) -> &'static str {
        "fuse-norm"
    }

    fn description(&self) -> &'static str {
        "rms_norm (and the activation quantization after it) into the linear ops it feeds"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in g.order()? {
            if !g.contains(id) {
                continue;
            }
            let Op::RmsNorm { eps } = g.node(id).op else {
                continue;
            };
            let (x, gain) = (g.node(id).operands[0], g.node(id).operands[1]);
            let uses = g.uses(result(id));
            let fusable = |u: &(NodeId, usize)| {
                u.1 == 0
                    && as_linear(g, u.0)
                        .is_some_and(|l| l.gain.is_none() && l.residual != Some(result(id)))
            };
            if uses.is_empty() || !uses.iter().all(fusable) {
                continue;
            }
            for (user, _) in uses {
                let mut l = as_linear(g, user).expect("checked");
                l.x = x;
                l.gain = Some(gain);
                if let Op::Linear { norm, .. } = &mut l.op {
                    *norm = Some(eps);
                }
                replace_with_linear(g, user, &l)?;
                g.remove_node(user)?;
                rewrites += 1;
            }
            g.remove_node(id)?;
        }
        Ok(rewrites)
    }
}

/// Linear ops reading the same input with the same prologue and weights of one encoding
/// become one op over their stacked weights, followed by a `split`.
pub struct FuseHorizontal;

impl Pass for FuseHorizontal {
    fn name(&self) -> &'static str {
        "fuse-horizontal"
    }

    fn description(&self) -> &'static str {
        "linear ops on one input (Q/K/V, gate/up) into one over concatenated weights"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut groups: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        for id in g.order()? {
            let Some(l) = g.contains(id).then(|| as_linear(g, id)).flatten() else {
                continue;
            };
            let Op::Linear {
                glu: None,
                residual: false,
                ..
            } = l.op
            else {
                continue;
            };
            if matches!(g.node(l.w.node).op, Op::WeightConcat) {
                continue;
            }
            let wt = g.ty(l.w);
            let key = format!(
                "{:?} {:?} {:?} {:?} {} {}",
                l.x,
                l.gain,
                l.op,
                wt.dtype,
                wt.shape[1],
                g.node(l.w.node).op.name()
            );
            groups.entry(key).or_default().push(id);
        }
        let mut rewrites = 0;
        for members in groups.into_values().filter(|m| m.len() >= 2) {
            let first = as_linear(g, members[0]).expect("grouped linear");
            let weights: Vec<Value> = members.iter().map(|&m| g.node(m).operands[1]).collect();
            let sizes: Vec<u64> = weights
                .iter()
                .map(|&w| g.ty(w).shape[0].fixed().unwrap_or(0))
                .collect();
            let concat = g.add1(Op::WeightConcat, &weights)?;
            g.place_like(concat.node, members[0]);
            let fused = LinearNode { w: concat, ..first };
            let mut operands = vec![fused.x, fused.w];
            operands.extend(fused.gain);
            let y = g.add1(fused.op.clone(), &operands)?;
            g.place_like(y.node, members[0]);
            let parts = g.add(Op::Split { sizes }, &[y])?;
            g.place_like(parts[0].node, members[0]);
            for (&m, part) in members.iter().zip(parts) {
                g.replace_all_uses(result(m), part);
                g.remove_node(m)?;
            }
            rewrites += 1;
        }
        Ok(rewrites)
    }
}

/// `act(gate) · up` over the two halves of a horizontally fused linear becomes its epilogue.
pub struct FuseGlu;

impl Pass for FuseGlu {
    fn name(&self) -> &'static str {
        "fuse-glu"
    }

    fn description(&self) -> &'static str {
        "the gated activation act(gate)·up into the gate/up linear"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in g.order()? {
            if !g.contains(id) || !matches!(g.node(id).op, Op::Mul) {
                continue;
            }
            let (a, b) = (g.node(id).operands[0], g.node(id).operands[1]);
            // act(gate) on one side, up on the other (the product commutes).
            let Some((act_value, up)) = [(a, b), (b, a)]
                .into_iter()
                .find(|(x, _)| matches!(g.node(x.node).op, Op::Act { .. }))
            else {
                continue;
            };
            let Op::Act { act } = g.node(act_value.node).op else {
                unreachable!()
            };
            let gate = g.node(act_value.node).operands[0];
            let split = gate.node;
            let Op::Split { sizes } = &g.node(split).op else {
                continue;
            };
            let ok = sizes.len() == 2
                && sizes[0] == sizes[1]
                && gate.index == 0
                && up
                    == (Value {
                        node: split,
                        index: 1,
                    })
                && g.uses(gate).len() == 1
                && g.uses(up).len() == 1
                && g.uses(act_value).len() == 1;
            if !ok {
                continue;
            }
            let src = g.node(split).operands[0].node;
            let Some(mut l) = as_linear(g, src) else {
                continue;
            };
            if !matches!(
                l.op,
                Op::Linear {
                    glu: None,
                    residual: false,
                    ..
                }
            ) || g.uses(result(src)).len() != 1
            {
                continue;
            }
            if let Op::Linear { glu, .. } = &mut l.op {
                *glu = Some(act);
            }
            replace_with_linear(g, id, &l)?;
            for n in [id, act_value.node, split, src] {
                g.remove_node(n)?;
            }
            rewrites += 1;
        }
        Ok(rewrites)
    }
}

/// `r + y` where `y` is read only by the add becomes the linear's residual epilogue.
pub struct FuseResidual;

impl Pass for FuseResidual {
    fn name(&self) -> &'static str {
        "fuse-residual"
    }

    fn description(&self) -> &'static str {
        "residual adds into the epilogue of the linear before them"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in g.order()? {
            if !g.contains(id) || !matches!(g.node(id).op, Op::Add) {
                continue;
            }
            let (a, b) = (g.node(id).operands[0], g.node(id).operands[1]);
            if g.ty(a) != g.ty(b) {
                continue;
            }
            let candidate = [(b, a), (a, b)].into_iter().find(|(y, _)| {
                y.index == 0
                    && g.uses(*y).len() == 1
                    && as_linear(g, y.node).is_some_and(|l| {
                        matches!(
                            l.op,
                            Op::Linear {
                                residual: false,
                                ..
                            }
                        )
                    })
            });
            let Some((y, r)) = candidate else { continue };
            let mut l = as_linear(g, y.node).expect("checked");
            l.residual = Some(r);
            if let Op::Linear { residual, .. } = &mut l.op {
                *residual = true;
            }
            replace_with_linear(g, id, &l)?;
            g.remove_node(id)?;
            g.remove_node(y.node)?;
            rewrites += 1;
        }
        Ok(rewrites)
    }
}

/// Chooses the layout a kernel wants for a weight; codegen targets implement it.
pub trait RepackTarget {
    /// The layout for a weight of this type read by `user` (`linear` or `embed`), or `None` to
    /// keep the file's layout.
    fn layout(&self, dtype: DType, shape: &[Dim], user: &Op) -> Option<String>;
}

/// Keeps every weight in the file's layout.
pub struct NoRepack;

impl RepackTarget for NoRepack {
    fn layout(&self, _: DType, _: &[Dim], _: &Op) -> Option<String> {
        None
    }
}

/// Inserts `repack` between weights and the ops that read them, as the target asks.
pub struct Repack {
    pub target: Arc<dyn RepackTarget + Send + Sync>,
}

impl Pass for Repack {
    fn name(&self) -> &'static str {
        "repack"
    }

    fn description(&self) -> &'static str {
        "weights into the layouts the target's kernels read"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in g.order()? {
            if !g.contains(id) {
                continue;
            }
            let node = g.node(id).clone();
            if !matches!(node.op, Op::Linear { .. } | Op::Embed) {
                continue;
            }
            let w = node.operands[1];
            if matches!(g.node(w.node).op, Op::Repack { .. }) {
                continue;
            }
            let ty = g.ty(w).clone();
            let Some(layout) = self.target.layout(ty.dtype, &ty.shape, &node.op) else {
                continue;
            };
            let repacked = g.add1(Op::Repack { layout }, &[w])?;
            g.place_like(repacked.node, id);
            g.set_operand(id, 1, repacked);
            rewrites += 1;
        }
        Ok(rewrites)
    }
}
