//! Helpers shared by the cross-crate test suites.

use std::path::{Path, PathBuf};

/// The repository root: `BITNETC_REPO_ROOT` when set (test binaries run on another machine,
/// as by `scripts/gpu-check.sh`), else where this crate was built.
pub fn repo_root() -> PathBuf {
    if let Some(root) = std::env::var_os("BITNETC_REPO_ROOT") {
        return PathBuf::from(root);
    }
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
/// `None` (after saying so loudly on stderr) when it is not there. With
/// `BITNETC_REQUIRE_SHARED_FIXTURES=1` (as CI sets it) a missing file fails the test instead.
pub fn shared_fixture(rel: &str) -> Option<PathBuf> {
    let p = repo_root().join("../shared/fixtures").join(rel);
    if p.exists() {
        Some(p)
    } else if std::env::var_os("BITNETC_REQUIRE_SHARED_FIXTURES").is_some_and(|v| v == "1") {
        panic!(
            "shared fixture {} is not present (BITNETC_REQUIRE_SHARED_FIXTURES=1)",
            p.display()
        );
    } else {
        eprintln!("SKIPPING: shared fixture {} is not present", p.display());
        None
    }
}

/// Fails unless `ours` and `reference` are the same floats bit for bit (so `-0.0` differs
/// from `0.0`), naming `what` and the first logit that differs.
pub fn assert_bits_equal(ours: &[f32], reference: &[f32], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != reference[i].to_bits()) {
        panic!(
            "{what}: logit {i} is {} where the reference gives {}",
            ours[i], reference[i]
        );
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

/// How a model's logits compare with a reference, row by row.
#[derive(Debug)]
pub struct Comparison {
    /// Largest absolute difference per position.
    pub per_position: Vec<f32>,
    /// Positions whose argmax differs: (position, ours, reference, reference's top-2 gap).
    pub argmax_mismatches: Vec<(usize, usize, usize, f32)>,
    /// Whether the top-5 sets agree at the last position.
    pub top5_last_equal: bool,
}

impl Comparison {
    pub fn max(&self) -> f32 {
        self.per_position.iter().fold(0.0, |m, &d| m.max(d))
    }

    /// Positions whose argmax differs although the reference's top two are at least `gap`
    /// apart (so not a near tie).
    pub fn clear_mismatches(&self, gap: f32) -> Vec<(usize, usize, usize, f32)> {
        self.argmax_mismatches
            .iter()
            .copied()
            .filter(|m| m.3 >= gap)
            .collect()
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn top5(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    let mut t = idx[..5].to_vec();
    t.sort();
    t
}

/// Compares `ours` with `reference`, both `rows × vocab`.
pub fn compare(ours: &[f32], reference: &[f32], vocab: usize) -> Comparison {
    assert_eq!(ours.len(), reference.len(), "logit counts differ");
    let rows = ours.len() / vocab;
    let mut c = Comparison {
        per_position: Vec::new(),
        argmax_mismatches: Vec::new(),
        top5_last_equal: false,
    };
    for r in 0..rows {
        let (a, b) = (
            &ours[r * vocab..(r + 1) * vocab],
            &reference[r * vocab..(r + 1) * vocab],
        );
        c.per_position.push(
            a.iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs())),
        );
        let (ia, ib) = (argmax(a), argmax(b));
        if ia != ib {
            let mut sorted = b.to_vec();
            sorted.sort_by(|x, y| y.total_cmp(x));
            c.argmax_mismatches.push((r, ia, ib, sorted[0] - sorted[1]));
        }
        if r == rows - 1 {
            c.top5_last_equal = top5(a) == top5(b);
        }
    }
    c
}
