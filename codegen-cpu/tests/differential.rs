//! Every kernel against the interpreter's numerics on random shapes and values: exact on the
//! integer paths (ternary, Q8 blocks, activation quantization), bit for bit on the float ones.

use bitnetc_codegen_cpu::act::{quant_scalar, select_quant};
use bitnetc_codegen_cpu::blocks;
use bitnetc_codegen_cpu::select::{KernelSet, TernaryKernel, ternary_candidates};
use bitnetc_codegen_cpu::ternary::{RowsArgs, rows_scalar};
use bitnetc_ir::encoding::Encoding;
use bitnetc_ir::interp::{MatmulActs, RowScratch, WeightRef, matmul_rows};
use bitnetc_ir::numerics::{self, quantize_q8_x86};
use bitnetc_ir::types::DotPath;
use proptest::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// Compiled candidates per `k` (JIT compilation is the slow part of a case).
    static KERNELS: RefCell<HashMap<usize, Vec<TernaryKernel>>> = RefCell::new(HashMap::new());
}

fn ternary_kernels(k: usize) -> Vec<TernaryKernel> {
    KERNELS.with(|m| {
        m.borrow_mut()
            .entry(k)
            .or_insert_with(|| {
                [KernelSet::Best, KernelSet::Baseline, KernelSet::Lut]
                    .into_iter()
                    .flat_map(|set| ternary_candidates(k, set).unwrap())
                    .chain([TernaryKernel::Native {
                        name: "scalar",
                        f: rows_scalar,
                    }])
                    .collect()
            })
            .clone()
    })
}

/// Rows of I2_S bytes (codes 0..=2 only) and int8 activations for `tokens` tokens.
fn ternary_case() -> impl Strategy<Value = (usize, usize, usize, Vec<u8>, Vec<i8>)> {
    (1usize..40, 1usize..6, 1usize..5).prop_flat_map(|(rows, blocks, tokens)| {
        let k = 128 * blocks;
        (
            Just(rows),
            Just(k),
            Just(tokens),
            prop::collection::vec(prop::array::uniform4(0u8..3), rows * k / 4).prop_map(|v| {
                v.into_iter()
                    .map(|c| c[0] << 6 | c[1] << 4 | c[2] << 2 | c[3])
                    .collect()
            }),
            prop::collection::vec(any::<i8>(), k * tokens),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// `Σ c·q` of every ternary kernel equals the interpreter's `Σ (c − 1)·q` (codes decoded in
    /// flattened order, FORMATS.md §3.3) plus `Σ q`.
    #[test]
    fn ternary_kernels_equal_the_interpreter((rows, k, tokens, w, q) in ternary_case()) {
        let mut want = vec![0i32; rows * tokens];
        for t in 0..tokens {
            let qt = &q[t * k..(t + 1) * k];
            let qsum: i32 = qt.iter().map(|&v| v as i32).sum();
            for r in 0..rows {
                let mut s = 0i32;
                for (j, &x) in qt.iter().enumerate() {
                    let i = r * k + j;
                    let code = (w[32 * (i / 128) + i % 32] >> (6 - 2 * ((i % 128) / 32))) & 3;
                    s += (code as i32 - 1) * x as i32;
                }
                want[t * rows + r] = s + qsum;
            }
        }
        for kernel in ternary_kernels(k) {
            let mut got = vec![0i32; rows * tokens];
            let args = RowsArgs::dense(&w, rows, k, &q, tokens, &mut got);
            // SAFETY: the buffers cover the arguments; the kernels were compiled for k.
            unsafe { kernel.run(&args) };
            prop_assert_eq!(&got, &want, "{} rows {} k {} tokens {}", kernel.name(), rows, k, tokens);
        }
    }

    /// Q8_0, Q4_0 and Q4_1 rows dotted with Q8 activations: every variant, bit for bit the
    /// interpreter's row numerics.
    #[test]
    fn block_kernels_equal_the_interpreter(
        rows in 1usize..12,
        blocks in 1usize..9,
        seed in any::<u64>(),
    ) {
        let k = 32 * blocks;
        let mut s = seed | 1;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let values: Vec<f32> = (0..rows * k).map(|_| next() * 4.0).collect();
        let x: Vec<f32> = (0..k).map(|_| next() * 2.0).collect();
        let q8 = quantize_q8_x86(&x);
        let xq: Vec<i8> = q8.iter().flat_map(|b| b.qs).collect();
        let xd: Vec<f32> = q8.iter().map(|b| b.d).collect();
        let xs: Vec<f32> = q8.iter().map(|b| b.s).collect();
        for enc in [Encoding::Q8_0, Encoding::Q4_0, Encoding::Q4_1] {
            let bytes = enc.encode(&values).unwrap();
            let shape = [rows as u64, k as u64];
            let w = WeightRef { encoding: enc, shape: &shape, bytes: &bytes };
            let acts = MatmulActs::new(&x, &w).unwrap();
            let mut want = vec![0.0f32; rows];
            let mut scratch = RowScratch::default();
            matmul_rows(&acts, &x, &w, DotPath::F32, 0..rows, &mut scratch, |_, r, v| {
                want[r] = v
            })
            .unwrap();
            for portable in [true, false] {
                let (name, f) = blocks::select(enc, portable).unwrap();
                let mut got = vec![0.0f32; rows];
                // SAFETY: the buffers hold `rows` rows of `blocks` blocks and one token.
                unsafe {
                    f(bytes.as_ptr(), k / 32 * enc.block_bytes(), rows, blocks, xq.as_ptr(),
                      xd.as_ptr(), xs.as_ptr(), got.as_mut_ptr())
                };
                let (g, wb): (Vec<u32>, Vec<u32>) =
                    (got.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
                prop_assert_eq!(g, wb, "{} {}", enc, name);
            }
        }
    }

    /// The activation quantization of every variant equals `numerics::quant_act_i8`, with the
    /// sum of its codes; lengths not a multiple of 16, tiny and huge magnitudes included (floats
    /// drawn from integers and bit patterns: proptest 1.12's `f32` range sampler can panic).
    #[test]
    fn activation_quantization_equals_the_interpreter(
        x in prop::collection::vec(
            prop_oneof![
                (-1_000_000i32..1_000_000).prop_map(|k| k as f32 * 1e-3),
                (-1_000_000i32..1_000_000).prop_map(|k| k as f32 * 1e-12),
                Just(0.0f32),
                any::<u32>()
                    .prop_map(f32::from_bits)
                    .prop_filter("finite, below 3e38", |x| x.abs() < 3.0e38),
            ],
            1..300,
        ),
    ) {
        let mut want = vec![0i8; x.len()];
        let s = numerics::quant_act_i8(&x, &mut want);
        for (name, f) in [("scalar", quant_scalar as _), select_quant(false)] {
            let mut got = vec![0i8; x.len()];
            // SAFETY: select_quant returns a variant this CPU runs.
            let (gs, sum) = unsafe { (f as bitnetc_codegen_cpu::act::QuantFn)(&x, &mut got) };
            prop_assert_eq!(gs.to_bits(), s.to_bits(), "{}", name);
            prop_assert_eq!(&got, &want, "{}", name);
            prop_assert_eq!(sum, want.iter().map(|&v| v as i32).sum::<i32>(), "{}", name);
        }
    }
}
