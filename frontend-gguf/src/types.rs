//! ggml tensor type ids, their byte sizes, and the id collisions between bitnet.cpp's fork of
//! llama.cpp and upstream llama.cpp (FORMATS.md §2).

use bitnetc_ir::Encoding;
use serde::Serialize;
use std::fmt;

/// How a type's byte size follows from a tensor's dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeRule {
    /// `n / block_elems * block_bytes`; rows (`ne0`) must be whole blocks.
    Blocks { elems: u32, bytes: u32 },
    /// bitnet.cpp I2_S and TL1: `n/4 + 32` (packed codes, then an f32 scale and padding).
    QuarterPlus32,
    /// bitnet.cpp TL2: `t = (ne0 − 256)·ne1/3·5/8 + 256·ne1/2·4/8`, padded to 32, `+ 32`.
    Tl2,
}

/// What bitnetc can do with tensors of a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Decoded and computed with this encoding.
    Compute(Encoding),
    /// Recognized by name and size, so `inspect` describes it, but no kernel reads it.
    DescribeOnly,
    /// Recognized and described, but refused when a model is loaded, for the given reason.
    Unusable(&'static str),
    /// Never valid in a file: a file that uses it is malformed.
    Invalid(&'static str),
}

/// One entry of a ggml type table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub size: SizeRule,
    pub support: Support,
}

/// Which meaning of the contested ids 31–39 a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TypeTable {
    /// ggml-org/llama.cpp: 31–33 and 36–38 retired, 39 = MXFP4.
    Upstream,
    /// microsoft/BitNet's llama.cpp fork: 36 = I2_S, 37 = I8_S, 38 = TL1, 39 = TL2.
    BitnetCpp,
}

impl fmt::Display for TypeTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TypeTable::Upstream => "upstream llama.cpp",
            TypeTable::BitnetCpp => "bitnet.cpp",
        })
    }
}

const TL_REFUSAL: &str = "TL1/TL2 weights are tiled with per-model kernel parameters (BM, BK, bm) that \
     bitnet.cpp generates at build time and the file does not store, so they cannot be decoded; \
     convert the original model to I2_S instead (bitnetc quantize --type i2_s)";

const fn blocks(id: u32, name: &'static str, elems: u32, bytes: u32, support: Support) -> GgmlType {
    GgmlType {
        id,
        name,
        size: SizeRule::Blocks { elems, bytes },
        support,
    }
}

const fn compute(id: u32, name: &'static str, elems: u32, bytes: u32, e: Encoding) -> GgmlType {
    blocks(id, name, elems, bytes, Support::Compute(e))
}

const fn describe(id: u32, name: &'static str, elems: u32, bytes: u32) -> GgmlType {
    blocks(id, name, elems, bytes, Support::DescribeOnly)
}

/// Ids 0–30 and 34–35 mean the same in both tables.
const COMMON: &[GgmlType] = &[
    compute(0, "F32", 1, 4, Encoding::F32),
    compute(1, "F16", 1, 2, Encoding::F16),
    compute(2, "Q4_0", 32, 18, Encoding::Q4_0),
    compute(3, "Q4_1", 32, 20, Encoding::Q4_1),
    describe(6, "Q5_0", 32, 22),
    describe(7, "Q5_1", 32, 24),
    compute(8, "Q8_0", 32, 34, Encoding::Q8_0),
    describe(9, "Q8_1", 32, 40),
    describe(10, "Q2_K", 256, 84),
    describe(11, "Q3_K", 256, 110),
    describe(12, "Q4_K", 256, 144),
    describe(13, "Q5_K", 256, 176),
    describe(14, "Q6_K", 256, 210),
    describe(15, "Q8_K", 256, 292),
    describe(16, "IQ2_XXS", 256, 66),
    describe(17, "IQ2_XS", 256, 74),
    describe(18, "IQ3_XXS", 256, 98),
    describe(19, "IQ1_S", 256, 50),
    describe(20, "IQ4_NL", 32, 18),
    describe(21, "IQ3_S", 256, 110),
    describe(22, "IQ2_S", 256, 82),
    describe(23, "IQ4_XS", 256, 136),
    describe(24, "I8", 1, 1),
    describe(25, "I16", 1, 2),
    describe(26, "I32", 1, 4),
    describe(27, "I64", 1, 8),
    describe(28, "F64", 1, 8),
    describe(29, "IQ1_M", 256, 56),
    compute(30, "BF16", 1, 2, Encoding::BF16),
    compute(34, "TQ1_0", 256, 54, Encoding::TQ1_0),
    compute(35, "TQ2_0", 256, 66, Encoding::TQ2_0),
];

const BITNET_CPP: &[GgmlType] = &[
    describe(31, "Q4_0_4_4", 32, 18),
    describe(32, "Q4_0_4_8", 32, 18),
    describe(33, "Q4_0_8_8", 32, 18),
    GgmlType {
        id: 36,
        name: "I2_S",
        size: SizeRule::QuarterPlus32,
        support: Support::Compute(Encoding::I2S),
    },
    GgmlType {
        id: 37,
        name: "I8_S",
        size: SizeRule::Blocks { elems: 1, bytes: 1 },
        support: Support::Invalid(
            "I8_S is bitnet.cpp's internal activation type and is never stored in a model file",
        ),
    },
    GgmlType {
        id: 38,
        name: "TL1",
        size: SizeRule::QuarterPlus32,
        support: Support::Unusable(TL_REFUSAL),
    },
    GgmlType {
        id: 39,
        name: "TL2",
        size: SizeRule::Tl2,
        support: Support::Unusable(TL_REFUSAL),
    },
];

const UPSTREAM: &[GgmlType] = &[describe(39, "MXFP4", 32, 17)];

/// Ids that upstream retired: files using them are refused by upstream readers.
const UPSTREAM_RETIRED: &[(u32, &str)] = &[
    (4, "Q4_2"),
    (5, "Q4_3"),
    (31, "Q4_0_4_4"),
    (32, "Q4_0_4_8"),
    (33, "Q4_0_8_8"),
    (36, "IQ4_NL_4_4"),
    (37, "IQ4_NL_4_8"),
    (38, "IQ4_NL_8_8"),
];

/// The ids whose meaning depends on the table (34 and 35, TQ1_0 and TQ2_0, agree).
pub fn is_contested(id: u32) -> bool {
    matches!(id, 31..=33 | 36..=39)
}

/// Looks up a type id in a table. `Err` carries a description for an id the table does not
/// define (retired or unknown).
pub fn lookup(table: TypeTable, id: u32) -> Result<GgmlType, String> {
    let specific = match table {
        TypeTable::Upstream => UPSTREAM,
        TypeTable::BitnetCpp => BITNET_CPP,
    };
    if let Some(t) = COMMON.iter().chain(specific).find(|t| t.id == id) {
        return Ok(*t);
    }
    if let Some((_, name)) = UPSTREAM_RETIRED.iter().find(|(i, _)| *i == id) {
        return Err(format!(
            "type id {id} ({name}) was removed from GGUF by llama.cpp"
        ));
    }
    Err(format!(
        "unknown ggml type id {id} (this {table} table knows ids 0-39)"
    ))
}

fn overflow(ty: &GgmlType) -> String {
    format!("its size in {} does not fit in 64 bits", ty.name)
}

/// A tensor's byte size under a type, or why its dims do not fit the type.
pub fn byte_size(ty: &GgmlType, dims: &[u64]) -> Result<u64, String> {
    let ne0 = dims.first().copied().unwrap_or(1);
    let n: u64 = dims.iter().product();
    match ty.size {
        SizeRule::Blocks { elems, bytes } => {
            if !ne0.is_multiple_of(elems as u64) {
                return Err(format!(
                    "{} stores rows in blocks of {elems} elements, but the row length (ne0) is {ne0}",
                    ty.name
                ));
            }
            (n / elems as u64)
                .checked_mul(bytes as u64)
                .ok_or_else(|| overflow(ty))
        }
        SizeRule::QuarterPlus32 => {
            if !n.is_multiple_of(128) {
                return Err(format!(
                    "{} packs 128-element blocks, but the tensor has {n} elements",
                    ty.name
                ));
            }
            Ok(n / 4 + 32)
        }
        SizeRule::Tl2 => {
            let ne1 = n / ne0.max(1);
            if ne0 < 256 {
                return Err(format!(
                    "TL2 needs rows of at least 256 elements, got {ne0}"
                ));
            }
            let (ne0, ne1) = (ne0 as u128, ne1 as u128);
            let t = (ne0 - 256) * ne1 / 3 * 5 / 8 + 256 * ne1 / 2 * 4 / 8;
            u64::try_from(t.div_ceil(32) * 32 + 32).map_err(|_| overflow(ty))
        }
    }
}

/// Upstream llama.cpp `general.file_type` (`llama_ftype`) of a whole-file quantization, as
/// bitnet.cpp's fork numbers it for I2_S.
pub fn file_type_of(encoding: Encoding) -> u32 {
    match encoding {
        Encoding::F32 => 0,
        Encoding::F16 => 1,
        Encoding::Q4_0 => 2,
        Encoding::Q4_1 => 3,
        Encoding::Q8_0 => 7,
        Encoding::BF16 => 32,
        Encoding::TQ1_0 => 36,
        Encoding::TQ2_0 => 37,
        Encoding::I2S => 40,
    }
}

/// The type id a tensor of this encoding is written with (I2_S under the bitnet.cpp table).
pub fn id_of(encoding: Encoding) -> u32 {
    COMMON
        .iter()
        .chain(BITNET_CPP)
        .find(|t| t.support == Support::Compute(encoding))
        .map(|t| t.id)
        .expect("every encoding has a ggml type id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contested_ids_differ_between_tables() {
        assert_eq!(lookup(TypeTable::BitnetCpp, 36).unwrap().name, "I2_S");
        assert!(
            lookup(TypeTable::Upstream, 36)
                .unwrap_err()
                .contains("IQ4_NL_4_4")
        );
        assert_eq!(lookup(TypeTable::BitnetCpp, 39).unwrap().name, "TL2");
        assert_eq!(lookup(TypeTable::Upstream, 39).unwrap().name, "MXFP4");
        assert_eq!(lookup(TypeTable::Upstream, 35).unwrap().name, "TQ2_0");
        assert!(
            lookup(TypeTable::Upstream, 77)
                .unwrap_err()
                .contains("unknown")
        );
    }

    #[test]
    fn sizes_follow_the_fork_rules() {
        let i2s = lookup(TypeTable::BitnetCpp, 36).unwrap();
        assert_eq!(byte_size(&i2s, &[2560, 6912]).unwrap(), 4_423_712);
        let tl2 = lookup(TypeTable::BitnetCpp, 39).unwrap();
        // t = (3200 − 256)·8640/3·5/8 + 256·8640/2·4/8 = 5_299_200 + 552_960.
        assert_eq!(byte_size(&tl2, &[3200, 8640]).unwrap(), 5_852_160 + 32);
        let q8 = lookup(TypeTable::Upstream, 8).unwrap();
        assert!(
            byte_size(&q8, &[48, 2])
                .unwrap_err()
                .contains("blocks of 32")
        );
        assert_eq!(byte_size(&q8, &[64, 3]).unwrap(), 6 * 34);
    }

    #[test]
    fn every_encoding_has_an_id() {
        for e in Encoding::ALL {
            let id = id_of(e);
            let t = lookup(TypeTable::BitnetCpp, id).unwrap();
            assert_eq!(t.support, Support::Compute(e));
        }
    }
}
