//! Any byte string as a compiled plan's header and manifest: parsing, and turning the manifest's
//! plan into a verified graph (what loading does before it binds weights), must return or fail
//! cleanly, never panic.
#![no_main]

use bitnetc::bplan::{Header, parse_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Header::parse(data, data.len() as u64) else {
        return;
    };
    let (off, len, _) = h.manifest;
    let Some(m) = data.get(off as usize..(off + len) as usize) else {
        return;
    };
    if let Ok(m) = parse_manifest(m)
        && let Ok(g) = m.plan.to_graph()
    {
        let _ = bitnetc::ir::verify::verify(&g);
    }
});
