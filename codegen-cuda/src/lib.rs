//! CUDA code generation: a plan's steps as kernel specs ([`plan::plan_kernels`]), rendered to
//! CUDA C ([`render`]) and compiled to PTX with NVRTC ([`nvrtc`], with the `cuda` feature).
//! Nothing here needs a GPU or a CUDA installation to build: NVRTC is loaded at run time, and
//! every entry point says clearly when it is missing.

pub mod plan;
pub mod render;

#[cfg(feature = "cuda")]
pub mod nvrtc;

/// What went wrong generating or compiling CUDA code.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("step {step} ({op}): no CUDA kernel for {what} yet")]
    Unsupported {
        step: usize,
        op: &'static str,
        what: String,
    },
    #[error(
        "the NVRTC library (libnvrtc.so) was not found: install the CUDA toolkit or the \
         nvidia-cuda-nvrtc-cu12 wheel and put its lib folder on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("unknown GPU architecture `{0}` (sm_80, sm_86, sm_89, sm_90 or compute_XX)")]
    Arch(String),
    #[error("NVRTC failed for {arch}: {message}")]
    Compile { arch: String, message: String },
}
