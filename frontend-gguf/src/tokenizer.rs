//! Tokenizer and chat-template metadata, as borrowed views of the file (FORMATS.md §5).
//! Building a tokenizer from it is the runtime's business.

use crate::error::ModelError;
use crate::gguf::{GgufFile, MetaArray, MetaValue, ValueType};
use bitnetc_ir::vocab::{TokenType, TokenizerKind, TokenizerSpec};
use serde::Serialize;

/// Token texts llama.cpp treats as end-of-generation markers (and as control tokens) whatever
/// the file says.
pub const END_MARKERS: [&str; 8] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
];

/// Pre-tokenizers whose files need a BOS token even when they do not say so (llama.cpp).
const BOS_BY_DEFAULT: [&str; 3] = ["llama3", "llama-v3", "llama-bpe"];

/// The `tokenizer.*` metadata of a GGUF file.
#[derive(Clone, Debug)]
pub struct TokenizerMeta<'a> {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE), `llama` (SentencePiece), …
    pub model: &'a str,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name; absent in bitnet.cpp files, where
    /// bitnet.cpp uses its DEFAULT rules.
    pub pre: Option<&'a str>,
    pub tokens: MetaArray<'a>,
    pub scores: Option<MetaArray<'a>>,
    pub token_types: Option<MetaArray<'a>>,
    pub merges: Option<MetaArray<'a>>,
    pub special: SpecialTokens,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<&'a str>,
}

/// Ids of the special tokens the file names.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unknown: Option<u32>,
    pub separator: Option<u32>,
    pub padding: Option<u32>,
}

impl<'a> TokenizerMeta<'a> {
    /// Reads the tokenizer metadata; `None` when the file has no tokenizer.
    pub fn from_gguf(file: &'a GgufFile) -> Result<Option<TokenizerMeta<'a>>, ModelError> {
        let Some(model) = file.get_str("tokenizer.ggml.model")? else {
            return Ok(None);
        };
        let tokens =
            typed_array(file, "tokenizer.ggml.tokens", ValueType::Str)?.ok_or_else(|| {
                ModelError::MissingKey {
                    key: "tokenizer.ggml.tokens".into(),
                    hint: " (tokenizer.ggml.model is set, so the vocabulary must be too)".into(),
                }
            })?;
        let n = tokens.len();
        let same_len =
            |a: Option<MetaArray<'a>>, key: &str| -> Result<Option<MetaArray<'a>>, ModelError> {
                match a {
                    Some(a) if a.len() != n => Err(ModelError::BadValue {
                        key: key.into(),
                        value: format!("{} entries", a.len()),
                        reason: format!("expected one per token ({n})"),
                    }),
                    a => Ok(a),
                }
            };
        let scores = same_len(
            typed_array(file, "tokenizer.ggml.scores", ValueType::F32)?,
            "tokenizer.ggml.scores",
        )?;
        let token_types = same_len(
            typed_array(file, "tokenizer.ggml.token_type", ValueType::I32)?,
            "tokenizer.ggml.token_type",
        )?;
        let merges = typed_array(file, "tokenizer.ggml.merges", ValueType::Str)?;
        let id = |k: &str| -> Result<Option<u32>, ModelError> {
            let key = format!("tokenizer.ggml.{k}");
            match file.get_uint(&key)? {
                None => Ok(None),
                Some(v) if v < n => Ok(Some(v as u32)),
                Some(v) => Err(ModelError::BadValue {
                    key,
                    value: v.to_string(),
                    reason: format!("not a token id (the vocabulary has {n} tokens)"),
                }),
            }
        };
        let special = SpecialTokens {
            bos: id("bos_token_id")?,
            eos: id("eos_token_id")?,
            eot: id("eot_token_id")?,
            eom: id("eom_token_id")?,
            unknown: id("unknown_token_id")?,
            separator: id("seperator_token_id")?.or(id("separator_token_id")?),
            padding: id("padding_token_id")?,
        };
        Ok(Some(TokenizerMeta {
            model,
            pre: file.get_str("tokenizer.ggml.pre")?,
            tokens,
            scores,
            token_types,
            merges,
            special,
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: file.get_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: file.get_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: file.get_str("tokenizer.chat_template")?,
        }))
    }

    /// The tokenizer as plain data, with llama.cpp's defaults for what the file leaves out.
    pub fn to_spec(&self) -> Result<TokenizerSpec, ModelError> {
        let kind = match self.model {
            "gpt2" => TokenizerKind::Bpe {
                pre: self.pre.unwrap_or("default").to_string(),
            },
            "llama" => TokenizerKind::Spm,
            other => {
                return Err(ModelError::BadValue {
                    key: "tokenizer.ggml.model".into(),
                    value: other.into(),
                    reason: "bitnetc tokenizes gpt2 (byte-level BPE) and llama (SentencePiece) vocabularies".into(),
                });
            }
        };
        let tokens: Vec<String> = self
            .tokens
            .strings()
            .expect("checked to be strings")
            .map(str::to_string)
            .collect();
        let mut types: Vec<TokenType> = match self.token_types {
            Some(a) => a.iter().map(|v| TokenType::from_gguf(int_of(v))).collect(),
            None => vec![TokenType::Normal; tokens.len()],
        };
        let scores = match self.scores {
            Some(a) => a
                .iter()
                .map(|v| if let MetaValue::F32(f) = v { f } else { 0.0 })
                .collect(),
            None => Vec::new(),
        };
        let merges = match self.merges {
            Some(a) => a
                .strings()
                .map(|m| m.map(str::to_string).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let mut eot = self.special.eot;
        let mut end_of_generation: Vec<u32> =
            [self.special.eos, self.special.eot, self.special.eom]
                .into_iter()
                .flatten()
                .collect();
        for (id, text) in tokens.iter().enumerate() {
            if END_MARKERS.contains(&text.as_str()) {
                types[id] = TokenType::Control;
                end_of_generation.push(id as u32);
                if eot.is_none() && text != "<|endoftext|>" && text != "<|eom_id|>" {
                    eot = Some(id as u32);
                }
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let spm = matches!(kind, TokenizerKind::Spm);
        let bos_default = spm || self.pre.is_some_and(|p| BOS_BY_DEFAULT.contains(&p));
        Ok(TokenizerSpec {
            kind,
            tokens,
            types,
            scores,
            merges,
            bos: self.special.bos,
            eos: self.special.eos,
            eot,
            unknown: self.special.unknown,
            padding: self.special.padding,
            end_of_generation,
            add_bos: self.add_bos.unwrap_or(bos_default),
            add_eos: self.add_eos.unwrap_or(false),
            add_space_prefix: self.add_space_prefix.unwrap_or(spm),
            chat_template: self.chat_template.map(str::to_string),
        })
    }

    /// The text of a token.
    pub fn token_text(&self, id: u32) -> Option<&'a str> {
        self.tokens.strings()?.nth(id as usize)
    }

    /// A summary for `inspect`: counts and special tokens, without walking the vocabulary.
    pub fn summary(&self) -> TokenizerSummary {
        let special = |id: Option<u32>| {
            id.map(|id| SpecialToken {
                id,
                text: self.token_text(id).unwrap_or_default().to_string(),
            })
        };
        TokenizerSummary {
            model: self.model.to_string(),
            pre: self.pre.map(str::to_string),
            tokens: self.tokens.len(),
            merges: self.merges.map(|m| m.len()),
            has_scores: self.scores.is_some(),
            has_token_types: self.token_types.is_some(),
            bos: special(self.special.bos),
            eos: special(self.special.eos),
            eot: special(self.special.eot),
            padding: special(self.special.padding),
            unknown: special(self.special.unknown),
            add_bos: self.add_bos,
            add_eos: self.add_eos,
            chat_template_chars: self.chat_template.map(|t| t.chars().count()),
        }
    }
}

fn int_of(v: MetaValue<'_>) -> i32 {
    v.as_i64().and_then(|i| i32::try_from(i).ok()).unwrap_or(1)
}

fn typed_array<'a>(
    file: &'a GgufFile,
    key: &str,
    elem: ValueType,
) -> Result<Option<MetaArray<'a>>, ModelError> {
    match file.get_array(key)? {
        Some(a) if a.elem_type() != elem && !a.is_empty() => Err(ModelError::KeyType {
            key: key.into(),
            expected: match elem {
                ValueType::Str => "an array of strings",
                ValueType::F32 => "an array of f32",
                _ => "an array of i32",
            },
            found: format!("arr[{},{}]", a.elem_type(), a.len()),
        }),
        a => Ok(a),
    }
}

/// What `inspect` shows of a tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenizerSummary {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: u64,
    pub merges: Option<u64>,
    pub has_scores: bool,
    pub has_token_types: bool,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub eot: Option<SpecialToken>,
    pub padding: Option<SpecialToken>,
    pub unknown: Option<SpecialToken>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub chat_template_chars: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}
