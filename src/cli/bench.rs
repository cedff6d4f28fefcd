//! `bitnetc bench`: llama-bench's tests and output. `ppN` evaluates an N-token prompt in an
//! empty context (logits of the last token only), `tgN` generates N tokens one at a time;
//! each test runs once to warm up, then `-r` times, and reports tokens per second as the mean
//! and sample standard deviation over the runs.

use super::{ExecArgs, Result};
use crate::KvCacheType;
use bitnetc::runtime::Session;
use bitnetc::runtime::batch::DecodeBatcher;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Models: GGUF files or compiled plans (may be repeated)
    #[arg(short = 'm', long, required = true)]
    pub model: Vec<PathBuf>,
    /// Prompt lengths to test (comma-separated; 0 skips the prompt tests)
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (comma-separated; 0 skips the generation tests)
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Context depths to test at (comma-separated): each test runs after this many random
    /// tokens in the KV cache, evaluated once per depth and kept for every run (not timed)
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub n_depth: Vec<usize>,
    /// Sessions generating at once (also -np; comma-separated): each test runs in that many
    /// sessions, each on its own thread, their one-token steps batched into one step for all of
    /// them as `serve --parallel` does; t/s counts every session's tokens
    #[arg(long = "parallel", value_delimiter = ',', default_value = "1")]
    pub parallel: Vec<usize>,
    /// Thread counts to test (comma-separated; default: all cores)
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Runs of each test
    #[arg(short = 'r', long, default_value_t = 5)]
    pub repetitions: usize,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value = "md")]
    pub output: Format,
    /// Most tokens evaluated in one step
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Kernel variants to choose from
    #[arg(long, value_enum, default_value = "best")]
    pub kernels: super::KernelChoice,
    /// KV cache element type
    #[arg(long, value_enum, value_name = "TYPE", default_value = "f16")]
    pub kv_cache: KvCacheType,
    /// Print the kernel trace of each configuration to stderr
    #[arg(long)]
    pub trace_kernels: bool,
    /// Re-encode the output projection at load time
    #[arg(long, value_enum, value_name = "TYPE")]
    pub lm_head: Option<super::LmHead>,
    /// Also measure the memory read bandwidth (1 GiB, each thread count) and report each
    /// generation test against its roofline: weight bytes per token ÷ bandwidth
    #[arg(long)]
    pub roofline: bool,
    /// Where to run: `cpu` or `cuda` (the first NVIDIA GPU)
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: super::Device,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Format {
    /// A Markdown table, as llama-bench prints
    Md,
    /// llama-bench's JSON records
    Json,
}

struct Record {
    model_filename: String,
    model_type: String,
    model_size: u64,
    model_n_params: u64,
    n_batch: usize,
    n_threads: usize,
    type_kv: &'static str,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    n_parallel: usize,
    samples_ns: Vec<u64>,
    backend: &'static str,
}

impl Record {
    fn tokens(&self) -> usize {
        (self.n_prompt + self.n_gen) * self.n_parallel
    }

    fn samples_ts(&self) -> Vec<f64> {
        self.samples_ns
            .iter()
            .map(|&ns| self.tokens() as f64 * 1e9 / ns as f64)
            .collect()
    }

    fn test(&self) -> String {
        let test = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        let test = if self.n_depth > 0 {
            format!("{test} @ d{}", self.n_depth)
        } else {
            test
        };
        if self.n_parallel > 1 {
            format!("{test} x{}", self.n_parallel)
        } else {
            test
        }
    }
}

/// Mean and sample standard deviation.
fn stats(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        return Err("-r must be at least 1".into());
    }
    let threads = if a.threads.is_empty() {
        vec![bitnetc::runtime::exec::default_threads()]
    } else {
        a.threads.clone()
    };
    let tests: Vec<(usize, usize)> = a
        .n_prompt
        .iter()
        .filter(|&&p| p > 0)
        .map(|&p| (p, 0))
        .chain(a.n_gen.iter().filter(|&&n| n > 0).map(|&n| (0, n)))
        .collect();
    if tests.is_empty() {
        return Err("no tests: give -p or -n greater than 0".into());
    }
    if a.parallel.contains(&0) {
        return Err("--parallel must be at least 1".into());
    }
    if a.device == super::Device::Cuda && a.parallel.iter().any(|&n| n > 1) {
        return Err(
            "--parallel above 1 runs on the CPU only (GPU sessions are not batched)".into(),
        );
    }
    let context = tests.iter().map(|&(p, n)| p + n).max().unwrap_or(1)
        + a.n_depth.iter().copied().max().unwrap_or(0);
    let mut records = Vec::new();
    // The table's header once the first model has loaded (a model that fails to load leaves
    // only its error).
    let mut header = a.output == Format::Md;
    for path in &a.model {
        for &t in &threads {
            let exec = ExecArgs {
                threads: Some(t),
                batch_size: a.batch_size,
                kernels: a.kernels,
                interp: false,
                trace_kernels: a.trace_kernels,
                lm_head: a.lm_head,
                device: a.device,
                gpu_sessions: 1,
            };
            let model = super::load(Some(path), a.kv_cache, Some(context), None, &exec)?;
            if let Some(device) = model.engine.device() {
                eprintln!("{}: on {device}", path.display());
            }
            if std::mem::take(&mut header) {
                println!(
                    "| model                          |       size |     params | backend    | threads |          test |                  t/s |"
                );
                println!(
                    "| ------------------------------ | ---------: | ---------: | ---------- | ------: | ------------: | -------------------: |"
                );
            }
            let desc = bitnetc::gguf::describe::describe(&model.file, false);
            let main_type = desc
                .totals
                .by_type
                .iter()
                .max_by_key(|t| t.parameters)
                .map_or("?".to_string(), |t| t.type_name.to_uppercase());
            let model_type = format!(
                "{} {} {main_type}",
                model.config.architecture.gguf_name(),
                super::human_count(desc.totals.parameters)
            );
            let vocab = model.engine.vocab_size() as u32;
            // Token ids as llama-bench draws them: anything in the vocabulary.
            let mut seed = 42u64;
            let mut token = move || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) % vocab as u64) as u32
            };
            let bandwidth = if a.roofline {
                Some(read_bandwidth(t))
            } else {
                None
            };
            let bytes_per_token = model
                .engine
                .executor()
                .map_or(0, |e| e.weight_bytes_per_token());
            for &np in &a.parallel {
                // Sessions emptied (down to the depth) before each run, as llama-bench clears
                // its context; more than one meet in a batcher for their one-token steps.
                let batcher = (np > 1).then(|| DecodeBatcher::new(&model.engine));
                let mut sessions = Vec::new();
                for _ in 0..np {
                    let mut session = model.engine.session();
                    if let Some(b) = &batcher {
                        session.join(b)?;
                    }
                    sessions.push(session);
                }
                for &depth in &a.n_depth {
                    // The depth's tokens are evaluated once; every run rewinds the cache to them.
                    for session in &mut sessions {
                        session.reset();
                        if depth > 0 {
                            let fill: Vec<u32> = (0..depth).map(|_| token()).collect();
                            session.eval_last(&fill)?;
                        }
                    }
                    // Each configuration's trace counts its tests, not the depth's tokens.
                    model.engine.reset_trace();
                    for &(n_prompt, n_gen) in &tests {
                        let mut samples = Vec::new();
                        for rep in 0..=a.repetitions {
                            let work: Vec<(Vec<u32>, Vec<u32>)> = (0..np)
                                .map(|_| {
                                    let prompt = (0..n_prompt).map(|_| token()).collect();
                                    (prompt, (0..n_gen).map(|_| token()).collect())
                                })
                                .collect();
                            for session in &mut sessions {
                                session.rewind(depth);
                            }
                            let started = Instant::now();
                            run_sessions(&mut sessions, &work)?;
                            let ns = started.elapsed().as_nanos() as u64;
                            // The first run warms up (page faults, caches).
                            if rep > 0 {
                                samples.push(ns);
                            }
                        }
                        let r = Record {
                            backend: if a.device == super::Device::Cuda {
                                "CUDA"
                            } else {
                                "CPU"
                            },
                            model_filename: path.display().to_string(),
                            model_type: model_type.clone(),
                            model_size: desc.totals.bytes,
                            model_n_params: desc.totals.parameters,
                            n_batch: a.batch_size,
                            n_threads: t,
                            type_kv: match a.kv_cache {
                                KvCacheType::F16 => "f16",
                                KvCacheType::F32 => "f32",
                            },
                            n_prompt,
                            n_gen,
                            n_depth: depth,
                            n_parallel: np,
                            samples_ns: samples,
                        };
                        if a.output == Format::Md {
                            let (mean, sd) = stats(&r.samples_ts());
                            println!(
                                "| {:<30} | {:>10} | {:>10} | {:<10} | {:>7} | {:>13} | {:>20} |",
                                r.model_type,
                                super::human_bytes(r.model_size),
                                super::human_count(r.model_n_params),
                                r.backend,
                                t,
                                r.test(),
                                format!("{mean:.2} ± {sd:.2}")
                            );
                            if let (Some(bw), true) = (bandwidth, n_gen > 0) {
                                let roof = bw / bytes_per_token as f64;
                                eprintln!(
                                    "  {}: {:.1} MB of weights per token; read bandwidth {:.1} GB/s at {t} threads; roofline {roof:.1} t/s; {:.0}% of it",
                                    r.test(),
                                    bytes_per_token as f64 / 1e6,
                                    bw / 1e9,
                                    100.0 * mean / roof
                                );
                            }
                        }
                        records.push(r);
                    }
                    if a.trace_kernels {
                        eprintln!("kernel trace: {t} threads, depth {depth}, {np} sessions");
                    }
                    exec.print_trace(&model);
                }
            }
        }
    }
    if a.output == Format::Json {
        let json: Vec<serde_json::Value> = records.iter().map(json_record).collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

/// Evaluates each session's prompt (if it has one), then its generation's tokens one at a
/// time; more than one session run on threads of their own.
fn run_sessions(sessions: &mut [Session<'_>], work: &[(Vec<u32>, Vec<u32>)]) -> Result<()> {
    fn one(session: &mut Session<'_>, (prompt, tokens): &(Vec<u32>, Vec<u32>)) -> Result<()> {
        if !prompt.is_empty() {
            session.eval_last(prompt)?;
        }
        for &token in tokens {
            session.eval_last(&[token])?;
        }
        Ok(())
    }
    if let ([session], [w]) = (&mut *sessions, work) {
        return one(session, w);
    }
    std::thread::scope(|scope| {
        let threads: Vec<_> = sessions
            .iter_mut()
            .zip(work)
            .map(|(session, w)| scope.spawn(move || one(session, w).map_err(|e| e.to_string())))
            .collect();
        for thread in threads {
            thread
                .join()
                .map_err(|_| "a session's thread panicked".to_string())??;
        }
        Ok(())
    })
}

fn json_record(r: &Record) -> serde_json::Value {
    let ts = r.samples_ts();
    let ns: Vec<f64> = r.samples_ns.iter().map(|&n| n as f64).collect();
    let (avg_ns, stddev_ns) = stats(&ns);
    let (avg_ts, stddev_ts) = stats(&ts);
    serde_json::json!({
        "build_commit": env!("CARGO_PKG_VERSION"),
        "cpu_info": cpu_name(),
        "backends": r.backend,
        "model_filename": r.model_filename,
        "model_type": r.model_type,
        "model_size": r.model_size,
        "model_n_params": r.model_n_params,
        "n_batch": r.n_batch,
        "n_ubatch": r.n_batch,
        "n_threads": r.n_threads,
        "type_k": r.type_kv,
        "type_v": r.type_kv,
        "n_gpu_layers": 0,
        "use_mmap": true,
        "n_prompt": r.n_prompt,
        "n_gen": r.n_gen,
        "n_depth": r.n_depth,
        "n_parallel": r.n_parallel,
        "test_time": iso8601(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())),
        "avg_ns": avg_ns as u64,
        "stddev_ns": stddev_ns as u64,
        "avg_ts": avg_ts,
        "stddev_ts": stddev_ts,
        "samples_ns": r.samples_ns,
        "samples_ts": ts,
    })
}

/// Bytes per second that `threads` threads read from a 1 GiB buffer (best of 5 passes),
/// each summing its own contiguous part.
fn read_bandwidth(threads: usize) -> f64 {
    const SIZE: usize = 1 << 30;
    let buf: Vec<u64> = vec![1; SIZE / 8];
    let part = buf.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        std::thread::scope(|s| {
            for chunk in buf.chunks(part) {
                s.spawn(move || std::hint::black_box(sum_words(chunk)));
            }
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    SIZE as f64 / best
}

/// A sum over every word (eight independent sums), in the widest vectors the host has.
fn sum_words(words: &[u64]) -> u64 {
    #[inline(always)]
    fn sum(words: &[u64]) -> u64 {
        let mut acc = [0u64; 8];
        for c in words.chunks_exact(8) {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = a.wrapping_add(v);
            }
        }
        acc.iter().fold(0, |s, &a| s.wrapping_add(a))
    }
    #[cfg(target_arch = "x86_64")]
    {
        /// With the decode kernels' software prefetch (8 KiB ahead), which a plain reader
        /// lacks: without it this machine class reads 30–40% slower.
        #[target_feature(enable = "avx512f")]
        fn sum_avx512(words: &[u64]) -> u64 {
            use std::arch::x86_64::*;
            let mut acc = _mm512_setzero_si512();
            let lines = words.len() / 8;
            let p = words.as_ptr();
            for i in 0..lines {
                // SAFETY: line i is inside `words`; prefetches never fault.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(8 * i + 1024) as *const i8);
                    acc = _mm512_add_epi64(acc, _mm512_loadu_si512(p.add(8 * i) as *const __m512i));
                }
            }
            _mm512_reduce_add_epi64(acc) as u64 + sum(&words[8 * lines..])
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature is present.
            return unsafe { sum_avx512(words) };
        }
    }
    sum(words)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic Gregorian, UTC).
fn iso8601(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The CPU's model name (Linux), or "unknown".
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_mean_and_sample_deviation() {
        let (m, s) = stats(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - 2.138).abs() < 1e-3);
        assert_eq!(stats(&[3.0]), (3.0, 0.0));
    }

    #[test]
    fn iso8601_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_795_797_217), "2026-11-27T16:33:37Z");
    }
}
