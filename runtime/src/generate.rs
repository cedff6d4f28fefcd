//! Generation: a prompt is evaluated in one step, then tokens are sampled one at a time and fed
//! back, streamed as text, until an end-of-generation token, a stop string, the token limit or
//! the end of the context.

use crate::sampling::Sampler;
use crate::tokenizer::{TextStream, Tokenizer};
use crate::{RuntimeError, Session};
use std::time::{Duration, Instant};

/// When a generation stops.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate; `None` runs until another limit.
    pub max_tokens: Option<usize>,
    /// Keep going past end-of-generation tokens (they are fed back like any other token).
    pub ignore_eos: bool,
    /// Stop when the text contains one of these; the text stops before it.
    pub stop: Vec<String>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    EndOfGeneration,
    MaxTokens,
    StopString,
    ContextFull,
}

/// One generated token and the text it completes.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: u32,
    /// New text, ready to print (may be empty while a character or a possible stop string is
    /// incomplete).
    pub text: String,
}

/// Prompt and generation timings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generation_time: Duration,
}

impl Timings {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    pub fn generation_tokens_per_second(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_time.as_secs_f64().max(1e-9)
    }
}

/// A running generation; iterate it for tokens.
pub struct Generation<'s, 'e> {
    session: &'s mut Session<'e>,
    tokenizer: &'s Tokenizer,
    sampler: Sampler,
    options: GenerateOptions,
    /// What the next token is drawn from: the last logits, or (greedy) the token itself.
    next: Option<Next>,
    stream: TextStream,
    /// Text held back because it may be the start of a stop string.
    held: String,
    finish: Option<FinishReason>,
    timings: Timings,
}

/// The result of evaluating a step of generation.
enum Next {
    Logits(Vec<f32>),
    /// A greedy sampler's pick, made where the logits are (on a GPU: only it is copied back).
    Token(u32),
}

impl Next {
    fn eval(
        session: &mut Session<'_>,
        tokens: &[u32],
        sampler: &Sampler,
    ) -> Result<Next, RuntimeError> {
        Ok(if sampler.is_greedy() {
            Next::Token(session.eval_argmax(tokens)?)
        } else {
            Next::Logits(session.eval_last(tokens)?)
        })
    }
}

impl<'e> Session<'e> {
    /// Makes the session hold `prompt` (the whole sequence, not a continuation: the part it
    /// shares with what the session already holds is kept, the rest evaluated) and returns the
    /// generation that follows. The sampler has seen the prompt tokens (for its repetition
    /// penalty).
    pub fn generate<'s>(
        &'s mut self,
        tokenizer: &'s Tokenizer,
        prompt: &[u32],
        mut sampler: Sampler,
        options: GenerateOptions,
    ) -> Result<Generation<'s, 'e>, RuntimeError> {
        if prompt.is_empty() {
            return Err(RuntimeError::Empty);
        }
        if prompt.len() >= self.capacity() {
            return Err(RuntimeError::ContextFull {
                needed: prompt.len() + 1,
                capacity: self.capacity(),
                used: 0,
            });
        }
        // Reuse the cached prefix, but evaluate at least the last prompt token for its logits.
        let shared = self
            .tokens()
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.rewind(shared);
        let started = Instant::now();
        let fresh = &prompt[shared..];
        let next = Next::eval(self, fresh, &sampler)?;
        for &t in prompt {
            sampler.accept(t);
        }
        let timings = Timings {
            prompt_tokens: fresh.len(),
            prompt_time: started.elapsed(),
            ..Timings::default()
        };
        Ok(Generation {
            session: self,
            tokenizer,
            sampler,
            options,
            next: Some(next),
            stream: TextStream::default(),
            held: String::new(),
            finish: None,
            timings,
        })
    }
}

impl Generation<'_, '_> {
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Why the generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Text held back at the end (an incomplete character or the start of a stop string that
    /// never completed); call when the iterator is done.
    pub fn flush(&mut self) -> String {
        let mut s = std::mem::take(&mut self.held);
        if self.finish != Some(FinishReason::StopString) {
            s += &self.stream.finish();
        }
        s
    }

    /// Splits new text into what can be shown now and what must wait, given the stop strings.
    fn release(&mut self, text: String) -> String {
        self.held += &text;
        if self.options.stop.is_empty() {
            return std::mem::take(&mut self.held);
        }
        if let Some(pos) = self
            .options
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.finish = Some(FinishReason::StopString);
            let out = self.held[..pos].to_string();
            self.held.clear();
            return out;
        }
        // Keep the longest tail that could still grow into a stop string.
        let keep = self
            .options
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }
}

impl Iterator for Generation<'_, '_> {
    type Item = Result<Token, RuntimeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finish.is_some() {
            return None;
        }
        let id = match self.next.take()? {
            Next::Logits(logits) => self.sampler.sample(&logits),
            Next::Token(id) => id,
        };
        self.sampler.accept(id);
        self.timings.generated_tokens += 1;
        let eog = self.tokenizer.is_end_of_generation(id);
        if eog && !self.options.ignore_eos {
            self.finish = Some(FinishReason::EndOfGeneration);
            return Some(Ok(Token {
                id,
                text: String::new(),
            }));
        }
        let piece = self.tokenizer.token_bytes(id, false);
        let text = self.stream.push(&piece);
        let text = self.release(text);
        if self.finish.is_none()
            && self
                .options
                .max_tokens
                .is_some_and(|m| self.timings.generated_tokens >= m)
        {
            self.finish = Some(FinishReason::MaxTokens);
        }
        if self.finish.is_none() {
            if self.session.position() >= self.session.capacity() {
                self.finish = Some(FinishReason::ContextFull);
            } else {
                let started = Instant::now();
                match Next::eval(self.session, &[id], &self.sampler) {
                    Ok(n) => self.next = Some(n),
                    Err(e) => return Some(Err(e)),
                }
                self.timings.generation_time += started.elapsed();
            }
        }
        Some(Ok(Token { id, text }))
    }
}
