//! A fixed pool of worker threads for the steps of a plan. The caller's thread is worker 0;
//! the others are spawned once and wait for jobs, spinning briefly (a decode step's jobs come
//! microseconds apart) and then sleeping. No allocation and no spawn per job.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

struct Shared {
    /// Incremented for each job; workers run a job when they see a new epoch.
    epoch: AtomicU64,
    /// The current job, valid while `epoch` is current and `pending > 0`.
    job: Mutex<Option<JobPtr>>,
    pending: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    threads: usize,
}

/// A job reference with its lifetime erased; `Pool::run` does not return before every worker
/// is done with it.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize, usize) + Sync + 'static));
// SAFETY: the pointee is `Sync` and outlives every use (see `Pool::run`).
unsafe impl Send for JobPtr {}

/// Spins before sleeping: about the gap between two steps of one decode.
const SPIN: u32 = 200_000;

pub struct Pool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// Held by a `run` from start to end: jobs from several threads (sessions of one engine
    /// used concurrently) take turns instead of overwriting each other's job.
    running: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` workers in all (at least 1), the caller included.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            threads,
        });
        let mut handles = Vec::new();
        for index in 1..threads {
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bitnetc-worker-{index}"))
                    .spawn(move || worker(&shared, index))?,
            );
        }
        Ok(Pool {
            shared,
            handles,
            running: Mutex::new(()),
        })
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `job(index, threads)` on every worker and returns when all are done. Calls from
    /// several threads run one after the other.
    pub fn run(&self, job: Job<'_>) {
        let n = self.shared.threads;
        if n == 1 {
            job(0, 1);
            return;
        }
        let _turn = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the erased reference is only used until `pending` reaches 0, which this
        // function waits for before returning (also when `job` panics on this thread).
        let ptr = JobPtr(unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) });
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(ptr);
        self.shared.pending.store(n - 1, Ordering::Release);
        {
            let _guard = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            self.shared.wake.notify_all();
        }
        struct WaitAll<'a>(&'a Shared);
        impl Drop for WaitAll<'_> {
            fn drop(&mut self) {
                while self.0.pending.load(Ordering::Acquire) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let _wait = WaitAll(&self.shared);
        job(0, n);
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if shared.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
                if shared.epoch.load(Ordering::Acquire) == seen
                    && !shared.stop.load(Ordering::Acquire)
                {
                    drop(shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
                }
            }
        }
        seen = shared.epoch.load(Ordering::Acquire);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(f)) = job {
            // SAFETY: see `Pool::run`. A panic in a job aborts: the caller would wait forever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                (*f)(index, shared.threads)
            }));
            if result.is_err() {
                std::process::abort();
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let _guard = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The part `[start, end)` of `0..n` that worker `index` of `threads` takes, in multiples of
/// `align` (except the last part).
pub fn split(n: usize, index: usize, threads: usize, align: usize) -> std::ops::Range<usize> {
    let units = n.div_ceil(align);
    let start = (units * index / threads * align).min(n);
    let end = (units * (index + 1) / threads * align).min(n);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_runs_every_job_once() {
        let pool = Pool::new(3).unwrap();
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1000);
        }
    }

    /// Two threads running jobs on one pool: each job still runs once on every worker, with
    /// its own arguments (without the turn lock the second job overwrote the first).
    #[test]
    fn jobs_from_two_threads_take_turns() {
        let pool = Pool::new(3).unwrap();
        let hits: Vec<AtomicUsize> = (0..2).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|s| {
            for caller in 0..2 {
                let (pool, hits) = (&pool, &hits);
                s.spawn(move || {
                    for _ in 0..300 {
                        pool.run(&|_, n| {
                            assert_eq!(n, 3);
                            hits[caller].fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 3 * 300);
        }
    }

    #[test]
    fn split_covers_the_range_in_aligned_parts() {
        for (n, threads, align) in [(100, 3, 4), (7, 4, 1), (3, 8, 16), (2560, 2, 16)] {
            let parts: Vec<_> = (0..threads).map(|i| split(n, i, threads, align)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[threads - 1].end, n);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].end == n || w[0].end % align == 0);
            }
        }
    }
}
