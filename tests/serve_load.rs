//! `bitnetc serve` under load, alone in its process so that its memory can be measured: 32
//! streaming clients on four sessions, some going away early.

#[path = "serve_common.rs"]
mod common;

use common::*;

/// How far above its idle level the process may stay after the load: the allocator keeps some
/// freed memory for reuse (measured: 2 MiB); one leaked session per request would be 100 MiB.
const SLACK: u64 = 8 << 20;

/// The server's resident memory, as its `/metrics` reports it.
fn resident(addr: std::net::SocketAddr) -> u64 {
    let m = get(addr, "/metrics").body;
    m.lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .unwrap_or_else(|| panic!("no resident memory in {m}"))
        .parse()
        .unwrap()
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
/// other client gets its greedy text (the sessions' tokens decoded in batched steps), the early
/// ones are cancelled, every session and KV cache is free afterwards, and the process's memory
/// is back at its idle level.
#[test]
fn thirty_two_streaming_clients_on_four_sessions() {
    let server = start_with(4, 32, None, 256);
    // The idle level: after a first round that used every session.
    load(&server, 4, 64, 0);
    let idle = resident(server.addr);
    load(&server, 32, 64, 8);
    let after = resident(server.addr);
    eprintln!("resident memory: {idle} bytes idle, {after} bytes after 32 clients");
    assert!(
        after <= idle + SLACK,
        "memory grew by {} bytes under load (idle {idle}, after {after})",
        after.saturating_sub(idle)
    );
    let m = get(server.addr, "/metrics").body;
    let count = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("bitnetc_{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (steps, tokens) = (
        count("decode_steps_total"),
        count("decode_step_tokens_total"),
    );
    eprintln!("{steps} batched decode steps of {tokens} tokens");
    // Four sessions decode together: most steps hold every session's token (measured: 3.7
    // tokens a step).
    assert!(steps > 0.0 && tokens >= 2.0 * steps, "{m}");
    let cancelled: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("bitnetc_cancelled_total "))
        .unwrap()
        .parse()
        .unwrap();
    // A client that went away after its first event is cancelled unless its generation had
    // already ended.
    assert!(cancelled <= 4, "{m}");
    // The four of the first round and the 32.
    assert!(m.contains("bitnetc_requests_total 36\n"), "{m}");
    assert!(m.contains("bitnetc_busy_total 0\n"), "{m}");
    let health = get(server.addr, "/health").json();
    assert_eq!(health["slots_idle"], 4);
}

/// The aggregate decode speed of 32 clients × 64 tokens with one session and with four
/// (`cargo test --release -p bitnetc-tests --test serve_load -- --ignored --nocapture`); the
/// numbers go to BENCHMARKS.md. `BITNETC_SERVE_MODEL=PATH` serves another model.
#[test]
#[ignore]
fn serve_throughput_one_vs_four_sessions() {
    for parallel in [1, 4] {
        let server = start_with(parallel, 32, None, 256);
        let tps = load(&server, 32, 64, 0);
        eprintln!("{parallel} session(s): {tps:.1} generated tokens/s over 32 clients × 64 tokens");
    }
}
