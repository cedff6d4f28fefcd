//! CUDA code generation: fused kernel specs rendered to CUDA C and compiled with NVRTC.
