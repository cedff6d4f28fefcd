//! `bitnetc run`, `chat` and `tokenize`.

use super::Result;
use crate::KvCacheType;
use bitnetc::runtime::Session;
use bitnetc::runtime::chat::{ChatFormat, Message};
use bitnetc::runtime::generate::{GenerateOptions, Timings};
use bitnetc::runtime::sampling::{Sampler, SamplingParams};
use bitnetc::runtime::tokenizer::Tokenizer;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How a model is opened.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// The model: a GGUF file or a compiled plan (.bplan); the built-in tiny Shakespeare model
    /// when left out
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// Context size in tokens (positions the KV cache holds); default: the model's own
    /// context length
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// KV cache element type
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    pub kv_cache: KvCacheType,
    /// Use this pre-tokenizer instead of the one the model names (default, llama3, gpt-2,
    /// smollm, falcon3, qwen2, …)
    #[arg(long, value_name = "NAME")]
    pub pre_tokenizer: Option<String>,
    #[command(flatten)]
    pub exec: super::ExecArgs,
}

/// How tokens are chosen and when generation stops.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Tokens to generate; -1 runs until an end-of-generation token or the end of the context
    #[arg(short = 'n', long = "n-predict", visible_alias = "max-tokens", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Temperature; 0 always picks the most likely token
    #[arg(long = "temp", visible_alias = "temperature", default_value_t = 0.8)]
    pub temp: f32,
    /// Keep only the k most likely tokens (0: all)
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to p (1: all)
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one (0: none)
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize the tokens of the last repeat-last-n positions (1: off)
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Seed of the sampler; -1 picks one at random
    #[arg(short = 's', long, default_value_t = -1, allow_negative_numbers = true)]
    pub seed: i64,
    /// Stop when the output contains this text (may be repeated)
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        let seed = if self.seed < 0 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        } else {
            self.seed as u64
        };
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        }
    }

    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: (self.n_predict >= 0).then_some(self.n_predict as usize),
            ignore_eos: self.ignore_eos,
            stop: self.stop.clone(),
        }
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file
    #[arg(short = 'f', long = "file", conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// Conversation mode (also -cnv): the prompt is a user message in the model's chat format
    #[arg(long)]
    pub conversation: bool,
    /// System prompt for conversation mode (also -sys)
    #[arg(long = "system-prompt", value_name = "TEXT")]
    pub system_prompt: Option<String>,
    /// Render the model's own Jinja chat template instead of the built-in format it names
    #[arg(long)]
    pub jinja: bool,
    /// Keep escapes such as \n in the prompt as they are
    #[arg(long)]
    pub no_escape: bool,
    /// Do not print the prompt before the output
    #[arg(long)]
    pub no_display_prompt: bool,
    /// Print load time and prompt and generation speed after the output
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Print the generated token ids as a JSON array on stderr
    #[arg(long)]
    pub output_ids: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (also -sys)
    #[arg(long = "system-prompt", value_name = "TEXT")]
    pub system_prompt: Option<String>,
    /// Render the model's own Jinja chat template instead of the built-in format it names
    #[arg(long)]
    pub jinja: bool,
    /// Print prompt and generation speed after each answer
    #[arg(short = 'v', long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// The model: a GGUF file or a compiled plan (.bplan); the built-in tiny Shakespeare model
    /// when left out
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// The text
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// Print only a JSON array of ids
    #[arg(long)]
    pub ids: bool,
    /// Leave out the BOS token even when the model adds one
    #[arg(long)]
    pub no_bos: bool,
    /// Tokenize special-token text such as <|im_end|> as plain text
    #[arg(long)]
    pub no_parse_special: bool,
    /// Use this pre-tokenizer instead of the one the model names
    #[arg(long, value_name = "NAME")]
    pub pre_tokenizer: Option<String>,
}

/// `\n`, `\t`, `\r`, `\\`, `\"`, `\'` as llama.cpp processes them in prompts.
fn process_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn open(m: &ModelArgs) -> Result<(bitnetc::Model, Duration)> {
    let started = Instant::now();
    let model = super::load(
        m.model.as_deref(),
        m.kv_cache,
        m.ctx_size,
        m.pre_tokenizer.clone(),
        &m.exec,
    )?;
    model.tokenizer()?;
    Ok((model, started.elapsed()))
}

fn print_timings(load: Option<Duration>, t: &Timings, seed: u64) {
    if let Some(load) = load {
        eprintln!("load time      = {:10.2} ms", load.as_secs_f64() * 1e3);
    }
    eprintln!(
        "prompt eval    = {:10.2} ms / {:5} tokens ({:8.2} tokens per second)",
        t.prompt_time.as_secs_f64() * 1e3,
        t.prompt_tokens,
        t.prompt_tokens_per_second()
    );
    eprintln!(
        "generation     = {:10.2} ms / {:5} tokens ({:8.2} tokens per second)",
        t.generation_time.as_secs_f64() * 1e3,
        t.generated_tokens,
        t.generation_tokens_per_second()
    );
    eprintln!("seed           = {seed}");
}

/// Generates after `prompt`, printing text as it comes; returns the ids, the text and the timings.
fn stream(
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    sampling: &SamplingArgs,
    params: SamplingParams,
) -> Result<(Vec<u32>, String, Timings)> {
    let mut generation =
        session.generate(tokenizer, prompt, Sampler::new(params), sampling.options())?;
    let mut out = std::io::stdout().lock();
    let (mut ids, mut text) = (Vec::new(), String::new());
    for token in generation.by_ref() {
        let token = token?;
        ids.push(token.id);
        text += &token.text;
        out.write_all(token.text.as_bytes())?;
        out.flush()?;
    }
    let rest = generation.flush();
    out.write_all(rest.as_bytes())?;
    text += &rest;
    out.flush()?;
    Ok((ids, text, generation.timings()))
}

/// A reply of the built-in model ends at a blank line, as a speech does in the plays it learned
/// from (it has no end-of-turn token).
fn builtin_reply_stop(model: &ModelArgs, sampling: &mut SamplingArgs) {
    if model.model.is_none() && sampling.stop.is_empty() {
        sampling.stop.push(bitnetc::builtin::REPLY_STOP.into());
    }
}

pub fn run(mut a: RunArgs) -> Result<()> {
    if a.conversation {
        builtin_reply_stop(&a.model, &mut a.sampling);
    }
    let raw = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?
        }
        (None, None) => {
            return Err(
                "give a prompt with -p TEXT or -f FILE (or talk with `bitnetc chat`)".into(),
            );
        }
    };
    let text = if a.no_escape || a.file.is_some() {
        raw
    } else {
        process_escapes(&raw)
    };
    let (model, load_time) = open(&a.model)?;
    let tokenizer = model.tokenizer()?;
    let prompt_text = if a.conversation {
        let format = ChatFormat::for_model(tokenizer.spec().chat_template.as_deref(), a.jinja)?;
        let mut messages = Vec::new();
        if let Some(sys) = &a.system_prompt {
            messages.push(Message::new("system", sys));
        }
        messages.push(Message::new("user", &text));
        format.render_for(tokenizer, &messages, true)?
    } else {
        text
    };
    let prompt = tokenizer.encode(&prompt_text, true, true);
    if prompt.is_empty() {
        return Err("the prompt has no tokens".into());
    }
    if !a.conversation && !a.no_display_prompt {
        print!("{prompt_text}");
    }
    let params = a.sampling.params();
    let seed = params.seed;
    let mut session = model.engine.session();
    let (ids, _, timings) = stream(&mut session, tokenizer, &prompt, &a.sampling, params)?;
    println!();
    if a.output_ids {
        eprintln!("{}", serde_json::to_string(&ids)?);
    }
    if a.verbose {
        print_timings(Some(load_time), &timings, seed);
    }
    a.model.exec.print_trace(&model);
    Ok(())
}

const CHAT_HELP: &str = "/help   show this help\n/clear  forget the conversation\n/bye    leave (also Ctrl-D)\nA line ending in \\ continues on the next line.";

pub fn chat(mut a: ChatArgs) -> Result<()> {
    builtin_reply_stop(&a.model, &mut a.sampling);
    let (model, load_time) = open(&a.model)?;
    let tokenizer = model.tokenizer()?;
    let format = ChatFormat::for_model(tokenizer.spec().chat_template.as_deref(), a.jinja)?;
    eprintln!(
        "{} loaded in {:.2} s; chat format {}. Type /help for commands.",
        super::model_name(a.model.model.as_deref()),
        load_time.as_secs_f64(),
        format.name()
    );
    let mut messages: Vec<Message> = a
        .system_prompt
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let mut session = model.engine.session();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut input = String::new();
        loop {
            let Some(line) = lines.next() else {
                eprintln!();
                return Ok(());
            };
            let line = line?;
            match line.strip_suffix('\\') {
                Some(head) => {
                    input += head;
                    input.push('\n');
                }
                None => {
                    input += &line;
                    break;
                }
            }
        }
        match input.trim() {
            "" => continue,
            "/bye" | "/exit" | "/quit" => return Ok(()),
            "/help" => {
                eprintln!("{CHAT_HELP}");
                continue;
            }
            "/clear" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            cmd if cmd.starts_with('/') => {
                eprintln!("unknown command {cmd}; /help lists the commands");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", &input));
        let prompt = tokenizer.encode(&format.render_for(tokenizer, &messages, true)?, true, true);
        let params = a.sampling.params();
        let seed = params.seed;
        let (_, answer, timings) =
            match stream(&mut session, tokenizer, &prompt, &a.sampling, params) {
                Ok(r) => r,
                Err(e) => {
                    messages.pop();
                    eprintln!("\nerror: {e}");
                    continue;
                }
            };
        println!();
        messages.push(Message::new("assistant", &answer));
        if a.verbose {
            print_timings(None, &timings, seed);
        }
    }
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let model = super::load(
        a.model.as_deref(),
        KvCacheType::F16,
        Some(1),
        a.pre_tokenizer.clone(),
        &super::ExecArgs {
            threads: Some(1),
            batch_size: 1,
            kernels: super::KernelChoice::Best,
            interp: true,
            trace_kernels: false,
            lm_head: None,
            device: super::Device::Cpu,
            gpu_sessions: 1,
        },
    )?;
    let tokenizer = model.tokenizer()?;
    let ids = tokenizer.encode(&a.prompt, !a.no_bos, !a.no_parse_special);
    if a.ids {
        println!("{}", serde_json::to_string(&ids)?);
        return Ok(());
    }
    for id in ids {
        let piece = String::from_utf8_lossy(&tokenizer.token_bytes(id, true)).into_owned();
        println!("{id:6} -> {piece:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::process_escapes;

    #[test]
    fn escapes() {
        assert_eq!(process_escapes(r"a\nb\tc\\d\x"), "a\nb\tc\\d\\x");
        assert_eq!(process_escapes(r#"\"q\" \'"#), "\"q\" '");
        assert_eq!(process_escapes("end\\"), "end\\");
    }
}
