//! The runtime: an [`Engine`] holds a model's plan and weights; a [`Session`] holds one
//! sequence's KV cache and position and evaluates tokens through it (prefill with many tokens,
//! decode with one). [`tokenizer`] turns text into tokens and back.

pub mod batch;
pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod exec;
pub mod generate;
pub mod pool;
pub mod sampling;
pub mod tokenizer;

use bitnetc_ir::IrError;
use bitnetc_ir::interp::{self, Inputs, InterpError, KvCache, WeightSource};
use bitnetc_ir::plan::Plan;
use exec::{ExecError, ExecOptions, Executor, LogitRows};
use std::sync::Arc;

/// What went wrong running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Interp(#[from] InterpError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("the graph is invalid: {0}")]
    Graph(#[from] IrError),
    #[error("the graph has no `logits` output")]
    NoLogits,
    #[error("the plan's memory is not planned")]
    Unplanned,
    #[error("no tokens to evaluate")]
    Empty,
    #[error(
        "the context holds {capacity} positions, {used} are used, and {needed} more are needed; raise -c or shorten the prompt"
    )]
    ContextFull {
        needed: usize,
        capacity: usize,
        used: usize,
    },
    #[error("GPU: {0}")]
    Gpu(String),
}

/// The GPU executor and, per session slot (a KV cache on the device), the session whose
/// sequence it holds and when it was last used.
#[cfg(feature = "cuda")]
struct GpuState {
    exec: cuda::CudaExecutor,
    owners: Vec<Option<u64>>,
    used: Vec<u64>,
    clock: u64,
}

#[cfg(feature = "cuda")]
type Gpu = std::sync::Mutex<GpuState>;

/// A session's slot on the GPU, given back when the session ends.
#[cfg(feature = "cuda")]
struct GpuSlot<'e> {
    engine: &'e Engine,
    slot: usize,
    session: u64,
}

#[cfg(feature = "cuda")]
impl Drop for GpuSlot<'_> {
    fn drop(&mut self) {
        if let Some(g) = &self.engine.gpu {
            let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
            if g.owners[self.slot] == Some(self.session) {
                g.owners[self.slot] = None;
            }
        }
    }
}
#[cfg(not(feature = "cuda"))]
type Gpu = ();

static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
static ENGINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A model ready to run: its plan, its weights, and the plan compiled for this host (or the
/// reference interpreter).
pub struct Engine {
    plan: Plan,
    weights: Arc<dyn WeightSource + Send + Sync>,
    vocab: usize,
    context: usize,
    exec: Option<Executor>,
    gpu: Option<Gpu>,
    /// This engine's number: which engine a [`SpareSession`] belongs to.
    id: u64,
}

impl Engine {
    /// Checks the plan, binds it to its weights and compiles it for this host. `context` is
    /// the KV cache size of each session, in positions.
    pub fn compiled(
        plan: Plan,
        weights: Arc<dyn WeightSource + Send + Sync>,
        context: usize,
        opts: &ExecOptions,
    ) -> Result<Engine, RuntimeError> {
        let mut engine = Engine::new(plan, weights, context)?;
        engine.exec = Some(Executor::new(&engine.plan, engine.weights.clone(), opts)?);
        Ok(engine)
    }

    /// Checks the plan and binds it to GPU `ordinal`: kernels from `ptx` (architecture, PTX)
    /// when one suits the device, else compiled for it by NVRTC; weights uploaded, KV caches
    /// of `context` positions for `opts.sessions` sessions on the device, steps of at most
    /// `opts.batch` tokens (one session's at a time). `opts.trace` times every launch (no
    /// CUDA graphs then).
    #[cfg(feature = "cuda")]
    pub fn cuda(
        plan: Plan,
        weights: Arc<dyn WeightSource + Send + Sync>,
        context: usize,
        ordinal: usize,
        ptx: &[(String, String)],
        opts: &cuda::GpuOptions,
    ) -> Result<Engine, RuntimeError> {
        let device = cuda::Cuda::new(ordinal).map_err(|e| RuntimeError::Gpu(e.to_string()))?;
        Engine::gpu(plan, weights, context, Box::new(device), ptx, opts)
    }

    /// As [`Engine::cuda`], on any [`cuda::Device`].
    #[cfg(feature = "cuda")]
    pub fn gpu(
        plan: Plan,
        weights: Arc<dyn WeightSource + Send + Sync>,
        context: usize,
        device: Box<dyn cuda::Device>,
        ptx: &[(String, String)],
        opts: &cuda::GpuOptions,
    ) -> Result<Engine, RuntimeError> {
        let mut engine = Engine::new(plan, weights, context)?;
        let gpu = cuda::CudaExecutor::on(
            device,
            &engine.plan,
            engine.weights.as_ref(),
            context,
            ptx,
            opts,
        )
        .map_err(|e| RuntimeError::Gpu(e.to_string()))?;
        let n = gpu.sessions();
        engine.gpu = Some(std::sync::Mutex::new(GpuState {
            exec: gpu,
            owners: vec![None; n],
            used: vec![0; n],
            clock: 0,
        }));
        Ok(engine)
    }

    /// With a GPU engine built with `trace`: per kernel, its name, launches and time (the
    /// stream synchronized after each launch), the slowest first.
    pub fn gpu_trace(&self) -> Vec<(String, u64, std::time::Duration)> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.lock().unwrap_or_else(|e| e.into_inner()).exec.trace();
        }
        Vec::new()
    }

    /// Sets the kernel traces' counts (CPU and GPU) back to zero, so that they count only
    /// what follows.
    pub fn reset_trace(&self) {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            g.lock()
                .unwrap_or_else(|e| e.into_inner())
                .exec
                .reset_trace();
        }
        if let Some(e) = self.executor() {
            e.reset_trace();
        }
    }

    /// The GPU's name and architecture, when the engine runs on one.
    pub fn device(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(
                g.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .exec
                    .device
                    .clone(),
            );
        }
        None
    }

    /// Checks the plan and binds it to its weights, to run on the reference interpreter.
    /// `context` is the KV cache size of each session, in positions.
    pub fn new(
        plan: Plan,
        weights: Arc<dyn WeightSource + Send + Sync>,
        context: usize,
    ) -> Result<Engine, RuntimeError> {
        let graph = plan.to_graph()?;
        bitnetc_ir::verify::verify(&graph)?;
        if plan.arena_bytes_per_token.is_none() {
            return Err(RuntimeError::Unplanned);
        }
        let (_, logits) = graph
            .outputs()
            .into_iter()
            .find(|(n, _)| n == "logits")
            .ok_or(RuntimeError::NoLogits)?;
        let vocab = graph
            .ty(logits)
            .shape
            .last()
            .and_then(|d| d.fixed())
            .ok_or(RuntimeError::NoLogits)? as usize;
        Ok(Engine {
            plan,
            weights,
            vocab,
            context,
            exec: None,
            gpu: None,
            id: ENGINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// The compiled executor, when the engine has one.
    pub fn executor(&self) -> Option<&Executor> {
        self.exec.as_ref()
    }

    /// The weights the plan reads.
    pub fn weights(&self) -> &Arc<dyn WeightSource + Send + Sync> {
        &self.weights
    }

    /// The plan this engine runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// A new, empty sequence.
    pub fn session(&self) -> Session<'_> {
        Session {
            engine: self,
            kv: KvCache::new(if self.exec.is_some() || self.gpu.is_some() {
                0
            } else {
                self.context
            }),
            state: self.exec.as_ref().map(|e| e.state(self.context)),
            history: Vec::new(),
            arena: Vec::new(),
            id: SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            batcher: None,
            #[cfg(feature = "cuda")]
            gpu_slot: None,
        }
    }

    /// A new session in the memory of a finished one ([`Session::into_spare`]), so that a
    /// server starting session after session allocates its KV caches and arenas once. A spare
    /// of another engine is dropped and a fresh session made.
    pub fn session_from(&self, spare: SpareSession) -> Session<'_> {
        if spare.engine != self.id {
            return self.session();
        }
        Session {
            engine: self,
            kv: spare.kv,
            state: spare.state,
            history: spare.history,
            arena: spare.arena,
            id: SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            batcher: None,
            #[cfg(feature = "cuda")]
            gpu_slot: None,
        }
    }

    /// One decode step of several sessions of this engine: `tokens[i]` after what
    /// `sessions[i]` holds. Returns each session's logits for its token. On the compiled
    /// executor this is one step over all the tokens (the weights read once for all), and
    /// every row is bit-identical to [`Session::eval_last`] of that token alone; the
    /// interpreter and the GPU evaluate the sessions one after another.
    pub fn decode_batch(
        &self,
        sessions: &mut [&mut Session<'_>],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        if sessions.len() != tokens.len() || sessions.iter().any(|s| !std::ptr::eq(s.engine, self))
        {
            return Err(RuntimeError::Exec(ExecError::Run(format!(
                "a batched decode step takes one token for each session of this engine \
                 ({} tokens, {} sessions)",
                tokens.len(),
                sessions.len()
            ))));
        }
        let exec = match &self.exec {
            Some(exec) if sessions.len() > 1 => exec,
            _ => {
                return sessions
                    .iter_mut()
                    .zip(tokens)
                    .map(|(s, &t)| s.eval_last(&[t]))
                    .collect();
            }
        };
        for s in sessions.iter() {
            s.check_room(1)?;
        }
        // A compiled engine's sessions all have an executor state.
        let mut states: Vec<&mut exec::State> = sessions
            .iter_mut()
            .filter_map(|s| s.state.as_mut())
            .collect();
        let mut rows = Vec::new();
        exec.eval_batch(&mut states, tokens, &mut rows)?;
        let mut out = Vec::with_capacity(tokens.len());
        for (i, s) in sessions.iter_mut().enumerate() {
            s.history.push(tokens[i]);
            out.push(rows[i * self.vocab..(i + 1) * self.vocab].to_vec());
        }
        Ok(out)
    }
}

/// The memory of a finished session (KV cache, arenas), emptied, to start the next session of
/// the same engine with: [`Engine::session_from`].
pub struct SpareSession {
    engine: u64,
    kv: KvCache,
    state: Option<exec::State>,
    history: Vec<u32>,
    arena: Vec<u8>,
}

/// One sequence: its KV cache, the tokens in it, and the arena its steps compute in.
pub struct Session<'e> {
    engine: &'e Engine,
    kv: KvCache,
    state: Option<exec::State>,
    history: Vec<u32>,
    arena: Vec<u8>,
    /// This session's number (which session a GPU cache slot holds).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    id: u64,
    /// Where this session's decode steps meet other sessions' ([`Session::join`]).
    batcher: Option<batch::Attached>,
    /// The GPU cache slot this session holds, once it has evaluated there.
    #[cfg(feature = "cuda")]
    gpu_slot: Option<GpuSlot<'e>>,
}

impl Session<'_> {
    /// Evaluates on the GPU, when the engine runs there.
    #[cfg(feature = "cuda")]
    fn eval_gpu(
        &mut self,
        tokens: &[u32],
        rows: LogitRows,
    ) -> Option<Result<Vec<f32>, RuntimeError>> {
        self.on_gpu(tokens, |g, slot, pos0| g.eval(slot, tokens, pos0, rows))
    }

    /// As `eval_gpu` for the last token, returning the most likely next token (found on the
    /// device).
    #[cfg(feature = "cuda")]
    fn argmax_gpu(&mut self, tokens: &[u32]) -> Option<Result<u32, RuntimeError>> {
        self.on_gpu(tokens, |g, slot, pos0| g.eval_argmax(slot, tokens, pos0))
    }

    #[cfg(not(feature = "cuda"))]
    fn argmax_gpu(&mut self, _tokens: &[u32]) -> Option<Result<u32, RuntimeError>> {
        None
    }

    /// Runs `f` (evaluating `tokens` in this session's cache slot at its position) on the
    /// engine's GPU, when it has one. A session takes a free slot the first time, or else the
    /// one used longest ago; a session whose slot another one took meanwhile gets an error
    /// (its sequence is gone) until it is reset.
    #[cfg(feature = "cuda")]
    fn on_gpu<T>(
        &mut self,
        tokens: &[u32],
        f: impl FnOnce(&mut cuda::CudaExecutor, usize, usize) -> Result<T, cuda::GpuError>,
    ) -> Option<Result<T, RuntimeError>> {
        let gpu = self.engine.gpu.as_ref()?;
        Some((|| {
            self.check_room(tokens.len())?;
            // A slot given up here is dropped after the lock (its drop takes the lock).
            let mut _stale = None;
            let mut guard = gpu.lock().unwrap_or_else(|e| e.into_inner());
            let g = &mut *guard;
            let slot = match self.gpu_slot.as_ref().map(|s| s.slot) {
                Some(slot) if g.owners[slot] == Some(self.id) => slot,
                held => {
                    if held.is_some() && !self.history.is_empty() {
                        return Err(RuntimeError::Gpu(format!(
                            "another session has taken this one's KV cache on the GPU, which \
                             holds {} at a time (reset this session to start over)",
                            g.owners.len()
                        )));
                    }
                    let slot = match g.owners.iter().position(Option::is_none) {
                        Some(free) => free,
                        None => (0..g.owners.len()).min_by_key(|&i| g.used[i]).unwrap_or(0),
                    };
                    g.owners[slot] = Some(self.id);
                    slot
                }
            };
            if self.gpu_slot.as_ref().map(|s| s.slot) != Some(slot) {
                _stale = self.gpu_slot.replace(GpuSlot {
                    engine: self.engine,
                    slot,
                    session: self.id,
                });
            }
            g.clock += 1;
            g.used[slot] = g.clock;
            let pos0 = self.history.len();
            let out = f(&mut g.exec, slot, pos0).map_err(|e| RuntimeError::Gpu(e.to_string()))?;
            self.history.extend_from_slice(tokens);
            Ok(out)
        })())
    }

    #[cfg(not(feature = "cuda"))]
    fn eval_gpu(
        &mut self,
        _tokens: &[u32],
        _rows: LogitRows,
    ) -> Option<Result<Vec<f32>, RuntimeError>> {
        None
    }

    /// Positions evaluated so far.
    pub fn position(&self) -> usize {
        if self.engine.gpu.is_some() {
            return self.history.len();
        }
        match &self.state {
            Some(s) => s.len(),
            None => self.kv.len(),
        }
    }

    /// Positions the session's KV cache holds.
    pub fn capacity(&self) -> usize {
        if self.engine.gpu.is_some() {
            return self.engine.context;
        }
        match &self.state {
            Some(s) => s.capacity(),
            None => self.kv.capacity(),
        }
    }

    /// Makes this session's one-token steps ([`Session::eval_last`] of one token, as
    /// generation decodes) meet those of the other sessions joined to `batcher`, in one
    /// batched step (bit-identical logits). Only a session of the compiled executor joins;
    /// on the interpreter and the GPU this does nothing. It leaves when dropped or made spare.
    pub fn join(&mut self, batcher: &Arc<batch::DecodeBatcher>) -> Result<(), RuntimeError> {
        if !batcher.belongs_to(self.engine) {
            return Err(RuntimeError::Exec(ExecError::Run(
                "a session can only join a batcher of its own engine".into(),
            )));
        }
        if self.engine.exec.is_some() {
            self.batcher = Some(batcher.attach());
        }
        Ok(())
    }

    /// Evaluates `tokens` like [`Session::eval_last`] and returns the index of the largest of
    /// the last token's logits (the lowest on ties): greedy decoding's next token. On a GPU
    /// it is found there, and only it is copied back.
    pub fn eval_argmax(&mut self, tokens: &[u32]) -> Result<u32, RuntimeError> {
        if let Some(r) = self.argmax_gpu(tokens) {
            return r;
        }
        Ok(sampling::argmax(&self.eval_last(tokens)?))
    }

    /// Evaluates `tokens` like [`Session::eval`] and returns the last token's logits only
    /// (the output projection runs for that token alone, as in generation).
    pub fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        if let Some(r) = self.eval_gpu(tokens, LogitRows::Last) {
            return r;
        }
        if self.state.is_some() {
            self.check_room(tokens.len())?;
        }
        if let (Some(b), Some(exec), [token]) = (&self.batcher, &self.engine.exec, tokens) {
            let out = b.0.decode(exec, &mut self.state, *token)?;
            self.history.push(*token);
            return Ok(out);
        }
        match (&self.engine.exec, &mut self.state) {
            (Some(exec), Some(state)) => {
                let mut out = Vec::new();
                exec.eval(state, tokens, LogitRows::Last, &mut out)?;
                self.history.extend_from_slice(tokens);
                Ok(out)
            }
            _ => {
                let all = self.eval(tokens)?;
                let vocab = self.engine.vocab;
                Ok(all[all.len() - vocab..].to_vec())
            }
        }
    }

    fn check_room(&self, n: usize) -> Result<(), RuntimeError> {
        if n == 0 {
            return Err(RuntimeError::Empty);
        }
        if self.position() + n > self.capacity() {
            return Err(RuntimeError::ContextFull {
                needed: n,
                capacity: self.capacity(),
                used: self.position(),
            });
        }
        Ok(())
    }

    /// Evaluates `tokens` after the cached positions; returns their logits, `tokens.len()`
    /// rows of `vocab_size` values.
    pub fn eval(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        if let Some(r) = self.eval_gpu(tokens, LogitRows::All) {
            return r;
        }
        if self.state.is_some() {
            self.check_room(tokens.len())?;
        }
        if let (Some(exec), Some(state)) = (&self.engine.exec, &mut self.state) {
            let mut out = Vec::new();
            exec.eval(state, tokens, LogitRows::All, &mut out)?;
            self.history.extend_from_slice(tokens);
            return Ok(out);
        }
        if tokens.is_empty() {
            return Err(RuntimeError::Empty);
        }
        let start = self.kv.len() as i32;
        let ids: Vec<i32> = tokens
            .iter()
            .map(|&t| t.min(i32::MAX as u32) as i32)
            .collect();
        let positions: Vec<i32> = (0..tokens.len() as i32).map(|i| start + i).collect();
        let mut out = interp::run_plan(
            &self.engine.plan,
            self.engine.weights.as_ref(),
            Inputs {
                tokens: &ids,
                positions: &positions,
            },
            &mut self.kv,
            &mut self.arena,
        )?;
        let logits = out.remove("logits").ok_or(RuntimeError::NoLogits)?;
        self.history.extend_from_slice(tokens);
        Ok(match logits.data {
            interp::Data::F32(v) => v,
            _ => return Err(RuntimeError::NoLogits),
        })
    }

    /// The tokens evaluated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Keeps the first `n` positions and forgets the rest.
    pub fn rewind(&mut self, n: usize) {
        self.kv.truncate(n);
        if let Some(s) = &mut self.state {
            s.truncate(n);
        }
        self.history.truncate(n);
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.rewind(0);
    }

    /// Ends the session, keeping its memory for the engine's next one.
    pub fn into_spare(mut self) -> SpareSession {
        self.reset();
        SpareSession {
            engine: self.engine.id,
            kv: self.kv,
            state: self.state,
            history: self.history,
            arena: self.arena,
        }
    }
}
