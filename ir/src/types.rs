//! Element types, symbolic dimensions and tensor types of IR values.

use crate::encoding::Encoding;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a value. Weights in block encodings are `Packed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I8,
    I32,
    /// A block-encoded weight (Q8_0, Q4_0, Q4_1, TQ1_0, TQ2_0, I2_S).
    Packed(Encoding),
}

impl DType {
    /// The dtype of a weight stored in `e`.
    pub fn of_encoding(e: Encoding) -> DType {
        match e {
            Encoding::F32 => DType::F32,
            Encoding::F16 => DType::F16,
            Encoding::BF16 => DType::BF16,
            e => DType::Packed(e),
        }
    }

    /// The encoding a weight of this dtype is stored in.
    pub fn encoding(self) -> Option<Encoding> {
        match self {
            DType::F32 => Some(Encoding::F32),
            DType::F16 => Some(Encoding::F16),
            DType::BF16 => Some(Encoding::BF16),
            DType::Packed(e) => Some(e),
            DType::I8 | DType::I32 => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I32 => "i32",
            DType::Packed(e) => e.name(),
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        match s {
            "i8" => Some(DType::I8),
            "i32" => Some(DType::I32),
            s => Encoding::from_name(s).map(DType::of_encoding),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a constant, or a symbol bound at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    Fixed(u64),
    /// Tokens evaluated in this step.
    T,
    /// Positions already in the KV cache before this step.
    P,
    /// `P + T`: every position the step attends to.
    Ctx,
}

impl Dim {
    /// The value of the dimension for `t` tokens after `p` cached positions.
    pub fn eval(self, t: usize, p: usize) -> usize {
        match self {
            Dim::Fixed(n) => n as usize,
            Dim::T => t,
            Dim::P => p,
            Dim::Ctx => p + t,
        }
    }

    pub fn fixed(self) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::T => f.write_str("T"),
            Dim::P => f.write_str("P"),
            Dim::Ctx => f.write_str("P+T"),
        }
    }
}

impl std::str::FromStr for Dim {
    type Err = String;

    fn from_str(s: &str) -> Result<Dim, String> {
        match s {
            "T" => Ok(Dim::T),
            "P" => Ok(Dim::P),
            "P+T" => Ok(Dim::Ctx),
            n => n
                .parse()
                .map(Dim::Fixed)
                .map_err(|_| format!("bad dimension '{n}'")),
        }
    }
}

/// The type of a value: element type and row-major shape (the last dim is contiguous).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<Dim>>) -> TensorType {
        TensorType {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The shape for `t` tokens after `p` cached positions.
    pub fn eval_shape(&self, t: usize, p: usize) -> Vec<usize> {
        self.shape.iter().map(|d| d.eval(t, p)).collect()
    }

    /// Number of elements, or `None` when a dim is symbolic.
    pub fn fixed_len(&self) -> Option<u64> {
        self.shape.iter().map(|d| d.fixed()).product()
    }

    /// The last dimension.
    pub fn last(&self) -> Option<Dim> {
        self.shape.last().copied()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl std::str::FromStr for TensorType {
    type Err = String;

    fn from_str(s: &str) -> Result<TensorType, String> {
        let (dtype, rest) = s
            .split_once('[')
            .ok_or_else(|| format!("bad type '{s}': expected dtype[dims]"))?;
        let dims = rest
            .strip_suffix(']')
            .ok_or_else(|| format!("bad type '{s}': missing ']'"))?;
        let dtype = DType::from_name(dtype).ok_or_else(|| format!("unknown dtype '{dtype}'"))?;
        let shape = if dims.is_empty() {
            Vec::new()
        } else {
            dims.split(',')
                .map(|d| d.trim().parse())
                .collect::<Result<Vec<Dim>, _>>()?
        };
        Ok(TensorType { dtype, shape })
    }
}

/// The gate activation of a gated FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `relu(x)²`
    Relu2,
    /// `x·sigmoid(x)`
    Silu,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
        }
    }

    pub fn from_name(s: &str) -> Option<Activation> {
        [Activation::Relu2, Activation::Silu]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

/// How a dot product against f16 (or bf16) data is evaluated. The reference engines take
/// different paths, and each path rounds and sums differently:
/// - ggml's GEMV (`ggml_vec_dot_f16`) first converts the other operand to the half type;
/// - llamafile's GEMM (tinyBLAS), which ggml tries first when a step has several tokens, takes
///   the other operand either converted (upstream llama.cpp) or in f32 (bitnet.cpp's older
///   copy), and sums in 16 lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HalfPath {
    /// The other operand stays f32; the dot is accumulated in f64.
    F32,
    /// Always ggml's GEMV.
    Gemv,
    /// GEMV for one token; for several, tinyBLAS on operands converted to the half type.
    Gemm16,
    /// GEMV for one token; for several, tinyBLAS with the other operand kept in f32.
    Gemm32,
}

/// The path a [`HalfPath`] takes in a step of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotPath {
    F32,
    Gemv,
    Gemm { round: bool },
}

impl HalfPath {
    pub const ALL: [HalfPath; 4] = [
        HalfPath::F32,
        HalfPath::Gemv,
        HalfPath::Gemm16,
        HalfPath::Gemm32,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HalfPath::F32 => "f32",
            HalfPath::Gemv => "gemv",
            HalfPath::Gemm16 => "gemm16",
            HalfPath::Gemm32 => "gemm32",
        }
    }

    pub fn from_name(s: &str) -> Option<HalfPath> {
        HalfPath::ALL.into_iter().find(|h| h.name() == s)
    }

    /// The path for a step of `t` tokens.
    pub fn path(self, t: usize) -> DotPath {
        match self {
            HalfPath::F32 => DotPath::F32,
            HalfPath::Gemv => DotPath::Gemv,
            _ if t == 1 => DotPath::Gemv,
            HalfPath::Gemm16 => DotPath::Gemm { round: true },
            HalfPath::Gemm32 => DotPath::Gemm { round: false },
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Pairs `(x[i], x[i + d/2])` (GPT-NeoX; BitNet).
    Neox,
    /// Pairs `(x[2i], x[2i + 1])` (llama GGUFs, whose Q/K rows were permuted by the converter).
    Norm,
}

impl RopeStyle {
    pub fn name(self) -> &'static str {
        match self {
            RopeStyle::Neox => "neox",
            RopeStyle::Norm => "norm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_print_and_parse() {
        for s in [
            "f32[T,2560]",
            "i2_s[640,2560]",
            "f16[P+T,5,128]",
            "i8[T,256]",
            "f32[1]",
            "q4_1[1536,576]",
        ] {
            let t: TensorType = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
        }
        assert_eq!(
            "f32[T,8]".parse::<TensorType>().unwrap().eval_shape(3, 5),
            vec![3, 8]
        );
        assert_eq!(Dim::Ctx.eval(3, 5), 8);
        assert!("x9[1]".parse::<TensorType>().is_err());
        assert!("f32[Q]".parse::<TensorType>().is_err());
    }
}
