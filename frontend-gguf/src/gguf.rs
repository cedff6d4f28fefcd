//! Bounded, zero-copy GGUF parsing (FORMATS.md §1).
//!
//! [`parse`] validates a whole byte stream and records only offsets; [`GgufFile`] owns the
//! bytes (a memory map, or a buffer) and hands out borrowed views of metadata and tensor data.
//! Every count and length is checked against the bytes that remain before anything is
//! allocated, so a malicious header cannot make the parser allocate or read out of bounds.

use crate::error::{GgufError, ModelError, ParseError, ParseErrorKind};
use crate::types::{self, GgmlType, Support, TypeTable};
use bitnetc_ir::Encoding;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest tensor name ggml accepts (`GGML_MAX_NAME` = 64 including the NUL).
pub const MAX_NAME_LEN: u64 = 63;

/// GGUF metadata value types (`gguf_metadata_value_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    Str = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => Str,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a scalar of this type; `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            Str | Array => None,
        }
    }

    /// The smallest number of bytes a value of this type occupies.
    fn min_size(self) -> u64 {
        match self {
            ValueType::Str => 8,
            ValueType::Array => 12,
            t => t.fixed_size().unwrap_or(1),
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            Str => "str",
            Array => "arr",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value, borrowed from the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetaValue<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(&'a str),
    Array(MetaArray<'a>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl<'a> MetaValue<'a> {
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::Str(_) => ValueType::Str,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// The value as a signed integer, for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v as i64,
            MetaValue::I8(v) => v as i64,
            MetaValue::U16(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::U32(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }

    /// The value as a float, for F32 and F64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A short description of the type, e.g. `u32` or `arr[str,128256]`.
    pub fn type_description(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("arr[{},{}]", a.elem, a.len),
            v => v.value_type().to_string(),
        }
    }
}

impl fmt::Display for MetaValue<'_> {
    /// Scalars in full; strings quoted and cut at 120 characters; arrays summarized.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::Str(s) => write!(f, "{}", quote_cut(s, 120)),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Array(a) => {
                const SHOWN: usize = 6;
                f.write_str("[")?;
                for (i, v) in a.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match v {
                        MetaValue::Str(s) => write!(f, "{}", quote_cut(s, 24))?,
                        v => write!(f, "{v}")?,
                    }
                }
                if a.len() > SHOWN as u64 {
                    write!(f, ", … ({} more)", a.len() - SHOWN as u64)?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A string in double quotes with control characters escaped, cut to `max` characters.
pub fn quote_cut(s: &str, max: usize) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// An array of metadata values, borrowed from the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetaArray<'a> {
    elem: ValueType,
    len: u64,
    bytes: &'a [u8],
}

impl<'a> MetaArray<'a> {
    pub fn elem_type(&self) -> ValueType {
        self.elem
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every element, in order.
    pub fn iter(&self) -> impl Iterator<Item = MetaValue<'a>> + 'a {
        let (elem, bytes) = (self.elem, self.bytes);
        let mut pos = 0usize;
        (0..self.len).map(move |_| {
            let (v, next) = read_validated(bytes, pos, elem);
            pos = next;
            v
        })
    }

    /// The elements as strings, when this is an array of strings.
    pub fn strings(&self) -> Option<impl Iterator<Item = &'a str> + 'a> {
        (self.elem == ValueType::Str).then(|| {
            self.iter().map(|v| match v {
                MetaValue::Str(s) => s,
                _ => unreachable!("string array holds strings"),
            })
        })
    }
}

/// Reads a value that [`parse`] already validated (so it cannot fail).
fn read_validated(b: &[u8], pos: usize, t: ValueType) -> (MetaValue<'_>, usize) {
    let u = |n: usize| &b[pos..pos + n];
    let le2 = || u(2).try_into().unwrap();
    let le4 = || u(4).try_into().unwrap();
    let le8 = || u(8).try_into().unwrap();
    match t {
        ValueType::U8 => (MetaValue::U8(b[pos]), pos + 1),
        ValueType::I8 => (MetaValue::I8(b[pos] as i8), pos + 1),
        ValueType::Bool => (MetaValue::Bool(b[pos] == 1), pos + 1),
        ValueType::U16 => (MetaValue::U16(u16::from_le_bytes(le2())), pos + 2),
        ValueType::I16 => (MetaValue::I16(i16::from_le_bytes(le2())), pos + 2),
        ValueType::U32 => (MetaValue::U32(u32::from_le_bytes(le4())), pos + 4),
        ValueType::I32 => (MetaValue::I32(i32::from_le_bytes(le4())), pos + 4),
        ValueType::F32 => (MetaValue::F32(f32::from_le_bytes(le4())), pos + 4),
        ValueType::U64 => (MetaValue::U64(u64::from_le_bytes(le8())), pos + 8),
        ValueType::I64 => (MetaValue::I64(i64::from_le_bytes(le8())), pos + 8),
        ValueType::F64 => (MetaValue::F64(f64::from_le_bytes(le8())), pos + 8),
        ValueType::Str => {
            let len = u64::from_le_bytes(le8()) as usize;
            let s = std::str::from_utf8(&b[pos + 8..pos + 8 + len]).expect("validated UTF-8");
            (MetaValue::Str(s), pos + 8 + len)
        }
        ValueType::Array => {
            let elem = ValueType::from_id(u32::from_le_bytes(le4())).expect("validated type");
            let len = u64::from_le_bytes(b[pos + 4..pos + 12].try_into().unwrap());
            let start = pos + 12;
            let end = skip_validated(b, start, elem, len);
            (
                MetaValue::Array(MetaArray {
                    elem,
                    len,
                    bytes: &b[start..end],
                }),
                end,
            )
        }
    }
}

fn skip_validated(b: &[u8], mut pos: usize, elem: ValueType, len: u64) -> usize {
    match elem.fixed_size() {
        Some(size) => pos + (size * len) as usize,
        None => {
            for _ in 0..len {
                pos = read_validated(b, pos, elem).1;
            }
            pos
        }
    }
}

/// One metadata record, as offsets into the file.
#[derive(Clone, Debug)]
struct KvEntry {
    key_start: usize,
    key_len: usize,
    vtype: ValueType,
    value_at: usize,
}

/// A tensor's description from the file's tensor-info table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` (ne0) is the contiguous dimension, e.g. a linear layer's input size.
    pub dims: Vec<u64>,
    pub type_id: u32,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    #[serde(skip)]
    pub ggml_type: GgmlType,
    /// Offset relative to the data section.
    pub offset: u64,
    pub nbytes: u64,
    /// The IR shape: the dims reversed (row-major, `[N, K]` for a matrix), trailing ggml 1s
    /// dropped.
    #[serde(skip)]
    pub ir_shape: Vec<u64>,
}

/// The IR (row-major) shape of ggml dims: reversed, without trailing 1s beyond the first dim.
pub fn ir_shape(dims: &[u64]) -> Vec<u64> {
    let mut n = dims.len();
    while n > 1 && dims[n - 1] == 1 {
        n -= 1;
    }
    let mut v: Vec<u64> = dims[..n].to_vec();
    if v.is_empty() {
        v.push(1);
    }
    v.reverse();
    v
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The encoding bitnetc computes this tensor with, if it can.
    pub fn encoding(&self) -> Option<Encoding> {
        match self.ggml_type.support {
            Support::Compute(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything [`parse`] learned about a file, as offsets.
#[derive(Clone, Debug)]
pub struct Layout {
    pub version: u32,
    kvs: Vec<KvEntry>,
    kv_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_start: u64,
    pub type_table: TypeTable,
    /// Why this type table was chosen.
    pub type_table_reason: String,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

fn err<T>(offset: usize, kind: ParseErrorKind) -> Result<T, ParseError> {
    Err(ParseError {
        offset: offset as u64,
        kind,
    })
}

impl<'a> Cursor<'a> {
    fn left(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], ParseError> {
        if n > self.left() {
            return err(
                self.pos,
                ParseErrorKind::Truncated {
                    what: what(),
                    need: n,
                    left: self.left(),
                },
            );
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A length-prefixed UTF-8 string; returns its start and length.
    fn string(
        &mut self,
        max_len: Option<(u64, &dyn Fn(u64) -> ParseErrorKind)>,
        what: &dyn Fn() -> String,
    ) -> Result<(usize, usize), ParseError> {
        let at = self.pos;
        let len = self.u64(&|| format!("{} (length)", what()))?;
        if len > self.left() {
            return err(
                at,
                ParseErrorKind::StringTooLong {
                    what: what(),
                    len,
                    left: self.left(),
                },
            );
        }
        if let Some((max, kind)) = max_len
            && len > max
        {
            return err(at, kind(len));
        }
        let start = self.pos;
        let s = self.take(len, what)?;
        if std::str::from_utf8(s).is_err() {
            return err(at, ParseErrorKind::InvalidUtf8 { what: what() });
        }
        Ok((start, len as usize))
    }

    /// Checks `count` elements of at least `min_size` bytes each can fit in the rest of the file.
    fn check_count(
        &self,
        at: usize,
        what: String,
        count: u64,
        min_size: u64,
    ) -> Result<(), ParseError> {
        let max = self.left() / min_size;
        if count > max {
            return err(
                at,
                ParseErrorKind::CountTooLarge {
                    what,
                    count,
                    left: self.left(),
                    max,
                },
            );
        }
        Ok(())
    }

    /// Validates one value of type `t` and moves past it.
    fn skip_value(&mut self, t: ValueType, key: &str, in_array: bool) -> Result<(), ParseError> {
        let what = || format!("metadata key '{key}'");
        match t {
            ValueType::Bool => {
                let at = self.pos;
                let byte = self.take(1, &what)?[0];
                if byte > 1 {
                    return err(
                        at,
                        ParseErrorKind::InvalidBool {
                            key: key.to_string(),
                            byte,
                        },
                    );
                }
            }
            ValueType::Str => {
                self.string(None, &what)?;
            }
            ValueType::Array => {
                let at = self.pos;
                if in_array {
                    return err(
                        at,
                        ParseErrorKind::NestedArray {
                            key: key.to_string(),
                        },
                    );
                }
                let elem_id = self.u32(&what)?;
                let Some(elem) = ValueType::from_id(elem_id) else {
                    return err(
                        at,
                        ParseErrorKind::UnknownValueType {
                            key: key.to_string(),
                            type_id: elem_id,
                        },
                    );
                };
                if elem == ValueType::Array {
                    return err(
                        at,
                        ParseErrorKind::NestedArray {
                            key: key.to_string(),
                        },
                    );
                }
                let count = self.u64(&what)?;
                self.check_count(
                    at,
                    format!("metadata key '{key}': array length"),
                    count,
                    elem.min_size(),
                )?;
                match elem.fixed_size() {
                    Some(size) if elem != ValueType::Bool => {
                        self.take(count * size, &what)?;
                    }
                    _ => {
                        for _ in 0..count {
                            self.skip_value(elem, key, true)?;
                        }
                    }
                }
            }
            t => {
                self.take(t.fixed_size().unwrap(), &what)?;
            }
        }
        Ok(())
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// Parses and validates a whole GGUF file held in memory.
pub fn parse(b: &[u8]) -> Result<Layout, ParseError> {
    let mut c = Cursor { b, pos: 0 };
    if b.len() < 24 {
        if b.len() >= 4 && &b[..4] != b"GGUF" {
            return err(
                0,
                ParseErrorKind::BadMagic {
                    found: b[..4].try_into().unwrap(),
                },
            );
        }
        return err(
            0,
            ParseErrorKind::TooSmall {
                len: b.len() as u64,
            },
        );
    }
    let magic: [u8; 4] = b[..4].try_into().unwrap();
    if &magic == b"FUGG" {
        return err(
            0,
            ParseErrorKind::BigEndian {
                version: u32::from_be_bytes(b[4..8].try_into().unwrap()),
            },
        );
    }
    if &magic != b"GGUF" {
        return err(0, ParseErrorKind::BadMagic { found: magic });
    }
    c.pos = 4;
    let version = c.u32(&|| "version".into())?;
    if !(2..=3).contains(&version) {
        let swapped = version.swap_bytes();
        if (1..=3).contains(&swapped) {
            return err(4, ParseErrorKind::BigEndian { version: swapped });
        }
        let hint = if version == 1 {
            " (version 1 used 32-bit counts; re-convert the model with a current converter)"
        } else {
            ""
        };
        return err(4, ParseErrorKind::UnsupportedVersion { version, hint });
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    // A KV record is at least an empty key (8), a type (4) and a 1-byte value.
    c.check_count(16, "the metadata count".into(), n_kv, 13)?;
    // A tensor info is at least an empty name (8), n_dims (4), type (4) and offset (8).
    c.check_count(8, "the tensor count".into(), n_tensors, 24)?;

    let mut kvs = Vec::with_capacity(n_kv as usize);
    let mut kv_index = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let at = c.pos;
        let (key_start, key_len) = c.string(None, &|| format!("metadata key #{i}"))?;
        let key = std::str::from_utf8(&b[key_start..key_start + key_len]).unwrap();
        let type_id = c.u32(&|| format!("metadata key '{key}' (value type)"))?;
        let Some(vtype) = ValueType::from_id(type_id) else {
            return err(
                at,
                ParseErrorKind::UnknownValueType {
                    key: key.into(),
                    type_id,
                },
            );
        };
        let value_at = c.pos;
        c.skip_value(vtype, key, false)?;
        if kv_index.insert(key.to_string(), kvs.len()).is_some() {
            return err(at, ParseErrorKind::DuplicateKey { key: key.into() });
        }
        kvs.push(KvEntry {
            key_start,
            key_len,
            vtype,
            value_at,
        });
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    if let Some(&i) = kv_index.get("general.alignment") {
        let kv = &kvs[i];
        let at = kv.key_start - 8;
        match read_validated(b, kv.value_at, kv.vtype).0 {
            MetaValue::U32(a) if a != 0 && a.is_power_of_two() => alignment = a as u64,
            MetaValue::U32(a) => {
                return err(
                    at,
                    ParseErrorKind::BadAlignment {
                        reason: format!("{a} is not a power of two"),
                    },
                );
            }
            v => {
                return err(
                    at,
                    ParseErrorKind::BadAlignment {
                        reason: format!("must be a u32, found {}", v.type_description()),
                    },
                );
            }
        }
    }

    struct RawTensor {
        at: usize,
        name: String,
        dims: Vec<u64>,
        type_id: u32,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let at = c.pos;
        let too_long = |len| ParseErrorKind::NameTooLong {
            tensor: String::from_utf8_lossy(&b[at + 8..at + 8 + len as usize]).into_owned(),
            len,
        };
        let (s, l) = c.string(Some((MAX_NAME_LEN, &too_long)), &|| {
            format!("tensor #{i} name")
        })?;
        let name = std::str::from_utf8(&b[s..s + l]).unwrap().to_string();
        let what = || format!("tensor '{name}'");
        let n_dims = c.u32(&what)?;
        if n_dims > 4 {
            return err(
                at,
                ParseErrorKind::TooManyDims {
                    tensor: name,
                    n_dims,
                },
            );
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let n = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if dims.iter().any(|&d| d > i64::MAX as u64) || n.is_none_or(|n| n > i64::MAX as u64) {
            return err(at, ParseErrorKind::DimsOverflow { tensor: name, dims });
        }
        let type_id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        if !names.insert(name.clone()) {
            return err(at, ParseErrorKind::DuplicateTensor { tensor: name });
        }
        raw.push(RawTensor {
            at,
            name,
            dims,
            type_id,
            offset,
        });
    }

    let data_start = align_up(c.pos as u64, alignment).unwrap_or(u64::MAX);
    if data_start > b.len() as u64 && !raw.is_empty() {
        return err(
            c.pos,
            ParseErrorKind::DataPastEnd {
                start: data_start,
                len: b.len() as u64,
            },
        );
    }
    let data_len = (b.len() as u64).saturating_sub(data_start);

    // The space each tensor has before the next one (in offset order) or the end of the data.
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by_key(|&i| (raw[i].offset, i));
    let mut next_offset = vec![data_len; raw.len()];
    for w in order.windows(2) {
        next_offset[w[0]] = raw[w[1]].offset;
    }
    let is_last = |i: usize| order.last() == Some(&i);
    let fits = |table: TypeTable, t: &RawTensor, i: usize| -> Result<u64, String> {
        let ty = types::lookup(table, t.type_id)?;
        if let Support::Invalid(reason) = ty.support {
            return Err(reason.to_string());
        }
        let nbytes = types::byte_size(&ty, &t.dims)?;
        let space = next_offset[i].saturating_sub(t.offset);
        let packed = align_up(nbytes, alignment).unwrap_or(u64::MAX);
        if nbytes > space || (!is_last(i) && packed != space) {
            return Err(format!(
                "{} would take {nbytes} bytes where the file has {space}",
                ty.name
            ));
        }
        Ok(nbytes)
    };

    let arch = kv_index.get("general.architecture").and_then(|&i| {
        match read_validated(b, kvs[i].value_at, kvs[i].vtype).0 {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    });
    let bitnet_arch = arch.is_some_and(|a| a.starts_with("bitnet"));
    let contested: Vec<usize> = (0..raw.len())
        .filter(|&i| types::is_contested(raw[i].type_id))
        .collect();
    let (type_table, type_table_reason) = if contested.is_empty() {
        (
            TypeTable::Upstream,
            "no tensor uses a contested type id (31-33, 36-39)".to_string(),
        )
    } else {
        let check = |table| {
            contested
                .iter()
                .map(|&i| fits(table, &raw[i], i))
                .collect::<Result<Vec<_>, _>>()
        };
        let ids: Vec<u32> = {
            let mut v: Vec<u32> = contested.iter().map(|&i| raw[i].type_id).collect();
            v.sort();
            v.dedup();
            v
        };
        match (check(TypeTable::Upstream), check(TypeTable::BitnetCpp)) {
            (Err(up), Ok(_)) => (
                TypeTable::BitnetCpp,
                format!("type ids {ids:?} fit only bitnet.cpp's table (upstream: {up})"),
            ),
            (Ok(_), Err(fork)) => (
                TypeTable::Upstream,
                format!(
                    "type ids {ids:?} fit only upstream llama.cpp's table (bitnet.cpp: {fork})"
                ),
            ),
            (Ok(_), Ok(_)) if bitnet_arch => (
                TypeTable::BitnetCpp,
                format!(
                    "type ids {ids:?} fit both tables; architecture '{}' is bitnet.cpp's",
                    arch.unwrap_or("")
                ),
            ),
            (Ok(_), Ok(_)) => (
                TypeTable::Upstream,
                format!("type ids {ids:?} fit both tables; architecture is not a bitnet one"),
            ),
            (Err(up), Err(fork)) => {
                let i = contested[0];
                return err(
                    raw[i].at,
                    ParseErrorKind::NoTypeTable {
                        tensor: raw[i].name.clone(),
                        type_id: raw[i].type_id,
                        upstream: up,
                        fork,
                    },
                );
            }
        }
    };

    let mut tensors = Vec::with_capacity(raw.len());
    for t in &raw {
        let ty = types::lookup(type_table, t.type_id).map_err(|reason| ParseError {
            offset: t.at as u64,
            kind: ParseErrorKind::BadType {
                tensor: t.name.clone(),
                reason,
            },
        })?;
        if let Support::Invalid(reason) = ty.support {
            return err(
                t.at,
                ParseErrorKind::BadType {
                    tensor: t.name.clone(),
                    reason: reason.into(),
                },
            );
        }
        let nbytes = types::byte_size(&ty, &t.dims).map_err(|reason| ParseError {
            offset: t.at as u64,
            kind: ParseErrorKind::BadSize {
                tensor: t.name.clone(),
                reason,
            },
        })?;
        if t.offset % alignment != 0 {
            return err(
                t.at,
                ParseErrorKind::Misaligned {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    alignment,
                },
            );
        }
        if t.offset
            .checked_add(nbytes)
            .is_none_or(|end| end > data_len)
        {
            return err(
                t.at,
                ParseErrorKind::OutOfBounds {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    nbytes,
                    data_len,
                },
            );
        }
        tensors.push(TensorInfo {
            name: t.name.clone(),
            dims: t.dims.clone(),
            type_id: t.type_id,
            type_name: ty.name,
            ggml_type: ty,
            offset: t.offset,
            nbytes,
            ir_shape: ir_shape(&t.dims),
        });
    }
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.nbytes > b.offset {
            return err(
                raw[w[0]].at,
                ParseErrorKind::Overlap {
                    tensor: a.name.clone(),
                    offset: a.offset,
                    nbytes: a.nbytes,
                    other: b.name.clone(),
                    other_offset: b.offset,
                },
            );
        }
        if align_up(a.offset + a.nbytes, alignment) != Some(b.offset) {
            return err(
                raw[w[0]].at,
                ParseErrorKind::SizeMismatch {
                    tensor: a.name.clone(),
                    type_name: a.type_name.to_string(),
                    dims: a.dims.clone(),
                    nbytes: a.nbytes,
                    space: b.offset - a.offset,
                    next_offset: b.offset,
                },
            );
        }
    }

    let tensor_index = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok(Layout {
        version,
        kvs,
        kv_index,
        tensors,
        tensor_index,
        alignment,
        data_start,
        type_table,
        type_table_reason,
    })
}

enum Backing {
    /// A mapped file, of which the GGUF image is this range.
    Mapped(memmap2::Mmap, std::ops::Range<usize>),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m, r) => &m[r.clone()],
            Backing::Owned(v) => v,
        }
    }
}

/// An open, validated GGUF file. Metadata and tensor data are borrowed views of its bytes.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    layout: Layout,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.layout.version)
            .field("tensors", &self.layout.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates a file. No tensor data is read.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        Self::open_range(path, 0, None)
    }

    /// Memory-maps a file and validates the GGUF image that starts `offset` bytes into it and
    /// runs for `len` bytes (to its end when `None`): a GGUF embedded in another container.
    /// Tensor alignment holds in the file when `offset` is a multiple of it.
    pub fn open_range(
        path: impl AsRef<Path>,
        offset: u64,
        len: Option<u64>,
    ) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let end = match len {
            Some(l) => offset.checked_add(l),
            None => Some(file_len),
        };
        let range = match end {
            Some(end) if offset <= end && end <= file_len => offset as usize..end as usize,
            _ => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the GGUF image at bytes {offset}..{} is past the end of the file \
                         ({file_len} bytes)",
                        end.map_or("overflow".into(), |e| e.to_string())
                    ),
                )));
            }
        };
        let backing = if range.is_empty() {
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only. As with every mmap-based model loader, the file must
            // not be truncated by another process while it is open.
            Backing::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?, range)
        };
        Self::with_backing(path, backing)
    }

    /// Validates a file held in memory; `path` names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::with_backing(path.as_ref().to_path_buf(), Backing::Owned(bytes))
    }

    fn with_backing(path: PathBuf, backing: Backing) -> Result<GgufFile, GgufError> {
        match parse(backing.bytes()) {
            Ok(layout) => Ok(GgufFile {
                path,
                backing,
                layout,
            }),
            Err(source) => Err(GgufError::Parse {
                path,
                source: Box::new(source),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A hint that the mapped pages may leave memory now (they come back, from the page cache
    /// or the file, when read): after a pass over the whole file, such as a checksum, so that
    /// only what the model reads stays resident.
    pub fn release_all(&self) {
        #[cfg(unix)]
        if let Backing::Mapped(map, _) = &self.backing {
            // SAFETY: a read-only shared file mapping: dropped pages are read back from the
            // file on the next access, with the same contents. A failure only keeps them.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, map.len())
            };
        }
    }

    /// The whole file the image lies in, as mapped (the image itself for a file held in
    /// memory): what a container around the image stores beside it.
    pub fn file_bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(m, _) => m,
            Backing::Owned(v) => v,
        }
    }

    /// The whole GGUF image, as mapped.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn version(&self) -> u32 {
        self.layout.version
    }

    pub fn file_size(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    /// Every metadata record in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, MetaValue<'_>)> {
        let b = self.backing.bytes();
        self.layout.kvs.iter().map(move |kv| {
            let key = std::str::from_utf8(&b[kv.key_start..kv.key_start + kv.key_len]).unwrap();
            (key, read_validated(b, kv.value_at, kv.vtype).0)
        })
    }

    pub fn metadata_len(&self) -> usize {
        self.layout.kvs.len()
    }

    pub fn get(&self, key: &str) -> Option<MetaValue<'_>> {
        let kv = &self.layout.kvs[*self.layout.kv_index.get(key)?];
        Some(read_validated(self.backing.bytes(), kv.value_at, kv.vtype).0)
    }

    fn type_error(key: &str, expected: &'static str, v: &MetaValue<'_>) -> ModelError {
        ModelError::KeyType {
            key: key.into(),
            expected,
            found: v.type_description(),
        }
    }

    /// A string value; an error if the key holds another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s)),
            Some(v) => Err(Self::type_error(key, "a string", &v)),
        }
    }

    /// A non-negative integer of any integer type (files use u32 and u64 interchangeably).
    pub fn get_uint(&self, key: &str) -> Result<Option<u64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(i) if i >= 0 => Ok(Some(i as u64)),
                Some(i) => Err(ModelError::BadValue {
                    key: key.into(),
                    value: i.to_string(),
                    reason: "expected a non-negative integer".into(),
                }),
                None => match v {
                    MetaValue::U64(u) => Ok(Some(u)),
                    _ => Err(Self::type_error(key, "an integer", &v)),
                },
            },
        }
    }

    /// A float (f32 or f64) value.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::type_error(key, "a float", &v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(Self::type_error(key, "a bool", &v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<MetaArray<'_>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(Self::type_error(key, "an array", &v)),
        }
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.layout.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.layout
            .tensor_index
            .get(name)
            .map(|&i| &self.layout.tensors[i])
    }

    /// The bytes of a tensor, borrowed from the map.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.layout.data_start + t.offset) as usize;
        &self.backing.bytes()[start..start + t.nbytes as usize]
    }

    /// Decodes a tensor to f32 with the reference decoder of its encoding.
    pub fn decode(&self, t: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let enc = t.encoding().ok_or_else(|| GgufError::Model {
            path: self.path.clone(),
            source: Box::new(ModelError::TensorType {
                tensor: t.name.clone(),
                type_name: t.type_name.into(),
                reason: match t.ggml_type.support {
                    Support::Unusable(why) => why.into(),
                    _ => "bitnetc has no decoder for this type".into(),
                },
            }),
        })?;
        enc.decode(self.tensor_data(t), t.n_elements())
            .map_err(|source| GgufError::Encoding {
                path: self.path.clone(),
                tensor: t.name.clone(),
                source,
            })
    }

    /// Wraps a [`ModelError`] with this file's path.
    pub fn model_error(&self, source: ModelError) -> GgufError {
        GgufError::Model {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }
}

impl bitnetc_ir::interp::WeightSource for GgufFile {
    fn weight(&self, name: &str) -> Option<bitnetc_ir::interp::WeightRef<'_>> {
        let t = self.tensor(name)?;
        Some(bitnetc_ir::interp::WeightRef {
            encoding: t.encoding()?,
            shape: &t.ir_shape,
            bytes: self.tensor_data(t),
        })
    }

    fn release(&self, name: &str) {
        #[cfg(unix)]
        if let (Some(t), Backing::Mapped(map, _)) = (self.tensor(name), &self.backing) {
            let data = self.tensor_data(t);
            let offset = data.as_ptr() as usize - map.as_ptr() as usize;
            // SAFETY: a read-only shared file mapping: dropped pages are read back from the
            // file on the next access, with the same contents. A failure only keeps them.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len())
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }
}
