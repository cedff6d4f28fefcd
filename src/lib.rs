//! bitnetc: a compiler and runtime for BitNet b1.58 (ternary-weight) language models.
//!
//! The stages are separate crates, re-exported here: [`gguf`] reads and writes model files and
//! lowers them to the IR, [`ir`] holds the IR, the weight encodings and the reference
//! interpreter, [`runtime`] runs models. [`load`] opens a GGUF model ready to run.

pub mod api;
pub mod bplan;
pub mod npy;
pub mod perplexity;
pub mod serve;

pub use api::{Engine, Metrics, Session, Stream};
pub use runtime::generate::{FinishReason, GenerateOptions, Token};
pub use runtime::sampling::SamplingParams;

pub use bitnetc_codegen_cpu as codegen;
pub use bitnetc_codegen_cuda as codegen_cuda;
pub use bitnetc_frontend_gguf as gguf;
pub use bitnetc_ir as ir;
pub use bitnetc_passes as passes;
pub use bitnetc_runtime as runtime;

use gguf::lower::{LowerOptions, lower};
use gguf::{GgufError, GgufFile, ModelConfig, TokenizerMeta};
use runtime::RuntimeError;
use runtime::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Any error of loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Passes(#[from] passes::PassError),
    #[error("{0}: the file has no tokenizer (no tokenizer.ggml.model); give token ids instead")]
    NoTokenizer(String),
    #[error("{0}")]
    Tokenizer(String),
    /// A compiled plan that cannot be written or used.
    #[error("{0}")]
    Plan(String),
}

/// Where a failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Opening and validating the model file.
    Read,
    /// Reading the model's configuration and lowering it to the IR.
    Lower,
    /// The optimization passes.
    Optimize,
    /// Binding the plan to kernels for this CPU.
    Compile,
    /// Writing or reading a compiled plan.
    Plan,
    /// The tokenizer.
    Tokenize,
    /// Evaluating tokens.
    Run,
}

impl Error {
    /// The stage that failed.
    pub fn stage(&self) -> Stage {
        use runtime::exec::ExecError;
        match self {
            Error::Gguf(GgufError::Io { .. } | GgufError::Parse { .. }) => Stage::Read,
            Error::Gguf(_) => Stage::Lower,
            Error::Passes(_) => Stage::Optimize,
            Error::Plan(_) => Stage::Plan,
            Error::NoTokenizer(_) | Error::Tokenizer(_) => Stage::Tokenize,
            Error::Runtime(RuntimeError::Exec(ExecError::Run(_)))
            | Error::Runtime(RuntimeError::Interp(_))
            | Error::Runtime(RuntimeError::Empty)
            | Error::Runtime(RuntimeError::ContextFull { .. }) => Stage::Run,
            Error::Runtime(_) => Stage::Compile,
        }
    }

    /// What would most likely fix it, when something would.
    pub fn fix(&self) -> Option<String> {
        use runtime::exec::ExecError;
        Some(match self {
            Error::Gguf(GgufError::Io { .. }) => {
                "check the path and that the file is readable".into()
            }
            Error::Gguf(GgufError::Parse { .. }) => {
                "the file is damaged or not a GGUF model: download or convert it again".into()
            }
            Error::Gguf(_) => {
                "the model is not one bitnetc runs (see `bitnetc inspect FILE`)".into()
            }
            Error::Passes(_) => {
                "name passes from `bitnetc compile --help`, or leave them out".into()
            }
            Error::Plan(m) if m.contains("compile") => return None,
            Error::Plan(_) => "compile the model again with `bitnetc compile MODEL -o PLAN`".into(),
            Error::NoTokenizer(_) => "give token ids instead of text".into(),
            Error::Runtime(RuntimeError::ContextFull { .. }) => {
                "load with a larger context (`-c`, LoadOptions::context) or shorten the prompt"
                    .into()
            }
            Error::Runtime(RuntimeError::Exec(ExecError::Jit(_))) => {
                "use the portable kernels (`--kernels baseline`, KernelSet::Baseline)".into()
            }
            _ => return None,
        })
    }
}

/// What evaluates the plan.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Kernels compiled and chosen for this host, with threads.
    Compiled(runtime::exec::ExecOptions),
    /// The reference interpreter (one thread; the ground truth the kernels are tested against).
    Interpreter,
    /// An NVIDIA GPU (the `cuda` feature): kernels compiled by NVRTC for it; the options set
    /// the step size, the output projection's encoding, the sessions whose caches it holds
    /// and whether every kernel launch is timed (see [`runtime::Engine::gpu_trace`]).
    #[cfg(feature = "cuda")]
    Cuda {
        ordinal: usize,
        options: runtime::cuda::GpuOptions,
    },
}

impl Default for Backend {
    fn default() -> Backend {
        Backend::Compiled(runtime::exec::ExecOptions::default())
    }
}

/// Options for [`load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub backend: Backend,
    pub lower: LowerOptions,
    /// KV cache size in positions; the model's training context when `None`.
    pub context: Option<usize>,
    /// Replaces the pre-tokenizer the model names.
    pub pre_tokenizer: Option<String>,
    /// The passes to run, by name; the default pipeline when `None` (`Some(vec![])` runs the
    /// lowered graph as it is).
    pub passes: Option<Vec<String>>,
}

/// A loaded model: its file, config, engine and tokenizer.
pub struct Model {
    pub file: Arc<GgufFile>,
    pub config: ModelConfig,
    pub engine: runtime::Engine,
    /// `None` when the file has no tokenizer.
    pub tokenizer: Option<Tokenizer>,
    /// Opening, lowering and optimizing (or reading a compiled plan), without `compile_time`.
    pub load_time: Duration,
    /// Binding the plan to kernels for this host: choosing, generating and re-encoding.
    pub compile_time: Duration,
}

impl Model {
    /// The tokenizer, or an error naming the file when it has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer, Error> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::NoTokenizer(self.file.path().display().to_string()))
    }
}

/// Opens a model ready to run: a GGUF model (validated, lowered, optimized and bound to
/// kernels chosen for this host) or a compiled plan ([`bplan`]).
pub fn load(path: &Path, opts: LoadOptions) -> Result<Model, Error> {
    timed(|| {
        if bplan::is_plan(path) {
            bplan::load(path, opts)
        } else {
            load_gguf_file(GgufFile::open(path)?, opts)
        }
    })
}

/// Runs `load` and sets the model's load time: what it took, less binding to kernels.
fn timed(load: impl FnOnce() -> Result<Model, Error>) -> Result<Model, Error> {
    let started = Instant::now();
    let mut model = load()?;
    model.load_time = started.elapsed().saturating_sub(model.compile_time);
    Ok(model)
}

/// The model built into bitnetc: a 2.9M-parameter BitNet b1.58 (I2_S) trained on Shakespeare's
/// plays by `tools/train-tiny/train.py`; `models/README.md` is its model card.
pub mod builtin {
    use super::{Error, GgufFile, LoadOptions, Model};

    /// The GGUF file, as shipped in `models/`.
    pub const GGUF: &[u8] = include_bytes!("../models/tiny-shakespeare.gguf");
    /// The name it has in messages and in `general.name`.
    pub const NAME: &str = "tiny-shakespeare";
    /// Where its replies in a conversation end: its chat template frames a conversation as
    /// speeches in a play (`FIRST CITIZEN.` asks, `HAMLET.` answers), and a speech ends at a
    /// blank line.
    pub const REPLY_STOP: &str = "\n\n";
    /// How errors and `inspect` name it.
    pub const PATH: &str = "<built-in>/tiny-shakespeare.gguf";

    /// Opens the built-in model ready to run, as [`crate::load`] opens a file.
    pub fn load(opts: LoadOptions) -> Result<Model, Error> {
        super::timed(|| super::load_gguf_file(GgufFile::from_bytes(PATH, GGUF.to_vec())?, opts))
    }
}

fn load_gguf_file(file: GgufFile, opts: LoadOptions) -> Result<Model, Error> {
    let file = Arc::new(file);
    let config = ModelConfig::from_gguf(&file).map_err(|e| file.model_error(e))?;
    let mut graph = lower(&file, &config, &opts.lower)?;
    let config_passes = passes::PassConfig::default();
    let manager = match &opts.passes {
        None => passes::PassManager::default_pipeline(&config_passes),
        Some(names) => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            passes::PassManager::new(&names, &config_passes)?
        }
    };
    manager.run(&mut graph, |_| {})?;
    let (plan, _) = passes::memory::plan(&graph).map_err(RuntimeError::from)?;
    bind(
        file.clone(),
        file,
        config,
        plan,
        &opts.backend,
        opts.context,
        opts.pre_tokenizer.as_deref(),
        &[],
    )
}

/// Binds a planned model to an engine and reads its tokenizer.
#[allow(clippy::too_many_arguments)]
fn bind(
    file: Arc<GgufFile>,
    weights: Arc<dyn ir::interp::WeightSource + Send + Sync>,
    config: ModelConfig,
    plan: ir::plan::Plan,
    backend: &Backend,
    context: Option<usize>,
    pre_tokenizer: Option<&str>,
    ptx: &[(String, String)],
) -> Result<Model, Error> {
    let context = context.unwrap_or(config.context_length as usize);
    let compiling = Instant::now();
    let engine = match backend {
        Backend::Compiled(exec) => runtime::Engine::compiled(plan, weights, context, exec)?,
        Backend::Interpreter => runtime::Engine::new(plan, weights, context)?,
        #[cfg(feature = "cuda")]
        Backend::Cuda { ordinal, options } => {
            runtime::Engine::cuda(plan, weights, context, *ordinal, ptx, options)?
        }
    };
    let compile_time = compiling.elapsed();
    let meta = TokenizerMeta::from_gguf(&file).map_err(|e| file.model_error(e))?;
    let tokenizer = match meta {
        Some(meta) => {
            let spec = meta.to_spec().map_err(|e| file.model_error(e))?;
            let tokenizer = Tokenizer::new(spec, pre_tokenizer)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", file.path().display())))?;
            Some(tokenizer)
        }
        None => None,
    };
    Ok(Model {
        file,
        config,
        engine,
        tokenizer,
        load_time: Duration::ZERO,
        compile_time,
    })
}
