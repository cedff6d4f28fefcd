//! The `bitnetc` command.

mod cli;

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
    /// Generate text from a prompt (add -cnv to use the model's chat format)
    Run(cli::generate::RunArgs),
    /// Talk with a model in the terminal
    Chat(cli::generate::ChatArgs),
    /// Show the tokens of a text
    Tokenize(cli::generate::TokenizeArgs),
    /// Describe a GGUF file: metadata, model config, tensors, tokenizer (reads no tensor data)
    Inspect(InspectArgs),
    /// Rewrite a model's block matrices as ternary or block-quantized weights (norms stay F32)
    Quantize(QuantizeArgs),
    /// Lower a model and print a compilation stage, or write a compiled plan (-o)
    Compile(CompileArgs),
    /// Evaluate token ids and write every position's logits to a .npy file
    Logits(LogitsArgs),
    /// Write a model with random weights and the dimensions of a known model
    GenModel(GenModelArgs),
    /// Measure prompt and generation speed (llama-bench's tests and table)
    Bench(cli::bench::BenchArgs),
    /// Score a text: perplexity by llama.cpp's method (windows of -c tokens, second halves)
    Perplexity(cli::perplexity::PerplexityArgs),
    /// Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, …)
    Serve(cli::serve::ServeArgs),
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

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Emit {
    /// The lowered graph, in the IR text form
    Ir,
    /// The graph after the passes
    Fused,
    /// The scheduled plan: steps, buffers and arena offsets
    Plan,
}

#[derive(clap::Args)]
struct CompileArgs {
    /// The GGUF model
    model: PathBuf,
    /// Write the compiled plan to this file (`.bplan`): the plan after the passes, the kernels
    /// chosen for this CPU and the weights, loaded by every command in place of the model
    #[arg(short = 'o', long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The target of the plan written with -o: `cpu`, or `cuda` (the CPU plan plus its CUDA
    /// kernels compiled to PTX now by NVRTC, so that the GPU machine needs only its driver)
    #[arg(long, value_enum, default_value = "cpu")]
    target: Target,
    /// With `--target cuda`: the GPU architectures to compile for (comma-separated); a GPU
    /// runs the newest one not newer than itself
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "sm_80,sm_90"
    )]
    cuda_arch: Vec<String>,
    /// Re-encode the output projection into the plan (see `run --help`)
    #[arg(long, value_enum, value_name = "TYPE")]
    lm_head: Option<cli::LmHead>,
    /// Kernel variants to choose from (see `run --help`)
    #[arg(long, value_enum, default_value = "best")]
    kernels: cli::KernelChoice,
    /// Threads for choosing kernels and re-encoding (default: all cores)
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// With -o: print the plan's manifest, the compile time and the plan's load time (median
    /// of 5 loads)
    #[arg(short = 'v', long)]
    verbose: bool,
    /// What to print (without -o)
    #[arg(long, value_enum, default_value = "ir")]
    emit: Emit,
    /// KV cache element type
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    kv_cache: KvCacheType,
    /// The passes to run, comma-separated (default: the whole pipeline)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    passes: Option<Vec<String>>,
    /// Print the graph to stderr after these passes (comma-separated, or `all`)
    #[arg(long, value_name = "PASS", value_delimiter = ',')]
    print_after: Vec<String>,
    /// Stop the pipeline after this pass
    #[arg(long, value_name = "PASS")]
    stop_after: Option<String>,
    /// Print how long each pass took, to stderr
    #[arg(long)]
    time_passes: bool,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Target {
    Cpu,
    Cuda,
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
    /// The model: a GGUF file or a compiled plan (.bplan)
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
    #[command(flatten)]
    exec: cli::ExecArgs,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// A GGUF file or a compiled plan (.bplan)
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
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
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
    /// Input GGUF (F32/F16/BF16 weights, or another ternary or block encoding)
    input: PathBuf,
    /// Output GGUF (written atomically: nothing is left behind on failure)
    output: PathBuf,
    /// Encoding of the attention and FFN matrices (ternary ones are made ternary by absmean
    /// first; q8_0, q4_0 and q4_1 are llama.cpp's reference block quantizations)
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    weight_type: WeightType,
    /// Encoding of token_embd (and of output.weight when the head is untied)
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    embedding_type: EmbeddingType,
}

/// llama.cpp's multi-letter single-dash flags, as their long forms (clap would read `-cnv` as
/// `-c -n -v`).
fn llama_cpp_flags(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-cnv") => "--conversation".into(),
        Some("-sys") => "--system-prompt".into(),
        Some("-np") => "--parallel".into(),
        _ => a,
    })
    .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(llama_cpp_flags(std::env::args_os()));
    let result = match cli.command {
        Command::Run(a) => cli::generate::run(a),
        Command::Chat(a) => cli::generate::chat(a),
        Command::Tokenize(a) => cli::generate::tokenize(a),
        Command::Inspect(a) => cli::inspect::inspect(a),
        Command::Quantize(a) => cli::tools::quantize_cmd(a),
        Command::Compile(a) => cli::tools::compile(a),
        Command::Logits(a) => cli::tools::logits(a),
        Command::GenModel(a) => cli::tools::gen_model(a),
        Command::Bench(a) => cli::bench::bench(a),
        Command::Perplexity(a) => cli::perplexity::perplexity(a),
        Command::Serve(a) => cli::serve::serve(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
