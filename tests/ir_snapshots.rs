//! The lowered IR of a small synthetic model of each architecture, as `bitnetc compile --emit
//! ir` prints it. A change here is a change of the forward pass: review it.

use bitnetc::gguf::GgufFile;
use bitnetc::gguf::arch::{Architecture, ModelConfig};
use bitnetc::gguf::lower::{LowerOptions, lower};
use bitnetc::gguf::synth::SynthSpec;
use bitnetc::ir::{DType, Encoding};

fn lowered(spec: &SynthSpec, opts: LowerOptions) -> String {
    let file = GgufFile::from_bytes("synthetic.gguf", spec.to_bytes().unwrap()).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let graph = lower(&file, &config, &opts).unwrap();
    bitnetc::ir::text::print(&graph).unwrap()
}

fn one_layer(arch: Architecture) -> SynthSpec {
    SynthSpec {
        layers: 1,
        ..SynthSpec::tiny(arch)
    }
}

#[test]
fn bitnet_b158() {
    insta::assert_snapshot!(lowered(
        &one_layer(Architecture::BitnetB158),
        LowerOptions::default()
    ));
}

#[test]
fn bitnet_25_f32_cache() {
    insta::assert_snapshot!(lowered(
        &one_layer(Architecture::Bitnet25),
        LowerOptions {
            kv_cache: DType::F32
        }
    ));
}

#[test]
fn bitnet_with_scales_and_untied_head() {
    // TQ2_0 rows are 256-element blocks.
    let spec = SynthSpec {
        hidden: 256,
        ffn: 512,
        weights: Encoding::TQ2_0,
        weight_scales: true,
        output: Some(Encoding::Q8_0),
        ..one_layer(Architecture::Bitnet)
    };
    insta::assert_snapshot!(lowered(&spec, LowerOptions::default()));
}

#[test]
fn llama() {
    insta::assert_snapshot!(lowered(
        &one_layer(Architecture::Llama),
        LowerOptions::default()
    ));
}

#[test]
fn plans_round_trip_through_serde_and_back_to_the_graph() {
    use bitnetc::ir::plan::{Plan, Storage};
    for arch in Architecture::ALL {
        let spec = SynthSpec::tiny(arch);
        let file = GgufFile::from_bytes("synthetic.gguf", spec.to_bytes().unwrap()).unwrap();
        let config = ModelConfig::from_gguf(&file).unwrap();
        let graph = lower(&file, &config, &LowerOptions::default()).unwrap();
        let plan = Plan::from_graph(&graph).unwrap();
        let weights = plan
            .buffers
            .iter()
            .filter(|b| matches!(b.storage, Storage::Weight { .. }))
            .count();
        assert_eq!(weights, graph.weights().len());
        let json = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
        let again = back.to_graph().unwrap();
        bitnetc::ir::verify::verify(&again).unwrap();
        assert_eq!(
            bitnetc::ir::text::print(&again).unwrap(),
            bitnetc::ir::text::print(&graph).unwrap(),
            "{arch}"
        );
    }
}
