//! A tokenizer's description as plain data: vocabulary, merges or scores, special tokens and
//! chat template. The frontend fills it from a model file; plans carry it; the runtime builds a
//! tokenizer from it.

use serde::{Deserialize, Serialize};

/// The tokenization algorithm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerKind {
    /// Byte-level BPE (GGUF `gpt2`) with the named pre-tokenizer (`tokenizer.ggml.pre`;
    /// `default` when the file names none, as bitnet.cpp does).
    Bpe { pre: String },
    /// SentencePiece (GGUF `llama`): scores, `▁` for spaces, byte fallback.
    Spm,
}

/// What a token is (GGUF `tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// From the GGUF integer (1–6); anything else is treated as normal, as llama.cpp does.
    pub fn from_gguf(v: i32) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// Everything needed to tokenize and detokenize for a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    pub kind: TokenizerKind,
    pub tokens: Vec<String>,
    /// One per token.
    pub types: Vec<TokenType>,
    /// One per token for SentencePiece; may be empty for BPE.
    pub scores: Vec<f32>,
    /// BPE merges, `"left right"`, highest priority first.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub unknown: Option<u32>,
    pub padding: Option<u32>,
    /// Tokens that end a generation (EOS, EOT and the end markers llama.cpp recognizes by text).
    pub end_of_generation: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// SentencePiece: prepend a space to the text.
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

/// GPT-2's byte-to-unicode table: the printable character that stands for each byte in a
/// byte-level BPE vocabulary.
pub fn gpt2_byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("valid code point")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_table() {
        assert_eq!(gpt2_byte_char(b'a'), 'a');
        assert_eq!(gpt2_byte_char(b' '), 'Ġ');
        assert_eq!(gpt2_byte_char(b'\n'), 'Ċ');
        assert_eq!(gpt2_byte_char(0), 'Ā');
        let all: std::collections::HashSet<char> = (0..=255u8).map(gpt2_byte_char).collect();
        assert_eq!(all.len(), 256);
    }
}
