//! The compiled executor: a plan bound once to its weights and to kernels chosen for this host,
//! then run step after step with a fixed thread pool, one preallocated arena and a KV cache
//! per session. Integer paths (I2_S) are bit-exact with the interpreter; f16 dot products use
//! the reference engines' summation orders and are bit-exact too. Encodings without a
//! dedicated kernel run the interpreter's numerics row by row (threaded), and say so in the
//! kernel trace.

use crate::pool::{Pool, split};
use bitnetc_codegen_cpu::act::{QuantFn, select_quant};
use bitnetc_codegen_cpu::blocks::{BlockDotFn, BlockGemmFn};
use bitnetc_codegen_cpu::half::{Chains, HalfChainsFn, HalfDots, Rows16, value_row};
use bitnetc_codegen_cpu::jit::JitError;
use bitnetc_codegen_cpu::lut;
use bitnetc_codegen_cpu::select::{
    KernelSet, TernaryChoice, TernaryKernel, choose_ternary, fixed_ternary,
};
use bitnetc_codegen_cpu::ternary::RowsArgs;
use bitnetc_ir::encoding::{Encoding, i2s_scale};
use bitnetc_ir::interp::{
    MatmulActs, RowScratch, WeightRef, WeightSource, fetch_weight, matmul_rows,
};
use bitnetc_ir::numerics;
use bitnetc_ir::op::Op;
use bitnetc_ir::plan::{BufferId, Plan, Storage};
use bitnetc_ir::types::{Activation, DType, DotPath, HalfPath, RopeStyle};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Why a plan cannot be compiled or a step cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("step {step} ({op}): {message}")]
    Step {
        step: usize,
        op: &'static str,
        message: String,
    },
    #[error("weight {name}: {message}")]
    Weight { name: String, message: String },
    #[error("kernel generation failed: {0}")]
    Jit(#[from] JitError),
    #[error("could not start the worker threads: {0}")]
    Threads(std::io::Error),
    #[error("the plan's memory is not planned")]
    Unplanned,
    #[error("{0}")]
    Run(String),
}

/// How to compile a plan.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// Worker threads, the caller's included.
    pub threads: usize,
    /// Which kernel variants may be bound.
    pub kernels: KernelSet,
    /// Most tokens per step; longer inputs run in several steps.
    pub batch: usize,
    /// Time every step for [`Executor::trace`].
    pub trace: bool,
    /// Re-encode the output projection (the largest read of a decode step) at load time:
    /// `q8_0` halves an F16 head's bytes at the cost of llama.cpp's Q8_0 rounding.
    pub lm_head: Option<Encoding>,
    /// Ternary kernels bound by name (a compiled plan's), instead of timing the candidates.
    pub bindings: Option<Vec<TernaryBinding>>,
}

/// The ternary kernels bound for one weight shape, by name: what a compiled plan records.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TernaryBinding {
    pub k: usize,
    pub n: usize,
    pub gemv: String,
    pub gemm: String,
}

/// The output projection as the executor re-encoded it (`lm_head`).
pub struct ReencodedHead<'e> {
    /// The head's step in the plan.
    pub step: usize,
    /// The weight buffer the head step reads.
    pub buffer: BufferId,
    /// Per part: the original tensor's name, its new encoding, `[rows, k]` and bytes.
    pub parts: Vec<(String, Encoding, [u64; 2], &'e [u8])>,
}

impl Default for ExecOptions {
    fn default() -> ExecOptions {
        ExecOptions {
            threads: default_threads(),
            kernels: KernelSet::Best,
            batch: 512,
            trace: false,
            lm_head: None,
            bindings: None,
        }
    }
}

/// The host's cores, as `std` reports them.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Which rows of logits a step returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// One row per token.
    All,
    /// The last token's row only; the output projection runs for that row alone, as llama.cpp
    /// does when only the last logits are requested (a one-token matmul for that row).
    Last,
}

/// A read-only byte range of the weights, kept alive by the executor's weight source.
#[derive(Clone, Copy)]
struct Bytes {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the bytes are immutable weights.
unsafe impl Send for Bytes {}
unsafe impl Sync for Bytes {}

impl Bytes {
    fn of(b: &[u8]) -> Bytes {
        Bytes {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }
    /// SAFETY: the executor holds the weight source for as long as it lives.
    fn get(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// An activation buffer: `off` bytes per token into the arena, `row` elements per token.
#[derive(Clone, Copy, Debug)]
struct Act {
    off: usize,
    row: usize,
}

#[derive(Clone, Copy, Debug)]
enum IntInput {
    Tokens,
    Positions,
}

/// A generic matmul weight part: its encoding and shape, for the interpreter's numerics.
struct GenericPart {
    bytes: Bytes,
    encoding: Encoding,
    shape: [u64; 2],
}

enum Weights {
    /// I2_S rows: per part its codes, rows and scale β; `choice` indexes the executor's kernels.
    Ternary {
        parts: Vec<(Bytes, usize, f32)>,
        choice: usize,
    },
    /// F16 rows, dotted along `half`'s path.
    F16 {
        parts: Vec<(Bytes, usize)>,
        half: HalfPath,
    },
    /// Q8_0/Q4_0/Q4_1 rows times activations in Q8 blocks, llama.cpp's x86 order.
    Blocks {
        parts: Vec<(Bytes, usize)>,
        enc: Encoding,
        dot: BlockDotFn,
        /// Steps of several tokens, when the host has the kernel (the same bits).
        gemm: Option<BlockGemmFn>,
    },
    /// Any other encoding, through the interpreter's row numerics.
    Generic {
        parts: Vec<GenericPart>,
        half: HalfPath,
    },
}

enum LinearInput {
    /// f32 activations, normalized first when a gain is given.
    F32 {
        x: Act,
        norm: Option<(Vec<f32>, f32)>,
    },
    /// Already quantized (an unfused `tmatmul`): int8 rows and their scales.
    Quantized { q: Act, s: Act },
}

struct Linear {
    input: LinearInput,
    k: usize,
    /// Weight rows in all.
    n: usize,
    weights: Weights,
    glu: Option<Activation>,
    residual: Option<Act>,
    out: Act,
    /// Produces the `logits` output.
    head: bool,
}

enum Operand {
    Act(Act),
    Const(Vec<f32>),
}

enum Kernel {
    Embed {
        ids: IntInput,
        table: Bytes,
        encoding: Encoding,
        vocab: usize,
        h: usize,
        out: Act,
    },
    RmsNorm {
        x: Act,
        gain: Vec<f32>,
        eps: f32,
        out: Act,
    },
    QuantAct {
        x: Act,
        q: Act,
        s: Act,
    },
    Linear(Box<Linear>),
    Binary {
        a: Act,
        b: Operand,
        out: Act,
        mul: bool,
    },
    Act {
        x: Act,
        act: Activation,
        out: Act,
    },
    Copy {
        x: Act,
        out: Act,
        bytes: usize,
    },
    Split {
        x: Act,
        outs: Vec<(Act, usize)>,
    },
    Rope {
        x: Act,
        pos: IntInput,
        out: Act,
        heads: usize,
        d: usize,
        theta: f32,
        neox: bool,
        dims: usize,
    },
    KvAppend {
        k: Act,
        v: Act,
        layer: usize,
    },
    Attention {
        q: Act,
        layer: usize,
        out: Act,
        h: usize,
        scale: f32,
        kq: HalfPath,
        kqv: HalfPath,
    },
    /// Copies the `logits` rows out of the arena (when no linear step writes them directly).
    Logits {
        x: Act,
    },
    Nop,
}

/// One KV cache layer's shape and element type.
#[derive(Clone, Copy, Debug)]
struct KvLayout {
    g: usize,
    d: usize,
    f16: bool,
    /// The values are grouped in runs ([`ValueRuns`]): every attention on the layer is
    /// [`Executor::attention_phased`].
    runs: bool,
}

/// Where the values live in an f16 cache layer grouped in runs ([`KvLayout::runs`]): per KV
/// head, slices of 32 dimensions (the last one narrower), each slice's rows grouped by
/// position modulo 64 (ggml's GEMV chains; tinyBLAS's sixteen are four of them each), `run`
/// rows per group ([`value_row`]). A pass of the chains kernel over a few chains then reads runs of memory
/// instead of a line here and there.
#[derive(Clone, Copy, Debug)]
struct ValueRuns {
    d: usize,
    run: usize,
}

impl ValueRuns {
    fn new(capacity: usize, d: usize) -> ValueRuns {
        ValueRuns {
            d,
            run: capacity.div_ceil(64),
        }
    }

    /// Values per KV head.
    fn head(&self) -> usize {
        64 * self.run * self.d
    }

    /// KV head `kvh`'s slice of dimensions from `dim0` (a multiple of 32): where it starts,
    /// and its width (the distance between its rows).
    fn slice(&self, kvh: usize, dim0: usize) -> (usize, usize) {
        (
            kvh * self.head() + dim0 * 64 * self.run,
            (self.d - dim0).min(32),
        )
    }
}

/// Per-kernel counters for `--trace-kernels`.
#[derive(Default)]
struct Counter {
    calls: AtomicU64,
    nanos: AtomicU64,
}

/// One line of the kernel trace.
#[derive(Clone, Debug)]
pub struct TraceLine {
    pub kernel: String,
    pub variant: String,
    pub calls: u64,
    pub seconds: f64,
}

/// A plan compiled for this host.
pub struct Executor {
    kernels: Vec<Kernel>,
    labels: Vec<(String, String)>,
    counters: Vec<Counter>,
    trace: bool,
    pool: Pool,
    per_token: usize,
    batch: usize,
    kv: Vec<KvLayout>,
    vocab: usize,
    choices: Vec<TernaryChoice>,
    half: HalfDots,
    quant: (&'static str, QuantFn),
    max_k: usize,
    max_rope: usize,
    _weights: Arc<dyn WeightSource + Send + Sync>,
    // Boxed: weight references point at the shapes, which must not move when the Vec grows.
    #[allow(clippy::vec_box)]
    _owned: (Vec<Vec<u8>>, Vec<Box<[u64; 2]>>),
    /// The head's weight buffer and its re-encoded parts (`lm_head`).
    reencoded_head: Option<HeadParts>,
    /// Weights in a kernel's layout: name, layout, bytes.
    packed: Vec<(String, &'static str, Bytes)>,
}

/// The layout of weights read by the table-lookup ternary kernel ([`lut::repack`]).
pub const LUT_LAYOUT: &str = "lut16";

type HeadParts = (usize, BufferId, Vec<(String, Encoding, [u64; 2], Bytes)>);

// SAFETY: the raw pointers point into the weight source, which is immutable and owned (via
// the Arc) by the executor.
unsafe impl Send for Executor {}
unsafe impl Sync for Executor {}

/// Rows per chunk of a linear step: each worker computes its rows this many at a time.
const CHUNK: usize = 64;

/// Rows of a Q8_0/Q4_0/Q4_1 matrix that every token of a step meets before the next rows (a
/// tile in L1: 32 rows of 576 values are 11.5 KB in Q4_1).
const BLOCK_ROW_TILE: usize = 32;

/// Per-worker scratch.
#[derive(Default)]
struct Local {
    sums: Vec<i32>,
    y: Vec<f32>,
    y2: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    acc64: Vec<f64>,
    row: Vec<f32>,
    qh: Vec<f32>,
    /// The generic matmul's decoded weight row.
    matmul: RowScratch,
}

/// A 64-byte-aligned, zero-initialized byte buffer (lazily backed by the OS when large).
struct Arena {
    ptr: *mut u8,
    len: usize,
}

impl Arena {
    fn new(len: usize) -> Arena {
        if len == 0 {
            return Arena {
                ptr: std::ptr::null_mut(),
                len: 0,
            };
        }
        let layout =
            std::alloc::Layout::from_size_align(len, 64).expect("arena size fits a layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Arena { ptr, len }
    }
}

// SAFETY: the arena owns its allocation, which nothing outside it points into; moving it to
// another thread moves that ownership (a `Box<[u8]>` with an alignment).
unsafe impl Send for Arena {}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    std::alloc::Layout::from_size_align_unchecked(self.len, 64),
                )
            };
        }
    }
}

/// One cache layer's keys and values, `[capacity, g, d]` each.
enum KvData {
    F16(Vec<u16>, Vec<u16>),
    F32(Vec<f32>, Vec<f32>),
}

type RopeTable = ((u32, usize), Vec<(f32, f32)>);

/// Which sequence each token of a step belongs to, and where.
struct Seqs<'a> {
    /// Per token, its sequence's cache; `None`: one sequence.
    seq_of: Option<&'a [usize]>,
    /// Per token, its position in its sequence.
    pos: &'a [i32],
    /// Float paths as in a one-token step (a batched decode step).
    single_paths: bool,
}

impl Seqs<'_> {
    fn seq(&self, token: usize) -> usize {
        self.seq_of.map_or(0, |of| of[token])
    }
}

/// Floats of attention scores a step computes at once (8 MiB): tokens are taken in chunks of
/// as many as fit, so a long prompt's scores need no buffer of its length squared.
const ATTENTION_SCORES: usize = 1 << 21;

/// Keys per item of the phased attention's score pass.
const KEY_BLOCK: usize = 256;

/// Steps of at most this many tokens run the ternary one-token kernel once per token.
const GEMV_MAX_TOKENS: usize = 4;

/// One sequence's KV cache, and the f32 copy of one layer's values its attention step reads.
#[derive(Default)]
struct SeqCache {
    kv: Vec<KvData>,
    v32: Vec<f32>,
}

/// A session's mutable state for the executor: the arena, scratch and the KV cache.
pub struct State {
    arena: Arena,
    xn: Vec<f32>,
    q8: Vec<i8>,
    qs: Vec<f32>,
    qsum: Vec<i32>,
    qd: Vec<f32>,
    qsm: Vec<f32>,
    /// Per token: the table-lookup kernel's tables (empty unless it is bound somewhere).
    lut: Vec<u8>,
    /// Per (theta bits, dims): each token's (cos, sin) pairs for this step.
    rope: Vec<RopeTable>,
    rope_valid: Vec<bool>,
    locals: Vec<Mutex<Local>>,
    /// Attention over f16 caches with vector kernels: a chunk of tokens' scores (each
    /// (token, head) row `capacity` rounded up to 32 long) and their queries rounded.
    attn_scores: Vec<f32>,
    attn_q: Vec<f32>,
    /// The generic matmul's prepared activations, one per part of a linear step.
    generic: Vec<MatmulActs>,
    /// A step's token ids and positions (`batch` of each, reused by every step).
    ids: Vec<i32>,
    pos: Vec<i32>,
    cache: SeqCache,
    capacity: usize,
    len: usize,
}

impl State {
    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps the first `n` positions.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
}

/// A linear step's prepared activations, shared read-only by the workers.
#[derive(Clone, Copy)]
struct Prepared {
    /// f32 rows (normalized, rounded where the path rounds).
    x: *const f32,
    /// int8 rows: bitnet.cpp's per-token quantization, or Q8 blocks.
    q: *const i8,
    /// Per token: the int8 multiplier (I2_S).
    s: *const f32,
    /// Per token: `Σ q` (I2_S).
    qsum: *const i32,
    /// Per Q8 block: scale and `d·Σq`.
    qd: *const f32,
    qsm: *const f32,
    /// The number of tokens whose paths (gemv or gemm rounding) the float dots follow.
    path_tn: usize,
    /// Per token: the table-lookup kernel's tables (when it is bound).
    lut: *const u8,
}

// SAFETY: the pointed-to scratch is written before the workers start and only read by them.
unsafe impl Send for Prepared {}
unsafe impl Sync for Prepared {}

/// A pointer that may be shared by workers writing disjoint parts.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so that closures capture the whole `Shared`).
    fn get(self) -> *mut T {
        self.0
    }
}

fn step_err(step: usize, op: &Op, message: impl Into<String>) -> ExecError {
    ExecError::Step {
        step,
        op: op.name(),
        message: message.into(),
    }
}

impl Executor {
    /// Binds `plan` to `weights` and to kernels for this host.
    pub fn new(
        plan: &Plan,
        weights: Arc<dyn WeightSource + Send + Sync>,
        opts: &ExecOptions,
    ) -> Result<Executor, ExecError> {
        let per_token = plan.arena_bytes_per_token.ok_or(ExecError::Unplanned)? as usize;
        let pool = Pool::new(opts.threads).map_err(ExecError::Threads)?;
        let src: &(dyn WeightSource + Send + Sync) = weights.as_ref();
        let mut b = Builder {
            plan,
            src,
            kernels: Vec::new(),
            labels: Vec::new(),
            kv: Vec::new(),
            cache_of: HashMap::new(),
            choices: Vec::new(),
            set: opts.kernels,
            max_k: 0,
            max_rope: 0,
            vocab: 0,
            half: HalfDots::select(opts.kernels == KernelSet::Baseline),
            pool: &pool,
            lm_head: opts.lm_head,
            bindings: opts.bindings.clone(),
            head: None,
            packed: Vec::new(),
            owned: Vec::new(),
            owned_shapes: Vec::new(),
        };
        let logits_buffer = plan.steps.iter().find_map(|s| match &s.op {
            Op::Output { name } if name == "logits" => s.operands.first().copied(),
            _ => None,
        });
        for (i, step) in plan.steps.iter().enumerate() {
            let head = logits_buffer.is_some() && step.results.first().copied() == logits_buffer;
            let (kernel, label) = b.kernel(i, step, head)?;
            b.kernels.push(kernel);
            b.labels.push(label);
        }
        if logits_buffer.is_none() {
            return Err(ExecError::Run("the plan has no `logits` output".into()));
        }
        let counters = (0..b.kernels.len()).map(|_| Counter::default()).collect();
        let Builder {
            kernels,
            labels,
            kv,
            choices,
            max_k,
            max_rope,
            vocab,
            half,
            owned,
            owned_shapes,
            head: reencoded_head,
            packed,
            ..
        } = b;
        let mut exec = Executor {
            kernels,
            labels,
            counters,
            trace: opts.trace,
            pool,
            per_token,
            batch: opts.batch.max(1),
            kv,
            vocab,
            choices,
            half,
            quant: select_quant(opts.kernels == KernelSet::Baseline),
            max_k,
            max_rope,
            _weights: weights,
            _owned: (owned, owned_shapes),
            reencoded_head,
            packed,
        };
        for layer in 0..exec.kv.len() {
            let paths: Vec<_> = exec.attentions().filter(|a| a.0 == layer).collect();
            exec.kv[layer].runs = !paths.is_empty()
                && paths
                    .iter()
                    .all(|&(_, _, kq, kqv)| exec.phased(layer, kq, kqv));
        }
        Ok(exec)
    }

    /// Bytes of KV cache per position (every layer's keys and values).
    pub fn kv_bytes_per_position(&self) -> u64 {
        self.kv
            .iter()
            .map(|l| (2 * l.g * l.d * if l.f16 { 2 } else { 4 }) as u64)
            .sum()
    }

    /// Bytes of a session's step arena (room for a whole batch).
    pub fn arena_bytes(&self) -> u64 {
        (self.per_token * self.batch) as u64
    }

    /// Bytes of weights the executor made itself (a re-encoded head, repacked weights).
    pub fn owned_weight_bytes(&self) -> u64 {
        self._owned.0.iter().map(|v| v.len() as u64).sum()
    }

    /// The kernels bound per ternary weight shape, by name.
    pub fn ternary_bindings(&self) -> Vec<TernaryBinding> {
        self.choices
            .iter()
            .map(|c| TernaryBinding {
                k: c.k,
                n: c.n,
                gemv: c.gemv.name(),
                gemm: c.gemm.name(),
            })
            .collect()
    }

    /// Weights the executor reads in a kernel's own layout: (name, layout, bytes).
    pub fn packed_weights(&self) -> Vec<(String, &'static str, &[u8])> {
        self.packed
            .iter()
            .map(|(name, layout, b)| {
                // SAFETY: owned by the executor or its weight source, both immutable.
                let bytes = unsafe { std::slice::from_raw_parts(b.ptr, b.len) };
                (name.clone(), *layout, bytes)
            })
            .collect()
    }

    /// The head re-encoded at load time, when `lm_head` asked for it.
    pub fn reencoded_head(&self) -> Option<ReencodedHead<'_>> {
        let (step, buffer, parts) = self.reencoded_head.as_ref()?;
        Some(ReencodedHead {
            step: *step,
            buffer: *buffer,
            parts: parts
                .iter()
                .map(|(name, enc, shape, b)| {
                    // SAFETY: the bytes are owned by the executor (`_owned`) and immutable.
                    let bytes = unsafe { std::slice::from_raw_parts(b.ptr, b.len) };
                    (name.clone(), *enc, *shape, bytes)
                })
                .collect(),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Most tokens per step.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The ternary kernels chosen, one per row length, with their timings.
    pub fn ternary_choices(&self) -> &[TernaryChoice] {
        &self.choices
    }

    /// Logits per row.
    /// Weight bytes a one-token step reads: every linear step's weights (an output
    /// projection that runs for the last token only included).
    pub fn weight_bytes_per_token(&self) -> u64 {
        self.kernels
            .iter()
            .map(|k| match k {
                Kernel::Linear(l) => match &l.weights {
                    Weights::Ternary { parts, .. } => {
                        parts.iter().map(|p| (p.1 * l.k / 4) as u64).sum()
                    }
                    Weights::F16 { parts, .. } => {
                        parts.iter().map(|p| (p.1 * l.k * 2) as u64).sum()
                    }
                    Weights::Blocks { parts, enc, .. } => parts
                        .iter()
                        .map(|p| (p.1 * l.k / 32 * enc.block_bytes()) as u64)
                        .sum(),
                    Weights::Generic { parts, .. } => {
                        parts.iter().map(|p| p.bytes.len as u64).sum()
                    }
                },
                _ => 0,
            })
            .sum()
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    fn block_bytes(&self, w: &Weights) -> usize {
        match w {
            Weights::Blocks { enc, .. } => enc.block_bytes(),
            _ => 0,
        }
    }

    /// The f16 dot variant bound.
    pub fn half_variant(&self) -> &'static str {
        self.half.variant
    }

    /// The phased attention's scratch for a context of `capacity`: scores for at least one
    /// token's heads, for as many tokens as fit in [`ATTENTION_SCORES`] (up to the batch), and
    /// their rounded queries. Empty where no layer runs that way.
    fn attention_scratch(&self, capacity: usize) -> (Vec<f32>, Vec<f32>) {
        let heads = self
            .attentions()
            .filter(|&(layer, _, kq, kqv)| self.phased(layer, kq, kqv))
            .map(|(_, h, _, _)| h)
            .max()
            .unwrap_or(0);
        if heads == 0 {
            return (Vec::new(), Vec::new());
        }
        let row = capacity.next_multiple_of(32);
        let rows = (ATTENTION_SCORES / row).clamp(heads, self.batch * heads);
        let d = self.kv.iter().map(|l| l.d).max().unwrap_or(0);
        (vec![0.0; rows * row], vec![0.0; rows * d])
    }

    /// Each attention step's layer, query heads and dot paths.
    fn attentions(&self) -> impl Iterator<Item = (usize, usize, HalfPath, HalfPath)> + '_ {
        self.kernels.iter().filter_map(|k| match k {
            Kernel::Attention {
                layer, h, kq, kqv, ..
            } => Some((*layer, *h, *kq, *kqv)),
            _ => None,
        })
    }

    /// Whether attention on `layer` along these paths runs [`Executor::attention_phased`]:
    /// an f16 cache, dimensions in sixteens, f16 dot paths, and the host's chains kernel.
    fn phased(&self, layer: usize, kq: HalfPath, kqv: HalfPath) -> bool {
        let l = self.kv[layer];
        self.half.chains.is_some()
            && l.f16
            && l.d.is_multiple_of(16)
            && kq != HalfPath::F32
            && kqv != HalfPath::F32
    }

    /// Fresh state for a sequence of up to `capacity` positions.
    pub fn state(&self, capacity: usize) -> State {
        let t = self.batch;
        let kv = self
            .kv
            .iter()
            .map(|l| {
                let n = capacity * l.g * l.d;
                if l.runs {
                    KvData::F16(
                        vec![0; n],
                        vec![0; l.g * ValueRuns::new(capacity, l.d).head()],
                    )
                } else if l.f16 {
                    KvData::F16(vec![0; n], vec![0; n])
                } else {
                    KvData::F32(vec![0.0; n], vec![0.0; n])
                }
            })
            .collect();
        let (attn_scores, attn_q) = self.attention_scratch(capacity);
        State {
            attn_scores,
            attn_q,
            arena: Arena::new(self.per_token * t),
            xn: vec![0.0; t * self.max_k],
            q8: vec![0; t * self.max_k],
            qs: vec![0.0; t],
            qsum: vec![0; t],
            qd: vec![0.0; t * self.max_k / 32],
            qsm: vec![0.0; t * self.max_k / 32],
            lut: if self.choices.iter().any(|c| c.lut().is_some()) {
                vec![0; t * lut::table_bytes(self.max_k)]
            } else {
                Vec::new()
            },
            rope: Vec::new(),
            rope_valid: Vec::new(),
            locals: (0..self.threads())
                .map(|_| {
                    Mutex::new(Local {
                        sums: vec![0; CHUNK * t],
                        y: vec![0.0; CHUNK * t],
                        y2: vec![0.0; CHUNK * t],
                        scores: vec![0.0; capacity.next_multiple_of(64) + 64],
                        acc: Vec::new(),
                        acc64: Vec::new(),
                        row: vec![0.0; self.max_k.max(self.max_rope)],
                        qh: vec![0.0; self.max_k.max(self.max_rope)],
                        matmul: RowScratch::default(),
                    })
                })
                .collect(),
            generic: Vec::new(),
            ids: Vec::with_capacity(t),
            pos: Vec::with_capacity(t),
            cache: SeqCache {
                kv,
                // Only for the f16 layers the phased attention does not take.
                v32: vec![
                    0.0;
                    capacity
                        * self
                            .attentions()
                            .filter(|&(layer, _, kq, kqv)| {
                                self.kv[layer].f16 && !self.phased(layer, kq, kqv)
                            })
                            .map(|(layer, ..)| self.kv[layer].g * self.kv[layer].d)
                            .max()
                            .unwrap_or(0)
                ],
            },
            capacity,
            len: 0,
        }
    }

    /// Sets the kernel trace's counts back to zero (work before a measurement).
    pub fn reset_trace(&self) {
        for c in &self.counters {
            c.calls.store(0, Ordering::Relaxed);
            c.nanos.store(0, Ordering::Relaxed);
        }
    }

    /// The kernel trace: per kernel label and variant, calls and time (with `trace` on).
    pub fn trace(&self) -> Vec<TraceLine> {
        let mut lines: Vec<TraceLine> = Vec::new();
        for ((kernel, variant), c) in self.labels.iter().zip(&self.counters) {
            if variant == "-" {
                continue;
            }
            let calls = c.calls.load(Ordering::Relaxed);
            if calls == 0 {
                continue;
            }
            let seconds = c.nanos.load(Ordering::Relaxed) as f64 * 1e-9;
            match lines
                .iter_mut()
                .find(|l| &l.kernel == kernel && &l.variant == variant)
            {
                Some(l) => {
                    l.calls += calls;
                    l.seconds += seconds;
                }
                None => lines.push(TraceLine {
                    kernel: kernel.clone(),
                    variant: variant.clone(),
                    calls,
                    seconds,
                }),
            }
        }
        lines.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        lines
    }

    /// Evaluates `tokens` at positions `state.len()..`, in steps of at most `batch` tokens;
    /// writes the requested logits rows to `out` (`vocab` values per row).
    pub fn eval(
        &self,
        state: &mut State,
        tokens: &[u32],
        rows: LogitRows,
        out: &mut Vec<f32>,
    ) -> Result<(), ExecError> {
        if tokens.len() > state.capacity - state.len {
            return Err(ExecError::Run(format!(
                "the context holds {} positions, {} are used, and {} more are needed",
                state.capacity,
                state.len,
                tokens.len()
            )));
        }
        out.clear();
        let (mut ids, mut pos) = (
            std::mem::take(&mut state.ids),
            std::mem::take(&mut state.pos),
        );
        for (c, chunk) in tokens.chunks(self.batch).enumerate() {
            let last_chunk = (c + 1) * self.batch >= tokens.len();
            ids.clear();
            ids.extend(chunk.iter().map(|&t| t.min(i32::MAX as u32) as i32));
            pos.clear();
            pos.extend((0..chunk.len()).map(|i| (state.len + i) as i32));
            let want = match rows {
                LogitRows::All => Some(LogitRows::All),
                LogitRows::Last if last_chunk => Some(LogitRows::Last),
                LogitRows::Last => None,
            };
            let mut caches = [std::mem::take(&mut state.cache)];
            let r = self.step(state, &mut caches, None, &ids, &pos, false, want, out);
            state.cache = std::mem::take(&mut caches[0]);
            if r.is_err() {
                (state.ids, state.pos) = (ids, pos);
                return r;
            }
            state.len += chunk.len();
        }
        (state.ids, state.pos) = (ids, pos);
        Ok(())
    }

    /// One decode step of several sequences at once: `tokens[i]` at position `states[i].len()`
    /// of sequence `i`. Writes one logits row per sequence to `out`. The step computes every
    /// token-wise operation over all the tokens together (one pass over the weights) and each
    /// token's attention in its own KV cache; every float path that depends on a step's size
    /// follows the one-token step, so each row is bit-identical to evaluating that token alone
    /// with [`Executor::eval`]. More sequences than a step holds take several steps.
    pub fn eval_batch(
        &self,
        states: &mut [&mut State],
        tokens: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<(), ExecError> {
        let n = tokens.len();
        if n != states.len() || n == 0 {
            return Err(ExecError::Run(format!(
                "a batched step takes one token per sequence: {n} tokens for {} sequences",
                states.len()
            )));
        }
        let capacity = states[0].capacity;
        for (i, st) in states.iter().enumerate() {
            if st.capacity != capacity {
                return Err(ExecError::Run(format!(
                    "sequence {i} holds {} positions, sequence 0 {capacity}: a batched step \
                     needs states of one size",
                    st.capacity
                )));
            }
            if st.len >= st.capacity {
                return Err(ExecError::Run(format!(
                    "sequence {i}: the context holds {} positions and all are used",
                    st.capacity
                )));
            }
        }
        out.clear();
        // More sequences than a step holds: one step per `batch` of them, rows appended.
        for (states, tokens) in states.chunks_mut(self.batch).zip(tokens.chunks(self.batch)) {
            let ids: Vec<i32> = tokens
                .iter()
                .map(|&t| t.min(i32::MAX as u32) as i32)
                .collect();
            let pos: Vec<i32> = states.iter().map(|st| st.len as i32).collect();
            let seq_of: Vec<usize> = (0..tokens.len()).collect();
            let mut caches: Vec<SeqCache> = states
                .iter_mut()
                .map(|st| std::mem::take(&mut st.cache))
                .collect();
            let r = self.step(
                states[0],
                &mut caches,
                Some(&seq_of),
                &ids,
                &pos,
                true,
                Some(LogitRows::All),
                out,
            );
            for (st, cache) in states.iter_mut().zip(caches) {
                st.cache = cache;
            }
            r?;
            for st in states.iter_mut() {
                st.len += 1;
            }
        }
        Ok(())
    }

    /// One step of `ids` at positions `pos`, computed in `st`'s arena and scratch. Token `i`
    /// belongs to the sequence of `caches[seq_of[i]]` (all to `caches[0]` when `seq_of` is
    /// `None`); with `single_paths`, float paths are those of a one-token step.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        st: &mut State,
        caches: &mut [SeqCache],
        seq_of: Option<&[usize]>,
        ids: &[i32],
        pos: &[i32],
        single_paths: bool,
        rows: Option<LogitRows>,
        out: &mut Vec<f32>,
    ) -> Result<(), ExecError> {
        let t = ids.len();
        for v in &mut st.rope_valid {
            *v = false;
        }
        let seqs = Seqs {
            seq_of,
            pos,
            single_paths,
        };
        for (i, kernel) in self.kernels.iter().enumerate() {
            let t0 = self.trace.then(Instant::now);
            self.run_kernel(i, kernel, st, caches, &seqs, ids, t, rows, out)?;
            if let Some(t0) = t0 {
                self.counters[i].calls.fetch_add(1, Ordering::Relaxed);
                self.counters[i]
                    .nanos
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_kernel(
        &self,
        index: usize,
        kernel: &Kernel,
        st: &mut State,
        caches: &mut [SeqCache],
        seqs: &Seqs<'_>,
        ids: &[i32],
        t: usize,
        rows: Option<LogitRows>,
        out: &mut Vec<f32>,
    ) -> Result<(), ExecError> {
        let pos = seqs.pos;
        let base = st.arena.ptr;
        // SAFETY (all arena accessors): the arena holds `batch` tokens of every buffer at the
        // planned offsets, and `t <= batch`; the plan's memory check keeps live buffers apart.
        let f32p = |a: &Act| unsafe { base.add(t * a.off) as *mut f32 };
        let int = |i: &IntInput| match i {
            IntInput::Tokens => ids,
            IntInput::Positions => pos,
        };
        match kernel {
            Kernel::Nop => {}
            Kernel::Embed {
                ids: which,
                table,
                encoding,
                vocab,
                h,
                out: o,
            } => {
                let dst = f32p(o);
                for (i, &id) in int(which).iter().enumerate() {
                    if id < 0 || id as usize >= *vocab {
                        return Err(ExecError::Run(format!(
                            "token {id} at index {i} is outside the vocabulary of {vocab}"
                        )));
                    }
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.add(i * h), *h) };
                    encoding
                        .decode_range(
                            table.get(),
                            (*vocab * *h) as u64,
                            (id as usize * h) as u64,
                            row,
                        )
                        .map_err(|e| ExecError::Run(e.to_string()))?;
                }
            }
            Kernel::RmsNorm {
                x,
                gain,
                eps,
                out: o,
            } => {
                let (src, dst) = (f32p(x), f32p(o));
                for i in 0..t {
                    let xr = unsafe { std::slice::from_raw_parts(src.add(i * x.row), x.row) };
                    let tmp = &mut st.xn[..x.row];
                    numerics::rms_norm(xr, gain, *eps, tmp);
                    unsafe {
                        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(i * o.row), o.row)
                    };
                }
            }
            Kernel::QuantAct { x, q, s } => {
                let (src, qd, sd) = (f32p(x), unsafe { base.add(t * q.off) as *mut i8 }, f32p(s));
                for i in 0..t {
                    let xr = unsafe { std::slice::from_raw_parts(src.add(i * x.row), x.row) };
                    let qr = unsafe { std::slice::from_raw_parts_mut(qd.add(i * x.row), x.row) };
                    unsafe { *sd.add(i) = numerics::quant_act_i8(xr, qr) };
                }
            }
            Kernel::Linear(l) => {
                if l.head {
                    match rows {
                        None => {}
                        Some(r) => self.linear(index, l, st, t, seqs.single_paths, r, out)?,
                    }
                } else {
                    self.linear(index, l, st, t, seqs.single_paths, LogitRows::All, out)?;
                }
            }
            Kernel::Binary { a, b, out: o, mul } => {
                let (pa, po) = (f32p(a), f32p(o));
                let n = t * a.row;
                for i in 0..n {
                    let y = match b {
                        Operand::Const(c) if c.len() == 1 => c[0],
                        Operand::Const(c) => c[i % c.len()],
                        Operand::Act(bb) => unsafe { *f32p(bb).add(i) },
                    };
                    unsafe {
                        let x = *pa.add(i);
                        *po.add(i) = if *mul { x * y } else { x + y };
                    }
                }
            }
            Kernel::Act { x, act, out: o } => {
                let f = activation(*act);
                let (px, po) = (f32p(x), f32p(o));
                for i in 0..t * x.row {
                    unsafe { *po.add(i) = f(*px.add(i)) };
                }
            }
            Kernel::Copy { x, out: o, bytes } => {
                let (px, po) = (f32p(x) as *const u8, f32p(o) as *mut u8);
                if px != po {
                    unsafe { std::ptr::copy(px, po, t * bytes) };
                }
            }
            Kernel::Split { x, outs } => {
                let px = f32p(x);
                for (o, start) in outs {
                    let po = f32p(o);
                    for i in 0..t {
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                px.add(i * x.row + start),
                                po.add(i * o.row),
                                o.row,
                            )
                        };
                    }
                }
            }
            Kernel::Rope {
                x,
                pos: which,
                out: o,
                heads,
                d,
                theta,
                neox,
                dims,
            } => {
                let key = (theta.to_bits(), *dims);
                let slot = match st.rope.iter().position(|(k, _)| *k == key) {
                    Some(s) => s,
                    None => {
                        st.rope
                            .push((key, Vec::with_capacity(self.batch * dims / 2)));
                        st.rope_valid.push(false);
                        st.rope.len() - 1
                    }
                };
                if !st.rope_valid[slot] {
                    let table = &mut st.rope[slot].1;
                    table.resize(t * dims / 2, (0.0, 0.0));
                    for (i, &ps) in int(which).iter().enumerate() {
                        numerics::rope_cache_into(
                            ps,
                            *theta,
                            *dims,
                            &mut table[i * dims / 2..(i + 1) * dims / 2],
                        );
                    }
                    st.rope_valid[slot] = true;
                }
                let table = &st.rope[slot].1;
                let (px, po) = (f32p(x), f32p(o));
                if px != po {
                    unsafe { std::ptr::copy(px, po, t * x.row) };
                }
                for i in 0..t {
                    let cache = &table[i * dims / 2..(i + 1) * dims / 2];
                    for hh in 0..*heads {
                        let head = unsafe {
                            std::slice::from_raw_parts_mut(po.add((i * heads + hh) * d), *d)
                        };
                        numerics::rope_head(head, cache, *neox);
                    }
                }
            }
            Kernel::KvAppend { k, v, layer } => {
                let l = self.kv[*layer];
                let n = t * l.g * l.d;
                let (pk, pv) = (f32p(k), f32p(v));
                let (ks, vs) = unsafe {
                    (
                        std::slice::from_raw_parts(pk, n),
                        std::slice::from_raw_parts(pv, n),
                    )
                };
                let (g, d, capacity) = (l.g, l.d, st.capacity);
                // The cache is head-major: head `kvh`'s rows are `capacity` positions apart
                // from the next head's, so attention reads each head's keys and values as
                // one contiguous run.
                for (tok, &p) in pos[..t].iter().enumerate() {
                    let seq = seqs.seq(tok);
                    for kvh in 0..g {
                        let at = (kvh * capacity + p as usize) * d;
                        let src = (tok * g + kvh) * d..(tok * g + kvh + 1) * d;
                        match &mut caches[seq].kv[*layer] {
                            KvData::F16(kc, vc) => {
                                // Round to nearest even, as f16::from_f32 (F16C when the host
                                // has it).
                                kc[at..at + d]
                                    .reinterpret_cast_mut::<f16>()
                                    .convert_from_f32_slice(&ks[src.clone()]);
                                if l.runs {
                                    let runs = ValueRuns::new(capacity, d);
                                    for dim0 in (0..d).step_by(32) {
                                        let (slice, w) = runs.slice(kvh, dim0);
                                        let at = slice + value_row(p as usize, runs.run) * w;
                                        vc[at..at + w]
                                            .reinterpret_cast_mut::<f16>()
                                            .convert_from_f32_slice(&vs[src.start + dim0..][..w]);
                                    }
                                } else {
                                    vc[at..at + d]
                                        .reinterpret_cast_mut::<f16>()
                                        .convert_from_f32_slice(&vs[src]);
                                }
                            }
                            KvData::F32(kc, vc) => {
                                kc[at..at + d].copy_from_slice(&ks[src.clone()]);
                                vc[at..at + d].copy_from_slice(&vs[src]);
                            }
                        }
                    }
                }
            }
            Kernel::Attention {
                q,
                layer,
                out: o,
                h,
                scale,
                kq,
                kqv,
            } => {
                let shape = (*layer, t, *h, *scale);
                self.attention(st, caches, seqs, f32p(q), f32p(o), shape, *kq, *kqv);
            }
            Kernel::Logits { x } => {
                if let Some(r) = rows {
                    let px = f32p(x);
                    let first = if r == LogitRows::Last { t - 1 } else { 0 };
                    let src = unsafe {
                        std::slice::from_raw_parts(px.add(first * x.row), (t - first) * x.row)
                    };
                    out.extend_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// A linear step: prologue (norm, quantization or rounding) per token, then the rows split
    /// over the workers, each computing chunks of rows and their epilogue (scales, GLU,
    /// residual) straight into the output.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        index: usize,
        l: &Linear,
        st: &mut State,
        t: usize,
        single_paths: bool,
        rows: LogitRows,
        out: &mut Vec<f32>,
    ) -> Result<(), ExecError> {
        let base = st.arena.ptr;
        let first = if rows == LogitRows::Last { t - 1 } else { 0 };
        let tn = t - first;
        let path_tn = if single_paths { 1 } else { tn };
        let k = l.k;
        // Prologue into st.xn (f32) or st.q8/qs (int8).
        let (x_ptr, q_ptr, s_ptr): (*const f32, *const i8, *const f32) = match &l.input {
            LinearInput::Quantized { q, s } => unsafe {
                let q_ptr = base.add(t * q.off + first * k) as *const i8;
                for i in 0..tn {
                    let qr = std::slice::from_raw_parts(q_ptr.add(i * k), k);
                    st.qsum[i] = qr.iter().map(|&v| v as i32).sum();
                }
                (
                    std::ptr::null(),
                    q_ptr,
                    (base.add(t * s.off) as *const f32).add(first),
                )
            },
            LinearInput::F32 { x, norm } => {
                let src = Shared(unsafe { (base.add(t * x.off) as *mut f32).add(first * k) });
                let ternary = matches!(l.weights, Weights::Ternary { .. });
                let blocks = matches!(l.weights, Weights::Blocks { .. });
                let path = match &l.weights {
                    Weights::F16 { half, .. } => half.path(path_tn),
                    _ => DotPath::F32,
                };
                // The interpreter's half_dot rounds for GEMV, for gemm16, and for a GEMM that
                // falls back to GEMV (rows not a multiple of 16).
                let round = match path {
                    DotPath::Gemv => true,
                    DotPath::Gemm { round } => round || !k.is_multiple_of(16),
                    DotPath::F32 => false,
                };
                let needs_copy = norm.is_some() || round;
                let xn = Shared(st.xn.as_mut_ptr());
                let q8 = Shared(st.q8.as_mut_ptr());
                let qd = Shared(st.qd.as_mut_ptr());
                let qsm = Shared(st.qsm.as_mut_ptr());
                let qs = Shared(st.qs.as_mut_ptr());
                let qsum = Shared(st.qsum.as_mut_ptr());
                let prologue = |i: usize| unsafe {
                    let xr = std::slice::from_raw_parts(src.get().add(i * k), k);
                    let dst = std::slice::from_raw_parts_mut(xn.get().add(i * k), k);
                    match norm {
                        Some((gain, eps)) => numerics::rms_norm(xr, gain, *eps, dst),
                        None if needs_copy || ternary || blocks => dst.copy_from_slice(xr),
                        None => {}
                    }
                    if ternary {
                        let qr = std::slice::from_raw_parts_mut(q8.get().add(i * k), k);
                        let (s, sum) = (self.quant.1)(dst, qr);
                        *qs.get().add(i) = s;
                        *qsum.get().add(i) = sum;
                    } else if blocks {
                        let nb = k / 32;
                        for b in 0..nb {
                            let qr =
                                std::slice::from_raw_parts_mut(q8.get().add(i * k + 32 * b), 32);
                            let (d, s) = numerics::quantize_q8_block(&dst[32 * b..32 * b + 32], qr);
                            *qd.get().add(i * nb + b) = d;
                            *qsm.get().add(i * nb + b) = s;
                        }
                    } else if round {
                        host::round_f16(dst);
                    }
                };
                if tn > 1 && self.threads() > 1 {
                    self.pool.run(&|w, n| {
                        for i in split(tn, w, n, 1) {
                            prologue(i);
                        }
                    });
                } else {
                    for i in 0..tn {
                        prologue(i);
                    }
                }
                let x_ptr = if norm.is_some() || ternary || blocks || needs_copy {
                    st.xn.as_ptr()
                } else {
                    src.get()
                };
                (x_ptr, st.q8.as_ptr(), st.qs.as_ptr())
            }
        };
        let qsum = Shared(st.qsum.as_mut_ptr());
        if let Weights::Ternary { choice, .. } = &l.weights
            && self.choices[*choice].lut().is_some()
        {
            let tb = lut::table_bytes(k);
            let tables = Shared(st.lut.as_mut_ptr());
            let qp = Shared(q_ptr as *mut i8);
            let build = |i: usize| unsafe {
                let q = std::slice::from_raw_parts(qp.get().add(i * k), k);
                let t = std::slice::from_raw_parts_mut(tables.get().add(i * tb), tb);
                lut::build_tables(q, t);
            };
            if tn > 1 && self.threads() > 1 {
                self.pool.run(&|w, n| split(tn, w, n, 1).for_each(build));
            } else {
                (0..tn).for_each(build);
            }
        }
        // Output: the arena, or the caller's logits for the head.
        let n_out = if l.glu.is_some() { l.n / 2 } else { l.n };
        let (dst, dst_stride) = if l.head {
            let at = out.len();
            out.resize(at + tn * n_out, 0.0);
            (Shared(unsafe { out.as_mut_ptr().add(at) }), n_out)
        } else {
            (
                Shared(unsafe { (base.add(t * l.out.off) as *mut f32).add(first * n_out) }),
                l.out.row,
            )
        };
        let residual = l
            .residual
            .map(|r| unsafe { (base.add(t * r.off) as *const f32).add(first * r.row) });
        let residual = residual.map(|r| Shared(r as *mut f32));
        // The generic matmul's activations, in the state's reusable buffers.
        let mut generic_acts = std::mem::take(&mut st.generic);
        if let Weights::Generic { parts, .. } = &l.weights {
            let x = unsafe { std::slice::from_raw_parts(x_ptr, tn * k) };
            if generic_acts.len() < parts.len() {
                generic_acts.resize_with(parts.len(), MatmulActs::default);
            }
            for (acts, part) in generic_acts.iter_mut().zip(parts) {
                if let Err(m) = acts.prepare(x, &part.weight_ref()) {
                    st.generic = generic_acts;
                    return Err(ExecError::Run(format!("{}: {m}", self.labels[index].0)));
                }
            }
        }
        let failure: Mutex<Option<String>> = Mutex::new(None);
        let prepared = Prepared {
            x: x_ptr,
            q: q_ptr,
            s: s_ptr,
            qsum: qsum.get(),
            qd: st.qd.as_ptr(),
            qsm: st.qsm.as_ptr(),
            path_tn,
            lut: st.lut.as_ptr(),
        };
        let half_rows = if l.glu.is_some() { l.n / 2 } else { l.n };
        let locals = &st.locals;
        let job = |w: usize, nw: usize| {
            let mut local = locals[w].lock().unwrap_or_else(|e| e.into_inner());
            let Local {
                sums,
                y,
                y2,
                matmul,
                ..
            } = &mut *local;
            let range = split(half_rows, w, nw, 16);
            let mut r = range.start;
            while r < range.end {
                let c = (range.end - r).min(CHUNK);
                let mut produce = |row0: usize, into: &mut [f32]| -> Result<(), String> {
                    let scratch = (sums.as_mut_slice(), &mut *matmul);
                    self.rows_f32(l, row0, c, tn, k, prepared, &generic_acts, scratch, into)
                };
                if let Err(e) = produce(r, y) {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    return;
                }
                if let Some(act) = l.glu {
                    if let Err(e) = produce(l.n / 2 + r, y2) {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                    host::glu(act, &mut y[..tn * c], &y2[..tn * c]);
                }
                for i in 0..tn {
                    for j in 0..c {
                        let mut v = y[i * c + j];
                        if let Some(res) = residual {
                            v += unsafe { *res.get().add(i * n_out + r + j) };
                        }
                        unsafe { *dst.get().add(i * dst_stride + r + j) = v };
                    }
                }
                r += c;
            }
        };
        if self.threads() > 1 && half_rows >= 32 {
            self.pool.run(&job);
        } else {
            job(0, 1);
        }
        st.generic = generic_acts;
        match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(m) => Err(ExecError::Run(format!("{}: {m}", self.labels[index].0))),
            None => Ok(()),
        }
    }

    /// Rows `row0..row0+c` of a linear step's weight for `tn` tokens, as f32 into `into`
    /// (`[tn][c]`).
    #[allow(clippy::too_many_arguments)]
    fn rows_f32(
        &self,
        l: &Linear,
        row0: usize,
        c: usize,
        tn: usize,
        k: usize,
        p: Prepared,
        generic_acts: &[MatmulActs],
        (sums, matmul): (&mut [i32], &mut RowScratch),
        into: &mut [f32],
    ) -> Result<(), String> {
        match &l.weights {
            Weights::Ternary { parts, choice } => {
                let choice = &self.choices[*choice];
                // A few tokens (a batched decode step) run the one-token kernel once per token
                // where the GEMM kernel is AMX: on the 2B-4T shape with 4 tokens, measured on a
                // 2-core AVX-512/AMX host, the FFN up projection took 174 ms per 4 such steps
                // against 321 ms with AMX, whose tiles pay off on longer steps. The vector
                // GEMM kernels read each row once for all of them (with 4 tokens, one thread
                // of an AMD EPYC host without AMX: 0.83 ms per call of that projection token
                // by token, 0.39 ms through the AVX-512 VNNI tiles). The sums are the same
                // integers either way.
                let per_token = tn <= GEMV_MAX_TOKENS
                    && matches!(&choice.gemm, TernaryKernel::Native { name: "amx", .. });
                let kernel = if per_token {
                    &choice.gemv
                } else {
                    &choice.gemm
                };
                for_parts(parts.iter().map(|p| p.1), row0, c, |pi, local, n, col| {
                    let (bytes, _, _) = parts[pi];
                    let out0 = unsafe { sums.as_mut_ptr().add(col) };
                    let args = |i: usize, tokens: usize| RowsArgs {
                        w: unsafe { bytes.ptr.add(local * k / 4) },
                        row_bytes: k / 4,
                        rows: n,
                        q: unsafe { p.q.add(i * k) },
                        k,
                        tokens,
                        q_stride: k,
                        out: unsafe { out0.add(i * c) },
                        out_stride: c,
                    };
                    // SAFETY: the part holds `local + n` rows of k/4 bytes (checked when
                    // compiled), or their repacked groups for the table-lookup kernel, whose
                    // tables hold tn tokens; q holds tn rows of k; sums holds tn rows of c.
                    unsafe {
                        match choice.lut() {
                            Some(j) => j.run(
                                bytes.ptr,
                                local,
                                n,
                                p.lut,
                                lut::table_bytes(k),
                                p.qsum,
                                tn,
                                sums.as_mut_ptr().add(col),
                                c,
                            ),
                            None if per_token => {
                                for i in 0..tn {
                                    kernel.run(&args(i, 1));
                                }
                            }
                            None => kernel.run(&args(0, tn)),
                        }
                    };
                    let beta = parts[pi].2;
                    for i in 0..tn {
                        let (qs, qsum) = unsafe { (*p.s.add(i), *p.qsum.add(i)) };
                        for j in col..col + n {
                            into[i * c + j] =
                                numerics::i2s_epilogue(sums[i * c + j] - qsum, qs, beta);
                        }
                    }
                });
            }
            Weights::Blocks {
                parts, dot, gemm, ..
            } => {
                let bb = l.k / 32 * self.block_bytes(&l.weights);
                let blocks = k / 32;
                // Several tokens: every token over a tile of rows before the next tile, so
                // that the tile is read from memory once (each dot the same as alone).
                let tile = if tn > 1 { BLOCK_ROW_TILE } else { usize::MAX };
                for_parts(parts.iter().map(|p| p.1), row0, c, |pi, local, n, col| {
                    for j in (0..n).step_by(tile) {
                        let rows = tile.min(n - j);
                        let w = unsafe { parts[pi].0.ptr.add((local + j) * bb) };
                        if let Some(gemm) = gemm.filter(|_| tn > 1) {
                            // SAFETY: as below, for the tn tokens at once.
                            unsafe {
                                gemm(
                                    w,
                                    bb,
                                    rows,
                                    blocks,
                                    p.q,
                                    p.qd,
                                    p.qsm,
                                    tn,
                                    into.as_mut_ptr().add(col + j),
                                    c,
                                )
                            };
                            continue;
                        }
                        for i in 0..tn {
                            // SAFETY: the part holds `local + n` rows of `blocks` blocks; the
                            // activations hold tn rows; `into` holds tn rows of c.
                            unsafe {
                                dot(
                                    w,
                                    bb,
                                    rows,
                                    blocks,
                                    p.q.add(i * k),
                                    p.qd.add(i * blocks),
                                    p.qsm.add(i * blocks),
                                    into.as_mut_ptr().add(i * c + col + j),
                                )
                            };
                        }
                    }
                });
            }
            Weights::F16 { parts, half } => {
                let (dot, tokens) = match half.path(p.path_tn) {
                    DotPath::Gemm { .. } if k.is_multiple_of(16) => (self.half.gemm, None),
                    _ => (self.half.gemv, Some(self.half.gemv_tokens)),
                };
                for_parts(parts.iter().map(|p| p.1), row0, c, |pi, local, n, col| {
                    let w = parts[pi].0.ptr as *const u16;
                    for j in 0..n {
                        let wr = unsafe { w.add((local + j) * k) };
                        if let Some(tokens) = tokens.filter(|_| tn > 1) {
                            // Several tokens (batched decode steps): the row converted once
                            // for them, each dot the same as alone.
                            // SAFETY: a row of k f16 values; x holds tn rows of k; `into`
                            // holds tn rows of c.
                            unsafe { tokens(p.x, tn, wr, k, into.as_mut_ptr().add(col + j), c) };
                            continue;
                        }
                        for i in 0..tn {
                            // SAFETY: rows of k f16 values; x holds tn rows of k.
                            into[i * c + col + j] = unsafe { dot(p.x.add(i * k), wr, k) };
                        }
                    }
                });
            }
            Weights::Generic { parts, half } => {
                let path = half.path(p.path_tn);
                let mut failure = None;
                for_parts(
                    parts.iter().map(|p| p.shape[0] as usize),
                    row0,
                    c,
                    |pi, local, n, col| {
                        let w = parts[pi].weight_ref();
                        // SAFETY: x holds tn rows of k.
                        let x = unsafe { std::slice::from_raw_parts(p.x, tn * k) };
                        let res = matmul_rows(
                            &generic_acts[pi],
                            x,
                            &w,
                            path,
                            local..local + n,
                            matmul,
                            |tok, r, v| {
                                into[tok * c + col + r - local] = v;
                            },
                        );
                        if let Err(e) = res {
                            failure = Some(e);
                        }
                    },
                );
                if let Some(e) = failure {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Causal attention for `t` tokens after `p` cached positions, heads split over workers,
    /// with the interpreter's summation orders (see `interp::attention`).
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        st: &mut State,
        caches: &mut [SeqCache],
        seqs: &Seqs<'_>,
        q: *const f32,
        o: *mut f32,
        (layer, t, h, scale): (usize, usize, usize, f32),
        kq: HalfPath,
        kqv: HalfPath,
    ) {
        let l = self.kv[layer];
        let (g, d) = (l.g, l.d);
        let group = h / g;
        let path_t = if seqs.single_paths { 1 } else { t };
        let (kq_half, kqv_half) = (kq, kqv);
        let (kq, kqv) = if l.f16 {
            (kq.path(path_t), kqv.path(path_t))
        } else {
            (DotPath::F32, DotPath::F32)
        };
        if let (true, Some(chains)) = (self.phased(layer, kq_half, kqv_half), self.half.chains) {
            let shape = (layer, t, h, scale);
            return self.attention_phased(st, caches, seqs, q, o, shape, (kq, kqv), chains);
        }
        let (q, o) = (Shared(q as *mut f32), Shared(o));
        let half = self.half;
        let locals = &st.locals;
        let cap = st.capacity;
        // Values as f32, converted once per step and sequence (not once per query head and
        // token): the positions its last token sees.
        for (c, cache) in caches.iter_mut().enumerate() {
            let rows = (0..t)
                .filter(|&tok| seqs.seq(tok) == c)
                .map(|tok| seqs.pos[tok] as usize + 1)
                .max()
                .unwrap_or(0);
            let SeqCache { kv, v32 } = cache;
            if let KvData::F16(_, vc) = &kv[layer] {
                let dst = Shared(v32.as_mut_ptr());
                let convert = |w: usize, nw: usize| {
                    let r = split(rows, w, nw, 16);
                    for kvh in 0..g {
                        let run = (kvh * cap + r.start) * d..(kvh * cap + r.end) * d;
                        let src: &[f16] = vc[run.clone()].reinterpret_cast();
                        // SAFETY: workers write disjoint row ranges of v32, sized for the
                        // capacity.
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(dst.get().add(run.start), run.len())
                        };
                        src.convert_to_f32_slice(out);
                    }
                };
                if self.threads() > 1 && rows >= 64 {
                    self.pool.run(&convert);
                } else {
                    convert(0, 1);
                }
            }
        }
        let caches: &[SeqCache] = caches;
        let job = |w: usize, nw: usize| {
            let mut local = locals[w].lock().unwrap_or_else(|e| e.into_inner());
            let Local {
                scores,
                acc,
                acc64,
                row,
                qh,
                ..
            } = &mut *local;
            // Every nw-th (token, head): later tokens see more positions, so contiguous ranges
            // would leave the first workers idle.
            for item in (w..t * h).step_by(nw) {
                let (tok, head) = (item / h, item % h);
                let kvh = head / group;
                let cache = &caches[seqs.seq(tok)];
                let kv = &cache.kv[layer];
                let visible = seqs.pos[tok] as usize + 1;
                // This head's rows.
                let rows = kvh * cap * d..(kvh * cap + visible) * d;
                let v32: &[f32] = match kv {
                    KvData::F32(_, vc) => &vc[rows.clone()],
                    KvData::F16(..) => &cache.v32[rows.clone()],
                };
                let qv =
                    unsafe { std::slice::from_raw_parts(q.get().add((tok * h + head) * d), d) };
                let scores = &mut scores[..visible.next_multiple_of(32)];
                match kv {
                    KvData::F16(kc, _) if kq == DotPath::F32 => {
                        for (j, s) in scores[..visible].iter_mut().enumerate() {
                            let kr: &[f16] = kc[rows.start + j * d..][..d].reinterpret_cast();
                            kr.convert_to_f32_slice(&mut row[..d]);
                            *s = numerics::dot_f64(qv, &row[..d]) * scale;
                        }
                    }
                    KvData::F16(kc, _) => {
                        let round = match kq {
                            DotPath::Gemm { round } => round || d % 16 != 0,
                            _ => true,
                        };
                        qh[..d].copy_from_slice(qv);
                        if round {
                            host::round_f16(&mut qh[..d]);
                        }
                        let dot = match kq {
                            DotPath::Gemm { .. } if d % 16 == 0 => half.gemm,
                            _ => half.gemv,
                        };
                        for (j, s) in scores[..visible].iter_mut().enumerate() {
                            let kr = &kc[rows.start + j * d..][..d];
                            *s = unsafe { dot(qh.as_ptr(), kr.as_ptr(), d) } * scale;
                        }
                    }
                    KvData::F32(kc, _) => {
                        for (j, s) in scores[..visible].iter_mut().enumerate() {
                            *s = numerics::dot_f64(qv, &kc[rows.start + j * d..][..d]) * scale;
                        }
                    }
                }
                host::softmax(&mut scores[..visible]);
                for s in &mut scores[visible..] {
                    *s = 0.0;
                }
                let out =
                    unsafe { std::slice::from_raw_parts_mut(o.get().add((tok * h + head) * d), d) };
                weighted_values(v32, kqv, scores, visible, d, acc, acc64, out);
            }
        };
        if self.threads() > 1 && t * h > 1 {
            self.pool.run(&job);
        } else {
            job(0, 1);
        }
    }
}

impl Executor {
    /// Attention over an f16 cache with the host's vector kernels, the same numbers as
    /// [`Executor::attention`]'s per-head loop in three passes over the workers, a chunk of
    /// tokens at a time: the scores (items of [`KEY_BLOCK`] keys, sixteen keys per call, each
    /// converted once for all the query heads that share it), the softmax of each head, then
    /// the weighted values (items of 32 dimensions, each window of values converted once for
    /// the heads sharing it). Every pass has items enough for all workers even for one token,
    /// and each reads a head's keys or values as one contiguous run of the head-major cache.
    #[allow(clippy::too_many_arguments)]
    fn attention_phased(
        &self,
        st: &mut State,
        caches: &[SeqCache],
        seqs: &Seqs<'_>,
        q: *const f32,
        o: *mut f32,
        (layer, t, h, scale): (usize, usize, usize, f32),
        (kq, kqv): (DotPath, DotPath),
        chains: HalfChainsFn,
    ) {
        let l = self.kv[layer];
        let (g, d) = (l.g, l.d);
        let group = h / g;
        let cap = st.capacity;
        // The values grouped in runs, or (`run` 0) rows by position.
        let runs = if l.runs {
            ValueRuns::new(cap, d)
        } else {
            ValueRuns { d, run: 0 }
        };
        let half = self.half;
        let (dot, dot16) = match kq {
            DotPath::Gemm { .. } => (half.gemm, half.gemm16),
            _ => (half.gemv, half.gemv16),
        };
        let round_q = !matches!(kq, DotPath::Gemm { round: false });
        let stride = st.capacity.next_multiple_of(32);
        let tc = (st.attn_scores.len() / (h * stride)).clamp(1, t);
        let (scores, qh) = (
            Shared(st.attn_scores.as_mut_ptr()),
            Shared(st.attn_q.as_mut_ptr()),
        );
        let (q, o) = (Shared(q as *mut f32), Shared(o));
        let visible = |tok: usize| seqs.pos[tok] as usize + 1;
        let cache = |tok: usize| match &caches[seqs.seq(tok)].kv[layer] {
            KvData::F16(k, v) => (k.as_ptr(), v.as_ptr()),
            KvData::F32(..) => unreachable!("the phased attention reads f16 caches"),
        };
        let run = |items: usize, job: &(dyn Fn(usize, usize) + Sync)| {
            if self.threads() > 1 && items > 1 {
                self.pool.run(job);
            } else {
                job(0, 1);
            }
        };
        for c0 in (0..t).step_by(tc) {
            let c1 = (c0 + tc).min(t);
            let n = c1 - c0;
            // SAFETY (all three passes): a chunk's `n·h` score rows of `stride` and query rows
            // of `d` fit the scratch (`tc` is taken from its size); every item writes its own
            // rows, key ranges or dimensions; keys and values below a token's visible length
            // are inside its cache.
            for i in 0..n * h {
                let src = unsafe { std::slice::from_raw_parts(q.get().add((c0 * h + i) * d), d) };
                let dst = unsafe { std::slice::from_raw_parts_mut(qh.get().add(i * d), d) };
                dst.copy_from_slice(src);
                if round_q {
                    host::round_f16(dst);
                }
            }
            let blocks = (c0..c1)
                .map(|tok| visible(tok).div_ceil(KEY_BLOCK))
                .max()
                .unwrap_or(0);
            // Items (kv head, key block, token), the token fastest: a block of keys serves
            // every token of the chunk from the cache.
            let score_items = || {
                (0..g).flat_map(move |kvh| {
                    (0..blocks).flat_map(move |b| {
                        (c0..c1)
                            .filter(move |&tok| b * KEY_BLOCK < visible(tok))
                            .map(move |tok| (kvh, b, tok))
                    })
                })
            };
            let count = score_items().count();
            run(count, &|w, nw| {
                for (kvh, b, tok) in score_items().skip(w).step_by(nw) {
                    let (k0, k1) = (b * KEY_BLOCK, ((b + 1) * KEY_BLOCK).min(visible(tok)));
                    let keys = unsafe { cache(tok).0.add(kvh * cap * d) };
                    // The group's query heads are consecutive rows, and so are their scores.
                    let i0 = (tok - c0) * h + kvh * group;
                    let (x, rows) =
                        unsafe { (qh.get().add(i0 * d), scores.get().add(i0 * stride)) };
                    let mut j = k0;
                    while j + 16 <= k1 {
                        let a = Rows16 {
                            x,
                            heads: group,
                            w: unsafe { keys.add(j * d) },
                            stride: d,
                            k: d,
                            out: unsafe { rows.add(j) },
                            out_stride: stride,
                        };
                        unsafe { dot16(&a) };
                        j += 16;
                    }
                    for hh in 0..group {
                        let row = unsafe { rows.add(hh * stride) };
                        for j in j..k1 {
                            unsafe { *row.add(j) = dot(x.add(hh * d), keys.add(j * d), d) };
                        }
                        for j in k0..k1 {
                            unsafe { *row.add(j) *= scale };
                        }
                    }
                }
            });
            run(n * h, &|w, nw| {
                for i in (w..n * h).step_by(nw) {
                    let vis = visible(c0 + i / h);
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(
                            scores.get().add(i * stride),
                            vis.next_multiple_of(32),
                        )
                    };
                    host::softmax(&mut row[..vis]);
                    row[vis..].fill(0.0);
                    if value_chains(kqv, row.len()).1 {
                        host::round_f16(&mut row[..vis]);
                    }
                }
            });
            // Items (kv head, 32 dimensions (two 64-byte lines of each value row), token).
            let parts = d.div_ceil(32);
            run(g * parts * n, &|w, nw| {
                for item in (w..g * parts * n).step_by(nw) {
                    let (kvh, part, tok) = (item / (parts * n), item / n % parts, c0 + item % n);
                    let dim0 = 32 * part;
                    let dims = (d - dim0).min(32);
                    let vis = visible(tok);
                    let padded = vis.next_multiple_of(32);
                    let (n_chains, _, limit) = value_chains(kqv, padded);
                    // The slice's first value, the distance between its rows, and the row
                    // of each position.
                    let (values, v_stride, run) = if runs.run > 0 {
                        let (slice, w) = runs.slice(kvh, dim0);
                        (unsafe { cache(tok).1.add(slice) }, w, runs.run)
                    } else {
                        (unsafe { cache(tok).1.add(kvh * cap * d + dim0) }, d, 0)
                    };
                    let row = |j: usize| value_row(j, run);
                    let i0 = (tok - c0) * h + kvh * group;
                    let x = unsafe { scores.get().add(i0 * stride) };
                    let out = unsafe { o.get().add((tok * h + kvh * group) * d + dim0) };
                    // Below 64 positions the GEMV has no chains, only its f64 tail.
                    if limit > 0 {
                        let a = Chains {
                            x,
                            x_stride: stride,
                            heads: group,
                            n: limit.min(vis),
                            v: values,
                            stride: v_stride,
                            run,
                            d: dims,
                            chains: n_chains,
                            out,
                            out_stride: d,
                        };
                        unsafe { chains(&a) };
                    }
                    if n_chains == 16 {
                        continue;
                    }
                    // ggml's GEMV adds the elements past the last 64 in f64, padding (0·0)
                    // included. The visible rows there (fewer than 64: `limit` is `padded`
                    // rounded down to 64) as f32, converted once for every head.
                    let mut rows32 = [0.0f32; 64 * 32];
                    for (i, j) in (limit..vis).enumerate() {
                        let v: &[f16] = unsafe {
                            std::slice::from_raw_parts(values.add(row(j) * v_stride), dims)
                        }
                        .reinterpret_cast();
                        v.convert_to_f32_slice(&mut rows32[i * dims..(i + 1) * dims]);
                    }
                    for hh in 0..group {
                        let out = unsafe { std::slice::from_raw_parts_mut(out.add(hh * d), dims) };
                        let x = unsafe { std::slice::from_raw_parts(x.add(hh * stride), padded) };
                        let mut acc = [0.0f64; 32];
                        if limit > 0 {
                            for (a, &o) in acc.iter_mut().zip(out.iter()) {
                                *a = o as f64;
                            }
                        }
                        for (j, &xj) in x.iter().enumerate().skip(limit) {
                            if j < vis {
                                let v = &rows32[(j - limit) * dims..][..dims];
                                for (a, &v) in acc.iter_mut().zip(v) {
                                    *a += (xj * v) as f64;
                                }
                            } else {
                                for a in &mut acc[..dims] {
                                    *a += 0.0;
                                }
                            }
                        }
                        for (o, &a) in out.iter_mut().zip(&acc) {
                            *o = a as f32;
                        }
                    }
                }
            });
        }
    }
}

/// How the weighted values along `path` sum scores padded to `padded` positions: the number
/// of chains (16 for tinyBLAS, 64 for ggml's GEMV), whether the scores are rounded to f16
/// first, and the positions the chains take (the GEMV adds the ones past them in f64).
fn value_chains(path: DotPath, padded: usize) -> (usize, bool, usize) {
    match path {
        DotPath::Gemm { round } if padded.is_multiple_of(16) => (16, round, padded),
        _ => (64, true, padded & !63),
    }
}

/// `out[dim] = Σ_j x_j · v[j][dim]` over the padded scores with the summation order of the
/// interpreter's `half_dot` along `path` (chains of 64 or 16 lanes, or f64), vectorized across
/// `dim`: every chain is the same sequence of fused multiply-adds as the scalar reference.
#[allow(clippy::too_many_arguments)]
fn weighted_values(
    v: &[f32],
    path: DotPath,
    scores: &[f32],
    visible: usize,
    d: usize,
    acc: &mut Vec<f32>,
    acc64: &mut Vec<f64>,
    out: &mut [f32],
) {
    let padded = scores.len();
    let v_row = |j: usize| &v[j * d..][..d];
    match path {
        DotPath::F32 => {
            acc64.clear();
            acc64.resize(d, 0.0);
            for (j, &s) in scores[..visible].iter().enumerate() {
                let x = s as f64;
                for (a, &v) in acc64.iter_mut().zip(v_row(j)) {
                    *a += x * v as f64;
                }
            }
            for (o, &a) in out.iter_mut().zip(acc64.iter()) {
                *o = a as f32;
            }
        }
        DotPath::Gemv | DotPath::Gemm { .. } => {
            let (chains, round, limit) = value_chains(path, padded);
            // Chains only exist past the first 64 (GEMV) or 16 positions; below that the GEMV
            // sums everything in f64 and the chain part is exactly zero.
            let used = chains.min(limit);
            acc.clear();
            acc.resize(used * d, 0.0);
            let x_of = |j: usize| {
                let s = scores[j];
                if round { numerics::round_f16(s) } else { s }
            };
            for j in 0..limit.min(visible) {
                let x = x_of(j);
                let a = &mut acc[(j % chains) * d..][..d];
                fma_row(a, x, v_row(j));
            }
            // Padding (j >= visible) adds x·0 = 0 to every chain: a no-op on finite sums.
            acc64.clear();
            if used == 0 {
                acc64.resize(d, 0.0);
            } else {
                // The same additions as the scalar reduction, a whole row of dims at a time:
                // GEMV's (a0+a2)+(a1+a3), then _mm512_reduce_add_ps's halving tree.
                if chains == 64 {
                    for l in 0..16 {
                        for dim in 0..d {
                            acc[l * d + dim] = (acc[l * d + dim] + acc[(32 + l) * d + dim])
                                + (acc[(16 + l) * d + dim] + acc[(48 + l) * d + dim]);
                        }
                    }
                }
                let mut n = 16;
                while n > 1 {
                    n /= 2;
                    for i in 0..n {
                        let (lo, hi) = acc.split_at_mut((i + n) * d);
                        for (a, &b) in lo[i * d..(i + 1) * d].iter_mut().zip(&hi[..d]) {
                            *a += b;
                        }
                    }
                }
                acc64.extend(acc[..d].iter().map(|&v| v as f64));
            }
            if chains == 16 {
                for (o, &a) in out.iter_mut().zip(acc64.iter()) {
                    *o = a as f32;
                }
                return;
            }
            // ggml's GEMV adds the elements past the last 64 in f64, padding (0·0) included.
            for j in limit..padded {
                if j < visible {
                    let x = x_of(j);
                    for (a, &v) in acc64.iter_mut().zip(v_row(j)) {
                        *a += (x * v) as f64;
                    }
                } else {
                    for a in acc64.iter_mut() {
                        *a += 0.0;
                    }
                }
            }
            for (o, &a) in out.iter_mut().zip(acc64.iter()) {
                *o = a as f32;
            }
        }
    }
}

/// The reference numerics compiled for the host's FMA and F16C: the same fused operations,
/// inlined instead of called through libm one element at a time.
mod host {
    use super::*;

    fn fma() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    pub fn softmax(x: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature is present.
            return unsafe { softmax::avx512(x) };
        }
        #[cfg(target_arch = "x86_64")]
        if fma() {
            #[target_feature(enable = "avx2,fma")]
            fn softmax_fma(x: &mut [f32]) {
                numerics::softmax(x)
            }
            // SAFETY: the features are present.
            return unsafe { softmax_fma(x) };
        }
        numerics::softmax(x)
    }

    #[cfg(target_arch = "x86_64")]
    pub mod softmax {
        use std::arch::x86_64::*;

        /// `numerics::softmax` sixteen lanes at a time: the same max, `expf_ggml` as ggml's
        /// AVX-512 `ggml_v_expf` (its `_mm512_scalef_ps` rounds `j·2^n` once, as the
        /// reference's f64 product does), each block's halving sum added to an f64 in order,
        /// then the same product by the reciprocal.
        ///
        /// # Safety
        /// The CPU must have AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn avx512(x: &mut [f32]) {
            let n = x.len();
            let p = x.as_mut_ptr();
            let lanes = |i: usize| -> __mmask16 {
                if n - i >= 16 {
                    0xffff
                } else {
                    ((1u32 << (n - i)) - 1) as __mmask16
                }
            };
            let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
            // SAFETY (all loads and stores): masked to the slice's `n` values.
            unsafe {
                // f32::max keeps the number when one side is NaN, as max_ps(v, m) does.
                let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                for i in (0..n).step_by(16) {
                    let v = _mm512_maskz_loadu_ps(lanes(i), p.add(i));
                    m = _mm512_mask_max_ps(m, lanes(i), v, m);
                }
                let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
                let r = c(0x4b40_0000);
                let mut sum = 0.0f64;
                for i in (0..n).step_by(16) {
                    let k = lanes(i);
                    let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), max);
                    let z = _mm512_fmadd_ps(x, c(0x3fb8_aa3b), r);
                    let nn = _mm512_sub_ps(z, r);
                    let b = _mm512_fnmadd_ps(
                        nn,
                        c(0x35bf_be8e),
                        _mm512_fnmadd_ps(nn, c(0x3f31_7200), x),
                    );
                    let u = _mm512_mul_ps(b, b);
                    let j = _mm512_fmadd_ps(
                        _mm512_fmadd_ps(
                            _mm512_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
                            u,
                            _mm512_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
                        ),
                        u,
                        _mm512_fmadd_ps(c(0x3f7f_fff6), b, _mm512_set1_ps(1.0)),
                    );
                    let e = _mm512_scalef_ps(j, nn);
                    // |n| > 192 or NaN: 0 below, infinity otherwise.
                    let abs = _mm512_abs_ps(nn);
                    let fine = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(abs, _mm512_set1_ps(192.0));
                    let low = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(nn, _mm512_setzero_ps());
                    let far = _mm512_mask_blend_ps(
                        low,
                        _mm512_set1_ps(f32::INFINITY),
                        _mm512_setzero_ps(),
                    );
                    let e = _mm512_maskz_mov_ps(k, _mm512_mask_blend_ps(fine, far, e));
                    _mm512_mask_storeu_ps(p.add(i), k, e);
                    // The block's halving sum (inactive lanes 0, as the reference's block).
                    let h8 = _mm256_add_ps(
                        _mm512_castps512_ps256(e),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
                    );
                    let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
                    let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
                    let h1 = _mm_add_ss(h2, _mm_shuffle_ps::<1>(h2, h2));
                    sum += _mm_cvtss_f32(h1) as f64;
                }
                let inv = _mm512_set1_ps((1.0 / sum) as f32);
                for i in (0..n).step_by(16) {
                    let k = lanes(i);
                    let v = _mm512_maskz_loadu_ps(k, p.add(i));
                    _mm512_mask_storeu_ps(p.add(i), k, _mm512_mul_ps(v, inv));
                }
            }
        }
    }

    /// Rounds every value to f16 and back (`numerics::round_f16`), eight at a time with F16C.
    pub fn round_f16(x: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
            #[target_feature(enable = "avx,f16c")]
            fn round8(x: &mut [f32]) {
                use std::arch::x86_64::*;
                let mut chunks = x.chunks_exact_mut(8);
                for c in &mut chunks {
                    // SAFETY: eight floats; the features are present.
                    unsafe {
                        let v = _mm256_loadu_ps(c.as_ptr());
                        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                        _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
                    }
                }
                for v in chunks.into_remainder() {
                    *v = numerics::round_f16(*v);
                }
            }
            // SAFETY: the features are present.
            return unsafe { round8(x) };
        }
        for v in x {
            *v = numerics::round_f16(*v);
        }
    }

    /// `y[i] = act(y[i]) · up[i]`.
    pub fn glu(act: Activation, y: &mut [f32], up: &[f32]) {
        #[inline(always)]
        fn apply(act: Activation, y: &mut [f32], up: &[f32]) {
            match act {
                Activation::Silu => y
                    .iter_mut()
                    .zip(up)
                    .for_each(|(y, &u)| *y = numerics::silu(*y) * u),
                Activation::Relu2 => y
                    .iter_mut()
                    .zip(up)
                    .for_each(|(y, &u)| *y = numerics::relu2(*y) * u),
            }
        }
        #[cfg(target_arch = "x86_64")]
        if fma() {
            #[target_feature(enable = "avx2,fma")]
            fn apply_fma(act: Activation, y: &mut [f32], up: &[f32]) {
                apply(act, y, up)
            }
            // SAFETY: the features are present.
            return unsafe { apply_fma(act, y, up) };
        }
        apply(act, y, up)
    }
}

/// `a[i] = x·v[i] + a[i]` fused, vectorized where the host allows.
fn fma_row(a: &mut [f32], x: f32, v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the features are present.
        return unsafe { fma_row_fma(a, x, v) };
    }
    for (a, &v) in a.iter_mut().zip(v) {
        *a = x.mul_add(v, *a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_row_fma(a: &mut [f32], x: f32, v: &[f32]) {
    for (a, &v) in a.iter_mut().zip(v) {
        *a = x.mul_add(v, *a);
    }
}

/// Calls `f(part, row_in_part, rows, column)` for the pieces of global rows `row0..row0+c`
/// that fall in each part (parts stacked by rows).
fn for_parts(
    part_rows: impl Iterator<Item = usize>,
    row0: usize,
    c: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let mut start = 0;
    for (pi, n) in part_rows.enumerate() {
        let (lo, hi) = (row0.max(start), (row0 + c).min(start + n));
        if lo < hi {
            f(pi, lo - start, hi - lo, lo - row0);
        }
        start += n;
    }
}

impl GenericPart {
    fn weight_ref(&self) -> WeightRef<'_> {
        WeightRef {
            encoding: self.encoding,
            shape: &self.shape,
            bytes: self.bytes.get(),
        }
    }
}

fn activation(act: Activation) -> fn(f32) -> f32 {
    match act {
        Activation::Silu => numerics::silu,
        Activation::Relu2 => numerics::relu2,
    }
}

/// Compiles plan steps into kernels.
struct Builder<'p> {
    plan: &'p Plan,
    src: &'p (dyn WeightSource + Send + Sync),
    kernels: Vec<Kernel>,
    labels: Vec<(String, String)>,
    kv: Vec<KvLayout>,
    /// Cache buffers: which layer, keys (false) or values (true).
    cache_of: HashMap<BufferId, (usize, bool)>,
    choices: Vec<TernaryChoice>,
    set: KernelSet,
    max_k: usize,
    max_rope: usize,
    vocab: usize,
    half: HalfDots,
    pool: &'p Pool,
    lm_head: Option<Encoding>,
    bindings: Option<Vec<TernaryBinding>>,
    head: Option<HeadParts>,
    packed: Vec<(String, &'static str, Bytes)>,
    /// Weights the executor made itself (a requantized head), kept alive with it.
    owned: Vec<Vec<u8>>,
    #[allow(clippy::vec_box)]
    owned_shapes: Vec<Box<[u64; 2]>>,
}

impl<'p> Builder<'p> {
    fn act(&self, i: usize, op: &Op, b: BufferId) -> Result<Act, ExecError> {
        let buf = self
            .plan
            .buffers
            .get(b as usize)
            .ok_or_else(|| step_err(i, op, format!("buffer {b} does not exist")))?;
        match &buf.storage {
            Storage::Arena { offset: Some(off) } => {
                let bytes = buf
                    .row_bytes()
                    .ok_or_else(|| step_err(i, op, format!("buffer {b} has no fixed row size")))?;
                let elem = match buf.ty.dtype {
                    DType::I8 => 1,
                    DType::F16 | DType::BF16 => 2,
                    _ => 4,
                };
                Ok(Act {
                    off: *off as usize,
                    row: (bytes / elem) as usize,
                })
            }
            other => Err(step_err(
                i,
                op,
                format!("buffer {b} is {other:?}, expected an activation"),
            )),
        }
    }

    fn int_input(&self, i: usize, op: &Op, b: BufferId) -> Result<IntInput, ExecError> {
        match self.plan.buffers.get(b as usize).map(|x| &x.storage) {
            Some(Storage::Input { name }) if name == "tokens" => Ok(IntInput::Tokens),
            Some(Storage::Input { name }) if name == "positions" => Ok(IntInput::Positions),
            other => Err(step_err(
                i,
                op,
                format!("buffer {b} is {other:?}, expected the tokens or positions input"),
            )),
        }
    }

    /// The weight parts of buffer `b`, checked against their declared types.
    fn weights(
        &self,
        i: usize,
        op: &Op,
        b: BufferId,
    ) -> Result<Vec<(String, WeightRef<'p>)>, ExecError> {
        match self.plan.buffers.get(b as usize).map(|x| &x.storage) {
            Some(Storage::Weight { parts, layout }) => {
                if let Some(layout) = layout {
                    return Err(step_err(
                        i,
                        op,
                        format!("weight layout '{layout}' has no CPU kernel"),
                    ));
                }
                parts
                    .iter()
                    .map(|part| {
                        let shape: Vec<u64> = part
                            .ty
                            .shape
                            .iter()
                            .map(|d| d.fixed().unwrap_or(0))
                            .collect();
                        fetch_weight(self.src, &part.name, part.ty.dtype, &shape)
                            .map(|w| (part.name.clone(), w))
                            .map_err(|e| ExecError::Weight {
                                name: part.name.clone(),
                                message: e.to_string(),
                            })
                    })
                    .collect()
            }
            other => Err(step_err(
                i,
                op,
                format!("buffer {b} is {other:?}, expected a weight"),
            )),
        }
    }

    fn float_weight(&self, i: usize, op: &Op, b: BufferId) -> Result<Vec<f32>, ExecError> {
        let parts = self.weights(i, op, b)?;
        let [(name, w)] = &parts[..] else {
            return Err(step_err(i, op, "expects a single weight"));
        };
        let n: u64 = w.shape.iter().product();
        w.encoding
            .decode(w.bytes, n)
            .map_err(|e| ExecError::Weight {
                name: name.clone(),
                message: e.to_string(),
            })
    }

    /// The head's weights re-encoded (`--lm-head`), row by row on the pool.
    fn requantize(
        &mut self,
        parts: &[(String, WeightRef<'p>)],
        target: Encoding,
    ) -> Result<Vec<(String, WeightRef<'p>)>, ExecError> {
        if !matches!(target, Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1) {
            return Err(ExecError::Run(format!(
                "--lm-head {target} is not supported (q8_0, q4_0 or q4_1)"
            )));
        }
        let mut out = Vec::new();
        for (name, w) in parts {
            if w.encoding == target {
                out.push((name.clone(), WeightRef { ..*w }));
                continue;
            }
            let (rows, k) = (w.shape[0] as usize, w.shape[1] as usize);
            if !k.is_multiple_of(32) {
                return Err(ExecError::Weight {
                    name: name.clone(),
                    message: format!("rows of {k} cannot be re-encoded in 32-element blocks"),
                });
            }
            let row_in = w
                .encoding
                .byte_size(k as u64)
                .map_err(|e| ExecError::Weight {
                    name: name.clone(),
                    message: e.to_string(),
                })? as usize;
            let row_out = k / 32 * target.block_bytes();
            if w.bytes.len() != rows * row_in {
                return Err(ExecError::Weight {
                    name: name.clone(),
                    message: format!("has {} bytes, expected {}", w.bytes.len(), rows * row_in),
                });
            }
            let mut bytes = vec![0u8; rows * row_out];
            let dst = Shared(bytes.as_mut_ptr());
            let failure: Mutex<Option<String>> = Mutex::new(None);
            let (src, enc) = (Bytes::of(w.bytes), w.encoding);
            self.pool.run(&|wi, nw| {
                let r = split(rows, wi, nw, 1);
                // SAFETY: each worker writes its own rows of `bytes`.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        dst.get().add(r.start * row_out),
                        r.len() * row_out,
                    )
                };
                let res = enc.reencode_rows(
                    src.get(),
                    rows as u64,
                    k as u64,
                    r.start as u64,
                    target,
                    out,
                );
                if let Err(e) = res {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                }
            });
            if let Some(m) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(ExecError::Weight {
                    name: name.clone(),
                    message: m,
                });
            }
            // Only single token rows of the original are read from now on (a tied embedding).
            self.src.release(name);
            self.owned.push(bytes);
            let owned = self.owned.last().expect("just pushed");
            // SAFETY: the buffer lives in `owned`, moved into the executor and never changed.
            let bytes: &'p [u8] =
                unsafe { std::slice::from_raw_parts(owned.as_ptr(), owned.len()) };
            self.owned_shapes.push(Box::new([rows as u64, k as u64]));
            let shape = self.owned_shapes.last().expect("just pushed");
            // SAFETY: as above; a boxed array does not move.
            let shape: &'p [u64] = unsafe { std::slice::from_raw_parts(shape.as_ptr(), 2) };
            out.push((
                name.clone(),
                WeightRef {
                    encoding: target,
                    shape,
                    bytes,
                },
            ));
        }
        Ok(out)
    }

    fn choice(&mut self, k: usize, n: usize) -> Result<usize, ExecError> {
        if let Some(i) = self.choices.iter().position(|c| c.k == k && c.n == n) {
            return Ok(i);
        }
        let choice = match &self.bindings {
            None => choose_ternary(k, n, self.set)?,
            Some(bound) => {
                let b = bound.iter().find(|b| b.k == k && b.n == n).ok_or_else(|| {
                    ExecError::Run(format!(
                        "the plan binds no ternary kernel for {n} rows of {k} elements"
                    ))
                })?;
                fixed_ternary(k, n, &b.gemv, &b.gemm)?
            }
        };
        self.choices.push(choice);
        Ok(self.choices.len() - 1)
    }

    fn linear_weights(
        &mut self,
        i: usize,
        op: &Op,
        b: BufferId,
        half: HalfPath,
        head: bool,
    ) -> Result<(Weights, usize, usize, String), ExecError> {
        let mut parts = self.weights(i, op, b)?;
        if head && let Some(target) = self.lm_head {
            parts = self.requantize(&parts, target)?;
            self.head = Some((
                i,
                b,
                parts
                    .iter()
                    .map(|(name, w)| {
                        let shape = [w.shape[0], w.shape[1]];
                        (name.clone(), w.encoding, shape, Bytes::of(w.bytes))
                    })
                    .collect(),
            ));
        }
        let enc = parts[0].1.encoding;
        if let Some((name, w)) = parts.iter().find(|(_, w)| w.encoding != enc) {
            return Err(ExecError::Weight {
                name: name.clone(),
                message: format!("is {}, the other parts are {enc}", w.encoding),
            });
        }
        let k = parts[0].1.shape[1] as usize;
        let n: usize = parts.iter().map(|(_, w)| w.shape[0] as usize).sum();
        let weights = match enc {
            Encoding::I2S => {
                if !k.is_multiple_of(128) {
                    return Err(step_err(
                        i,
                        op,
                        format!("i2_s rows of {k} elements are not whole 128-element blocks"),
                    ));
                }
                let mut ps = Vec::new();
                for (name, w) in &parts {
                    let rows = w.shape[0] as usize;
                    let total = (rows * k) as u64;
                    let expect = Encoding::I2S
                        .byte_size(total)
                        .map_err(|e| ExecError::Weight {
                            name: name.clone(),
                            message: e.to_string(),
                        })?;
                    if w.bytes.len() as u64 != expect {
                        return Err(ExecError::Weight {
                            name: name.clone(),
                            message: format!("has {} bytes, expected {expect}", w.bytes.len()),
                        });
                    }
                    if let Some(at) = find_code3(&w.bytes[..rows * k / 4]) {
                        return Err(ExecError::Weight {
                            name: name.clone(),
                            message: format!("i2_s code 3 (not a ternary value) in byte {at}"),
                        });
                    }
                    ps.push((Bytes::of(w.bytes), rows, i2s_scale(w.bytes, total)));
                }
                let choice = self.choice(k, n)?;
                if self.choices[choice].lut().is_some() {
                    // The table-lookup kernel reads groups of 16 rows side by side: take them
                    // from the source (a compiled plan has them) or repack, and let the
                    // originals' pages go.
                    for ((name, w), p) in parts.iter().zip(&mut ps) {
                        let rows = p.1;
                        let size = lut::repacked_bytes(rows, k);
                        if let Some(b) = self.src.packed(name, LUT_LAYOUT) {
                            if b.len() != size {
                                return Err(ExecError::Weight {
                                    name: name.clone(),
                                    message: format!(
                                        "its {LUT_LAYOUT} layout has {} bytes, expected {size}",
                                        b.len()
                                    ),
                                });
                            }
                            p.0 = Bytes::of(b);
                        } else {
                            let mut rep = vec![0u8; size];
                            lut::repack(&w.bytes[..rows * k / 4], rows, k, &mut rep);
                            self.owned.push(rep);
                            p.0 = Bytes::of(self.owned.last().expect("just pushed"));
                        }
                        self.src.release(name);
                        self.packed.push((name.clone(), LUT_LAYOUT, p.0));
                    }
                }
                (
                    Weights::Ternary { parts: ps, choice },
                    format!(
                        "i2_s [1 token {}, more {}]",
                        self.choices[choice].gemv.name(),
                        self.choices[choice].gemm.name()
                    ),
                )
            }
            // (An f32 path sums in f64: the reference numerics below.)
            Encoding::F16 if half != HalfPath::F32 => {
                let mut ps = Vec::new();
                for (name, w) in &parts {
                    let rows = w.shape[0] as usize;
                    if w.bytes.len() != rows * k * 2 {
                        return Err(ExecError::Weight {
                            name: name.clone(),
                            message: format!(
                                "has {} bytes, expected {}",
                                w.bytes.len(),
                                rows * k * 2
                            ),
                        });
                    }
                    if !(w.bytes.as_ptr() as usize).is_multiple_of(2) {
                        return Err(ExecError::Weight {
                            name: name.clone(),
                            message: "f16 data is not 2-byte aligned".into(),
                        });
                    }
                    ps.push((Bytes::of(w.bytes), rows));
                }
                (
                    Weights::F16 { parts: ps, half },
                    format!("f16 {} [{}]", half.name(), self.half.variant),
                )
            }
            Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1 => {
                let portable = self.set == KernelSet::Baseline;
                let (variant, dot) =
                    bitnetc_codegen_cpu::blocks::select(enc, portable).expect("a block encoding");
                let gemm = bitnetc_codegen_cpu::blocks::select_gemm(enc).filter(|_| !portable);
                let mut ps = Vec::new();
                for (name, w) in &parts {
                    let rows = w.shape[0] as usize;
                    let expect = rows * k / 32 * enc.block_bytes();
                    if !k.is_multiple_of(32) || w.bytes.len() != expect {
                        return Err(ExecError::Weight {
                            name: name.clone(),
                            message: format!(
                                "has {} bytes for {rows} rows of {k}, expected {expect}",
                                w.bytes.len()
                            ),
                        });
                    }
                    ps.push((Bytes::of(w.bytes), rows));
                }
                (
                    Weights::Blocks {
                        parts: ps,
                        enc,
                        dot,
                        gemm: gemm.map(|g| g.1),
                    },
                    match gemm {
                        Some((g, _)) => format!("{enc} [1 token {variant}, more {g} gemm]"),
                        None => format!("{enc} [{variant}]"),
                    },
                )
            }
            other => {
                let ps = parts
                    .iter()
                    .map(|(_, w)| GenericPart {
                        bytes: Bytes::of(w.bytes),
                        encoding: w.encoding,
                        shape: [w.shape[0], w.shape[1]],
                    })
                    .collect();
                (
                    Weights::Generic { parts: ps, half },
                    format!("{other} [reference numerics]"),
                )
            }
        };
        self.max_k = self.max_k.max(k);
        let (w, label) = weights;
        Ok((w, k, n, label))
    }

    fn kernel(
        &mut self,
        i: usize,
        step: &bitnetc_ir::plan::Step,
        head: bool,
    ) -> Result<(Kernel, (String, String)), ExecError> {
        let op = &step.op;
        let a = |j: usize| step.operands[j];
        let r = |j: usize| step.results[j];
        let label = |k: &str, v: &str| (k.to_string(), v.to_string());
        Ok(match op {
            Op::Input { .. } | Op::Weight { .. } | Op::WeightConcat | Op::Repack { .. } => {
                (Kernel::Nop, label("data", "-"))
            }
            Op::Output { name } => {
                if name != "logits" {
                    return Err(step_err(
                        i,
                        op,
                        format!("output '{name}': the compiled executor returns `logits` only"),
                    ));
                }
                let producer_is_linear = self
                    .kernels
                    .iter()
                    .any(|k| matches!(k, Kernel::Linear(l) if l.head));
                if producer_is_linear {
                    (Kernel::Nop, label("output", "-"))
                } else {
                    let x = self.act(i, op, a(0))?;
                    self.vocab = x.row;
                    (Kernel::Logits { x }, label("output logits", "copy"))
                }
            }
            Op::Embed => {
                let ids = self.int_input(i, op, a(0))?;
                let parts = self.weights(i, op, a(1))?;
                let [(_, w)] = &parts[..] else {
                    return Err(step_err(i, op, "expects a single table"));
                };
                let out = self.act(i, op, r(0))?;
                let (vocab, h) = (w.shape[0] as usize, w.shape[1] as usize);
                (
                    Kernel::Embed {
                        ids,
                        table: Bytes::of(w.bytes),
                        encoding: w.encoding,
                        vocab,
                        h,
                        out,
                    },
                    label(&format!("embed {}", w.encoding), "decode"),
                )
            }
            Op::RmsNorm { eps } => {
                let x = self.act(i, op, a(0))?;
                self.max_k = self.max_k.max(x.row);
                (
                    Kernel::RmsNorm {
                        x,
                        gain: self.float_weight(i, op, a(1))?,
                        eps: *eps,
                        out: self.act(i, op, r(0))?,
                    },
                    label("rms_norm", "scalar"),
                )
            }
            Op::QuantAct => (
                Kernel::QuantAct {
                    x: self.act(i, op, a(0))?,
                    q: self.act(i, op, r(0))?,
                    s: self.act(i, op, r(1))?,
                },
                label("quant_act", "scalar"),
            ),
            Op::TMatmul | Op::Matmul { .. } | Op::Linear { .. } => {
                let (input, wb, glu, residual, half) = match op {
                    Op::TMatmul => (
                        LinearInput::Quantized {
                            q: self.act(i, op, a(0))?,
                            s: self.act(i, op, a(1))?,
                        },
                        a(2),
                        None,
                        None,
                        HalfPath::F32,
                    ),
                    Op::Matmul { half } => (
                        LinearInput::F32 {
                            x: self.act(i, op, a(0))?,
                            norm: None,
                        },
                        a(1),
                        None,
                        None,
                        *half,
                    ),
                    Op::Linear {
                        norm,
                        glu,
                        residual,
                        half,
                    } => {
                        let mut next = 2;
                        let norm = match norm {
                            Some(eps) => {
                                next += 1;
                                Some((self.float_weight(i, op, a(2))?, *eps))
                            }
                            None => None,
                        };
                        let residual = if *residual {
                            Some(self.act(i, op, a(next))?)
                        } else {
                            None
                        };
                        (
                            LinearInput::F32 {
                                x: self.act(i, op, a(0))?,
                                norm,
                            },
                            a(1),
                            *glu,
                            residual,
                            *half,
                        )
                    }
                    _ => unreachable!(),
                };
                let (weights, k, n, variant) = self.linear_weights(i, op, wb, half, head)?;
                if matches!(input, LinearInput::Quantized { .. })
                    && !matches!(weights, Weights::Ternary { .. })
                {
                    return Err(step_err(i, op, "tmatmul needs an i2_s weight"));
                }
                if glu.is_some() && n % 2 != 0 {
                    return Err(step_err(
                        i,
                        op,
                        format!("a gated linear needs an even number of rows, got {n}"),
                    ));
                }
                let out = self.act(i, op, r(0))?;
                if head {
                    self.vocab = out.row;
                }
                let name = format!(
                    "{} {k}→{n}{}{}{}",
                    op.name(),
                    if matches!(&input, LinearInput::F32 { norm: Some(_), .. }) {
                        " +norm"
                    } else {
                        ""
                    },
                    glu.map_or(String::new(), |g| format!(" +{}", g.name())),
                    if residual.is_some() { " +residual" } else { "" }
                );
                (
                    Kernel::Linear(Box::new(Linear {
                        input,
                        k,
                        n,
                        weights,
                        glu,
                        residual,
                        out,
                        head,
                    })),
                    (name, variant),
                )
            }
            Op::Mul | Op::Add => {
                let b = match self.plan.buffers.get(a(1) as usize).map(|x| &x.storage) {
                    Some(Storage::Weight { .. }) => {
                        Operand::Const(self.float_weight(i, op, a(1))?)
                    }
                    _ => Operand::Act(self.act(i, op, a(1))?),
                };
                let (x, out) = (self.act(i, op, a(0))?, self.act(i, op, r(0))?);
                if let Operand::Const(c) = &b
                    && c.len() != 1
                    && c.len() != x.row
                {
                    return Err(step_err(
                        i,
                        op,
                        format!("operand of {} values for rows of {}", c.len(), x.row),
                    ));
                }
                (
                    Kernel::Binary {
                        a: x,
                        b,
                        out,
                        mul: matches!(op, Op::Mul),
                    },
                    label(op.name(), "scalar"),
                )
            }
            Op::Act { act } => (
                Kernel::Act {
                    x: self.act(i, op, a(0))?,
                    act: *act,
                    out: self.act(i, op, r(0))?,
                },
                label(&format!("act {}", act.name()), "scalar"),
            ),
            Op::Reshape { .. } => {
                let (x, out) = (self.act(i, op, a(0))?, self.act(i, op, r(0))?);
                let elem = self.plan.buffers[a(0) as usize].row_bytes().unwrap_or(0) as usize;
                (
                    Kernel::Copy {
                        x,
                        out,
                        bytes: elem,
                    },
                    label("reshape", "view"),
                )
            }
            Op::Split { sizes } => {
                let x = self.act(i, op, a(0))?;
                let mut outs = Vec::new();
                let mut start = 0;
                for (j, &size) in sizes.iter().enumerate() {
                    outs.push((self.act(i, op, r(j))?, start));
                    start += size as usize;
                }
                (Kernel::Split { x, outs }, label("split", "copy"))
            }
            Op::Rope { theta, style, dims } => {
                let ty = &self.plan.buffers[a(0) as usize].ty;
                let dim = |j: usize| ty.shape.get(j).and_then(|d| d.fixed()).unwrap_or(0) as usize;
                let (heads, d) = (dim(1), dim(2));
                if *dims as usize > d || dims % 2 != 0 {
                    return Err(step_err(i, op, format!("rotates {dims} of {d} dimensions")));
                }
                self.max_rope = self.max_rope.max(d);
                (
                    Kernel::Rope {
                        x: self.act(i, op, a(0))?,
                        pos: self.int_input(i, op, a(1))?,
                        out: self.act(i, op, r(0))?,
                        heads,
                        d,
                        theta: *theta,
                        neox: *style == RopeStyle::Neox,
                        dims: *dims as usize,
                    },
                    label("rope", "scalar"),
                )
            }
            Op::KvAppend { layer, cache } => {
                let ty = &self.plan.buffers[a(0) as usize].ty;
                let dim = |j: usize| ty.shape.get(j).and_then(|d| d.fixed()).unwrap_or(0) as usize;
                let layout = KvLayout {
                    g: dim(1),
                    d: dim(2),
                    f16: *cache == DType::F16,
                    runs: false,
                };
                let index = self.kv.len();
                self.kv.push(layout);
                let _ = layer;
                self.cache_of.insert(r(0), (index, false));
                self.cache_of.insert(r(1), (index, true));
                (
                    Kernel::KvAppend {
                        k: self.act(i, op, a(0))?,
                        v: self.act(i, op, a(1))?,
                        layer: index,
                    },
                    label("kv_append", "copy"),
                )
            }
            Op::Attention { scale, kq, kqv } => {
                let (layer, _) = *self
                    .cache_of
                    .get(&a(1))
                    .ok_or_else(|| step_err(i, op, "keys are not a cache written earlier"))?;
                if self.cache_of.get(&a(2)) != Some(&(layer, true)) {
                    return Err(step_err(i, op, "values are not the same layer's cache"));
                }
                let ty = &self.plan.buffers[a(0) as usize].ty;
                let h = ty.shape.get(1).and_then(|d| d.fixed()).unwrap_or(0) as usize;
                let l = self.kv[layer];
                if h == 0 || l.g == 0 || !h.is_multiple_of(l.g) {
                    return Err(step_err(
                        i,
                        op,
                        format!("{h} query heads for {} key heads", l.g),
                    ));
                }
                self.max_rope = self.max_rope.max(l.d);
                (
                    Kernel::Attention {
                        q: self.act(i, op, a(0))?,
                        layer,
                        out: self.act(i, op, r(0))?,
                        h,
                        scale: *scale,
                        kq: *kq,
                        kqv: *kqv,
                    },
                    label("attention", if l.f16 { "f16 cache" } else { "f32 cache" }),
                )
            }
        })
    }
}

/// The first byte holding an I2_S code 3 (both bits of a pair set), if any.
fn find_code3(bytes: &[u8]) -> Option<usize> {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for (i, w) in words.enumerate() {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        if v & (v >> 1) & 0x5555_5555_5555_5555 != 0 {
            return (i * 8..i * 8 + 8).find(|&j| bytes[j] & (bytes[j] >> 1) & 0x55 != 0);
        }
    }
    let start = bytes.len() - tail.len();
    (start..bytes.len()).find(|&j| bytes[j] & (bytes[j] >> 1) & 0x55 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_vector_softmax_gives_the_reference_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as u32
        };
        for n in (1..70).chain([255, 256, 257, 1000]) {
            for spread in [0.01f32, 1.0, 30.0, 200.0] {
                let mut x: Vec<f32> = (0..n)
                    .map(|_| (next() as f32 / (1 << 24) as f32 - 0.5) * spread)
                    .collect();
                // A masked position, far below the others (exp underflows to 0), an exact tie.
                if n > 3 {
                    x[1] = f32::NEG_INFINITY;
                    x[2] = -150.0;
                    x[3] = x[0];
                }
                let mut expect = x.clone();
                numerics::softmax(&mut expect);
                unsafe { host::softmax::avx512(&mut x) };
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&x), bits(&expect), "n={n} spread={spread}");
            }
        }
    }

    #[test]
    fn code3_is_found_where_it_is() {
        let mut b = vec![0b1010_1001u8; 37];
        assert_eq!(find_code3(&b), None);
        b[21] = 0b0011_0000;
        assert_eq!(find_code3(&b), Some(21));
        b[36] = 0b0000_0011;
        b[21] = 0;
        assert_eq!(find_code3(&b), Some(36));
    }

    #[test]
    fn parts_are_cut_at_their_boundaries() {
        let mut got = Vec::new();
        for_parts([10, 5, 20].into_iter(), 8, 10, |p, local, n, col| {
            got.push((p, local, n, col))
        });
        assert_eq!(got, vec![(0, 8, 2, 0), (1, 0, 5, 2), (2, 0, 3, 7)]);
    }
}
