//! The commands of `bitnetc`, one module per group.

pub mod bench;
pub mod generate;
pub mod inspect;
pub mod perplexity;
pub mod serve;
pub mod tools;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How a model's plan is executed.
#[derive(clap::Args, Clone, Debug)]
pub struct ExecArgs {
    /// Threads (default: all cores)
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Most tokens evaluated in one step; longer prompts take several
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Kernel variants to choose from: `best` (the fastest exact one for this CPU and shape),
    /// `baseline` (x86-64 SSE4.1 and portable code only) or `lut` (the table-lookup ternary
    /// kernel for every I2_S weight, the best elsewhere)
    #[arg(long, value_enum, default_value = "best")]
    pub kernels: KernelChoice,
    /// Run the reference interpreter instead of compiled kernels (slow; one thread)
    #[arg(long)]
    pub interp: bool,
    /// Print each kernel's variant, calls and time to stderr at the end
    #[arg(long)]
    pub trace_kernels: bool,
    /// Re-encode the output projection at load time (halves an F16 head's reads per token;
    /// changes the logits by llama.cpp's Q8_0 rounding)
    #[arg(long, value_enum, value_name = "TYPE")]
    pub lm_head: Option<LmHead>,
    /// Where to run: `cpu`, or `cuda` (the first NVIDIA GPU; its kernels are compiled by
    /// NVRTC at load time)
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Sequences a GPU engine holds KV caches for at once (`serve --parallel`).
    #[arg(skip = 1usize)]
    pub gpu_sessions: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LmHead {
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KernelChoice {
    Best,
    Baseline,
    Lut,
}

impl LmHead {
    fn encoding(self) -> bitnetc::ir::encoding::Encoding {
        match self {
            LmHead::Q8_0 => bitnetc::ir::encoding::Encoding::Q8_0,
        }
    }
}

impl ExecArgs {
    pub fn backend(&self) -> Result<bitnetc::Backend> {
        if self.device == Device::Cuda {
            if self.interp {
                return Err("--device cuda does not combine with --interp".into());
            }
            if self.batch_size == 0 {
                return Err("--batch-size must be at least 1".into());
            }
            #[cfg(feature = "cuda")]
            return Ok(bitnetc::Backend::Cuda {
                ordinal: 0,
                options: bitnetc::runtime::cuda::GpuOptions {
                    batch: self.batch_size,
                    trace: self.trace_kernels,
                    lm_head: self.lm_head.map(LmHead::encoding),
                    sessions: self.gpu_sessions.max(1),
                },
            });
            #[cfg(not(feature = "cuda"))]
            return Err("--device cuda: this bitnetc was built without the `cuda` feature".into());
        }
        if self.interp {
            return Ok(bitnetc::Backend::Interpreter);
        }
        if self.threads == Some(0) || self.batch_size == 0 {
            return Err("--threads and --batch-size must be at least 1".into());
        }
        Ok(bitnetc::Backend::Compiled(
            bitnetc::runtime::exec::ExecOptions {
                threads: self
                    .threads
                    .unwrap_or_else(bitnetc::runtime::exec::default_threads),
                kernels: match self.kernels {
                    KernelChoice::Best => bitnetc::codegen::select::KernelSet::Best,
                    KernelChoice::Baseline => bitnetc::codegen::select::KernelSet::Baseline,
                    KernelChoice::Lut => bitnetc::codegen::select::KernelSet::Lut,
                },
                batch: self.batch_size,
                trace: self.trace_kernels,
                lm_head: self.lm_head.map(LmHead::encoding),
                bindings: None,
            },
        ))
    }

    /// Prints the kernel trace (with --trace-kernels).
    pub fn print_trace(&self, model: &bitnetc::Model) {
        if !self.trace_kernels {
            return;
        }
        let gpu = model.engine.gpu_trace();
        if !gpu.is_empty() {
            eprintln!(
                "{:<56} {:>8} {:>12} {:>10}",
                "kernel", "calls", "time ms", "µs/call"
            );
            for (name, calls, time) in gpu {
                eprintln!(
                    "{name:<56} {calls:>8} {:>12.2} {:>10.1}",
                    time.as_secs_f64() * 1e3,
                    time.as_secs_f64() * 1e6 / calls.max(1) as f64
                );
            }
            return;
        }
        let Some(exec) = model.engine.executor() else {
            return;
        };
        eprintln!(
            "{:<44} {:<28} {:>8} {:>12}",
            "kernel", "variant", "calls", "time ms"
        );
        for l in exec.trace() {
            eprintln!(
                "{:<44} {:<28} {:>8} {:>12.2}",
                l.kernel,
                l.variant,
                l.calls,
                l.seconds * 1e3
            );
        }
        for c in exec.ternary_choices() {
            let timings: Vec<String> = c
                .timings
                .iter()
                .map(|t| format!("{} x{} {:.1} ns", t.kernel, t.tokens, t.ns_per_row_token))
                .collect();
            eprintln!(
                "ternary k={}: gemv {} / gemm {} (per row and token: {})",
                c.k,
                c.gemv.name(),
                c.gemm.name(),
                timings.join(", ")
            );
        }
    }
}

/// Opens a model ready to run.
/// How messages name a model: its path, or the built-in model's name.
pub fn model_name(model: Option<&std::path::Path>) -> String {
    match model {
        Some(path) => path.display().to_string(),
        None => format!("{} (built in)", bitnetc::builtin::NAME),
    }
}

/// Opens `model`, or the built-in model when there is none.
pub fn load(
    model: Option<&std::path::Path>,
    kv_cache: crate::KvCacheType,
    context: Option<usize>,
    pre_tokenizer: Option<String>,
    exec: &ExecArgs,
) -> Result<bitnetc::Model> {
    let opts = bitnetc::LoadOptions {
        backend: exec.backend()?,
        lower: bitnetc::gguf::lower::LowerOptions {
            kv_cache: kv_cache.dtype(),
        },
        context,
        pre_tokenizer,
        passes: None,
    };
    Ok(match model {
        Some(path) => bitnetc::load(path, opts)?,
        None => bitnetc::builtin::load(opts)?,
    })
}

pub fn human_bytes(n: u64) -> String {
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

pub fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}
