//! Batched decoding of sessions that generate on different threads.
//!
//! Each session generates on its own thread, as one request of a server does. When sessions
//! are attached to a [`DecodeBatcher`], their one-token decode steps meet in it: the first
//! thread to find every attached session waiting (or to have waited [`DecodeBatcher::WAIT`])
//! runs one step for all of them through [`Executor::eval_batch`], the weights read once for
//! every token, and hands each thread its logits. Each session's logits are bit-identical to
//! its step alone.

use crate::exec::{ExecError, Executor, State};
use crate::{Engine, RuntimeError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the decode steps of an engine's sessions meet; see the module's documentation.
pub struct DecodeBatcher {
    engine: u64,
    inner: Mutex<Inner>,
    ready: Condvar,
    steps: AtomicU64,
    tokens: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Sessions attached now.
    attached: usize,
    /// Steps waiting to run, and when the oldest came.
    pending: Vec<Pending>,
    oldest: Option<Instant>,
    /// A thread is running a step.
    running: bool,
    next_ticket: u64,
    done: HashMap<u64, Finished>,
}

/// A finished step of one session: its state back, and its logits or the step's error.
type Finished = (State, Result<Vec<f32>, String>);

struct Pending {
    ticket: u64,
    state: State,
    token: u32,
}

/// A session's membership in a batcher; leaving drops it.
pub(crate) struct Attached(pub(crate) Arc<DecodeBatcher>);

impl Drop for Attached {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.attached -= 1;
        // Those waiting for every session may now have them all.
        self.0.ready.notify_all();
    }
}

impl DecodeBatcher {
    /// How long waiting steps wait for attached sessions that have not come (one in its
    /// prompt, or one whose client reads slowly) before they run without them.
    pub const WAIT: Duration = Duration::from_millis(2);

    /// A batcher for the sessions of `engine`.
    pub fn new(engine: &Engine) -> Arc<DecodeBatcher> {
        Arc::new(DecodeBatcher {
            engine: engine.id,
            inner: Mutex::new(Inner::default()),
            ready: Condvar::new(),
            steps: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        })
    }

    /// Decode steps run, and the tokens they held: their ratio is the mean batch size.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.steps.load(Ordering::Relaxed),
            self.tokens.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn belongs_to(&self, engine: &Engine) -> bool {
        self.engine == engine.id
    }

    pub(crate) fn attach(self: &Arc<Self>) -> Attached {
        self.lock().attached += 1;
        Attached(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One decode step of `token` in `state` (taken out of `slot` while the step is pending and
    /// put back after), batched with the steps of the other attached sessions.
    pub(crate) fn decode(
        &self,
        exec: &Executor,
        slot: &mut Option<State>,
        token: u32,
    ) -> Result<Vec<f32>, RuntimeError> {
        let state = slot.take().expect("a compiled session has a state");
        let mut g = self.lock();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.pending.push(Pending {
            ticket,
            state,
            token,
        });
        g.oldest.get_or_insert_with(Instant::now);
        self.ready.notify_all();
        loop {
            if let Some((state, result)) = g.done.remove(&ticket) {
                *slot = Some(state);
                return result.map_err(|m| RuntimeError::Exec(ExecError::Run(m)));
            }
            if g.running || g.pending.is_empty() {
                g = self.ready.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let waited = g.oldest.map_or(Duration::ZERO, |t| t.elapsed());
            let everyone = g.pending.len() >= g.attached;
            if !everyone && waited < Self::WAIT {
                g = self
                    .ready
                    .wait_timeout(g, Self::WAIT - waited)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            // Run the step for everyone pending, this thread's own included or not.
            let batch = std::mem::take(&mut g.pending);
            g.oldest = None;
            g.running = true;
            drop(g);
            let results = self.run(exec, batch);
            g = self.lock();
            g.running = false;
            g.done.extend(results);
            if !g.pending.is_empty() {
                g.oldest = Some(Instant::now());
            }
            self.ready.notify_all();
        }
    }

    /// One step over `batch`; every state comes back with its logits or the step's error.
    fn run(&self, exec: &Executor, batch: Vec<Pending>) -> Vec<(u64, Finished)> {
        let tickets: Vec<u64> = batch.iter().map(|p| p.ticket).collect();
        let tokens: Vec<u32> = batch.iter().map(|p| p.token).collect();
        let mut states: Vec<State> = batch.into_iter().map(|p| p.state).collect();
        let mut out = Vec::new();
        let mut refs: Vec<&mut State> = states.iter_mut().collect();
        // A panic in a kernel must not leave the other threads waiting for ever.
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exec.eval_batch(&mut refs, &tokens, &mut out)
        }));
        let result: Result<(), String> = match step {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("a batched decode step panicked".into()),
        };
        // Steps of the executor: one per `batch` sequences.
        self.steps.fetch_add(
            tokens.len().div_ceil(exec.batch()) as u64,
            Ordering::Relaxed,
        );
        self.tokens
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        let vocab = exec.vocab();
        tickets
            .into_iter()
            .zip(states)
            .enumerate()
            .map(|(i, (ticket, state))| {
                let r = match &result {
                    Ok(()) => Ok(out[i * vocab..(i + 1) * vocab].to_vec()),
                    Err(m) => Err(m.clone()),
                };
                (ticket, (state, r))
            })
            .collect()
    }
}
