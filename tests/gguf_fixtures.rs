//! The GGUF frontend on files written by bitnet.cpp's and llama.cpp's own converters.

use bitnetc::gguf::arch::{Activation, Architecture, ModelConfig, RopeStyle};
use bitnetc::gguf::describe::{ConfigOutcome, describe};
use bitnetc::gguf::quantize::{QuantizeOptions, quantize};
use bitnetc::gguf::{GgufFile, TypeTable};
use bitnetc::ir::Encoding;
use bitnetc::ir::encoding::{self, ternary_codes};
use bitnetc_tests::{TINY_MODELS, fixture, shared_fixture};
use half::f16;

fn open(rel: &str) -> GgufFile {
    GgufFile::open(fixture(rel)).unwrap_or_else(|e| panic!("{e}"))
}

/// The seven ternary matrices of every block of the tiny model.
fn block_matrices(f: &GgufFile) -> Vec<String> {
    f.tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.dims.len() == 2)
        .map(|t| t.name.clone())
        .collect()
}

#[test]
fn tiny_models_have_the_expected_config() {
    for rel in TINY_MODELS {
        let f = open(rel);
        let c = ModelConfig::from_gguf(&f).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let bitnetcpp = rel.contains("bitnetcpp");
        assert_eq!(
            c.architecture,
            if bitnetcpp {
                Architecture::Bitnet25
            } else {
                Architecture::Bitnet
            },
            "{rel}"
        );
        assert_eq!(
            c.ffn_activation,
            if bitnetcpp {
                Activation::Relu2
            } else {
                Activation::Silu
            }
        );
        assert_eq!(
            (c.vocab_size, c.context_length, c.hidden, c.layers, c.ffn),
            (2048, 512, 256, 4, 768),
            "{rel}"
        );
        assert_eq!(
            (c.heads, c.kv_heads, c.head_dim, c.rope_dims),
            (8, 2, 32, 32),
            "{rel}"
        );
        assert_eq!(c.rope_style, RopeStyle::Neox);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rms_eps, 1e-5);
        assert!(c.sub_norms && c.tied_output && !c.weight_scales, "{rel}");
        assert_eq!(f.tensors().len(), 46, "{rel}");
        // 2048·256 embedding + 4 × (2·256·256 + 2·256·64 + 3·256·768 + 3·256 + 768 norms) + 256.
        assert_eq!(c.parameter_count(), 3_545_344, "{rel}");
        let table = if rel.contains("i2_s") {
            TypeTable::BitnetCpp
        } else {
            TypeTable::Upstream
        };
        assert_eq!(f.layout().type_table, table, "{rel}");
    }
}

#[test]
fn describe_reads_every_fixture() {
    for rel in TINY_MODELS {
        let f = open(rel);
        let d = describe(&f, true);
        assert!(matches!(d.config, ConfigOutcome::Valid(_)), "{rel}");
        assert_eq!(d.totals.tensors, 46);
        assert_eq!(d.totals.parameters, 3_545_344);
        let tk = d.tokenizer.clone().expect("tiny models carry a tokenizer");
        assert_eq!(
            (tk.model.as_str(), tk.tokens, tk.merges),
            ("gpt2", 2048, Some(1790)),
            "{rel}"
        );
        assert_eq!(
            tk.bos.as_ref().map(|t| (t.id, t.text.as_str())),
            Some((0, "<|begin_of_text|>"))
        );
        assert_eq!(
            tk.pre.as_deref(),
            if rel.contains("bitnetcpp") {
                None
            } else {
                Some("gpt-2")
            }
        );
        assert_eq!(d.tensors.as_ref().map(Vec::len), Some(46));
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(
            json["config"]["architecture"],
            if rel.contains("bitnetcpp") {
                "bitnet-25"
            } else {
                "bitnet"
            }
        );
    }
    let f = open("tiny/bitnetcpp-tiny-i2_s.gguf");
    let d = describe(&f, false);
    let by_type: Vec<(&str, usize, u64)> = d
        .totals
        .by_type
        .iter()
        .map(|t| (t.type_name.as_str(), t.tensors, t.bytes))
        .collect();
    // 28 I2_S matrices: 4 × (3·49184 + 2·4128 + 2·16416) bytes.
    assert_eq!(
        by_type,
        vec![
            ("F16", 1, 1_048_576),
            ("F32", 17, 25_600),
            ("I2_S", 28, 754_560)
        ]
    );
}

#[test]
fn smollm2_config() {
    let Some(path) = shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let f = GgufFile::open(path).unwrap();
    let c = ModelConfig::from_gguf(&f).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden,
            c.layers,
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.ffn
        ),
        (49152, 576, 30, 9, 3, 64, 1536)
    );
    assert_eq!(
        (c.rope_style, c.rope_theta, c.ffn_activation),
        (RopeStyle::Norm, 100000.0, Activation::Silu)
    );
    assert!(c.tied_output && !c.sub_norms);
    let count = |ty: &str| f.tensors().iter().filter(|t| t.type_name == ty).count();
    assert_eq!((count("Q4_1"), count("Q8_0"), count("F32")), (210, 1, 61));
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().nbytes,
        576 * 49152 / 32 * 34
    );
    let d = describe(&f, false);
    let tk = d.tokenizer.unwrap();
    assert_eq!(
        (tk.pre.as_deref(), tk.tokens, tk.merges),
        (Some("smollm"), 49152, Some(48900))
    );
    assert_eq!(tk.eos.map(|t| t.text), Some("<|im_end|>".to_string()));
    // Decoding a Q4_1 and a Q8_0 tensor gives finite, plausible weights.
    for name in ["blk.0.attn_q.weight", "token_embd.weight"] {
        let v = f.decode(f.tensor(name).unwrap()).unwrap();
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 100.0), "{name}");
    }
}

#[test]
fn i2s_decodes_to_the_f32_files_values() {
    let f32_file = open("tiny/bitnetcpp-tiny-f32.gguf");
    let i2s_file = open("tiny/bitnetcpp-tiny-i2_s.gguf");
    let names = block_matrices(&i2s_file);
    assert_eq!(names.len(), 28);
    for name in &names {
        let t = i2s_file.tensor(name).unwrap();
        assert_eq!(t.encoding(), Some(Encoding::I2S), "{name}");
        let decoded = i2s_file.decode(t).unwrap();
        let reference = f32_file.decode(f32_file.tensor(name).unwrap()).unwrap();
        assert_eq!(decoded, reference, "{name}");
    }
    // The F16 embedding is the F32 one rounded to F16.
    let e16 = i2s_file
        .decode(i2s_file.tensor("token_embd.weight").unwrap())
        .unwrap();
    let e32 = f32_file
        .decode(f32_file.tensor("token_embd.weight").unwrap())
        .unwrap();
    assert!(
        e16.iter()
            .zip(&e32)
            .all(|(a, b)| *a == f16::from_f32(*b).to_f32())
    );
}

#[test]
fn llama_cpp_ternary_files_decode_to_the_same_pattern() {
    let f16_file = open("tiny/mainline-tiny-f16.gguf");
    let tq2 = open("tiny/mainline-tiny-tq2_0.gguf");
    let tq1 = open("tiny/mainline-tiny-tq1_0.gguf");
    let i2s = open("tiny/bitnetcpp-tiny-i2_s.gguf");
    for name in block_matrices(&tq2) {
        let (t2, t1) = (tq2.tensor(&name).unwrap(), tq1.tensor(&name).unwrap());
        assert_eq!(
            (t2.encoding(), t1.encoding()),
            (Some(Encoding::TQ2_0), Some(Encoding::TQ1_0))
        );
        let c2 = ternary_codes(Encoding::TQ2_0, tq2.tensor_data(t2), t2.n_elements()).unwrap();
        let c1 = ternary_codes(Encoding::TQ1_0, tq1.tensor_data(t1), t1.n_elements()).unwrap();
        assert_eq!(c2, c1, "{name}: TQ2_0 and TQ1_0 differ");
        // Both decode to exactly the values of llama.cpp's F16 file.
        let v16 = f16_file.decode(f16_file.tensor(&name).unwrap()).unwrap();
        assert_eq!(tq2.decode(t2).unwrap(), v16, "{name}");
        assert_eq!(tq1.decode(t1).unwrap(), v16, "{name}");
        // And the two converters agree on the ternary pattern of the same checkpoint.
        let ti = i2s.tensor(&name).unwrap();
        let ci = ternary_codes(Encoding::I2S, i2s.tensor_data(ti), ti.n_elements()).unwrap();
        assert_eq!(
            ci.codes, c2.codes,
            "{name}: bitnet.cpp and llama.cpp patterns differ"
        );
    }
}

#[test]
fn quantize_reproduces_bitnet_cpp_i2s_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-i2_s.gguf");
    let input = open("tiny/bitnetcpp-tiny-f32.gguf");
    let opts = QuantizeOptions {
        weights: Encoding::I2S,
        embedding: Encoding::F16,
    };
    let report = quantize(&input, &out, opts, |_, _, _| {}).unwrap();
    assert!(
        report.tensors.iter().all(|t| t.note.is_empty()),
        "the F32 file is already ternary"
    );
    let ours = GgufFile::open(&out).unwrap();
    let theirs = open("tiny/bitnetcpp-tiny-i2_s.gguf");
    assert_eq!(ours.file_size(), theirs.file_size());
    assert_eq!(
        ours.get("general.file_type"),
        theirs.get("general.file_type")
    );
    assert_eq!(ours.tensors().len(), theirs.tensors().len());
    let mut i2s = 0;
    for t in theirs.tensors() {
        let o = ours.tensor(&t.name).unwrap();
        assert_eq!(
            (o.type_name, &o.dims, o.nbytes),
            (t.type_name, &t.dims, t.nbytes),
            "{}",
            t.name
        );
        let (a, b) = (ours.tensor_data(o), theirs.tensor_data(t));
        if t.type_name == "I2_S" {
            // Packed codes and the f32 scale; the 28 bytes after the scale are padding that
            // bitnet.cpp leaves uninitialized, and that we write as zeros.
            let n = (t.n_elements() / 4 + 4) as usize;
            assert_eq!(a[..n], b[..n], "{}", t.name);
            assert!(a[n..].iter().all(|&x| x == 0));
            i2s += 1;
        } else {
            assert_eq!(a, b, "{}", t.name);
        }
    }
    assert_eq!(i2s, 28);
}

#[test]
fn quantize_to_tq_matches_llama_cpp_patterns_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let i2s = open("tiny/bitnetcpp-tiny-i2_s.gguf");
    let tq2_path = dir.path().join("tq2.gguf");
    let back_path = dir.path().join("back.gguf");
    let tq1_path = dir.path().join("tq1.gguf");
    let opts = |weights| QuantizeOptions {
        weights,
        embedding: Encoding::F16,
    };
    quantize(&i2s, &tq2_path, opts(Encoding::TQ2_0), |_, _, _| {}).unwrap();
    let tq2 = GgufFile::open(&tq2_path).unwrap();
    quantize(&tq2, &back_path, opts(Encoding::I2S), |_, _, _| {}).unwrap();
    let back = GgufFile::open(&back_path).unwrap();
    quantize(
        &open("tiny/bitnetcpp-tiny-f32.gguf"),
        &tq1_path,
        opts(Encoding::TQ1_0),
        |_, _, _| {},
    )
    .unwrap();
    let tq1 = GgufFile::open(&tq1_path).unwrap();
    let mainline_tq1 = open("tiny/mainline-tiny-tq1_0.gguf");
    for name in block_matrices(&i2s) {
        let (a, b) = (i2s.tensor(&name).unwrap(), back.tensor(&name).unwrap());
        // I2_S -> TQ2_0 -> I2_S is exact when the scale is representable in f16; otherwise
        // only the codes survive, and the scale comes back rounded to f16.
        let n = a.n_elements();
        let scale = encoding::i2s_scale(i2s.tensor_data(a), n);
        let back_scale = encoding::i2s_scale(back.tensor_data(b), n);
        assert_eq!(back_scale, f16::from_f32(scale).to_f32(), "{name}");
        let codes = |f: &GgufFile, e| {
            let t = f.tensor(&name).unwrap();
            ternary_codes(e, f.tensor_data(t), t.n_elements())
                .unwrap()
                .codes
        };
        assert_eq!(
            codes(&back, Encoding::I2S),
            codes(&i2s, Encoding::I2S),
            "{name}"
        );
        // Our TQ1_0 of bitnet.cpp's F32 file has llama.cpp's TQ1_0 ternary pattern.
        assert_eq!(
            codes(&tq1, Encoding::TQ1_0),
            codes(&mainline_tq1, Encoding::TQ1_0),
            "{name}"
        );
    }
}

#[test]
fn non_ternary_weights_are_ternarized_with_absmean() {
    use bitnetc::gguf::{GgufWriter, Value};
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..256 * 64)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    let norm = vec![1.0f32; 256];
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::str("bitnet-b1.58"));
    w.add_tensor("blk.0.attn_k.weight", &[256, 64], Encoding::F32)
        .unwrap();
    w.add_tensor("blk.0.attn_norm.weight", &[256], Encoding::F32)
        .unwrap();
    let (a, b) = (
        Encoding::F32.encode(&values).unwrap(),
        Encoding::F32.encode(&norm).unwrap(),
    );
    let src = dir.path().join("f32.gguf");
    std::fs::write(&src, w.to_bytes(&[&a, &b]).unwrap()).unwrap();
    let out = dir.path().join("i2s.gguf");
    let opts = QuantizeOptions {
        weights: Encoding::I2S,
        embedding: Encoding::F16,
    };
    let report = quantize(&GgufFile::open(&src).unwrap(), &out, opts, |_, _, _| {}).unwrap();
    let notes: Vec<&str> = report.tensors.iter().map(|t| t.note.as_str()).collect();
    assert_eq!(notes, ["ternarized (absmean)", ""]);
    let q = GgufFile::open(&out).unwrap();
    let k = q.tensor("blk.0.attn_k.weight").unwrap();
    let expected = Encoding::I2S
        .encode(&encoding::ternarize_absmean(&values))
        .unwrap();
    assert_eq!(q.tensor_data(k), &expected[..]);
    // The scale is the mean absolute weight, as absmean defines it.
    let mean = values.iter().map(|v| v.abs() as f64).sum::<f64>() / values.len() as f64;
    let scale = encoding::i2s_scale(q.tensor_data(k), k.n_elements());
    assert!(
        (scale as f64 - mean).abs() < 1e-6 * mean,
        "{scale} vs {mean}"
    );
    assert_eq!(
        q.get("general.file_type"),
        Some(bitnetc::gguf::MetaValue::U32(40))
    );
}

/// Writes a one-tensor file whose tensor uses ggml type `type_id`.
fn one_tensor_file(
    arch: &str,
    dims: &[u64],
    type_id: u32,
    table: TypeTable,
    extra: &[(&str, bitnetc::gguf::Value)],
) -> Vec<u8> {
    use bitnetc::gguf::{GgufWriter, Value};
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::str(arch));
    for (k, v) in extra {
        w.set(k, v.clone());
    }
    w.add_tensor_type_id("blk.0.attn_q.weight", dims, type_id, table)
        .unwrap();
    let n = w.tensors()[0].nbytes as usize;
    w.to_bytes(&[&vec![0x55u8; n]]).unwrap()
}

#[test]
fn version_2_and_custom_alignment_are_read() {
    use bitnetc::gguf::Value;
    let mut bytes = one_tensor_file(
        "llama",
        &[64, 2],
        0,
        TypeTable::Upstream,
        &[("general.alignment", Value::U32(64))],
    );
    let f = GgufFile::from_bytes("v3.gguf", bytes.clone()).unwrap();
    assert_eq!(
        (
            f.version(),
            f.layout().alignment,
            f.layout().data_start % 64
        ),
        (3, 64, 0)
    );
    // v2 and v3 little-endian files are laid out identically.
    bytes[4] = 2;
    let f = GgufFile::from_bytes("v2.gguf", bytes).unwrap();
    assert_eq!(f.version(), 2);
}

#[test]
fn tl2_files_are_described_and_refused() {
    // 39 is TL2 in bitnet.cpp's table (MXFP4 upstream); its size fits only TL2 here.
    let bytes = one_tensor_file("bitnet-b1.58", &[3200, 8640], 39, TypeTable::BitnetCpp, &[]);
    let f = GgufFile::from_bytes("tl2.gguf", bytes).unwrap();
    assert_eq!(f.layout().type_table, TypeTable::BitnetCpp);
    let t = &f.tensors()[0];
    assert_eq!((t.type_name, t.nbytes), ("TL2", 5_852_192));
    assert!(
        f.decode(t)
            .unwrap_err()
            .to_string()
            .contains("per-model kernel parameters")
    );
    let d = describe(&f, true);
    assert_eq!(d.totals.by_type[0].type_name, "TL2");
    // The same id under a llama architecture with MXFP4's size reads as upstream MXFP4.
    let bytes = one_tensor_file("llama", &[64, 2], 39, TypeTable::Upstream, &[]);
    let f = GgufFile::from_bytes("mxfp4.gguf", bytes).unwrap();
    assert_eq!(
        (f.layout().type_table, f.tensors()[0].type_name),
        (TypeTable::Upstream, "MXFP4")
    );
}

/// A synthetic bitnet-b1.58 model whose tensor `name` is stored as bitnet.cpp type `type_id`
/// (filled with a byte pattern), every other tensor as written by `SynthSpec`.
fn synthetic_with_type(name: &str, type_id: u32) -> Vec<u8> {
    use bitnetc::gguf::synth::SynthSpec;
    use bitnetc::gguf::{GgufWriter, Value};
    let bytes = SynthSpec::tiny(Architecture::BitnetB158)
        .to_bytes()
        .unwrap();
    let src = GgufFile::from_bytes("synthetic.gguf", bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        w.set(k, Value::from(v));
    }
    for t in src.tensors() {
        let id = if t.name == name { type_id } else { t.type_id };
        w.add_tensor_type_id(&t.name, &t.dims, id, TypeTable::BitnetCpp)
            .unwrap();
    }
    let data: Vec<Vec<u8>> = src
        .tensors()
        .iter()
        .zip(w.tensors())
        .map(|(t, spec)| {
            if t.name == name {
                vec![0x5a; spec.nbytes as usize]
            } else {
                src.tensor_data(t).to_vec()
            }
        })
        .collect();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    w.to_bytes(&refs).unwrap()
}

/// TL1 (bitnet.cpp id 38) and TL2 (39) in a whole model: recognized and described with their
/// exact byte size, refused by the config reader, the decoder and the engine's load path with
/// the reason (kernel parameters the file does not store).
#[test]
fn tl1_and_tl2_models_are_described_and_refused() {
    use bitnetc::gguf::ModelError;
    let dir = tempfile::tempdir().unwrap();
    // TL1 is sized like I2_S (n/4 + 32); TL2 by its own rule, here
    // t = (256 − 256)·128/3·5/8 + 256·128/2·4/8 = 8192, padded to 32, + 32.
    for (type_id, type_name, tensor, dims, nbytes) in [
        (
            38,
            "TL1",
            "blk.0.attn_q.weight",
            [128u64, 128],
            128 * 128 / 4 + 32,
        ),
        (39, "TL2", "blk.1.ffn_down.weight", [256, 128], 8192 + 32),
    ] {
        let path = dir.path().join(format!("{type_name}.gguf"));
        std::fs::write(&path, synthetic_with_type(tensor, type_id)).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let layout = f.layout();
        assert_eq!(layout.type_table, TypeTable::BitnetCpp, "{type_name}");
        assert!(
            layout.type_table_reason.contains(&format!(
                "type ids [36, {type_id}] fit only bitnet.cpp's table"
            )),
            "{}",
            layout.type_table_reason
        );
        let t = f.tensor(tensor).unwrap();
        assert_eq!(
            (t.type_id, t.type_name, &t.dims[..], t.nbytes, t.encoding()),
            (type_id, type_name, &dims[..], nbytes, None)
        );
        assert!(f.tensor_data(t).iter().all(|&b| b == 0x5a));

        // `inspect` describes it, with its size, and says why the model cannot be loaded.
        let d = describe(&f, true);
        let tl: Vec<(&str, usize, u64)> = d
            .totals
            .by_type
            .iter()
            .filter(|t| t.type_name.starts_with("TL"))
            .map(|t| (t.type_name.as_str(), t.tensors, t.bytes))
            .collect();
        assert_eq!(tl, [(type_name, 1, nbytes)]);
        let ConfigOutcome::Invalid(why) = &d.config else {
            panic!("{type_name}: the config must be refused");
        };
        assert!(
            why.starts_with(&format!(
                "tensor '{tensor}' is {type_name}: TL1/TL2 weights"
            )),
            "{why}"
        );
        let json = serde_json::to_value(&d).unwrap();
        let row = json["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == tensor)
            .unwrap();
        assert_eq!(
            (&row["type"], &row["nbytes"]),
            (&serde_json::json!(type_name), &serde_json::json!(nbytes))
        );
        assert!(
            json["config_error"]
                .as_str()
                .unwrap()
                .contains("per-model kernel parameters")
        );

        // The config reader refuses it, naming the tensor, its type and the reason.
        let err = ModelConfig::from_gguf(&f).unwrap_err();
        let ModelError::TensorType {
            tensor: name,
            type_name: ty,
            reason,
        } = &err
        else {
            panic!("{type_name}: {err:?}");
        };
        assert_eq!((name.as_str(), ty.as_str()), (tensor, type_name));
        assert!(
            reason.contains(
                "per-model kernel parameters (BM, BK, bm) that bitnet.cpp generates at build \
                 time and the file does not store"
            ),
            "{reason}"
        );
        assert!(reason.contains("bitnetc quantize --type i2_s"), "{reason}");
        assert!(
            f.decode(t)
                .unwrap_err()
                .to_string()
                .contains("per-model kernel parameters")
        );

        // So does loading the model to run it.
        let err = match bitnetc::load(&path, bitnetc::LoadOptions::default()) {
            Ok(_) => panic!("{type_name}: the model must not load"),
            Err(e) => e,
        };
        assert_eq!(err.stage(), bitnetc::Stage::Lower);
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "{}: tensor '{tensor}' is {type_name}: ",
                path.display()
            )),
            "{msg}"
        );
        assert!(msg.contains("the file does not store"), "{msg}");
    }
}

/// `quantize --type i2_s --embedding-type q8_0|f16` on bitnet.cpp's F32 file: the embedding in
/// the reference encoding of its F32 values, every norm unchanged, every block matrix I2_S.
#[test]
fn quantize_embedding_types() {
    let dir = tempfile::tempdir().unwrap();
    let input = open("tiny/bitnetcpp-tiny-f32.gguf");
    let embd = input.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.type_name, &embd.dims[..]),
        ("F32", &[256u64, 2048][..])
    );
    let values = input.decode(embd).unwrap();
    let mut logits = Vec::new();
    for (embedding, type_name, nbytes) in [
        (Encoding::Q8_0, "Q8_0", 256 * 2048 / 32 * 34),
        (Encoding::F16, "F16", 256 * 2048 * 2),
    ] {
        let out = dir.path().join(format!("i2_s-{type_name}.gguf"));
        let opts = QuantizeOptions {
            weights: Encoding::I2S,
            embedding,
        };
        let report = quantize(&input, &out, opts, |_, _, _| {}).unwrap();
        let q = GgufFile::open(&out).unwrap();
        assert_eq!(
            q.get("general.file_type"),
            Some(bitnetc::gguf::MetaValue::U32(40))
        );
        assert_eq!(q.tensors().len(), 46);

        let e = q.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (e.type_name, &e.dims, e.nbytes),
            (type_name, &embd.dims, nbytes)
        );
        let expected: Vec<u8> = match embedding {
            Encoding::Q8_0 => Encoding::Q8_0.encode(&values).unwrap(),
            _ => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        assert_eq!(q.tensor_data(e), &expected[..], "{type_name}");
        let outcome = report
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .unwrap();
        assert_eq!(
            (outcome.from.as_str(), outcome.to.as_str()),
            ("F32", type_name)
        );
        if embedding == Encoding::Q8_0 {
            // Within half a quantization step of the F32 values, block by block, plus what
            // storing the step d in f16 moves the largest code (127).
            let back = q.decode(e).unwrap();
            for (x, y) in values.chunks(32).zip(back.chunks(32)) {
                let d = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                let bound = d * 0.5 + 127.0 * (f16::from_f32(d).to_f32() - d).abs() + 1e-6;
                assert!(x.iter().zip(y).all(|(a, b)| (a - b).abs() <= bound));
            }
        }

        let (mut norms, mut matrices) = (0, 0);
        for t in input.tensors() {
            let o = q.tensor(&t.name).unwrap();
            if t.name.ends_with("norm.weight") {
                assert_eq!((t.type_name, o.type_name), ("F32", "F32"), "{}", t.name);
                assert_eq!(q.tensor_data(o), input.tensor_data(t), "{}", t.name);
                norms += 1;
            } else if t.name != "token_embd.weight" {
                assert_eq!((o.type_name, &o.dims), ("I2_S", &t.dims), "{}", t.name);
                let expected = Encoding::I2S.encode(&input.decode(t).unwrap()).unwrap();
                assert_eq!(q.tensor_data(o), &expected[..], "{}", t.name);
                matrices += 1;
            }
        }
        assert_eq!((norms, matrices), (17, 28));

        // The model runs with either embedding (it is also the tied output head).
        let m = bitnetc::load(&out, bitnetc::LoadOptions::default()).unwrap();
        let tokens: Vec<u32> = (0..8u32).map(|i| (i * 613 + 7) % 2048).collect();
        logits.push(m.engine.session().eval(&tokens).unwrap());
    }
    let (q8, f16) = (&logits[0], &logits[1]);
    assert_eq!(q8.len(), f16.len());
    // Measured: 0.16 on a mean |logit| of 3.2, nearly all of it from the embedding lookup
    // (a Q8_0 head alone moves the logits by 0.02).
    let mean = q8.iter().zip(f16).map(|(a, b)| (a - b).abs()).sum::<f32>() / q8.len() as f32;
    eprintln!("Q8_0 vs F16 embedding: mean |Δlogit| {mean}");
    assert!(mean > 0.0 && mean < 0.25, "{mean}");
}

#[test]
fn k_quants_are_described_but_not_computed() {
    let bytes = one_tensor_file("llama", &[256, 4], 12, TypeTable::Upstream, &[]);
    let f = GgufFile::from_bytes("q4k.gguf", bytes).unwrap();
    let t = &f.tensors()[0];
    assert_eq!(
        (t.type_name, t.nbytes, t.encoding()),
        ("Q4_K", 4 * 144, None)
    );
    let err = f.decode(t).unwrap_err().to_string();
    assert!(
        err.contains("q4k.gguf: tensor 'blk.0.attn_q.weight' is Q4_K"),
        "{err}"
    );
}

/// `quantize --type q8_0|q4_0|q4_1`: every block matrix in llama.cpp's reference encoding of
/// its values (the rest as it was), and the model still computes what the F16 one does, up to
/// the quantization's error: this random model's logits (magnitude ~20) move by 0.07 on
/// average with Q8_0, 0.58 with Q4_1 and 0.85 with Q4_0, in that order.
#[test]
fn quantize_to_block_types_encodes_every_matrix_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let f16_path = fixture("tiny/mainline-tiny-f16.gguf");
    let input = GgufFile::open(&f16_path).unwrap();
    let tokens: Vec<u32> = (0..16u32).map(|i| (i * 613 + 7) % 2048).collect();
    let logits = |path: &std::path::Path| {
        let m = bitnetc::load(path, bitnetc::LoadOptions::default()).unwrap();
        m.engine.session().eval(&tokens).unwrap()
    };
    let reference = logits(&f16_path);
    let mut means = Vec::new();
    for (weights, type_name, block_bytes, bound) in [
        (Encoding::Q8_0, "Q8_0", 34, 0.1),
        (Encoding::Q4_0, "Q4_0", 18, 1.5),
        (Encoding::Q4_1, "Q4_1", 20, 1.0),
    ] {
        let out = dir.path().join(format!("{type_name}.gguf"));
        let opts = QuantizeOptions {
            weights,
            embedding: Encoding::F16,
        };
        quantize(&input, &out, opts, |_, _, _| {}).unwrap();
        let q = GgufFile::open(&out).unwrap();
        let matrices = block_matrices(&input);
        assert_eq!(matrices.len(), 28);
        for t in input.tensors() {
            let o = q.tensor(&t.name).unwrap();
            if matrices.contains(&t.name) {
                assert_eq!(o.type_name, type_name, "{}", t.name);
                assert_eq!(o.nbytes, t.n_elements() / 32 * block_bytes, "{}", t.name);
                let expected = weights.encode(&input.decode(t).unwrap()).unwrap();
                assert_eq!(q.tensor_data(o), &expected[..], "{}", t.name);
            } else {
                assert_eq!(q.tensor_data(o), input.tensor_data(t), "{}", t.name);
            }
        }
        let ours = logits(&out);
        let mean = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / ours.len() as f32;
        let cmp = bitnetc_tests::compare(&ours, &reference, 2048);
        eprintln!(
            "{type_name}: mean |Δlogit| vs F16 {mean}, max {}",
            cmp.max()
        );
        assert!(mean > 0.0 && mean <= bound, "{type_name}: {mean}");
        means.push(mean);
    }
    assert!(means[0] < means[2] && means[2] < means[1], "{means:?}");
}
