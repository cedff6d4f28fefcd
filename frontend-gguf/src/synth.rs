//! Synthetic models: GGUF files of any supported architecture with random weights and a
//! byte-level vocabulary, written with [`crate::writer`]. Tests use small ones; benchmarks use
//! ones with real dimensions.

use crate::arch::{Architecture, SCALED_MATRICES};
use crate::types;
use crate::writer::{GgufWriter, Value};
use bitnetc_ir::Encoding;
use bitnetc_ir::vocab::gpt2_byte_char;
use std::io::{self, Write};

/// The shape and encodings of a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    pub architecture: Architecture,
    pub name: String,
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ffn: u64,
    pub context: u64,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Encoding of the seven matrices of every block.
    pub weights: Encoding,
    /// Encoding of `token_embd`.
    pub embedding: Encoding,
    /// An untied `output.weight` in this encoding, or `None` for a tied head.
    pub output: Option<Encoding>,
    /// Add `.scale` tensors to every matrix (architecture `bitnet` only).
    pub weight_scales: bool,
    pub seed: u64,
}

impl SynthSpec {
    /// A small model of an architecture: 2 layers, hidden 128, 4 heads / 2 KV heads, FFN 256,
    /// vocabulary 384; ternary I2_S weights for the BitNet architectures and Q8_0 for llama.
    pub fn tiny(architecture: Architecture) -> SynthSpec {
        let bitnet = architecture != Architecture::Llama;
        SynthSpec {
            architecture,
            name: format!("synthetic-{architecture}"),
            vocab: 384,
            hidden: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 256,
            context: 256,
            rope_theta: if bitnet { 500000.0 } else { 10000.0 },
            rms_eps: 1e-5,
            weights: if bitnet {
                Encoding::I2S
            } else {
                Encoding::Q8_0
            },
            embedding: Encoding::F16,
            output: None,
            weight_scales: false,
            seed: 1,
        }
    }

    /// The dimensions of microsoft/bitnet-b1.58-2B-4T (FORMATS.md §4.2) with random weights.
    pub fn bitnet_2b_4t() -> SynthSpec {
        SynthSpec {
            architecture: Architecture::BitnetB158,
            name: "synthetic-bitnet-b1.58-2B-4T".into(),
            vocab: 128256,
            hidden: 2560,
            layers: 30,
            heads: 20,
            kv_heads: 5,
            ffn: 6912,
            context: 4096,
            rope_theta: 500000.0,
            rms_eps: 1e-5,
            weights: Encoding::I2S,
            embedding: Encoding::F16,
            output: None,
            weight_scales: false,
            seed: 1,
        }
    }

    fn head_dim(&self) -> u64 {
        self.hidden / self.heads
    }

    /// Every tensor: name, dims (ggml order), encoding, and how to fill it.
    fn tensors(&self) -> Vec<(String, Vec<u64>, Encoding, Fill)> {
        let (h, f, v) = (self.hidden, self.ffn, self.vocab);
        let (q, kv) = (
            self.heads * self.head_dim(),
            self.kv_heads * self.head_dim(),
        );
        let bitnet = self.architecture != Architecture::Llama;
        let mut t = vec![(
            "token_embd.weight".to_string(),
            vec![h, v],
            self.embedding,
            Fill::Uniform(1.0),
        )];
        for i in 0..self.layers {
            let b = |s: &str| format!("blk.{i}.{s}");
            let w = self.weights;
            let m = |name: &str, k: u64, n: u64| (b(name), vec![k, n], w, Fill::Weight(k));
            let norm = |name: &str, n: u64| (b(name), vec![n], Encoding::F32, Fill::Norm);
            t.push(norm("attn_norm.weight", h));
            t.push(m("attn_q.weight", h, q));
            t.push(m("attn_k.weight", h, kv));
            t.push(m("attn_v.weight", h, kv));
            if bitnet {
                t.push(norm("attn_sub_norm.weight", q));
            }
            t.push(m("attn_output.weight", q, h));
            t.push(norm("ffn_norm.weight", h));
            t.push(m("ffn_gate.weight", h, f));
            t.push(m("ffn_up.weight", h, f));
            if bitnet {
                t.push(norm("ffn_sub_norm.weight", f));
            }
            t.push(m("ffn_down.weight", f, h));
            if self.weight_scales {
                for s in SCALED_MATRICES {
                    t.push((b(&format!("{s}.scale")), vec![1], Encoding::F32, Fill::Norm));
                }
            }
        }
        t.push((
            "output_norm.weight".into(),
            vec![h],
            Encoding::F32,
            Fill::Norm,
        ));
        if let Some(e) = self.output {
            t.push(("output.weight".into(), vec![h, v], e, Fill::Uniform(0.5)));
        }
        t
    }

    fn metadata(&self, w: &mut GgufWriter) {
        let a = self.architecture.gguf_name();
        let k = |s: &str| format!("{a}.{s}");
        w.set("general.architecture", Value::str(a));
        w.set("general.name", Value::str(&self.name));
        w.set(&k("vocab_size"), Value::U32(self.vocab as u32));
        w.set(&k("context_length"), Value::U32(self.context as u32));
        w.set(&k("embedding_length"), Value::U32(self.hidden as u32));
        w.set(&k("block_count"), Value::U32(self.layers as u32));
        w.set(&k("feed_forward_length"), Value::U32(self.ffn as u32));
        w.set(
            &k("rope.dimension_count"),
            Value::U32(self.head_dim() as u32),
        );
        w.set(&k("attention.head_count"), Value::U32(self.heads as u32));
        w.set(
            &k("attention.head_count_kv"),
            Value::U32(self.kv_heads as u32),
        );
        w.set(
            &k("attention.layer_norm_rms_epsilon"),
            Value::F32(self.rms_eps),
        );
        w.set(&k("rope.freq_base"), Value::F32(self.rope_theta));
        w.set(
            "general.file_type",
            Value::U32(types::file_type_of(self.weights)),
        );
        let tokens = byte_level_vocab(self.vocab as usize);
        let types: Vec<i32> = (0..tokens.len())
            .map(|i| if i < 2 { 3 } else { 1 })
            .collect();
        w.set("tokenizer.ggml.model", Value::str("gpt2"));
        w.set("tokenizer.ggml.pre", Value::str("gpt-2"));
        w.set("tokenizer.ggml.tokens", Value::strings(tokens));
        w.set("tokenizer.ggml.token_type", Value::i32s(types));
        w.set(
            "tokenizer.ggml.merges",
            Value::strings(Vec::<String>::new()),
        );
        w.set("tokenizer.ggml.bos_token_id", Value::U32(0));
        w.set("tokenizer.ggml.eos_token_id", Value::U32(1));
        w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    }

    /// Writes the model as GGUF.
    pub fn write(&self, out: impl Write) -> io::Result<()> {
        let mut w = GgufWriter::new();
        self.metadata(&mut w);
        let tensors = self.tensors();
        for (name, dims, enc, _) in &tensors {
            w.add_tensor(name, dims, *enc)?;
        }
        let mut stream = w.begin(out)?;
        let mut rng = SplitMix64(self.seed);
        for (name, dims, enc, fill) in &tensors {
            let n: u64 = dims.iter().product();
            let values = fill.generate(n as usize, &mut rng);
            let bytes = enc
                .encode(&values)
                .map_err(|e| io::Error::other(format!("tensor '{name}': {e}")))?;
            stream.write_tensor(&bytes)?;
        }
        stream.finish()?;
        Ok(())
    }

    /// Writes the metadata and tensor table with all-zero tensor data, as a sparse file: a
    /// model of any size for compiling and planning, which costs no time or disk to write.
    /// (Zero bytes are code 0, that is −1, in I2_S; the model computes nothing meaningful.)
    pub fn write_shape_only(&self, path: &std::path::Path) -> io::Result<()> {
        let mut w = GgufWriter::new();
        self.metadata(&mut w);
        let mut data = 0u64;
        for (name, dims, enc, _) in self.tensors() {
            w.add_tensor(&name, &dims, enc)?;
        }
        for t in w.tensors() {
            data += t.nbytes.div_ceil(32) * 32;
        }
        let mut file = std::fs::File::create(path)?;
        let header = w.begin(Vec::new())?.into_header();
        file.write_all(&header)?;
        file.set_len(header.len() as u64 + data)?;
        Ok(())
    }

    pub fn to_bytes(&self) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write(&mut v)?;
        Ok(v)
    }
}

/// How a synthetic tensor is filled.
enum Fill {
    /// Uniform in [−a, a].
    Uniform(f32),
    /// A linear layer with `k` inputs: ternary × 1/√k for ternary encodings, uniform ±1/√k otherwise.
    Weight(u64),
    /// Around 1 (norm gains, scales).
    Norm,
}

impl Fill {
    fn generate(&self, n: usize, rng: &mut SplitMix64) -> Vec<f32> {
        match *self {
            Fill::Uniform(a) => (0..n).map(|_| a * rng.uniform()).collect(),
            Fill::Weight(k) => {
                let beta = 1.0 / (k as f32).sqrt();
                (0..n)
                    .map(|_| {
                        let u = rng.uniform();
                        // About 30% zeros, like absmean-ternarized trained weights.
                        if u.abs() < 0.3 {
                            0.0
                        } else {
                            beta * u.signum()
                        }
                    })
                    .collect()
            }
            Fill::Norm => (0..n).map(|_| 1.0 + 0.25 * rng.uniform()).collect(),
        }
    }
}

/// SplitMix64: a small, fixed, seedable generator, so a spec always gives the same file.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [−1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A vocabulary of `n` tokens: `<|begin_of_text|>`, `<|end_of_text|>`, the 256 byte tokens,
/// then filler tokens.
pub fn byte_level_vocab(n: usize) -> Vec<String> {
    let mut v = vec![
        "<|begin_of_text|>".to_string(),
        "<|end_of_text|>".to_string(),
    ];
    v.extend((0..=255u8).map(|b| gpt2_byte_char(b).to_string()));
    let mut i = 0;
    while v.len() < n {
        v.push(format!("<|filler_{i}|>"));
        i += 1;
    }
    v.truncate(n);
    v
}
