//! What `bitnetc inspect` reports about a file. Building it reads metadata and tensor infos
//! only, never tensor data.

use crate::arch::ModelConfig;
use crate::gguf::{GgufFile, MetaValue, TensorInfo};
use crate::tokenizer::{TokenizerMeta, TokenizerSummary};
use crate::types::TypeTable;
use serde::Serialize;
use std::collections::BTreeMap;

/// Arrays longer than this are summarized by their first elements.
pub const ARRAY_HEAD: usize = 8;

#[derive(Clone, Debug, Serialize)]
pub struct Description {
    pub file: String,
    pub file_bytes: u64,
    pub gguf_version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub type_table: TypeTable,
    pub type_table_reason: String,
    pub metadata: Vec<MetaEntry>,
    pub architecture: Option<String>,
    /// The validated configuration, or why the model cannot be loaded.
    #[serde(flatten)]
    pub config: ConfigOutcome,
    pub totals: Totals,
    pub tokenizer: Option<TokenizerSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorInfo>>,
}

#[derive(Clone, Debug, Serialize)]
pub enum ConfigOutcome {
    #[serde(rename = "config")]
    Valid(ModelConfig),
    #[serde(rename = "config_error")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct MetaEntry {
    pub key: String,
    #[serde(rename = "type")]
    pub type_description: String,
    /// Scalars and strings in full; arrays as their first [`ARRAY_HEAD`] elements.
    pub value: serde_json::Value,
    #[serde(skip)]
    pub display: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    pub by_type: Vec<TypeTotal>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TypeTotal {
    #[serde(rename = "type")]
    pub type_name: String,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
}

fn json_scalar(v: &MetaValue<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match *v {
        MetaValue::U8(x) => J::from(x),
        MetaValue::I8(x) => J::from(x),
        MetaValue::U16(x) => J::from(x),
        MetaValue::I16(x) => J::from(x),
        MetaValue::U32(x) => J::from(x),
        MetaValue::I32(x) => J::from(x),
        MetaValue::U64(x) => J::from(x),
        MetaValue::I64(x) => J::from(x),
        MetaValue::F32(x) => J::from(x as f64),
        MetaValue::F64(x) => J::from(x),
        MetaValue::Bool(x) => J::from(x),
        MetaValue::Str(s) => J::from(s),
        MetaValue::Array(a) => {
            J::Array(a.iter().take(ARRAY_HEAD).map(|v| json_scalar(&v)).collect())
        }
    }
}

/// Describes a file. `with_tensors` adds the full tensor table.
pub fn describe(file: &GgufFile, with_tensors: bool) -> Description {
    let layout = file.layout();
    let metadata = file
        .metadata()
        .map(|(k, v)| MetaEntry {
            key: k.to_string(),
            type_description: v.type_description(),
            value: json_scalar(&v),
            display: v.to_string(),
        })
        .collect();
    let config = match ModelConfig::from_gguf(file) {
        Ok(c) => ConfigOutcome::Valid(c),
        Err(e) => ConfigOutcome::Invalid(e.to_string()),
    };
    let mut by_type: BTreeMap<&str, TypeTotal> = BTreeMap::new();
    let mut totals = Totals {
        tensors: file.tensors().len(),
        ..Totals::default()
    };
    for t in file.tensors() {
        let e = by_type.entry(t.type_name).or_insert_with(|| TypeTotal {
            type_name: t.type_name.into(),
            tensors: 0,
            parameters: 0,
            bytes: 0,
        });
        e.tensors += 1;
        e.parameters += t.n_elements();
        e.bytes += t.nbytes;
        totals.parameters += t.n_elements();
        totals.bytes += t.nbytes;
    }
    totals.by_type = by_type.into_values().collect();
    let (tokenizer, tokenizer_error) = match TokenizerMeta::from_gguf(file) {
        Ok(t) => (t.map(|t| t.summary()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Description {
        file: file.path().display().to_string(),
        file_bytes: file.file_size(),
        gguf_version: file.version(),
        alignment: layout.alignment,
        data_offset: layout.data_start,
        type_table: layout.type_table,
        type_table_reason: layout.type_table_reason.clone(),
        metadata,
        architecture: file
            .get_str("general.architecture")
            .ok()
            .flatten()
            .map(str::to_string),
        config,
        totals,
        tokenizer,
        tokenizer_error,
        tensors: with_tensors.then(|| file.tensors().to_vec()),
    }
}
