//! The plan on an NVIDIA GPU: the kernels of [`bitnetc_codegen_cuda`] compiled by NVRTC for the
//! device's architecture (or PTX compiled ahead of time), weights uploaded once, one device
//! allocation per activation buffer, and the KV cache on the device. The executor drives a
//! [`Device`]: [`Cuda`] (the driver), or another implementation of the same launches.
//!
//! The KV caches of [`GpuOptions::sessions`] sequences live in the executor, one slot each;
//! a step runs for one slot. Every entry point checks that the driver library can be loaded
//! before touching it.

use crate::exec::LogitRows;
use bitnetc_codegen_cuda::render::{
    self, ATTENTION_CHUNK, KernelSpec, NORM_THREADS, ROW_THREADS, TILE_TOKENS, TOKEN_THREADS,
};

/// Output rows per block of the rows kernels: one per warp.
const ROWS: u32 = ROW_THREADS / 32;
use bitnetc_ir::encoding::{Encoding, i2s_scale};
use bitnetc_ir::interp::WeightSource;
use bitnetc_ir::op::Op;
use bitnetc_ir::plan::{BufferId, Plan, Storage};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

/// How a plan runs on a GPU.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// The most tokens of one step.
    pub batch: usize,
    /// Times every launch (the stream synchronized after each, no graphs).
    pub trace: bool,
    /// Re-encodes the output projection's matrix at upload (Q8_0, Q4_0 or Q4_1), as the CPU's
    /// `lm_head` option does.
    pub lm_head: Option<Encoding>,
    /// Sequences whose KV caches the device holds at once (session slots).
    pub sessions: usize,
}

impl Default for GpuOptions {
    fn default() -> GpuOptions {
        GpuOptions {
            batch: 512,
            trace: false,
            lm_head: None,
            sessions: 1,
        }
    }
}

/// One argument of a kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelArg {
    U64(u64),
    I64(i64),
    I32(i32),
}

/// Where a plan's kernels run: device memory, the module of kernels, launches in order on one
/// queue. [`Cuda`] is an NVIDIA GPU through the CUDA driver; the executor works the same on
/// any other implementation (the test suite's runs the CUDA C on the CPU).
pub trait Device: Send {
    /// The device's name and architecture.
    fn name(&self) -> String;
    /// Makes the kernels of `specs` launchable: from `ptx` (architecture, PTX) when one suits
    /// the device, or else compiled from [`render::module`].
    fn load(&mut self, specs: &[KernelSpec], ptx: &[(String, String)]) -> Result<(), GpuError>;
    /// A loaded kernel, by its name, as a handle for [`Device::launch`].
    fn function(&mut self, name: &str) -> Result<usize, GpuError>;
    /// `bytes` of zeroed device memory (at least 16-byte aligned), owned by the device.
    fn alloc(&mut self, bytes: usize) -> Result<u64, GpuError>;
    /// Device memory holding `bytes`, owned by the device.
    fn upload(&mut self, bytes: &[u8]) -> Result<u64, GpuError>;
    /// Copies `values` to `ptr` in queue order: after the launches before, before those that
    /// follow (`values` may be dropped when this returns).
    fn write_i32(&mut self, ptr: u64, values: &[i32]) -> Result<(), GpuError>;
    /// Waits for the launches so far, then copies from `ptr` into `out`.
    fn read_f32(&mut self, ptr: u64, out: &mut [f32]) -> Result<(), GpuError>;
    /// Waits for the launches so far, then copies from `ptr` into `out`.
    fn read_i32(&mut self, ptr: u64, out: &mut [i32]) -> Result<(), GpuError>;
    /// Queues kernel `f` over `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// `args` match the kernel's parameters and point into allocations of this device large
    /// enough for what the kernel reads and writes.
    unsafe fn launch(
        &mut self,
        f: usize,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KernelArg],
    ) -> Result<(), GpuError>;
    /// Waits for every launch so far.
    fn synchronize(&mut self) -> Result<(), GpuError>;
    /// Starts recording the launches that follow into graph `key` instead of running them;
    /// false when the device has no graphs (the launches then run as they come).
    fn begin_capture(&mut self, _key: usize) -> Result<bool, GpuError> {
        Ok(false)
    }
    /// Ends the recording that [`Device::begin_capture`] started.
    fn end_capture(&mut self, _key: usize) -> Result<(), GpuError> {
        Ok(())
    }
    /// Runs recorded graph `key`; false when there is none.
    fn replay(&mut self, _key: usize) -> Result<bool, GpuError> {
        Ok(false)
    }
}

/// What went wrong on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no CUDA driver (libcuda.so could not be loaded): --device cuda needs an NVIDIA GPU and \
         its driver"
    )]
    NoDriver,
    #[error("CUDA: {0}")]
    Driver(String),
    #[error(transparent)]
    Codegen(#[from] bitnetc_codegen_cuda::CudaError),
    #[error("step {step} ({op}): {message}")]
    Step {
        step: usize,
        op: &'static str,
        message: String,
    },
    #[error("weight {name}: {message}")]
    Weight { name: String, message: String },
    #[error("token {id} at index {index} is outside the vocabulary of {vocab}")]
    Token { id: u32, index: usize, vocab: usize },
}

fn driver(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("{e:?}"))
}

/// Whether the CUDA driver library can be loaded (no panic when it cannot).
pub fn driver_available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Grid shapes, resolved per step from the tokens `T` and cached positions.
#[derive(Clone, Copy, Debug)]
enum Grid {
    /// `rows` blocks per token (`rows` = tokens × this).
    PerToken(u32),
    /// `(⌈m/per⌉, T)`: `per` output rows per block.
    Rows(u64, u32),
    /// `(⌈m/per⌉, ⌈T/TILE_TOKENS⌉)`: `per` output rows and [`TILE_TOKENS`] tokens per block.
    Tiles(u64, u32),
    /// `⌈T·n/256⌉` blocks over `T·n` elements.
    Elems(u64),
    /// `(T, heads)`.
    TokenHeads(u32),
    /// `(T, heads, chunks)`: `chunks` for the whole cache; a step launches those that hold
    /// its positions.
    TokenHeadsChunks(u32, u32),
}

#[derive(Clone, Copy, Debug)]
enum Arg {
    Ptr(u64),
    /// An activation row pointer: the buffer, and its bytes per token (offset for the head's
    /// last row).
    Row(u64, u64),
    /// `T·n` as a 64-bit integer.
    Total(u64),
    /// A 32-bit constant.
    I32(i32),
    /// The step's token count `T`, as a 32-bit integer.
    Tokens,
    /// A KV cache: the first slot's memory and the bytes of one slot (the session's slot picks
    /// its memory).
    Slot(u64, u64),
}

/// Which steps a launch is part of, by their number of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tokens {
    Any,
    One,
    Several,
}

struct Launch {
    f: usize,
    tokens: Tokens,
    /// The kernel's name, for the trace.
    name: String,
    grid: Grid,
    block: u32,
    /// Part of the output projection: runs for the last token alone when only its logits are
    /// wanted.
    head: bool,
    args: Vec<Arg>,
}

/// A plan bound to one GPU.
pub struct CudaExecutor {
    dev: Box<dyn Device>,
    launches: Vec<Launch>,
    tokens_ptr: u64,
    positions_ptr: u64,
    logits_ptr: u64,
    /// The argmax kernel over the logits of the last token, and its one-integer result.
    argmax: (usize, u64),
    /// Rows of the embedding table: token ids must be below.
    embed_rows: Option<usize>,
    batch: usize,
    capacity: usize,
    vocab: usize,
    /// The device's name and compute capability.
    pub device: String,
    /// Session slots.
    sessions: usize,
    /// Per session slot and number of attention chunks in use (`slot · (chunks + 1) + n`):
    /// whether the launches of a one-token step have been captured into a graph.
    captured: Vec<bool>,
    /// Chunks of [`ATTENTION_CHUNK`] positions of the cache.
    chunks: usize,
    /// Whether one-token steps run as a graph (`BITNETC_CUDA_GRAPHS=0` turns it off).
    graphs: bool,
    /// Per launch (in order), for one-token steps and for larger ones: calls and time, when
    /// tracing.
    trace: Option<Vec<[(u64, std::time::Duration); 2]>>,
}

/// TQ1_0/TQ2_0 codes (0..2, whole 256-value blocks) in the layout of
/// [`KernelSpec::TernaryBlocks`]: per block 16 words, byte `j` of word `i` holding the codes of
/// values `16i + 4l + j` at bits `2l`.
fn pack_blocks(codes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    codes.chunks_exact(16).map(|c| {
        (0..16).fold(0u32, |word, e| {
            let (l, j) = (e / 4, e % 4);
            word | (c[e] as u32) << (8 * j + 2 * l)
        })
    })
}

/// A captured graph. The device holds it and is used by one thread at a time (the executor
/// sits in the engine's mutex); the graph is only launched from there.
struct Graph(cudarc::driver::CudaGraph);
// SAFETY: the graph is reached only through `&mut Cuda`, from one thread at a time.
unsafe impl Send for Graph {}

/// An NVIDIA GPU through the CUDA driver: one context, one stream, one module.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Compute capability as `10·major + minor`.
    cc: i32,
    name: String,
    module: Option<Arc<CudaModule>>,
    functions: Vec<CudaFunction>,
    /// Owned device memory: weights, activations, cache, scratch.
    memory: Vec<CudaSlice<u8>>,
    /// The launches of a one-token step, captured once per key (session slot) and replayed.
    graphs: Vec<Option<Graph>>,
    /// Whether launches may overlap the kernel before them (programmatic dependent launch):
    /// asked for with `BITNETC_CUDA_PDL=1`, and used on sm_90 and later when every kernel of
    /// the module waits for its inputs (`griddepcontrol.wait`, see `render::PRIMITIVES`).
    pdl: bool,
    pdl_wanted: bool,
    /// What the device's name adds about it.
    pdl_note: &'static str,
}

impl Cuda {
    /// GPU `ordinal`, after checking that the driver library loads.
    pub fn new(ordinal: usize) -> Result<Cuda, GpuError> {
        if !driver_available() {
            return Err(GpuError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let (major, minor) = ctx.compute_capability().map_err(driver)?;
        let name = format!(
            "{} (sm_{major}{minor})",
            ctx.name().unwrap_or_else(|_| "GPU".into())
        );
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(driver)?;
        Ok(Cuda {
            ctx,
            stream,
            cc: major * 10 + minor,
            name,
            module: None,
            functions: Vec::new(),
            memory: Vec::new(),
            graphs: Vec::new(),
            pdl: false,
            pdl_wanted: std::env::var("BITNETC_CUDA_PDL").is_ok_and(|v| v == "1"),
            pdl_note: "",
        })
    }

    fn keep(&mut self, m: CudaSlice<u8>) -> u64 {
        let p = {
            let (p, _sync) = m.device_ptr(&self.stream);
            p
        };
        self.memory.push(m);
        p
    }
}

impl Device for Cuda {
    fn name(&self) -> String {
        format!("{}{}", self.name, self.pdl_note)
    }

    /// PTX from `ptx`: the newest `sm_XY` not newer than the device, which the driver compiles
    /// for it; else NVRTC for the device's own architecture (cached).
    fn load(&mut self, specs: &[KernelSpec], ptx: &[(String, String)]) -> Result<(), GpuError> {
        let cc = self.cc;
        let ahead = ptx
            .iter()
            .filter_map(|(arch, p)| {
                let n: i32 = arch.strip_prefix("sm_")?.parse().ok()?;
                (n <= cc).then_some((n, p))
            })
            .max_by_key(|(n, _)| *n)
            .map(|(_, p)| p.clone());
        let ptx = match ahead {
            Some(p) => p,
            None => {
                bitnetc_codegen_cuda::nvrtc::compile_ptx_cached(
                    &render::module(specs),
                    &format!("sm_{cc}"),
                    bitnetc_codegen_cuda::nvrtc::cache_dir().as_deref(),
                )?
                .0
            }
        };
        // A kernel that does not wait for its inputs (PTX for an older architecture, or from a
        // plan compiled by an older bitnetc) must not start before the one before it ends.
        self.pdl = self.pdl_wanted && self.cc >= 90 && render::every_kernel_awaits_inputs(&ptx);
        self.pdl_note = match (self.pdl_wanted, self.pdl) {
            (false, _) => "",
            (true, true) => ", programmatic dependent launch",
            (true, false) if self.cc < 90 => {
                ", BITNETC_CUDA_PDL=1 not used: the GPU is older than sm_90"
            }
            (true, false) => {
                ", BITNETC_CUDA_PDL=1 not used: a kernel of the module does not wait for its inputs"
            }
        };
        self.module = Some(self.ctx.load_module(Ptx::from_src(ptx)).map_err(driver)?);
        Ok(())
    }

    fn function(&mut self, name: &str) -> Result<usize, GpuError> {
        let module = self
            .module
            .as_ref()
            .ok_or_else(|| GpuError::Driver("no module is loaded".into()))?;
        self.functions
            .push(module.load_function(name).map_err(driver)?);
        Ok(self.functions.len() - 1)
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, GpuError> {
        let m = self
            .stream
            .alloc_zeros::<u8>(bytes.max(4))
            .map_err(driver)?;
        Ok(self.keep(m))
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64, GpuError> {
        let m = self.stream.clone_htod(bytes).map_err(driver)?;
        Ok(self.keep(m))
    }

    fn write_i32(&mut self, ptr: u64, values: &[i32]) -> Result<(), GpuError> {
        // SAFETY: the executor writes its input buffers, which hold `batch` ≥ values.len()
        // values; the copy is ordered on the stream, and a copy from pageable memory has read
        // `values` (into a staging buffer) when it returns.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(ptr, values, self.stream.cu_stream())
                .map_err(driver)
        }
    }

    fn read_f32(&mut self, ptr: u64, out: &mut [f32]) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver)?;
        // SAFETY: the executor reads its logits buffer, which holds at least `out.len()`
        // floats.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, ptr).map_err(driver) }
    }

    fn read_i32(&mut self, ptr: u64, out: &mut [i32]) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver)?;
        // SAFETY: as `read_f32`, for an integer buffer.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, ptr).map_err(driver) }
    }

    unsafe fn launch(
        &mut self,
        f: usize,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KernelArg],
    ) -> Result<(), GpuError> {
        let f = self
            .functions
            .get(f)
            .ok_or_else(|| GpuError::Driver(format!("no kernel {f}")))?;
        if self.pdl {
            use cudarc::driver::sys;
            let mut params: Vec<*mut std::ffi::c_void> = args
                .iter()
                .map(|a| match a {
                    KernelArg::U64(p) => p as *const u64 as *mut std::ffi::c_void,
                    KernelArg::I64(n) => n as *const i64 as *mut std::ffi::c_void,
                    KernelArg::I32(n) => n as *const i32 as *mut std::ffi::c_void,
                })
                .collect();
            // SAFETY: a plain C struct and union, for which all zeros is valid.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: 0,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: the caller's contract for the arguments; `params` points at them and
            // `cfg` at `attr`, all alive for the call, which copies what it needs.
            return unsafe {
                sys::cuLaunchKernelEx(
                    &cfg,
                    f.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .map_err(driver);
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = self.stream.launch_builder(f);
        for a in args {
            match a {
                KernelArg::U64(p) => builder.arg(p),
                KernelArg::I64(n) => builder.arg(n),
                KernelArg::I32(n) => builder.arg(n),
            };
        }
        // SAFETY: the caller's contract.
        unsafe { builder.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver)
    }

    fn begin_capture(&mut self, _key: usize) -> Result<bool, GpuError> {
        self.stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(driver)?;
        Ok(true)
    }

    fn end_capture(&mut self, key: usize) -> Result<(), GpuError> {
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(driver)?;
        if self.graphs.len() <= key {
            self.graphs.resize_with(key + 1, || None);
        }
        self.graphs[key] = graph.map(Graph);
        Ok(())
    }

    fn replay(&mut self, key: usize) -> Result<bool, GpuError> {
        match self.graphs.get(key).and_then(Option::as_ref) {
            Some(g) => {
                g.0.launch().map_err(driver)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl CudaExecutor {
    /// GPU `ordinal` through the CUDA driver: see [`CudaExecutor::on`].
    pub fn new(
        plan: &Plan,
        weights: &dyn WeightSource,
        capacity: usize,
        ordinal: usize,
        ptx: &[(String, String)],
        opts: &GpuOptions,
    ) -> Result<CudaExecutor, GpuError> {
        let dev = Box::new(Cuda::new(ordinal)?);
        CudaExecutor::on(dev, plan, weights, capacity, ptx, opts)
    }

    /// Loads `plan`'s kernels on `dev` (from `ptx`, architecture and PTX, when one suits it),
    /// uploads the weights, and allocates `capacity` cache positions and room for
    /// `opts.batch` tokens per step.
    pub fn on(
        mut dev: Box<dyn Device>,
        plan: &Plan,
        weights: &dyn WeightSource,
        capacity: usize,
        ptx: &[(String, String)],
        opts: &GpuOptions,
    ) -> Result<CudaExecutor, GpuError> {
        let batch = opts.batch.max(1);
        let specs = bitnetc_codegen_cuda::plan::plan_kernels_with(plan, opts.lm_head)?;
        dev.load(&specs, ptx)?;
        let device = dev.name();
        let head = match (opts.lm_head, bitnetc_codegen_cuda::plan::head_step(plan)) {
            (Some(e), Some(s)) => plan.steps[s].operands.get(1).map(|&w| (w, e, 0)),
            _ => None,
        };
        let mut b = Builder {
            head,
            plan,
            weights,
            dev: dev.as_mut(),
            ptrs: vec![0; plan.buffers.len()],
            batch,
            capacity,
            launches: Vec::new(),
            betas: Vec::new(),
            positions: 0,
            plain: std::env::var("BITNETC_CUDA_PLAIN").is_ok_and(|v| v == "1"),
            fusions: Vec::new(),
            sessions: opts.sessions.max(1),
            caches: Vec::new(),
        };
        b.allocate()?;
        // Scratch for the linear prologues: rows of the widest linear input.
        let max_k = specs
            .iter()
            .filter_map(|s| match s {
                KernelSpec::NormQuant { k, .. }
                | KernelSpec::NormQ8K { k, .. }
                | KernelSpec::NormQ8 { k, .. }
                | KernelSpec::RmsNorm { k, .. } => Some(*k),
                _ => None,
            })
            .max()
            .unwrap_or(1);
        let q = b.alloc(batch * max_k as usize)?;
        let s = b.alloc(batch * 4)?;
        let xn = b.alloc(batch * max_k as usize * 4)?;
        // Activation block scales (Q8_0: one per 32 values, Q8_K: per 256) and Q8_0's d·Σq.
        let d8 = b.alloc(batch * max_k.div_ceil(32) as usize * 4)?;
        let s8 = b.alloc(batch * max_k.div_ceil(32) as usize * 4)?;
        let mut kernels = specs.into_iter();
        let input = |b: &Builder, name: &str| {
            plan.buffers
                .iter()
                .position(|buf| matches!(&buf.storage, Storage::Input { name: n } if n == name))
                .map_or(0, |i| b.ptrs[i])
        };
        let (tokens_ptr, positions_ptr) = (input(&b, "tokens"), input(&b, "positions"));
        b.positions = positions_ptr;
        let logits_buffer = plan.steps.iter().find_map(|s| match &s.op {
            Op::Output { name } if name == "logits" => s.operands.first().copied(),
            _ => None,
        });
        let fusions = bitnetc_codegen_cuda::plan::qkv_fusions(plan);
        b.fusions = fusions.clone();
        for (i, step) in plan.steps.iter().enumerate() {
            if fusions.iter().any(|f| f.absorbs(i)) {
                continue;
            }
            if let Some(f) = fusions.iter().find(|f| f.split == i) {
                b.qkv_rope_append(f, &mut kernels)?;
                continue;
            }
            let head = logits_buffer.is_some() && step.results.first().copied() == logits_buffer;
            b.step(i, step, head, &mut kernels, (q, s, xn, d8, s8))?;
        }
        let (logits, vocab) = match logits_buffer {
            Some(l) => (
                b.ptrs[l as usize],
                plan.buffers[l as usize]
                    .ty
                    .shape
                    .last()
                    .and_then(|d| d.fixed())
                    .unwrap_or(0) as usize,
            ),
            None => {
                return Err(GpuError::Step {
                    step: plan.steps.len(),
                    op: "output",
                    message: "the plan has no `logits` output".into(),
                });
            }
        };
        let argmax = match kernels.next() {
            Some(spec @ KernelSpec::Argmax { .. }) => {
                let f = b.dev.function(&spec.name())?;
                (f, b.alloc(4)?)
            }
            other => {
                return Err(GpuError::Step {
                    step: plan.steps.len(),
                    op: "output",
                    message: format!(
                        "expected the argmax kernel last, got {}",
                        other.map_or("nothing".into(), |k| k.name())
                    ),
                });
            }
        };
        let launches = b.launches;
        let mut exec = CudaExecutor {
            dev,
            launches,
            tokens_ptr,
            positions_ptr,
            logits_ptr: logits,
            argmax,
            embed_rows: plan
                .steps
                .iter()
                .find(|s| matches!(s.op, Op::Embed))
                .and_then(|s| s.operands.get(1))
                .and_then(|&b| plan.buffers.get(b as usize)?.ty.shape.first()?.fixed())
                .map(|r| r as usize),
            batch,
            capacity,
            vocab,
            device,
            sessions: opts.sessions.max(1),
            captured: vec![
                false;
                opts.sessions.max(1) * (capacity.div_ceil(ATTENTION_CHUNK as usize) + 1)
            ],
            chunks: capacity.div_ceil(ATTENTION_CHUNK as usize),
            graphs: std::env::var("BITNETC_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            trace: None,
        };
        if opts.trace {
            exec.enable_trace();
        }
        Ok(exec)
    }

    /// Times every launch from now on (the stream is synchronized after each, and no graph
    /// runs), for [`CudaExecutor::trace`].
    pub fn enable_trace(&mut self) {
        self.trace = Some(vec![
            [(0, std::time::Duration::ZERO); 2];
            self.launches.len()
        ]);
    }

    /// Sets the trace's counts back to zero (work before a measurement).
    pub fn reset_trace(&mut self) {
        for sizes in self.trace.iter_mut().flatten() {
            *sizes = Default::default();
        }
    }

    /// Per kernel and step size (`name [1]` for one-token steps, `name [T]` for larger
    /// ones): calls and total time, the slowest first (empty unless tracing).
    pub fn trace(&self) -> Vec<(String, u64, std::time::Duration)> {
        let mut by: Vec<(String, u64, std::time::Duration)> = Vec::new();
        for (l, sizes) in self.launches.iter().zip(self.trace.iter().flatten()) {
            for (size, (calls, time)) in ["[1]", "[T]"].iter().zip(sizes) {
                if *calls == 0 {
                    continue;
                }
                let name = format!("{} {size}", l.name);
                match by.iter_mut().find(|e| e.0 == name) {
                    Some(e) => {
                        e.1 += calls;
                        e.2 += *time;
                    }
                    None => by.push((name, *calls, *time)),
                }
            }
        }
        by.sort_by_key(|e| std::cmp::Reverse(e.2));
        by
    }

    /// Positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Evaluates `tokens` at positions `pos0..`, in steps of at most the batch size, and
    /// returns their logits (every row, or the last token's).
    pub fn eval(
        &mut self,
        slot: usize,
        tokens: &[u32],
        pos0: usize,
        rows: LogitRows,
    ) -> Result<Vec<f32>, GpuError> {
        self.check_slot(slot)?;
        self.check_tokens(tokens)?;
        let mut out = Vec::new();
        let mut at = 0;
        while at < tokens.len() {
            let t = (tokens.len() - at).min(self.batch);
            let last = at + t == tokens.len();
            let only_last = rows == LogitRows::Last;
            if only_last && !last {
                self.step(slot, &tokens[at..at + t], pos0 + at, None)?;
            } else {
                self.step(slot, &tokens[at..at + t], pos0 + at, Some(only_last))?;
                let n = if only_last { 1 } else { t } * self.vocab;
                let at = out.len();
                out.resize(at + n, 0.0);
                self.dev.read_f32(self.logits_ptr, &mut out[at..])?;
            }
            at += t;
        }
        Ok(out)
    }

    /// Evaluates `tokens` at positions `pos0..` as [`CudaExecutor::eval`] does for the last
    /// token's logits, and returns the index of their largest value (the lowest on ties),
    /// found on the device: only that index is copied back.
    pub fn eval_argmax(
        &mut self,
        slot: usize,
        tokens: &[u32],
        pos0: usize,
    ) -> Result<u32, GpuError> {
        self.check_slot(slot)?;
        self.check_tokens(tokens)?;
        let mut at = 0;
        while at < tokens.len() {
            let t = (tokens.len() - at).min(self.batch);
            let last = at + t == tokens.len();
            self.step(slot, &tokens[at..at + t], pos0 + at, last.then_some(true))?;
            at += t;
        }
        let (f, out) = self.argmax;
        let args = [KernelArg::U64(self.logits_ptr), KernelArg::U64(out)];
        // SAFETY: the kernel reads the `vocab` logits of the last token (the head ran for it
        // alone, at the start of the logits buffer) and writes one integer to `out`.
        unsafe { self.dev.launch(f, (1, 1, 1), 1024, &args)? };
        let mut id = [0i32];
        self.dev.read_i32(out, &mut id)?;
        Ok(id[0] as u32)
    }

    /// Session slots the executor holds caches for.
    pub fn sessions(&self) -> usize {
        self.sessions
    }

    fn check_slot(&self, slot: usize) -> Result<(), GpuError> {
        if slot >= self.sessions() {
            return Err(GpuError::Driver(format!(
                "session slot {slot} of {}",
                self.sessions()
            )));
        }
        Ok(())
    }

    /// Token ids the embedding table has rows for, before any reaches the device.
    fn check_tokens(&self, tokens: &[u32]) -> Result<(), GpuError> {
        match self.embed_rows {
            Some(vocab) => match tokens.iter().position(|&t| t as usize >= vocab) {
                Some(index) => Err(GpuError::Token {
                    id: tokens[index],
                    index,
                    vocab,
                }),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Queues one step of `T ≤ batch` tokens (reading its results waits for it; the next
    /// step's inputs are copied after it); `logits` says whether the head runs, and for the
    /// last token alone. Attention launches only the chunks of the cache that hold the step's
    /// positions. A one-token step with logits runs as a CUDA graph, captured the first time
    /// for its slot and number of chunks.
    fn step(
        &mut self,
        slot: usize,
        tokens: &[u32],
        pos0: usize,
        logits: Option<bool>,
    ) -> Result<(), GpuError> {
        let t = tokens.len();
        let ids: Vec<i32> = tokens.iter().map(|&v| v as i32).collect();
        let pos: Vec<i32> = (0..t as i32).map(|i| pos0 as i32 + i).collect();
        self.dev.write_i32(self.tokens_ptr, &ids)?;
        self.dev.write_i32(self.positions_ptr, &pos)?;
        let chunks = (pos0 + t)
            .div_ceil(ATTENTION_CHUNK as usize)
            .min(self.chunks);
        if self.trace.is_none() && self.graphs && t == 1 && logits.is_some() {
            let key = slot * (self.chunks + 1) + chunks;
            if !self.captured[key] && self.dev.begin_capture(key)? {
                let enqueued = self.enqueue(slot, 1, logits, chunks);
                let ended = self.dev.end_capture(key);
                enqueued?;
                ended?;
                self.captured[key] = true;
            }
            if self.dev.replay(key)? {
                return Ok(());
            }
        }
        self.enqueue(slot, t, logits, chunks)
    }

    /// Puts the launches of a step of `t` tokens on the stream (timing each when tracing),
    /// attention over its first `chunks` chunks.
    fn enqueue(
        &mut self,
        slot: usize,
        t: usize,
        logits: Option<bool>,
        chunks: usize,
    ) -> Result<(), GpuError> {
        for (n, l) in self.launches.iter().enumerate() {
            let last_only = l.head && logits == Some(true);
            if l.head && logits.is_none() {
                continue;
            }
            let tk = if last_only { 1 } else { t } as u64;
            if (l.tokens == Tokens::One && tk != 1) || (l.tokens == Tokens::Several && tk == 1) {
                continue;
            }
            let grid = match l.grid {
                Grid::PerToken(n) => (tk as u32 * n, 1, 1),
                Grid::Rows(m, per) => (m.div_ceil(per as u64) as u32, tk as u32, 1),
                Grid::Tiles(m, per) => (
                    m.div_ceil(per as u64) as u32,
                    tk.div_ceil(TILE_TOKENS as u64) as u32,
                    1,
                ),
                Grid::Elems(n) => ((tk * n).div_ceil(256) as u32, 1, 1),
                Grid::TokenHeads(h) => (tk as u32, h, 1),
                Grid::TokenHeadsChunks(h, c) => (tk as u32, h, c.min(chunks as u32)),
            };
            let mut values = [KernelArg::I32(0); MAX_ARGS];
            for (v, a) in values.iter_mut().zip(&l.args) {
                *v = match *a {
                    Arg::Ptr(p) => KernelArg::U64(p),
                    Arg::Row(p, row) => KernelArg::U64(if last_only {
                        p + (t as u64 - 1) * row
                    } else {
                        p
                    }),
                    Arg::Total(n) => KernelArg::I64((tk * n) as i64),
                    Arg::I32(v) => KernelArg::I32(v),
                    Arg::Tokens => KernelArg::I32(tk as i32),
                    Arg::Slot(p, bytes) => KernelArg::U64(p + slot as u64 * bytes),
                };
            }
            let start = std::time::Instant::now();
            // SAFETY: the arguments match the kernel's signature (render.rs) and point into
            // allocations sized for `batch` tokens and `capacity` positions.
            unsafe {
                self.dev
                    .launch(l.f, grid, l.block, &values[..l.args.len()])?
            };
            if let Some(trace) = &mut self.trace {
                self.dev.synchronize()?;
                let size = usize::from(t > 1);
                trace[n][size].0 += 1;
                trace[n][size].1 += start.elapsed();
            }
        }
        Ok(())
    }
}

/// The most arguments a kernel takes.
const MAX_ARGS: usize = 12;

struct Builder<'a> {
    plan: &'a Plan,
    weights: &'a dyn WeightSource,
    dev: &'a mut dyn Device,
    ptrs: Vec<u64>,
    batch: usize,
    capacity: usize,
    launches: Vec<Launch>,
    /// Per I2_S weight buffer: its per-row scales.
    betas: Vec<(BufferId, u64)>,
    /// The positions input (read by the cache append and attention).
    positions: u64,
    /// The plan's fused Q/K/V splits.
    fusions: Vec<bitnetc_codegen_cuda::plan::QkvFusion>,
    /// Session slots: each KV cache buffer holds this many caches of `capacity` positions.
    sessions: usize,
    /// Per KV cache buffer: its memory and the bytes of one slot.
    caches: Vec<(u64, u64)>,
    /// Whether I2_S layers run as their prologue and one-row-per-warp rows kernel in every
    /// step (`BITNETC_CUDA_PLAIN=1`), instead of one fused kernel for one token and token
    /// tiles for several.
    plain: bool,
    /// The output projection's weight buffer, the encoding it is re-encoded to, and where the
    /// re-encoded matrix is (once uploaded).
    head: Option<(BufferId, Encoding, u64)>,
}

impl Builder<'_> {
    fn launch(
        &mut self,
        spec: &KernelSpec,
        grid: Grid,
        block: u32,
        head: bool,
        args: Vec<Arg>,
    ) -> Result<(), GpuError> {
        self.launch_named(spec.name(), grid, block, head, args)
    }

    fn launch_named(
        &mut self,
        name: String,
        grid: Grid,
        block: u32,
        head: bool,
        args: Vec<Arg>,
    ) -> Result<(), GpuError> {
        self.launch_for(Tokens::Any, name, grid, block, head, args)
    }

    fn launch_for(
        &mut self,
        tokens: Tokens,
        name: String,
        grid: Grid,
        block: u32,
        head: bool,
        args: Vec<Arg>,
    ) -> Result<(), GpuError> {
        if args.len() > MAX_ARGS {
            return Err(GpuError::Driver(format!(
                "{name} takes {} arguments",
                args.len()
            )));
        }
        // KV caches are per session slot.
        let args = args
            .into_iter()
            .map(|a| match a {
                Arg::Ptr(p) => match self.caches.iter().find(|c| c.0 == p) {
                    Some(&(p, bytes)) => Arg::Slot(p, bytes),
                    None => a,
                },
                a => a,
            })
            .collect();
        let f = self.dev.function(&name)?;
        self.launches.push(Launch {
            f,
            tokens,
            name,
            grid,
            block,
            head,
            args,
        });
        Ok(())
    }

    /// The launches of one step, taking its kernels from `specs` (in `plan_kernels`' order).
    fn step(
        &mut self,
        i: usize,
        step: &bitnetc_ir::plan::Step,
        head: bool,
        specs: &mut impl Iterator<Item = KernelSpec>,
        (q, s, xn, d8, s8): (u64, u64, u64, u64, u64),
    ) -> Result<(), GpuError> {
        let err = |message: String| GpuError::Step {
            step: i,
            op: step.op.name(),
            message,
        };
        let mut next = || {
            specs
                .next()
                .ok_or_else(|| err("the kernel list ended early".into()))
        };
        let ptrs = self.ptrs.clone();
        let plan = self.plan;
        let p = |b: Option<&BufferId>| -> Result<u64, GpuError> {
            b.map(|&b| ptrs[b as usize])
                .ok_or_else(|| err("an operand or result is missing".into()))
        };
        let row_bytes = |b: BufferId| -> u64 { plan.buffers[b as usize].row_bytes().unwrap_or(0) };
        let (o, r) = (&step.operands, &step.results);
        match &step.op {
            Op::Input { .. }
            | Op::Weight { .. }
            | Op::Output { .. }
            | Op::Reshape { .. }
            | Op::WeightConcat
            | Op::Repack { .. } => {}
            Op::Embed => {
                let spec = next()?;
                let args = vec![
                    Arg::Ptr(p(o.first())?),
                    Arg::Ptr(p(o.get(1))?),
                    Arg::Ptr(p(r.first())?),
                ];
                self.launch(&spec, Grid::PerToken(1), TOKEN_THREADS, false, args)?;
            }
            Op::RmsNorm { .. } => {
                let spec = next()?;
                let KernelSpec::RmsNorm { k, .. } = spec else {
                    return Err(err(format!("expected rms_norm, got {}", spec.name())));
                };
                let rows = (row_bytes(o[0]) / 4 / k) as u32;
                let args = vec![
                    Arg::Ptr(p(o.first())?),
                    Arg::Ptr(p(o.get(1))?),
                    Arg::Ptr(p(r.first())?),
                ];
                self.launch(&spec, Grid::PerToken(rows), TOKEN_THREADS, false, args)?;
            }
            Op::QuantAct | Op::TMatmul | Op::Matmul { .. } => {
                return Err(err(
                    "an unfused matmul: the CUDA backend runs the default passes' fused linear \
                     steps"
                        .into(),
                ));
            }
            Op::Linear { norm, residual, .. } => {
                let x = *o.first().ok_or_else(|| err("no input".into()))?;
                let w = *o.get(1).ok_or_else(|| err("no weight".into()))?;
                let gain = if norm.is_some() { p(o.get(2))? } else { 0 };
                let res = if *residual {
                    Arg::Row(
                        p(o.get(if norm.is_some() { 3 } else { 2 }))?,
                        row_bytes(r[0]),
                    )
                } else {
                    Arg::Ptr(0)
                };
                let xr = Arg::Row(p(Some(&x))?, row_bytes(x));
                let out = Arg::Ptr(p(r.first())?);
                let w_ptr = Arg::Ptr(match self.head {
                    Some((b, _, at)) if b == w && head => at,
                    _ => p(Some(&w))?,
                });
                // A prologue (norm, activation quantization) and the rows after it, or rows.
                let first = next()?;
                let (prologue, rows) = if first.output_rows().is_some() {
                    (None, first)
                } else {
                    (Some(first), next()?)
                };
                let m = rows
                    .output_rows()
                    .ok_or_else(|| err(format!("expected a rows kernel, got {}", rows.name())))?;
                let scales = || {
                    self.betas
                        .iter()
                        .find(|(b, _)| *b == w)
                        .map(|(_, p)| Arg::Ptr(*p))
                        .ok_or_else(|| err("the weight's scales are missing".into()))
                };
                let (gain, q, s, xn, d8, s8) = (
                    Arg::Ptr(gain),
                    Arg::Ptr(q),
                    Arg::Ptr(s),
                    Arg::Ptr(xn),
                    Arg::Ptr(d8),
                    Arg::Ptr(s8),
                );
                let (before, rows_args, grid) = match (&prologue, &rows) {
                    (Some(KernelSpec::NormQuant { .. }), KernelSpec::Ternary { .. }) => (
                        (vec![xr, gain, q, s], NORM_THREADS),
                        vec![w_ptr, q, s, scales()?, res, out],
                        Grid::Rows(m, ROWS),
                    ),
                    (Some(KernelSpec::NormQ8 { .. }), KernelSpec::QuantRows { .. }) => (
                        (vec![xr, gain, xn, q, d8, s8], NORM_THREADS),
                        vec![w_ptr, q, d8, s8, res, out],
                        Grid::Rows(m, 16),
                    ),
                    (Some(KernelSpec::NormQ8K { .. }), KernelSpec::TernaryBlocks { .. }) => (
                        (vec![xr, gain, xn, q, d8], NORM_THREADS),
                        vec![w_ptr, q, d8, scales()?, res, out],
                        Grid::Rows(m, ROWS),
                    ),
                    (Some(KernelSpec::RmsNorm { .. }), KernelSpec::FloatRows { .. }) => (
                        (vec![xr, gain, xn], TOKEN_THREADS),
                        vec![w_ptr, xn, res, out],
                        Grid::Rows(m, ROWS),
                    ),
                    (None, KernelSpec::FloatRows { .. }) => (
                        (Vec::new(), 0),
                        vec![w_ptr, xr, res, out],
                        Grid::Rows(m, ROWS),
                    ),
                    (p, r) => {
                        return Err(err(format!(
                            "unexpected kernels {} and {}",
                            p.as_ref().map_or("(none)".into(), |p| p.name()),
                            r.name()
                        )));
                    }
                };
                // I2_S rows come with their one-token form (prologue and rows in one kernel)
                // and their form in tiles of tokens.
                let forms = match &rows {
                    KernelSpec::Ternary { .. } => {
                        let (fused, tiles) = (next()?, next()?);
                        match (fused.rows_per_block(), tiles.rows_per_block()) {
                            (Some(fused_per), Some(per))
                                if matches!(fused, KernelSpec::NormTernary { .. }) =>
                            {
                                Some((fused, fused_per, tiles, per))
                            }
                            _ => {
                                return Err(err(format!(
                                    "expected the fused and tiled forms of {}, got {} and {}",
                                    rows.name(),
                                    fused.name(),
                                    tiles.name()
                                )));
                            }
                        }
                    }
                    _ => None,
                };
                let mut rows = (rows.name(), grid, rows_args, Tokens::Any);
                if let Some((fused, fused_per, tiles, per)) = forms
                    && !self.plain
                {
                    let args = vec![w_ptr, xr, gain, scales()?, res, out];
                    let grid = Grid::Rows(m, fused_per);
                    self.launch_for(Tokens::One, fused.name(), grid, ROW_THREADS, head, args)?;
                    let mut args = rows.2;
                    args.push(Arg::Tokens);
                    rows = (tiles.name(), Grid::Tiles(m, per), args, Tokens::Several);
                }
                let (name, grid, args, tokens) = rows;
                if let Some(p) = &prologue {
                    let (before, threads) = before;
                    self.launch_for(tokens, p.name(), Grid::PerToken(1), threads, head, before)?;
                }
                self.launch_for(tokens, name, grid, ROW_THREADS, head, args)?;
            }
            Op::Mul | Op::Add | Op::Act { .. } => {
                let spec = next()?;
                if !matches!(spec, KernelSpec::Binary { .. } | KernelSpec::Act { .. }) {
                    return Err(err(format!("unexpected kernel {}", spec.name())));
                }
                let per_token = row_bytes(r[0]) / 4;
                let mut args = vec![Arg::Ptr(p(o.first())?)];
                if !matches!(step.op, Op::Act { .. }) {
                    args.push(Arg::Ptr(p(o.get(1))?));
                }
                args.push(Arg::Ptr(p(r.first())?));
                args.push(Arg::Total(per_token));
                self.launch(&spec, Grid::Elems(per_token), 256, false, args)?;
            }
            Op::Split { sizes } => {
                for (j, &cols) in sizes.iter().enumerate() {
                    let spec = next()?;
                    let args = vec![
                        Arg::Ptr(p(o.first())?),
                        Arg::Ptr(p(r.get(j))?),
                        Arg::Total(cols),
                    ];
                    self.launch(&spec, Grid::Elems(cols), 256, false, args)?;
                }
            }
            Op::Rope { .. } => {
                let spec = next()?;
                let KernelSpec::Rope { heads, .. } = spec else {
                    return Err(err(format!("unexpected kernel {}", spec.name())));
                };
                let args = vec![
                    Arg::Ptr(p(o.first())?),
                    Arg::Ptr(p(r.first())?),
                    Arg::Ptr(p(o.get(1))?),
                ];
                self.launch(&spec, Grid::TokenHeads(heads as u32), 64, false, args)?;
            }
            Op::KvAppend { .. } => {
                let spec = next()?;
                let args = vec![
                    Arg::Ptr(p(o.first())?),
                    Arg::Ptr(p(o.get(1))?),
                    Arg::Ptr(p(r.first())?),
                    Arg::Ptr(p(r.get(1))?),
                    Arg::Ptr(self.positions),
                ];
                self.launch(&spec, Grid::PerToken(1), TOKEN_THREADS, false, args)?;
            }
            Op::Attention { .. } => {
                let spec = next()?;
                let KernelSpec::AttentionF16 { h, d, .. } = spec else {
                    return Err(err(format!("unexpected kernel {}", spec.name())));
                };
                // Scratch for every token of a step: scores, chunk maxima, chunk sums.
                let chunks = self.capacity.div_ceil(ATTENTION_CHUNK as usize);
                let rows = self.batch * h as usize;
                let sc = self.alloc(rows * self.capacity * 4)?;
                let cmax = self.alloc(rows * chunks * 4)?;
                let po = self.alloc(rows * chunks * d as usize * 4)?;
                let done = self.alloc(rows * 4)?;
                let (q, kc, vc) = (p(o.first())?, p(o.get(1))?, p(o.get(2))?);
                let (cap, nc) = (Arg::I32(self.capacity as i32), Arg::I32(chunks as i32));
                let pos = Arg::Ptr(self.positions);
                let (h, name) = (h as u32, spec.name());
                let split = Grid::TokenHeadsChunks(h, chunks as u32);
                // After a fused Q/K/V split, one-token steps rotate, append and score in one
                // kernel (the split's launch is then for several tokens only).
                let qkv_split = self
                    .fusions
                    .iter()
                    .find(|f| f.attention == Some(i))
                    .map(|f| f.split);
                let fused = match qkv_split {
                    Some(at) => {
                        let f = next()?;
                        if !matches!(f, KernelSpec::QkvScoresF16 { .. }) {
                            return Err(err(format!("expected qkv scores, got {}", f.name())));
                        }
                        let qkv = p(plan.steps[at].operands.first())?;
                        (!self.plain).then_some((f, qkv))
                    }
                    None => None,
                };
                let tokens = if fused.is_some() {
                    Tokens::Several
                } else {
                    Tokens::Any
                };
                self.launch_for(
                    tokens,
                    format!("{name}_scores"),
                    split,
                    ATTENTION_CHUNK,
                    false,
                    vec![
                        Arg::Ptr(q),
                        Arg::Ptr(kc),
                        Arg::Ptr(sc),
                        Arg::Ptr(cmax),
                        pos,
                        cap,
                        nc,
                    ],
                )?;
                if let Some((f, qkv)) = fused {
                    let args = vec![
                        Arg::Ptr(qkv),
                        Arg::Ptr(kc),
                        Arg::Ptr(vc),
                        Arg::Ptr(sc),
                        Arg::Ptr(cmax),
                        pos,
                        cap,
                        nc,
                    ];
                    let name = f.name();
                    self.launch_for(Tokens::One, name, split, ATTENTION_CHUNK, false, args)?;
                }
                self.launch_named(
                    format!("{name}_pv"),
                    split,
                    render::attention_pv_threads(d),
                    false,
                    vec![
                        Arg::Ptr(sc),
                        Arg::Ptr(cmax),
                        Arg::Ptr(vc),
                        Arg::Ptr(po),
                        Arg::Ptr(p(r.first())?),
                        Arg::Ptr(done),
                        pos,
                        cap,
                        nc,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// The launch of a [`QkvFusion`](bitnetc_codegen_cuda::plan::QkvFusion).
    fn qkv_rope_append(
        &mut self,
        f: &bitnetc_codegen_cuda::plan::QkvFusion,
        specs: &mut impl Iterator<Item = KernelSpec>,
    ) -> Result<(), GpuError> {
        let steps = &self.plan.steps;
        let err = |message: &str| GpuError::Step {
            step: f.split,
            op: "split",
            message: message.into(),
        };
        let spec = specs
            .next()
            .ok_or_else(|| err("the kernel list ended early"))?;
        let KernelSpec::QkvRopeAppendF16 { h, g, .. } = spec else {
            return Err(err("expected the fused Q/K/V kernel"));
        };
        let ptr = |b: Option<&BufferId>| {
            b.map(|&b| self.ptrs[b as usize])
                .ok_or_else(|| err("an operand or result is missing"))
        };
        let args = vec![
            Arg::Ptr(ptr(steps[f.split].operands.first())?),
            Arg::Ptr(ptr(steps[f.rope_q].results.first())?),
            Arg::Ptr(ptr(steps[f.append].results.first())?),
            Arg::Ptr(ptr(steps[f.append].results.get(1))?),
            Arg::Ptr(self.positions),
        ];
        // With its attention's one-token form, this runs for several tokens only.
        let tokens = if f.attention.is_some() && !self.plain {
            Tokens::Several
        } else {
            Tokens::Any
        };
        let grid = Grid::TokenHeads((h + g) as u32);
        self.launch_for(tokens, spec.name(), grid, ROW_THREADS, false, args)
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, GpuError> {
        self.dev.alloc(bytes)
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64, GpuError> {
        self.dev.upload(bytes)
    }

    /// Every buffer's device memory: weights uploaded, activations and inputs sized for the
    /// batch, cache buffers for the capacity; a reshape shares its operand's memory.
    fn allocate(&mut self) -> Result<(), GpuError> {
        let reshaped: Vec<(BufferId, BufferId)> = self
            .plan
            .steps
            .iter()
            .filter(|s| matches!(s.op, Op::Reshape { .. }))
            .filter_map(|s| Some((*s.results.first()?, *s.operands.first()?)))
            .collect();
        for (i, buf) in self.plan.buffers.iter().enumerate() {
            if reshaped.iter().any(|(r, _)| *r as usize == i) {
                continue;
            }
            self.ptrs[i] = match &buf.storage {
                Storage::Input { .. } => self.alloc(self.batch * 4)?,
                Storage::Arena { .. } => {
                    let row = buf.row_bytes().ok_or_else(|| GpuError::Step {
                        step: 0,
                        op: "plan",
                        message: format!("buffer {i} has no per-token size"),
                    })?;
                    self.alloc(self.batch * row as usize)?
                }
                Storage::Cache => {
                    let per: u64 = buf.ty.shape[1..]
                        .iter()
                        .map(|d| d.fixed().unwrap_or(0))
                        .product();
                    let bytes = self.capacity * per as usize * 2;
                    let at = self.alloc(self.sessions * bytes)?;
                    self.caches.push((at, bytes as u64));
                    at
                }
                Storage::Weight { parts, .. } => {
                    // The output projection's matrix re-encoded (and the original too when
                    // another step, a tied embedding, reads it).
                    if let Some((b, target, _)) = self.head
                        && b as usize == i
                    {
                        let mut bytes = Vec::new();
                        for p in parts {
                            let w =
                                self.weights
                                    .weight(&p.name)
                                    .ok_or_else(|| GpuError::Weight {
                                        name: p.name.clone(),
                                        message: "is not in the model".into(),
                                    })?;
                            bytes.extend(reencode(&p.name, &w, target)?);
                        }
                        let at = self.upload(&bytes)?;
                        self.head = Some((b, target, at));
                        let readers = self
                            .plan
                            .steps
                            .iter()
                            .filter(|s| s.operands.contains(&b))
                            .count();
                        if readers == 1 {
                            self.ptrs[i] = at;
                            continue;
                        }
                    }
                    let mut bytes = Vec::new();
                    let mut betas = Vec::new();
                    for p in parts {
                        let w = self
                            .weights
                            .weight(&p.name)
                            .ok_or_else(|| GpuError::Weight {
                                name: p.name.clone(),
                                message: "is not in the model".into(),
                            })?;
                        let rows = w.shape.first().copied().unwrap_or(1);
                        let n: u64 = w.shape.iter().product();
                        match w.encoding {
                            Encoding::I2S => {
                                bytes.extend_from_slice(&w.bytes[..(n / 4) as usize]);
                                let beta = i2s_scale(w.bytes, n);
                                betas.extend(std::iter::repeat_n(beta, rows as usize));
                            }
                            Encoding::F16
                            | Encoding::F32
                            | Encoding::Q8_0
                            | Encoding::Q4_0
                            | Encoding::Q4_1 => bytes.extend_from_slice(w.bytes),
                            Encoding::TQ1_0 | Encoding::TQ2_0 => {
                                let t = bitnetc_ir::encoding::ternary_codes(w.encoding, w.bytes, n)
                                    .map_err(|e| GpuError::Weight {
                                        name: p.name.clone(),
                                        message: e.to_string(),
                                    })?;
                                bytes.extend(pack_blocks(&t.codes).flat_map(u32::to_le_bytes));
                                betas.extend_from_slice(&t.scales);
                            }
                            e => {
                                return Err(GpuError::Weight {
                                    name: p.name.clone(),
                                    message: format!("{e} weights have no CUDA kernel yet"),
                                });
                            }
                        }
                    }
                    let p = self.upload(&bytes)?;
                    if !betas.is_empty() {
                        let b: Vec<u8> = betas.iter().flat_map(|v| v.to_le_bytes()).collect();
                        // The per-row scales sit in the allocation after; found by `beta_of`.
                        let bp = self.upload(&b)?;
                        self.betas.push((i as BufferId, bp));
                    }
                    p
                }
            };
        }
        for (r, o) in reshaped {
            self.ptrs[r as usize] = self.ptrs[o as usize];
        }
        Ok(())
    }
}

/// A matrix's rows re-encoded to `target` as the CPU's `lm_head` option does (each row
/// decoded to f32 and encoded again), on every core.
fn reencode(
    name: &str,
    w: &bitnetc_ir::interp::WeightRef<'_>,
    target: Encoding,
) -> Result<Vec<u8>, GpuError> {
    let err = |message: String| GpuError::Weight {
        name: name.into(),
        message,
    };
    let (rows, k) = match w.shape {
        [rows, k] => (*rows as usize, *k as usize),
        s => return Err(err(format!("is not a matrix (shape {s:?})"))),
    };
    if !k.is_multiple_of(32) {
        return Err(err(format!(
            "rows of {k} cannot be re-encoded in 32-element blocks"
        )));
    }
    let row_out = target.byte_size(k as u64).map_err(|e| err(e.to_string()))? as usize;
    let (enc, data) = (w.encoding, w.bytes);
    let mut out = vec![0u8; rows * row_out];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = out
            .chunks_mut(per * row_out)
            .enumerate()
            .map(|(c, chunk)| {
                scope.spawn(move || -> Result<(), String> {
                    enc.reencode_rows(data, rows as u64, k as u64, (c * per) as u64, target, chunk)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| "a re-encoding thread panicked".to_string())?
        })
    })
    .map_err(err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The packed words, read as `tq_row` reads them (word `i` of a block shifted by `2l`, byte
    /// `j` meeting activation `16i + 4l + j`), give back every code in order.
    #[test]
    fn packed_blocks_meet_their_activations() {
        let codes: Vec<u8> = (0..512u32).map(|i| ((i * 7 + i / 5) % 3) as u8).collect();
        let words: Vec<u32> = super::pack_blocks(&codes).collect();
        assert_eq!(words.len(), 32);
        let mut seen = vec![u8::MAX; codes.len()];
        for b in 0..2 {
            for i in 0..16 {
                let word = words[b * 16 + i];
                for l in 0..4 {
                    for j in 0..4 {
                        seen[b * 256 + i * 16 + 4 * l + j] = ((word >> (2 * l + 8 * j)) & 3) as u8;
                    }
                }
            }
        }
        assert_eq!(seen, codes);
    }
}
