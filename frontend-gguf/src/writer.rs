//! A GGUF v3 writer: metadata, tensor infos, then tensor data streamed in order, each tensor
//! padded to the alignment (the layout upstream's reader requires).

use crate::gguf::{DEFAULT_ALIGNMENT, MAX_NAME_LEN, MetaValue, ValueType};
use crate::types::{self, TypeTable};
use bitnetc_ir::Encoding;
use std::io::{self, Write};
use std::path::Path;

/// An owned metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Element type and elements (all of that type; no nested arrays).
    Array(ValueType, Vec<Value>),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::Str,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
            Value::Array(..) => ValueType::Array,
        }
    }

    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
        Value::Array(
            ValueType::Str,
            items.into_iter().map(|s| Value::Str(s.into())).collect(),
        )
    }

    pub fn f32s(items: impl IntoIterator<Item = f32>) -> Value {
        Value::Array(ValueType::F32, items.into_iter().map(Value::F32).collect())
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Value {
        Value::Array(ValueType::I32, items.into_iter().map(Value::I32).collect())
    }

    fn write(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            Value::U8(v) => w.write_all(&[*v]),
            Value::I8(v) => w.write_all(&v.to_le_bytes()),
            Value::U16(v) => w.write_all(&v.to_le_bytes()),
            Value::I16(v) => w.write_all(&v.to_le_bytes()),
            Value::U32(v) => w.write_all(&v.to_le_bytes()),
            Value::I32(v) => w.write_all(&v.to_le_bytes()),
            Value::F32(v) => w.write_all(&v.to_le_bytes()),
            Value::Bool(v) => w.write_all(&[*v as u8]),
            Value::Str(s) => write_str(w, s),
            Value::U64(v) => w.write_all(&v.to_le_bytes()),
            Value::I64(v) => w.write_all(&v.to_le_bytes()),
            Value::F64(v) => w.write_all(&v.to_le_bytes()),
            Value::Array(elem, items) => {
                w.write_all(&(*elem as u32).to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|v| v.write(w))
            }
        }
    }

    fn check(&self, key: &str) -> io::Result<()> {
        if let Value::Array(elem, items) = self {
            if *elem == ValueType::Array {
                return Err(invalid(format!(
                    "metadata key '{key}': nested arrays cannot be written"
                )));
            }
            if let Some(v) = items.iter().find(|v| v.value_type() != *elem) {
                return Err(invalid(format!(
                    "metadata key '{key}': array of {elem} holds a {}",
                    v.value_type()
                )));
            }
        }
        Ok(())
    }
}

impl From<MetaValue<'_>> for Value {
    fn from(v: MetaValue<'_>) -> Value {
        match v {
            MetaValue::U8(v) => Value::U8(v),
            MetaValue::I8(v) => Value::I8(v),
            MetaValue::U16(v) => Value::U16(v),
            MetaValue::I16(v) => Value::I16(v),
            MetaValue::U32(v) => Value::U32(v),
            MetaValue::I32(v) => Value::I32(v),
            MetaValue::F32(v) => Value::F32(v),
            MetaValue::Bool(v) => Value::Bool(v),
            MetaValue::Str(s) => Value::Str(s.to_string()),
            MetaValue::U64(v) => Value::U64(v),
            MetaValue::I64(v) => Value::I64(v),
            MetaValue::F64(v) => Value::F64(v),
            MetaValue::Array(a) => Value::Array(a.elem_type(), a.iter().map(Value::from).collect()),
        }
    }
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A tensor to be written: its info and its exact byte size.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// ggml order (ne0 first).
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub nbytes: u64,
}

/// Collects metadata and tensor infos; [`GgufWriter::begin`] writes them and returns a stream
/// for the tensor data.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    alignment: u64,
    kvs: Vec<(String, Value)>,
    tensors: Vec<TensorSpec>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets a metadata value, replacing an existing key in place (the order stays stable).
    pub fn set(&mut self, key: &str, value: Value) {
        if key == "general.alignment"
            && let Value::U32(a) = value
            && a.is_power_of_two()
        {
            self.alignment = a as u64;
        }
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => self.kvs.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Declares a tensor of a computable encoding.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], encoding: Encoding) -> io::Result<()> {
        // Every computable encoding has the same id in both tables, I2_S in bitnet.cpp's.
        self.add_tensor_type_id(name, dims, types::id_of(encoding), TypeTable::BitnetCpp)
    }

    /// Declares a tensor by ggml type id, in the meaning `table` gives it.
    pub fn add_tensor_type_id(
        &mut self,
        name: &str,
        dims: &[u64],
        type_id: u32,
        table: TypeTable,
    ) -> io::Result<()> {
        let ty =
            types::lookup(table, type_id).map_err(|e| invalid(format!("tensor '{name}': {e}")))?;
        let nbytes =
            types::byte_size(&ty, dims).map_err(|e| invalid(format!("tensor '{name}': {e}")))?;
        self.add_raw_tensor(name, dims, type_id, nbytes)
    }

    fn add_raw_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        type_id: u32,
        nbytes: u64,
    ) -> io::Result<()> {
        if name.len() as u64 > MAX_NAME_LEN {
            return Err(invalid(format!(
                "tensor name '{name}' is longer than {MAX_NAME_LEN} bytes"
            )));
        }
        if dims.is_empty() || dims.len() > 4 {
            return Err(invalid(format!(
                "tensor '{name}': {} dims, expected 1 to 4",
                dims.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(invalid(format!("tensor '{name}' declared twice")));
        }
        self.tensors.push(TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            type_id,
            nbytes,
        });
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Writes the header, metadata and tensor infos, padded to the data section.
    pub fn begin<W: Write>(self, mut w: W) -> io::Result<TensorStream<W>> {
        for (k, v) in &self.kvs {
            v.check(k)?;
        }
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            write_str(&mut header, k)?;
            header.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            v.write(&mut header)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut header, &t.name)?;
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.type_id.to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += t.nbytes.div_ceil(self.alignment) * self.alignment;
        }
        let pad = (self.alignment - header.len() as u64 % self.alignment) % self.alignment;
        header.resize(header.len() + pad as usize, 0);
        w.write_all(&header)?;
        Ok(TensorStream {
            w,
            tensors: self.tensors,
            next: 0,
            partial: 0,
            alignment: self.alignment,
        })
    }

    /// Writes a whole file to memory; `data[i]` is the bytes of tensor `i`.
    pub fn to_bytes(self, data: &[&[u8]]) -> io::Result<Vec<u8>> {
        let mut s = self.begin(Vec::new())?;
        for d in data {
            s.write_tensor(d)?;
        }
        s.finish()
    }
}

/// Writes tensor data in declaration order.
pub struct TensorStream<W: Write> {
    w: W,
    tensors: Vec<TensorSpec>,
    next: usize,
    /// Bytes of tensor `next` written so far by [`TensorStream::write_piece`].
    partial: u64,
    alignment: u64,
}

impl<W: Write> TensorStream<W> {
    /// The tensor the next [`TensorStream::write_tensor`] call writes.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.tensors.get(self.next)
    }

    pub fn write_tensor(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(invalid("more tensor data than declared tensors".into()));
        };
        if self.partial != 0 || data.len() as u64 != t.nbytes {
            return Err(invalid(format!(
                "tensor '{}': {} bytes given, {} declared",
                t.name,
                self.partial + data.len() as u64,
                t.nbytes
            )));
        }
        self.write_piece(data)
    }

    /// Writes the next bytes of the current tensor; once all its declared bytes are written
    /// it is padded and the stream moves to the next tensor (an empty tensor needs one call
    /// with no bytes).
    pub fn write_piece(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(invalid("more tensor data than declared tensors".into()));
        };
        let nbytes = t.nbytes;
        if self.partial + data.len() as u64 > nbytes {
            return Err(invalid(format!(
                "tensor '{}': more than the {} bytes declared",
                t.name, nbytes
            )));
        }
        self.w.write_all(data)?;
        self.partial += data.len() as u64;
        if self.partial == nbytes {
            let pad = (self.alignment - nbytes % self.alignment) % self.alignment;
            self.w.write_all(&vec![0u8; pad as usize])?;
            self.next += 1;
            self.partial = 0;
        }
        Ok(())
    }

    /// The writer back, before any tensor data (for writers that lay out the data
    /// themselves).
    pub fn into_header(self) -> W {
        self.w
    }

    pub fn finish(mut self) -> io::Result<W> {
        if let Some(t) = self.tensors.get(self.next) {
            return Err(invalid(format!(
                "tensor '{}' was declared but never written",
                t.name
            )));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Writes a file through a temporary file in the same folder and renames it into place, so a
/// failure never leaves a partial file under `path`.
pub fn write_atomic<T>(
    path: &Path,
    f: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> io::Result<T>,
) -> io::Result<T> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut w = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        let v = f(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(v)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn round_trip_every_value_type() {
        let mut w = GgufWriter::new();
        let values = [
            ("a.u8", Value::U8(7)),
            ("a.i8", Value::I8(-7)),
            ("a.u16", Value::U16(65535)),
            ("a.i16", Value::I16(-300)),
            ("a.u32", Value::U32(4_000_000_000)),
            ("a.i32", Value::I32(-5)),
            ("a.f32", Value::F32(1e-5)),
            ("a.bool", Value::Bool(true)),
            ("a.str", Value::str("héllo")),
            ("a.u64", Value::U64(u64::MAX)),
            ("a.i64", Value::I64(i64::MIN)),
            ("a.f64", Value::F64(0.1)),
            ("a.arr", Value::strings(["x", "", "zz"])),
            (
                "a.bools",
                Value::Array(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
            ),
        ];
        for (k, v) in &values {
            w.set(k, v.clone());
        }
        w.add_tensor("t", &[128, 2], Encoding::I2S).unwrap();
        w.add_tensor("u", &[3], Encoding::F32).unwrap();
        let t = Encoding::I2S.encode(&[0.5; 256]).unwrap();
        let u = Encoding::F32.encode(&[1.0, 2.0, 3.0]).unwrap();
        let bytes = w.to_bytes(&[&t, &u]).unwrap();
        let f = GgufFile::from_bytes("mem.gguf", bytes).unwrap();
        let read: Vec<(String, Value)> = f
            .metadata()
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect();
        let expect: Vec<(String, Value)> = values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(read, expect);
        assert_eq!(f.tensors()[0].type_name, "I2_S");
        assert_eq!(f.tensors()[0].nbytes, 64 + 32);
        assert_eq!(f.tensors()[1].offset, 96);
        assert_eq!(f.tensor_data(&f.tensors()[1]), &u[..]);
        assert_eq!(f.decode(&f.tensors()[0]).unwrap(), vec![0.5; 256]);
    }

    #[test]
    fn refuses_bad_tensors() {
        let mut w = GgufWriter::new();
        assert!(w.add_tensor("x", &[33], Encoding::Q8_0).is_err());
        // Rows must be whole blocks, not just the element count.
        assert!(w.add_tensor("r", &[128, 2], Encoding::TQ2_0).is_err());
        assert!(w.add_tensor(&"n".repeat(64), &[4], Encoding::F32).is_err());
        w.add_tensor("x", &[4], Encoding::F32).unwrap();
        assert!(w.add_tensor("x", &[4], Encoding::F32).is_err());
        let mut s = w.begin(Vec::new()).unwrap();
        assert!(s.write_tensor(&[0; 15]).is_err());
    }
}
