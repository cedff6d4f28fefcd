//! bitnetc: a compiler and runtime for BitNet b1.58 (ternary-weight) language models.
//!
//! The stages are separate crates, re-exported here: [`gguf`] reads and writes model files and
//! lowers them to the IR, [`ir`] holds the IR, the weight encodings and the reference
//! interpreter, [`runtime`] runs models. [`load`] opens a GGUF model ready to run.

pub mod bplan;
pub mod npy;

pub use bitnetc_codegen_cpu as codegen;
pub use bitnetc_frontend_gguf as gguf;
pub use bitnetc_ir as ir;
pub use bitnetc_passes as passes;
pub use bitnetc_runtime as runtime;

use gguf::lower::{LowerOptions, lower};
use gguf::{GgufError, GgufFile, ModelConfig, TokenizerMeta};
use runtime::tokenizer::Tokenizer;
use runtime::{Engine, RuntimeError};
use std::path::Path;
use std::sync::Arc;

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

/// What evaluates the plan.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Kernels compiled and chosen for this host, with threads.
    Compiled(runtime::exec::ExecOptions),
    /// The reference interpreter (one thread; the ground truth the kernels are tested against).
    Interpreter,
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
    pub engine: Engine,
    /// `None` when the file has no tokenizer.
    pub tokenizer: Option<Tokenizer>,
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
    if bplan::is_plan(path) {
        return bplan::load(path, opts);
    }
    let file = Arc::new(GgufFile::open(path)?);
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
        file,
        config,
        plan,
        &opts.backend,
        opts.context,
        opts.pre_tokenizer.as_deref(),
    )
}

/// Binds a planned model to an engine and reads its tokenizer.
fn bind(
    file: Arc<GgufFile>,
    config: ModelConfig,
    plan: ir::plan::Plan,
    backend: &Backend,
    context: Option<usize>,
    pre_tokenizer: Option<&str>,
) -> Result<Model, Error> {
    let context = context.unwrap_or(config.context_length as usize);
    let engine = match backend {
        Backend::Compiled(exec) => Engine::compiled(plan, file.clone(), context, exec)?,
        Backend::Interpreter => Engine::new(plan, file.clone(), context)?,
    };
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
    })
}
