//! The `bitnetc` command.

use bitnetc::gguf::describe::{self, ConfigOutcome, Description};
use bitnetc::gguf::quantize::{self, QuantizeOptions};
use bitnetc::gguf::{GgufFile, ModelConfig};
use bitnetc::ir::Encoding;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "bitnetc",
    version,
    about = "A compiler and runtime for BitNet b1.58 (ternary-weight) language models",
    long_about = "A compiler and runtime for BitNet b1.58 (ternary-weight) language models.\n\n\
        Reads GGUF models: bitnet.cpp's I2_S files (microsoft/bitnet-b1.58-2B-4T), llama.cpp's \
        TQ1_0/TQ2_0 files, and llama GGUFs with F32/F16/BF16/Q8_0/Q4_0/Q4_1 weights."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a GGUF file: metadata, model config, tensors, tokenizer (reads no tensor data)
    Inspect(InspectArgs),
    /// Rewrite a model's block matrices as ternary weights (norms stay F32)
    Quantize(QuantizeArgs),
    /// Lower a model and print a compilation stage
    Compile(CompileArgs),
    /// Evaluate token ids and write every position's logits to a .npy file
    Logits(LogitsArgs),
    /// Write a model with random weights and the dimensions of a known model
    GenModel(GenModelArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Like {
    /// microsoft/bitnet-b1.58-2B-4T: I2_S, F16 tied embedding, 128256 vocab (1.18 GB)
    #[value(name = "bitnet-b1.58-2B-4T")]
    Bitnet2b4t,
    /// A small 2-layer bitnet-b1.58 model with I2_S weights (for tests)
    #[value(name = "tiny")]
    Tiny,
}

#[derive(clap::Args)]
struct GenModelArgs {
    /// Which model's dimensions to use
    #[arg(long, value_enum)]
    like: Like,
    /// Output GGUF
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Seed of the random weights
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// The lowered graph, in the IR text form
    Ir,
}

#[derive(clap::Args)]
struct CompileArgs {
    /// The GGUF model
    model: PathBuf,
    /// What to print
    #[arg(long, value_enum, default_value = "ir")]
    emit: Emit,
    /// KV cache element type
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    kv_cache: KvCacheType,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvCacheType {
    #[value(name = "f16")]
    F16,
    #[value(name = "f32")]
    F32,
}

impl KvCacheType {
    fn dtype(self) -> bitnetc::ir::DType {
        match self {
            KvCacheType::F16 => bitnetc::ir::DType::F16,
            KvCacheType::F32 => bitnetc::ir::DType::F32,
        }
    }
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    /// All tokens in one step (prefill)
    Batch,
    /// One token per step through the KV cache (decode)
    Seq,
}

#[derive(clap::Args)]
struct LogitsArgs {
    /// The GGUF model
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Token ids, separated by spaces or commas
    #[arg(long)]
    tokens: String,
    /// Output file: float32 .npy of shape [n_tokens, vocab]
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// How the tokens are evaluated
    #[arg(long, value_enum, default_value = "batch")]
    mode: Mode,
    /// KV cache element type
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    kv_cache: KvCacheType,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// The GGUF file
    file: PathBuf,
    /// Print one JSON document instead of text
    #[arg(long)]
    json: bool,
    /// List every tensor (name, type, dims, bytes, offset)
    #[arg(long)]
    tensors: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightType {
    #[value(name = "i2_s")]
    I2S,
    #[value(name = "tq2_0")]
    Tq2_0,
    #[value(name = "tq1_0")]
    Tq1_0,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmbeddingType {
    #[value(name = "f16")]
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// Input GGUF (F32/F16/BF16 weights, or another ternary encoding)
    input: PathBuf,
    /// Output GGUF (written atomically: nothing is left behind on failure)
    output: PathBuf,
    /// Encoding of the attention and FFN matrices
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    weight_type: WeightType,
    /// Encoding of token_embd (and of output.weight when the head is untied)
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    embedding_type: EmbeddingType,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect(a),
        Command::Quantize(a) => quantize_cmd(a),
        Command::Compile(a) => compile(a),
        Command::Logits(a) => logits(a),
        Command::GenModel(a) => gen_model(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn inspect(a: InspectArgs) -> Result<()> {
    let file = GgufFile::open(&a.file)?;
    let d = describe::describe(&file, a.tensors);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", render_description(&d));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

fn render_description(d: &Description) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "file        {} ({}, {} bytes)",
        d.file,
        human_bytes(d.file_bytes),
        d.file_bytes
    );
    let _ = writeln!(
        w,
        "gguf        version {}, alignment {}, data at byte {}",
        d.gguf_version, d.alignment, d.data_offset
    );
    let _ = writeln!(
        w,
        "type ids    {} table: {}",
        d.type_table, d.type_table_reason
    );
    let _ = writeln!(w, "\nmetadata ({} keys)", d.metadata.len());
    let kw = d.metadata.iter().map(|m| m.key.len()).max().unwrap_or(0);
    let tw = d
        .metadata
        .iter()
        .map(|m| m.type_description.len())
        .max()
        .unwrap_or(0);
    for m in &d.metadata {
        let _ = writeln!(
            w,
            "  {:kw$}  {:tw$}  {}",
            m.key, m.type_description, m.display
        );
    }
    let _ = writeln!(w, "\nmodel");
    match &d.config {
        ConfigOutcome::Valid(c) => render_config(w, c),
        ConfigOutcome::Invalid(e) => {
            let _ = writeln!(w, "  cannot be loaded: {e}");
        }
    }
    let t = &d.totals;
    let _ = writeln!(
        w,
        "\ntensors     {} tensors, {} parameters, {} of tensor data",
        t.tensors,
        human_count(t.parameters),
        human_bytes(t.bytes)
    );
    for bt in &t.by_type {
        let _ = writeln!(
            w,
            "  {:8} {:4} tensor{}  {:>9} parameters  {:>11}",
            bt.type_name,
            bt.tensors,
            if bt.tensors == 1 { " " } else { "s" },
            human_count(bt.parameters),
            human_bytes(bt.bytes)
        );
    }
    let _ = writeln!(w, "\ntokenizer");
    match (&d.tokenizer, &d.tokenizer_error) {
        (_, Some(e)) => {
            let _ = writeln!(w, "  invalid: {e}");
        }
        (None, None) => {
            let _ = writeln!(w, "  none (no tokenizer.ggml.model)");
        }
        (Some(tk), None) => {
            let pre = match &tk.pre {
                Some(p) => format!("pre-tokenizer '{p}'"),
                None => "no pre-tokenizer named (bitnet.cpp then uses its DEFAULT rules)".into(),
            };
            let merges = tk.merges.map_or(String::new(), |m| format!(", {m} merges"));
            let _ = writeln!(
                w,
                "  {} vocabulary, {} tokens{merges}, {pre}",
                tk.model, tk.tokens
            );
            let mut specials = Vec::new();
            for (label, tok) in [
                ("bos", &tk.bos),
                ("eos", &tk.eos),
                ("eot", &tk.eot),
                ("pad", &tk.padding),
                ("unk", &tk.unknown),
            ] {
                if let Some(tok) = tok {
                    specials.push(format!(
                        "{label} {} {}",
                        tok.id,
                        bitnetc::gguf::gguf::quote_cut(&tok.text, 40)
                    ));
                }
            }
            if !specials.is_empty() {
                let _ = writeln!(w, "  {}", specials.join(", "));
            }
            let flag = |b: Option<bool>| b.map_or("unset".to_string(), |b| b.to_string());
            let template = tk
                .chat_template_chars
                .map_or("no chat template".to_string(), |n| {
                    format!("chat template of {n} characters")
                });
            let _ = writeln!(
                w,
                "  add_bos {}, add_eos {}, {template}",
                flag(tk.add_bos),
                flag(tk.add_eos)
            );
        }
    }
    if let Some(tensors) = &d.tensors {
        let nw = tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            w,
            "\n  {:nw$}  {:8}  {:>22}  {:>12}  {:>12}",
            "name", "type", "dims", "bytes", "offset"
        );
        for t in tensors {
            let dims = t
                .dims
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" x ");
            let _ = writeln!(
                w,
                "  {:nw$}  {:8}  {:>22}  {:>12}  {:>12}",
                t.name, t.type_name, dims, t.nbytes, t.offset
            );
        }
    }
    s
}

fn render_config(w: &mut String, c: &ModelConfig) {
    use std::fmt::Write;
    let act = match c.ffn_activation {
        bitnetc::gguf::Activation::Relu2 => "relu² GLU",
        bitnetc::gguf::Activation::Silu => "SiLU GLU",
    };
    let head = if c.tied_output {
        "tied output head"
    } else {
        "separate output head"
    };
    let sub = if c.sub_norms { ", SubLN" } else { "" };
    let scales = if c.weight_scales {
        ", per-matrix scales"
    } else {
        ""
    };
    let _ = writeln!(
        w,
        "  architecture  {} ({act}{sub}, {} RoPE, {head}{scales})",
        c.architecture,
        match c.rope_style {
            bitnetc::gguf::RopeStyle::Neox => "NEOX",
            bitnetc::gguf::RopeStyle::Norm => "NORM",
        }
    );
    if let Some(n) = &c.name {
        let _ = writeln!(w, "  name          {n}");
    }
    let _ = writeln!(
        w,
        "  dims          vocab {}, context {}, hidden {}, layers {}, ffn {}",
        c.vocab_size, c.context_length, c.hidden, c.layers, c.ffn
    );
    let _ = writeln!(
        w,
        "  attention     {} heads, {} kv heads, head dim {}, rope {} dims, theta {}",
        c.heads, c.kv_heads, c.head_dim, c.rope_dims, c.rope_theta
    );
    let _ = writeln!(w, "  rms eps       {}", c.rms_eps);
    let _ = writeln!(w, "  parameters    {}", human_count(c.parameter_count()));
}

fn quantize_cmd(a: QuantizeArgs) -> Result<()> {
    let input = GgufFile::open(&a.input)?;
    let opts = QuantizeOptions {
        weights: match a.weight_type {
            WeightType::I2S => Encoding::I2S,
            WeightType::Tq2_0 => Encoding::TQ2_0,
            WeightType::Tq1_0 => Encoding::TQ1_0,
        },
        embedding: match a.embedding_type {
            EmbeddingType::F16 => Encoding::F16,
            EmbeddingType::Q8_0 => Encoding::Q8_0,
        },
    };
    let bar = indicatif::ProgressBar::new(input.tensors().len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors  {msg}")
            .expect("valid template"),
    );
    let report = quantize::quantize(&input, &a.output, opts, |i, _, name| {
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
    });
    bar.finish_and_clear();
    let report = report?;
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in &report.tensors {
        *counts.entry(&t.to).or_default() += 1;
    }
    for t in report.tensors.iter().filter(|t| !t.note.is_empty()) {
        eprintln!("{}: {} -> {}: {}", t.name, t.from, t.to, t.note);
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "wrote {} ({} tensors: {}), {} -> {}",
        a.output.display(),
        report.tensors.len(),
        counts.join(", "),
        human_bytes(report.input_bytes),
        human_bytes(report.output_bytes)
    );
    Ok(())
}

fn load(
    model: &std::path::Path,
    kv_cache: KvCacheType,
    context: Option<usize>,
) -> Result<bitnetc::Model> {
    let opts = bitnetc::LoadOptions {
        lower: bitnetc::gguf::lower::LowerOptions {
            kv_cache: kv_cache.dtype(),
        },
        context,
    };
    Ok(bitnetc::load(model, opts)?)
}

fn compile(a: CompileArgs) -> Result<()> {
    let model = load(&a.model, a.kv_cache, None)?;
    match a.emit {
        Emit::Ir => print!("{}", bitnetc::ir::text::print(model.engine.graph())?),
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let tokens = a
        .tokens
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| format!("--tokens: '{s}' is not a token id"))
        })
        .collect::<std::result::Result<Vec<u32>, String>>()?;
    if tokens.is_empty() {
        return Err("--tokens: no token ids given".into());
    }
    let model = load(&a.model, a.kv_cache, Some(tokens.len()))?;
    let vocab = model.engine.vocab_size();
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!("--tokens: id {t} is outside the vocabulary of {vocab}").into());
    }
    let mut session = model.engine.session();
    let logits = match a.mode {
        Mode::Batch => session.eval(&tokens)?,
        Mode::Seq => {
            let mut all = Vec::with_capacity(tokens.len() * vocab);
            for &t in &tokens {
                all.extend(session.eval(&[t])?);
            }
            all
        }
    };
    bitnetc::npy::write_f32(&a.output, &[tokens.len(), vocab], &logits)
        .map_err(|e| format!("{}: {e}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} x {} logits)",
        a.output.display(),
        tokens.len(),
        vocab
    );
    Ok(())
}

fn gen_model(a: GenModelArgs) -> Result<()> {
    use bitnetc::gguf::synth::SynthSpec;
    let spec = match a.like {
        Like::Bitnet2b4t => SynthSpec::bitnet_2b_4t(),
        Like::Tiny => SynthSpec::tiny(bitnetc::gguf::Architecture::BitnetB158),
    };
    let spec = SynthSpec {
        seed: a.seed,
        ..spec
    };
    let started = std::time::Instant::now();
    bitnetc::gguf::writer::write_atomic(&a.output, |w| spec.write(w))
        .map_err(|e| format!("{}: {e}", a.output.display()))?;
    let bytes = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {bytes} bytes) in {:.1} s",
        a.output.display(),
        human_bytes(bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
