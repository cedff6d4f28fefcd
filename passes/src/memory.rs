//! Scheduling and memory planning: the graph's order is chosen to keep few activations alive,
//! then every activation gets an offset in one arena from its liveness, so that a step of any
//! number of tokens runs in one allocation sized once.

use crate::Pass;
use bitnetc_ir::graph::{Graph, IrError, NodeId};
use bitnetc_ir::op::Op;
use bitnetc_ir::plan::{BufferId, Plan, Storage};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Orders the graph: among the ops ready to run, first those whose inputs die with them
/// (freeing memory soonest), then those reading the most recently computed value (finishing
/// one chain before starting another), then those declared first; data (weights, inputs) just
/// before its first reader.
pub struct Schedule;

impl Pass for Schedule {
    fn name(&self) -> &'static str {
        "schedule"
    }

    fn description(&self) -> &'static str {
        "an execution order that frees activations early"
    }

    fn run(&self, g: &mut Graph) -> Result<usize, IrError> {
        let current = g.order()?;
        let rank: HashMap<NodeId, usize> =
            current.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let is_data = |g: &Graph, n: NodeId| {
            matches!(
                g.node(n).op,
                Op::Weight { .. } | Op::WeightConcat | Op::Repack { .. } | Op::Input { .. }
            )
        };
        let mut pending_uses: HashMap<NodeId, usize> =
            current.iter().map(|&n| (n, g.users(n).count())).collect();
        // Compute ops wait for the compute ops they read; data is placed on demand.
        let mut indegree: HashMap<NodeId, usize> = current
            .iter()
            .map(|&n| {
                let deps: HashSet<NodeId> = g
                    .node(n)
                    .operands
                    .iter()
                    .map(|v| v.node)
                    .filter(|&o| !is_data(g, o))
                    .collect();
                (n, deps.len())
            })
            .collect();
        let mut ready: BTreeSet<(usize, NodeId)> = current
            .iter()
            .filter(|n| indegree[n] == 0 && !is_data(g, **n))
            .map(|&n| (rank[&n], n))
            .collect();
        let mut placed: HashSet<NodeId> = HashSet::new();
        let mut order = Vec::with_capacity(current.len());
        // Places a data node (and the data it is made of) right before its first reader.
        fn place_data(g: &Graph, n: NodeId, placed: &mut HashSet<NodeId>, order: &mut Vec<NodeId>) {
            if placed.contains(&n) {
                return;
            }
            for v in &g.node(n).operands {
                place_data(g, v.node, placed, order);
            }
            placed.insert(n);
            order.push(n);
        }
        let mut computed_at: HashMap<NodeId, usize> = HashMap::new();
        while !ready.is_empty() {
            let frees = |n: NodeId| {
                g.node(n)
                    .operands
                    .iter()
                    .filter(|v| !is_data(g, v.node) && pending_uses[&v.node] == 1)
                    .count()
            };
            let recency = |n: NodeId| {
                g.node(n)
                    .operands
                    .iter()
                    .filter_map(|v| computed_at.get(&v.node).copied())
                    .max()
            };
            let &(r, n) = ready
                .iter()
                .max_by_key(|(r, n)| (frees(*n), recency(*n), std::cmp::Reverse(*r)))
                .expect("non-empty");
            ready.remove(&(r, n));
            for v in &g.node(n).operands {
                if is_data(g, v.node) {
                    place_data(g, v.node, &mut placed, &mut order);
                }
            }
            placed.insert(n);
            order.push(n);
            computed_at.insert(n, order.len());
            for v in g
                .node(n)
                .operands
                .iter()
                .map(|v| v.node)
                .collect::<HashSet<_>>()
            {
                *pending_uses.get_mut(&v).expect("known") -= 1;
            }
            let users: HashSet<NodeId> = g.users(n).map(|(u, _)| u).collect();
            for u in users {
                if is_data(g, u) {
                    continue;
                }
                let d = indegree.get_mut(&u).expect("known");
                *d -= 1;
                if *d == 0 {
                    ready.insert((rank[&u], u));
                }
            }
        }
        // Data nobody reads (none after DCE) goes last, in its old order.
        for n in &current {
            if !placed.contains(n) {
                place_data(g, *n, &mut placed, &mut order);
            }
        }
        let changed = order != current;
        g.set_order(&order)?;
        Ok(changed as usize)
    }
}

/// What memory planning found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    /// Arena bytes per token of a step.
    pub arena_bytes_per_token: u64,
    /// Activation buffers in the arena (reshapes share their input's).
    pub arena_buffers: usize,
    /// Most arena buffers alive at once.
    pub peak_live_buffers: usize,
    /// Arena bytes per token if every activation had its own place.
    pub unshared_bytes_per_token: u64,
    pub steps: usize,
    pub weight_buffers: usize,
}

/// Schedules the graph into a plan and gives every activation an arena offset: buffers live
/// from the step that writes them to the last step that reads them (or a reshape of them), and
/// each takes the lowest offset free for its whole life.
pub fn plan(g: &Graph) -> Result<(Plan, MemoryStats), IrError> {
    let mut plan = Plan::from_graph(g)?;
    let n = plan.buffers.len();
    // Reshapes share their operand's storage.
    let mut root: Vec<BufferId> = (0..n as BufferId).collect();
    for step in &plan.steps {
        if matches!(step.op, Op::Reshape { .. }) {
            root[step.results[0] as usize] = root[step.operands[0] as usize];
        }
    }
    let mut first: HashMap<BufferId, usize> = HashMap::new();
    let mut last: HashMap<BufferId, usize> = HashMap::new();
    for (i, step) in plan.steps.iter().enumerate() {
        for &b in &step.results {
            first.entry(root[b as usize]).or_insert(i);
            last.insert(root[b as usize], i);
        }
        for &b in &step.operands {
            last.insert(root[b as usize], i);
        }
    }
    let arena: Vec<BufferId> = (0..n as BufferId)
        .filter(|&b| {
            root[b as usize] == b
                && matches!(plan.buffers[b as usize].storage, Storage::Arena { .. })
        })
        .collect();
    let mut size: HashMap<BufferId, u64> = HashMap::new();
    for &b in &arena {
        let buf = &plan.buffers[b as usize];
        let bytes = buf.row_bytes().ok_or_else(|| IrError::Invalid {
            op: "memory-plan".into(),
            message: format!("buffer {b} of type {} is not T rows of fixed size", buf.ty),
        })?;
        // 64-byte alignment of each row block keeps SIMD loads aligned.
        size.insert(b, bytes.div_ceil(64) * 64);
    }
    // Allocate in order of first write; a buffer frees its place after its last read.
    let mut order = arena.clone();
    order.sort_by_key(|b| (first.get(b).copied().unwrap_or(usize::MAX), *b));
    let mut live: Vec<(BufferId, u64, u64)> = Vec::new(); // (buffer, offset, size)
    let mut offsets: HashMap<BufferId, u64> = HashMap::new();
    let (mut top, mut peak, mut unshared) = (0u64, 0usize, 0u64);
    for b in order {
        let Some(&start) = first.get(&b) else {
            continue;
        };
        live.retain(|(l, _, _)| last[l] >= start);
        let s = size[&b];
        unshared += s;
        let mut taken: Vec<(u64, u64)> = live.iter().map(|&(_, o, sz)| (o, o + sz)).collect();
        taken.sort();
        let mut offset = 0;
        for (lo, hi) in taken {
            if offset + s <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        offsets.insert(b, offset);
        live.push((b, offset, s));
        top = top.max(offset + s);
        peak = peak.max(live.len());
    }
    for (i, buf) in plan.buffers.iter_mut().enumerate() {
        if let Storage::Arena { offset } = &mut buf.storage {
            *offset = offsets.get(&root[i]).copied();
        }
    }
    plan.arena_bytes_per_token = Some(top);
    let stats = MemoryStats {
        arena_bytes_per_token: top,
        arena_buffers: offsets.len(),
        peak_live_buffers: peak,
        unshared_bytes_per_token: unshared,
        steps: plan.steps.len(),
        weight_buffers: plan
            .buffers
            .iter()
            .filter(|b| matches!(b.storage, Storage::Weight { .. }))
            .count(),
    };
    Ok((plan, stats))
}

/// Checks that no two arena buffers alive at the same step overlap.
pub fn check(plan: &Plan) -> Result<(), String> {
    let mut root: Vec<usize> = (0..plan.buffers.len()).collect();
    for step in &plan.steps {
        if matches!(step.op, Op::Reshape { .. }) {
            root[step.results[0] as usize] = root[step.operands[0] as usize];
        }
    }
    let mut span: HashMap<usize, (usize, usize)> = HashMap::new();
    for (i, step) in plan.steps.iter().enumerate() {
        for &b in step.results.iter().chain(&step.operands) {
            let e = span.entry(root[b as usize]).or_insert((i, i));
            e.1 = i;
        }
    }
    let placed: Vec<(usize, u64, u64, (usize, usize))> = span
        .iter()
        .filter_map(|(&b, &life)| match plan.buffers[b].storage {
            Storage::Arena { offset: Some(o) } => Some((b, o, plan.buffers[b].row_bytes()?, life)),
            _ => None,
        })
        .collect();
    for (i, a) in placed.iter().enumerate() {
        for b in &placed[i + 1..] {
            let time = a.3.0 <= b.3.1 && b.3.0 <= a.3.1;
            let space = a.1 < b.1 + b.2 && b.1 < a.1 + a.2;
            if time && space {
                return Err(format!(
                    "buffers {} and {} are alive together and overlap",
                    a.0, b.0
                ));
            }
        }
    }
    Ok(())
}

/// The plan as text: a summary of its memory, then one line per step.
pub fn describe(plan: &Plan, stats: &MemoryStats) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# {} steps, {} weight buffers; arena {} bytes per token in {} buffers, at most {} alive at once ({} bytes per token without sharing)",
        stats.steps,
        stats.weight_buffers,
        stats.arena_bytes_per_token,
        stats.arena_buffers,
        stats.peak_live_buffers,
        stats.unshared_bytes_per_token
    );
    let show = |b: BufferId| {
        let buf = &plan.buffers[b as usize];
        let place = match &buf.storage {
            Storage::Input { name } => format!("input {name}"),
            Storage::Weight { parts, layout } => {
                let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
                let layout = layout
                    .as_ref()
                    .map(|l| format!(" as {l}"))
                    .unwrap_or_default();
                format!("weight {}{layout}", names.join("+"))
            }
            Storage::Arena { offset: Some(o) } => format!("arena @{o}"),
            Storage::Arena { offset: None } => "arena @?".into(),
            Storage::Cache => "cache".into(),
        };
        format!("b{b} {} ({place})", buf.ty)
    };
    for (i, step) in plan.steps.iter().enumerate() {
        let attrs: Vec<String> = step
            .op
            .attributes()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {{{}}}", attrs.join(", "))
        };
        let label = step
            .op
            .label()
            .map(|l| format!(" {l:?}"))
            .unwrap_or_default();
        let operands: Vec<String> = step.operands.iter().map(|&b| show(b)).collect();
        let results: Vec<String> = step.results.iter().map(|&b| show(b)).collect();
        let _ = writeln!(s, "{i:4}  {}{label}{attrs}", step.op.name());
        if !operands.is_empty() {
            let _ = writeln!(s, "        in:  {}", operands.join(", "));
        }
        if !results.is_empty() {
            let _ = writeln!(s, "        out: {}", results.join(", "));
        }
    }
    s
}
