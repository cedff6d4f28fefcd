//! `bitnetc quantize`, `compile`, `logits` and `gen-model`.

use super::{Result, human_bytes};
use crate::{
    CompileArgs, EmbeddingType, Emit, GenModelArgs, Like, LogitsArgs, Mode, QuantizeArgs,
    WeightType,
};
use bitnetc::gguf::GgufFile;
use bitnetc::gguf::quantize::{self, QuantizeOptions};
use bitnetc::ir::Encoding;

pub fn quantize_cmd(a: QuantizeArgs) -> Result<()> {
    let input = GgufFile::open(&a.input)?;
    let opts = QuantizeOptions {
        weights: match a.weight_type {
            WeightType::I2S => Encoding::I2S,
            WeightType::Tq2_0 => Encoding::TQ2_0,
            WeightType::Tq1_0 => Encoding::TQ1_0,
        },
        embedding: match a.embedding_type {
            EmbeddingType::F16 => Encoding::F16,
            EmbeddingType::Q8_0 => Encoding::Q8_0,
        },
    };
    let bar = indicatif::ProgressBar::new(input.tensors().len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors  {msg}")
            .expect("valid template"),
    );
    let report = quantize::quantize(&input, &a.output, opts, |i, _, name| {
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
    });
    bar.finish_and_clear();
    let report = report?;
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for t in &report.tensors {
        *counts.entry(&t.to).or_default() += 1;
    }
    for t in report.tensors.iter().filter(|t| !t.note.is_empty()) {
        eprintln!("{}: {} -> {}: {}", t.name, t.from, t.to, t.note);
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "wrote {} ({} tensors: {}), {} -> {}",
        a.output.display(),
        report.tensors.len(),
        counts.join(", "),
        human_bytes(report.input_bytes),
        human_bytes(report.output_bytes)
    );
    Ok(())
}

pub fn compile(a: CompileArgs) -> Result<()> {
    let model = super::load(&a.model, a.kv_cache, None, None)?;
    match a.emit {
        Emit::Ir => print!("{}", bitnetc::ir::text::print(model.engine.graph())?),
    }
    Ok(())
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let tokens = a
        .tokens
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| format!("--tokens: '{s}' is not a token id"))
        })
        .collect::<std::result::Result<Vec<u32>, String>>()?;
    if tokens.is_empty() {
        return Err("--tokens: no token ids given".into());
    }
    let model = super::load(&a.model, a.kv_cache, Some(tokens.len()), None)?;
    let vocab = model.engine.vocab_size();
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!("--tokens: id {t} is outside the vocabulary of {vocab}").into());
    }
    let mut session = model.engine.session();
    let logits = match a.mode {
        Mode::Batch => session.eval(&tokens)?,
        Mode::Seq => {
            let mut all = Vec::with_capacity(tokens.len() * vocab);
            for &t in &tokens {
                all.extend(session.eval(&[t])?);
            }
            all
        }
    };
    bitnetc::npy::write_f32(&a.output, &[tokens.len(), vocab], &logits)
        .map_err(|e| format!("{}: {e}", a.output.display()))?;
    eprintln!(
        "wrote {} ({} x {} logits)",
        a.output.display(),
        tokens.len(),
        vocab
    );
    Ok(())
}

pub fn gen_model(a: GenModelArgs) -> Result<()> {
    use bitnetc::gguf::synth::SynthSpec;
    let spec = match a.like {
        Like::Bitnet2b4t => SynthSpec::bitnet_2b_4t(),
        Like::Tiny => SynthSpec::tiny(bitnetc::gguf::Architecture::BitnetB158),
    };
    let spec = SynthSpec {
        seed: a.seed,
        ..spec
    };
    let started = std::time::Instant::now();
    bitnetc::gguf::writer::write_atomic(&a.output, |w| spec.write(w))
        .map_err(|e| format!("{}: {e}", a.output.display()))?;
    let bytes = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {bytes} bytes) in {:.1} s",
        a.output.display(),
        human_bytes(bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
