//! `bitnetc serve` over real HTTP on loopback: answers equal the library's greedy generation,
//! streamed or whole; every error is OpenAI-shaped; a full queue gets 503; a client that goes
//! away stops its generation and frees its session.

use bitnetc::serve::{Running, ServeOptions, Server};
use bitnetc::{Engine, LoadOptions, SamplingParams};
use bitnetc_tests::fixture;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const MODEL: &str = "tiny/bitnetcpp-tiny-i2_s.gguf";
const CONTEXT: usize = 64;
/// For requests that must still be generating while others come: thousands of tokens.
const LONG: usize = 4096;

fn engine_with(context: usize) -> Engine {
    Engine::load(
        fixture(MODEL),
        LoadOptions {
            context: Some(context),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn engine() -> Engine {
    engine_with(CONTEXT)
}

fn start(parallel: usize, queue: usize, api_key: Option<&str>) -> Running {
    start_with(parallel, queue, api_key, CONTEXT)
}

fn start_with(parallel: usize, queue: usize, api_key: Option<&str>, context: usize) -> Running {
    let opts = ServeOptions {
        parallel,
        queue,
        api_key: api_key.map(String::from),
        model_id: "tiny".into(),
    };
    Server::new(engine_with(context), opts)
        .unwrap()
        .start("127.0.0.1:0")
        .unwrap()
}

/// An HTTP/1.1 answer: status, headers (lower-case names) and body (de-chunked).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(String::from)
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, body: &str, headers: &[&str]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req += &format!("{h}\r\n");
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).unwrap();
    s
}

fn read_answer(s: TcpStream) -> Answer {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked");
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Answer {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    read_answer(send(addr, "POST", path, &body.to_string(), &[]))
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    read_answer(send(addr, "GET", path, "", &[]))
}

/// The prompt the model's chat format makes of `(role, content)` messages.
fn chat_prompt(messages: &[(&str, &str)]) -> String {
    use bitnetc::runtime::chat::{ChatFormat, Message};
    let e = engine();
    let t = e.tokenizer().unwrap();
    let messages: Vec<Message> = messages.iter().map(|(r, c)| Message::new(r, c)).collect();
    ChatFormat::for_model(t.spec().chat_template.as_deref(), false)
        .unwrap()
        .render_for(t, &messages, true)
        .unwrap()
}

/// The library's greedy continuation of `prompt`: what the server must answer.
fn greedy(prompt: &str, n: usize) -> String {
    let e = engine_with(256);
    let mut s = e.session();
    s.generate_with(prompt, &SamplingParams::greedy(), n)
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn completions_and_chat_answer_what_the_library_generates() {
    let server = start(2, 4, None);
    let addr = server.addr;
    let expected = greedy("Once upon a time", 8);
    assert!(!expected.is_empty());

    let a = post(
        addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], expected.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    // Streamed: the chunks add up to the same text, then the finish reason, then [DONE].
    let a = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": true}),
    );
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = a.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    // Chat: the model's template around the messages; streamed and whole agree.
    let chat = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
    });
    let whole = post(addr, "/v1/chat/completions", &chat);
    assert_eq!(whole.status, 200, "{}", whole.body);
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let prompt = chat_prompt(&[("system", "Be brief."), ("user", "Hi")]);
    assert_eq!(content, greedy(&prompt, 6));
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let events = post(addr, "/v1/chat/completions", &streamed).events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content);

    // The other endpoints.
    let models = get(addr, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["meta"]["n_ctx"], CONTEXT);
    let ids = post(addr, "/tokenize", &json!({"content": "Hello world"})).json();
    let back = post(addr, "/detokenize", &json!({"tokens": ids["tokens"]})).json();
    assert_eq!(back["content"], "Hello world");
    assert_eq!(get(addr, "/health").json()["status"], "ok");
    let metrics = get(addr, "/metrics").body;
    assert!(metrics.contains("bitnetc_requests_total 6\n"), "{metrics}");
    assert!(
        metrics.contains("bitnetc_tokens_generated_total 28\n"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE bitnetc_kv_cache_usage_ratio gauge"));
    server.stop().unwrap();
}

/// Every refusal: the status, and an OpenAI-shaped `error` naming what is wrong.
#[test]
fn bad_requests_get_openai_shaped_errors() {
    let server = start(1, 0, None);
    let addr = server.addr;
    let check = |a: Answer, status: u16, needle: &str| {
        assert_eq!(a.status, status, "{}", a.body);
        let v = a.json();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
        assert!(v["error"]["type"].is_string());
    };
    check(
        read_answer(send(addr, "POST", "/v1/completions", "{\"prompt\": ", &[])),
        400,
        "not valid",
    );
    check(
        post(addr, "/v1/completions", &json!({"max_tokens": 4})),
        400,
        "prompt",
    );
    check(
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "x", "model": "gpt-4"}),
        ),
        400,
        "`gpt-4` does not exist",
    );
    check(
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 65}),
        ),
        400,
        "beyond the context of 64",
    );
    check(
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "word ".repeat(80)}),
        ),
        400,
        "the context holds 64",
    );
    check(
        post(addr, "/v1/chat/completions", &json!({"messages": []})),
        400,
        "messages is empty",
    );
    check(
        post(
            addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "wizard", "content": "x"}]}),
        ),
        400,
        "unknown message role",
    );
    check(
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "x", "temperature": 3}),
        ),
        400,
        "temperature",
    );
    check(
        post(addr, "/detokenize", &json!({"tokens": [5000]})),
        400,
        "not in the vocabulary",
    );
    check(get(addr, "/v2/nothing"), 404, "no such endpoint");
    server.stop().unwrap();

    // A full queue: one request generating (thousands of tokens), none may wait.
    let server = start_with(1, 0, None, LONG);
    let addr = server.addr;
    let first = first_event(send(
        addr,
        "POST",
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": LONG - 8, "stream": true}).to_string(),
        &[],
    ));
    check(
        post(addr, "/v1/completions", &json!({"prompt": "x"})),
        503,
        "the server is busy",
    );
    drop(first);
    server.stop().unwrap();

    // With an API key, the API needs it; /health does not.
    let server = start(1, 1, Some("secret"));
    let addr = server.addr;
    check(get(addr, "/v1/models"), 401, "API key");
    let a = read_answer(send(
        addr,
        "GET",
        "/v1/models",
        "",
        &["Authorization: Bearer secret"],
    ));
    assert_eq!(a.status, 200);
    assert_eq!(get(addr, "/health").status, 200);
}

/// Reads a streamed answer up to its first event, and returns the open connection.
fn first_event(s: TcpStream) -> BufReader<TcpStream> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
    }
    r
}

/// A client that goes away mid-stream: its generation (thousands of tokens) stops and its
/// session is freed for the next request; one that goes away while waiting for a session
/// leaves the queue.
#[test]
fn a_client_that_disconnects_frees_its_session() {
    let server = start_with(1, 1, None, LONG);
    let addr = server.addr;
    let long = json!({"prompt": "a", "max_tokens": LONG - 8, "stream": true}).to_string();
    let r = first_event(send(addr, "POST", "/v1/completions", &long, &[]));
    // A second client waits for the session, then goes away too.
    let waiting = send(addr, "POST", "/v1/completions", &long, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(addr, "/metrics")
        .body
        .contains("bitnetc_requests_waiting 1\n")
    {
        assert!(Instant::now() < deadline, "the second request never waited");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(waiting);
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = get(addr, "/metrics").body;
        if m.contains("bitnetc_cancelled_total 1\n")
            && m.contains("bitnetc_requests_processing 0\n")
            && m.contains("bitnetc_requests_waiting 0\n")
        {
            assert!(m.contains("bitnetc_kv_cache_usage_ratio 0\n"), "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the generation did not stop: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.json()["choices"][0]["text"],
        greedy("Once upon a time", 4).as_str()
    );
    drop(server);
}

/// The official `openai` Python client drives the server unmodified (`tests/openai_client.py`:
/// models, completions and chat, whole and streamed, errors). Needs a Python with `openai`
/// (`BITNETC_OPENAI_PYTHON`, else `python3`); skips without one unless
/// `BITNETC_REQUIRE_OPENAI=1` (as in CI).
#[test]
fn the_openai_python_client_drives_the_server() {
    let python = std::env::var("BITNETC_OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        let required = std::env::var("BITNETC_REQUIRE_OPENAI").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "BITNETC_REQUIRE_OPENAI=1 but {python} cannot import openai"
        );
        eprintln!("SKIPPING: {python} has no `openai` package");
        return;
    }
    let server = start(1, 4, Some("test-key"));
    let chat_prompt = chat_prompt(&[("user", "Hi")]);
    let script = bitnetc_tests::repo_root().join("tests/openai_client.py");
    let o = std::process::Command::new(&python)
        .arg(script)
        .arg(format!("http://{}", server.addr))
        .arg("test-key")
        .arg("Once upon a time")
        .arg(greedy("Once upon a time", 8))
        .arg(greedy(&chat_prompt, 6))
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains(" ok"), "{out}");
    eprintln!("{out}");
}

/// `clients` streaming clients at once, `tokens` tokens each, every `drop_every`-th going away
/// after its first event; the others must receive the library's greedy text. Returns the
/// generated tokens per second over the whole run.
fn load(server: &Running, clients: usize, tokens: usize, drop_every: usize) -> f64 {
    let prompts: Vec<String> = (0..4).map(|i| format!("Once upon a time {i}")).collect();
    let expected: Vec<String> = prompts.iter().map(|p| greedy(p, tokens)).collect();
    let addr = server.addr;
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let (prompt, expected) = (&prompts[c % 4], &expected[c % 4]);
            s.spawn(move || {
                let body = json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                  "stream": true});
                let conn = send(addr, "POST", "/v1/completions", &body.to_string(), &[]);
                if drop_every > 0 && c % drop_every == drop_every - 1 {
                    drop(first_event(conn));
                    return;
                }
                let a = read_answer(conn);
                assert_eq!(a.status, 200, "client {c}: {}", a.body);
                let events = a.events();
                assert_eq!(
                    events.last().map(String::as_str),
                    Some("[DONE]"),
                    "client {c}"
                );
                let text: String = events[..events.len() - 1]
                    .iter()
                    .map(|e| serde_json::from_str::<Value>(e).unwrap())
                    .map(|v| v["choices"][0]["text"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(&text, expected, "client {c}");
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    // Every session is back: nothing generating or waiting, no KV cache held.
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = get(addr, "/metrics").body;
        if m.contains("bitnetc_requests_processing 0\n") {
            break m;
        }
        assert!(Instant::now() < deadline, "sessions still busy: {m}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(m.contains("bitnetc_requests_waiting 0\n"), "{m}");
    assert!(m.contains("bitnetc_kv_cache_usage_ratio 0\n"), "{m}");
    let generated = m
        .lines()
        .find_map(|l| l.strip_prefix("bitnetc_tokens_generated_total "))
        .unwrap()
        .parse::<f64>()
        .unwrap();
    generated / seconds
}

/// 32 streaming clients × 64 tokens on four sessions, one in eight going away early: every
/// other client gets its greedy text, the early ones are cancelled, and every session and
/// KV cache is free afterwards.
#[test]
fn thirty_two_streaming_clients_on_four_sessions() {
    let server = start_with(4, 32, None, 256);
    load(&server, 32, 64, 8);
    let m = get(server.addr, "/metrics").body;
    let cancelled: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("bitnetc_cancelled_total "))
        .unwrap()
        .parse()
        .unwrap();
    // A client that went away after its first event is cancelled unless its generation had
    // already ended.
    assert!(cancelled <= 4, "{m}");
    assert!(m.contains("bitnetc_requests_total 32\n"), "{m}");
    assert!(m.contains("bitnetc_busy_total 0\n"), "{m}");
    let health = get(server.addr, "/health").json();
    assert_eq!(health["slots_idle"], 4);
}

/// The aggregate decode speed of 32 clients × 64 tokens with one session and with four
/// (`cargo test --release -p bitnetc-tests --test serve -- --ignored --nocapture`); the
/// numbers go to BENCHMARKS.md.
#[test]
#[ignore]
fn serve_throughput_one_vs_four_sessions() {
    for parallel in [1, 4] {
        let server = start_with(parallel, 32, None, 256);
        let tps = load(&server, 32, 64, 0);
        eprintln!("{parallel} session(s): {tps:.1} generated tokens/s over 32 clients × 64 tokens");
    }
}
