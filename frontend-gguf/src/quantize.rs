//! `bitnetc quantize`: rewrite a model's linear layers in a ternary encoding.
//!
//! Rules, as bitnet.cpp's `llama-quantize … I2_S` applies them (FORMATS.md §6): the seven
//! matrices of every block become ternary; `token_embd` (and an untied `output`) take the
//! embedding type, F16 by default; norms and every other tensor are copied unchanged. Float
//! weights that are already ternary × scale (bitnet.cpp's F32 files) are packed as they are;
//! other float weights are ternarized with absmean first, as bitnet.cpp's preprocessing does.

use crate::error::GgufError;
use crate::gguf::{GgufFile, TensorInfo};
use crate::types;
use crate::writer::{GgufWriter, Value, write_atomic};
use bitnetc_ir::Encoding;
use bitnetc_ir::encoding::{self, QK_K};
use serde::Serialize;
use std::path::Path;

/// What to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// I2_S, TQ2_0 or TQ1_0 (absmean-ternarized first), or Q8_0, Q4_0 or Q4_1.
    pub weights: Encoding,
    /// F16 or Q8_0, for `token_embd` and `output`.
    pub embedding: Encoding,
}

/// What happened to one tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorOutcome {
    pub name: String,
    pub from: String,
    pub to: String,
    /// Empty when the tensor was packed as it was; otherwise what was done to it and why.
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuantizeReport {
    pub tensors: Vec<TensorOutcome>,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// The block matrices that become ternary.
fn is_block_matrix(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("blk.") else {
        return false;
    };
    let Some((_layer, tail)) = rest.split_once('.') else {
        return false;
    };
    matches!(
        tail,
        "attn_q.weight"
            | "attn_k.weight"
            | "attn_v.weight"
            | "attn_output.weight"
            | "ffn_gate.weight"
            | "ffn_up.weight"
            | "ffn_down.weight"
    )
}

enum Plan {
    Copy,
    Convert { to: Encoding },
}

/// Quantizes `input` into `out` (written atomically). `progress(i, n, name)` is called before
/// each tensor.
pub fn quantize(
    input: &GgufFile,
    out: &Path,
    opts: QuantizeOptions,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<QuantizeReport, GgufError> {
    assert!(
        opts.weights.is_ternary()
            || matches!(
                opts.weights,
                Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1
            ),
        "quantize targets a ternary or block encoding"
    );
    let io_err = |source| GgufError::Io {
        path: out.to_path_buf(),
        source,
    };
    let mut writer = GgufWriter::new();
    for (k, v) in input.metadata() {
        writer.set(k, Value::from(v));
    }
    writer.set(
        "general.file_type",
        Value::U32(types::file_type_of(opts.weights)),
    );
    writer.set("general.quantization_version", Value::U32(2));

    let mut plans = Vec::new();
    let mut outcomes = Vec::new();
    for t in input.tensors() {
        let (plan, note) = plan_tensor(input, t, opts)?;
        let to = match plan {
            Plan::Copy => {
                writer
                    .add_tensor_type_id(&t.name, &t.dims, t.type_id, input.layout().type_table)
                    .map_err(io_err)?;
                t.type_name.to_string()
            }
            Plan::Convert { to } => {
                writer.add_tensor(&t.name, &t.dims, to).map_err(io_err)?;
                types::lookup(types::TypeTable::BitnetCpp, types::id_of(to))
                    .map_or(to.name().into(), |ty| ty.name.into())
            }
        };
        outcomes.push(TensorOutcome {
            name: t.name.clone(),
            from: t.type_name.into(),
            to,
            note,
        });
        plans.push(plan);
    }

    let n = plans.len();
    let written = write_atomic(out, |w| {
        let mut stream = writer.begin(w)?;
        for (i, (t, plan)) in input.tensors().iter().zip(&plans).enumerate() {
            progress(i, n, &t.name);
            match plan {
                Plan::Copy => stream.write_tensor(input.tensor_data(t))?,
                Plan::Convert { to } => {
                    let (bytes, note) = convert(input, t, *to).map_err(std::io::Error::other)?;
                    if let Some(note) = note {
                        outcomes[i].note = note.to_string();
                    }
                    stream.write_tensor(&bytes)?;
                }
            }
        }
        stream.finish()?;
        Ok(())
    });
    written.map_err(|e| match e.downcast::<GgufError>() {
        Ok(g) => g,
        Err(e) => io_err(e),
    })?;
    let output_bytes = std::fs::metadata(out).map_err(io_err)?.len();
    Ok(QuantizeReport {
        tensors: outcomes,
        input_bytes: input.file_size(),
        output_bytes,
    })
}

fn plan_tensor(
    input: &GgufFile,
    t: &TensorInfo,
    opts: QuantizeOptions,
) -> Result<(Plan, String), GgufError> {
    let unsupported = |why: String| {
        input.model_error(crate::error::ModelError::TensorType {
            tensor: t.name.clone(),
            type_name: t.type_name.into(),
            reason: why,
        })
    };
    let target = if t.name == "token_embd.weight" || t.name == "output.weight" {
        opts.embedding
    } else if is_block_matrix(&t.name) {
        opts.weights
    } else {
        return Ok((Plan::Copy, String::new()));
    };
    let Some(from) = t.encoding() else {
        return Err(unsupported(
            "bitnetc cannot decode this type to re-quantize it".into(),
        ));
    };
    if from == target {
        return Ok((Plan::Copy, String::new()));
    }
    let ne0 = t.dims[0];
    if matches!(target, Encoding::TQ1_0 | Encoding::TQ2_0) && !ne0.is_multiple_of(QK_K as u64) {
        // llama.cpp keeps such tensors in F16; do the same, and say so.
        let note = format!("kept F16: rows of {ne0} are not a multiple of {QK_K}");
        return Ok(if from == Encoding::F16 {
            (Plan::Copy, note)
        } else {
            (Plan::Convert { to: Encoding::F16 }, note)
        });
    }
    if matches!(target, Encoding::Q8_0 | Encoding::Q4_0 | Encoding::Q4_1) && !ne0.is_multiple_of(32)
    {
        return Err(unsupported(format!(
            "{target} needs rows that are a multiple of 32, this one has {ne0}"
        )));
    }
    if target == Encoding::I2S && !t.n_elements().is_multiple_of(encoding::I2S_BLOCK as u64) {
        return Err(unsupported(format!(
            "I2_S needs a multiple of 128 elements, this tensor has {}",
            t.n_elements()
        )));
    }
    Ok((Plan::Convert { to: target }, String::new()))
}

/// The bytes of `t` in encoding `to`, and a note when the values had to be ternarized.
fn convert(
    input: &GgufFile,
    t: &TensorInfo,
    to: Encoding,
) -> Result<(Vec<u8>, Option<&'static str>), GgufError> {
    let from = t.encoding().expect("planned tensors are decodable");
    let n = t.n_elements();
    let enc_err = |source| GgufError::Encoding {
        path: input.path().to_path_buf(),
        tensor: t.name.clone(),
        source,
    };
    match (from, to) {
        (Encoding::I2S, Encoding::TQ2_0) => Ok((
            encoding::repack_i2s_to_tq2_0(input.tensor_data(t), n).map_err(enc_err)?,
            None,
        )),
        (Encoding::TQ2_0, Encoding::I2S) => Ok((
            encoding::repack_tq2_0_to_i2s(input.tensor_data(t), n).map_err(enc_err)?,
            None,
        )),
        _ => {
            let mut values = input.decode(t)?;
            let mut note = None;
            if to.is_ternary() && !encoding::is_ternary(&values) {
                if from.is_ternary() {
                    // TQ blocks with different scales: I2_S holds one scale per tensor, so only
                    // an exact repack is acceptable, and it reports the mismatch.
                    if to == Encoding::I2S {
                        let tq2 = Encoding::TQ2_0.encode(&values).map_err(enc_err)?;
                        return Ok((
                            encoding::repack_tq2_0_to_i2s(&tq2, n).map_err(enc_err)?,
                            None,
                        ));
                    }
                } else {
                    values = encoding::ternarize_absmean(&values);
                    note = Some("ternarized (absmean)");
                }
            }
            Ok((to.encode(&values).map_err(enc_err)?, note))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_matrices_are_recognized() {
        assert!(is_block_matrix("blk.0.attn_q.weight"));
        assert!(is_block_matrix("blk.29.ffn_down.weight"));
        assert!(!is_block_matrix("blk.0.attn_norm.weight"));
        assert!(!is_block_matrix("blk.0.attn_q.scale"));
        assert!(!is_block_matrix("token_embd.weight"));
    }
}
