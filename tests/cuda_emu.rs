//! A [`Device`] that runs the generated CUDA C on the CPU (`cuda_emu.h`): the module is
//! compiled by the host's C++ compiler into a shared library with one trampoline per kernel,
//! device memory is host memory, and a launch runs the grid block by block. It lets the GPU
//! executor (its launches, buffers, cache and the kernels' arithmetic) be tested on machines
//! without a GPU; speed means nothing here.

use bitnetc::codegen_cuda::render::{self, KernelSpec};
use bitnetc::runtime::cuda::{Device, GpuError, KernelArg};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

type Trampoline = unsafe extern "C" fn(*mut *mut c_void);
type Launch = unsafe extern "C" fn(Trampoline, *mut *mut c_void, u32, u32, u32, u32) -> c_int;
type ErrorText = unsafe extern "C" fn() -> *const c_char;

pub struct Emulator {
    /// What the host has read back: floats, and integers (shared with the test).
    pub reads: std::sync::Arc<Reads>,
    dir: tempfile::TempDir,
    lib: Option<libloading::Library>,
    functions: Vec<Trampoline>,
    /// Device memory: 16-byte aligned host allocations.
    memory: Vec<Vec<u128>>,
}

/// Counts of values copied from the device.
#[derive(Default)]
pub struct Reads {
    pub floats: AtomicUsize,
    pub ints: AtomicUsize,
}

fn err(message: String) -> GpuError {
    GpuError::Driver(message)
}

/// Whether the host can build the emulator: an x86-64 machine with a C++ compiler.
pub fn available() -> bool {
    cfg!(target_arch = "x86_64")
        && Command::new("c++")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// `extern "C" void emu_k_NAME(void** a)` calling kernel `NAME` with its arguments read from
/// `a`, for every kernel of `source`.
fn trampolines(source: &str) -> String {
    let mut out = String::new();
    for line in source.lines() {
        let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") else {
            continue;
        };
        let (name, rest) = rest.split_once('(').expect("a kernel's parameters");
        let params = rest.split_once(')').expect("a kernel's parameters").0;
        let args: Vec<String> = params
            .split(", ")
            .enumerate()
            .map(|(i, p)| {
                let ty = p.rsplit_once(' ').expect("a typed parameter").0;
                format!("*({ty}*)a[{i}]")
            })
            .collect();
        out.push_str(&format!(
            "extern \"C\" void emu_k_{name}(void** a) {{ {name}({}); }}\n",
            args.join(", ")
        ));
    }
    out
}

impl Emulator {
    pub fn new() -> Emulator {
        Emulator {
            reads: Default::default(),
            dir: tempfile::tempdir().expect("a temporary folder"),
            lib: None,
            functions: Vec::new(),
            memory: Vec::new(),
        }
    }

    fn lib(&self) -> Result<&libloading::Library, GpuError> {
        self.lib
            .as_ref()
            .ok_or_else(|| err("no module is loaded".into()))
    }

    fn keep(&mut self, words: Vec<u128>) -> u64 {
        let p = words.as_ptr() as u64;
        self.memory.push(words);
        p
    }
}

fn compile(dir: &Path, source: &str) -> Result<std::path::PathBuf, GpuError> {
    let cpp = dir.join("module.cpp");
    let so = dir.join("module.so");
    std::fs::write(&cpp, source).map_err(|e| err(e.to_string()))?;
    let out = Command::new("c++")
        .args([
            "-std=c++17",
            "-O2",
            "-fPIC",
            "-shared",
            "-ffp-contract=off",
            "-w",
        ])
        .arg("-o")
        .arg(&so)
        .arg(&cpp)
        .output()
        .map_err(|e| err(format!("c++: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "c++ failed on the emulated module:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(so)
}

impl Device for Emulator {
    fn name(&self) -> String {
        "CUDA emulated on the CPU".into()
    }

    fn load(&mut self, specs: &[KernelSpec], _ptx: &[(String, String)]) -> Result<(), GpuError> {
        let kernels = render::kernels(specs);
        let source = format!(
            "{}\n{kernels}\n{}",
            include_str!("cuda_emu.h"),
            trampolines(&kernels)
        );
        let so = compile(self.dir.path(), &source)?;
        // SAFETY: the library is the module just compiled; loading runs no constructors of
        // its own beyond the C++ runtime's.
        self.lib = Some(unsafe { libloading::Library::new(&so) }.map_err(|e| err(e.to_string()))?);
        Ok(())
    }

    fn function(&mut self, name: &str) -> Result<usize, GpuError> {
        let symbol = format!("emu_k_{name}");
        // SAFETY: every `emu_k_` symbol is a trampoline of this signature.
        let f = unsafe { self.lib()?.get::<Trampoline>(symbol.as_bytes()) }
            .map_err(|e| err(format!("{name}: {e}")))?;
        self.functions.push(*f);
        Ok(self.functions.len() - 1)
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, GpuError> {
        Ok(self.keep(vec![0u128; bytes.div_ceil(16).max(1)]))
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64, GpuError> {
        let mut words = vec![0u128; bytes.len().div_ceil(16).max(1)];
        // SAFETY: `words` holds at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast(), bytes.len())
        };
        Ok(self.keep(words))
    }

    fn write_i32(&mut self, ptr: u64, values: &[i32]) -> Result<(), GpuError> {
        // SAFETY: the executor writes into its own allocations, large enough (the Device
        // contract).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr as *mut i32, values.len()) };
        Ok(())
    }

    fn read_f32(&mut self, ptr: u64, out: &mut [f32]) -> Result<(), GpuError> {
        self.reads.floats.fetch_add(out.len(), Ordering::Relaxed);
        // SAFETY: as `write_i32`.
        unsafe { std::ptr::copy_nonoverlapping(ptr as *const f32, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn read_i32(&mut self, ptr: u64, out: &mut [i32]) -> Result<(), GpuError> {
        self.reads.ints.fetch_add(out.len(), Ordering::Relaxed);
        // SAFETY: as `write_i32`.
        unsafe { std::ptr::copy_nonoverlapping(ptr as *const i32, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    unsafe fn launch(
        &mut self,
        f: usize,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KernelArg],
    ) -> Result<(), GpuError> {
        let kernel = *self
            .functions
            .get(f)
            .ok_or_else(|| err(format!("no kernel {f}")))?;
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                KernelArg::U64(v) => v,
                KernelArg::I64(v) => v as u64,
                KernelArg::I32(v) => v as u32 as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        let lib = self.lib()?;
        // SAFETY: the library exports these two functions with these signatures
        // (cuda_emu.h); the arguments are the caller's (the Device contract).
        unsafe {
            let launch = lib
                .get::<Launch>(b"emu_launch")
                .map_err(|e| err(e.to_string()))?;
            if launch(kernel, ptrs.as_mut_ptr(), grid.0, grid.1, grid.2, block) != 0 {
                let text = lib
                    .get::<ErrorText>(b"emu_error")
                    .map_err(|e| err(e.to_string()))?;
                return Err(err(CStr::from_ptr(text()).to_string_lossy().into_owned()));
            }
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        Ok(())
    }
}
