//! Compiled plans (`.bplan`): the same logits as the model they were compiled from, bit for
//! bit, on every fixture model; and every damaged, foreign or mismatched file refused with a
//! message naming the file and what is wrong.

use bitnetc::bplan::{self, CompileOptions};
use bitnetc::codegen::select::KernelSet;
use bitnetc::ir::encoding::Encoding;
use bitnetc::runtime::exec::ExecOptions;
use bitnetc::{Backend, LoadOptions, Model, load};
use bitnetc_tests::{TINY_MODELS, fixture, shared_fixture};
use std::path::{Path, PathBuf};

fn exec(kernels: KernelSet, lm_head: Option<Encoding>) -> ExecOptions {
    ExecOptions {
        threads: 2,
        kernels,
        lm_head,
        ..ExecOptions::default()
    }
}

fn open(path: &Path, backend: Backend) -> Result<Model, bitnetc::Error> {
    load(
        path,
        LoadOptions {
            backend,
            context: Some(48),
            ..LoadOptions::default()
        },
    )
}

fn compile_to(src: &Path, dir: &Path, opts: &CompileOptions) -> PathBuf {
    let out = dir.join(format!(
        "{}.bplan",
        src.file_stem().unwrap().to_string_lossy()
    ));
    let mut last = (0, 1);
    let report = bplan::compile(src, &out, opts, |d, t| last = (d, t)).unwrap();
    assert_eq!(last.0, last.1, "the progress reaches the total");
    assert_eq!(report.bytes, std::fs::metadata(&out).unwrap().len());
    out
}

/// Prefill then decode: every position's logits.
fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut s = m.engine.session();
    let mut out = s.eval(&tokens[..30]).unwrap();
    for &t in &tokens[30..] {
        out.extend(s.eval(&[t]).unwrap());
    }
    out
}

fn ids(vocab: usize) -> Vec<u32> {
    (0..40u64)
        .map(|i| ((i * 7919 + 13) % vocab as u64) as u32)
        .collect()
}

fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: logit {i}: plan {} model {}", a[i], b[i]);
    }
}

#[test]
fn every_fixture_runs_the_same_through_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let mut models: Vec<PathBuf> = TINY_MODELS.iter().map(|m| fixture(m)).collect();
    models.extend(shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    for src in &models {
        for (kernels, head) in [
            (KernelSet::Best, None),
            (KernelSet::Lut, None),
            (KernelSet::Best, Some(Encoding::Q8_0)),
        ] {
            let opts = CompileOptions {
                exec: exec(kernels, head),
                ..CompileOptions::default()
            };
            let plan = compile_to(src, dir.path(), &opts);
            let what = format!("{} {kernels:?} {head:?}", src.display());
            let direct = open(src, Backend::Compiled(exec(kernels, head))).unwrap();
            let planned = open(&plan, Backend::Compiled(exec(kernels, None))).unwrap();
            let (vocab, tokens) = (direct.engine.vocab_size(), ids(direct.engine.vocab_size()));
            assert_eq!(planned.engine.vocab_size(), vocab);
            assert_same(&logits(&planned, &tokens), &logits(&direct, &tokens), &what);
            // The kernels are the recorded ones, not chosen again.
            let (_, manifest) = bplan::read_manifest(&plan).unwrap();
            let bound = planned.engine.executor().unwrap().ternary_bindings();
            assert_eq!(bound, manifest.kernels, "{what}");
            if kernels == KernelSet::Lut && !bound.is_empty() {
                assert!(bound.iter().all(|b| b.gemv == "lut"), "{what}");
                // Stored repacked: loading repacks nothing.
                assert!(!manifest.packed.is_empty(), "{what}");
                assert!(
                    manifest.packed.iter().all(|p| p.layout == "lut16"),
                    "{what}"
                );
                let exec = planned.engine.executor().unwrap();
                assert_eq!(exec.owned_weight_bytes(), 0, "{what}");
                assert!(direct.engine.executor().unwrap().owned_weight_bytes() > 0);
            }
            // The tokenizer and config come along.
            assert_eq!(planned.config, direct.config, "{what}");
            assert_eq!(
                planned.tokenizer.is_some(),
                direct.tokenizer.is_some(),
                "{what}"
            );
        }
    }
    // The interpreter runs a plan too (with the re-encoded head it was compiled with).
    let src = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let plan = compile_to(&src, dir.path(), &CompileOptions::default());
    let tokens = ids(2048);
    assert_same(
        &logits(&open(&plan, Backend::Interpreter).unwrap(), &tokens),
        &logits(&open(&src, Backend::Interpreter).unwrap(), &tokens),
        "interpreter",
    );
}

/// Rewrites a plan's manifest (and its checksum in the header) through `edit`.
fn edit_manifest(plan: &Path, out: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut bytes = std::fs::read(plan).unwrap();
    let off = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let mut m: serde_json::Value = serde_json::from_slice(&bytes[off..off + len]).unwrap();
    edit(&mut m);
    let json = serde_json::to_vec(&m).unwrap();
    // The manifest is the file's last part.
    assert_eq!(off + len, bytes.len());
    bytes.truncate(off);
    bytes.extend_from_slice(&json);
    bytes[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
    bytes[32..40].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
    std::fs::write(out, bytes).unwrap();
}

fn error_of(path: &Path, backend: Backend) -> String {
    match open(path, backend) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damaged_foreign_and_mismatched_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let plan = compile_to(&src, dir.path(), &CompileOptions::default());
    let good = std::fs::read(&plan).unwrap();
    let best = || Backend::Compiled(exec(KernelSet::Best, None));
    let bad = dir.path().join("bad.bplan");
    let write = |b: &[u8]| std::fs::write(&bad, b).unwrap();
    let field = |i: usize| u64::from_le_bytes(good[i..i + 8].try_into().unwrap()) as usize;
    let (manifest_off, image_off, image_len) = (field(16), field(40), field(48));

    // Truncated anywhere: in the header, in the manifest, in the weights.
    for cut in [
        10,
        100,
        200,
        image_off + 50,
        manifest_off + 5,
        good.len() - 1,
    ] {
        write(&good[..cut]);
        let e = error_of(&bad, best());
        assert!(e.contains("bad.bplan"), "cut {cut}: {e}");
        assert!(
            e.contains("truncated") || e.contains("outside the file"),
            "cut {cut}: {e}"
        );
    }
    // One flipped byte in the manifest, in the weights.
    for (at, what) in [
        (manifest_off + 10, "manifest"),
        (image_off + image_len - 100, "weights image"),
    ] {
        let mut b = good.clone();
        b[at] ^= 0x40;
        write(&b);
        let e = error_of(&bad, best());
        assert!(e.contains(&format!("the {what}'s checksum")), "{e}");
    }
    // Another format version, another bitnetc.
    let mut b = good.clone();
    b[8] = 9;
    write(&b);
    let e = error_of(&bad, best());
    assert!(
        e.contains("plan format version 9") && e.contains("bitnetc compile"),
        "{e}"
    );
    let mut b = good.clone();
    b[64..70].copy_from_slice(b"9.9.9\0");
    write(&b);
    let e = error_of(&bad, best());
    assert!(e.contains("compiled by bitnetc 9.9.9"), "{e}");
    // Not a plan: a GGUF is read as one; random bytes with the magic are refused.
    let mut b = good[..8].to_vec();
    b.extend(std::iter::repeat_n(0xA5u8, 300));
    write(&b);
    let e = error_of(&bad, best());
    assert!(e.contains("bad.bplan"), "{e}");
    // A kernel this CPU cannot run (or that does not exist), a manifest that is not one.
    edit_manifest(&plan, &bad, |m| {
        m["kernels"][0]["gemv"] = "avx1024".into();
    });
    let e = error_of(&bad, best());
    assert!(e.contains("unknown ternary kernel `avx1024`"), "{e}");
    edit_manifest(&plan, &bad, |m| {
        m["plan"] = serde_json::Value::Null;
    });
    let e = error_of(&bad, best());
    assert!(e.contains("the manifest is not valid"), "{e}");
    edit_manifest(&plan, &bad, |m| {
        m["target"] = "gpu".into();
    });
    let e = error_of(&bad, best());
    assert!(e.contains("compiled for target `gpu`"), "{e}");
    // Options that a plan fixes at compile time.
    let e = error_of(
        &plan,
        Backend::Compiled(exec(KernelSet::Best, Some(Encoding::Q8_0))),
    );
    assert!(e.contains("--lm-head is chosen at compile time"), "{e}");
    let on_gpu = Backend::Cuda {
        ordinal: 0,
        options: bitnetc::runtime::cuda::GpuOptions {
            lm_head: Some(Encoding::Q8_0),
            ..Default::default()
        },
    };
    let e = error_of(&plan, on_gpu);
    assert!(e.contains("--lm-head is chosen at compile time"), "{e}");
    let e = match load(
        &plan,
        LoadOptions {
            lower: bitnetc::gguf::lower::LowerOptions {
                kv_cache: bitnetc::ir::DType::F32,
            },
            ..LoadOptions::default()
        },
    ) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("compiled with a f16 KV cache"), "{e}");
    // A plan is not compiled again.
    let e = bplan::compile(
        &plan,
        &dir.path().join("again.bplan"),
        &CompileOptions::default(),
        |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("already a compiled plan"), "{e}");
    // Damaged weights in a kernel's layout.
    let lut = CompileOptions {
        exec: exec(KernelSet::Lut, None),
        ..CompileOptions::default()
    };
    std::fs::create_dir_all(dir.path().join("lut")).unwrap();
    let lut_plan = compile_to(&src, &dir.path().join("lut"), &lut);
    let (_, m) = bplan::read_manifest(&lut_plan).unwrap();
    let mut b = std::fs::read(&lut_plan).unwrap();
    b[m.packed[0].offset as usize + 5] ^= 1;
    write(&b);
    let e = error_of(&bad, best());
    assert!(
        e.contains(&format!(
            "the checksum of the lut16 weights of {}",
            m.packed[0].name
        )),
        "{e}"
    );
    // The good file still loads after all that.
    open(&plan, best()).unwrap();
}

/// The committed corpus of damaged plan headers and manifests (`tests/fixtures/malformed-bplan`,
/// written by `regenerate_malformed_corpus`): each gives its own error, naming the file.
#[test]
fn corpus_files_give_their_own_errors() {
    let dir = fixture("malformed-bplan");
    let expected = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut seen = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, message) = line.split_once('\t').unwrap();
        let path = dir.join(name);
        assert!(bplan::is_plan(&path), "{name} starts with the magic");
        let e = error_of(&path, Backend::Compiled(exec(KernelSet::Best, None)));
        assert!(e.starts_with(&path.display().to_string()), "{name}: {e}");
        assert!(e.contains(message), "{name}: {e}");
        let r = bplan::read_manifest(&path);
        assert!(r.is_err(), "{name}");
        seen += 1;
    }
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "bplan")
        })
        .count();
    assert_eq!(seen, on_disk, "every corpus file is listed in expected.tsv");
    assert!(seen >= 10, "{seen}");
}

/// Writes the corpus above: `cargo test -p bitnetc-tests --test bplan -- --ignored`.
#[test]
#[ignore = "writes tests/fixtures/malformed-bplan"]
fn regenerate_malformed_corpus() {
    let dir = bitnetc_tests::repo_root().join("tests/fixtures/malformed-bplan");
    std::fs::create_dir_all(&dir).unwrap();
    let header = |version: u32, hsize: u32, manifest: (u64, u64, &[u8]), image: (u64, u64)| {
        let mut b = vec![0u8; 128];
        b[0..8].copy_from_slice(bplan::MAGIC);
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&hsize.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(manifest.2);
        for (i, v) in [manifest.0, manifest.1, sum, image.0, image.1, 0]
            .iter()
            .enumerate()
        {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b[64..69].copy_from_slice(
            env!("CARGO_PKG_VERSION")
                .as_bytes()
                .get(..5)
                .unwrap_or(b"0.1.0"),
        );
        b.extend_from_slice(manifest.2);
        b
    };
    let json = |s: &[u8]| (128u64, s.len() as u64, s.to_vec());
    let file = |m: (u64, u64, Vec<u8>), image: (u64, u64), version: u32, hsize: u32| {
        let mut b = header(version, hsize, (m.0, m.1, &m.2), image);
        // Room for the image the header points at, when it is inside the file.
        b.resize(b.len().max(4096 + 64), 0);
        b
    };
    let ok_json = json(b"{}");
    let mut files: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "magic-only.bplan",
            bplan::MAGIC.to_vec(),
            "a plan header alone is 128",
        ),
        (
            "version-2.bplan",
            file(ok_json.clone(), (4096, 64), 2, 128),
            "plan format version 2",
        ),
        (
            "header-size.bplan",
            file(ok_json.clone(), (4096, 64), 1, 64),
            "header size 64",
        ),
        (
            "manifest-past-end.bplan",
            file((128, 1 << 40, b"{}".to_vec()), (4096, 64), 1, 128),
            "the manifest at bytes 128..+1099511627776 is outside the file",
        ),
        (
            "manifest-in-header.bplan",
            file((8, 2, b"{}".to_vec()), (4096, 64), 1, 128),
            "the manifest at bytes 8..+2 is outside the file",
        ),
        (
            "image-past-end.bplan",
            file(ok_json.clone(), (4096, 1 << 20), 1, 128),
            "the weights image at bytes 4096..+1048576 is outside the file",
        ),
        (
            "image-offset-overflow.bplan",
            file(ok_json.clone(), (u64::MAX - 10, 64), 1, 128),
            "the weights image at bytes 18446744073709551605..+64 is outside the file",
        ),
        (
            "image-misaligned.bplan",
            file(ok_json.clone(), (1000, 64), 1, 128),
            "the weights image offset 1000 is not a multiple of 4096",
        ),
        (
            "manifest-not-json.bplan",
            file(json(b"{\"bitnet"), (4096, 64), 1, 128),
            "the manifest is not valid: EOF while parsing",
        ),
        (
            "manifest-wrong-shape.bplan",
            file(json(b"{\"target\": \"cpu\"}"), (4096, 64), 1, 128),
            "the manifest is not valid: missing field",
        ),
        (
            "manifest-wrong-type.bplan",
            file(json(b"{\"bitnetc_version\": 7}"), (4096, 64), 1, 128),
            "the manifest is not valid: invalid type: integer `7`",
        ),
    ];
    let mut bad_sum = file(ok_json.clone(), (4096, 64), 1, 128);
    bad_sum[128] = b'[';
    files.push((
        "manifest-checksum.bplan",
        bad_sum,
        "the manifest's checksum does not match",
    ));
    let mut bad_utf8 = file(ok_json, (4096, 64), 1, 128);
    bad_utf8[64] = 0xff;
    files.push((
        "version-not-utf8.bplan",
        bad_utf8,
        "the bitnetc version field is not UTF-8",
    ));
    let mut tsv = String::from(
        "# file\tpart of the error message; written by `cargo test -p bitnetc-tests --test bplan -- --ignored`\n",
    );
    for (name, bytes, message) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
        tsv.push_str(&format!("{name}\t{message}\n"));
    }
    std::fs::write(dir.join("expected.tsv"), tsv).unwrap();
}
