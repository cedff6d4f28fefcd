//! Plans: a graph scheduled into a list of steps over numbered buffers, as plain serde data.
//! The passes fill in the schedule and the memory layout; codegen binds kernels to steps; the
//! runtime executes steps in order and never re-optimizes.

use crate::graph::{Graph, IrError, Value};
use crate::op::Op;
use crate::types::TensorType;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub type BufferId = u32;

/// Where a buffer's data lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Storage {
    /// Bound per step from the caller's inputs.
    Input,
    /// A model weight, by name.
    Weight { name: String },
    /// Scratch memory in the step arena; `offset` is set by memory planning.
    Arena { offset: Option<u64> },
    /// The KV cache (results of `kv_append`).
    Cache,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub ty: TensorType,
    pub storage: Storage,
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
}

impl Plan {
    /// Schedules a graph in its deterministic topological order, one buffer per value; inputs
    /// and weights become buffers rather than steps.
    pub fn from_graph(g: &Graph) -> Result<Plan, IrError> {
        let mut ids: HashMap<Value, BufferId> = HashMap::new();
        let mut plan = Plan {
            buffers: Vec::new(),
            steps: Vec::new(),
        };
        for id in g.order()? {
            let node = g.node(id);
            let storage = match &node.op {
                Op::Input { .. } => Storage::Input,
                Op::Weight { name } => Storage::Weight { name: name.clone() },
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
            if matches!(node.op, Op::Weight { .. }) {
                continue;
            }
            let operands = node.operands.iter().map(|v| ids[v]).collect();
            plan.steps.push(Step {
                op: node.op.clone(),
                operands,
                results,
            });
        }
        Ok(plan)
    }

    /// The graph the plan computes. Weights become `weight` nodes again, declared where their
    /// buffer numbers place them, so a plan made by [`Plan::from_graph`] prints as its graph.
    pub fn to_graph(&self) -> Result<Graph, IrError> {
        let mut g = Graph::new();
        let mut values: HashMap<BufferId, Value> = HashMap::new();
        let bad = |message: String| IrError::Invalid {
            op: "plan".into(),
            message,
        };
        let buffer = |b: BufferId| {
            self.buffers
                .get(b as usize)
                .ok_or_else(|| bad(format!("buffer {b} does not exist")))
        };
        let mut weights = self
            .buffers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match &b.storage {
                Storage::Weight { name } => Some((i as BufferId, name, &b.ty)),
                _ => None,
            })
            .peekable();
        for step in &self.steps {
            let first_result = step.results.first().copied().unwrap_or(BufferId::MAX);
            while let Some((b, name, ty)) = weights.next_if(|w| w.0 < first_result) {
                values.insert(b, g.weight(name, ty.clone()));
            }
            let mut operands = Vec::with_capacity(step.operands.len());
            for &b in &step.operands {
                let v = values
                    .get(&b)
                    .copied()
                    .ok_or_else(|| bad(format!("buffer {b} is read before it is written")))?;
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
