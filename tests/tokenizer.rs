//! Tokenization against llama.cpp's and bitnet.cpp's own token ids.

use bitnetc::gguf::{GgufFile, TokenizerMeta};
use bitnetc::runtime::tokenizer::{TextStream, Tokenizer};
use bitnetc_tests::{fixture, shared_fixture};
use std::path::Path;

fn tokenizer(model: &Path) -> Tokenizer {
    let f = GgufFile::open(model).unwrap();
    let spec = TokenizerMeta::from_gguf(&f)
        .unwrap()
        .unwrap()
        .to_spec()
        .unwrap();
    Tokenizer::new(spec, None).unwrap()
}

/// Every line of a `{"text", "ids"}` JSONL file tokenizes to its ids (special tokens parsed,
/// BOS as the model asks), and the ids detokenize back to the text.
fn check_jsonl(model: &Path, jsonl: &Path) {
    let tok = tokenizer(model);
    let mut failures = Vec::new();
    let lines = std::fs::read_to_string(jsonl).unwrap();
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["text"].as_str().unwrap();
        let expected: Vec<u32> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true, true);
        if ids != expected {
            failures.push(format!("{text:?}\n   ours {ids:?}\n   ref  {expected:?}"));
        }
        let without_bos: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|&i| Some(i) != tok.spec().bos || !tok.spec().add_bos)
            .collect();
        assert_eq!(
            tok.decode(&without_bos, true),
            text,
            "{text:?} does not round-trip"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} strings differ:\n{}",
        failures.len(),
        lines.lines().count(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    let (Some(model), Some(jsonl)) = (
        shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        shared_fixture("smollm2/tokenize.jsonl"),
    ) else {
        return;
    };
    check_jsonl(&model, &jsonl);
}

#[test]
fn bitnet_cpp_default_pre_tokenizer_with_bos() {
    check_jsonl(
        &fixture("tiny/bitnetcpp-tiny-i2_s.gguf"),
        &fixture("tiny/ref/tokenize-bitnetcpp.jsonl"),
    );
}

#[test]
fn llama_cpp_gpt2_pre_tokenizer() {
    check_jsonl(
        &fixture("tiny/mainline-tiny-tq2_0.gguf"),
        &fixture("tiny/ref/tokenize-mainline.jsonl"),
    );
}

#[test]
fn streaming_holds_back_split_characters() {
    let mut s = TextStream::default();
    let euro = "€".as_bytes();
    assert_eq!(s.push(&euro[..1]), "");
    assert_eq!(s.push(&euro[1..]), "€");
    assert_eq!(s.push(b"ab\xe2"), "ab");
    assert_eq!(s.finish(), "\u{fffd}");
}
