//! `bitnetc serve` over real HTTP on loopback: answers equal the library's greedy generation,
//! streamed or whole; every error is OpenAI-shaped; a full queue gets 503; a client that goes
//! away stops its generation and frees its session.

#[path = "serve_common.rs"]
mod common;

use common::*;
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
