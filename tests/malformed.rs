//! Malformed GGUF input: the committed corpus gives one specific error per file, and mutated
//! real files never make the parser, the config reader or `describe` panic.

use bitnetc::gguf::arch::{Architecture, ModelConfig};
use bitnetc::gguf::describe::describe;
use bitnetc::gguf::synth::SynthSpec;
use bitnetc::gguf::{GgufError, GgufFile};
use bitnetc_tests::fixture;
use std::collections::BTreeSet;

#[test]
fn corpus_files_give_their_own_errors() {
    let dir = fixture("malformed");
    let expected = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut seen = 0;
    let mut messages = BTreeSet::new();
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, code) = line.split_once('\t').unwrap();
        let path = dir.join(name);
        let err = GgufFile::open(&path).expect_err(name);
        assert_eq!(err.parse_code(), Some(code), "{name}: {err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&path.display().to_string()),
            "{name}: error must name the file: {msg}"
        );
        messages.insert(msg.split_once(": ").unwrap().1.to_string());
        seen += 1;
    }
    assert!(
        seen >= 20,
        "the corpus must hold at least 20 files, found {seen}"
    );
    assert_eq!(messages.len(), seen, "every file must give its own message");
    let listed = expected.lines().filter(|l| !l.starts_with('#')).count();
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "gguf")
        })
        .count();
    assert_eq!(
        listed, on_disk,
        "every corpus file is listed in expected.tsv"
    );
}

#[test]
fn error_messages_say_what_was_expected() {
    let dir = fixture("malformed");
    let msg = |name: &str| GgufFile::open(dir.join(name)).unwrap_err().to_string();
    assert!(msg("bad-magic.gguf").contains("expected \"GGUF\""));
    assert!(msg("version-1.gguf").contains("expected 2 or 3"));
    assert!(msg("big-endian.gguf").contains("big-endian"));
    // Big-endian files are told apart by their version (GGUF magic) or by their magic itself.
    let tail = "the file is big-endian (version reads as 3 when byte-swapped); bitnetc reads \
                little-endian GGUF only: re-convert the model without --bigendian";
    assert!(
        msg("big-endian.gguf").ends_with(&format!(": at byte 4: {tail}")),
        "{}",
        msg("big-endian.gguf")
    );
    assert!(
        msg("big-endian-magic.gguf").ends_with(&format!(": at byte 0: {tail}")),
        "{}",
        msg("big-endian-magic.gguf")
    );
    assert!(
        msg("size-does-not-match-type.gguf").contains(
            "tensor 'a': type F16 with dims [8] takes 16 bytes, but the file gives it 64"
        )
    );
    assert!(msg("i8s-stored.gguf").contains("never stored in a model file"));
    assert!(msg("name-too-long.gguf").contains("at most 63"));
    assert!(msg("kv-count-too-large.gguf").contains("metadata count is 1099511627776"));
}

#[test]
fn missing_file_names_the_path() {
    let err = GgufFile::open("/nonexistent/model.gguf").unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(err.to_string().starts_with("/nonexistent/model.gguf: "));
}

/// A small deterministic generator for mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Applies one random mutation: a flipped byte, an overwritten 8-byte field with an extreme
/// value, a truncation, or a duplicated range.
fn mutate(rng: &mut Rng, base: &[u8], header_len: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    // Most mutations hit the header, where the structure lives.
    let pos = |rng: &mut Rng, b: &[u8]| {
        if rng.below(4) > 0 {
            rng.below(header_len.min(b.len()))
        } else {
            rng.below(b.len())
        }
    };
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            break;
        }
        match rng.below(5) {
            0 => {
                let i = pos(rng, &b);
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = pos(rng, &b);
                let v = [0u64, 1, 0xff, 1 << 31, u32::MAX as u64, 1 << 62, u64::MAX][rng.below(7)];
                let end = (i + 8).min(b.len());
                b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            }
            2 => {
                let cut = pos(rng, &b);
                b.truncate(cut);
            }
            3 => {
                let i = pos(rng, &b);
                b[i] = rng.next() as u8;
            }
            _ => {
                let i = pos(rng, &b);
                let len = rng.below(16).min(b.len() - i);
                let chunk = b[i..i + len].to_vec();
                b.splice(i..i, chunk);
            }
        }
    }
    b
}

#[test]
fn mutated_files_never_panic() {
    let mut bases: Vec<(Vec<u8>, usize)> = Vec::new();
    for arch in Architecture::ALL {
        let bytes = SynthSpec::tiny(arch).to_bytes().unwrap();
        let f = GgufFile::from_bytes("synthetic.gguf", bytes.clone()).unwrap();
        bases.push((bytes, f.layout().data_start as usize));
    }
    let i2s = std::fs::read(fixture("tiny/bitnetcpp-tiny-i2_s.gguf")).unwrap();
    let f = GgufFile::from_bytes("i2s.gguf", i2s.clone()).unwrap();
    let data_start = f.layout().data_start as usize;
    // Keep the fixture small: the header plus the first tensors.
    let first = &f.tensors()[..3];
    let end = data_start + first.iter().map(|t| t.offset + t.nbytes).max().unwrap() as usize;
    bases.push((i2s[..end].to_vec(), data_start));

    let mut rng = Rng(0x9e3779b97f4a7c15);
    let (mut parsed, mut rejected) = (0, 0);
    let iterations = 3000;
    for i in 0..iterations {
        let (base, header_len) = &bases[i % bases.len()];
        let bytes = mutate(&mut rng, base, *header_len);
        let outcome =
            std::panic::catch_unwind(|| match GgufFile::from_bytes("mutant.gguf", bytes) {
                Ok(f) => {
                    let _ = ModelConfig::from_gguf(&f);
                    let d = describe(&f, true);
                    let _ = serde_json::to_string(&d).unwrap();
                    for t in f.tensors().iter().take(4) {
                        let _ = f.decode(t);
                    }
                    true
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    false
                }
            });
        match outcome {
            Ok(true) => parsed += 1,
            Ok(false) => rejected += 1,
            Err(_) => panic!("mutation {i} made the frontend panic"),
        }
    }
    eprintln!("{iterations} mutants: {parsed} parsed, {rejected} rejected with an error");
    assert!(parsed > 0 && rejected > 0);
}
