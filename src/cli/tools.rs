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
            WeightType::Q8_0 => Encoding::Q8_0,
            WeightType::Q4_0 => Encoding::Q4_0,
            WeightType::Q4_1 => Encoding::Q4_1,
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
    use bitnetc::passes::{self, PassConfig, PassEvent, PassManager, PrintAfter};
    if let Some(out) = &a.output {
        return compile_plan(&a, out);
    }
    let file = bitnetc::gguf::GgufFile::open(&a.model)?;
    let config = bitnetc::gguf::ModelConfig::from_gguf(&file).map_err(|e| file.model_error(e))?;
    let lower_opts = bitnetc::gguf::lower::LowerOptions {
        kv_cache: a.kv_cache.dtype(),
    };
    let mut graph = bitnetc::gguf::lower::lower(&file, &config, &lower_opts)?;
    let pass_config = PassConfig::default();
    let mut manager = match &a.passes {
        Some(names) => PassManager::new(
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
            &pass_config,
        )?,
        None => PassManager::default_pipeline(&pass_config),
    };
    if a.emit == Emit::Ir {
        if a.passes.is_some()
            || !a.print_after.is_empty()
            || a.stop_after.is_some()
            || a.time_passes
        {
            return Err(
                "--emit ir prints the graph as lowered, before any pass; --passes, \
                        --print-after, --stop-after and --time-passes apply to --emit fused or plan"
                    .into(),
            );
        }
        print!("{}", bitnetc::ir::text::print(&graph)?);
        return Ok(());
    }
    manager.print_after = match a.print_after.as_slice() {
        [] => PrintAfter::None,
        [all] if all == "all" => PrintAfter::All,
        names => PrintAfter::Passes(names.to_vec()),
    };
    manager.stop_after = a.stop_after.clone();
    let mut timings = Vec::new();
    manager.run(&mut graph, |event| match event {
        PassEvent::Printed { pass, ir } => eprint!("--- IR after {pass} ---\n{ir}"),
        PassEvent::Ran {
            pass,
            rewrites,
            elapsed,
        } => timings.push((pass, rewrites, elapsed)),
    })?;
    if a.time_passes {
        let total: f64 = timings.iter().map(|t| t.2.as_secs_f64()).sum();
        eprintln!("{:<18} {:>10} {:>10}", "pass", "rewrites", "ms");
        for (pass, rewrites, elapsed) in &timings {
            eprintln!(
                "{pass:<18} {rewrites:>10} {:>10.3}",
                elapsed.as_secs_f64() * 1e3
            );
        }
        eprintln!("{:<18} {:>10} {:>10.3}", "total", "", total * 1e3);
    }
    match a.emit {
        Emit::Ir => unreachable!("printed above"),
        Emit::Fused => print!("{}", bitnetc::ir::text::print(&graph)?),
        Emit::Plan => {
            let (plan, stats) = passes::memory::plan(&graph)?;
            print!("{}", passes::memory::describe(&plan, &stats));
        }
    }
    Ok(())
}

/// `compile -o`: writes a `.bplan`.
fn compile_plan(a: &CompileArgs, out: &std::path::Path) -> Result<()> {
    use bitnetc::runtime::exec::ExecOptions;
    if !a.print_after.is_empty() || a.stop_after.is_some() {
        return Err(
            "--print-after and --stop-after print stages; they do not combine with -o".into(),
        );
    }
    let exec = super::ExecArgs {
        threads: a.threads,
        batch_size: 512,
        kernels: a.kernels,
        interp: false,
        trace_kernels: false,
        lm_head: a.lm_head,
        device: super::Device::Cpu,
        gpu_sessions: 1,
    };
    let bitnetc::Backend::Compiled(exec) = exec.backend()? else {
        unreachable!("not the interpreter")
    };
    let opts = bitnetc::bplan::CompileOptions {
        exec: ExecOptions { ..exec },
        lower: bitnetc::gguf::lower::LowerOptions {
            kv_cache: a.kv_cache.dtype(),
        },
        passes: a.passes.clone(),
        cuda_archs: if a.target == crate::Target::Cuda {
            a.cuda_arch.clone()
        } else {
            Vec::new()
        },
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} weights {msg}")
            .expect("valid template"),
    );
    let report = bitnetc::bplan::compile(&a.model, out, &opts, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    println!(
        "wrote {} ({}): compiled in {:.2} s, written in {:.2} s",
        out.display(),
        super::human_bytes(report.bytes),
        report.compile_seconds,
        report.write_seconds
    );
    if a.verbose {
        print!("{}", bitnetc::bplan::describe(out)?);
        let mut times = Vec::new();
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            let model = bitnetc::load(
                out,
                bitnetc::LoadOptions {
                    backend: bitnetc::Backend::Compiled(ExecOptions {
                        lm_head: None,
                        ..opts.exec.clone()
                    }),
                    lower: opts.lower,
                    ..Default::default()
                },
            )?;
            times.push(t0.elapsed().as_secs_f64());
            drop(model);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "load          {:.3} s (median of 5; {:.3}–{:.3})",
            times[2], times[0], times[4]
        );
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
    let model = super::load(
        Some(&a.model),
        a.kv_cache,
        Some(tokens.len()),
        None,
        &a.exec,
    )?;
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
    a.exec.print_trace(&model);
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
