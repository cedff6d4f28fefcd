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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::SynthSpec;
    use crate::types::TypeTable;
    use crate::writer::{GgufWriter, Value};

    /// A tensor of a model being rewritten; `data: None` gives zero bytes of the declared size.
    struct Tensor {
        name: String,
        dims: Vec<u64>,
        type_id: u32,
        data: Option<Vec<u8>>,
    }

    impl Tensor {
        fn new(name: &str, dims: &[u64], type_id: u32) -> Tensor {
            Tensor {
                name: name.into(),
                dims: dims.to_vec(),
                type_id,
                data: None,
            }
        }
    }

    type Metadata = Vec<(String, Value)>;

    /// The metadata and tensors of a synthetic model.
    fn parts(spec: &SynthSpec) -> (Metadata, Vec<Tensor>) {
        let f = GgufFile::from_bytes("synthetic.gguf", spec.to_bytes().unwrap()).unwrap();
        let kvs = f
            .metadata()
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect();
        let tensors = f
            .tensors()
            .iter()
            .map(|t| Tensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                type_id: t.type_id,
                data: Some(f.tensor_data(t).to_vec()),
            })
            .collect();
        (kvs, tensors)
    }

    fn build(kvs: &[(String, Value)], tensors: &[Tensor]) -> GgufFile {
        let mut w = GgufWriter::new();
        for (k, v) in kvs {
            w.set(k, v.clone());
        }
        for t in tensors {
            w.add_tensor_type_id(&t.name, &t.dims, t.type_id, TypeTable::BitnetCpp)
                .unwrap();
        }
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .zip(w.tensors())
            .map(|(t, s)| t.data.clone().unwrap_or_else(|| vec![0; s.nbytes as usize]))
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        GgufFile::from_bytes("edited.gguf", w.to_bytes(&refs).unwrap()).unwrap()
    }

    /// The config of a synthetic model after `edit` changed its metadata or tensors.
    fn config_after(
        spec: &SynthSpec,
        edit: impl FnOnce(&mut Metadata, &mut Vec<Tensor>),
    ) -> Result<ModelConfig, ModelError> {
        let (mut kvs, mut tensors) = parts(spec);
        edit(&mut kvs, &mut tensors);
        ModelConfig::from_gguf(&build(&kvs, &tensors))
    }

    fn error_after(
        spec: &SynthSpec,
        edit: impl FnOnce(&mut Metadata, &mut Vec<Tensor>),
    ) -> ModelError {
        config_after(spec, edit).expect_err("the edited model must be refused")
    }

    fn b158() -> SynthSpec {
        SynthSpec::tiny(Architecture::BitnetB158)
    }

    fn set(kvs: &mut Metadata, key: &str, value: Value) {
        kvs.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
    }

    fn remove_key(kvs: &mut Metadata, key: &str) {
        let before = kvs.len();
        kvs.retain(|(k, _)| k != key);
        assert_eq!(kvs.len(), before - 1, "{key} was in the file");
    }

    fn remove_tensor(tensors: &mut Vec<Tensor>, name: &str) {
        let before = tensors.len();
        tensors.retain(|t| t.name != name);
        assert_eq!(tensors.len(), before - 1, "{name} was in the file");
    }

    #[test]
    fn rewriting_unchanged_keeps_the_config() {
        let spec = b158();
        let original = ModelConfig::from_gguf(
            &GgufFile::from_bytes("synthetic.gguf", spec.to_bytes().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(config_after(&spec, |_, _| {}).unwrap(), original);
    }

    /// The config of `SynthSpec::tiny(Architecture::BitnetB158)`, field by field.
    fn tiny_b158_config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::BitnetB158,
            name: Some("synthetic-bitnet-b1.58".into()),
            vocab_size: 384,
            context_length: 256,
            hidden: 128,
            layers: 2,
            ffn: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            rope_dims: 32,
            rope_theta: 500000.0,
            rope_style: RopeStyle::Neox,
            rms_eps: 1e-5,
            ffn_activation: Activation::Relu2,
            sub_norms: true,
            tied_output: true,
            weight_scales: false,
        }
    }

    #[test]
    fn bitnet_b158_config() {
        let spec = b158();
        let f = GgufFile::from_bytes("b158.gguf", spec.to_bytes().unwrap()).unwrap();
        let c = ModelConfig::from_gguf(&f).unwrap();
        assert_eq!(c, tiny_b158_config());
        // 384·128 embedding + 128 output norm + 2 × (128·128·2 + 128·64·2 + 128·256·3 +
        // 2·128 norms + 128 + 256 sub-norms).
        assert_eq!(c.parameter_count(), 345_472);
        assert_eq!(c.expected_tensors().len(), 3 + 2 * 11);
    }

    #[test]
    fn bitnet_with_scales_and_untied_output_config() {
        let spec = SynthSpec {
            weight_scales: true,
            output: Some(Encoding::F16),
            ..SynthSpec::tiny(Architecture::Bitnet)
        };
        let f = GgufFile::from_bytes("bitnet.gguf", spec.to_bytes().unwrap()).unwrap();
        assert_eq!(f.tensor("blk.1.ffn_down.scale").unwrap().dims, [1]);
        assert_eq!(f.tensor("output.weight").unwrap().type_name, "F16");
        let c = ModelConfig::from_gguf(&f).unwrap();
        assert_eq!(
            c,
            ModelConfig {
                architecture: Architecture::Bitnet,
                name: Some("synthetic-bitnet".into()),
                ffn_activation: Activation::Silu,
                tied_output: false,
                weight_scales: true,
                ..tiny_b158_config()
            }
        );
        // The b1.58 count plus the 384·128 output head; the scales are not required tensors.
        assert_eq!(c.parameter_count(), 345_472 + 49_152);
        let expected = c.expected_tensors();
        let scales: Vec<&ExpectedTensor> = expected
            .iter()
            .filter(|e| e.name.ends_with(".scale"))
            .collect();
        assert_eq!(scales.len(), 2 * 7);
        assert!(
            scales
                .iter()
                .all(|e| e.dims == [1] && !e.required && !e.is_matrix)
        );
        // One scale tensor is enough to say the model has scales; none means none.
        let plain = SynthSpec::tiny(Architecture::Bitnet);
        let one = config_after(&plain, |_, tensors| {
            tensors.push(Tensor {
                data: Some(Encoding::F32.encode(&[0.5]).unwrap()),
                ..Tensor::new("blk.0.attn_v.scale", &[1], 0)
            });
        })
        .unwrap();
        assert!(one.weight_scales && one.tied_output);
        let none = config_after(&plain, |_, _| {}).unwrap();
        assert!(!none.weight_scales && none.tied_output);
        assert_eq!(none.ffn_activation, Activation::Silu);
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let err = error_after(&b158(), |_, t| remove_tensor(t, "blk.1.ffn_up.weight"));
        assert_eq!(
            err,
            ModelError::MissingTensor {
                tensor: "blk.1.ffn_up.weight".into(),
                arch: "bitnet-b1.58".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "tensor 'blk.1.ffn_up.weight' is missing (architecture bitnet-b1.58 needs it)"
        );
        // The sub-norms are required by the SubLN architectures.
        let err = error_after(&b158(), |_, t| {
            remove_tensor(t, "blk.0.attn_sub_norm.weight")
        });
        assert!(
            matches!(&err, ModelError::MissingTensor { tensor, .. } if tensor == "blk.0.attn_sub_norm.weight"),
            "{err}"
        );
        // The embedding is looked up before the block tensors.
        let err = error_after(&b158(), |_, t| remove_tensor(t, "token_embd.weight"));
        assert_eq!(
            err,
            ModelError::MissingTensor {
                tensor: "token_embd.weight".into(),
                arch: "bitnet-b1.58".into()
            }
        );
    }

    #[test]
    fn a_tensor_with_wrong_dims_is_named_with_the_expected_dims() {
        for wrong in [[128u64, 128], [64, 128]] {
            let err = error_after(&b158(), |_, tensors| {
                let t = tensors
                    .iter_mut()
                    .find(|t| t.name == "blk.0.attn_k.weight")
                    .unwrap();
                t.dims = wrong.to_vec();
                t.data = None;
            });
            assert_eq!(
                err,
                ModelError::TensorShape {
                    tensor: "blk.0.attn_k.weight".into(),
                    expected: vec![128, 64],
                    found: wrong.to_vec(),
                }
            );
            assert_eq!(
                err.to_string(),
                format!("tensor 'blk.0.attn_k.weight' has dims {wrong:?}, expected [128, 64]")
            );
        }
        // A norm of the wrong length.
        let err = error_after(&b158(), |_, tensors| {
            let t = tensors
                .iter_mut()
                .find(|t| t.name == "blk.1.ffn_sub_norm.weight")
                .unwrap();
            t.dims = vec![128];
            t.data = None;
        });
        assert_eq!(
            err,
            ModelError::TensorShape {
                tensor: "blk.1.ffn_sub_norm.weight".into(),
                expected: vec![256],
                found: vec![128],
            }
        );
        // Trailing ggml 1s are the same shape.
        let ok = config_after(&b158(), |_, tensors| {
            let t = tensors
                .iter_mut()
                .find(|t| t.name == "output_norm.weight")
                .unwrap();
            t.dims = vec![128, 1];
        });
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn an_unexpected_tensor_is_refused_by_name() {
        for (name, dims) in [
            ("blk.0.attn_q.bias", &[128u64][..]),
            // Scales belong to architecture `bitnet` only.
            ("blk.0.attn_q.scale", &[1][..]),
            // A block past block_count.
            ("blk.2.attn_norm.weight", &[128][..]),
        ] {
            let err = error_after(&b158(), |_, t| t.push(Tensor::new(name, dims, 0)));
            assert_eq!(
                err,
                ModelError::UnexpectedTensor {
                    tensor: name.into(),
                    arch: "bitnet-b1.58".into()
                }
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "tensor '{name}' is not used by architecture bitnet-b1.58; bitnetc refuses to ignore weights"
                )
            );
        }
    }

    #[test]
    fn an_unknown_architecture_is_named() {
        let err = error_after(&b158(), |kvs, _| {
            set(kvs, "general.architecture", Value::str("gpt2"))
        });
        assert_eq!(
            err,
            ModelError::UnsupportedArchitecture {
                arch: "gpt2".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "architecture 'gpt2' is not supported: bitnetc runs bitnet-b1.58, bitnet-25, bitnet and llama"
        );
        // The name must be a string.
        let err = error_after(&b158(), |kvs, _| {
            set(kvs, "general.architecture", Value::U32(1))
        });
        assert_eq!(
            err,
            ModelError::KeyType {
                key: "general.architecture".into(),
                expected: "a string",
                found: "u32".into()
            }
        );
    }

    #[test]
    fn head_count_kv_must_divide_head_count() {
        for kv in [3u32, 0, 8] {
            let err = error_after(&b158(), |kvs, _| {
                set(kvs, "bitnet-b1.58.attention.head_count_kv", Value::U32(kv))
            });
            assert_eq!(
                err,
                ModelError::BadValue {
                    key: "bitnet-b1.58.attention.head_count_kv".into(),
                    value: kv.to_string(),
                    reason: "must divide attention.head_count = 4".into(),
                }
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "metadata key 'bitnet-b1.58.attention.head_count_kv' = {kv}: must divide attention.head_count = 4"
                )
            );
        }
        // Absent, it defaults to head_count: then the K and V matrices are the wrong size.
        let err = error_after(&b158(), |kvs, _| {
            remove_key(kvs, "bitnet-b1.58.attention.head_count_kv")
        });
        assert_eq!(
            err,
            ModelError::TensorShape {
                tensor: "blk.0.attn_k.weight".into(),
                expected: vec![128, 128],
                found: vec![128, 64],
            }
        );
    }

    #[test]
    fn a_missing_required_key_is_named() {
        for key in [
            "general.architecture",
            "bitnet-b1.58.embedding_length",
            "bitnet-b1.58.block_count",
            "bitnet-b1.58.feed_forward_length",
            "bitnet-b1.58.attention.head_count",
            "bitnet-b1.58.context_length",
            "bitnet-b1.58.attention.layer_norm_rms_epsilon",
        ] {
            let err = error_after(&b158(), |kvs, _| remove_key(kvs, key));
            assert_eq!(
                err,
                ModelError::MissingKey {
                    key: key.into(),
                    hint: String::new()
                }
            );
            assert_eq!(err.to_string(), format!("metadata key '{key}' is missing"));
        }
        // Present but of the wrong type, or zero.
        let key = "bitnet-b1.58.feed_forward_length";
        let err = error_after(&b158(), |kvs, _| set(kvs, key, Value::str("256")));
        assert_eq!(
            err,
            ModelError::KeyType {
                key: key.into(),
                expected: "an integer",
                found: "str".into()
            }
        );
        assert_eq!(
            err.to_string(),
            format!("metadata key '{key}' is str, expected an integer")
        );
        let err = error_after(&b158(), |kvs, _| set(kvs, key, Value::U64(0)));
        assert_eq!(
            err,
            ModelError::BadValue {
                key: key.into(),
                value: "0".into(),
                reason: "must be positive".into()
            }
        );
    }

    #[test]
    fn norms_must_be_float() {
        let err = error_after(&b158(), |_, tensors| {
            let t = tensors
                .iter_mut()
                .find(|t| t.name == "blk.0.ffn_sub_norm.weight")
                .unwrap();
            t.type_id = 8;
            t.data = None;
        });
        assert_eq!(
            err,
            ModelError::TensorType {
                tensor: "blk.0.ffn_sub_norm.weight".into(),
                type_name: "Q8_0".into(),
                reason: "norm and scale vectors must be F32, F16 or BF16".into(),
            }
        );
    }
}
