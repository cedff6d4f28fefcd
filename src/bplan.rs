//! Compiled plans (`.bplan`): a model lowered, optimized and bound to kernels once, loaded by
//! mapping it.
//!
//! A file is a 128-byte header, a GGUF image of the weights at byte 4096 (so that tensor
//! alignment holds in the mapping), the weights that kernels read in their own layouts (each at
//! a 4096-byte boundary), and a JSON manifest at the end:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `BNCPLAN\0` |
//! | 8..12 | format version (u32, little-endian) |
//! | 12..16 | header size (128) |
//! | 16..24, 24..32, 32..40 | manifest offset, length, XXH3-64 |
//! | 40..48, 48..56, 56..64 | GGUF image offset, length, XXH3-64 |
//! | 64..96 | the writing bitnetc's version, UTF-8, zero-padded |
//!
//! The manifest ([`Manifest`]) holds the plan after the passes, the kernels bound per weight
//! shape, the host's CPU features, the passes run, the source model's name, size and checksum,
//! the tokenizer and chat template, and where each weight in a kernel's layout lies, with its
//! checksum. The image holds the source's metadata and
//! tensors, plus tensors the compiler made (a re-encoded output projection), so that loading
//! reads no model file, runs no pass and times no kernel.

use crate::{Backend, Error, LoadOptions, Model};
use bitnetc_frontend_gguf::lower::LowerOptions;
use gguf::writer::{GgufWriter, Value, write_atomic};
use gguf::{GgufFile, ModelConfig};
use ir::encoding::Encoding;
use ir::interp::{WeightRef, WeightSource};
use ir::plan::{Plan, Storage};
use ir::types::DType;
use runtime::exec::{ExecOptions, TernaryBinding};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::{gguf, ir, runtime};

pub const MAGIC: &[u8; 8] = b"BNCPLAN\0";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 128;
const IMAGE_ALIGN: u64 = 4096;
/// Tensors the compiler adds are named with this prefix.
const HEAD_PREFIX: &str = "bitnetc.lm_head.";

/// Everything a compiled plan records besides its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub bitnetc_version: String,
    /// `cpu`.
    pub target: String,
    /// The CPU features of the compiling host (for the record).
    pub host_features: Vec<String>,
    /// The ternary kernels bound per weight shape; loading binds them by name and refuses a
    /// CPU that cannot run one.
    pub kernels: Vec<TernaryBinding>,
    pub passes: Vec<String>,
    /// The KV cache element type the plan was lowered with.
    pub kv_cache: String,
    /// `q8_0` when the output projection was re-encoded.
    pub lm_head: Option<String>,
    pub source: Source,
    /// `tokenizer.ggml.model`, when the model has a tokenizer.
    pub tokenizer: Option<String>,
    pub chat_template: Option<String>,
    /// Weights stored in a kernel's layout besides the image.
    pub packed: Vec<Packed>,
    /// The CUDA kernels as PTX, per architecture (a `cuda` target).
    #[serde(default)]
    pub ptx: Vec<PtxModule>,
    pub plan: Plan,
}

/// One weight in a kernel's layout, stored after the image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Packed {
    pub name: String,
    /// E.g. `lut16`: the table-lookup kernel's groups of 16 rows.
    pub layout: String,
    /// Where in the file, and how many bytes.
    pub offset: u64,
    pub bytes: u64,
    pub xxh3: u64,
}

/// The model file a plan was compiled from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    /// `general.name`.
    pub name: Option<String>,
    pub bytes: u64,
    /// XXH3-64 of the whole file, hex.
    pub xxh3: String,
}

/// The fixed header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub format_version: u32,
    pub manifest: (u64, u64, u64),
    pub image: (u64, u64, u64),
    pub bitnetc_version: String,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Plan(format!("{}: {what}", path.display()))
}

/// Whether `path` starts with the plan magic (a file too short to tell is not a plan).
pub fn is_plan(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|_| &magic == MAGIC)
}

impl Header {
    fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        let fields = [
            self.manifest.0,
            self.manifest.1,
            self.manifest.2,
            self.image.0,
            self.image.1,
            self.image.2,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let v = self.bitnetc_version.as_bytes();
        b[64..64 + v.len().min(32)].copy_from_slice(&v[..v.len().min(32)]);
        b
    }

    /// Parses and checks a header against the file's size: every failure names the field.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, String> {
        if b.len() < HEADER_BYTES {
            return Err(format!(
                "truncated: {} bytes, a plan header alone is {HEADER_BYTES}",
                b.len()
            ));
        }
        if &b[0..8] != MAGIC {
            return Err(format!(
                "not a compiled plan (magic {:02x?}, expected \"BNCPLAN\\0\")",
                &b[0..8]
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let format_version = u32_at(8);
        if format_version != FORMAT_VERSION {
            return Err(format!(
                "plan format version {format_version}; this bitnetc reads version \
                 {FORMAT_VERSION}: compile the model again with `bitnetc compile`"
            ));
        }
        if u32_at(12) as usize != HEADER_BYTES {
            return Err(format!(
                "header size {} (expected {HEADER_BYTES})",
                u32_at(12)
            ));
        }
        let manifest = (u64_at(16), u64_at(24), u64_at(32));
        let image = (u64_at(40), u64_at(48), u64_at(56));
        for (what, (off, len, _)) in [("manifest", manifest), ("weights image", image)] {
            match off.checked_add(len) {
                Some(end) if off >= HEADER_BYTES as u64 && end <= file_len => {}
                _ => {
                    return Err(format!(
                        "truncated or corrupted: the {what} at bytes {off}..+{len} is outside \
                         the file ({file_len} bytes)"
                    ));
                }
            }
        }
        if !image.0.is_multiple_of(IMAGE_ALIGN) {
            return Err(format!(
                "the weights image offset {} is not a multiple of {IMAGE_ALIGN}",
                image.0
            ));
        }
        let v = &b[64..96];
        let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
        let bitnetc_version = std::str::from_utf8(&v[..end])
            .map_err(|_| "the bitnetc version field is not UTF-8".to_string())?
            .to_string();
        Ok(Header {
            format_version,
            manifest,
            image,
            bitnetc_version,
        })
    }
}

/// Reads and checks a plan's header and manifest (not its weights).
pub fn read_manifest(path: &Path) -> Result<(Header, Manifest), Error> {
    let io = |e: std::io::Error| invalid(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut head = vec![0u8; HEADER_BYTES.min(len as usize)];
    f.read_exact(&mut head).map_err(io)?;
    let header = Header::parse(&head, len).map_err(|m| invalid(path, m))?;
    let (off, mlen, sum) = header.manifest;
    let mut m = vec![0u8; mlen as usize];
    f.seek(SeekFrom::Start(off)).map_err(io)?;
    f.read_exact(&mut m).map_err(io)?;
    if xxh3_64(&m) != sum {
        return Err(invalid(
            path,
            "corrupted: the manifest's checksum does not match",
        ));
    }
    let manifest = parse_manifest(&m).map_err(|e| invalid(path, e))?;
    Ok((header, manifest))
}

/// Parses a manifest's JSON.
pub fn parse_manifest(b: &[u8]) -> Result<Manifest, String> {
    serde_json::from_slice(b).map_err(|e| format!("the manifest is not valid: {e}"))
}

fn cpu_features() -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {
                $(if std::is_x86_feature_detected!($f) { out.push($f.to_string()); })*
            };
        }
        probe!(
            "ssse3",
            "sse4.1",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avxvnni"
        );
        if bitnetc_codegen_cpu::amx::available() {
            out.push("amx-int8".into());
        }
    }
    out
}

/// How to compile.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Kernel set, threads (for the timing) and `lm_head`; `bindings` is ignored.
    pub exec: ExecOptions,
    pub lower: LowerOptions,
    /// The passes to run by name; the default pipeline when `None`.
    pub passes: Option<Vec<String>>,
    /// GPU architectures (`sm_80`, …) to compile the plan's CUDA kernels for with NVRTC now,
    /// so that the GPU machine needs only the driver; none for a CPU plan.
    pub cuda_archs: Vec<String>,
}

/// The plan's CUDA kernels compiled for one architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PtxModule {
    pub arch: String,
    /// The NVRTC that compiled it, `major.minor`.
    pub nvrtc: String,
    pub ptx: String,
}

/// What compiling took.
#[derive(Clone, Debug)]
pub struct CompileReport {
    pub manifest: Manifest,
    /// Loading, lowering, passes and kernel selection (and re-encoding), seconds.
    pub compile_seconds: f64,
    /// Checksumming the source and writing the file, seconds.
    pub write_seconds: f64,
    pub bytes: u64,
}

/// Compiles the GGUF model at `src` for this host into a plan at `out`, calling `progress`
/// with (bytes written, bytes in all) while writing the weights. The file appears only when
/// complete.
pub fn compile(
    src: &Path,
    out: &Path,
    opts: &CompileOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<CompileReport, Error> {
    if is_plan(src) {
        return Err(invalid(
            src,
            "is already a compiled plan; compile the GGUF model it came from",
        ));
    }
    let t0 = Instant::now();
    let exec = ExecOptions {
        bindings: None,
        ..opts.exec.clone()
    };
    let passes = opts.passes.clone().unwrap_or_else(|| {
        bitnetc_passes::PassManager::default_pipeline(&bitnetc_passes::PassConfig::default())
            .pass_names()
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let model = crate::load(
        src,
        LoadOptions {
            backend: Backend::Compiled(exec.clone()),
            lower: opts.lower,
            context: Some(1),
            pre_tokenizer: None,
            passes: Some(passes.clone()),
        },
    )?;
    let executor = model
        .engine
        .executor()
        .expect("a compiled backend has an executor");
    let mut plan = model.engine.plan().clone();
    // Tensors the compiler made: name, ggml dims, encoding, bytes.
    let mut extra: Vec<(String, Vec<u64>, Encoding, &[u8])> = Vec::new();
    if let Some(head) = executor.reencoded_head() {
        let head_step = head.step;
        // Block weights have no f16 dot path.
        if let ir::op::Op::Linear { half, .. } = &mut plan.steps[head_step].op {
            *half = ir::types::HalfPath::F32;
        }
        let shared = plan
            .steps
            .iter()
            .enumerate()
            .any(|(i, s)| i != head_step && s.operands.contains(&head.buffer));
        let mut buffer = plan.buffers[head.buffer as usize].clone();
        if let Storage::Weight { parts, .. } = &mut buffer.storage {
            for (part, (name, enc, _, _)) in parts.iter_mut().zip(&head.parts) {
                part.name = format!("{HEAD_PREFIX}{name}");
                part.ty.dtype = DType::of_encoding(*enc);
            }
        }
        let id = if shared {
            // A tied embedding keeps reading the original: the head gets its own buffer, next
            // to it (a plan binds buffers in order), and the later ones move up by one.
            let id = head.buffer + 1;
            plan.buffers.insert(id as usize, buffer);
            for s in plan.steps.iter_mut() {
                for b in s.operands.iter_mut().chain(s.results.iter_mut()) {
                    if *b >= id {
                        *b += 1;
                    }
                }
            }
            id
        } else {
            plan.buffers[head.buffer as usize] = buffer;
            head.buffer
        };
        for o in plan.steps[head_step].operands.iter_mut() {
            if *o == head.buffer {
                *o = id;
            }
        }
        for (name, enc, shape, bytes) in head.parts {
            extra.push((
                format!("{HEAD_PREFIX}{name}"),
                vec![shape[1], shape[0]],
                enc,
                bytes,
            ));
        }
    }
    let compile_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let file = &model.file;
    let source = Source {
        file: src
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        name: file
            .get_str("general.name")
            .ok()
            .flatten()
            .map(String::from),
        bytes: file.bytes().len() as u64,
        xxh3: format!("{:016x}", xxh3_64(file.bytes())),
    };
    let manifest = Manifest {
        bitnetc_version: env!("CARGO_PKG_VERSION").into(),
        target: if opts.cuda_archs.is_empty() {
            "cpu"
        } else {
            "cuda"
        }
        .into(),
        host_features: cpu_features(),
        kernels: executor.ternary_bindings(),
        passes,
        kv_cache: opts.lower.kv_cache.to_string(),
        lm_head: exec.lm_head.map(|e| e.to_string()),
        source,
        tokenizer: file
            .get_str("tokenizer.ggml.model")
            .ok()
            .flatten()
            .map(String::from),
        chat_template: file
            .get_str("tokenizer.chat_template")
            .ok()
            .flatten()
            .map(String::from),
        packed: Vec::new(),
        ptx: cuda_ptx(&plan, &opts.cuda_archs)?,
        plan,
    };

    let mut writer = GgufWriter::new();
    for (k, v) in file.metadata() {
        writer.set(k, Value::from(v));
    }
    // Lets the image hold the compiler's own tensors (`bitnetc.*`).
    writer.set("bitnetc.plan", Value::U32(FORMAT_VERSION));
    let io = |e: std::io::Error| invalid(out, e);
    let table = file.layout().type_table;
    for t in file.tensors() {
        writer
            .add_tensor_type_id(&t.name, &t.dims, t.type_id, table)
            .map_err(io)?;
    }
    for (name, dims, enc, _) in &extra {
        writer.add_tensor(name, dims, *enc).map_err(io)?;
    }
    let packed = executor.packed_weights();
    let total: u64 = writer.tensors().iter().map(|t| t.nbytes).sum::<u64>()
        + packed.iter().map(|p| p.2.len() as u64).sum::<u64>();
    let image_off = IMAGE_ALIGN;
    let mut manifest = manifest;
    let bytes = write_atomic(out, |w| {
        w.write_all(&[0u8; IMAGE_ALIGN as usize])?;
        let mut hashing = Hashing {
            w: &mut *w,
            h: Xxh3::new(),
            n: 0,
        };
        let mut stream = writer.begin(&mut hashing)?;
        let mut done = 0u64;
        let data = file
            .tensors()
            .iter()
            .map(|t| file.tensor_data(t))
            .chain(extra.iter().map(|e| e.3));
        for d in data {
            if d.is_empty() {
                stream.write_piece(d)?;
            }
            // In pieces, for the progress bar.
            for piece in d.chunks(64 << 20) {
                stream.write_piece(piece)?;
                done += piece.len() as u64;
                progress(done, total);
            }
        }
        let hashing = stream.finish()?;
        let (image_len, image_sum) = (hashing.n, hashing.h.digest());
        // Weights in the kernels' own layouts, each at a 4096-byte boundary.
        let mut at = image_off + image_len;
        for (name, layout, bytes) in &packed {
            let pad = at.next_multiple_of(IMAGE_ALIGN) - at;
            w.write_all(&vec![0u8; pad as usize])?;
            at += pad;
            for piece in bytes.chunks(64 << 20) {
                w.write_all(piece)?;
                done += piece.len() as u64;
                progress(done, total);
            }
            manifest.packed.push(Packed {
                name: name.clone(),
                layout: layout.to_string(),
                offset: at,
                bytes: bytes.len() as u64,
                xxh3: xxh3_64(bytes),
            });
            at += bytes.len() as u64;
        }
        let json = serde_json::to_vec(&manifest).map_err(std::io::Error::other)?;
        w.write_all(&json)?;
        let header = Header {
            format_version: FORMAT_VERSION,
            manifest: (at, json.len() as u64, xxh3_64(&json)),
            image: (image_off, image_len, image_sum),
            bitnetc_version: env!("CARGO_PKG_VERSION").into(),
        };
        w.flush()?;
        let f = w.get_mut();
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header.to_bytes())?;
        f.seek(SeekFrom::End(0))
    })
    .map_err(io)?;
    Ok(CompileReport {
        manifest,
        compile_seconds,
        write_seconds: t1.elapsed().as_secs_f64(),
        bytes,
    })
}

/// A writer that hashes and counts what passes through.
struct Hashing<W: Write> {
    w: W,
    h: Xxh3,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.h.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Opens a compiled plan: checks the header, versions and checksums, maps the weights, and
/// binds the recorded kernels (no pass runs, no kernel is timed).
pub fn load(path: &Path, opts: LoadOptions) -> Result<Model, Error> {
    let (header, manifest) = read_manifest(path)?;
    let ours = env!("CARGO_PKG_VERSION");
    if header.bitnetc_version != ours || manifest.bitnetc_version != ours {
        return Err(invalid(
            path,
            format!(
                "compiled by bitnetc {}; this is bitnetc {ours}: compile the model again",
                header.bitnetc_version
            ),
        ));
    }
    if manifest.target != "cpu" && manifest.target != "cuda" {
        return Err(invalid(
            path,
            format!(
                "compiled for target `{}`; this build runs `cpu` and `cuda` plans",
                manifest.target
            ),
        ));
    }
    if opts.passes.is_some() {
        return Err(invalid(
            path,
            "a compiled plan's passes are fixed: give the GGUF model to choose passes",
        ));
    }
    if opts.lower.kv_cache.to_string() != manifest.kv_cache {
        return Err(invalid(
            path,
            format!(
                "compiled with a {} KV cache, {} was asked: compile again with --kv-cache {}",
                manifest.kv_cache, opts.lower.kv_cache, opts.lower.kv_cache
            ),
        ));
    }
    let (off, len, sum) = header.image;
    let file = GgufFile::open_range(path, off, Some(len))?;
    if xxh3_64(file.bytes()) != sum {
        return Err(invalid(
            path,
            "corrupted: the weights image's checksum does not match",
        ));
    }
    let file = Arc::new(file);
    let weights = Arc::new(PlanWeights::open(path, file.clone(), &manifest.packed)?);
    // The checksums read every page; keep resident only what the model reads.
    file.release_all();
    let config = ModelConfig::from_gguf(&file).map_err(|e| file.model_error(e))?;
    let head_fixed = || {
        invalid(
            path,
            "--lm-head is chosen at compile time: `bitnetc compile --lm-head …`",
        )
    };
    let backend = match opts.backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda { options, .. } if options.lm_head.is_some() => return Err(head_fixed()),
        Backend::Compiled(exec) => {
            if exec.lm_head.is_some() {
                return Err(head_fixed());
            }
            Backend::Compiled(ExecOptions {
                bindings: Some(manifest.kernels.clone()),
                ..exec
            })
        }
        other => other,
    };
    crate::bind(
        file,
        weights,
        config,
        manifest.plan,
        &backend,
        opts.context,
        opts.pre_tokenizer.as_deref(),
        &manifest
            .ptx
            .iter()
            .map(|m| (m.arch.clone(), m.ptx.clone()))
            .collect::<Vec<_>>(),
    )
}

/// The plan's CUDA kernels compiled for each architecture.
#[cfg(feature = "cuda")]
fn cuda_ptx(plan: &Plan, archs: &[String]) -> Result<Vec<PtxModule>, Error> {
    use bitnetc_codegen_cuda::{nvrtc, plan::plan_kernels, render::module};
    if archs.is_empty() {
        return Ok(Vec::new());
    }
    let cuda = |e: bitnetc_codegen_cuda::CudaError| Error::Plan(format!("--target cuda: {e}"));
    let source = module(&plan_kernels(plan).map_err(cuda)?);
    let (major, minor) = nvrtc::version().map_err(cuda)?;
    archs
        .iter()
        .map(|arch| {
            Ok(PtxModule {
                arch: arch.clone(),
                nvrtc: format!("{major}.{minor}"),
                ptx: nvrtc::compile_ptx(&source, arch).map_err(cuda)?,
            })
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn cuda_ptx(_: &Plan, archs: &[String]) -> Result<Vec<PtxModule>, Error> {
    if archs.is_empty() {
        Ok(Vec::new())
    } else {
        Err(Error::Plan(
            "--target cuda: this bitnetc was built without the `cuda` feature".into(),
        ))
    }
}

/// A plan's weights: the GGUF image, and the weights stored in kernels' layouts (after the
/// image, in the same mapping).
struct PlanWeights {
    image: Arc<GgufFile>,
    packed: HashMap<(String, String), std::ops::Range<usize>>,
}

impl PlanWeights {
    fn open(path: &Path, image: Arc<GgufFile>, packed: &[Packed]) -> Result<PlanWeights, Error> {
        let map = image.file_bytes();
        let mut ranges = HashMap::new();
        for p in packed {
            let range = p
                .offset
                .checked_add(p.bytes)
                .filter(|&end| end <= map.len() as u64)
                .map(|end| p.offset as usize..end as usize)
                .ok_or_else(|| {
                    invalid(
                        path,
                        format!(
                            "truncated or corrupted: the {} weights of {} at bytes {}..+{} are \
                             outside the file",
                            p.layout, p.name, p.offset, p.bytes
                        ),
                    )
                })?;
            if xxh3_64(&map[range.clone()]) != p.xxh3 {
                return Err(invalid(
                    path,
                    format!(
                        "corrupted: the checksum of the {} weights of {} does not match",
                        p.layout, p.name
                    ),
                ));
            }
            ranges.insert((p.name.clone(), p.layout.clone()), range);
        }
        Ok(PlanWeights {
            image,
            packed: ranges,
        })
    }
}

impl WeightSource for PlanWeights {
    fn weight(&self, name: &str) -> Option<WeightRef<'_>> {
        self.image.weight(name)
    }

    fn release(&self, name: &str) {
        self.image.release(name)
    }

    fn packed(&self, name: &str, layout: &str) -> Option<&[u8]> {
        let r = self.packed.get(&(name.to_string(), layout.to_string()))?;
        Some(&self.image.file_bytes()[r.clone()])
    }
}

/// The header and manifest of the plan at `path`, as `inspect` and `compile --verbose` print
/// them.
pub fn describe(path: &Path) -> Result<String, Error> {
    let (header, m) = read_manifest(path)?;
    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "compiled plan, format {} by bitnetc {}, target {}",
        header.format_version, header.bitnetc_version, m.target
    );
    let _ = writeln!(
        s,
        "source        {} ({} bytes, xxh3 {}){}",
        m.source.file,
        m.source.bytes,
        m.source.xxh3,
        m.source
            .name
            .as_ref()
            .map_or(String::new(), |n| format!(", \"{n}\""))
    );
    let _ = writeln!(s, "passes        {}", m.passes.join(", "));
    let _ = writeln!(
        s,
        "kv cache      {}{}",
        m.kv_cache,
        m.lm_head
            .as_ref()
            .map_or(String::new(), |h| format!(", lm_head {h}"))
    );
    for k in &m.kernels {
        let _ = writeln!(
            s,
            "kernels       i2_s {} rows of {}: 1 token {}, more {}",
            k.n, k.k, k.gemv, k.gemm
        );
    }
    let _ = writeln!(s, "host features {}", m.host_features.join(" "));
    if !m.ptx.is_empty() {
        let archs: Vec<String> = m
            .ptx
            .iter()
            .map(|p| format!("{} (NVRTC {}, {} bytes)", p.arch, p.nvrtc, p.ptx.len()))
            .collect();
        let _ = writeln!(s, "cuda ptx      {}", archs.join(", "));
    }
    let _ = writeln!(
        s,
        "plan          {} steps, {} buffers, {} arena bytes per token",
        m.plan.steps.len(),
        m.plan.buffers.len(),
        m.plan.arena_bytes_per_token.unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "weights image {} bytes at offset {}",
        header.image.1, header.image.0
    );
    Ok(s)
}
