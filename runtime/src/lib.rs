//! The runtime: an [`Engine`] holds a model's plan and weights; a [`Session`] holds one
//! sequence's KV cache and position and evaluates tokens through it (prefill with many tokens,
//! decode with one). [`tokenizer`] turns text into tokens and back.

pub mod chat;
pub mod generate;
pub mod sampling;
pub mod tokenizer;

use bitnetc_ir::IrError;
use bitnetc_ir::interp::{self, Inputs, InterpError, KvCache, WeightSource};
use bitnetc_ir::plan::Plan;
use std::sync::Arc;

/// What went wrong running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Interp(#[from] InterpError),
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

/// A model ready to run: its plan and its weights.
pub struct Engine {
    plan: Plan,
    weights: Arc<dyn WeightSource + Send + Sync>,
    vocab: usize,
    context: usize,
}

impl Engine {
    /// Checks the plan and binds it to its weights. `context` is the KV cache size of each
    /// session, in positions.
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
        })
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
            kv: KvCache::new(self.context),
            history: Vec::new(),
            arena: Vec::new(),
        }
    }
}

/// One sequence: its KV cache, the tokens in it, and the arena its steps compute in.
pub struct Session<'e> {
    engine: &'e Engine,
    kv: KvCache,
    history: Vec<u32>,
    arena: Vec<u8>,
}

impl Session<'_> {
    /// Positions evaluated so far.
    pub fn position(&self) -> usize {
        self.kv.len()
    }

    /// Positions the session's KV cache holds.
    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Evaluates `tokens` after the cached positions; returns their logits, `tokens.len()`
    /// rows of `vocab_size` values.
    pub fn eval(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
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
        self.history.truncate(n);
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.rewind(0);
    }
}
