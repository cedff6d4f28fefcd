//! Plans: a graph scheduled into a list of steps over numbered buffers, as plain serde data.
//! Inputs and weights are buffers bound from outside; activations live in one arena at offsets
//! set by memory planning; the KV cache holds the results of `kv_append`. The runtime executes
//! steps in order and never re-optimizes.

use crate::graph::{Graph, IrError, Value};
use crate::op::Op;
use crate::types::{DType, Dim, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub type BufferId = u32;

/// One named weight tensor that makes up (part of) a weight buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightPart {
    pub name: String,
    pub ty: TensorType,
}

/// Where a buffer's data lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Storage {
    /// Bound per step from the caller's input of this name.
    Input { name: String },
    /// Model weights stacked by rows (one part unless concatenated), in `layout` when a kernel
    /// asked for one.
    Weight {
        parts: Vec<WeightPart>,
        layout: Option<String>,
    },
    /// Activations in the step arena. Every arena buffer has `T` rows, so its place is a byte
    /// offset per token: for `T` tokens it occupies `[T·offset, T·(offset + row bytes))`.
    Arena { offset: Option<u64> },
    /// The KV cache (results of `kv_append`).
    Cache,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub ty: TensorType,
    pub storage: Storage,
}

impl Buffer {
    /// Bytes per token of an arena buffer (`T` rows of fixed size), or `None` for other shapes.
    pub fn row_bytes(&self) -> Option<u64> {
        let (first, rest) = self.ty.shape.split_first()?;
        if *first != Dim::T {
            return None;
        }
        let elem = match self.ty.dtype {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
            DType::Packed(_) => return None,
        };
        rest.iter()
            .map(|d| d.fixed())
            .product::<Option<u64>>()
            .map(|n| n * elem)
    }
}

/// One op applied to buffers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: Op,
    pub operands: Vec<BufferId>,
    pub results: Vec<BufferId>,
}

/// A scheduled graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    /// Arena bytes per token, once memory is planned.
    pub arena_bytes_per_token: Option<u64>,
}

fn invalid(message: String) -> IrError {
    IrError::Invalid {
        op: "plan".into(),
        message,
    }
}

impl Plan {
    /// Schedules a graph in its order, one buffer per value. Inputs and weights become
    /// buffers (weight ops fold into the weight buffers they describe), the rest steps.
    pub fn from_graph(g: &Graph) -> Result<Plan, IrError> {
        let mut ids: HashMap<Value, BufferId> = HashMap::new();
        let mut weights: HashMap<Value, (Vec<WeightPart>, Option<String>)> = HashMap::new();
        let mut plan = Plan {
            buffers: Vec::new(),
            steps: Vec::new(),
            arena_bytes_per_token: None,
        };
        for id in g.order()? {
            let node = g.node(id);
            let v = Value { node: id, index: 0 };
            let described = match &node.op {
                Op::Weight { name } => Some((
                    vec![WeightPart {
                        name: name.clone(),
                        ty: node.results[0].clone(),
                    }],
                    None,
                )),
                Op::WeightConcat => {
                    let mut parts = Vec::new();
                    for o in &node.operands {
                        let (p, layout) = &weights[o];
                        if layout.is_some() {
                            return Err(invalid(
                                "weight_concat of repacked weights: repack after concatenating"
                                    .into(),
                            ));
                        }
                        parts.extend(p.iter().cloned());
                    }
                    Some((parts, None))
                }
                Op::Repack { layout } => {
                    Some((weights[&node.operands[0]].0.clone(), Some(layout.clone())))
                }
                _ => None,
            };
            if let Some((parts, layout)) = described {
                // A buffer for the weights a computing op reads, declared where they are.
                let read_by_steps = g
                    .uses(v)
                    .iter()
                    .any(|(u, _)| !matches!(g.node(*u).op, Op::WeightConcat | Op::Repack { .. }));
                if read_by_steps {
                    ids.insert(v, plan.buffers.len() as BufferId);
                    plan.buffers.push(Buffer {
                        ty: node.results[0].clone(),
                        storage: Storage::Weight {
                            parts: parts.clone(),
                            layout: layout.clone(),
                        },
                    });
                }
                weights.insert(v, (parts, layout));
                continue;
            }
            let mut operands = Vec::with_capacity(node.operands.len());
            for o in &node.operands {
                operands.push(
                    *ids.get(o)
                        .ok_or_else(|| invalid(format!("operand {o:?} has no buffer")))?,
                );
            }
            let storage = match &node.op {
                Op::Input { name } => Storage::Input { name: name.clone() },
                Op::KvAppend { .. } => Storage::Cache,
                _ => Storage::Arena { offset: None },
            };
            let results: Vec<BufferId> = node
                .results
                .iter()
                .enumerate()
                .map(|(i, ty)| {
                    let b = plan.buffers.len() as BufferId;
                    plan.buffers.push(Buffer {
                        ty: ty.clone(),
                        storage: storage.clone(),
                    });
                    ids.insert(
                        Value {
                            node: id,
                            index: i as u32,
                        },
                        b,
                    );
                    b
                })
                .collect();
            if matches!(node.op, Op::Input { .. }) {
                continue;
            }
            plan.steps.push(Step {
                op: node.op.clone(),
                operands,
                results,
            });
        }
        Ok(plan)
    }

    /// The graph the plan computes: inputs and weights become nodes again, declared where
    /// their buffer numbers place them.
    pub fn to_graph(&self) -> Result<Graph, IrError> {
        let mut g = Graph::new();
        let mut values: HashMap<BufferId, Value> = HashMap::new();
        let buffer = |b: BufferId| {
            self.buffers
                .get(b as usize)
                .ok_or_else(|| invalid(format!("buffer {b} does not exist")))
        };
        let mut next_bound = 0usize;
        let mut bind = |g: &mut Graph,
                        values: &mut HashMap<BufferId, Value>,
                        upto: usize|
         -> Result<(), IrError> {
            while next_bound < upto.min(self.buffers.len()) {
                let b = &self.buffers[next_bound];
                match &b.storage {
                    Storage::Input { name } => {
                        values.insert(next_bound as BufferId, g.input(name, b.ty.clone()));
                    }
                    Storage::Weight { parts, layout } => {
                        let mut v: Vec<Value> = parts
                            .iter()
                            .map(|p| g.weight(&p.name, p.ty.clone()))
                            .collect();
                        if v.len() > 1 {
                            v = vec![g.add1(Op::WeightConcat, &v)?];
                        }
                        if let Some(layout) = layout {
                            v = vec![g.add1(
                                Op::Repack {
                                    layout: layout.clone(),
                                },
                                &v,
                            )?];
                        }
                        values.insert(next_bound as BufferId, v[0]);
                    }
                    _ => {}
                }
                next_bound += 1;
            }
            Ok(())
        };
        for step in &self.steps {
            let first_result = step
                .results
                .first()
                .map_or(self.buffers.len(), |&r| r as usize);
            bind(&mut g, &mut values, first_result)?;
            let mut operands = Vec::with_capacity(step.operands.len());
            for &b in &step.operands {
                let v = values
                    .get(&b)
                    .copied()
                    .ok_or_else(|| invalid(format!("buffer {b} is read before it is written")))?;
                operands.push(v);
            }
            let results = step
                .results
                .iter()
                .map(|&b| buffer(b).map(|x| x.ty.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            let vals = g.add_node(step.op.clone(), &operands, results)?;
            for (&b, v) in step.results.iter().zip(vals) {
                values.insert(b, v);
            }
        }
        Ok(g)
    }
}
