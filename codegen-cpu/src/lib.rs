//! CPU code generation: ternary and f16 kernels, hand-written per ISA or generated through
//! Cranelift for each shape, and the selection that binds the fastest exact one.

pub mod act;
pub mod half;
pub mod jit;
pub mod select;
pub mod ternary;
