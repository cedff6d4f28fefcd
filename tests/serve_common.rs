//! Helpers of the `serve` and `serve_load` suites: a server on loopback over a fixture model,
//! raw HTTP requests and answers, and the library's greedy text to compare with.

#![allow(dead_code)]

pub use bitnetc::serve::{Running, ServeOptions, Server};
pub use bitnetc::{Engine, LoadOptions, SamplingParams};
pub use bitnetc_tests::fixture;
pub use serde_json::{Value, json};
pub use std::io::{BufRead, BufReader, Read, Write};
pub use std::net::{SocketAddr, TcpStream};
pub use std::time::{Duration, Instant};

/// The served model; `BITNETC_SERVE_MODEL` names another (for the throughput benchmark).
pub const MODEL: &str = "tiny/bitnetcpp-tiny-i2_s.gguf";
pub const CONTEXT: usize = 64;
/// For requests that must still be generating while others come: thousands of tokens.
pub const LONG: usize = 4096;

pub fn engine_with(context: usize) -> Engine {
    Engine::load(
        std::env::var_os("BITNETC_SERVE_MODEL").map_or_else(|| fixture(MODEL), Into::into),
        LoadOptions {
            context: Some(context),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

pub fn engine() -> Engine {
    engine_with(CONTEXT)
}

pub fn start(parallel: usize, queue: usize, api_key: Option<&str>) -> Running {
    start_with(parallel, queue, api_key, CONTEXT)
}

pub fn start_with(parallel: usize, queue: usize, api_key: Option<&str>, context: usize) -> Running {
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
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(String::from)
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn send(addr: SocketAddr, method: &str, path: &str, body: &str, headers: &[&str]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    // A request queued behind a big model's generations (BITNETC_SERVE_MODEL) waits long.
    let wait = match std::env::var_os("BITNETC_SERVE_MODEL") {
        Some(_) => 1800,
        None => 60,
    };
    s.set_read_timeout(Some(Duration::from_secs(wait))).unwrap();
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

pub fn read_answer(s: TcpStream) -> Answer {
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

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    read_answer(send(addr, "POST", path, &body.to_string(), &[]))
}

pub fn get(addr: SocketAddr, path: &str) -> Answer {
    read_answer(send(addr, "GET", path, "", &[]))
}

/// The prompt the model's chat format makes of `(role, content)` messages.
pub fn chat_prompt(messages: &[(&str, &str)]) -> String {
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
pub fn greedy(prompt: &str, n: usize) -> String {
    let e = engine_with(256);
    let mut s = e.session();
    s.generate_with(prompt, &SamplingParams::greedy(), n)
        .unwrap()
        .text()
        .unwrap()
}

/// Reads a streamed answer up to its first event, and returns the open connection.
pub fn first_event(s: TcpStream) -> BufReader<TcpStream> {
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
