//! The compiled executor against the reference interpreter: the same logits, bit for bit, on
//! every fixture model, for prefill, decode and mixed steps, at any thread count, with the
//! best and the baseline kernels, and with prompts split into several steps.

use bitnetc::codegen::select::KernelSet;
use bitnetc::runtime::exec::ExecOptions;
use bitnetc::{Backend, LoadOptions, Model, load};
use bitnetc_tests::{TINY_MODELS, assert_bits_equal, fixture, shared_fixture};
use std::path::Path;

fn open(path: &Path, backend: Backend, context: usize) -> Model {
    load(
        path,
        LoadOptions {
            backend,
            context: Some(context),
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn compiled(threads: usize, kernels: KernelSet, batch: usize) -> Backend {
    Backend::Compiled(ExecOptions {
        threads,
        kernels,
        batch,
        trace: false,
        lm_head: None,
        bindings: None,
    })
}

/// Evaluates `tokens` in steps of the given sizes; returns every position's logits.
fn run(model: &Model, tokens: &[u32], steps: &[usize]) -> Vec<f32> {
    let mut s = model.engine.session();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in steps {
        out.extend(s.eval(&tokens[at..at + n]).unwrap());
        at += n;
    }
    assert_eq!(at, tokens.len());
    out
}

/// Pseudo-random token ids below `vocab`.
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Step patterns: one prefill; decode; prefill then decode (past 64 positions, where
/// attention's GEMV starts its 64-lane chains); uneven prefills; steps of 2 to 4 tokens (the
/// ternary one-token kernel run per token).
const PATTERNS: [&[usize]; 5] = [
    &[72],
    &[1; 72],
    &[62, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    &[33, 31, 8],
    &[3, 2, 4, 63],
];

#[test]
fn every_tiny_model_runs_bit_exact_with_the_interpreter() {
    for rel in TINY_MODELS {
        let path = fixture(rel);
        let reference = open(&path, Backend::Interpreter, 72);
        let vocab = reference.engine.vocab_size();
        let ids = tokens(72, vocab, rel.len() as u64);
        for (p, steps) in PATTERNS.iter().enumerate() {
            let expect = run(&reference, &ids, steps);
            for (threads, kernels) in [
                (2, KernelSet::Best),
                (1, KernelSet::Baseline),
                (2, KernelSet::Lut),
            ] {
                let m = open(&path, compiled(threads, kernels, 512), 72);
                let got = run(&m, &ids, steps);
                assert_bits_equal(
                    &got,
                    &expect,
                    &format!("{rel} pattern {p} threads {threads} {kernels:?}"),
                );
            }
        }
    }
}

#[test]
fn attention_over_hundreds_of_positions_stays_bit_exact() {
    // Past 128 positions: several blocks of sixteen keys and of 64-lane value chains, with
    // the GEMV's f64 tail after them, in a prompt step and in one-token steps.
    for rel in [
        "tiny/bitnetcpp-tiny-i2_s.gguf",
        "tiny/mainline-tiny-f16.gguf",
    ] {
        let path = fixture(rel);
        let reference = open(&path, Backend::Interpreter, 200);
        let ids = tokens(200, reference.engine.vocab_size(), 11);
        let steps = [&[150][..], &[1; 50][..]].concat();
        let expect = run(&reference, &ids, &steps);
        let m = open(&path, compiled(2, KernelSet::Best, 512), 200);
        assert_bits_equal(&run(&m, &ids, &steps), &expect, rel);
    }
}

#[test]
fn a_prompt_split_by_the_batch_size_equals_the_same_steps_on_the_interpreter() {
    let path = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let reference = open(&path, Backend::Interpreter, 64);
    let ids = tokens(50, reference.engine.vocab_size(), 5);
    // batch 16: steps of 16, 16, 16 and 2.
    let expect = run(&reference, &ids, &[16, 16, 16, 2]);
    let m = open(&path, compiled(2, KernelSet::Best, 16), 64);
    assert_bits_equal(&run(&m, &ids, &[50]), &expect, "batch 16");
}

#[test]
fn eval_last_gives_the_last_row_computed_for_that_token_alone() {
    for rel in TINY_MODELS {
        let path = fixture(rel);
        let m = open(&path, compiled(2, KernelSet::Best, 512), 41);
        let vocab = m.engine.vocab_size();
        let ids = tokens(40, vocab, 9);
        let all = run(&m, &ids, &[40]);
        let mut s = m.engine.session();
        let last = s.eval_last(&ids).unwrap();
        assert_eq!(last.len(), vocab);
        assert_eq!(s.position(), 40);
        // The head runs as a one-token matmul (GEMV: activations rounded to f16) instead of
        // the step's GEMM: the same values up to that rounding and the summation order.
        let tail = &all[all.len() - vocab..];
        let diff = last
            .iter()
            .zip(tail)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-2, "{rel}: eval_last differs by {diff}");
        let argmax = |r: &[f32]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
        assert_eq!(argmax(&last), argmax(tail), "{rel}");
        // And the next token continues from the same cache.
        let next = s.eval_last(&[ids[0]]).unwrap();
        let mut s2 = m.engine.session();
        s2.eval(&ids).unwrap();
        assert_bits_equal(
            &next,
            &s2.eval(&[ids[0]]).unwrap(),
            &format!("{rel} after eval_last"),
        );
    }
}

#[test]
fn smollm2_q4_1_runs_bit_exact_with_the_interpreter() {
    let Some(path) = shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let reference = open(&path, Backend::Interpreter, 12);
    let ids = tokens(10, reference.engine.vocab_size(), 3);
    let expect = run(&reference, &ids, &[8, 1, 1]);
    let m = open(&path, compiled(2, KernelSet::Best, 512), 12);
    assert_bits_equal(&run(&m, &ids, &[8, 1, 1]), &expect, "smollm2");
}

#[test]
fn a_q8_0_head_stays_close_to_the_f16_one() {
    let path = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let f16 = open(&path, compiled(2, KernelSet::Best, 512), 40);
    let q8 = open(
        &path,
        Backend::Compiled(ExecOptions {
            lm_head: Some(bitnetc::ir::encoding::Encoding::Q8_0),
            ..ExecOptions::default()
        }),
        40,
    );
    let vocab = f16.engine.vocab_size();
    let ids = tokens(40, vocab, 17);
    let (a, b) = (run(&f16, &ids, &[1; 40]), run(&q8, &ids, &[1; 40]));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let argmax = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
    let agree = (0..40)
        .filter(|&t| argmax(&a[t * vocab..][..vocab]) == argmax(&b[t * vocab..][..vocab]))
        .count();
    eprintln!("q8_0 head: max |Δlogit| {diff}, argmax agrees at {agree}/40");
    // Measured: 0.150 and 40/40 (the F16 head against Q8_0 rounding of rows and activations).
    assert!(diff > 0.0 && diff < 0.3, "{diff}");
    assert!(agree >= 39, "{agree}");
}

#[test]
fn the_context_limit_is_an_error_not_a_panic() {
    let m = open(
        &fixture("tiny/bitnetcpp-tiny-i2_s.gguf"),
        compiled(1, KernelSet::Best, 512),
        8,
    );
    let mut s = m.engine.session();
    s.eval(&[1, 2, 3, 4, 5, 6]).unwrap();
    let e = s.eval(&[1, 2, 3]).unwrap_err().to_string();
    assert!(
        e.contains("context holds 8 positions, 6 are used, and 3 more are needed"),
        "{e}"
    );
    assert_eq!(s.position(), 6);
    let e = s.eval(&[5000]).unwrap_err().to_string();
    assert!(e.contains("token 5000"), "{e}");
}

/// A batched decode step of several sessions gives each the logits it gets alone, bit for
/// bit: sessions at different positions (prompts of 3, 40 and 70 tokens, so attention's
/// 64-lane chains and one-token paths are both crossed), on every fixture model, with the
/// best and the baseline kernels, in chunks when there are more sessions than a step holds.
#[test]
fn a_batched_decode_step_equals_each_session_alone() {
    let mut models: Vec<std::path::PathBuf> = TINY_MODELS.iter().map(|r| fixture(r)).collect();
    models.extend(shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    for path in models {
        for (kernels, batch) in [(KernelSet::Best, 512), (KernelSet::Baseline, 2)] {
            let m = open(&path, compiled(2, kernels, batch), 80);
            let vocab = m.engine.vocab_size();
            let prompts: Vec<Vec<u32>> = [3, 40, 70]
                .iter()
                .enumerate()
                .map(|(i, &n)| tokens(n, vocab, 11 + i as u64))
                .collect();
            let what = format!("{} {kernels:?} batch {batch}", path.display());
            let mut alone: Vec<_> = prompts.iter().map(|_| m.engine.session()).collect();
            let mut together: Vec<_> = prompts.iter().map(|_| m.engine.session()).collect();
            for (i, p) in prompts.iter().enumerate() {
                alone[i].eval_last(p).unwrap();
                together[i].eval_last(p).unwrap();
            }
            for step in 0..4 {
                let next: Vec<u32> = (0..prompts.len())
                    .map(|i| ((step * 7 + i * 13) % vocab) as u32)
                    .collect();
                let mut refs: Vec<_> = together.iter_mut().collect();
                let got = m.engine.decode_batch(&mut refs, &next).unwrap();
                for (i, s) in alone.iter_mut().enumerate() {
                    let want = s.eval_last(&next[i..i + 1]).unwrap();
                    assert_bits_equal(&got[i], &want, &format!("{what} step {step} session {i}"));
                    assert_eq!(together[i].tokens(), s.tokens(), "{what}");
                }
            }
        }
    }
}
