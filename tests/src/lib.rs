//! Helpers shared by the cross-crate test suites.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    let p = repo_root().join("tests/fixtures").join(rel);
    assert!(p.exists(), "missing committed fixture {}", p.display());
    p
}

/// A file under the shared fixture folder `../shared/fixtures/` beside the repository, or
/// `None` (after saying so loudly on stderr) when it is not there.
pub fn shared_fixture(rel: &str) -> Option<PathBuf> {
    let p = repo_root().join("../shared/fixtures").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPING: shared fixture {} is not present", p.display());
        None
    }
}

/// The five tiny reference models.
pub const TINY_MODELS: [&str; 5] = [
    "tiny/bitnetcpp-tiny-f32.gguf",
    "tiny/bitnetcpp-tiny-i2_s.gguf",
    "tiny/mainline-tiny-f16.gguf",
    "tiny/mainline-tiny-tq2_0.gguf",
    "tiny/mainline-tiny-tq1_0.gguf",
];
