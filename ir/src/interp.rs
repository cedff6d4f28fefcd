//! The reference interpreter: the executable meaning of every op.
//!
//! It runs a graph for `T` tokens after `P` cached positions, reading weights in their stored
//! encodings. Integer paths are exact; float steps follow the reference engines' operation
//! order (see [`crate::numerics`]), except that float dot products are accumulated in f64 and
//! rounded once, where the engines use SIMD lanes in f32.

use crate::encoding::{Encoding, QK_K, i2s_scale};
use crate::graph::{Graph, IrError, Value};
use crate::numerics::{self, Lanes8};
use crate::op::Op;
use crate::types::{Activation, DType, DotPath, RopeStyle, TensorType};
use half::f16;
use std::collections::HashMap;

/// A weight as stored: encoding, IR shape (`[N, K]` for matrices) and bytes.
#[derive(Clone, Copy, Debug)]
pub struct WeightRef<'a> {
    pub encoding: Encoding,
    pub shape: &'a [u64],
    pub bytes: &'a [u8],
}

/// Where the interpreter finds weights by name.
pub trait WeightSource {
    fn weight(&self, name: &str) -> Option<WeightRef<'_>>;

    /// A hint that the weight will rarely be read from now on (the runtime made its own copy
    /// of it): its pages may leave memory, and come back if read. Does nothing by default.
    fn release(&self, _name: &str) {}

    /// The weight `name` already in a kernel's `layout` (a compiled plan stores the layouts
    /// its kernels read), when the source has it.
    fn packed(&self, _name: &str, _layout: &str) -> Option<&[u8]> {
        None
    }
}

/// A dense tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I8(Vec<i8>),
    I32(Vec<i32>),
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor {
            shape,
            data: Data::F32(v),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }
}

/// What went wrong running a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error(transparent)]
    Graph(#[from] IrError),
    #[error("weight '{0}' is not in the model")]
    MissingWeight(String),
    #[error(
        "weight '{name}' is {found} {found_shape:?} in the model, but the graph expects {expected}"
    )]
    WeightType {
        name: String,
        expected: String,
        found: Encoding,
        found_shape: Vec<u64>,
    },
    #[error("input '{0}' was not given")]
    MissingInput(String),
    #[error("input '{name}' has {got} values, expected one per token ({expected})")]
    InputLength {
        name: String,
        got: usize,
        expected: usize,
    },
    #[error("token id {id} at position {index} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: i32, index: usize, vocab: usize },
    #[error("the KV cache holds {capacity} positions; {cached} cached + {tokens} new do not fit")]
    CacheFull {
        capacity: usize,
        cached: usize,
        tokens: usize,
    },
    #[error("{op}: {message}")]
    Op { op: &'static str, message: String },
}

/// The per-layer K and V history of one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    capacity: usize,
    len: usize,
    /// Per layer: K and V, `capacity × G × D` each, in the cache dtype (f16 kept as bits).
    layers: HashMap<u32, (CacheBuf, CacheBuf)>,
}

#[derive(Clone, Debug)]
enum CacheBuf {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl CacheBuf {
    fn get(&self, i: usize) -> f32 {
        match self {
            CacheBuf::F16(v) => v[i].to_f32(),
            CacheBuf::F32(v) => v[i],
        }
    }

    fn set(&mut self, i: usize, x: f32) {
        match self {
            CacheBuf::F16(v) => v[i] = f16::from_f32(x),
            CacheBuf::F32(v) => v[i] = x,
        }
    }
}

impl KvCache {
    /// An empty cache for up to `capacity` positions.
    pub fn new(capacity: usize) -> KvCache {
        KvCache {
            capacity,
            len: 0,
            layers: HashMap::new(),
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `n` positions and forgets the rest.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
}

/// The inputs of one step.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub tokens: &'a [i32],
    pub positions: &'a [i32],
}

/// An operand of one op: a tensor, or a weight given as its parts in row order (one part for
/// a plain weight, several for `weight_concat`).
pub enum Arg<'a> {
    Tensor(&'a Tensor),
    Weight(Vec<WeightRef<'a>>),
}

impl Arg<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            Arg::Tensor(t) => t,
            Arg::Weight(_) => unreachable!("verified graphs give tensors here"),
        }
    }

    fn weight(&self) -> &[WeightRef<'_>] {
        match self {
            Arg::Weight(w) => w,
            Arg::Tensor(_) => unreachable!("verified graphs give weights here"),
        }
    }
}

/// What one step reads and writes besides its operands.
pub struct StepState<'a> {
    pub t: usize,
    pub p: usize,
    pub inputs: Inputs<'a>,
    pub kv: &'a mut KvCache,
    pub outputs: HashMap<String, Tensor>,
    pub wrote_cache: bool,
}

impl<'a> StepState<'a> {
    /// Checks the inputs against the cache and starts a step.
    pub fn new(inputs: Inputs<'a>, kv: &'a mut KvCache) -> Result<StepState<'a>, InterpError> {
        let (t, p) = (inputs.tokens.len(), kv.len);
        if p + t > kv.capacity {
            return Err(InterpError::CacheFull {
                capacity: kv.capacity,
                cached: p,
                tokens: t,
            });
        }
        if inputs.positions.len() != t {
            return Err(InterpError::InputLength {
                name: "positions".into(),
                got: inputs.positions.len(),
                expected: t,
            });
        }
        Ok(StepState {
            t,
            p,
            inputs,
            kv,
            outputs: HashMap::new(),
            wrote_cache: false,
        })
    }

    /// Ends the step: the cache now holds this step's positions.
    pub fn finish(self) -> HashMap<String, Tensor> {
        if self.wrote_cache {
            self.kv.len = self.p + self.t;
        }
        self.outputs
    }
}

/// Whether an op only names weight data (and computes nothing).
pub fn is_weight_op(op: &Op) -> bool {
    matches!(op, Op::Weight { .. } | Op::WeightConcat | Op::Repack { .. })
}

/// Runs `graph` for `inputs.tokens.len()` tokens after the cached positions of `kv`, appending
/// this step's keys and values to `kv`. Returns every graph output by name.
pub fn run(
    graph: &Graph,
    weights: &dyn WeightSource,
    inputs: Inputs<'_>,
    kv: &mut KvCache,
) -> Result<HashMap<String, Tensor>, InterpError> {
    let mut state = StepState::new(inputs, kv)?;
    let order = graph.order()?;
    // How many more times each value is read, so that dead values are freed.
    let mut remaining: HashMap<Value, usize> = HashMap::new();
    for &id in &order {
        for v in &graph.node(id).operands {
            *remaining.entry(*v).or_default() += 1;
        }
    }
    let mut env: HashMap<Value, Tensor> = HashMap::new();
    for id in order {
        let node = graph.node(id);
        if is_weight_op(&node.op) {
            continue;
        }
        let args: Vec<Arg<'_>> = node
            .operands
            .iter()
            .map(|v| match env.get(v) {
                Some(t) => Ok(Arg::Tensor(t)),
                None => resolve_weight(graph, weights, *v).map(Arg::Weight),
            })
            .collect::<Result<_, _>>()?;
        let operand_types: Vec<&TensorType> = node.operands.iter().map(|v| graph.ty(*v)).collect();
        let results = eval_op(&node.op, &args, &operand_types, &node.results, &mut state)?;
        drop(args);
        for v in &node.operands {
            let r = remaining.get_mut(v).expect("counted");
            *r -= 1;
            if *r == 0 {
                env.remove(v);
            }
        }
        for (i, r) in results.into_iter().enumerate() {
            let v = Value {
                node: id,
                index: i as u32,
            };
            if remaining.get(&v).copied().unwrap_or(0) > 0 {
                env.insert(v, r);
            }
        }
    }
    Ok(state.finish())
}

/// Runs a plan for one step like [`run`], with every activation in `arena` at the offset
/// memory planning gave it (the arena grows to the size the step needs). Running a plan this
/// way checks its memory plan: buffers that overlapped while alive would corrupt the results.
pub fn run_plan(
    plan: &crate::plan::Plan,
    weights: &dyn WeightSource,
    inputs: Inputs<'_>,
    kv: &mut KvCache,
    arena: &mut Vec<u8>,
) -> Result<HashMap<String, Tensor>, InterpError> {
    use crate::plan::Storage;
    let mut state = StepState::new(inputs, kv)?;
    let (t, p) = (state.t, state.p);
    let per_token = plan.arena_bytes_per_token.ok_or(InterpError::Op {
        op: "plan",
        message: "memory is not planned".into(),
    })?;
    arena.resize((per_token as usize) * t, 0);
    let bad = |message: String| InterpError::Op {
        op: "plan",
        message,
    };
    let mut cache_values: HashMap<u32, Tensor> = HashMap::new();
    let mut weight_parts: HashMap<u32, Vec<WeightRef<'_>>> = HashMap::new();
    for (i, b) in plan.buffers.iter().enumerate() {
        if let Storage::Weight { parts, .. } = &b.storage {
            let refs = parts
                .iter()
                .map(|part| {
                    let shape: Vec<u64> = part
                        .ty
                        .shape
                        .iter()
                        .map(|d| d.fixed().unwrap_or(0))
                        .collect();
                    fetch_weight(weights, &part.name, part.ty.dtype, &shape)
                })
                .collect::<Result<Vec<_>, _>>()?;
            weight_parts.insert(i as u32, refs);
        }
    }
    for step in &plan.steps {
        let mut loaded: Vec<Option<Tensor>> = Vec::with_capacity(step.operands.len());
        for &b in &step.operands {
            let buf = plan
                .buffers
                .get(b as usize)
                .ok_or_else(|| bad(format!("buffer {b} does not exist")))?;
            loaded.push(match &buf.storage {
                Storage::Input { name } => {
                    let v = match name.as_str() {
                        "tokens" => state.inputs.tokens,
                        "positions" => state.inputs.positions,
                        _ => return Err(InterpError::MissingInput(name.clone())),
                    };
                    Some(Tensor {
                        shape: vec![t],
                        data: Data::I32(v.to_vec()),
                    })
                }
                Storage::Weight { .. } => None,
                Storage::Cache => {
                    Some(cache_values.get(&b).cloned().ok_or_else(|| {
                        bad(format!("cache buffer {b} read before it is written"))
                    })?)
                }
                Storage::Arena { offset } => {
                    let offset = offset.ok_or_else(|| bad(format!("buffer {b} has no offset")))?;
                    Some(read_arena(arena, offset as usize * t, &buf.ty, t, p))
                }
            });
        }
        let args: Vec<Arg<'_>> = step
            .operands
            .iter()
            .zip(&loaded)
            .map(|(b, l)| match l {
                Some(t) => Arg::Tensor(t),
                None => Arg::Weight(weight_parts[b].clone()),
            })
            .collect();
        let operand_types: Vec<&TensorType> = step
            .operands
            .iter()
            .map(|&b| &plan.buffers[b as usize].ty)
            .collect();
        let result_types: Vec<TensorType> = step
            .results
            .iter()
            .map(|&b| plan.buffers[b as usize].ty.clone())
            .collect();
        let results = eval_op(&step.op, &args, &operand_types, &result_types, &mut state)?;
        for (&b, r) in step.results.iter().zip(results) {
            match &plan.buffers[b as usize].storage {
                Storage::Cache => {
                    cache_values.insert(b, r);
                }
                Storage::Arena { offset: Some(o) } => write_arena(arena, *o as usize * t, &r),
                _ => {
                    return Err(bad(format!(
                        "step {} writes buffer {b}, which is not an activation",
                        step.op.name()
                    )));
                }
            }
        }
    }
    Ok(state.finish())
}

fn read_arena(arena: &[u8], at: usize, ty: &TensorType, t: usize, p: usize) -> Tensor {
    let shape = ty.eval_shape(t, p);
    let n: usize = shape.iter().product();
    let data = match ty.dtype {
        DType::I8 => Data::I8(arena[at..at + n].iter().map(|&b| b as i8).collect()),
        DType::I32 => Data::I32(
            arena[at..at + 4 * n]
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        _ => Data::F32(
            arena[at..at + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
    };
    Tensor { shape, data }
}

fn write_arena(arena: &mut [u8], at: usize, t: &Tensor) {
    match &t.data {
        Data::I8(v) => {
            for (d, &x) in arena[at..at + v.len()].iter_mut().zip(v) {
                *d = x as u8;
            }
        }
        Data::I32(v) => {
            for (d, x) in arena[at..at + 4 * v.len()].chunks_exact_mut(4).zip(v) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        Data::F32(v) => {
            for (d, x) in arena[at..at + 4 * v.len()].chunks_exact_mut(4).zip(v) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Evaluates one (non-weight) op.
pub fn eval_op(
    op: &Op,
    args: &[Arg<'_>],
    operand_types: &[&TensorType],
    result_types: &[TensorType],
    state: &mut StepState<'_>,
) -> Result<Vec<Tensor>, InterpError> {
    let (t, p) = (state.t, state.p);
    let shapes: Vec<Vec<usize>> = result_types.iter().map(|r| r.eval_shape(t, p)).collect();
    let err = |message: String| InterpError::Op {
        op: op.name(),
        message,
    };
    let f32s = |i: usize| f32s(args[i].tensor());
    Ok(match op {
        Op::Weight { .. } | Op::WeightConcat | Op::Repack { .. } => Vec::new(),
        Op::Input { name } => {
            let v = match name.as_str() {
                "tokens" => state.inputs.tokens,
                "positions" => state.inputs.positions,
                _ => return Err(InterpError::MissingInput(name.clone())),
            };
            vec![Tensor {
                shape: vec![t],
                data: Data::I32(v.to_vec()),
            }]
        }
        Op::Output { name } => {
            state.outputs.insert(name.clone(), args[0].tensor().clone());
            Vec::new()
        }
        Op::Embed => {
            let w = single(args[1].weight()).map_err(err)?;
            let (vocab, h) = (w.shape[0] as usize, w.shape[1] as usize);
            let ids = i32s(args[0].tensor());
            let mut out = vec![0.0f32; t * h];
            for (i, &id) in ids.iter().enumerate() {
                if id < 0 || id as usize >= vocab {
                    return Err(InterpError::TokenOutOfRange {
                        id,
                        index: i,
                        vocab,
                    });
                }
                w.encoding
                    .decode_range(
                        w.bytes,
                        (vocab * h) as u64,
                        (id as usize * h) as u64,
                        &mut out[i * h..(i + 1) * h],
                    )
                    .map_err(|e| err(e.to_string()))?;
            }
            vec![Tensor::f32(shapes[0].clone(), out)]
        }
        Op::RmsNorm { eps } => {
            let gain = float_weight(args[1].weight()).map_err(err)?;
            vec![Tensor::f32(
                shapes[0].clone(),
                rms_norm_rows(f32s(0), &gain, *eps),
            )]
        }
        Op::QuantAct => {
            let (q, s) = quant_rows(f32s(0), shapes[0][1]);
            vec![
                Tensor {
                    shape: shapes[0].clone(),
                    data: Data::I8(q),
                },
                Tensor::f32(shapes[1].clone(), s),
            ]
        }
        Op::TMatmul => {
            let (q, s) = (i8s(args[0].tensor()), f32s(1));
            vec![Tensor::f32(
                shapes[0].clone(),
                tmatmul(q, s, args[2].weight()).map_err(err)?,
            )]
        }
        Op::Matmul { half } => {
            let y = matmul(f32s(0), args[1].weight(), half.path(t)).map_err(err)?;
            vec![Tensor::f32(shapes[0].clone(), y)]
        }
        Op::Linear {
            norm,
            glu,
            residual,
            half,
        } => {
            let w = args[1].weight();
            let mut next = 2;
            let normed;
            let x = match norm {
                Some(eps) => {
                    let gain = float_weight(args[next].weight()).map_err(err)?;
                    next += 1;
                    normed = rms_norm_rows(f32s(0), &gain, *eps);
                    &normed[..]
                }
                None => f32s(0),
            };
            let mut y = if w[0].encoding == Encoding::I2S {
                let (q, s) = quant_rows(x, operand_types[0].shape[1].fixed().unwrap_or(0) as usize);
                tmatmul(&q, &s, w).map_err(err)?
            } else {
                matmul(x, w, half.path(t)).map_err(err)?
            };
            if let Some(act) = glu {
                let n = y.len() / t;
                let f = activation(*act);
                y = y
                    .chunks_exact(n)
                    .flat_map(|row| (0..n / 2).map(move |j| f(row[j]) * row[n / 2 + j]))
                    .collect();
            }
            if *residual {
                for (y, &r) in y.iter_mut().zip(f32s(next)) {
                    // r + y as `add` computes it (IEEE addition commutes).
                    *y += r;
                }
            }
            vec![Tensor::f32(shapes[0].clone(), y)]
        }
        Op::Split { sizes } => {
            let x = f32s(0);
            let n: usize = sizes.iter().sum::<u64>() as usize;
            let mut start = 0;
            sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| {
                    let size = size as usize;
                    let part: Vec<f32> = x
                        .chunks_exact(n)
                        .flat_map(|row| row[start..start + size].iter().copied())
                        .collect();
                    start += size;
                    Tensor::f32(shapes[i].clone(), part)
                })
                .collect()
        }
        Op::Mul | Op::Add => {
            // `b` may be a weight (a `.scale` tensor).
            let decoded;
            let b = match &args[1] {
                Arg::Tensor(t) => self::f32s(t),
                Arg::Weight(w) => {
                    decoded = float_weight(w).map_err(err)?;
                    &decoded[..]
                }
            };
            let a = f32s(0);
            let mul = matches!(op, Op::Mul);
            let y = a
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let y = if b.len() == 1 { b[0] } else { b[i] };
                    if mul { x * y } else { x + y }
                })
                .collect();
            vec![Tensor::f32(shapes[0].clone(), y)]
        }
        Op::Act { act } => {
            let f = activation(*act);
            vec![Tensor::f32(
                shapes[0].clone(),
                f32s(0).iter().map(|&x| f(x)).collect(),
            )]
        }
        Op::Reshape { .. } => vec![Tensor::f32(shapes[0].clone(), f32s(0).to_vec())],
        Op::Rope { theta, style, dims } => {
            let mut x = f32s(0).to_vec();
            let (heads, d) = (shapes[0][1], shapes[0][2]);
            for (tok, &pos) in i32s(args[1].tensor()).iter().enumerate() {
                let cache = numerics::rope_cache(pos, *theta, *dims as usize);
                for h in 0..heads {
                    let at = (tok * heads + h) * d;
                    numerics::rope_head(&mut x[at..at + d], &cache, *style == RopeStyle::Neox);
                }
            }
            vec![Tensor::f32(shapes[0].clone(), x)]
        }
        Op::KvAppend { layer, cache } => {
            let (g, d) = (shapes[0][1], shapes[0][2]);
            let cap = state.kv.capacity * g * d;
            let entry = state
                .kv
                .layers
                .entry(*layer)
                .or_insert_with(|| match cache {
                    DType::F16 => (
                        CacheBuf::F16(vec![f16::ZERO; cap]),
                        CacheBuf::F16(vec![f16::ZERO; cap]),
                    ),
                    _ => (CacheBuf::F32(vec![0.0; cap]), CacheBuf::F32(vec![0.0; cap])),
                });
            let (k, v) = (f32s(0), f32s(1));
            for (i, (&kx, &vx)) in k.iter().zip(v).enumerate() {
                entry.0.set(p * g * d + i, kx);
                entry.1.set(p * g * d + i, vx);
            }
            state.wrote_cache = true;
            let read = |b: &CacheBuf| (0..(p + t) * g * d).map(|i| b.get(i)).collect::<Vec<f32>>();
            vec![
                Tensor::f32(shapes[0].clone(), read(&entry.0)),
                Tensor::f32(shapes[1].clone(), read(&entry.1)),
            ]
        }
        Op::Attention { scale, kq, kqv } => {
            // An f32 cache has no half-precision dot products.
            let f16_cache = matches!(operand_types[1].dtype, DType::F16);
            let paths = if f16_cache {
                (kq.path(t), kqv.path(t))
            } else {
                (DotPath::F32, DotPath::F32)
            };
            let out = attention(f32s(0), f32s(1), f32s(2), &shapes[0], p, *scale, paths);
            vec![Tensor::f32(shapes[0].clone(), out)]
        }
    })
}

fn activation(act: Activation) -> fn(f32) -> f32 {
    match act {
        Activation::Silu => numerics::silu,
        Activation::Relu2 => numerics::relu2,
    }
}

fn rms_norm_rows(x: &[f32], gain: &[f32], eps: f32) -> Vec<f32> {
    let n = gain.len();
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        numerics::rms_norm(xr, gain, eps, yr);
    }
    y
}

fn quant_rows(x: &[f32], k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0.0f32; x.len() / k.max(1)];
    for ((xr, qr), s) in x
        .chunks_exact(k)
        .zip(q.chunks_exact_mut(k))
        .zip(s.iter_mut())
    {
        *s = numerics::quant_act_i8(xr, qr);
    }
    (q, s)
}

fn f32s(t: &Tensor) -> &[f32] {
    match &t.data {
        Data::F32(v) => v,
        _ => unreachable!("verified graphs give f32 operands here"),
    }
}

fn i8s(t: &Tensor) -> &[i8] {
    match &t.data {
        Data::I8(v) => v,
        _ => unreachable!("verified graphs give i8 operands here"),
    }
}

fn i32s(t: &Tensor) -> &[i32] {
    match &t.data {
        Data::I32(v) => v,
        _ => unreachable!("verified graphs give i32 operands here"),
    }
}

/// The weight parts behind a weight-valued graph value (`weight`, `repack`, `weight_concat`),
/// each checked against the graph's type for it.
pub fn resolve_weight<'w>(
    graph: &Graph,
    weights: &'w dyn WeightSource,
    v: Value,
) -> Result<Vec<WeightRef<'w>>, InterpError> {
    let node = graph.node(v.node);
    match &node.op {
        Op::Weight { name } => {
            let ty = graph.ty(v);
            let shape: Vec<u64> = ty.shape.iter().map(|d| d.fixed().unwrap_or(0)).collect();
            Ok(vec![fetch_weight(weights, name, ty.dtype, &shape)?])
        }
        Op::Repack { .. } => resolve_weight(graph, weights, node.operands[0]),
        Op::WeightConcat => {
            let mut parts = Vec::new();
            for &o in &node.operands {
                parts.extend(resolve_weight(graph, weights, o)?);
            }
            Ok(parts)
        }
        other => Err(InterpError::Op {
            op: other.name(),
            message: "operand is not a weight".into(),
        }),
    }
}

/// A named weight, checked to have the encoding and shape the graph declares.
pub fn fetch_weight<'w>(
    weights: &'w dyn WeightSource,
    name: &str,
    dtype: DType,
    shape: &[u64],
) -> Result<WeightRef<'w>, InterpError> {
    let w = weights
        .weight(name)
        .ok_or_else(|| InterpError::MissingWeight(name.into()))?;
    if DType::of_encoding(w.encoding) != dtype || w.shape != shape {
        return Err(InterpError::WeightType {
            name: name.into(),
            expected: TensorType::new(
                dtype,
                shape
                    .iter()
                    .map(|&d| crate::types::Dim::Fixed(d))
                    .collect::<Vec<_>>(),
            )
            .to_string(),
            found: w.encoding,
            found_shape: w.shape.to_vec(),
        });
    }
    Ok(w)
}

fn single<'a, 'w>(parts: &'a [WeightRef<'w>]) -> Result<&'a WeightRef<'w>, String> {
    match parts {
        [w] => Ok(w),
        _ => Err(format!("expects one weight, got {} parts", parts.len())),
    }
}

fn float_weight(parts: &[WeightRef<'_>]) -> Result<Vec<f32>, String> {
    let w = single(parts)?;
    let n: u64 = w.shape.iter().product();
    w.encoding.decode(w.bytes, n).map_err(|e| e.to_string())
}

/// Applies `f` to each part of a weight (rows stacked) and places each part's output columns.
fn by_part(
    parts: &[WeightRef<'_>],
    t: usize,
    f: impl Fn(&WeightRef<'_>) -> Result<Vec<f32>, String>,
) -> Result<Vec<f32>, String> {
    let n: usize = parts.iter().map(|w| w.shape[0] as usize).sum();
    let mut y = vec![0.0f32; t * n];
    let mut col = 0;
    for w in parts {
        let ni = w.shape[0] as usize;
        let part = f(w)?;
        for tok in 0..t {
            y[tok * n + col..tok * n + col + ni].copy_from_slice(&part[tok * ni..(tok + 1) * ni]);
        }
        col += ni;
    }
    Ok(y)
}

fn tmatmul(q: &[i8], s: &[f32], parts: &[WeightRef<'_>]) -> Result<Vec<f32>, String> {
    by_part(parts, s.len(), |w| tmatmul_part(q, s, w))
}

fn matmul(x: &[f32], parts: &[WeightRef<'_>], path: DotPath) -> Result<Vec<f32>, String> {
    let k = parts[0].shape[1] as usize;
    by_part(parts, x.len() / k.max(1), |w| matmul_part(x, w, path))
}

/// `y[t,n] = ((f32)Σ_k (c[n,k]−1)·q[t,k] / s[t]) · β` over I2_S codes in flattened order.
fn tmatmul_part(q: &[i8], s: &[f32], w: &WeightRef<'_>) -> Result<Vec<f32>, String> {
    let (n, k) = (w.shape[0] as usize, w.shape[1] as usize);
    let total = (n * k) as u64;
    let expected = Encoding::I2S.byte_size(total).map_err(|e| e.to_string())?;
    if w.bytes.len() as u64 != expected {
        return Err(format!(
            "i2_s weight has {} bytes, expected {expected}",
            w.bytes.len()
        ));
    }
    let beta = i2s_scale(w.bytes, total);
    let t = s.len();
    let mut signs = vec![0i8; k];
    let mut y = vec![0.0f32; t * n];
    for row in 0..n {
        for (j, sign) in signs.iter_mut().enumerate() {
            let i = row * k + j;
            let code = (w.bytes[32 * (i / 128) + i % 32] >> (6 - 2 * ((i % 128) / 32))) & 3;
            if code == 3 {
                return Err(format!("i2_s code 3 at element {i}"));
            }
            *sign = code as i8 - 1;
        }
        for tok in 0..t {
            let qr = &q[tok * k..(tok + 1) * k];
            let sum: i32 = qr
                .iter()
                .zip(&signs)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
            y[tok * n + row] = numerics::i2s_epilogue(sum, s[tok], beta);
        }
    }
    Ok(y)
}

/// `a·b` where `b` holds half-precision values (widened to f32) and `a` is an f32 operand,
/// evaluated along `path`; `round` rounds `a` to the half type.
pub fn half_dot(path: DotPath, round: fn(f32) -> f32, a: &[f32], b: &[f32]) -> f32 {
    if path == DotPath::F32 {
        return numerics::dot_f64(a, b);
    }
    let rounded: Vec<f32> = a.iter().map(|&v| round(v)).collect();
    half_dot_prepared(path, a, &rounded, b)
}

/// [`half_dot`] with `a` also given already rounded to the half type (`a_rounded`).
fn half_dot_prepared(path: DotPath, a: &[f32], a_rounded: &[f32], b: &[f32]) -> f32 {
    match path {
        DotPath::F32 => numerics::dot_f64(a, b),
        // tinyBLAS takes rows whose length is a multiple of its 16 lanes; ggml falls back to
        // its GEMV otherwise.
        DotPath::Gemm { round: r } if a.len().is_multiple_of(16) => {
            numerics::dot_tinyblas16(if r { a_rounded } else { a }, b)
        }
        DotPath::Gemv | DotPath::Gemm { .. } => numerics::dot_ggml_vec_f16(a_rounded, b),
    }
}

/// A matmul with the numerics of the weight's encoding; `path` applies to f16/bf16 weights.
fn matmul_part(x: &[f32], w: &WeightRef<'_>, path: DotPath) -> Result<Vec<f32>, String> {
    let n = w.shape[0] as usize;
    let t = x.len() / (w.shape[1] as usize).max(1);
    let acts = MatmulActs::new(x, w)?;
    let mut y = vec![0.0f32; t * n];
    let mut scratch = RowScratch::default();
    matmul_rows(&acts, x, w, path, 0..n, &mut scratch, |tok, r, v| {
        y[tok * n + r] = v
    })?;
    Ok(y)
}

/// The activations `x` (`T` rows of `K`) of a matmul in the form the weight's encoding
/// multiplies them in: quantized per block as llama.cpp does for Q and TQ weights, rounded to
/// the half type for F16/BF16 weights. Computed once per step; [`MatmulActs::prepare`] reuses
/// the buffers.
#[derive(Debug, Default)]
pub struct MatmulActs {
    k: usize,
    /// `T × K/32` blocks (Q8_0/Q4_0/Q4_1 weights).
    q8: Vec<numerics::Q8Block>,
    /// `T × K/256` blocks (TQ1_0/TQ2_0 weights).
    q8k: Vec<numerics::Q8KBlock>,
    /// `x` rounded to f16 or bf16 (F16/BF16 weights).
    rounded: Vec<f32>,
}

impl MatmulActs {
    /// Prepares `x` for weight `w`, checking the weight's size.
    pub fn new(x: &[f32], w: &WeightRef<'_>) -> Result<MatmulActs, String> {
        let mut acts = MatmulActs::default();
        acts.prepare(x, w)?;
        Ok(acts)
    }

    /// [`MatmulActs::new`] into this value's buffers (which only grow).
    pub fn prepare(&mut self, x: &[f32], w: &WeightRef<'_>) -> Result<(), String> {
        let (n, k) = (w.shape[0] as usize, w.shape[1] as usize);
        let enc = w.encoding;
        let block = enc.block_elems();
        if k == 0 || k % block != 0 {
            return Err(format!(
                "{enc} rows must be whole {block}-element blocks, got K = {k}"
            ));
        }
        let row_bytes = (k / block) * enc.block_bytes();
        if w.bytes.len() != n * row_bytes {
            return Err(format!(
                "{enc} weight has {} bytes, expected {}",
                w.bytes.len(),
                n * row_bytes
            ));
        }
        self.k = k;
        self.q8.clear();
        self.q8k.clear();
        self.rounded.clear();
        match enc {
            Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1 => {
                for row in x.chunks_exact(k) {
                    numerics::quantize_q8_x86_into(row, &mut self.q8);
                }
            }
            Encoding::TQ1_0 | Encoding::TQ2_0 => {
                for row in x.chunks_exact(k) {
                    numerics::quantize_q8_k_into(row, &mut self.q8k);
                }
            }
            Encoding::I2S => return Err("i2_s weights go through quant_act and tmatmul".into()),
            Encoding::F16 => self
                .rounded
                .extend(x.iter().map(|&v| numerics::round_f16(v))),
            Encoding::BF16 => self
                .rounded
                .extend(x.iter().map(|&v| numerics::round_bf16(v))),
            Encoding::F32 => {}
        }
        Ok(())
    }
}

/// Per-thread buffers of [`matmul_rows`] (one decoded weight row), which only grow.
#[derive(Debug, Default)]
pub struct RowScratch {
    row: Vec<f32>,
    codes: Vec<u8>,
    values: Vec<i32>,
    scales: Vec<f32>,
}

/// Rows `rows` of a matmul of `x` with the numerics of the weight's encoding (`path` applies
/// to f16/bf16 weights), each result given to `emit(token, row, value)`. `acts` must have
/// been prepared for this `x` and weight.
pub fn matmul_rows(
    acts: &MatmulActs,
    x: &[f32],
    w: &WeightRef<'_>,
    path: DotPath,
    rows: std::ops::Range<usize>,
    scratch: &mut RowScratch,
    mut emit: impl FnMut(usize, usize, f32),
) -> Result<(), String> {
    let k = acts.k;
    let t = x.len() / k;
    let enc = w.encoding;
    let row_bytes = (k / enc.block_elems()) * enc.block_bytes();
    let row = |r: usize| &w.bytes[r * row_bytes..(r + 1) * row_bytes];
    match enc {
        Encoding::F32 | Encoding::F16 | Encoding::BF16 => {
            let path = if enc == Encoding::F32 {
                DotPath::F32
            } else {
                path
            };
            scratch.row.resize(k, 0.0);
            let wr = &mut scratch.row[..k];
            for r in rows {
                enc.decode_range(row(r), k as u64, 0, wr)
                    .map_err(|e| e.to_string())?;
                for tok in 0..t {
                    let a = &x[tok * k..(tok + 1) * k];
                    let a_rounded = if enc == Encoding::F32 {
                        a
                    } else {
                        &acts.rounded[tok * k..(tok + 1) * k]
                    };
                    emit(tok, r, half_dot_prepared(path, a, a_rounded, wr));
                }
            }
        }
        Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1 => {
            let bb = enc.block_bytes();
            for r in rows {
                let wrow = row(r);
                for (tok, a) in acts.q8.chunks_exact(k / 32).enumerate() {
                    let mut lanes = Lanes8::default();
                    let mut summs = 0.0f32;
                    for (b, ab) in a.iter().enumerate() {
                        let wb = &wrow[b * bb..(b + 1) * bb];
                        let d = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
                        let mut q = [0i32; 32];
                        match enc {
                            Encoding::Q8_0 => {
                                for (i, q) in q.iter_mut().enumerate() {
                                    *q = wb[2 + i] as i8 as i32;
                                }
                            }
                            Encoding::Q4_0 => {
                                for j in 0..16 {
                                    q[j] = (wb[2 + j] & 0x0f) as i32 - 8;
                                    q[j + 16] = (wb[2 + j] >> 4) as i32 - 8;
                                }
                            }
                            _ => {
                                let m = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
                                summs += m * ab.s;
                                for j in 0..16 {
                                    q[j] = (wb[4 + j] & 0x0f) as i32;
                                    q[j + 16] = (wb[4 + j] >> 4) as i32;
                                }
                            }
                        }
                        lanes.add_block(d * ab.d, &q, &ab.qs);
                    }
                    emit(tok, r, lanes.sum() + summs);
                }
            }
        }
        Encoding::TQ1_0 | Encoding::TQ2_0 => {
            scratch.codes.resize(k, 0);
            scratch.values.resize(k, 0);
            scratch.scales.resize(k / QK_K, 0.0);
            let RowScratch {
                codes,
                values,
                scales,
                ..
            } = scratch;
            for r in rows {
                crate::encoding::tq_row_values(enc, row(r), codes, values, scales)
                    .map_err(|e| format!("row {r}: {e}"))?;
                for (tok, a) in acts.q8k.chunks_exact(k / QK_K).enumerate() {
                    let mut sum = 0.0f32;
                    for (b, ab) in a.iter().enumerate() {
                        let c = &values[b * QK_K..(b + 1) * QK_K];
                        let sumi: i32 = c.iter().zip(&ab.qs).map(|(&c, &q)| c * q as i32).sum();
                        sum += (ab.d * scales[b]) * sumi as f32;
                    }
                    emit(tok, r, sum);
                }
            }
        }
        Encoding::I2S => return Err("i2_s weights go through quant_act and tmatmul".into()),
    }
    Ok(())
}

/// Causal GQA attention over the cache (ggml's non-flash path): scores `Q·K` along
/// `paths.0`, `softmax(score·scale + mask)`, then probabilities times V along `paths.1`.
fn attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    shape: &[usize],
    p: usize,
    scale: f32,
    paths: (DotPath, DotPath),
) -> Vec<f32> {
    let (t, h, d) = (shape[0], shape[1], shape[2]);
    let g = kc.len() / ((p + t) * d);
    let group = h / g;
    let mut out = vec![0.0f32; t * h * d];
    let mut scores = Vec::with_capacity(p + t);
    let mut v_col = Vec::with_capacity(p + t);
    for tok in 0..t {
        let visible = p + tok + 1;
        for head in 0..h {
            let kvh = head / group;
            let qv = &q[(tok * h + head) * d..][..d];
            scores.clear();
            for j in 0..visible {
                let kr = &kc[(j * g + kvh) * d..][..d];
                scores.push(half_dot(paths.0, numerics::round_f16, qv, kr) * scale);
            }
            numerics::softmax(&mut scores);
            // ggml pads the cache view to a multiple of 32 positions (masked, so probability 0);
            // the padding decides which kernel takes `P·V` and adds nothing.
            let padded = visible.next_multiple_of(32);
            scores.resize(padded, 0.0);
            let o = &mut out[(tok * h + head) * d..][..d];
            for (dim, o) in o.iter_mut().enumerate() {
                v_col.clear();
                v_col.extend((0..visible).map(|j| vc[(j * g + kvh) * d + dim]));
                v_col.resize(padded, 0.0);
                *o = half_dot(paths.1, numerics::round_f16, &scores, &v_col);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Dim, TensorType};

    struct Weights(Vec<(String, Encoding, Vec<u64>, Vec<u8>)>);

    impl WeightSource for Weights {
        fn weight(&self, name: &str) -> Option<WeightRef<'_>> {
            let (_, encoding, shape, bytes) = self.0.iter().find(|w| w.0 == name)?;
            Some(WeightRef {
                encoding: *encoding,
                shape,
                bytes,
            })
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0
            })
            .collect()
    }

    /// Runs `y = x·Wᵀ` for one weight through the interpreter; `x` comes from an f32 table.
    fn run_linear(enc: Encoding, n: u64, k: u64, w: &[f32], x: &[f32]) -> Vec<f32> {
        let t = x.len() / k as usize;
        let mut g = Graph::new();
        let ids = g.input("tokens", TensorType::new(DType::I32, vec![Dim::T]));
        let table = g.weight(
            "x",
            TensorType::new(DType::F32, vec![Dim::Fixed(t as u64), Dim::Fixed(k)]),
        );
        let xv = g.add1(Op::Embed, &[ids, table]).unwrap();
        let wv = g.weight(
            "w",
            TensorType::new(DType::of_encoding(enc), vec![Dim::Fixed(n), Dim::Fixed(k)]),
        );
        let y = if enc == Encoding::I2S {
            let qs = g.add(Op::QuantAct, &[xv]).unwrap();
            g.add1(Op::TMatmul, &[qs[0], qs[1], wv]).unwrap()
        } else {
            g.add1(
                Op::Matmul {
                    half: crate::types::HalfPath::F32,
                },
                &[xv, wv],
            )
            .unwrap()
        };
        g.output("y", y).unwrap();
        let weights = Weights(vec![
            (
                "x".into(),
                Encoding::F32,
                vec![t as u64, k],
                Encoding::F32.encode(x).unwrap(),
            ),
            ("w".into(), enc, vec![n, k], enc.encode(w).unwrap()),
        ]);
        let tokens: Vec<i32> = (0..t as i32).collect();
        let mut kv = KvCache::new(t);
        let out = run(
            &g,
            &weights,
            Inputs {
                tokens: &tokens,
                positions: &tokens,
            },
            &mut kv,
        )
        .unwrap();
        out["y"].as_f32().unwrap().to_vec()
    }

    #[test]
    fn i2s_rows_straddle_blocks_in_flattened_order() {
        // K = 96: rows are not whole 128-element blocks; the file format packs the flattened
        // tensor, so row 1 starts in the middle of block 0.
        let (n, k) = (4u64, 96u64);
        let beta = 0.25f32;
        let w: Vec<f32> = values((n * k) as usize, 7)
            .iter()
            .map(|v| {
                if v.abs() < 0.3 {
                    0.0
                } else {
                    beta * v.signum()
                }
            })
            .collect();
        let x = values(2 * k as usize, 3);
        let y = run_linear(Encoding::I2S, n, k, &w, &x);
        for tok in 0..2 {
            let xr = &x[tok * k as usize..][..k as usize];
            let mut q = vec![0i8; k as usize];
            let s = numerics::quant_act_i8(xr, &mut q);
            for row in 0..n as usize {
                let sum: i32 = (0..k as usize)
                    .map(|j| q[j] as i32 * (w[row * k as usize + j] / beta) as i32)
                    .sum();
                assert_eq!(
                    y[tok * n as usize + row],
                    numerics::i2s_epilogue(sum, s, beta),
                    "token {tok} row {row}"
                );
            }
        }
    }

    #[test]
    fn quantized_matmuls_approximate_the_float_product() {
        let (n, k) = (3u64, 256u64);
        let w = values((n * k) as usize, 11);
        let x = values(2 * k as usize, 5);
        let exact: Vec<f32> = (0..2)
            .flat_map(|t| (0..n as usize).map(move |r| (t, r)))
            .map(|(t, r)| numerics::dot_f64(&x[t * 256..][..256], &w[r * 256..][..256]))
            .collect();
        // Errors relative to |x|·|w|, the scale of a dot product's rounding.
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let scale = norm(&x[..256]) * norm(&w[..256]);
        for (enc, tol) in [
            (Encoding::F32, 1e-6),
            (Encoding::Q8_0, 5e-3),
            (Encoding::Q4_0, 5e-2),
            (Encoding::Q4_1, 5e-2),
        ] {
            let y = run_linear(enc, n, k, &w, &x);
            for (a, b) in y.iter().zip(&exact) {
                assert!((a - b).abs() <= tol * scale, "{enc}: {a} vs {b}");
            }
        }
    }
}
