//! CUDA code generation on real plans: every fixture model's and the 2B-4T shape's kernels
//! render deterministically (the tiny I2_S model's module is a reviewed snapshot) and compile
//! to PTX for sm_80 and sm_90 with NVRTC (and assemble with ptxas, `BITNETC_PTXAS`). NVRTC is loaded at run time: without it the PTX test
//! says so and passes, unless `BITNETC_REQUIRE_NVRTC=1` (as in CI) makes its absence a failure.
//! The GPU executor runs every model on the GPU, or on a machine without one on the CUDA
//! emulator (`cuda_emu.h`, needs `c++`; `BITNETC_REQUIRE_CXX=1`, as in CI, makes its absence
//! a failure), against the CPU's logits.

use bitnetc::codegen_cuda::plan::plan_kernels;
use bitnetc::codegen_cuda::render::{KernelSpec, module};
use bitnetc::gguf::quantize::{QuantizeOptions, quantize};
use bitnetc::gguf::synth::SynthSpec;
use bitnetc::ir::Encoding;
use bitnetc::runtime::cuda::{Device, GpuOptions};
use bitnetc::{Backend, LoadOptions, load};
use bitnetc_tests::{TINY_MODELS, fixture};
use std::path::Path;
use std::sync::Arc;

mod cuda_emu;

fn kernels(path: &Path) -> Result<Vec<KernelSpec>, String> {
    let m = load(
        path,
        LoadOptions {
            backend: Backend::Interpreter,
            context: Some(16),
            ..LoadOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    plan_kernels(m.engine.plan()).map_err(|e| e.to_string())
}

/// The 2B-4T shape's kernels, planned from a sparse file with the real tensor table, with
/// its F16 head or (`head`) re-encoded.
fn kernels_2b(head: Option<Encoding>) -> Vec<KernelSpec> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("2b.gguf");
    SynthSpec::bitnet_2b_4t().write_shape_only(&path).unwrap();
    let m = load(
        &path,
        LoadOptions {
            backend: Backend::Interpreter,
            context: Some(16),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    bitnetc::codegen_cuda::plan::plan_kernels_with(m.engine.plan(), head).unwrap()
}

#[test]
fn the_tiny_i2s_module_renders_as_reviewed() {
    let k = kernels(&fixture("tiny/bitnetcpp-tiny-i2_s.gguf")).unwrap();
    let names: Vec<String> = k.iter().map(KernelSpec::name).collect();
    // The embedding; per layer: norm+quant and the fused QKV (and both in one kernel, for
    // one-token steps, and the rows in tiles of 8 tokens, for several), its split with both RoPEs and the KV append in one kernel, attention
    // (q rounded to f16 always, the probabilities for one-token steps: bitnet.cpp's GEMV and
    // f32 tinyBLAS; for one-token steps the split, RoPE and append in its score kernel),
    // norm+quant and the output projection with its residual, norm+quant and
    // gate/up with relu², norm+quant and down with its residual (each also in one kernel);
    // then the final norm, the head and argmax.
    let layer = [
        "norm_quant_k256_e3727c5ac",
        "ternary_k256_n384",
        "norm_quant_e3727c5ac_ternary_k256_n384",
        "ternary_t8_k256_n384",
        "qkv_rope_neox_append_f16_h8_g2_d32_r32_t48f42400",
        "attention_f16_h8_g2_d32_s3e3504f3_ra1",
        "qkv_rope_neox_scores_f16_h8_g2_d32_r32_t48f42400_s3e3504f3_ra",
        "norm_quant_k256_e3727c5ac",
        "ternary_k256_n256_res",
        "norm_quant_e3727c5ac_ternary_k256_n256_res",
        "ternary_t8_k256_n256_res",
        "norm_quant_k256_e3727c5ac",
        "ternary_k256_n1536_glu_relu2",
        "norm_quant_e3727c5ac_ternary_k256_n1536_glu_relu2",
        "ternary_t8_k256_n1536_glu_relu2",
        "norm_quant_k768_e3727c5ac",
        "ternary_k768_n256_res",
        "norm_quant_e3727c5ac_ternary_k768_n256_res",
        "ternary_t8_k768_n256_res",
    ];
    assert_eq!(names[0], "embed_f16_h256");
    assert_eq!(names.len(), 1 + 4 * layer.len() + 3, "{names:?}");
    for l in 0..4 {
        assert_eq!(
            names[1 + l * layer.len()..][..layer.len()],
            layer,
            "{names:?}"
        );
    }
    // The head takes the final norm's output in f32 for several tokens (tinyBLAS), rounded
    // to f16 for one.
    assert_eq!(
        names[names.len() - 3..],
        [
            "rms_norm_k256_e3727c5ac",
            "f16_rows_k256_n2048_r1",
            "argmax_v2048"
        ],
        "{names:?}"
    );
    let source = module(&k);
    assert_eq!(source, module(&k), "rendering is deterministic");
    insta::assert_snapshot!("tiny_i2s_module", source);
}

#[test]
fn unsupported_steps_are_named() {
    // An f32 KV cache has no CUDA kernel yet: the error names the step, the op and the type.
    let m = load(
        &fixture("tiny/bitnetcpp-tiny-i2_s.gguf"),
        LoadOptions {
            backend: Backend::Interpreter,
            context: Some(16),
            lower: bitnetc::gguf::lower::LowerOptions {
                kv_cache: bitnetc::ir::types::DType::F32,
            },
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let e = plan_kernels(m.engine.plan()).unwrap_err().to_string();
    assert!(
        e.contains("(kv_append): no CUDA kernel for a f32 KV cache yet"),
        "{e}"
    );
}

#[test]
fn every_kernel_compiles_to_ptx_for_sm80_and_sm90() {
    use bitnetc::codegen_cuda::nvrtc;
    let required = std::env::var("BITNETC_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if !nvrtc::available() {
        assert!(
            !required,
            "BITNETC_REQUIRE_NVRTC=1 but libnvrtc.so cannot be loaded"
        );
        eprintln!("SKIPPING: NVRTC is not installed (see .ci/run for the wheel)");
        return;
    }
    eprintln!("NVRTC {:?}", nvrtc::version().unwrap());
    let ptxas = ptxas();
    let q8_head = kernels_2b(Some(Encoding::Q8_0));
    assert!(
        q8_head
            .iter()
            .any(|k| k.name() == "q8_0_rows_k2560_n128256"),
        "{q8_head:?}"
    );
    let mut modules = vec![
        ("2B-4T shape".to_string(), module(&kernels_2b(None))),
        ("2B-4T shape, Q8_0 head".to_string(), module(&q8_head)),
    ];
    // Every fixture model has its kernels, and so have block-quantized ones.
    for rel in TINY_MODELS {
        let k = kernels(&fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        modules.push((rel.to_string(), module(&k)));
    }
    let dir = tempfile::tempdir().unwrap();
    let f16 = bitnetc::gguf::GgufFile::open(fixture("tiny/mainline-tiny-f16.gguf")).unwrap();
    for weights in [Encoding::Q8_0, Encoding::Q4_0, Encoding::Q4_1] {
        let path = dir.path().join(format!("{weights}.gguf"));
        let opts = QuantizeOptions {
            weights,
            embedding: Encoding::Q8_0,
        };
        quantize(&f16, &path, opts, |_, _, _| {}).unwrap();
        let source = module(&kernels(&path).unwrap());
        assert!(
            source.contains(&format!("{weights}_rows_k256_n384")),
            "{weights}"
        );
        assert!(source.contains("embed_q8_0_h256"), "{weights}");
        modules.push((format!("tiny {weights}"), source));
    }
    for (what, source) in &modules {
        for arch in ["sm_80", "sm_90"] {
            let ptx = nvrtc::compile_ptx(source, arch)
                .unwrap_or_else(|e| panic!("{what} for {arch}: {e}"));
            assert!(ptx.contains(&format!(".target {arch}")), "{what}");
            // Every kernel is in the PTX under its own name.
            for line in source
                .lines()
                .filter(|l| l.starts_with("extern \"C\" __global__ void "))
            {
                let name = line["extern \"C\" __global__ void ".len()..]
                    .split('(')
                    .next()
                    .unwrap();
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{what} {arch}: {name}"
                );
            }
            // The ternary dot is dp4a.
            if source.contains("ternary_row(w + ") {
                assert!(ptx.contains("dp4a.s32.s32"), "{what} {arch}");
            }
            // Every kernel waits for its inputs where it can be launched before they are
            // ready (programmatic dependent launch, sm_90).
            assert_eq!(
                bitnetc::codegen_cuda::render::every_kernel_awaits_inputs(&ptx),
                arch == "sm_90",
                "{what} {arch}"
            );
            if let Some(ptxas) = &ptxas {
                assemble(ptxas, &ptx, arch, what);
            }
        }
    }
    // The PTX cache: the first call compiles, the second reads the file.
    let dir = tempfile::tempdir().unwrap();
    let source = &modules[1].1;
    let (a, cached) = nvrtc::compile_ptx_cached(source, "sm_80", Some(dir.path())).unwrap();
    assert!(!cached);
    let (b, cached) = nvrtc::compile_ptx_cached(source, "sm_80", Some(dir.path())).unwrap();
    assert!(cached && a == b);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // An error in a kernel comes back with NVRTC's log.
    let e = nvrtc::compile_ptx(
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "sm_80",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("undefined_thing"), "{e}");
    assert!(
        nvrtc::compile_ptx("", "sm_12")
            .unwrap_err()
            .to_string()
            .contains("unknown GPU architecture")
    );
}

/// The PTX assembler named by `BITNETC_PTXAS` (CI: the `nvidia-cuda-nvcc-cu12` wheel's), which
/// checks what NVRTC passes through unread (inline PTX such as `griddepcontrol`) and that each
/// kernel assembles for its architecture; `BITNETC_REQUIRE_PTXAS=1` makes its absence a
/// failure.
fn ptxas() -> Option<std::path::PathBuf> {
    let required = std::env::var("BITNETC_REQUIRE_PTXAS").is_ok_and(|v| v == "1");
    match std::env::var_os("BITNETC_PTXAS") {
        Some(p) => Some(p.into()),
        None => {
            assert!(
                !required,
                "BITNETC_REQUIRE_PTXAS=1 but BITNETC_PTXAS is not set"
            );
            eprintln!("not assembling the PTX: BITNETC_PTXAS is not set (see .ci/run)");
            None
        }
    }
}

/// Assembles `ptx` for `arch` with `ptxas`, failing with its log.
fn assemble(ptxas: &Path, ptx: &str, arch: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("module.ptx");
    std::fs::write(&src, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .args(["--gpu-name", arch, "-o"])
        .arg(dir.path().join("module.cubin"))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", ptxas.display()));
    assert!(
        out.status.success(),
        "ptxas {what} for {arch}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// On a GPU: every fixture model (and llama.cpp's F16 one quantized to Q8_0, Q4_0 and Q4_1)
/// gives the CPU's logits within the
/// stated tolerance, for a prefill and for decode steps. The GPU follows the CPU's roundings
/// step by step (f16 operands as each ggml path rounds them, per-token int8 activations, no
/// fused multiply-adds where the CPU rounds twice); only float sums run in another order
/// (RMSNorm, f16 and f32 dots, softmax), which moves logits of magnitude ~20 by about 1e-3 (an
/// H100 gave 1.0e-4 for I2_S, 2.6e-4 for F32, 1.1e-3 for F16). Bound: max |Δ| ≤ 0.01, the same
/// argmax at ≥ 90% of positions, and the CUDA graph of the one-token steps gives the same
/// bits as launching kernel by kernel. Skips without a CUDA driver.
#[test]
fn gpu_logits_match_the_cpu_within_tolerance() {
    if !bitnetc::runtime::cuda::driver_available() {
        eprintln!("SKIPPING: no CUDA driver");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let models = gpu_models(dir.path());
    let mut ran = 0;
    for (rel, path) in &models {
        let open = |backend| {
            load(
                path,
                LoadOptions {
                    backend,
                    context: Some(64),
                    ..LoadOptions::default()
                },
            )
        };
        let cuda = |trace| {
            open(Backend::Cuda {
                ordinal: 0,
                options: GpuOptions {
                    batch: 16,
                    trace,
                    lm_head: None,
                    ..GpuOptions::default()
                },
            })
        };
        let gpu = cuda(false).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let cpu = open(Backend::default()).unwrap();
        let run = |m: &bitnetc::Model| prefill_and_decode(&m.engine);
        let (g, c) = (run(&gpu), run(&cpu));
        assert_eq!(g.len(), c.len(), "{rel}");
        // The one-token steps ran as a CUDA graph; traced, they run launch by launch, and give
        // the same bits.
        let traced = run(&cuda(true).unwrap());
        assert!(
            traced
                .iter()
                .zip(&g)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{rel}: the graph's logits differ from the launches'"
        );
        assert_close(rel, &gpu.engine, &g, &c, 0.01);
        ran += 1;
    }
    assert_eq!(ran, models.len());
}

/// A device, and the emulator's count of values read back (none on a GPU).
type TestDevice = (Box<dyn Device>, Option<Arc<cuda_emu::Reads>>);

/// The device the executor tests run on: the GPU when there is a CUDA driver, else the CUDA
/// emulator (with its count of values read back), else none (the test then skips, unless
/// `BITNETC_REQUIRE_CXX=1` makes the emulator's absence a failure).
fn test_device() -> Option<TestDevice> {
    if bitnetc::runtime::cuda::driver_available() {
        return Some((
            Box::new(bitnetc::runtime::cuda::Cuda::new(0).unwrap()),
            None,
        ));
    }
    if !cuda_emu::available() {
        assert!(
            std::env::var("BITNETC_REQUIRE_CXX").is_err(),
            "BITNETC_REQUIRE_CXX is set but no C++ compiler (c++) runs on this x86-64 host"
        );
        eprintln!("SKIPPING: no CUDA driver, and the CUDA emulator needs c++ on x86-64");
        return None;
    }
    let emulator = cuda_emu::Emulator::new();
    let reads = emulator.reads.clone();
    Some((Box::new(emulator), Some(reads)))
}

/// The model at `path` loaded for the CPU with a cache of `context` positions (its head
/// re-encoded as `opts.lm_head` says), and its plan and weights bound to `device` with `opts`.
fn cpu_and_device(
    path: &Path,
    context: usize,
    device: Box<dyn Device>,
    opts: GpuOptions,
) -> (bitnetc::Model, bitnetc::runtime::Engine) {
    let backend = Backend::Compiled(bitnetc::runtime::exec::ExecOptions {
        lm_head: opts.lm_head,
        ..Default::default()
    });
    let cpu = load(
        path,
        LoadOptions {
            context: Some(context),
            backend,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let (plan, weights) = (cpu.engine.plan().clone(), cpu.engine.weights().clone());
    let gpu = bitnetc::runtime::Engine::gpu(plan, weights, context, device, &[], &opts)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (cpu, gpu)
}

/// The tokens of the GPU tests: a prefill of 20 (steps of 16 and 4 with a batch of 16), then
/// 4 one-token steps.
const GPU_TOKENS: usize = 24;

/// The fixtures, and llama.cpp's F16 model with its matrices in Q8_0, Q4_0 and Q4_1 and its
/// embedding (the tied head) in Q8_0 (written into `dir`).
fn gpu_models(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let mut models: Vec<(String, std::path::PathBuf)> = TINY_MODELS
        .iter()
        .map(|rel| (rel.to_string(), fixture(rel)))
        .collect();
    let f16 = bitnetc::gguf::GgufFile::open(fixture("tiny/mainline-tiny-f16.gguf")).unwrap();
    for weights in [Encoding::Q8_0, Encoding::Q4_0, Encoding::Q4_1] {
        let path = dir.join(format!("tiny-{weights}.gguf"));
        let opts = QuantizeOptions {
            weights,
            embedding: Encoding::Q8_0,
        };
        quantize(&f16, &path, opts, |_, _, _| {}).unwrap();
        models.push((format!("mainline-tiny-f16 as {weights}"), path));
    }
    models
}

/// Every row of logits of [`GPU_TOKENS`] tokens, evaluated as a prefill and decode steps.
fn prefill_and_decode(engine: &bitnetc::runtime::Engine) -> Vec<f32> {
    let tokens: Vec<u32> = (0..GPU_TOKENS as u32)
        .map(|i| (i * 613 + 7) % 2048)
        .collect();
    prompt_then_steps(engine, &tokens, 20, false)
}

/// The logits of `tokens[..prompt]` evaluated at once (every row, or the last one's with
/// `last`), then of each token after it evaluated alone.
fn prompt_then_steps(
    engine: &bitnetc::runtime::Engine,
    tokens: &[u32],
    prompt: usize,
    last: bool,
) -> Vec<f32> {
    let mut s = engine.session();
    let mut eval = |t: &[u32]| if last { s.eval_last(t) } else { s.eval(t) }.unwrap();
    let mut out = eval(&tokens[..prompt]);
    for t in &tokens[prompt..] {
        out.extend(eval(std::slice::from_ref(t)));
    }
    out
}

/// The largest difference between two rows of logits.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Options of a traced engine with steps of at most `batch` tokens.
fn traced(batch: usize) -> GpuOptions {
    GpuOptions {
        batch,
        trace: true,
        ..GpuOptions::default()
    }
}

/// The bound of the GPU tests: max |Δ| ≤ `bound` and the same argmax at ≥ 90% of positions.
fn assert_close(rel: &str, gpu: &bitnetc::runtime::Engine, g: &[f32], c: &[f32], bound: f32) {
    let vocab = gpu.vocab_size();
    let diff = |rows: std::ops::Range<usize>| {
        let rows = rows.start * vocab..rows.end * vocab;
        max_diff(&g[rows.clone()], &c[rows])
    };
    let magnitude = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    let argmax = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
    let agree = (0..GPU_TOKENS)
        .filter(|&t| argmax(&g[t * vocab..][..vocab]) == argmax(&c[t * vocab..][..vocab]))
        .count();
    let all = diff(0..GPU_TOKENS);
    eprintln!(
        "{rel} on {}: max |Δlogit| {all} (position 0: {}, prefill: {}, decode: {}; \
         logits up to {magnitude}), argmax agrees at {agree}/{GPU_TOKENS}",
        gpu.device().unwrap_or_default(),
        diff(0..1),
        diff(0..20),
        diff(20..GPU_TOKENS),
    );
    assert!(all <= bound, "{rel}: {all}");
    assert!(agree * 10 >= GPU_TOKENS * 9, "{rel}: {agree}");
    // Asked for on a GPU that has it, programmatic dependent launch is what ran.
    let name = gpu.device().unwrap_or_default();
    if std::env::var("BITNETC_CUDA_PDL").is_ok_and(|v| v == "1")
        && (name.contains("(sm_9") || name.contains("(sm_1"))
    {
        assert!(name.contains("programmatic dependent launch"), "{name}");
    }
}

/// The GPU executor and every kernel it launches, on the GPU or else run on the CPU by the
/// CUDA emulator (`cuda_emu.h`): every model of the GPU test gives the CPU's logits within
/// the GPU test's bound, with its F16 head or re-encoded to Q8_0. The emulator computes what
/// the CUDA C says with the host's float arithmetic (the same IEEE operations, f16
/// conversions to nearest even, fused multiply-adds only where the code calls `fmaf`), so
/// this checks the kernels' indexing, synchronization and numerics and the executor's
/// buffers, launches and cache on a machine without a GPU (where it gives the figures an H100
/// gave, see `gpu_logits_match_the_cpu_within_tolerance`).
#[test]
fn device_logits_match_the_cpu_within_tolerance() {
    if test_device().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Every model, then the I2_S and F16 ones with their F16 heads re-encoded to Q8_0 (against
    // the CPU's `lm_head` option). The head's activations are quantized to int8 there, so
    // where the F16 layers' float sums (~1e-3 apart) put a value at a rounding boundary, its
    // code differs by one: the F16 model's bound is 0.05 (the emulator gives 0.013).
    let mut runs: Vec<(String, std::path::PathBuf, Option<Encoding>, f32)> = gpu_models(dir.path())
        .into_iter()
        .map(|(rel, path)| (rel, path, None, 0.01))
        .collect();
    for (rel, bound) in [
        ("tiny/bitnetcpp-tiny-i2_s.gguf", 0.01),
        ("tiny/mainline-tiny-f16.gguf", 0.05),
    ] {
        let head = Some(Encoding::Q8_0);
        runs.push((format!("{rel}, Q8_0 head"), fixture(rel), head, bound));
    }
    for (rel, path, lm_head, bound) in runs {
        let (cpu, gpu) = cpu_and_device(
            &path,
            64,
            test_device().unwrap().0,
            GpuOptions {
                lm_head,
                ..traced(16)
            },
        );
        let (g, c) = (prefill_and_decode(&gpu), prefill_and_decode(&cpu.engine));
        assert_eq!(g.len(), c.len(), "{rel}");
        assert_close(&rel, &gpu, &g, &c, bound);
        // I2_S layers run as a prologue and rows in tiles of tokens in steps of several tokens,
        // as one kernel in one-token steps.
        let launched: Vec<String> = gpu.gpu_trace().into_iter().map(|e| e.0).collect();
        let has = |prefix: &str, size: &str| {
            launched
                .iter()
                .any(|n| n.starts_with(prefix) && n.ends_with(size))
        };
        let i2s = rel.contains("i2_s");
        // The fixtures' heads are F16 or F32; re-encoded, they run as Q8_0 rows.
        if rel.starts_with("tiny/") {
            let q8 = has("q8_0_rows_k256_n2048", "[1]");
            assert_eq!(q8, lm_head.is_some(), "{rel}: {launched:?}");
        }
        assert_eq!(has("norm_quant_e", "[1]"), i2s, "{rel}: {launched:?}");
        assert_eq!(has("norm_quant_k", "[T]"), i2s, "{rel}: {launched:?}");
        assert_eq!(has("ternary_t8_", "[T]"), i2s, "{rel}: {launched:?}");
        assert!(!has("ternary_k", "[T]"), "{rel}: {launched:?}");
        assert!(!has("ternary_", "[1]"), "{rel}: {launched:?}");
        assert!(!has("norm_quant_k", "[1]"), "{rel}: {launched:?}");
        // One-token steps rotate, append and score in one kernel.
        assert!(has("qkv_rope_", "[T]"), "{rel}: {launched:?}");
        assert!(
            !launched
                .iter()
                .any(|n| n.contains("_append_") && n.ends_with("[1]"))
        );
        assert!(has("qkv_rope_", "[1]") && launched.iter().any(|n| n.contains("_scores_f16_")));
    }
}

/// `compile --target cuda`: the plan carries its kernels as PTX for each architecture asked
/// for, and still runs on the CPU with the same logits as its model.
#[test]
fn a_cuda_plan_carries_ptx_and_still_runs_on_the_cpu() {
    use bitnetc::bplan::{self, CompileOptions};
    let required = std::env::var("BITNETC_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if !bitnetc::codegen_cuda::nvrtc::available() {
        assert!(
            !required,
            "BITNETC_REQUIRE_NVRTC=1 but libnvrtc.so cannot be loaded"
        );
        eprintln!("SKIPPING: NVRTC is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let out = dir.path().join("tiny-cuda.bplan");
    let opts = CompileOptions {
        cuda_archs: vec!["sm_80".into(), "sm_90".into()],
        ..CompileOptions::default()
    };
    bplan::compile(&src, &out, &opts, |_, _| {}).unwrap();
    let (_, m) = bplan::read_manifest(&out).unwrap();
    assert_eq!(m.target, "cuda");
    let archs: Vec<&str> = m.ptx.iter().map(|p| p.arch.as_str()).collect();
    assert_eq!(archs, ["sm_80", "sm_90"]);
    for p in &m.ptx {
        assert!(p.ptx.contains(&format!(".target {}", p.arch)));
        assert!(p.ptx.contains(".entry ternary_k256_n384("));
    }
    let open = |path: &Path| {
        load(
            path,
            LoadOptions {
                context: Some(16),
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let ids = [1u32, 70, 300, 5, 1999];
    let a = open(&out).engine.session().eval(&ids).unwrap();
    let b = open(&src).engine.session().eval(&ids).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    // An architecture NVRTC does not know is an error that says so.
    let bad = CompileOptions {
        cuda_archs: vec!["sm_12".into()],
        ..CompileOptions::default()
    };
    let e = bplan::compile(&src, &dir.path().join("bad.bplan"), &bad, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--target cuda: unknown GPU architecture `sm_12`"),
        "{e}"
    );
}

/// On the device: a model with the 2B-4T's head size (128) and grouped-query attention of 4
/// heads on one KV head, with a prompt of 300 tokens in steps of 64 followed by one-token
/// steps, so that attention runs over several chunks of keys (flash-decoding's per-chunk
/// maxima and sums, and the last block adding the chunks). Its weights are F16 (random, logits
/// up to ~25): a model with int8 activations would turn the float sums' last-bit differences
/// into whole quantization steps here and there (a random I2_S model of these sizes, whose
/// activations are large, moves logits of ~100 by up to 0.6 that way), which says nothing
/// about attention. Bound: the GPU test's 0.01.
#[test]
fn device_long_prompt_with_2b_heads_matches_the_cpu() {
    let Some((device, _)) = test_device() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads128.gguf");
    let spec = SynthSpec {
        hidden: 512,
        heads: 4,
        kv_heads: 1,
        ffn: 1024,
        vocab: 512,
        context: 1024,
        weights: Encoding::F16,
        ..SynthSpec::tiny(bitnetc::gguf::arch::Architecture::Llama)
    };
    spec.write(std::fs::File::create(&path).unwrap()).unwrap();
    let (cpu, gpu) = cpu_and_device(&path, 512, device, traced(64));
    let tokens: Vec<u32> = (0..303u32).map(|i| (i * 37 + 11) % 512).collect();
    let run = |e| prompt_then_steps(e, &tokens, 300, true);
    let (g, c) = (run(&gpu), run(&cpu.engine));
    assert_eq!(g.len(), 4 * 512);
    let diff = max_diff(&g, &c);
    let magnitude = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("max |Δlogit| {diff} (logits up to {magnitude})");
    assert!(diff <= 0.01, "{diff}");
    let launched: Vec<String> = gpu.gpu_trace().into_iter().map(|e| e.0).collect();
    assert!(
        launched
            .iter()
            .any(|n| n.starts_with("attention_f16_h4_g1_d128_") && n.ends_with("_pv [1]")),
        "{launched:?}"
    );
}

/// The built-in model's greedy continuation through `Session::generate` on the device
/// equals the 64 greedy ids of its training script (PyTorch, `models/tiny-shakespeare.json`),
/// as the CPU's does (tests/builtin_model.rs), with each next token picked by the argmax
/// kernel: on the emulator, which counts them, nothing but one integer per step is copied
/// back, no logits.
#[test]
fn device_greedy_generation_picks_tokens_on_the_device() {
    use bitnetc::runtime::generate::GenerateOptions;
    use bitnetc::runtime::sampling::{Sampler, SamplingParams};
    let Some((device, reads)) = test_device() else {
        return;
    };
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bitnetc_tests::repo_root().join("models/tiny-shakespeare.json"))
            .unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        let a = v.as_array().unwrap();
        a.iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let want = ids(&record["greedy_ids"]);
    let cpu = bitnetc::builtin::load(LoadOptions {
        context: Some(256),
        ..LoadOptions::default()
    })
    .unwrap();
    let gpu = bitnetc::runtime::Engine::gpu(
        cpu.engine.plan().clone(),
        cpu.engine.weights().clone(),
        256,
        device,
        &[],
        &GpuOptions::default(),
    )
    .unwrap();
    let t = cpu.tokenizer().unwrap();
    let prompt = t.encode(record["prompt"].as_str().unwrap(), true, false);
    let mut session = gpu.session();
    let options = GenerateOptions {
        max_tokens: Some(want.len()),
        ignore_eos: true,
        stop: Vec::new(),
    };
    let sampler = Sampler::new(SamplingParams::greedy());
    let got: Vec<u32> = session
        .generate(t, &prompt, sampler, options)
        .unwrap()
        .map(|tok| tok.unwrap().id)
        .collect();
    assert_eq!(got, want, "{:?}", t.decode(&got, false));
    // The prompt's pick and 63 more (the 64th token is not evaluated): one integer each.
    if let Some(reads) = reads {
        assert_eq!(reads.floats.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(reads.ints.load(std::sync::atomic::Ordering::Relaxed), 64);
    }
}

/// A token id past the embedding table is refused before anything reaches the device (a
/// kernel would read outside the table), naming the id, its index and the vocabulary; the
/// session is left as it was.
#[test]
fn device_refuses_tokens_outside_the_vocabulary() {
    let Some((device, _)) = test_device() else {
        return;
    };
    let (cpu, gpu) = cpu_and_device(
        &fixture("tiny/bitnetcpp-tiny-i2_s.gguf"),
        64,
        device,
        GpuOptions::default(),
    );
    let mut s = gpu.session();
    let e = s.eval(&[5, 2048]).unwrap_err().to_string();
    assert!(
        e.contains("token 2048 at index 1 is outside the vocabulary of 2048"),
        "{e}"
    );
    assert_eq!(
        s.eval_argmax(&[u32::MAX]).unwrap_err().to_string(),
        e.replace("2048 at index 1", &format!("{} at index 0", u32::MAX))
    );
    assert_eq!(s.position(), 0);
    let g = s.eval(&[5]).unwrap();
    let c = cpu.engine.session().eval(&[5]).unwrap();
    let d = max_diff(&g, &c);
    assert!(d <= 0.01, "{d}");
}

/// The 2B-4T's dimensions (hidden 2560, FFN 6912, 20 heads on 5 KV heads of 128) in one layer
/// with random I2_S weights and a vocabulary of 512: every kernel specialization of the real
/// model's layers (the one-token fused rows with 20 or 54 values per thread, token tiles over
/// rows of 40 and 108 words, Q/K/V inside the score kernel with 4 heads per KV head) against
/// the CPU, for a prefill of 20 tokens in steps of 16 and 4 and four one-token steps. The
/// logits (magnitudes ~650) agree to 1e-6 of their magnitude, except where a float sum's last
/// bit moves an activation across an int8 rounding boundary: such a row moves by up to 1e-3
/// of the magnitude, and at most two of the 24 may.
#[test]
fn device_matches_the_cpu_at_2b_4t_dimensions() {
    let Some((device, _)) = test_device() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dims-2b.gguf");
    let spec = SynthSpec {
        layers: 1,
        vocab: 512,
        context: 512,
        ..SynthSpec::bitnet_2b_4t()
    };
    spec.write(std::fs::File::create(&path).unwrap()).unwrap();
    let (cpu, gpu) = cpu_and_device(&path, 256, device, traced(16));
    let tokens: Vec<u32> = (0..24u32).map(|i| (i * 613 + 7) % 512).collect();
    let run = |e| prompt_then_steps(e, &tokens, 20, false);
    let (g, c) = (run(&gpu), run(&cpu.engine));
    let mut moved = 0;
    for (r, (gr, cr)) in g.chunks(512).zip(c.chunks(512)).enumerate() {
        let d = max_diff(gr, cr);
        let magnitude = cr.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("row {r}: max |Δlogit| {d} (logits up to {magnitude})");
        assert!(d <= 1e-3 * magnitude, "row {r}: {d}");
        moved += usize::from(d > 1e-6 * magnitude);
    }
    assert!(moved <= 2, "{moved} rows");
    let launched: Vec<String> = gpu.gpu_trace().into_iter().map(|e| e.0).collect();
    for name in [
        "norm_quant_e3727c5ac_ternary_k2560_n3840 [1]",
        "norm_quant_e3727c5ac_ternary_k6912_n2560_res [1]",
        "ternary_t8_k2560_n13824_glu_relu2 [T]",
        "ternary_t8_k6912_n2560_res [T]",
    ] {
        assert!(launched.iter().any(|n| n == name), "{name}: {launched:?}");
    }
    assert!(
        launched
            .iter()
            .any(|n| n.starts_with("qkv_rope_neox_scores_f16_h20_g5_d128") && n.ends_with("[1]")),
        "{launched:?}"
    );
}

/// A GPU engine with two session slots: two sessions interleaving their prefills and decode
/// steps each get exactly the logits they get alone (their caches are apart), and within the
/// GPU test's bound of the CPU's. With both slots held, a third session takes the one used
/// longest ago, and the session that held it is told its sequence is gone until it resets;
/// ended sessions give their slots back.
#[test]
fn device_sessions_keep_their_own_caches() {
    let Some((device, _)) = test_device() else {
        return;
    };
    let (cpu, gpu) = cpu_and_device(
        &fixture("tiny/bitnetcpp-tiny-i2_s.gguf"),
        64,
        device,
        GpuOptions {
            sessions: 2,
            ..GpuOptions::default()
        },
    );
    let (pa, pb): (Vec<u32>, Vec<u32>) = (
        (0..12).map(|i| i * 37 % 2048).collect(),
        (0..7).map(|i| 1000 + i * 11).collect(),
    );
    let alone = |e: &bitnetc::runtime::Engine, p: &[u32]| {
        let mut s = e.session();
        let mut out = s.eval_last(p).unwrap();
        for t in 0..3 {
            out.extend(s.eval_last(&[t + 5]).unwrap());
        }
        out
    };
    let (a_alone, b_alone) = (alone(&gpu, &pa), alone(&gpu, &pb));
    let (mut a, mut b) = (gpu.session(), gpu.session());
    let mut a_out = a.eval_last(&pa).unwrap();
    let mut b_out = b.eval_last(&pb).unwrap();
    for t in 0..3 {
        a_out.extend(a.eval_last(&[t + 5]).unwrap());
        b_out.extend(b.eval_last(&[t + 5]).unwrap());
    }
    assert!(
        a_out
            .iter()
            .zip(&a_alone)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert!(
        b_out
            .iter()
            .zip(&b_alone)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    let d = max_diff(&a_out, &alone(&cpu.engine, &pa));
    assert!(d <= 0.01, "{d}");
    // Both slots are held: a third session takes A's (used longest ago); A is then told.
    let mut c = gpu.session();
    c.eval_last(&pb).unwrap();
    let e = a.eval_last(&[9]).unwrap_err().to_string();
    assert!(
        e.contains("another session has taken this one's KV cache"),
        "{e}"
    );
    assert!(b.eval_last(&[9]).is_ok());
    a.reset();
    assert!(a.eval_last(&pa).is_ok());
    // Dropping sessions gives their slots back.
    drop((a, b, c));
    let (mut x, mut y) = (gpu.session(), gpu.session());
    assert!(x.eval_last(&pa).is_ok() && y.eval_last(&pb).is_ok());
    assert!(x.eval_last(&[1]).is_ok());
}
