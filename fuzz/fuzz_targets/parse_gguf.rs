//! Any byte string: the GGUF parser, the config reader and `describe` must return or fail
//! cleanly, never panic or read out of bounds.
#![no_main]

use bitnetc_frontend_gguf::arch::ModelConfig;
use bitnetc_frontend_gguf::describe::describe;
use bitnetc_frontend_gguf::{GgufFile, TokenizerMeta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        let _ = ModelConfig::from_gguf(&f);
        let _ = TokenizerMeta::from_gguf(&f);
        let d = describe(&f, true);
        let _ = serde_json::to_string(&d);
        for t in f.tensors().iter().take(8) {
            let _ = f.decode(t);
        }
    }
});
