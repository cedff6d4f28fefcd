//! Tokenizers built from a [`TokenizerSpec`], id-exact with llama.cpp and bitnet.cpp:
//! byte-level BPE with the pre-tokenizer the model names, and SentencePiece with byte fallback.
//! Special and control tokens written in the text become their ids.

use bitnetc_ir::vocab::{TokenType, TokenizerKind, TokenizerSpec, gpt2_byte_char as byte_to_char};
use fancy_regex::Regex;
use std::collections::HashMap;

/// What went wrong building or using a tokenizer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "unknown pre-tokenizer '{0}': known are {known}; choose one with --pre-tokenizer",
        known = PRE_TOKENIZERS.join(", ")
    )]
    UnknownPreTokenizer(String),
    #[error("the vocabulary is inconsistent: {0}")]
    BadVocab(String),
}

/// Names of the pre-tokenizers, as `tokenizer.ggml.pre` spells them.
pub const PRE_TOKENIZERS: [&str; 21] = [
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "gpt-2",
    "phi-2",
    "roberta-bpe",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "falcon",
    "falcon3",
    "qwen2",
];

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Unicode version of llama.cpp's code point tables (`unicode-data.cpp`).
const LLAMA_CPP_UNICODE: &str = r"\p{age:15.1}";

/// A pattern with its `\p{L}`, `\p{N}` and `\p{P}` classes limited to the code points that
/// llama.cpp's Unicode 15.1 tables assign: there, characters added later belong to no category,
/// so they are neither letters nor digits nor punctuation.
fn with_llama_cpp_unicode(pattern: &str) -> String {
    let mut p = pattern.to_string();
    for class in [r"\p{L}", r"\p{N}", r"\p{P}"] {
        p = p.replace(class, &format!("[{class}&&{LLAMA_CPP_UNICODE}]"));
    }
    p
}

/// The regexes a pre-tokenizer applies in sequence, and whether a whole word found in the
/// vocabulary skips the merges (llama.cpp's `ignore_merges`).
fn pre_tokenizer(name: &str) -> Result<(Vec<&'static str>, bool), TokenizerError> {
    Ok(match name {
        // llama.cpp's (and bitnet.cpp's) DEFAULT, used when a file names no pre-tokenizer.
        "default" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => (vec![LLAMA3], true),
        "gpt-2" | "phi-2" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" => {
            (vec![GPT2], false)
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "falcon" => (
            vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
            false,
        ),
        // bitnet.cpp's own Falcon3 rules.
        "falcon3" => (vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9]"], false),
        "qwen2" => (vec![QWEN2], false),
        other => return Err(TokenizerError::UnknownPreTokenizer(other.into())),
    })
}

enum Algorithm {
    Bpe {
        regexes: Vec<Regex>,
        ignore_merges: bool,
        ranks: HashMap<(String, String), usize>,
        char_to_byte: HashMap<char, u8>,
    },
    Spm {
        byte_tokens: Box<[Option<u32>; 256]>,
    },
}

/// A tokenizer.
pub struct Tokenizer {
    spec: TokenizerSpec,
    ids: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<(String, u32)>,
    algorithm: Algorithm,
}

impl Tokenizer {
    /// Builds the tokenizer; `pre_override` replaces the file's pre-tokenizer.
    pub fn new(
        spec: TokenizerSpec,
        pre_override: Option<&str>,
    ) -> Result<Tokenizer, TokenizerError> {
        if spec.types.len() != spec.tokens.len() {
            return Err(TokenizerError::BadVocab(format!(
                "{} types for {} tokens",
                spec.types.len(),
                spec.tokens.len()
            )));
        }
        let ids: HashMap<String, u32> = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut specials: Vec<(String, u32)> = spec
            .tokens
            .iter()
            .zip(&spec.types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty()
                    && matches!(
                        ty,
                        TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                    )
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let algorithm = match &spec.kind {
            TokenizerKind::Bpe { pre } => {
                let (patterns, ignore_merges) = pre_tokenizer(pre_override.unwrap_or(pre))?;
                let regexes = patterns
                    .iter()
                    .map(|p| {
                        Regex::new(&with_llama_cpp_unicode(p)).map_err(|e| {
                            TokenizerError::BadVocab(format!("pre-tokenizer regex: {e}"))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                let mut ranks = HashMap::with_capacity(spec.merges.len());
                for (rank, m) in spec.merges.iter().enumerate() {
                    // Split at the first space after position 0, as llama.cpp does.
                    let skip = m.chars().next().map_or(0, char::len_utf8);
                    let Some(pos) = m[skip..].find(' ').map(|p| p + skip) else {
                        return Err(TokenizerError::BadVocab(format!(
                            "merge #{rank} '{m}' has no space"
                        )));
                    };
                    ranks
                        .entry((m[..pos].to_string(), m[pos + 1..].to_string()))
                        .or_insert(rank);
                }
                let char_to_byte = (0..=255u8).map(|b| (byte_to_char(b), b)).collect();
                Algorithm::Bpe {
                    regexes,
                    ignore_merges,
                    ranks,
                    char_to_byte,
                }
            }
            TokenizerKind::Spm => {
                let mut byte_tokens = Box::new([None; 256]);
                for (b, slot) in byte_tokens.iter_mut().enumerate() {
                    *slot = ids.get(&format!("<0x{b:02X}>")).copied();
                }
                Algorithm::Spm { byte_tokens }
            }
        };
        Ok(Tokenizer {
            spec,
            ids,
            specials,
            algorithm,
        })
    }

    pub fn spec(&self) -> &TokenizerSpec {
        &self.spec
    }

    pub fn vocab_size(&self) -> usize {
        self.spec.tokens.len()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Whether `id` ends a generation.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.spec.end_of_generation.contains(&id)
    }

    /// Tokenizes `text`. With `add_special`, BOS (and EOS) are added as the model asks; with
    /// `parse_special`, special-token text such as `<|im_end|>` becomes its id.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.spec.add_bos {
            out.extend(self.spec.bos);
        }
        let fragments = self.split_specials(text, parse_special);
        let mut after_special = true;
        for f in fragments {
            match f {
                Fragment::Special(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(t) => {
                    match &self.algorithm {
                        Algorithm::Bpe { .. } => self.encode_bpe(t, &mut out),
                        Algorithm::Spm { .. } => {
                            // llama.cpp puts the space prefix before the first text and before
                            // text that follows a special token.
                            let prefixed;
                            let t = if self.spec.add_space_prefix && after_special {
                                prefixed = format!(" {t}");
                                prefixed.as_str()
                            } else {
                                t
                            };
                            self.encode_spm(t, &mut out);
                        }
                    }
                    after_special = false;
                }
            }
        }
        if add_special && self.spec.add_eos {
            out.extend(self.spec.eos);
        }
        out
    }

    /// Splits text at occurrences of special tokens, longest tokens first (llama.cpp's
    /// `tokenizer_st_partition`). Without `parse_special` only user-defined tokens split the
    /// text; control and unknown tokens stay text. Empty text has no fragments.
    fn split_specials<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = if text.is_empty() {
            Vec::new()
        } else {
            vec![Fragment::Text(text)]
        };
        for (special, id) in &self.specials {
            if !parse_special && self.spec.types[*id as usize] != TokenType::UserDefined {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len());
            for f in fragments {
                let Fragment::Text(mut t) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(pos) = t.find(special.as_str()) {
                    if pos > 0 {
                        next.push(Fragment::Text(&t[..pos]));
                    }
                    next.push(Fragment::Special(*id));
                    t = &t[pos + special.len()..];
                }
                if !t.is_empty() {
                    next.push(Fragment::Text(t));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Pre-tokenizes with each regex in turn: matches and the text between them both become
    /// fragments (llama.cpp's `unicode_regex_split`).
    fn pre_tokenize<'t>(regexes: &[Regex], text: &'t str) -> Vec<&'t str> {
        let mut words = vec![text];
        for re in regexes {
            let mut next = Vec::with_capacity(words.len());
            for w in words {
                let mut start = 0;
                for m in re.find_iter(w).flatten() {
                    if m.start() > start {
                        next.push(&w[start..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    start = m.end();
                }
                if start < w.len() {
                    next.push(&w[start..]);
                }
            }
            words = next;
        }
        words
    }

    fn encode_bpe(&self, text: &str, out: &mut Vec<u32>) {
        let Algorithm::Bpe {
            regexes,
            ignore_merges,
            ranks,
            ..
        } = &self.algorithm
        else {
            unreachable!()
        };
        for word in Self::pre_tokenize(regexes, text) {
            let encoded: String = word.bytes().map(byte_to_char).collect();
            if *ignore_merges && let Some(&id) = self.ids.get(&encoded) {
                out.push(id);
                continue;
            }
            let mut symbols: Vec<String> = encoded.chars().map(String::from).collect();
            loop {
                // The adjacent pair with the best (lowest) rank, leftmost on ties.
                let best = symbols
                    .windows(2)
                    .enumerate()
                    .filter_map(|(i, w)| ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                    .min();
                let Some((_, i)) = best else { break };
                let right = symbols.remove(i + 1);
                symbols[i].push_str(&right);
            }
            for s in symbols {
                match self.ids.get(&s) {
                    Some(&id) => out.push(id),
                    // Not in the vocabulary: each byte of its text that is a token by itself,
                    // the others dropped (llama.cpp's fallback). Only ASCII bytes can be.
                    None => out.extend(s.bytes().filter_map(|b| {
                        if b.is_ascii() {
                            self.ids.get(&char::from(b).to_string()).copied()
                        } else {
                            None
                        }
                    })),
                }
            }
        }
    }

    fn encode_spm(&self, text: &str, out: &mut Vec<u32>) {
        let Algorithm::Spm { byte_tokens } = &self.algorithm else {
            unreachable!()
        };
        let text = text.replace(' ', "\u{2581}");
        let mut symbols: Vec<String> = text.chars().map(String::from).collect();
        let score = |s: &str| {
            self.ids
                .get(s)
                .map(|&id| self.spec.scores.get(id as usize).copied().unwrap_or(0.0))
        };
        loop {
            // The adjacent pair whose merge is a token with the highest score, leftmost on ties.
            let mut best: Option<(f32, usize)> = None;
            for i in 0..symbols.len().saturating_sub(1) {
                let merged = format!("{}{}", symbols[i], symbols[i + 1]);
                if let Some(s) = score(&merged)
                    && best.is_none_or(|(b, _)| s > b)
                {
                    best = Some((s, i));
                }
            }
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        for s in symbols {
            match self.ids.get(&s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        match byte_tokens[b as usize] {
                            Some(id) => out.push(id),
                            None => out.extend(self.spec.unknown),
                        }
                    }
                }
            }
        }
    }

    /// The bytes a token stands for. Control tokens are empty unless `special`.
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.spec.tokens.get(id as usize) else {
            return Vec::new();
        };
        let ty = self.spec.types[id as usize];
        match ty {
            TokenType::Control | TokenType::Unknown if !special => Vec::new(),
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown => {
                text.as_bytes().to_vec()
            }
            _ => match &self.algorithm {
                Algorithm::Bpe { char_to_byte, .. } => {
                    let mut bytes = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match char_to_byte.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend(c.to_string().as_bytes()),
                        }
                    }
                    bytes
                }
                Algorithm::Spm { .. } => {
                    if ty == TokenType::Byte
                        && let Some(hex) =
                            text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
                        && let Ok(b) = u8::from_str_radix(hex, 16)
                    {
                        return vec![b];
                    }
                    text.replace('\u{2581}', " ").into_bytes()
                }
            },
        }
    }

    /// Detokenizes a whole sequence (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

/// Turns a stream of tokens into text, holding back the bytes of a character that a token
/// splits until the next token completes it.
#[derive(Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds a token's bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Bytes that can never become valid: replace them and go on.
            Err(_) => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                return text;
            }
        };
        let text = String::from_utf8(self.pending[..valid].to_vec()).expect("checked valid");
        self.pending.drain(..valid);
        text
    }

    /// Whatever is left (an incomplete character), replaced.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece vocabulary: specials, pieces with scores, and byte tokens.
    fn spm() -> Tokenizer {
        let mut tokens: Vec<String> = [
            "<unk>",
            "<s>",
            "</s>",
            "\u{2581}",
            "a",
            "b",
            "\u{2581}a",
            "ab",
            "\u{2581}ab",
            "c",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
        types.extend([TokenType::Normal; 7]);
        let mut scores = vec![0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -1.5, -3.0, -0.5, -2.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(-10.0);
        }
        let spec = TokenizerSpec {
            kind: TokenizerKind::Spm,
            tokens,
            types,
            scores,
            merges: Vec::new(),
            bos: Some(1),
            eos: Some(2),
            eot: None,
            unknown: Some(0),
            padding: None,
            end_of_generation: vec![2],
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            chat_template: None,
        };
        Tokenizer::new(spec, None).unwrap()
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let t = spm();
        // " ab" -> "▁ab": the best-scoring merges win ("▁a" + "b" -> "▁ab").
        assert_eq!(t.encode("ab", true, true), vec![1, 8]);
        // "é" is not a piece: its two UTF-8 bytes.
        let e = t.encode("é", false, false);
        assert_eq!(e, vec![3, 10 + 0xC3, 10 + 0xA9]);
        assert_eq!(t.decode(&e, false), " é");
        // Special text is parsed; text after a special token gets the space prefix too.
        assert_eq!(t.encode("ab</s>ab", false, true), vec![8, 2, 8]);
        assert_eq!(t.decode(&[8, 2, 7], false), " abab");
        assert_eq!(t.decode(&[8, 2, 7], true), " ab</s>ab");
    }

    #[test]
    fn empty_text_has_no_tokens() {
        let t = spm();
        assert_eq!(t.encode("", false, false), Vec::<u32>::new());
        assert_eq!(t.encode("", false, true), Vec::<u32>::new());
        assert_eq!(t.encode("", true, true), vec![1]);
        let b = bpe("gpt-2");
        assert_eq!(b.encode("", true, true), Vec::<u32>::new());
    }

    /// A byte-level BPE vocabulary whose merges make words that are not tokens: `a b` and
    /// `Ã ©` (the bytes of "é"); no token for the space byte `Ġ`.
    fn bpe(pre: &str) -> Tokenizer {
        let tokens: Vec<String> = ["a", "b", "Ã", "©", "x", "y", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let spec = TokenizerSpec {
            kind: TokenizerKind::Bpe { pre: pre.into() },
            types: vec![TokenType::Normal; tokens.len()],
            tokens,
            scores: Vec::new(),
            merges: vec!["a b".into(), "Ã ©".into()],
            bos: None,
            eos: None,
            eot: None,
            unknown: None,
            padding: None,
            end_of_generation: Vec::new(),
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
            chat_template: None,
        };
        Tokenizer::new(spec, None).unwrap()
    }

    #[test]
    fn bpe_words_that_are_not_tokens_fall_back_to_single_byte_tokens() {
        let t = bpe("gpt-2");
        // "ab" merges into a word that is no token: its bytes, each a token.
        assert_eq!(t.encode("ab", false, false), vec![0, 1]);
        // "é" merges into "Ã©", no token; its bytes are not ASCII, so nothing is left.
        assert_eq!(t.encode("é", false, false), Vec::<u32>::new());
        // "Ġ" is no token and no merge takes it: dropped, "a" stays.
        assert_eq!(t.encode(" a", false, false), vec![0]);
    }

    fn words<'t>(t: &Tokenizer, text: &'t str) -> Vec<&'t str> {
        let Algorithm::Bpe { regexes, .. } = &t.algorithm else {
            unreachable!()
        };
        Tokenizer::pre_tokenize(regexes, text)
    }

    #[test]
    fn pre_tokenizers_classify_code_points_as_unicode_15_1_does() {
        // U+A7DB (Unicode 16.0) is a letter now but no letter in llama.cpp's tables.
        assert_eq!(words(&bpe("gpt-2"), "x\u{a7db} 1"), ["x", "\u{a7db}", " 1"]);
        assert_eq!(
            words(&bpe("llama3"), "x\u{a7db} 1"),
            ["x", "\u{a7db}", " ", "1"]
        );
        assert_eq!(words(&bpe("gpt-2"), "x\u{e9} 1"), ["x\u{e9}", " 1"]);
        // U+16D40 (Unicode 16.0, Kirat Rai) is not a letter; U+10D40 is not a digit.
        assert_eq!(
            words(&bpe("qwen2"), "a\u{16d40}\u{10d40}1"),
            ["a", "\u{16d40}\u{10d40}", "1"]
        );
    }
}
