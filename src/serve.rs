//! An OpenAI-compatible HTTP server over one [`Engine`]: `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (whole answers or server-sent events), `/tokenize`, `/detokenize`,
//! `/health` and `/metrics` (Prometheus text).
//!
//! Up to [`ServeOptions::parallel`] requests generate at once, each in its own session (its
//! own KV cache), on blocking threads, their decode steps batched into one step over all their
//! tokens ([`DecodeBatcher`]); up to [`ServeOptions::queue`] more wait for a free one, and
//! beyond that a request is answered 503. Errors are OpenAI-shaped JSON. A client that goes
//! away stops its generation at the next token and frees its session.

use crate::runtime::SpareSession;
use crate::runtime::batch::DecodeBatcher;
use crate::runtime::chat::{ChatFormat, Message};
use crate::{Engine, FinishReason, SamplingParams};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// How the server shares its engine.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Requests generating at once (each with its own session and KV cache).
    pub parallel: usize,
    /// Requests waiting for a free session before the server answers 503.
    pub queue: usize,
    /// When set, every `/v1/*`, `/tokenize` and `/detokenize` request needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The model's id in `/v1/models` and in answers.
    pub model_id: String,
}

/// The server's state: the engine, its sessions' slots and its counters.
pub struct Server {
    engine: Engine,
    opts: ServeOptions,
    chat: ChatFormat,
    slots: Arc<Semaphore>,
    /// The memory of finished sessions (at most `parallel`), reused by the next requests so
    /// that serving allocates no KV cache or arena after the first requests.
    spares: std::sync::Mutex<Vec<SpareSession>>,
    /// Where the sessions' decode steps meet to run as one (with more than one session on the
    /// compiled executor).
    batcher: Option<Arc<DecodeBatcher>>,
    waiting: AtomicUsize,
    created: u64,
    started: Instant,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    errors: AtomicU64,
    busy: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    generation_micros: AtomicU64,
    /// KV cache positions held by the sessions generating now.
    kv_positions: AtomicU64,
}

/// A server started with [`Server::start`]; stops when dropped.
pub struct Running {
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Stops accepting, lets the requests in flight finish, and returns how serving ended.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the server thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// An OpenAI-shaped error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
        }
    }

    fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

impl Server {
    /// A server over `engine`; fails when the model has no tokenizer or an unusable chat
    /// template.
    pub fn new(engine: Engine, opts: ServeOptions) -> Result<Arc<Server>, crate::Error> {
        let template = engine.tokenizer()?.spec().chat_template.clone();
        let chat = ChatFormat::for_model(template.as_deref(), false)
            .map_err(|e| crate::Error::Tokenizer(e.to_string()))?;
        let batcher = (opts.parallel > 1 && engine.model().engine.executor().is_some())
            .then(|| DecodeBatcher::new(&engine.model().engine));
        Ok(Arc::new(Server {
            batcher,
            engine,
            slots: Arc::new(Semaphore::new(opts.parallel.max(1))),
            opts,
            chat,
            spares: std::sync::Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            started: Instant::now(),
            stats: Stats::default(),
        }))
    }

    /// The routes, with the API key check where one is set.
    pub fn router(self: &Arc<Server>) -> Router {
        let api = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/tokenize", post(tokenize))
            .route("/detokenize", post(detokenize))
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                authorize,
            ));
        Router::new()
            .merge(api)
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(|| async {
                ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: "no such endpoint".into(),
                    kind: "invalid_request_error",
                    code: Some("not_found"),
                }
            })
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self: &Arc<Server>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Serves on `addr` (e.g. `127.0.0.1:0`) from a thread of its own, until the handle is
    /// dropped or stopped.
    pub fn start(self: &Arc<Server>, addr: &str) -> std::io::Result<Running> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let local = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = self.clone();
        let thread = std::thread::Builder::new()
            .name("bitnetc-serve".into())
            .spawn(move || {
                runtime.block_on(server.serve(listener, async {
                    let _ = stopped.await;
                }))
            })?;
        Ok(Running {
            addr: local,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn tokenizer(&self) -> Result<&crate::runtime::tokenizer::Tokenizer, ApiError> {
        self.engine
            .tokenizer()
            .map_err(|e| ApiError::server(e.to_string()))
    }

    /// A free session's slot, waiting in the queue if there is room; 503 otherwise.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.opts.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "the server is busy: {} requests are generating and {} are waiting; retry later",
                    self.opts.parallel, self.opts.queue
                ),
                kind: "server_error",
                code: Some("server_busy"),
            });
        }
        // Counted as waiting until it has a slot or its request is dropped (the client left).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&self.waiting);
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::server("the server is shutting down"))
    }
}

async fn authorize(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &server.opts.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            server.stats.errors.fetch_add(1, Ordering::Relaxed);
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "a valid API key is needed: Authorization: Bearer <key>".into(),
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(request).await
}

async fn health(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": server.opts.model_id,
        "slots_idle": server.slots.available_permits(),
        "slots_total": server.opts.parallel,
    }))
}

async fn metrics(State(server): State<Arc<Server>>) -> impl IntoResponse {
    let s = &server.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let generated = load(&s.generated_tokens);
    let secs = load(&s.generation_micros) as f64 / 1e6;
    let active = server.opts.parallel - server.slots.available_permits();
    let capacity = server.engine.model().engine.context() * server.opts.parallel;
    #[rustfmt::skip]
    let lines = [
        ("requests_total", "counter", "Requests to the completion, chat and token endpoints.", load(&s.requests) as f64),
        ("errors_total", "counter", "Requests answered with an error.", load(&s.errors) as f64),
        ("busy_total", "counter", "Requests refused with 503: the queue was full.", load(&s.busy) as f64),
        ("cancelled_total", "counter", "Generations stopped because the client went away.", load(&s.cancelled) as f64),
        ("prompt_tokens_total", "counter", "Prompt tokens evaluated.", load(&s.prompt_tokens) as f64),
        ("tokens_generated_total", "counter", "Tokens generated.", generated as f64),
        ("tokens_per_second", "gauge", "Generated tokens per second of generation, summed over requests.", if secs > 0.0 { generated as f64 / secs } else { 0.0 }),
        ("requests_processing", "gauge", "Requests generating now.", active as f64),
        ("requests_waiting", "gauge", "Requests waiting for a session.", server.waiting.load(Ordering::Relaxed) as f64),
        ("kv_cache_usage_ratio", "gauge", "KV cache positions in use over all sessions' capacity.", load(&s.kv_positions) as f64 / capacity.max(1) as f64),
        ("decode_steps_total", "counter", "Batched decode steps run (one token of each session generating).", server.batcher.as_ref().map_or(0, |b| b.counts().0) as f64),
        ("decode_step_tokens_total", "counter", "Tokens of the batched decode steps: over decode_steps_total, the mean batch.", server.batcher.as_ref().map_or(0, |b| b.counts().1) as f64),
        ("uptime_seconds", "gauge", "Seconds since the server started.", server.started.elapsed().as_secs_f64()),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in lines {
        text += &format!(
            "# HELP bitnetc_{name} {help}\n# TYPE bitnetc_{name} {kind}\nbitnetc_{name} {value}\n"
        );
    }
    if let Some(bytes) = resident_bytes() {
        text += &format!(
            "# HELP process_resident_memory_bytes Resident memory of the server process.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {bytes}\n"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The process's resident set (`VmRSS` of /proc/self/status), where the system tells it.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

async fn models(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": server.opts.model_id,
            "object": "model",
            "created": server.created,
            "owned_by": "bitnetc",
            "meta": {
                "n_ctx": server.engine.model().engine.context(),
                "n_vocab": server.engine.model().engine.vocab_size(),
            },
        }],
    }))
}

/// A string or a list of strings (`stop`).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The sampling and stopping fields common to both generation endpoints.
#[derive(Deserialize, Debug, Default)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    stream: Option<bool>,
    n: Option<u32>,
    logprobs: Option<Value>,
}

#[derive(Deserialize, Debug)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize, Debug)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize, Debug)]
struct ChatMessage {
    role: String,
    content: Value,
}

/// A request's body as JSON, or an OpenAI-shaped 400.
fn body<T>(server: &Server, json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    server.stats.requests.fetch_add(1, Ordering::Relaxed);
    json.map(|Json(t)| t).map_err(|e| {
        server.stats.errors.fetch_add(1, Ordering::Relaxed);
        ApiError::invalid(format!("the request body is not valid: {}", e.body_text()))
    })
}

/// What one generation needs, checked.
struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    stream: bool,
}

impl Server {
    fn job(&self, text: &str, s: Sampling) -> Result<Job, ApiError> {
        let r = self.check(text, s);
        if r.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn check(&self, text: &str, s: Sampling) -> Result<Job, ApiError> {
        if let Some(m) = &s.model
            && m != &self.opts.model_id
        {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "the model `{m}` does not exist: this server serves `{}`",
                    self.opts.model_id
                ),
                kind: "invalid_request_error",
                code: Some("model_not_found"),
            });
        }
        if s.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported"));
        }
        if s.logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &json!(false))
        {
            return Err(ApiError::invalid("logprobs are not supported"));
        }
        let context = self.engine.model().engine.context();
        let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
            None => None,
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(format!(
                    "max_tokens must be at least 1, not {n}"
                )));
            }
            Some(n) if n as u64 > context as u64 => {
                return Err(ApiError::invalid(format!(
                    "max_tokens is {n}, beyond the context of {context} tokens"
                )));
            }
            Some(n) => Some(n as usize),
        };
        let tokenizer = self.tokenizer()?;
        let prompt = tokenizer.encode(text, true, true);
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt has no tokens"));
        }
        if prompt.len() >= context {
            return Err(ApiError::invalid(format!(
                "the prompt has {} tokens, the context holds {context}: shorten it",
                prompt.len()
            )));
        }
        let mut params = SamplingParams::default();
        if let Some(t) = s.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(format!(
                    "temperature must be in 0..2, not {t}"
                )));
            }
            params.temperature = t;
        }
        if let Some(p) = s.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::invalid(format!("top_p must be in 0..1, not {p}")));
            }
            params.top_p = p;
        }
        if let Some(k) = s.top_k {
            params.top_k = k;
        }
        if let Some(p) = s.min_p {
            params.min_p = p;
        }
        if let Some(p) = s.repeat_penalty {
            params.repeat_penalty = p;
        }
        params.seed = s.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let stop = match s.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop takes at most 4 non-empty strings"));
        }
        Ok(Job {
            prompt,
            params,
            max_tokens,
            stop,
            stream: s.stream.unwrap_or(false),
        })
    }
}

/// What a generation sends back, token by token.
enum Piece {
    Text(String),
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

fn finish_name(r: Option<FinishReason>) -> &'static str {
    match r {
        Some(FinishReason::MaxTokens | FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

/// Runs `job` on a blocking thread in a session (a finished one's memory when there is one),
/// holding `slot` until it ends; stops when the receiver is dropped (the client went away).
fn start(server: Arc<Server>, job: Job, slot: OwnedSemaphorePermit) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let stats = &server.stats;
        let tokenizer = match server.engine.tokenizer() {
            Ok(t) => t,
            Err(e) => {
                let _ = tx.blocking_send(Piece::Failed(e.to_string()));
                return;
            }
        };
        let engine = &server.engine.model().engine;
        let spare = server
            .spares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut session = match spare {
            Some(spare) => engine.session_from(spare),
            None => engine.session(),
        };
        if let Some(b) = &server.batcher
            && let Err(e) = session.join(b)
        {
            let _ = tx.blocking_send(Piece::Failed(e.to_string()));
            return;
        }
        let options = crate::GenerateOptions {
            max_tokens: job.max_tokens,
            ignore_eos: false,
            stop: job.stop,
        };
        let sampler = crate::runtime::sampling::Sampler::new(job.params);
        let t0 = Instant::now();
        let held = AtomicU64::new(0);
        let hold = |n: u64| {
            let before = held.swap(n, Ordering::Relaxed);
            stats.kv_positions.fetch_add(n, Ordering::Relaxed);
            stats.kv_positions.fetch_sub(before, Ordering::Relaxed);
        };
        let result = (|| -> Result<(bool, usize, &'static str), String> {
            let mut g = session
                .generate(tokenizer, &job.prompt, sampler, options)
                .map_err(|e| e.to_string())?;
            stats
                .prompt_tokens
                .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
            let mut n = 0;
            for t in g.by_ref() {
                let t = t.map_err(|e| e.to_string())?;
                n += 1;
                stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                hold((job.prompt.len() + n) as u64);
                if !t.text.is_empty() && tx.blocking_send(Piece::Text(t.text)).is_err() {
                    return Ok((false, n, "stop"));
                }
            }
            let rest = g.flush();
            if !rest.is_empty() && tx.blocking_send(Piece::Text(rest)).is_err() {
                return Ok((false, n, "stop"));
            }
            Ok((true, n, finish_name(g.finish_reason())))
        })();
        stats
            .generation_micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        hold(0);
        let spare = session.into_spare();
        server
            .spares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(spare);
        match result {
            Ok((true, n, finish)) => {
                let _ = tx.blocking_send(Piece::Done {
                    finish,
                    prompt_tokens: job.prompt.len(),
                    completion_tokens: n,
                });
            }
            Ok((false, ..)) => {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                let _ = tx.blocking_send(Piece::Failed(e));
            }
        }
    });
    rx
}

/// The two endpoints' answers: whole (`object`, the text under `text` or `message`) or as
/// server-sent events of chunks.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

async fn answer(server: Arc<Server>, job: Job, kind: Kind) -> Result<Response, ApiError> {
    let slot = server.slot().await?;
    let stream = job.stream;
    let mut rx = start(server.clone(), job, slot);
    let id = format!(
        "{}-{:x}",
        match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        },
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = server.opts.model_id.clone();
    let chunk = move |text: Option<&str>, finish: Option<&str>, first: bool| -> Value {
        match kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                             "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
            }
        }
    };
    if stream {
        let events = async_stream(rx, chunk);
        return Ok(Sse::new(events).into_response());
    }
    let mut text = String::new();
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Text(t) => text += &t,
            Piece::Failed(e) => return Err(ApiError::server(e)),
            Piece::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut v = chunk(None, Some(finish), false);
                let choice = &mut v["choices"][0];
                match kind {
                    Kind::Completion => {
                        choice["text"] = json!(text);
                    }
                    Kind::Chat => {
                        v["object"] = json!("chat.completion");
                        let c = v["choices"][0].as_object_mut().expect("a choice");
                        c.remove("delta");
                        c.insert(
                            "message".into(),
                            json!({"role": "assistant", "content": text}),
                        );
                    }
                }
                v["usage"] = json!({
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                });
                return Ok(Json(v).into_response());
            }
        }
    }
    Err(ApiError::server("the generation ended without an answer"))
}

/// The pieces of a generation as server-sent events: a chunk per piece of text, a last chunk
/// with the finish reason (and usage), then `[DONE]`; an error as an `error` object.
fn async_stream(
    rx: mpsc::Receiver<Piece>,
    chunk: impl Fn(Option<&str>, Option<&str>, bool) -> Value + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>> + Send {
    // The phase: 0 before the first chunk, 1 after it, 2 when `[DONE]` is due, 3 at the end.
    futures_util::stream::unfold((rx, chunk, 0u8), |(mut rx, chunk, phase)| async move {
        let data = match phase {
            3 => return None,
            2 => "[DONE]".to_string(),
            _ => match rx.recv().await? {
                Piece::Text(t) => {
                    let e = Event::default().data(chunk(Some(&t), None, phase == 0).to_string());
                    return Some((Ok(e), (rx, chunk, 1)));
                }
                Piece::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut v = chunk(None, Some(finish), phase == 0);
                    v["usage"] = json!({
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    });
                    return Some((Ok(Event::default().data(v.to_string())), (rx, chunk, 2)));
                }
                Piece::Failed(e) => {
                    json!({"error": {"message": e, "type": "server_error"}}).to_string()
                }
            },
        };
        Some((
            Ok(Event::default().data(data)),
            (rx, chunk, phase.max(2) + 1),
        ))
    })
}

async fn completions(
    State(server): State<Arc<Server>>,
    json: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let r = body(&server, json)?;
    let prompt = match r.prompt {
        Value::String(s) => s,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            server.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::invalid("prompt must be one string"));
        }
    };
    let job = server.job(&prompt, r.sampling)?;
    answer(server, job, Kind::Completion).await
}

async fn chat_completions(
    State(server): State<Arc<Server>>,
    json: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let r = body(&server, json)?;
    let fail = |e: ApiError| {
        server.stats.errors.fetch_add(1, Ordering::Relaxed);
        e
    };
    if r.messages.is_empty() {
        return Err(fail(ApiError::invalid("messages is empty")));
    }
    let mut messages = Vec::new();
    for m in &r.messages {
        let content = match &m.content {
            Value::String(s) => s.clone(),
            // The parts form: the text parts, joined.
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            Value::Null => String::new(),
            _ => return Err(fail(ApiError::invalid("a message's content must be text"))),
        };
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(fail(ApiError::invalid(format!(
                "unknown message role `{}`",
                m.role
            ))));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        messages.push(Message::new(role, &content));
    }
    let prompt = server
        .chat
        .render_for(server.tokenizer().map_err(fail)?, &messages, true)
        .map_err(|e| fail(ApiError::invalid(e.to_string())))?;
    let job = server.job(&prompt, r.sampling)?;
    answer(server, job, Kind::Chat).await
}

#[derive(Deserialize)]
struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
}

async fn tokenize(
    State(server): State<Arc<Server>>,
    json: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = body(&server, json)?;
    let tokenizer = server.tokenizer()?;
    Ok(Json(
        json!({"tokens": tokenizer.encode(&r.content, r.add_special, true)}),
    ))
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(
    State(server): State<Arc<Server>>,
    json: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let r = body(&server, json)?;
    let tokenizer = server.tokenizer()?;
    let vocab = tokenizer.spec().tokens.len();
    if let Some(bad) = r.tokens.iter().find(|&&t| t as usize >= vocab) {
        server.stats.errors.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::invalid(format!(
            "token {bad} is not in the vocabulary of {vocab}"
        )));
    }
    Ok(Json(json!({"content": tokenizer.decode(&r.tokens, false)})))
}
