//! A decode step allocates nothing: every activation lives in the planned arena and every
//! scratch buffer in the session's state, both sized when the session starts. Counted with a
//! global allocator over a warmed-up session (all threads of the process count; this binary
//! runs one test).

use bitnetc::runtime::exec::{ExecOptions, LogitRows};
use bitnetc::{Backend, LoadOptions, load};
use bitnetc_tests::{TINY_MODELS, fixture, shared_fixture};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator, counting allocations on the way.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by each of 8 decode steps after a 5-token prefill and one decode
/// step (which sizes the logits buffer), with `threads` threads.
fn decode_allocations(model: &Path, threads: usize) -> Vec<usize> {
    let m = load(
        model,
        LoadOptions {
            backend: Backend::Compiled(ExecOptions {
                threads,
                ..ExecOptions::default()
            }),
            context: Some(32),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let exec = m.engine.executor().expect("a compiled executor");
    let mut state = exec.state(32);
    let mut out = Vec::new();
    exec.eval(&mut state, &[0, 5, 9, 17, 3], LogitRows::Last, &mut out)
        .unwrap();
    exec.eval(&mut state, &[7], LogitRows::Last, &mut out)
        .unwrap();
    (0..8)
        .map(|i| {
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            exec.eval(&mut state, &[11 + i], LogitRows::Last, &mut out)
                .unwrap();
            ALLOCATIONS.load(Ordering::SeqCst) - before
        })
        .collect()
}

#[test]
fn a_decode_step_allocates_nothing() {
    let mut models: Vec<_> = TINY_MODELS.iter().map(|rel| fixture(rel)).collect();
    models.extend(shared_fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let mut failures = Vec::new();
    for model in &models {
        for threads in [1, 2] {
            let counts = decode_allocations(model, threads);
            if counts.iter().any(|&c| c != 0) {
                failures.push(format!("{} (t={threads}): {counts:?}", model.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "heap allocations per decode step:\n{}",
        failures.join("\n")
    );
}
