//! NVRTC through cudarc, loaded at run time.

use crate::CudaError;

/// Whether the NVRTC library can be loaded (no panic when it cannot).
pub fn available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The architectures this crate compiles for by name (NVRTC takes a `'static` string).
const ARCHS: [&str; 10] = [
    "sm_80",
    "sm_86",
    "sm_87",
    "sm_89",
    "sm_90",
    "compute_80",
    "compute_86",
    "compute_89",
    "compute_90",
    "sm_100",
];

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), CudaError> {
    if !available() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile {
            arch: String::new(),
            message: format!("nvrtcVersion: {r:?}"),
        });
    }
    Ok((major, minor))
}

/// The PTX cache folder: `BITNETC_PTX_CACHE`, else `$XDG_CACHE_HOME/bitnetc/ptx`, else
/// `~/.cache/bitnetc/ptx`.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("BITNETC_PTX_CACHE") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    Some(base.join("bitnetc").join("ptx"))
}

/// [`compile_ptx`] through a cache of PTX files in `dir`, keyed by the source's XXH3, the
/// architecture and NVRTC's version; returns the PTX and whether it came from the cache. A
/// cache that cannot be read or written is passed by, never an error.
pub fn compile_ptx_cached(
    source: &str,
    arch: &str,
    dir: Option<&std::path::Path>,
) -> Result<(String, bool), CudaError> {
    let (major, minor) = version()?;
    let key = format!(
        "{:016x}-{arch}-nvrtc{major}.{minor}.ptx",
        xxhash_rust::xxh3::xxh3_64(source.as_bytes())
    );
    if let Some(dir) = dir
        && let Ok(ptx) = std::fs::read_to_string(dir.join(&key))
        && ptx.contains(&format!(".target {arch}"))
    {
        return Ok((ptx, true));
    }
    let ptx = compile_ptx(source, arch)?;
    if let Some(dir) = dir {
        let tmp = dir.join(format!(".{key}.{}", std::process::id()));
        let _ = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, dir.join(&key)));
    }
    Ok((ptx, false))
}

/// Compiles one module's CUDA C to PTX for `arch` (e.g. `sm_90`).
pub fn compile_ptx(source: &str, arch: &str) -> Result<String, CudaError> {
    if !available() {
        return Err(CudaError::NoNvrtc);
    }
    let arch: &'static str = ARCHS
        .iter()
        .find(|a| **a == arch)
        .ok_or_else(|| CudaError::Arch(arch.to_string()))?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        // No contraction of a·b + c into one rounding: the CPU path rounds twice.
        options: vec!["--std=c++17".into(), "--fmad=false".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        let message = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        CudaError::Compile {
            arch: arch.to_string(),
            message,
        }
    })?;
    Ok(ptx.to_src())
}
