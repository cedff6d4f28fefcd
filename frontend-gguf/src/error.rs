//! Errors of the GGUF frontend. Each names the file, the field and what was expected.

use std::path::PathBuf;

/// A structural problem in a GGUF byte stream, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at byte {offset}: {kind}")]
pub struct ParseError {
    pub offset: u64,
    pub kind: ParseErrorKind,
}

/// Every way a GGUF file can be malformed. [`ParseErrorKind::code`] gives a stable short name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("file is {len} bytes, shorter than the 24-byte GGUF header")]
    TooSmall { len: u64 },
    #[error("bad magic {found:02x?}: expected \"GGUF\" (47 47 55 46); this is not a GGUF file")]
    BadMagic { found: [u8; 4] },
    #[error(
        "the file is big-endian (version reads as {version} when byte-swapped); bitnetc reads \
         little-endian GGUF only: re-convert the model without --bigendian"
    )]
    BigEndian { version: u32 },
    #[error("GGUF version {version} is not supported: expected 2 or 3{hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error("{what} is {count}, but the {left} bytes left in the file can hold at most {max}")]
    CountTooLarge {
        what: String,
        count: u64,
        left: u64,
        max: u64,
    },
    #[error("{what}: string length {len} exceeds the {left} bytes left in the file")]
    StringTooLong { what: String, len: u64, left: u64 },
    #[error("{what}: needs {need} more bytes, but the file ends after {left}")]
    Truncated { what: String, need: u64, left: u64 },
    #[error("{what}: not valid UTF-8")]
    InvalidUtf8 { what: String },
    #[error("metadata key '{key}': unknown value type {type_id} (expected 0-12)")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata key '{key}': arrays of arrays are not supported")]
    NestedArray { key: String },
    #[error("metadata key '{key}': bool byte is {byte}, expected 0 or 1")]
    InvalidBool { key: String, byte: u8 },
    #[error("metadata key '{key}' appears twice")]
    DuplicateKey { key: String },
    #[error("general.alignment: {reason}")]
    BadAlignment { reason: String },
    #[error("tensor '{tensor}': {n_dims} dimensions, at most 4 are allowed")]
    TooManyDims { tensor: String, n_dims: u32 },
    #[error("tensor '{tensor}': dims {dims:?} overflow a 63-bit element count")]
    DimsOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor name '{tensor}' is {len} bytes, at most 63 are allowed")]
    NameTooLong { tensor: String, len: u64 },
    #[error("tensor '{tensor}' appears twice")]
    DuplicateTensor { tensor: String },
    #[error("tensor '{tensor}': {reason}")]
    BadType { tensor: String, reason: String },
    #[error("tensor '{tensor}': {reason}")]
    BadSize { tensor: String, reason: String },
    #[error("tensor '{tensor}': offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor '{tensor}': {nbytes} bytes at data offset {offset} extend past the end of the \
         data section ({data_len} bytes)"
    )]
    OutOfBounds {
        tensor: String,
        offset: u64,
        nbytes: u64,
        data_len: u64,
    },
    #[error(
        "tensor '{tensor}' ({nbytes} bytes at data offset {offset}) overlaps tensor '{other}' at \
         data offset {other_offset}"
    )]
    Overlap {
        tensor: String,
        offset: u64,
        nbytes: u64,
        other: String,
        other_offset: u64,
    },
    #[error(
        "tensor '{tensor}': type {type_name} with dims {dims:?} takes {nbytes} bytes, but the file \
         gives it {space} (the next tensor starts at data offset {next_offset}); the type id does \
         not match the data"
    )]
    SizeMismatch {
        tensor: String,
        type_name: String,
        dims: Vec<u64>,
        nbytes: u64,
        space: u64,
        next_offset: u64,
    },
    #[error(
        "tensor '{tensor}' uses type id {type_id}, which fits neither llama.cpp's table ({upstream}) \
         nor bitnet.cpp's ({fork})"
    )]
    NoTypeTable {
        tensor: String,
        type_id: u32,
        upstream: String,
        fork: String,
    },
    #[error("the data section would start at byte {start}, past the end of the file ({len} bytes)")]
    DataPastEnd { start: u64, len: u64 },
}

impl ParseErrorKind {
    /// A stable short name for each kind, used by the malformed-file corpus.
    pub fn code(&self) -> &'static str {
        match self {
            ParseErrorKind::TooSmall { .. } => "too_small",
            ParseErrorKind::BadMagic { .. } => "bad_magic",
            ParseErrorKind::BigEndian { .. } => "big_endian",
            ParseErrorKind::UnsupportedVersion { .. } => "unsupported_version",
            ParseErrorKind::CountTooLarge { .. } => "count_too_large",
            ParseErrorKind::StringTooLong { .. } => "string_too_long",
            ParseErrorKind::Truncated { .. } => "truncated",
            ParseErrorKind::InvalidUtf8 { .. } => "invalid_utf8",
            ParseErrorKind::UnknownValueType { .. } => "unknown_value_type",
            ParseErrorKind::NestedArray { .. } => "nested_array",
            ParseErrorKind::InvalidBool { .. } => "invalid_bool",
            ParseErrorKind::DuplicateKey { .. } => "duplicate_key",
            ParseErrorKind::BadAlignment { .. } => "bad_alignment",
            ParseErrorKind::TooManyDims { .. } => "too_many_dims",
            ParseErrorKind::DimsOverflow { .. } => "dims_overflow",
            ParseErrorKind::NameTooLong { .. } => "name_too_long",
            ParseErrorKind::DuplicateTensor { .. } => "duplicate_tensor",
            ParseErrorKind::BadType { .. } => "bad_type",
            ParseErrorKind::BadSize { .. } => "bad_size",
            ParseErrorKind::Misaligned { .. } => "misaligned",
            ParseErrorKind::OutOfBounds { .. } => "out_of_bounds",
            ParseErrorKind::Overlap { .. } => "overlap",
            ParseErrorKind::SizeMismatch { .. } => "size_mismatch",
            ParseErrorKind::NoTypeTable { .. } => "no_type_table",
            ParseErrorKind::DataPastEnd { .. } => "data_past_end",
        }
    }
}

/// A problem with the content of a well-formed GGUF file: missing or mistyped metadata,
/// tensors that do not fit the architecture, encodings bitnetc cannot compute with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("metadata key '{key}' is missing{hint}")]
    MissingKey { key: String, hint: String },
    #[error("metadata key '{key}' is {found}, expected {expected}")]
    KeyType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("metadata key '{key}' = {value}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error(
        "architecture '{arch}' is not supported: bitnetc runs bitnet-b1.58, bitnet-25, bitnet and llama"
    )]
    UnsupportedArchitecture { arch: String },
    #[error("tensor '{tensor}' is missing (architecture {arch} needs it)")]
    MissingTensor { tensor: String, arch: String },
    #[error("tensor '{tensor}' has dims {found:?}, expected {expected:?}")]
    TensorShape {
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("tensor '{tensor}' is {type_name}: {reason}")]
    TensorType {
        tensor: String,
        type_name: String,
        reason: String,
    },
    #[error(
        "tensor '{tensor}' is not used by architecture {arch}; bitnetc refuses to ignore weights"
    )]
    UnexpectedTensor { tensor: String, arch: String },
}

/// Any error of this crate, with the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<ParseError>,
    },
    #[error("{}: {source}", path.display())]
    Model {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
    #[error("{}: tensor '{tensor}': {source}", path.display())]
    Encoding {
        path: PathBuf,
        tensor: String,
        #[source]
        source: bitnetc_ir::EncodingError,
    },
}

impl GgufError {
    /// The parse error kind's code, when this is a parse error.
    pub fn parse_code(&self) -> Option<&'static str> {
        match self {
            GgufError::Parse { source, .. } => Some(source.kind.code()),
            _ => None,
        }
    }
}
