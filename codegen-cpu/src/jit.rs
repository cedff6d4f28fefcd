//! Kernels generated through Cranelift, specialized to their shapes.
//!
//! Cranelift's x86-64 backend has 128-bit vectors only, so the generator unrolls: every 16
//! packed bytes yield four `i8x16` code vectors, each dotted with its 16 activations through
//! the widening-multiply tree that Cranelift lowers to one `vpdpbusd` on VNNI hosts (and to a
//! `pmaddwd` sequence elsewhere), into four independent accumulators.

use crate::ternary::RowsArgs;
use cranelift_codegen::Context;
use cranelift_codegen::ir::{
    AbiParam, InstBuilder, MemFlagsData, Type, Value, condcodes::IntCC, types,
};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetFrontendConfig};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module, default_libcall_names};

/// What went wrong generating a kernel.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    #[error("this CPU is not supported by the code generator: {0}")]
    Host(String),
    #[error("code generation failed: {0}")]
    Codegen(String),
    #[error("unsupported shape: {0}")]
    Shape(String),
}

/// Which instruction-set extensions the generator may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsaLevel {
    /// Everything the host has (VNNI, AVX-512 encodings, …).
    Native,
    /// x86-64 with SSSE3 and SSE4.1 only: the fallback every x86-64 of the last 15 years runs.
    Baseline,
}

fn isa(level: IsaLevel) -> Result<OwnedTargetIsa, JitError> {
    let mut flags = settings::builder();
    flags
        .set("opt_level", "speed")
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    flags
        .set("enable_verifier", "false")
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    let builder = match level {
        IsaLevel::Native => {
            cranelift_native::builder().map_err(|e| JitError::Host(e.to_string()))?
        }
        IsaLevel::Baseline => {
            let mut b = cranelift_native::builder_with_options(false)
                .map_err(|e| JitError::Host(e.to_string()))?;
            for f in ["has_sse3", "has_ssse3", "has_sse41"] {
                b.set(f, "true")
                    .map_err(|e| JitError::Codegen(e.to_string()))?;
            }
            b
        }
    };
    builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| JitError::Codegen(e.to_string()))
}

/// Generates one function of `params` pointer-sized arguments and no results with `build`,
/// and returns its module (which keeps the code alive), its entry and its code size in bytes.
pub(crate) fn compile_fn(
    level: IsaLevel,
    name: &str,
    params: usize,
    build: impl FnOnce(&mut Context, &mut FunctionBuilderContext, Type, TargetFrontendConfig),
) -> Result<(JITModule, *const u8, usize), JitError> {
    let isa = isa(level)?;
    let ptr = isa.pointer_type();
    let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
    let mut ctx = module.make_context();
    for _ in 0..params {
        ctx.func.signature.params.push(AbiParam::new(ptr));
    }
    let id = module
        .declare_function(name, Linkage::Local, &ctx.func.signature)
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    let mut fctx = FunctionBuilderContext::new();
    let cfg = module.target_config();
    build(&mut ctx, &mut fctx, ptr, cfg);
    module
        .define_function(id, &mut ctx)
        .map_err(|e| JitError::Codegen(format!("{e:?}")))?;
    let code_bytes = ctx.compiled_code().map_or(0, |c| c.code_buffer().len());
    module.clear_context(&mut ctx);
    module
        .finalize_definitions()
        .map_err(|e| JitError::Codegen(e.to_string()))?;
    let raw = module.get_finalized_function(id);
    Ok((module, raw, code_bytes))
}

/// A JIT-compiled ternary row kernel for one `k`: `fn(w, row_bytes, rows, q, out)` for one
/// token, `out[r] = Σ c[r][i]·q[i]`.
pub struct TernaryJit {
    // Keeps the code alive.
    _module: JITModule,
    func: unsafe extern "C" fn(*const u8, u64, u64, *const i8, *mut i32),
    pub k: usize,
    pub level: IsaLevel,
    /// The machine code size in bytes.
    pub code_bytes: usize,
}

// SAFETY: the compiled code is immutable and reentrant.
unsafe impl Send for TernaryJit {}
unsafe impl Sync for TernaryJit {}

impl TernaryJit {
    /// Generates the kernel for rows of `k` elements (a multiple of 128).
    pub fn compile(k: usize, level: IsaLevel) -> Result<TernaryJit, JitError> {
        if k == 0 || !k.is_multiple_of(128) {
            return Err(JitError::Shape(format!(
                "k = {k} is not a positive multiple of 128"
            )));
        }
        let (module, raw, code_bytes) = compile_fn(
            level,
            &format!("ternary_rows_k{k}"),
            5,
            |ctx, fctx, ptr, cfg| build_rows(ctx, fctx, ptr, k, cfg),
        )?;
        // SAFETY: the function was generated with exactly this signature.
        let func = unsafe {
            std::mem::transmute::<
                *const u8,
                unsafe extern "C" fn(*const u8, u64, u64, *const i8, *mut i32),
            >(raw)
        };
        Ok(TernaryJit {
            _module: module,
            func,
            k,
            level,
            code_bytes,
        })
    }

    /// Runs the kernel over `a` (one call per token).
    ///
    /// # Safety
    /// The pointers in `a` must cover the ranges it describes, and `a.k` must equal `self.k`.
    pub unsafe fn run(&self, a: &RowsArgs) {
        assert_eq!(a.k, self.k, "kernel compiled for another k");
        for t in 0..a.tokens {
            // SAFETY: per the contract above; the kernel reads rows·k/4 bytes and k activations.
            unsafe {
                (self.func)(
                    a.w,
                    a.row_bytes as u64,
                    a.rows as u64,
                    a.q.add(t * a.q_stride),
                    a.out.add(t * a.out_stride),
                );
            }
        }
    }
}

/// Builds `fn(w, row_bytes, rows, q, out)`: a loop over rows; in each, a loop over pairs of
/// 128-element blocks (unrolled by the generator) with four loop-carried accumulators.
fn build_rows(
    ctx: &mut Context,
    fctx: &mut FunctionBuilderContext,
    ptr: Type,
    k: usize,
    frontend: TargetFrontendConfig,
) {
    let blocks = k / 128;
    // Blocks per inner-loop iteration: 2 when they pair up, else 1.
    let unroll = if blocks.is_multiple_of(2) { 2 } else { 1 };
    let mut b = FunctionBuilder::new(&mut ctx.func, fctx);
    let entry = b.create_block();
    let row_header = b.create_block();
    let row_body = b.create_block();
    let inner_header = b.create_block();
    let inner_body = b.create_block();
    let row_end = b.create_block();
    let exit = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let params = b.block_params(entry).to_vec();
    let (w0, row_bytes, rows, q, out0) = (params[0], params[1], params[2], params[3], params[4]);
    let r = b.declare_var(ptr);
    let w_row = b.declare_var(ptr);
    let out = b.declare_var(ptr);
    let i = b.declare_var(ptr);
    let wp = b.declare_var(ptr);
    let qp = b.declare_var(ptr);
    let acc: Vec<_> = (0..4).map(|_| b.declare_var(types::I32X4)).collect();
    let zero = b.ins().iconst(ptr, 0);
    b.def_var(r, zero);
    b.def_var(w_row, w0);
    b.def_var(out, out0);
    b.ins().jump(row_header, &[]);

    // for r in 0..rows
    b.switch_to_block(row_header);
    let rv = b.use_var(r);
    let more_rows = b.ins().icmp(IntCC::UnsignedLessThan, rv, rows);
    b.ins().brif(more_rows, row_body, &[], exit, &[]);

    b.switch_to_block(row_body);
    let zero32 = b.ins().iconst(types::I32, 0);
    let zero_v = b.ins().splat(types::I32X4, zero32);
    for a in &acc {
        b.def_var(*a, zero_v);
    }
    let zero = b.ins().iconst(ptr, 0);
    b.def_var(i, zero);
    let wr = b.use_var(w_row);
    b.def_var(wp, wr);
    b.def_var(qp, q);
    b.ins().jump(inner_header, &[]);

    // for each group of `unroll` blocks
    b.switch_to_block(inner_header);
    let iv = b.use_var(i);
    let more_blocks = b
        .ins()
        .icmp_imm_u(IntCC::UnsignedLessThan, iv, (blocks / unroll) as i64);
    b.ins().brif(more_blocks, inner_body, &[], row_end, &[]);

    b.switch_to_block(inner_body);
    let flags = MemFlagsData::new().with_notrap();
    // Codes are masked in place (64·c, 16·c, 4·c, c): no shifts; each group has its own
    // accumulator, scaled back exactly after the loop.
    let masks: Vec<Value> = [0xC0u8, 0x30, 0x0C, 0x03]
        .iter()
        .map(|&m| {
            let m = b.ins().iconst(types::I8, m as i64);
            b.ins().splat(types::I8X16, m)
        })
        .collect();
    let w_ptr = b.use_var(wp);
    let q_ptr = b.use_var(qp);
    let mut acc_v: Vec<Value> = acc.iter().map(|a| b.use_var(*a)).collect();
    for block in 0..unroll {
        for half in 0..2 {
            let bytes = b
                .ins()
                .load(types::I8X16, flags, w_ptr, (32 * block + 16 * half) as i32);
            for (g, acc) in acc_v.iter_mut().enumerate() {
                let codes = b.ins().band(bytes, masks[g]);
                let x = b.ins().load(
                    types::I8X16,
                    flags,
                    q_ptr,
                    (128 * block + 32 * g + 16 * half) as i32,
                );
                *acc = dot_tree(&mut b, x, codes, *acc);
            }
        }
    }
    for (a, v) in acc.iter().zip(acc_v) {
        b.def_var(*a, v);
    }
    let next_w = b.ins().iadd_imm_s(w_ptr, (32 * unroll) as i64);
    b.def_var(wp, next_w);
    let next_q = b.ins().iadd_imm_s(q_ptr, (128 * unroll) as i64);
    b.def_var(qp, next_q);
    let next_i = b.ins().iadd_imm_s(iv, 1);
    b.def_var(i, next_i);
    b.ins().jump(inner_header, &[]);

    // Reduce, store, next row.
    b.switch_to_block(row_end);
    let acc_v: Vec<Value> = acc
        .iter()
        .enumerate()
        .map(|(g, a)| {
            let v = b.use_var(*a);
            if g == 3 {
                v
            } else {
                b.ins().sshr_imm_u(v, (6 - 2 * g) as i64)
            }
        })
        .collect();
    let s01 = b.ins().iadd(acc_v[0], acc_v[1]);
    let s23 = b.ins().iadd(acc_v[2], acc_v[3]);
    let s = b.ins().iadd(s01, s23);
    let mut total = b.ins().extractlane(s, 0);
    for lane in 1..4u8 {
        let l = b.ins().extractlane(s, lane);
        total = b.ins().iadd(total, l);
    }
    let outv = b.use_var(out);
    b.ins().store(flags, total, outv, 0);
    let next_out = b.ins().iadd_imm_s(outv, 4);
    b.def_var(out, next_out);
    let wr = b.use_var(w_row);
    let next_row = b.ins().iadd(wr, row_bytes);
    b.def_var(w_row, next_row);
    let next_r = b.ins().iadd_imm_s(rv, 1);
    b.def_var(r, next_r);
    b.ins().jump(row_header, &[]);

    b.switch_to_block(exit);
    b.ins().return_(&[]);
    b.seal_all_blocks();
    b.finalize(frontend);
}

/// `acc + Σ_4 (x · c)` per i32 lane, x signed and c unsigned bytes, written as the widening tree
/// that Cranelift lowers to `vpdpbusd` (`iadd(tree, acc)`: the operand order matters).
fn dot_tree(b: &mut FunctionBuilder, x: Value, c: Value, acc: Value) -> Value {
    let xl = b.ins().swiden_low(x);
    let cl = b.ins().uwiden_low(c);
    let xh = b.ins().swiden_high(x);
    let ch = b.ins().uwiden_high(c);
    let lo = b.ins().imul(xl, cl);
    let hi = b.ins().imul(xh, ch);
    let lol = b.ins().swiden_low(lo);
    let loh = b.ins().swiden_high(lo);
    let hil = b.ins().swiden_low(hi);
    let hih = b.ins().swiden_high(hi);
    let plo = b.ins().iadd_pairwise(lol, loh);
    let phi = b.ins().iadd_pairwise(hil, hih);
    let tree = b.ins().iadd_pairwise(plo, phi);
    b.ins().iadd(tree, acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ternary::test_data::{random_q, random_rows, run};
    use crate::ternary::{RowsArgs, rows_scalar};

    #[test]
    fn jit_equals_the_scalar_reference_at_both_levels() {
        for level in [IsaLevel::Native, IsaLevel::Baseline] {
            for (rows, k, tokens) in [(3, 128, 1), (5, 256, 3), (4, 2560, 2)] {
                let jit = TernaryJit::compile(k, level).unwrap();
                let w = random_rows(rows, k, 7 + k as u64);
                let q = random_q(k * tokens, 7 + rows as u64);
                let expect = run(rows_scalar, &w, rows, k, &q, tokens);
                let mut got = vec![0i32; rows * tokens];
                // SAFETY: dense arguments over the buffers; the kernel was compiled for k.
                unsafe { jit.run(&RowsArgs::dense(&w, rows, k, &q, tokens, &mut got)) };
                assert_eq!(got, expect, "{level:?} {rows}x{k}x{tokens}");
            }
        }
    }
}
