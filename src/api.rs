//! The Rust API: an [`Engine`] is a loaded model (a GGUF file or a compiled plan), a
//! [`Session`] one conversation with it (its KV cache), [`Session::generate`] a stream of
//! tokens, [`Session::logits`] raw scores, and [`Metrics`] what it all cost.
//!
//! ```
//! use bitnetc::{Engine, LoadOptions, SamplingParams};
//!
//! # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bitnetcpp-tiny-i2_s.gguf");
//! let engine = Engine::load(model, LoadOptions::default())?;
//! let mut session = engine.session();
//! let mut text = String::new();
//! for token in session.generate_with("Once upon a time", &SamplingParams::greedy(), 8)? {
//!     text += &token?.text;
//! }
//! let m = session.metrics();
//! assert_eq!(m.decode_tokens, 8);
//! println!("{text} ({:.1} tokens/s)", m.decode_tokens_per_second());
//! # Ok::<(), bitnetc::Error>(())
//! ```

use crate::{Error, LoadOptions, Model};
use runtime::generate::{FinishReason, GenerateOptions, Generation, Token};
use runtime::sampling::{Sampler, SamplingParams};
use runtime::tokenizer::Tokenizer;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::runtime;

/// A model ready to run. See the [module documentation](self).
pub struct Engine {
    model: Model,
}

impl From<Model> for Engine {
    fn from(model: Model) -> Engine {
        Engine { model }
    }
}

impl Engine {
    /// Opens a GGUF model or a compiled plan (`.bplan`) and binds it to kernels for this CPU.
    ///
    /// ```
    /// # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bitnetcpp-tiny-i2_s.gguf");
    /// let engine = bitnetc::Engine::load(model, bitnetc::LoadOptions::default())?;
    /// assert_eq!(engine.model().config.vocab_size, 2048);
    /// # Ok::<(), bitnetc::Error>(())
    /// ```
    ///
    /// Every failure names its stage and, where there is one, a fix:
    ///
    /// ```
    /// let e = bitnetc::Engine::load("no/such/model.gguf", Default::default()).err().unwrap();
    /// assert_eq!(e.stage(), bitnetc::Stage::Read);
    /// assert!(e.to_string().starts_with("no/such/model.gguf"));
    /// assert!(e.fix().unwrap().contains("path"));
    /// ```
    pub fn load(path: impl AsRef<Path>, options: LoadOptions) -> Result<Engine, Error> {
        Ok(Engine {
            model: crate::load(path.as_ref(), options)?,
        })
    }

    /// The loaded model: its file, config and runtime engine.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer, or an error when the file has none.
    ///
    /// ```
    /// # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bitnetcpp-tiny-i2_s.gguf");
    /// # let engine = bitnetc::Engine::load(model, bitnetc::LoadOptions::default())?;
    /// let t = engine.tokenizer()?;
    /// let ids = t.encode("Hello, world!", false, false);
    /// assert_eq!(t.decode(&ids, false), "Hello, world!");
    /// # Ok::<(), bitnetc::Error>(())
    /// ```
    pub fn tokenizer(&self) -> Result<&Tokenizer, Error> {
        self.model.tokenizer()
    }

    /// A new session with an empty KV cache of the context the engine was loaded with.
    pub fn session(&self) -> Session<'_> {
        Session {
            engine: self,
            inner: self.model.engine.session(),
            counters: Counters::default(),
        }
    }

    /// Load and compile times and memory; a session's [`Session::metrics`] adds its own.
    pub fn metrics(&self) -> Metrics {
        let file = &self.model.file;
        let exec = self.model.engine.executor();
        let mapped: u64 = file.tensors().iter().map(|t| t.nbytes).sum();
        Metrics {
            load: self.model.load_time,
            compile: self.model.compile_time,
            weight_bytes: mapped + exec.map_or(0, |e| e.owned_weight_bytes()),
            arena_bytes: exec.map_or(0, |e| e.arena_bytes()),
            ..Metrics::default()
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    prefill: Duration,
    prefill_tokens: usize,
    decode: Duration,
    decode_tokens: usize,
}

/// One sequence through an [`Engine`]: its KV cache and what it has cost so far.
pub struct Session<'e> {
    engine: &'e Engine,
    inner: runtime::Session<'e>,
    counters: Counters,
}

impl<'e> Session<'e> {
    /// Generates from `prompt` (tokenized with the model's special tokens) until an
    /// end-of-generation token or a full context. See [`Session::generate_with`].
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &SamplingParams,
    ) -> Result<Stream<'_, 'e>, Error> {
        self.generate_options(prompt, params, GenerateOptions::default())
    }

    /// [`Session::generate`] with at most `max_tokens` tokens.
    pub fn generate_with(
        &mut self,
        prompt: &str,
        params: &SamplingParams,
        max_tokens: usize,
    ) -> Result<Stream<'_, 'e>, Error> {
        let options = GenerateOptions {
            max_tokens: Some(max_tokens),
            ..GenerateOptions::default()
        };
        self.generate_options(prompt, params, options)
    }

    /// [`Session::generate`] with every stopping option (stop strings, `ignore_eos`, …). The
    /// session holds the prompt and the generated tokens afterwards; a new prompt that starts
    /// with them reuses their cache.
    pub fn generate_options(
        &mut self,
        prompt: &str,
        params: &SamplingParams,
        options: GenerateOptions,
    ) -> Result<Stream<'_, 'e>, Error> {
        let tokenizer = self.engine.tokenizer()?;
        let ids = tokenizer.encode(prompt, true, true);
        let Session {
            inner, counters, ..
        } = self;
        let inner = inner.generate(tokenizer, &ids, Sampler::new(params.clone()), options)?;
        let t = inner.timings();
        counters.prefill += t.prompt_time;
        counters.prefill_tokens += t.prompt_tokens;
        Ok(Stream {
            inner,
            counters,
            counted: (Duration::ZERO, 0),
        })
    }

    /// Evaluates `tokens` after what the session holds and returns every one's logits, one
    /// row of the vocabulary's size per token.
    ///
    /// ```
    /// # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bitnetcpp-tiny-i2_s.gguf");
    /// # let engine = bitnetc::Engine::load(model, bitnetc::LoadOptions::default())?;
    /// let mut session = engine.session();
    /// let logits = session.logits(&[1, 2, 3])?;
    /// assert_eq!(logits.len(), 3 * 2048);
    /// assert_eq!(session.position(), 3);
    /// # Ok::<(), bitnetc::Error>(())
    /// ```
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        let t0 = Instant::now();
        let out = self.inner.eval(tokens)?;
        self.counters.prefill += t0.elapsed();
        self.counters.prefill_tokens += tokens.len();
        Ok(out)
    }

    /// Positions the session holds.
    pub fn position(&self) -> usize {
        self.inner.position()
    }

    /// Empties the session (its metrics stay).
    pub fn reset(&mut self) {
        self.inner.reset();
    }

    /// The engine's metrics plus this session's prefill and decode work and its KV cache.
    ///
    /// ```
    /// # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bitnetcpp-tiny-i2_s.gguf");
    /// let options = bitnetc::LoadOptions { context: Some(64), ..Default::default() };
    /// let engine = bitnetc::Engine::load(model, options)?;
    /// let mut session = engine.session();
    /// session.logits(&[1, 2, 3, 4])?;
    /// let m = session.metrics();
    /// assert_eq!(m.prefill_tokens, 4);
    /// // 4 layers × keys and values × 2 KV heads × 32 dims × 2 bytes (f16), 64 positions.
    /// assert_eq!(m.kv_cache_bytes, 4 * 2 * 2 * 32 * 2 * 64);
    /// // The tensors of the file, all mapped: F16 embedding, F32 norms, I2_S matrices.
    /// assert_eq!(m.weight_bytes, 1_048_576 + 25_600 + 754_560);
    /// assert!(m.load > std::time::Duration::ZERO && m.compile > std::time::Duration::ZERO);
    /// # Ok::<(), bitnetc::Error>(())
    /// ```
    pub fn metrics(&self) -> Metrics {
        let c = self.counters;
        let kv = self
            .engine
            .model
            .engine
            .executor()
            .map_or(0, |e| e.kv_bytes_per_position());
        Metrics {
            prefill: c.prefill,
            prefill_tokens: c.prefill_tokens,
            decode: c.decode,
            decode_tokens: c.decode_tokens,
            kv_cache_bytes: kv * self.inner.capacity() as u64,
            ..self.engine.metrics()
        }
    }
}

/// Generated tokens as they come; each has its id and the text it completes (text can lag a
/// token while a character or a possible stop string is incomplete: [`Stream::flush`] gives
/// what is left at the end).
pub struct Stream<'s, 'e> {
    inner: Generation<'s, 'e>,
    counters: &'s mut Counters,
    counted: (Duration, usize),
}

impl Stream<'_, '_> {
    /// Why the generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.inner.finish_reason()
    }

    /// Text held back at the end; call when the iterator is done.
    pub fn flush(&mut self) -> String {
        self.inner.flush()
    }

    /// Runs the generation to its end and returns all its text.
    pub fn text(mut self) -> Result<String, Error> {
        let mut s = String::new();
        for t in self.by_ref() {
            s += &t?.text;
        }
        Ok(s + &self.flush())
    }
}

impl Iterator for Stream<'_, '_> {
    type Item = Result<Token, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.inner.next();
        let t = self.inner.timings();
        self.counters.decode += t.generation_time.saturating_sub(self.counted.0);
        self.counters.decode_tokens += t.generated_tokens - self.counted.1;
        self.counted = (t.generation_time, t.generated_tokens);
        next.map(|r| r.map_err(Error::from))
    }
}

/// What loading and running cost. Times are wall-clock; bytes are what the engine maps or
/// allocates (weights mapped from the file count in full, whether or not they are resident).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Opening, lowering and optimizing the model (or reading a compiled plan).
    pub load: Duration,
    /// Binding the plan to kernels: choosing, generating, re-encoding.
    pub compile: Duration,
    pub prefill: Duration,
    pub prefill_tokens: usize,
    pub decode: Duration,
    pub decode_tokens: usize,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub arena_bytes: u64,
}

impl Metrics {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_tokens as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}
