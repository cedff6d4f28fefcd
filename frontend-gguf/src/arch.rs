//! The architecture registry: GGUF metadata and tensors → a typed, validated [`ModelConfig`].
//!
//! Four architectures (FORMATS.md §4): `bitnet-b1.58` and `bitnet-25` (bitnet.cpp; relu² GLU,
//! SubLN, NEOX RoPE), `bitnet` (llama.cpp and 1bitLLM; SiLU GLU, SubLN, NEOX RoPE, optional
//! per-matrix `*.scale` tensors) and `llama` (NORM RoPE with permuted Q/K, SiLU GLU, no sub-norms).
//! Validation checks every tensor the architecture needs, its dims and its encoding, and refuses
//! tensors it would not use: ignoring a weight would compute something else than the model.

use crate::error::ModelError;
use crate::gguf::{GgufFile, TensorInfo};
use crate::types::Support;
use bitnetc_ir::Encoding;
pub use bitnetc_ir::{Activation, RopeStyle};
use serde::Serialize;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Architecture {
    #[serde(rename = "bitnet-b1.58")]
    BitnetB158,
    #[serde(rename = "bitnet-25")]
    Bitnet25,
    #[serde(rename = "bitnet")]
    Bitnet,
    #[serde(rename = "llama")]
    Llama,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::BitnetB158,
        Architecture::Bitnet25,
        Architecture::Bitnet,
        Architecture::Llama,
    ];

    /// The `general.architecture` string.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::BitnetB158 => "bitnet-b1.58",
            Architecture::Bitnet25 => "bitnet-25",
            Architecture::Bitnet => "bitnet",
            Architecture::Llama => "llama",
        }
    }

    pub fn from_gguf_name(name: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.gguf_name() == name)
    }

    pub fn rope_style(self) -> RopeStyle {
        match self {
            Architecture::Llama => RopeStyle::Norm,
            _ => RopeStyle::Neox,
        }
    }

    pub fn ffn_activation(self) -> Activation {
        match self {
            Architecture::BitnetB158 | Architecture::Bitnet25 => Activation::Relu2,
            Architecture::Bitnet | Architecture::Llama => Activation::Silu,
        }
    }

    /// Whether the architecture normalizes the attention output and the FFN hidden state
    /// before their output projections (SubLN).
    pub fn has_sub_norms(self) -> bool {
        self != Architecture::Llama
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// The matrices of one transformer block that may carry a `.scale` tensor (architecture `bitnet`).
pub const SCALED_MATRICES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub name: Option<String>,
    pub vocab_size: u64,
    pub context_length: u64,
    /// Width of the residual stream (`embedding_length`).
    pub hidden: u64,
    pub layers: u64,
    /// Width of the FFN hidden state (`feed_forward_length`).
    pub ffn: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dims: u64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub ffn_activation: Activation,
    pub sub_norms: bool,
    /// True when the output head is `token_embd` (no `output.weight` in the file).
    pub tied_output: bool,
    /// True when some matrix carries a `.scale` tensor (architecture `bitnet`).
    pub weight_scales: bool,
}

impl ModelConfig {
    /// Reads and validates the configuration of a GGUF model.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch_name =
            file.get_str("general.architecture")?
                .ok_or_else(|| ModelError::MissingKey {
                    key: "general.architecture".into(),
                    hint: String::new(),
                })?;
        let architecture = Architecture::from_gguf_name(arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                arch: arch_name.into(),
            }
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let required = |k: &str| -> Result<u64, ModelError> {
            let k = key(k);
            let v = file.get_uint(&k)?.ok_or(ModelError::MissingKey {
                key: k.clone(),
                hint: String::new(),
            })?;
            if v == 0 {
                return Err(ModelError::BadValue {
                    key: k,
                    value: "0".into(),
                    reason: "must be positive".into(),
                });
            }
            Ok(v)
        };
        let hidden = required("embedding_length")?;
        let layers = required("block_count")?;
        // Every block has at least 9 tensors; this also bounds the work below on hostile files.
        let tensors = file.tensors().len() as u64;
        if layers.saturating_mul(9) > tensors {
            return Err(ModelError::BadValue {
                key: key("block_count"),
                value: layers.to_string(),
                reason: format!(
                    "the file has only {tensors} tensors, too few for that many blocks"
                ),
            });
        }
        let ffn = required("feed_forward_length")?;
        let heads = required("attention.head_count")?;
        let context_length = required("context_length")?;
        let kv_heads = file
            .get_uint(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(ModelError::BadValue {
                key: key("attention.head_count_kv"),
                value: kv_heads.to_string(),
                reason: format!("must divide attention.head_count = {heads}"),
            });
        }
        if hidden % heads != 0 && file.get(&key("attention.key_length")).is_none() {
            return Err(ModelError::BadValue {
                key: key("attention.head_count"),
                value: heads.to_string(),
                reason: format!(
                    "must divide embedding_length = {hidden} when attention.key_length is absent"
                ),
            });
        }
        let head_dim = file
            .get_uint(&key("attention.key_length"))?
            .unwrap_or(hidden / heads);
        let value_dim = file
            .get_uint(&key("attention.value_length"))?
            .unwrap_or(head_dim);
        if value_dim != head_dim || head_dim == 0 {
            return Err(ModelError::BadValue {
                key: key("attention.value_length"),
                value: value_dim.to_string(),
                reason: format!(
                    "bitnetc needs a positive head size equal to attention.key_length = {head_dim}"
                ),
            });
        }
        let rope_dims = file
            .get_uint(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        let rope_ok = if architecture == Architecture::Llama {
            rope_dims <= head_dim && rope_dims % 2 == 0 && rope_dims > 0
        } else {
            rope_dims == head_dim
        };
        if !rope_ok {
            return Err(ModelError::BadValue {
                key: key("rope.dimension_count"),
                value: rope_dims.to_string(),
                reason: format!(
                    "must be an even number of dimensions up to the head size {head_dim} (equal to it for {architecture})"
                ),
            });
        }
        check_rope_scaling(file, arch_name)?;
        let rope_theta = file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
        let rms_eps = file
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or(ModelError::MissingKey {
                key: key("attention.layer_norm_rms_epsilon"),
                hint: String::new(),
            })? as f32;
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(ModelError::BadValue {
                key: key("rope.freq_base"),
                value: rope_theta.to_string(),
                reason: "must be a positive number".into(),
            });
        }
        if !(rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(ModelError::BadValue {
                key: key("attention.layer_norm_rms_epsilon"),
                value: rms_eps.to_string(),
                reason: "must be a non-negative number".into(),
            });
        }

        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor {
                tensor: "token_embd.weight".into(),
                arch: arch_name.into(),
            })?;
        let vocab_size = match file.get_uint(&key("vocab_size"))? {
            Some(v) => v,
            None => embd.dims.get(1).copied().unwrap_or(0),
        };

        let mut config = ModelConfig {
            architecture,
            name: file.get_str("general.name")?.map(str::to_string),
            vocab_size,
            context_length,
            hidden,
            layers,
            ffn,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            rope_theta,
            rope_style: architecture.rope_style(),
            rms_eps,
            ffn_activation: architecture.ffn_activation(),
            sub_norms: architecture.has_sub_norms(),
            tied_output: file.tensor("output.weight").is_none(),
            weight_scales: false,
        };
        config.weight_scales = config.check_tensors(file)?;
        Ok(config)
    }

    /// Every tensor the architecture reads, with its dims (ggml order) and whether it is required.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        let (h, q, kv, f, v) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.ffn,
            self.vocab_size,
        );
        let mut out = vec![
            ExpectedTensor::matrix("token_embd.weight", [h, v], true),
            ExpectedTensor::vector("output_norm.weight", h, true),
            ExpectedTensor::matrix("output.weight", [h, v], false),
        ];
        for i in 0..self.layers {
            let b = |s: &str| format!("blk.{i}.{s}");
            out.push(ExpectedTensor::vector(&b("attn_norm.weight"), h, true));
            out.push(ExpectedTensor::matrix(&b("attn_q.weight"), [h, q], true));
            out.push(ExpectedTensor::matrix(&b("attn_k.weight"), [h, kv], true));
            out.push(ExpectedTensor::matrix(&b("attn_v.weight"), [h, kv], true));
            out.push(ExpectedTensor::matrix(
                &b("attn_output.weight"),
                [q, h],
                true,
            ));
            out.push(ExpectedTensor::vector(&b("ffn_norm.weight"), h, true));
            out.push(ExpectedTensor::matrix(&b("ffn_gate.weight"), [h, f], true));
            out.push(ExpectedTensor::matrix(&b("ffn_up.weight"), [h, f], true));
            out.push(ExpectedTensor::matrix(&b("ffn_down.weight"), [f, h], true));
            if self.sub_norms {
                out.push(ExpectedTensor::vector(&b("attn_sub_norm.weight"), q, true));
                out.push(ExpectedTensor::vector(&b("ffn_sub_norm.weight"), f, true));
            }
            if self.architecture == Architecture::Bitnet {
                for m in SCALED_MATRICES {
                    out.push(ExpectedTensor::vector(&b(&format!("{m}.scale")), 1, false));
                }
            }
        }
        out
    }

    /// Checks every tensor against [`ModelConfig::expected_tensors`]; returns whether any
    /// `.scale` tensor is present.
    fn check_tensors(&self, file: &GgufFile) -> Result<bool, ModelError> {
        let arch = self.architecture.gguf_name();
        let expected = self.expected_tensors();
        let mut scales = false;
        for e in &expected {
            let Some(t) = file.tensor(&e.name) else {
                if e.required {
                    return Err(ModelError::MissingTensor {
                        tensor: e.name.clone(),
                        arch: arch.into(),
                    });
                }
                continue;
            };
            if trim_dims(&t.dims) != trim_dims(&e.dims) {
                return Err(ModelError::TensorShape {
                    tensor: t.name.clone(),
                    expected: e.dims.clone(),
                    found: t.dims.clone(),
                });
            }
            check_encoding(t, e.is_matrix)?;
            scales |= e.name.ends_with(".scale");
        }
        // A compiled plan's weights image (marked by `bitnetc.plan`) also holds tensors the
        // compiler made, named `bitnetc.*`, which its plan reads.
        let plan_image = file.get("bitnetc.plan").is_some();
        let known = |name: &str| {
            expected.iter().any(|e| e.name == name) || plan_image && name.starts_with("bitnetc.")
        };
        if let Some(t) = file.tensors().iter().find(|t| !known(&t.name)) {
            return Err(ModelError::UnexpectedTensor {
                tensor: t.name.clone(),
                arch: arch.into(),
            });
        }
        Ok(scales)
    }

    /// Number of parameters: the elements of every tensor the model reads.
    pub fn parameter_count(&self) -> u64 {
        self.expected_tensors()
            .iter()
            .filter(|e| e.required || (e.name == "output.weight" && !self.tied_output))
            .map(|e| e.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d)))
            .fold(0u64, |a, n| a.saturating_add(n))
    }
}

/// One tensor an architecture reads.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub required: bool,
    /// Matrices may use any computable encoding; vectors (norms, scales) must be float.
    pub is_matrix: bool,
}

impl ExpectedTensor {
    fn matrix(name: &str, dims: [u64; 2], required: bool) -> Self {
        ExpectedTensor {
            name: name.into(),
            dims: dims.to_vec(),
            required,
            is_matrix: true,
        }
    }

    fn vector(name: &str, len: u64, required: bool) -> Self {
        ExpectedTensor {
            name: name.into(),
            dims: vec![len],
            required,
            is_matrix: false,
        }
    }
}

fn trim_dims(d: &[u64]) -> &[u64] {
    let mut n = d.len();
    while n > 1 && d[n - 1] == 1 {
        n -= 1;
    }
    &d[..n]
}

fn check_encoding(t: &TensorInfo, is_matrix: bool) -> Result<(), ModelError> {
    let reason = match (t.ggml_type.support, is_matrix) {
        (Support::Compute(_), true) => return Ok(()),
        (Support::Compute(Encoding::F32 | Encoding::F16 | Encoding::BF16), false) => return Ok(()),
        (Support::Compute(_), false) => {
            "norm and scale vectors must be F32, F16 or BF16".to_string()
        }
        (Support::Unusable(why), _) => why.to_string(),
        (Support::DescribeOnly, _) => format!(
            "bitnetc computes with {} only; re-quantize the model (bitnetc quantize) to one of them",
            Encoding::ALL.map(|e| e.name()).join(", ")
        ),
        (Support::Invalid(why), _) => why.to_string(),
    };
    Err(ModelError::TensorType {
        tensor: t.name.clone(),
        type_name: t.type_name.into(),
        reason,
    })
}

/// Refuses RoPE scaling other than none or linear ×1: anything else changes the positions.
fn check_rope_scaling(file: &GgufFile, arch: &str) -> Result<(), ModelError> {
    let type_key = format!("{arch}.rope.scaling.type");
    let factor_key = format!("{arch}.rope.scaling.factor");
    let kind = file.get_str(&type_key)?.unwrap_or("none");
    let factor = file.get_f64(&factor_key)?.unwrap_or(1.0);
    match kind {
        "none" => Ok(()),
        "linear" if factor == 1.0 => Ok(()),
        "linear" => Err(ModelError::BadValue {
            key: factor_key,
            value: factor.to_string(),
            reason: "linear RoPE scaling is not supported yet (only factor 1)".into(),
        }),
        other => Err(ModelError::BadValue {
            key: type_key,
            value: other.into(),
            reason: "RoPE scaling of this kind is not supported".into(),
        }),
    }
}
