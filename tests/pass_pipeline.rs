//! The whole pass pipeline: the IR of each architecture after every stage, bit-identical
//! logits before and after fusion on every fixture model, and the memory plan of a model with
//! the dimensions of BitNet b1.58 2B-4T.

use bitnetc::gguf::GgufFile;
use bitnetc::gguf::arch::{Architecture, ModelConfig};
use bitnetc::gguf::lower::{LowerOptions, lower};
use bitnetc::gguf::synth::SynthSpec;
use bitnetc::passes::{PassConfig, PassEvent, PassManager, PrintAfter, memory};
use bitnetc::runtime::exec::ExecOptions;
use bitnetc::{Backend, LoadOptions, load};
use bitnetc_tests::{TINY_MODELS, assert_bits_equal, fixture, shared_fixture};
use std::path::Path;

fn stages(spec: &SynthSpec) -> String {
    let file = GgufFile::from_bytes("synthetic.gguf", spec.to_bytes().unwrap()).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let mut graph = lower(&file, &config, &LowerOptions::default()).unwrap();
    let mut manager = PassManager::default_pipeline(&PassConfig::default());
    manager.print_after = PrintAfter::All;
    let mut out = String::new();
    manager
        .run(&mut graph, |e| {
            if let PassEvent::Printed { pass, ir } = e {
                out += &format!("--- after {pass} ---\n{ir}");
            }
        })
        .unwrap();
    let (plan, stats) = memory::plan(&graph).unwrap();
    memory::check(&plan).unwrap();
    out += &format!("--- plan ---\n{}", memory::describe(&plan, &stats));
    out
}

#[test]
fn every_stage_of_each_architecture() {
    for arch in Architecture::ALL {
        let spec = SynthSpec {
            layers: 1,
            ..SynthSpec::tiny(arch)
        };
        insta::assert_snapshot!(format!("stages_{arch}"), stages(&spec));
    }
}

/// Logits of `tokens` with the given passes and backend, in one step and one token per step.
fn logits(
    model: &Path,
    tokens: &[u32],
    passes: Option<Vec<String>>,
    backend: Backend,
) -> (Vec<f32>, Vec<f32>) {
    let m = load(
        model,
        LoadOptions {
            backend,
            context: Some(tokens.len()),
            passes,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    memory::check(m.engine.plan()).unwrap();
    let batch = m.engine.session().eval(tokens).unwrap();
    let mut s = m.engine.session();
    let seq = tokens.iter().flat_map(|&t| s.eval(&[t]).unwrap()).collect();
    (batch, seq)
}

/// The reference interpreter gives bit-identical logits on the lowered graph and on the fused
/// one (no fusion reorders float work), and so do the compiled kernels.
fn assert_fusion_is_exact(model: &Path, tokens: &[u32]) {
    let backends = [
        ("interpreter", Backend::Interpreter),
        ("compiled", Backend::Compiled(ExecOptions::default())),
    ];
    for (name, backend) in backends {
        let unfused = logits(model, tokens, Some(Vec::new()), backend.clone());
        let fused = logits(model, tokens, None, backend);
        let what = |mode: &str| format!("{} ({name}, {mode})", model.display());
        assert_bits_equal(&fused.0, &unfused.0, &what("one step"));
        assert_bits_equal(&fused.1, &unfused.1, &what("a token per step"));
    }
}

#[test]
fn fusion_changes_no_logit_on_the_tiny_models() {
    let tokens = [
        0, 370, 1768, 318, 76, 291, 83, 1486, 294, 80, 89, 1593, 468, 1454, 947, 272,
    ];
    for rel in TINY_MODELS {
        assert_fusion_is_exact(&fixture(rel), &tokens);
    }
}

#[test]
fn fusion_changes_no_logit_on_smollm2() {
    let Some(model) = shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    assert_fusion_is_exact(
        &model,
        &[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198],
    );
}

#[test]
fn synthetic_architectures_fuse_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let mut spec = SynthSpec::tiny(arch);
        if arch == Architecture::Bitnet {
            spec.weight_scales = true;
            spec.output = Some(bitnetc::ir::Encoding::Q8_0);
        }
        let path = dir.path().join(format!("{arch}.gguf"));
        std::fs::write(&path, spec.to_bytes().unwrap()).unwrap();
        assert_fusion_is_exact(&path, &[0, 5, 9, 200, 31, 7]);
    }
}

#[test]
fn memory_plan_of_the_2b_4t_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("2b4t.gguf");
    SynthSpec::bitnet_2b_4t().write_shape_only(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.file_size(), 1_183_074_944);
    let config = ModelConfig::from_gguf(&file).unwrap();
    let mut graph = lower(&file, &config, &LowerOptions::default()).unwrap();
    PassManager::default_pipeline(&PassConfig::default())
        .run(&mut graph, |_| {})
        .unwrap();
    let (plan, stats) = memory::plan(&graph).unwrap();
    memory::check(&plan).unwrap();
    eprintln!("{stats:?}");
    // 30 blocks of 4 linear ops, a split, 4 reshapes, 2 ropes, kv_append and attention; then
    // embed, the head and the output.
    assert_eq!(stats.steps, 30 * 13 + 3);
    // The largest moment: the head's 128256 f32 logits per token while its 2560-wide input is
    // alive.
    assert_eq!(stats.arena_bytes_per_token, 128_256 * 4 + 2560 * 4);
    assert_eq!((stats.arena_buffers, stats.peak_live_buffers), (302, 5));
    assert_eq!(stats.weight_buffers, 242);
}
