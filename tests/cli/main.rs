//! The `bitnetc` command line, run as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bitnetc(args: &[&str]) -> Output {
    // A fixed width keeps the wrapped --help text independent of the terminal.
    Command::new(env!("CARGO_BIN_EXE_bitnetc"))
        .args(args)
        .env("COLUMNS", "100")
        .output()
        .expect("run bitnetc")
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn inspect_describes_the_i2s_fixture() {
    let path = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let o = bitnetc(&["inspect", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "gguf        version 3, alignment 32, data at byte 74240",
        "type ids    bitnet.cpp table",
        "architecture  bitnet-25 (relu² GLU, SubLN, NEOX RoPE, tied output head)",
        "dims          vocab 2048, context 512, hidden 256, layers 4, ffn 768",
        "attention     8 heads, 2 kv heads, head dim 32, rope 32 dims, theta 500000",
        "I2_S       28 tensors",
        "no pre-tokenizer named (bitnet.cpp then uses its DEFAULT rules)",
        "bos 0 \"<|begin_of_text|>\", eos 1 \"<|end_of_text|>\"",
        "tokenizer.ggml.tokens",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(
        !out.contains("blk.0.attn_q.weight"),
        "the tensor table needs --tensors"
    );
}

#[test]
fn inspect_json_and_tensor_table() {
    let path = fixture("tiny/mainline-tiny-tq2_0.gguf");
    let o = bitnetc(&["inspect", "--json", "--tensors", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["config"]["architecture"], "bitnet");
    assert_eq!(v["config"]["ffn_activation"], "silu");
    assert_eq!(v["tensors"].as_array().unwrap().len(), 46);
    assert_eq!(v["tensors"][2]["name"], "blk.0.ffn_down.weight");
    assert_eq!(v["tensors"][2]["type"], "TQ2_0");
    assert_eq!(v["tensors"][2]["nbytes"], 50688);
    assert_eq!(v["tokenizer"]["pre"], "gpt-2");
    let tokens = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "tokenizer.ggml.tokens")
        .unwrap();
    assert_eq!(tokens["type"], "arr[str,2048]");
    assert_eq!(
        tokens["value"].as_array().unwrap().len(),
        8,
        "long arrays are summarized"
    );
    let text = bitnetc(&["inspect", "--tensors", path.to_str().unwrap()]);
    assert_eq!(
        stdout(&text)
            .lines()
            .filter(|l| l.contains("blk.") && l.contains(" TQ2_0 "))
            .count(),
        28
    );
}

#[test]
fn inspect_never_panics_on_malformed_files() {
    let dir = fixture("malformed");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "gguf") {
            continue;
        }
        let o = bitnetc(&["inspect", path.to_str().unwrap()]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: {}",
            path.display(),
            stderr(&o)
        );
        let err = stderr(&o);
        assert!(
            err.starts_with(&format!("error: {}: ", path.display())),
            "{err}"
        );
        n += 1;
    }
    assert!(n >= 20);
}

#[test]
fn quantize_writes_i2s_and_refuses_bad_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.gguf");
    let input = fixture("tiny/bitnetcpp-tiny-f32.gguf");
    let o = bitnetc(&[
        "quantize",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "i2_s",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("46 tensors: 1 F16, 17 F32, 28 I2_S"),
        "{}",
        stdout(&o)
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1_902_976);
    // A folder that does not exist: a clear error and no file left behind.
    let bad = dir.path().join("missing/q.gguf");
    let o = bitnetc(&[
        "quantize",
        input.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--type",
        "tq2_0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing/q.gguf"), "{}", stderr(&o));
    let o = bitnetc(&[
        "quantize",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q4_k",
    ]);
    assert_eq!(o.status.code(), Some(2), "clap rejects an unknown type");
}

#[test]
fn help_texts() {
    let o = bitnetc(&["--help"]);
    insta::assert_snapshot!("help", stdout(&o));
    for cmd in [
        "inspect",
        "quantize",
        "compile",
        "logits",
        "run",
        "chat",
        "tokenize",
        "bench",
        "perplexity",
        "serve",
    ] {
        let o = bitnetc(&[cmd, "--help"]);
        assert!(o.status.success());
        insta::assert_snapshot!(format!("help_{cmd}"), stdout(&o));
    }
}

#[test]
fn compile_emits_ir_that_parses_back() {
    let path = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let o = bitnetc(&["compile", path.to_str().unwrap(), "--emit", "ir"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.starts_with("%0 = input \"tokens\" : i32[T]\n"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" = kv_append ")).count(),
        4
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" = tmatmul ")).count(),
        28
    );
    let g = bitnetc::ir::text::parse(&text).unwrap();
    bitnetc::ir::verify::verify(&g).unwrap();
    assert_eq!(bitnetc::ir::text::print(&g).unwrap(), text);
}

#[test]
fn logits_writes_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.npy");
    let model = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let tokens = "0 370 1768 318 76 291 83 1486 294 80 89 1593 468 1454 947 272";
    for mode in ["batch", "seq"] {
        let o = bitnetc(&[
            "logits",
            "-m",
            model.to_str().unwrap(),
            "--tokens",
            tokens,
            "-o",
            out.to_str().unwrap(),
            "--mode",
            mode,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ours = bitnetc::npy::read_f32(&out).unwrap();
        let reference =
            bitnetc::npy::read_f32(&fixture(&format!("tiny/ref/bitnetcpp-i2_s.{mode}.npy")))
                .unwrap();
        assert_eq!(ours.shape, vec![16, 2048]);
        let max = ours
            .data
            .iter()
            .zip(&reference.data)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(max <= 1e-5, "{mode}: {max}");
    }
    let o = bitnetc(&[
        "logits",
        "-m",
        model.to_str().unwrap(),
        "--tokens",
        "0 99999",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("id 99999 is outside the vocabulary of 2048"),
        "{}",
        stderr(&o)
    );
    let o = bitnetc(&[
        "logits",
        "-m",
        model.to_str().unwrap(),
        "--tokens",
        "0 x",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("'x' is not a token id"),
        "{}",
        stderr(&o)
    );
}

fn smollm2() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else if std::env::var_os("BITNETC_REQUIRE_SHARED_FIXTURES").is_some_and(|v| v == "1") {
        panic!(
            "{} is not present (BITNETC_REQUIRE_SHARED_FIXTURES=1)",
            p.display()
        );
    } else {
        eprintln!("SKIPPING: {} is not present", p.display());
        None
    }
}

/// Asks `model` (SmolLM2 or its plan) for the capital of France, greedily, and checks the
/// answer and llama.cpp's token ids, up to and including the first end-of-generation token.
fn assert_answers_paris(model: &Path) {
    let o = bitnetc(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "-cnv",
        "-p",
        "What is the capital of France?",
        "--temp",
        "0",
        "--output-ids",
        "-c",
        "128",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "The capital of France is Paris.\n");
    assert!(
        stderr(&o).contains("[504,3575,282,4649,314,7042,30,2]"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn run_answers_paris() {
    let Some(model) = smollm2() else { return };
    assert_answers_paris(&model);
}

/// With no `-m`, `run` uses the built-in model, and its greedy ids are those its training script
/// recorded (models/tiny-shakespeare.json).
#[test]
fn run_without_a_model_uses_the_built_in_one() {
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shakespeare.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let prompt = record["prompt"].as_str().unwrap();
    let o = bitnetc(&[
        "run",
        "-p",
        prompt,
        "-n",
        "24",
        "--temp",
        "0",
        "--ignore-eos",
        "--no-display-prompt",
        "--output-ids",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want: Vec<u64> = record["greedy_ids"].as_array().unwrap()[..24]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let ids: Vec<u64> = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(ids, want);
    let text = stdout(&o);
    assert!(
        !text.is_empty()
            && record["greedy_text"]
                .as_str()
                .unwrap()
                .starts_with(text.trim_end_matches('\n')),
        "{text:?}"
    );
}

#[test]
fn tokenize_prints_ids_and_pieces() {
    let model = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let m = model.to_str().unwrap();
    let o = bitnetc(&["tokenize", "-m", m, "-p", "Hello, world!", "--ids"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[0,41,838,367,13,312,273,469,2]\n");
    let o = bitnetc(&[
        "tokenize",
        "-m",
        m,
        "-p",
        "Hello, world!",
        "--ids",
        "--no-bos",
    ]);
    assert_eq!(stdout(&o), "[41,838,367,13,312,273,469,2]\n");
    let o = bitnetc(&["tokenize", "-m", m, "-p", "Hello"]);
    assert!(
        stdout(&o).starts_with("     0 -> \"<|begin_of_text|>\"\n"),
        "{}",
        stdout(&o)
    );
    // bitnet.cpp's file names no pre-tokenizer (DEFAULT rules); `--pre-tokenizer gpt-2` gives
    // llama.cpp's ids for the same vocabulary under gpt-2 rules (tokenize-mainline.jsonl).
    let text = "don't we'll they're I'm you've she'd it's";
    let o = bitnetc(&["tokenize", "-m", m, "-p", text, "--ids", "--no-bos"]);
    assert_eq!(
        stdout(&o),
        "[69,267,8,85,312,70,8,1538,912,8,276,393,8,78,516,8,474,538,70,8,69,358,8,84]\n"
    );
    let o = bitnetc(&[
        "tokenize",
        "-m",
        m,
        "-p",
        text,
        "--ids",
        "--no-bos",
        "--pre-tokenizer",
        "gpt-2",
    ]);
    assert_eq!(
        stdout(&o),
        "[69,267,8,85,312,70,8,1538,912,8,276,393,8,78,516,8,474,538,70,8,69,358,1450]\n"
    );
    let o = bitnetc(&[
        "tokenize",
        "-m",
        m,
        "-p",
        "x",
        "--pre-tokenizer",
        "nonsense",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown pre-tokenizer 'nonsense'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn chat_repl_answers_and_obeys_commands() {
    use std::io::Write;
    let model = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnetc"))
        .args([
            "chat",
            "-m",
            model.to_str().unwrap(),
            "--temp",
            "0",
            "-n",
            "4",
            "-c",
            "256",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"/help\nHello there\n/clear\nHello there\n/bye\nnever read\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("chat format bitnet"), "{err}");
    assert!(err.contains("/clear  forget the conversation"), "{err}");
    assert!(err.contains("(conversation cleared)"), "{err}");
    // Greedy: the same answer before and after /clear.
    let out = stdout(&o);
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0], answers[1]);
}

#[test]
fn run_needs_a_prompt() {
    let model = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let o = bitnetc(&["run", "-m", model.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("give a prompt with -p TEXT or -f FILE"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn compile_runs_named_passes_and_prints_stages() {
    let model = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let m = model.to_str().unwrap();
    let o = bitnetc(&["compile", m, "--emit", "fused"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.contains(" = linear "))
            .count(),
        4 * 4 + 1
    );
    let o = bitnetc(&[
        "compile",
        m,
        "--emit",
        "fused",
        "--passes",
        "canonicalize,fuse-norm",
        "--print-after",
        "canonicalize",
        "--time-passes",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("--- IR after canonicalize ---"), "{err}");
    assert!(!err.contains("--- IR after fuse-norm ---"), "{err}");
    // The --time-passes table: a header, one row per pass run (name, rewrites, ms), a total.
    let table: Vec<Vec<&str>> = err
        .lines()
        .skip_while(|l| !l.starts_with("pass "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(table.len(), 4, "{err}");
    assert_eq!(table[0], ["pass", "rewrites", "ms"]);
    for (row, pass) in table[1..3].iter().zip(["canonicalize", "fuse-norm"]) {
        assert_eq!(row.len(), 3, "{row:?}");
        assert_eq!(row[0], pass);
        assert!(
            row[1].parse::<usize>().unwrap() > 0,
            "{pass} rewrote nothing"
        );
        assert!(row[2].parse::<f64>().unwrap() >= 0.0);
    }
    let ms = |row: &[&str]| row.last().unwrap().parse::<f64>().unwrap();
    assert_eq!(table[3][0], "total");
    assert!((ms(&table[3]) - ms(&table[1]) - ms(&table[2])).abs() < 0.01);
    assert!(
        !stdout(&o).contains("weight_concat"),
        "fuse-horizontal did not run"
    );
    let o = bitnetc(&["compile", m, "--emit", "fused", "--print-after=all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let printed: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("--- IR after ")?.strip_suffix(" ---"))
        .collect();
    assert_eq!(printed, bitnetc::passes::PASSES);
    let o = bitnetc(&[
        "compile",
        m,
        "--emit",
        "fused",
        "--stop-after",
        "fuse-horizontal",
    ]);
    assert!(
        stdout(&o).contains("weight_concat") && stdout(&o).contains(" = act "),
        "{}",
        stdout(&o)
    );
    let o = bitnetc(&["compile", m, "--emit", "plan"]);
    assert!(
        stdout(&o).starts_with("# 55 steps, 34 weight buffers; arena 9216 bytes per token"),
        "{}",
        stdout(&o)
    );
    let o = bitnetc(&["compile", m, "--emit", "ir", "--time-passes"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--emit ir prints the graph as lowered, before any pass"),
        "{}",
        stderr(&o)
    );
    let o = bitnetc(&["compile", m, "--passes", "canonicalize,fuse-everything"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown pass 'fuse-everything'; passes are: canonicalize, cse"),
        "{}",
        stderr(&o)
    );
    let o = bitnetc(&[
        "compile",
        m,
        "--emit",
        "fused",
        "--passes",
        "cse",
        "--stop-after",
        "dce",
    ]);
    assert!(
        stderr(&o).contains("pass 'dce' is not in the pipeline (cse)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_writes_llama_bench_json_records() {
    let path = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let o = bitnetc(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "4",
        "-t",
        "1,2",
        "-d",
        "0,5",
        "-r",
        "2",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let records: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let records = records.as_array().unwrap();
    let tests: Vec<[u64; 4]> = records
        .iter()
        .map(|r| ["n_threads", "n_depth", "n_prompt", "n_gen"].map(|k| r[k].as_u64().unwrap()))
        .collect();
    assert_eq!(
        tests,
        vec![
            [1, 0, 8, 0],
            [1, 0, 0, 4],
            [1, 5, 8, 0],
            [1, 5, 0, 4],
            [2, 0, 8, 0],
            [2, 0, 0, 4],
            [2, 5, 8, 0],
            [2, 5, 0, 4],
        ]
    );
    let inspect = bitnetc(&["inspect", "--json", path.to_str().unwrap()]);
    let totals: serde_json::Value = serde_json::from_str(&stdout(&inspect)).unwrap();
    for r in records {
        assert_eq!(r["samples_ns"].as_array().unwrap().len(), 2);
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
        assert_eq!(r["model_filename"], path.to_str().unwrap());
        assert_eq!(r["model_type"], "bitnet-25 3.5M I2_S");
        assert_eq!(r["model_size"], totals["totals"]["bytes"]);
        assert_eq!(r["model_n_params"], totals["totals"]["parameters"]);
    }
    let o = bitnetc(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "4",
        "-n",
        "2",
        "-d",
        "0,3",
        "-r",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(table.starts_with("| model "), "{table}");
    // The kernel trace counts the tests' steps (a warm-up and one run of two tokens), not the
    // depth's tokens before them.
    let o = bitnetc(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "0",
        "-n",
        "2",
        "-d",
        "3",
        "-r",
        "1",
        "--trace-kernels",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let embed = stderr(&o)
        .lines()
        .find(|l| l.starts_with("embed "))
        .map(|l| l.split_whitespace().rev().nth(1).unwrap().to_string());
    assert_eq!(embed.as_deref(), Some("4"), "{}", stderr(&o));
    // A model that does not load leaves its error and no table.
    let missing = tempfile::tempdir().unwrap().path().join("missing.gguf");
    let o = bitnetc(&[
        "bench",
        "-m",
        missing.to_str().unwrap(),
        "-p",
        "4",
        "-n",
        "2",
    ]);
    assert!(!o.status.success());
    assert_eq!(stdout(&o), "");
    assert!(stderr(&o).contains("missing.gguf"), "{}", stderr(&o));
    assert_eq!(
        table
            .lines()
            .filter(|l| [" pp4 |", " tg2 |", " pp4 @ d3 |", " tg2 @ d3 |"]
                .iter()
                .any(|t| l.contains(t)))
            .count(),
        4,
        "{table}"
    );
}

#[test]
fn bench_runs_sessions_in_parallel() {
    let path = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let o = bitnetc(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "4",
        "-n",
        "3",
        "-d",
        "2",
        "--parallel",
        "1,3",
        "-r",
        "2",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let records: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let tests: Vec<[u64; 4]> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ["n_parallel", "n_depth", "n_prompt", "n_gen"].map(|k| r[k].as_u64().unwrap()))
        .collect();
    assert_eq!(
        tests,
        vec![[1, 2, 4, 0], [1, 2, 0, 3], [3, 2, 4, 0], [3, 2, 0, 3]]
    );
    // The table labels the tests of several sessions.
    let o = bitnetc(&[
        "bench",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "0",
        "-n",
        "2",
        "-np",
        "2",
        "-r",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(" tg2 x2 |"), "{}", stdout(&o));
    let o = bitnetc(&["bench", "-m", path.to_str().unwrap(), "--parallel", "0"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--parallel must be at least 1"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_compiled_plan_answers_like_its_model() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("smollm2.bplan");
    let o = bitnetc(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
        "--verbose",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with(&format!("wrote {}", plan.display())),
        "{out}"
    );
    assert!(
        out.contains("source        SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{out}"
    );
    assert!(out.contains("load          "), "{out}");
    assert_answers_paris(&plan);
    let o = bitnetc(&["inspect", plan.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("compiled plan, format 1 by bitnetc"));
    // A plan cannot take a GGUF-only option, and says which.
    let o = bitnetc(&[
        "run",
        "-m",
        plan.to_str().unwrap(),
        "-p",
        "x",
        "--lm-head",
        "q8_0",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--lm-head is chosen at compile time"),
        "{}",
        stderr(&o)
    );
    let o = bitnetc(&[
        "compile",
        model.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
        "--target",
        "cuda",
        "--cuda-arch",
        "sm_12",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--target cuda: "), "{}", stderr(&o));
}

#[test]
fn device_cuda_without_a_driver_is_a_clear_error() {
    if bitnetc::runtime::cuda::driver_available() {
        return; // a GPU machine: scripts/gpu-check.sh runs the GPU tests
    }
    let model = fixture("tiny/bitnetcpp-tiny-i2_s.gguf");
    let o = bitnetc(&[
        "run",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "x",
        "-n",
        "2",
        "--device",
        "cuda",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no CUDA driver (libcuda.so could not be loaded)"),
        "{}",
        stderr(&o)
    );
}

/// The generation flags of `run`, on the built-in model: `-f` reads the prompt, the
/// `--max-tokens`/`--temperature` aliases, `-s` seeds sampling, `--stop` ends the text before
/// a string, `-sys` reaches a conversation's prompt, `--verbose` prints the timings.
#[test]
fn run_flags_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "MACBETH.\nIf it were done when 'tis done, then 'twere well";
    let ids = |o: &Output| -> Vec<u64> {
        assert!(o.status.success(), "{}", stderr(o));
        serde_json::from_str(stderr(o).lines().last().unwrap()).unwrap()
    };
    let greedy = ["-n", "12", "--temp", "0", "--ignore-eos", "--output-ids"];
    let from_p = ids(&bitnetc(&[&["run", "-p", prompt][..], &greedy].concat()));
    assert_eq!(from_p.len(), 12);
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, prompt).unwrap();
    let f = file.to_str().unwrap();
    assert_eq!(
        ids(&bitnetc(&[&["run", "-f", f][..], &greedy].concat())),
        from_p
    );
    let aliases = [
        "run",
        "-p",
        prompt,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--output-ids",
    ];
    assert_eq!(ids(&bitnetc(&aliases)), from_p);

    let sampled = |seed: &str| {
        let args = ["run", "-p", prompt, "-n", "16", "--temp", "0.9", "-s", seed];
        ids(&bitnetc(
            &[&args[..], &["--ignore-eos", "--output-ids"]].concat(),
        ))
    };
    assert_eq!(sampled("7"), sampled("7"));
    assert_ne!(sampled("7"), sampled("8"));

    // The greedy text is ".\n\nPOINS.\nI'll be sworn, …": stopping at "sworn" keeps what
    // comes before it.
    let o = bitnetc(&[
        "run",
        "-p",
        prompt,
        "-n",
        "32",
        "--temp",
        "0",
        "--no-display-prompt",
        "--stop",
        "sworn",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end_matches('\n'), ".\n\nPOINS.\nI'll be ");

    let prompt_tokens = |o: &Output| -> usize {
        assert!(o.status.success(), "{}", stderr(o));
        let line = stderr(o)
            .lines()
            .find(|l| l.starts_with("prompt eval"))
            .unwrap_or_else(|| panic!("no timings in {}", stderr(o)))
            .to_string();
        line.split('/')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let chat = [
        "run", "-cnv", "-p", "Speak.", "-n", "1", "--temp", "0", "-v",
    ];
    let plain = bitnetc(&chat);
    for label in ["load time", "prompt eval", "generation", "seed"] {
        assert!(
            stderr(&plain).contains(label),
            "{label}: {}",
            stderr(&plain)
        );
    }
    let with_system = bitnetc(&[&chat[..], &["-sys", "Thou art a herald."]].concat());
    assert!(prompt_tokens(&with_system) > prompt_tokens(&plain));
}
