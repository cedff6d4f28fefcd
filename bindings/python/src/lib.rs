//! The `bitnetc._native` module: [`Model`] over the Rust engine. The `bitnetc` package wraps it
//! (`python/bitnetc/__init__.py`) and adds numpy arrays for logits.
//!
//! Every call that runs the engine releases the GIL; errors become `bitnetc.BitnetcError` with
//! the engine's message.

use bitnetc::runtime::exec::ExecOptions;
use bitnetc::{Backend, Engine, GenerateOptions, LoadOptions, SamplingParams};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

create_exception!(
    _native,
    BitnetcError,
    PyException,
    "An error of the bitnetc engine."
);

fn error(e: impl std::fmt::Display) -> PyErr {
    BitnetcError::new_err(e.to_string())
}

/// A loaded model: a GGUF file or a compiled plan (`.bplan`), bound to kernels for this CPU.
#[pyclass(subclass, module = "bitnetc._native")]
struct Model {
    engine: Arc<Engine>,
}

/// Sampling settings from keyword arguments (llama.cpp's defaults).
fn sampling(
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    seed: Option<u64>,
) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        seed: seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }),
        ..SamplingParams::default()
    }
}

/// A generation's pieces of text, produced on a thread of its own.
fn spawn_generation(
    engine: Arc<Engine>,
    prompt: String,
    params: SamplingParams,
    max_tokens: usize,
) -> mpsc::Receiver<Result<String, String>> {
    let (tx, rx) = mpsc::sync_channel(16);
    std::thread::spawn(move || {
        let mut session = engine.session();
        let options = GenerateOptions {
            max_tokens: Some(max_tokens),
            ..GenerateOptions::default()
        };
        let mut stream = match session.generate_options(&prompt, &params, options) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        for piece in stream.by_ref() {
            let piece = piece.map(|t| t.text).map_err(|e| e.to_string());
            let failed = piece.is_err();
            if (!piece.as_ref().is_ok_and(String::is_empty) && tx.send(piece).is_err()) || failed {
                return;
            }
        }
        let rest = stream.flush();
        if !rest.is_empty() {
            let _ = tx.send(Ok(rest));
        }
    });
    rx
}

#[pymethods]
impl Model {
    /// Opens `path` with `threads` threads (default: every core) and a KV cache of `context`
    /// positions (default: the model's).
    #[new]
    #[pyo3(signature = (path, threads=None, context=None))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        threads: Option<usize>,
        context: Option<usize>,
    ) -> PyResult<Model> {
        if threads == Some(0) {
            return Err(error("threads must be at least 1"));
        }
        let engine = py.detach(|| {
            let exec = ExecOptions {
                threads: threads.unwrap_or_else(bitnetc::runtime::exec::default_threads),
                ..ExecOptions::default()
            };
            Engine::load(
                &path,
                LoadOptions {
                    backend: Backend::Compiled(exec),
                    context,
                    ..LoadOptions::default()
                },
            )
        });
        let engine = engine.map_err(error)?;
        engine.tokenizer().map_err(error)?;
        Ok(Model {
            engine: Arc::new(engine),
        })
    }

    /// Generates up to `max_tokens` tokens after `prompt` and returns their text.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        seed: Option<u64>,
    ) -> PyResult<String> {
        let params = sampling(temperature, top_k, top_p, min_p, seed);
        let engine = self.engine.clone();
        py.detach(move || {
            let mut session = engine.session();
            session
                .generate_with(&prompt, &params, max_tokens)
                .and_then(|s| s.text())
                .map_err(|e| e.to_string())
        })
        .map_err(error)
    }

    /// Like `generate`, yielding the text piece by piece as it is generated.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        seed: Option<u64>,
    ) -> Stream {
        let params = sampling(temperature, top_k, top_p, min_p, seed);
        Stream {
            rx: Mutex::new(spawn_generation(
                self.engine.clone(),
                prompt,
                params,
                max_tokens,
            )),
        }
    }

    /// The token ids of `text` (with the model's BOS when `add_special` and the model adds one;
    /// special-token text such as `<|im_end|>` parsed to its id).
    #[pyo3(signature = (text, add_special=true))]
    fn tokenize(&self, text: &str, add_special: bool) -> PyResult<Vec<u32>> {
        Ok(self
            .engine
            .tokenizer()
            .map_err(error)?
            .encode(text, add_special, true))
    }

    /// The text of token ids.
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        let t = self.engine.tokenizer().map_err(error)?;
        let vocab = t.spec().tokens.len();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(error(format!(
                "token {bad} is not in the vocabulary of {vocab}"
            )));
        }
        Ok(t.decode(&ids, false))
    }

    /// Every position's logits for `ids` evaluated from an empty cache, as little-endian f32
    /// bytes, with the number of rows and the vocabulary size (the package makes an array).
    fn logits_bytes<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let engine = self.engine.clone();
        let n = ids.len();
        let logits = py
            .detach(move || engine.session().logits(&ids).map_err(|e| e.to_string()))
            .map_err(error)?;
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let vocab = self.engine.model().engine.vocab_size();
        Ok((PyBytes::new(py, &bytes), n, vocab))
    }

    /// Load and compile times (seconds) and memory (bytes).
    #[getter]
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.engine.metrics();
        let d = PyDict::new(py);
        d.set_item("load_seconds", m.load.as_secs_f64())?;
        d.set_item("compile_seconds", m.compile.as_secs_f64())?;
        d.set_item("weight_bytes", m.weight_bytes)?;
        d.set_item("arena_bytes", m.arena_bytes)?;
        d.set_item("context", self.engine.model().engine.context())?;
        d.set_item("vocab_size", self.engine.model().engine.vocab_size())?;
        Ok(d)
    }
}

/// The pieces of a generation (`Model.stream`); dropping it stops the generation.
#[pyclass(module = "bitnetc._native")]
struct Stream {
    rx: Mutex<mpsc::Receiver<Result<String, String>>>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let next = py.detach(|| self.rx.lock().unwrap_or_else(|e| e.into_inner()).recv());
        match next {
            Ok(Ok(piece)) => Ok(Some(piece)),
            Ok(Err(e)) => Err(error(e)),
            Err(_) => Ok(None),
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Stream>()?;
    m.add("BitnetcError", m.py().get_type::<BitnetcError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
