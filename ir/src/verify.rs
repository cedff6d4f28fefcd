//! The verifier: every node's operands exist, its result types are what its op's shape rule
//! gives, names are unique and printable, and the graph is acyclic.

use crate::graph::{Graph, IrError};
use crate::op::Op;
use crate::types::{DType, Dim};
use std::collections::HashSet;

fn invalid(op: &Op, message: String) -> IrError {
    let label = op.label().map(|l| format!(" \"{l}\"")).unwrap_or_default();
    IrError::Invalid {
        op: format!("{}{label}", op.name()),
        message,
    }
}

/// Checks a graph; returns the first problem found.
pub fn verify(g: &Graph) -> Result<(), IrError> {
    let order = g.order()?;
    let (mut inputs, mut outputs, mut weights) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut layers = HashSet::new();
    for id in order {
        let node = g.node(id);
        let op = &node.op;
        if let Some(label) = op.label()
            && (label.is_empty()
                || !label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)))
        {
            return Err(invalid(
                op,
                "names use letters, digits, '_', '.' and '-' only".into(),
            ));
        }
        let mut operand_types = Vec::with_capacity(node.operands.len());
        for v in &node.operands {
            let ty = g
                .try_ty(*v)
                .ok_or_else(|| invalid(op, format!("operand {v:?} does not exist")))?;
            operand_types.push(ty);
        }
        match op {
            Op::Input { name } => {
                let expected = "i32[T]".parse().expect("valid type");
                if !matches!(name.as_str(), "tokens" | "positions") || node.results != [expected] {
                    return Err(invalid(
                        op,
                        "inputs are `tokens` and `positions`, both i32[T]".into(),
                    ));
                }
                if !inputs.insert(name.clone()) {
                    return Err(invalid(op, "declared twice".into()));
                }
            }
            Op::Weight { name } => {
                let ok = node.results.len() == 1
                    && node.results[0].dtype.encoding().is_some()
                    && node.results[0]
                        .shape
                        .iter()
                        .all(|d| matches!(d, Dim::Fixed(n) if *n > 0));
                if !ok {
                    return Err(invalid(
                        op,
                        "a weight has one result with an encoding and fixed, positive dims".into(),
                    ));
                }
                if !weights.insert(name.clone()) {
                    return Err(invalid(op, "declared twice".into()));
                }
            }
            _ => {
                let inferred = op.infer(&operand_types).map_err(|m| invalid(op, m))?;
                if inferred != node.results {
                    let show = |t: &[crate::types::TensorType]| {
                        t.iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    return Err(invalid(
                        op,
                        format!(
                            "results are [{}], the op gives [{}]",
                            show(&node.results),
                            show(&inferred)
                        ),
                    ));
                }
            }
        }
        match op {
            Op::Output { name } if !outputs.insert(name.clone()) => {
                return Err(invalid(op, "declared twice".into()));
            }
            Op::KvAppend { layer, cache } => {
                if !layers.insert(*layer) {
                    return Err(invalid(
                        op,
                        format!("layer {layer} of the KV cache is written twice"),
                    ));
                }
                if !matches!(cache, DType::F16 | DType::F32) {
                    return Err(invalid(op, "the cache is f16 or f32".into()));
                }
            }
            _ => {}
        }
    }
    Ok(())
}
