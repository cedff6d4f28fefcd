//! `bitnetc serve`: the OpenAI-compatible HTTP server.

use super::Result;
use super::generate::ModelArgs;
use bitnetc::serve::{ServeOptions, Server};

/// Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, …)
#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (this machine only by default; 0.0.0.0 listens on every interface)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests generating at once (also -np), each with its own KV cache of -c positions
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Requests waiting for a free session; beyond them the server answers 503
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on the API's endpoints
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The model's id in the API (default: the file's name without its extension)
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        return Err("--parallel must be at least 1".into());
    }
    // On a GPU, one KV cache per request generating at once.
    let exec = super::ExecArgs {
        gpu_sessions: a.parallel,
        ..a.model.exec.clone()
    };
    let model = super::load(
        a.model.model.as_deref(),
        a.model.kv_cache,
        a.model.ctx_size,
        a.model.pre_tokenizer.clone(),
        &exec,
    )?;
    model.tokenizer()?;
    let model_id = a.alias.clone().unwrap_or_else(|| {
        a.model
            .model
            .as_deref()
            .map_or(bitnetc::builtin::NAME.into(), |m| {
                m.file_stem()
                    .map_or("model".into(), |s| s.to_string_lossy().into_owned())
            })
    });
    let opts = ServeOptions {
        parallel: a.parallel,
        queue: a.queue,
        api_key: a.api_key.clone(),
        model_id: model_id.clone(),
    };
    let context = model.engine.context();
    let server = Server::new(bitnetc::Engine::from(model), opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "serving {model_id} on http://{} ({} at once with {} positions each, {} may wait){}; Ctrl-C stops",
            listener.local_addr()?,
            a.parallel,
            context,
            a.queue,
            if a.api_key.is_some() { ", API key required" } else { "" }
        );
        server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
