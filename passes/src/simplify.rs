//! Canonicalization, common-subexpression elimination and dead-code elimination.

use crate::Pass;
use bitnetc_ir::graph::{Graph, IrError, NodeId, Value};
use bitnetc_ir::op::Op;
use bitnetc_ir::types::HalfPath;
use std::collections::HashMap;

fn result(id: NodeId) -> Value {
    Value { node: id, index: 0 }
}

/// Canonical forms: every matmul becomes a `linear` (I2_S's `quant_act` + `tmatmul` pair, and
/// `matmul`), chains of reshapes collapse, reshapes to the same shape disappear.
pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn description(&self) -> &'static str {
        "matmuls as linear ops; reshape chains folded"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut rewrites = 0;
        for id in g.order()? {
            if !g.contains(id) {
                continue;
            }
            let node = g.node(id).clone();
            let linear = |half| Op::Linear {
                norm: None,
                glu: None,
                residual: false,
                half,
            };
            match &node.op {
                Op::TMatmul => {
                    let (q, s, w) = (node.operands[0], node.operands[1], node.operands[2]);
                    let quant = g.node(q.node);
                    if !(matches!(quant.op, Op::QuantAct)
                        && s.node == q.node
                        && q.index == 0
                        && s.index == 1)
                    {
                        continue;
                    }
                    let x = quant.operands[0];
                    let new = g.add1(linear(HalfPath::F32), &[x, w])?;
                    g.place_like(new.node, id);
                    g.replace_all_uses(result(id), new);
                    rewrites += 1;
                }
                Op::Matmul { half } => {
                    let new = g.add1(linear(*half), &node.operands)?;
                    g.place_like(new.node, id);
                    g.replace_all_uses(result(id), new);
                    rewrites += 1;
                }
                Op::Reshape { shape } => {
                    // Reshape the data at the head of a reshape chain, or nothing at all.
                    let mut src = node.operands[0];
                    while matches!(g.node(src.node).op, Op::Reshape { .. }) {
                        src = g.node(src.node).operands[0];
                    }
                    if g.ty(src).shape == *shape {
                        g.replace_all_uses(result(id), src);
                        rewrites += 1;
                    } else if src != node.operands[0] {
                        g.set_operand(id, 0, src);
                        rewrites += 1;
                    }
                }
                _ => {}
            }
        }
        rewrites += Dce.run(g)?;
        Ok(rewrites)
    }
}

/// Ops that must run even when nothing reads their results.
fn has_effects(op: &Op) -> bool {
    matches!(
        op,
        Op::Output { .. } | Op::KvAppend { .. } | Op::Input { .. }
    )
}

/// Merges identical ops on identical operands.
pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn description(&self) -> &'static str {
        "one node for each computation done twice"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut seen: HashMap<String, NodeId> = HashMap::new();
        let mut rewrites = 0;
        for id in g.order()? {
            if !g.contains(id) {
                continue;
            }
            let node = g.node(id);
            if has_effects(&node.op) || matches!(node.op, Op::Weight { .. }) {
                continue;
            }
            // Attributes print in full (floats in round-trip form), so equal keys mean equal ops.
            let key = format!("{:?} {:?} {:?}", node.op, node.operands, node.results);
            match seen.get(&key) {
                Some(&first) => {
                    for i in 0..node.results.len() as u32 {
                        g.replace_all_uses(
                            Value { node: id, index: i },
                            Value {
                                node: first,
                                index: i,
                            },
                        );
                    }
                    rewrites += 1;
                }
                None => {
                    seen.insert(key, id);
                }
            }
        }
        rewrites += Dce.run(g)?;
        Ok(rewrites)
    }
}

/// Removes nodes whose results nothing reads.
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn description(&self) -> &'static str {
        "nodes nothing reads removed"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let mut removed = 0;
        let mut order = g.order()?;
        order.reverse();
        for id in order {
            if g.contains(id) && !has_effects(&g.node(id).op) && g.users(id).next().is_none() {
                g.remove_node(id)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
