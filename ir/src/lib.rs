//! The bitnetc intermediate representation.
//!
//! This crate owns what every later stage agrees on: the weight encodings and their exact
//! byte layouts ([`encoding`]), with scalar reference decoders and encoders that serve as the
//! oracle for every kernel.

pub mod encoding;

pub use encoding::{Encoding, EncodingError};
