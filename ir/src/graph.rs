//! The dataflow graph: SSA values produced by op nodes, stored in a petgraph `StableGraph` so
//! that rewrites never invalidate unrelated node ids.

use crate::op::Op;
use crate::types::TensorType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

pub type NodeId = NodeIndex<u32>;

/// A value: result `index` of node `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub index: u32,
}

/// One operation with its operands and result types.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub operands: Vec<Value>,
    pub results: Vec<TensorType>,
    /// Insertion order, which makes the topological order deterministic.
    seq: u64,
}

/// What went wrong building, verifying or parsing a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IrError {
    #[error("{op}: {message}")]
    Invalid { op: String, message: String },
    #[error("the graph has a cycle through a {op} node")]
    Cycle { op: String },
    #[error("line {line}: {message}")]
    Parse { line: usize, message: String },
}

/// A dataflow graph of ops.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    g: StableDiGraph<Node, u32>,
    next_seq: u64,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a node with given result types (no shape inference; [`crate::verify`] checks it).
    pub fn add_node(
        &mut self,
        op: Op,
        operands: &[Value],
        results: Vec<TensorType>,
    ) -> Result<Vec<Value>, IrError> {
        for v in operands {
            if self.try_ty(*v).is_none() {
                return Err(IrError::Invalid {
                    op: op.name().into(),
                    message: format!("operand {v:?} does not exist"),
                });
            }
        }
        let n_results = results.len() as u32;
        let node = self.g.add_node(Node {
            op,
            operands: operands.to_vec(),
            results,
            seq: self.next_seq,
        });
        self.next_seq += 1;
        for (slot, v) in operands.iter().enumerate() {
            self.g.add_edge(v.node, node, slot as u32);
        }
        Ok((0..n_results).map(|index| Value { node, index }).collect())
    }

    /// Adds an op, inferring its result types from its operands.
    pub fn add(&mut self, op: Op, operands: &[Value]) -> Result<Vec<Value>, IrError> {
        let tys: Vec<&TensorType> = operands
            .iter()
            .map(|v| {
                self.try_ty(*v).ok_or_else(|| IrError::Invalid {
                    op: op.name().into(),
                    message: format!("operand {v:?} does not exist"),
                })
            })
            .collect::<Result<_, _>>()?;
        let results = op.infer(&tys).map_err(|message| IrError::Invalid {
            op: op.name().into(),
            message,
        })?;
        self.add_node(op, operands, results)
    }

    /// Adds an op with exactly one result.
    pub fn add1(&mut self, op: Op, operands: &[Value]) -> Result<Value, IrError> {
        let name = op.name();
        let vals = self.add(op, operands)?;
        match vals.as_slice() {
            [v] => Ok(*v),
            _ => Err(IrError::Invalid {
                op: name.into(),
                message: format!("has {} results, expected 1", vals.len()),
            }),
        }
    }

    /// Adds a graph input.
    pub fn input(&mut self, name: &str, ty: TensorType) -> Value {
        self.add_node(Op::Input { name: name.into() }, &[], vec![ty])
            .expect("inputs have no operands")[0]
    }

    /// Adds a weight reference.
    pub fn weight(&mut self, name: &str, ty: TensorType) -> Value {
        self.add_node(Op::Weight { name: name.into() }, &[], vec![ty])
            .expect("weights have no operands")[0]
    }

    /// Marks `v` as output `name`.
    pub fn output(&mut self, name: &str, v: Value) -> Result<(), IrError> {
        self.add(Op::Output { name: name.into() }, &[v]).map(|_| ())
    }

    /// Whether a node exists (a rewrite may have removed it).
    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn try_ty(&self, v: Value) -> Option<&TensorType> {
        self.g.node_weight(v.node)?.results.get(v.index as usize)
    }

    /// The type of a value.
    pub fn ty(&self, v: Value) -> &TensorType {
        &self.g[v.node].results[v.index as usize]
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// The nodes using any result of `id`, with the operand slot.
    pub fn users(&self, id: NodeId) -> impl Iterator<Item = (NodeId, u32)> + '_ {
        self.g.edges(id).map(|e| (e.target(), *e.weight()))
    }

    /// Every use of a value: the using node and the operand slot.
    pub fn uses(&self, v: Value) -> Vec<(NodeId, usize)> {
        let mut out: Vec<(NodeId, usize)> = self
            .users(v.node)
            .filter(|&(user, slot)| self.g[user].operands[slot as usize] == v)
            .map(|(user, slot)| (user, slot as usize))
            .collect();
        out.sort_by_key(|&(n, s)| (self.g[n].seq, s));
        out.dedup();
        out
    }

    /// Makes every user of `old` use `new` instead.
    pub fn replace_all_uses(&mut self, old: Value, new: Value) {
        for (user, slot) in self.uses(old) {
            self.set_operand(user, slot, new);
        }
    }

    /// Changes one operand of a node.
    pub fn set_operand(&mut self, node: NodeId, slot: usize, v: Value) {
        let old = self.g[node].operands[slot];
        if let Some(e) = self
            .g
            .edges_connecting(old.node, node)
            .find(|e| *e.weight() == slot as u32)
            .map(|e| e.id())
        {
            self.g.remove_edge(e);
        }
        self.g[node].operands[slot] = v;
        self.g.add_edge(v.node, node, slot as u32);
    }

    /// Places `node` where `like` is in the order (ties go to the older node), so a rewrite
    /// keeps the order of the graph it rewrites.
    pub fn place_like(&mut self, node: NodeId, like: NodeId) {
        self.g[node].seq = self.g[like].seq;
    }

    /// Replaces a node's op, keeping its operands and result types.
    pub fn set_op(&mut self, node: NodeId, op: Op) {
        self.g[node].op = op;
    }

    /// Removes a node; its results must be unused.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Node, IrError> {
        if self.users(id).next().is_some() {
            return Err(IrError::Invalid {
                op: self.g[id].op.name().into(),
                message: "cannot remove a node whose results are used".into(),
            });
        }
        self.g.remove_node(id).ok_or_else(|| IrError::Invalid {
            op: "graph".into(),
            message: "no such node".into(),
        })
    }

    /// Makes `order` (a topological order of every node) the graph's order, so it is the order
    /// printed and scheduled.
    pub fn set_order(&mut self, order: &[NodeId]) -> Result<(), IrError> {
        if order.len() != self.g.node_count() {
            return Err(IrError::Invalid {
                op: "schedule".into(),
                message: "the order must hold every node once".into(),
            });
        }
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        for e in (&self.g).edge_references() {
            if pos[&e.source()] >= pos[&e.target()] {
                return Err(IrError::Invalid {
                    op: "schedule".into(),
                    message: "the order puts a use before its definition".into(),
                });
            }
        }
        for (i, n) in order.iter().enumerate() {
            self.g[*n].seq = i as u64;
        }
        self.next_seq = order.len() as u64;
        Ok(())
    }

    /// A deterministic topological order: among ready nodes, the one inserted first.
    pub fn order(&self) -> Result<Vec<NodeId>, IrError> {
        let mut indegree: HashMap<NodeId, usize> = self.g.node_indices().map(|n| (n, 0)).collect();
        for e in (&self.g).edge_references() {
            *indegree.get_mut(&e.target()).unwrap() += 1;
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<(u64, NodeId)>> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(n, _)| std::cmp::Reverse((self.g[*n].seq, *n)))
            .collect();
        let mut out = Vec::with_capacity(self.g.node_count());
        while let Some(std::cmp::Reverse((_, n))) = ready.pop() {
            out.push(n);
            for e in self.g.edges(n) {
                let d = indegree.get_mut(&e.target()).unwrap();
                *d -= 1;
                if *d == 0 {
                    ready.push(std::cmp::Reverse((self.g[e.target()].seq, e.target())));
                }
            }
        }
        if out.len() != self.g.node_count() {
            let stuck = indegree
                .iter()
                .find(|(_, d)| **d > 0)
                .map(|(n, _)| self.g[*n].op.name())
                .unwrap_or("?");
            return Err(IrError::Cycle { op: stuck.into() });
        }
        Ok(out)
    }

    /// Graph outputs by name.
    pub fn outputs(&self) -> Vec<(String, Value)> {
        let mut v: Vec<(u64, String, Value)> = self
            .g
            .node_indices()
            .filter_map(|n| match &self.g[n].op {
                Op::Output { name } => Some((self.g[n].seq, name.clone(), self.g[n].operands[0])),
                _ => None,
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|(_, n, v)| (n, v)).collect()
    }

    /// Every weight the graph reads: name and type.
    pub fn weights(&self) -> Vec<(String, TensorType)> {
        let mut v: Vec<(u64, String, TensorType)> = self
            .g
            .node_indices()
            .filter_map(|n| match &self.g[n].op {
                Op::Weight { name } => {
                    Some((self.g[n].seq, name.clone(), self.g[n].results[0].clone()))
                }
                _ => None,
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|(_, n, t)| (n, t)).collect()
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match crate::text::print(self) {
            Ok(s) => f.write_str(&s),
            Err(e) => write!(f, "<invalid graph: {e}>"),
        }
    }
}
