//! Tokenization against llama.cpp's and bitnet.cpp's own token ids.

use bitnetc::gguf::{GgufFile, TokenizerMeta};
use bitnetc::ir::vocab::TokenizerKind;
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

/// The strings of a `.inp` file, split at `\n__ggml_vocab_test__\n` as llama.cpp's
/// `test-tokenizer-0` splits them.
fn vocab_test_inputs(raw: &str) -> Vec<&str> {
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].find(SEP) {
            Some(next) => {
                out.push(&raw[pos..pos + next]);
                pos += next + SEP.len();
            }
            None => {
                out.push(&raw[pos..]);
                break;
            }
        }
    }
    out
}

/// llama.cpp's own tokenizer tests (`tests/test-tokenizer-0.cpp` over `models/ggml-vocab-*`):
/// each string of `NAME.gguf.inp`, tokenized without BOS/EOS and without parsing special-token
/// text, gives exactly the ids on the matching line of `NAME.gguf.out`. The ids also decode back
/// to the string: byte-level BPE is lossless, and SentencePiece gives it back after the space
/// prefix is dropped from the first piece (llama.cpp's `llama_detokenize`).
#[test]
fn llama_cpp_vocab_tests() {
    const VOCABS: [&str; 7] = [
        "llama-spm",
        "phi-3",
        "llama-bpe",
        "gpt-2",
        "falcon",
        "qwen2",
        "starcoder",
    ];
    let mut failures = Vec::new();
    let mut total = 0;
    for name in VOCABS {
        let model = fixture(&format!("vocab/ggml-vocab-{name}.gguf"));
        let tok = tokenizer(&model);
        let raw = std::fs::read_to_string(model.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(model.with_extension("gguf.out")).unwrap();
        let inputs = vocab_test_inputs(&raw);
        let expected: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        assert_eq!(
            inputs.len(),
            expected.len(),
            "{name}: .inp and .out hold different numbers of tests"
        );
        assert!(inputs.len() >= 40, "{name}: only {} tests", inputs.len());
        let spm = matches!(tok.spec().kind, TokenizerKind::Spm);
        for (text, want) in inputs.iter().zip(&expected) {
            total += 1;
            let ids = tok.encode(text, false, false);
            if &ids != want {
                failures.push(format!(
                    "{name}: {text:?}\n   ours {ids:?}\n   ref  {want:?}"
                ));
                continue;
            }
            let decoded = tok.decode(&ids, false);
            let decoded = match decoded.strip_prefix(' ') {
                Some(rest) if spm && tok.spec().add_space_prefix => rest,
                _ => decoded.as_str(),
            };
            if decoded != *text {
                failures.push(format!(
                    "{name}: {text:?} decodes to {decoded:?} from {ids:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Without `parse_special`, llama.cpp still splits out user-defined tokens; control-token text
/// stays text.
#[test]
fn user_defined_tokens_split_without_parse_special() {
    let qwen2 = tokenizer(&fixture("vocab/ggml-vocab-qwen2.gguf"));
    // "[PAD151646]" is user-defined; "a" is 64, "b" is 65.
    assert_eq!(
        qwen2.encode("a[PAD151646]b", false, false),
        [64, 151646, 65]
    );
    assert_eq!(qwen2.encode("a[PAD151646]b", false, true), [64, 151646, 65]);
    // "<|im_end|>" is a control token.
    assert_eq!(qwen2.encode("<|im_end|>", false, true), [151645]);
    let as_text = qwen2.encode("<|im_end|>", false, false);
    assert!(
        as_text.len() > 1 && !as_text.contains(&151645),
        "{as_text:?}"
    );
    assert_eq!(qwen2.decode(&as_text, false), "<|im_end|>");

    // In phi-3 "</s>" (2) is user-defined: "Hello" becomes "▁Hello" (15043) before it.
    let phi3 = tokenizer(&fixture("vocab/ggml-vocab-phi-3.gguf"));
    assert_eq!(phi3.encode("Hello</s>", false, false), [15043, 2]);
    // "<|end|>" (32007) is a control token: text unless parsed.
    assert_eq!(phi3.encode("Hello<|end|>", false, true), [15043, 32007]);
    assert!(!phi3.encode("Hello<|end|>", false, false).contains(&32007));
}

/// Streaming real tokens: in both a byte-level BPE vocabulary (gpt-2) and a SentencePiece one
/// with byte fallback (llama-spm), "🦙" is several tokens that each hold part of its four
/// bytes; the stream prints nothing until the character is whole, then exactly the text.
#[test]
fn streaming_real_tokens_waits_for_whole_characters() {
    for name in ["gpt-2", "llama-spm"] {
        let tok = tokenizer(&fixture(&format!("vocab/ggml-vocab-{name}.gguf")));
        let text = "Hi 🦙 é";
        let ids = tok.encode(text, false, false);
        let mut stream = TextStream::default();
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.push(stream.push(&tok.token_bytes(id, false)));
        }
        pieces.push(stream.finish());
        let llama = pieces.iter().position(|p| p.contains('🦙')).unwrap();
        assert!(
            pieces[llama - 1].is_empty(),
            "{name}: a partial character was printed: {pieces:?} for {ids:?}"
        );
        assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
        let joined: String = pieces.concat();
        assert_eq!(joined.trim_start(), text, "{name}: {pieces:?}");
    }
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
