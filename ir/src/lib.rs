//! The bitnetc intermediate representation.
//!
//! - [`encoding`]: weight encodings and their exact byte layouts, with scalar reference decoders
//!   and encoders that serve as the oracle for every kernel.
//! - [`types`], [`op`], [`graph`]: dtypes, symbolic shapes (`T` tokens this step, `P` cached
//!   positions), the closed op set, and the dataflow graph on a petgraph `StableGraph`.
//! - [`verify`], [`text`]: the verifier, and the printer and parser of the text form.
//! - [`plan`]: a graph scheduled into steps over buffers, as plain serde data; [`vocab`]: a
//!   tokenizer described as plain data.
//! - [`numerics`], [`interp`]: the exact arithmetic of the reference engines and the reference
//!   interpreter built from it.

pub mod encoding;
pub mod graph;
pub mod interp;
pub mod numerics;
pub mod op;
pub mod plan;
pub mod text;
pub mod types;
pub mod verify;
pub mod vocab;

pub use encoding::{Encoding, EncodingError};
pub use graph::{Graph, IrError, NodeId, Value};
pub use op::Op;
pub use types::{Activation, DType, Dim, HalfPath, RopeStyle, TensorType};
