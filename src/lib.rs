//! bitnetc: a compiler and runtime for BitNet b1.58 (ternary-weight) language models.
//!
//! The stages are separate crates, re-exported here: [`gguf`] reads and writes model files,
//! [`ir`] holds the weight encodings and their reference decoders.

pub use bitnetc_frontend_gguf as gguf;
pub use bitnetc_ir as ir;
