//! Pass filetests: each `tests/passes/*.ir` file names a pass in its first line
//! (`# pass: NAME`); the input is parsed, verified, run through that pass, verified again and
//! printed, and the output is a reviewed snapshot next to it.

use bitnetc::ir::op::Op;
use bitnetc::ir::text::{parse, print};
use bitnetc::ir::types::{DType, Dim};
use bitnetc::ir::verify::verify;
use bitnetc::passes::fuse::RepackTarget;
use bitnetc::passes::{PassConfig, PassManager, memory};
use bitnetc_tests::repo_root;
use std::collections::HashMap;
use std::sync::Arc;

/// A repack target that maps encodings to layout names, from a `# layouts: enc=name,…` line.
struct ByEncoding(HashMap<String, String>);

impl RepackTarget for ByEncoding {
    fn layout(&self, dtype: DType, _: &[Dim], _: &Op) -> Option<String> {
        self.0.get(dtype.name()).cloned()
    }
}

fn header<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
}

/// The `.ir` files of `dir`, sorted.
fn ir_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    files.sort();
    files
}

/// insta settings that keep the snapshots in `dir/snapshots`, named by file.
fn snapshots_beside(dir: &std::path::Path) -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(dir.join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings
}

#[test]
fn pass_filetests() {
    let dir = repo_root().join("tests/passes");
    let files = ir_files(&dir);
    assert!(
        files.len() >= 9,
        "expected a filetest per pass, found {}",
        files.len()
    );
    let settings = snapshots_beside(&dir);
    settings.bind(|| {
        for file in files {
            let name = file.file_stem().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&file).unwrap();
            let pass = header(&text, "pass").unwrap_or_else(|| panic!("{name}: no '# pass:' line"));
            let layouts: HashMap<String, String> = header(&text, "layouts")
                .map(|l| {
                    l.split(',')
                        .map(|kv| {
                            kv.split_once('=')
                                .map(|(k, v)| (k.into(), v.into()))
                                .unwrap()
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut g = parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            verify(&g).unwrap_or_else(|e| panic!("{name}: input does not verify: {e}"));
            let config = PassConfig {
                repack: Arc::new(ByEncoding(layouts)),
            };
            PassManager::new(&[pass], &config)
                .unwrap()
                .run(&mut g, |_| {})
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            insta::assert_snapshot!(name, print(&g).unwrap());
        }
    });
}

/// Memory planning of the graphs in `tests/passes/memory/`: the plan's steps with each
/// buffer's arena offset, the arena size and the most buffers alive at once, snapshotted;
/// the plan's own check (no two live buffers overlap) passes.
#[test]
fn memory_plans() {
    let dir = repo_root().join("tests/passes/memory");
    let files = ir_files(&dir);
    assert!(
        !files.is_empty(),
        "no memory-plan filetests in {}",
        dir.display()
    );
    let settings = snapshots_beside(&dir);
    settings.bind(|| {
        for file in files {
            let name = file.file_stem().unwrap().to_string_lossy().to_string();
            let g = parse(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            verify(&g).unwrap_or_else(|e| panic!("{name}: input does not verify: {e}"));
            let (plan, stats) = memory::plan(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
            memory::check(&plan).unwrap_or_else(|e| panic!("{name}: {e}"));
            insta::assert_snapshot!(name, memory::describe(&plan, &stats));
        }
    });
}
