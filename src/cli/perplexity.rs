//! `bitnetc perplexity`.

use super::Result;
use crate::KvCacheType;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct PerplexityArgs {
    /// The model: a GGUF file or a compiled plan (.bplan); the built-in tiny Shakespeare model
    /// when left out
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// The text to score
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Tokens per window; the second half of each window is scored
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Score at most this many windows (default: every whole window of the text)
    #[arg(long)]
    pub chunks: Option<usize>,
    /// KV cache element type
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    pub kv_cache: KvCacheType,
    #[command(flatten)]
    pub exec: super::ExecArgs,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    let model = super::load(
        a.model.as_deref(),
        a.kv_cache,
        Some(a.ctx_size),
        None,
        &a.exec,
    )?;
    let trained = model.config.context_length as usize;
    if a.ctx_size > trained {
        eprintln!(
            "warning: windows of {} tokens are longer than the {trained} positions the model was \
             trained on; its perplexity there says little (use -c {trained} or less)",
            a.ctx_size
        );
    }
    let tokens = model.tokenizer()?.encode(&text, true, false);
    let n_tokens = tokens.len();
    let available = n_tokens / a.ctx_size.max(1);
    let chunks = a.chunks.map_or(available, |c| c.min(available));
    eprintln!(
        "perplexity: {n_tokens} tokens, {chunks} windows of {} (the second half of each scored)",
        a.ctx_size
    );
    let started = Instant::now();
    let p = bitnetc::perplexity::perplexity_tokens(&model, &tokens, a.ctx_size, a.chunks, |p| {
        if p.chunks == 1 {
            let s = started.elapsed().as_secs_f64();
            eprintln!(
                "perplexity: {s:.2} seconds per window, about {:.0} s in all",
                s * chunks as f64
            );
        }
        print!("[{}]{:.4},", p.chunks, p.ppl());
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    println!();
    println!("Final estimate: PPL = {:.4} +/- {:.5}", p.ppl(), p.error());
    eprintln!(
        "perplexity: {} tokens scored in {:.2} s",
        p.count,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
