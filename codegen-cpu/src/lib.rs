//! CPU code generation: fused kernel specs compiled to native SIMD through Cranelift.
