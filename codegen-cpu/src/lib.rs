//! CPU code generation: ternary and f16 kernels, hand-written per ISA or generated through
//! Cranelift for each shape, and the selection that binds the fastest exact one.

pub mod act;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod blocks;
pub mod half;
pub mod jit;
pub mod lut;
pub mod select;
pub mod ternary;
