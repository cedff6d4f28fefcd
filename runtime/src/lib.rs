//! The runtime: an [`Engine`] holds a model's plan and weights; a [`Session`] holds one
//! sequence's KV cache and position and evaluates tokens through it (prefill with many tokens,
//! decode with one). [`tokenizer`] turns text into tokens and back.

pub mod chat;
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
}

/// A model ready to run: its plan, its weights, and the plan compiled for this host (or the
/// reference interpreter).
pub struct Engine {
    plan: Plan,
    weights: Arc<dyn WeightSource + Send + Sync>,
    vocab: usize,
    context: usize,
    exec: Option<Executor>,
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
        })
    }

    /// The compiled executor, when the engine has one.
    pub fn executor(&self) -> Option<&Executor> {
        self.exec.as_ref()
    }

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
            kv: KvCache::new(if self.exec.is_some() { 0 } else { self.context }),
            state: self.exec.as_ref().map(|e| e.state(self.context)),
            history: Vec::new(),
            arena: Vec::new(),
        }
    }
}

/// One sequence: its KV cache, the tokens in it, and the arena its steps compute in.
pub struct Session<'e> {
    engine: &'e Engine,
    kv: KvCache,
    state: Option<exec::State>,
    history: Vec<u32>,
    arena: Vec<u8>,
}

impl Session<'_> {
    /// Positions evaluated so far.
    pub fn position(&self) -> usize {
        match &self.state {
            Some(s) => s.len(),
            None => self.kv.len(),
        }
    }

    /// Positions the session's KV cache holds.
    pub fn capacity(&self) -> usize {
        match &self.state {
            Some(s) => s.capacity(),
            None => self.kv.capacity(),
        }
    }

    /// Evaluates `tokens` like [`Session::eval`] and returns the last token's logits only
    /// (the output projection runs for that token alone, as in generation).
    pub fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        if self.state.is_some() {
            self.check_room(tokens.len())?;
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
}
