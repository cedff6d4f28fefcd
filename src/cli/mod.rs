//! The commands of `bitnetc`, one module per group.

pub mod generate;
pub mod inspect;
pub mod tools;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Opens a model ready to run.
pub fn load(
    model: &std::path::Path,
    kv_cache: crate::KvCacheType,
    context: Option<usize>,
    pre_tokenizer: Option<String>,
) -> Result<bitnetc::Model> {
    let opts = bitnetc::LoadOptions {
        lower: bitnetc::gguf::lower::LowerOptions {
            kv_cache: kv_cache.dtype(),
        },
        context,
        pre_tokenizer,
        passes: None,
    };
    Ok(bitnetc::load(model, opts)?)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}
