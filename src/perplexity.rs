//! Perplexity by llama.cpp's method (`llama-perplexity`): the text tokenized once (with BOS
//! when the model adds one), cut into non-overlapping windows of `n_ctx` tokens, each window
//! evaluated from an empty cache with its first token replaced by BOS, and the second half of
//! every window scored: `nll = −log softmax(logits[j])[token j+1]` for `j` from `n_ctx/2` to
//! `n_ctx − 2`, summed in double. `PPL = exp(mean nll)`, and its uncertainty
//! `PPL · sqrt((mean nll² − mean nll²)/(count − 1))`.

use crate::{Error, Model};

/// The running result after each window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// Windows scored.
    pub chunks: usize,
    /// Tokens scored.
    pub count: usize,
    pub nll: f64,
    pub nll2: f64,
}

impl Perplexity {
    /// `exp(mean nll)`.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.count as f64).exp()
    }

    /// llama.cpp's ± figure: `PPL · sqrt(var(nll)/(count − 1))`.
    pub fn error(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        if var > 0.0 && self.count > 1 {
            self.ppl() * (var / (n - 1.0)).sqrt()
        } else {
            0.0
        }
    }
}

/// `−log softmax(logits)[token]`, in double as llama.cpp computes it.
pub fn nll(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    -((logits[token as usize] - max) as f64 - sum.ln())
}

/// Scores `text` with `model` in windows of `n_ctx` tokens (at most `chunks` windows; all that
/// fit when `None`), calling `progress` after each window.
pub fn perplexity(
    model: &Model,
    text: &str,
    n_ctx: usize,
    chunks: Option<usize>,
    progress: impl FnMut(&Perplexity),
) -> Result<Perplexity, Error> {
    let tokens = model.tokenizer()?.encode(text, true, false);
    perplexity_tokens(model, &tokens, n_ctx, chunks, progress)
}

/// [`perplexity`] of a text already tokenized (with the model's BOS, as `encode(text, true,
/// false)` gives it).
pub fn perplexity_tokens(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    chunks: Option<usize>,
    mut progress: impl FnMut(&Perplexity),
) -> Result<Perplexity, Error> {
    let spec = model.tokenizer()?.spec();
    let bos = spec.bos.filter(|_| spec.add_bos);
    if n_ctx < 4 {
        return Err(Error::Tokenizer(format!(
            "a window of {n_ctx} tokens is too short (at least 4)"
        )));
    }
    let available = tokens.len() / n_ctx;
    if available == 0 {
        return Err(Error::Tokenizer(format!(
            "the text has {} tokens, fewer than one window of {n_ctx} (lower -c or give more text)",
            tokens.len()
        )));
    }
    let n = chunks.map_or(available, |c| c.min(available));
    let vocab = model.engine.vocab_size();
    let first = n_ctx / 2;
    let mut p = Perplexity {
        chunks: 0,
        count: 0,
        nll: 0.0,
        nll2: 0.0,
    };
    for c in 0..n {
        let mut window = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        let mut session = model.engine.session();
        let logits = session.eval(&window)?;
        for j in first..n_ctx - 1 {
            let v = nll(
                &logits[j * vocab..(j + 1) * vocab],
                tokens[c * n_ctx + j + 1],
            );
            p.nll += v;
            p.nll2 += v * v;
        }
        p.count += n_ctx - 1 - first;
        p.chunks += 1;
        progress(&p);
    }
    Ok(p)
}
