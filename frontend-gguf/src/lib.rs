//! The GGUF frontend: bounded, zero-copy parsing of GGUF files, the ggml type tables, the
//! architecture registry that turns metadata into a validated model config, tokenizer and chat
//! template metadata, a GGUF writer, `quantize`, and synthetic models for tests and benchmarks.

pub mod arch;
pub mod describe;
pub mod error;
pub mod gguf;
pub mod lower;
pub mod quantize;
pub mod synth;
pub mod tokenizer;
pub mod types;
pub mod writer;

pub use arch::{Activation, Architecture, ModelConfig, RopeStyle};
pub use error::{GgufError, ModelError, ParseError, ParseErrorKind};
pub use gguf::{GgufFile, Layout, MetaArray, MetaValue, TensorInfo, ValueType};
pub use tokenizer::TokenizerMeta;
pub use types::TypeTable;
pub use writer::{GgufWriter, Value};
