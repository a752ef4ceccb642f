//! `anetrain serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the
//! continuous-batching engine (`engine`). Routes: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, and `GET /`
//! (an embedded chat page). Every client mistake is a 4xx in OpenAI's error shape; a full
//! queue is a 503 with `Retry-After`.

pub mod api;
pub mod engine;

use crate::chat::session::ChatModel;
use crate::chat::template::Message;
use crate::generate::Sampling;
use crate::ops::Par;
use anyhow::{Context, Result};
use api::*;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use engine::{Event, Job, Stats};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Required as `Authorization: Bearer KEY` on the /v1 routes when set.
    pub api_key: Option<String>,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch at most; more get 503.
    pub max_queue: usize,
    /// Context positions per sequence (prompt + reply).
    pub ctx: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Temperature and top-p of requests that leave them out.
    pub temperature: f32,
    pub top_p: f32,
    /// Top-k of every request (the API has no such field; 0: no cut).
    pub top_k: usize,
    /// Seed of requests that send none; `None`: each draws its own.
    pub seed: Option<u64>,
    pub par: Par,
}

struct AppState {
    model: Arc<ChatModel>,
    name: String,
    opts: ServeOptions,
    jobs: mpsc::Sender<Job>,
    stats: Arc<Stats>,
    requests: AtomicU64,
    created: u64,
}

type Shared = Arc<AppState>;

const PAGE: &str = include_str!("chat.html");

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Starts the engine thread and returns the router serving `model` under `name`.
pub fn router(model: Arc<ChatModel>, name: String, opts: ServeOptions) -> Result<Router> {
    anyhow::ensure!(opts.max_batch >= 1 && opts.max_queue >= 1, "--max-batch and --queue must be at least 1");
    anyhow::ensure!(
        opts.ctx >= 2 && opts.ctx <= model.cfg.max_seq_len,
        "--ctx {} must be in [2, {}] (the model's positions)",
        opts.ctx,
        model.cfg.max_seq_len
    );
    // Every batch slot may hold a full context at once.
    let kv = crate::memory::f32_bytes(&[opts.max_batch, model.cfg.n_layers, opts.ctx, model.cfg.kv_dim()]);
    crate::memory::ensure_fits(
        &format!("{} KV caches of {} positions (--max-batch × --ctx)", opts.max_batch, opts.ctx),
        kv.saturating_mul(2),
        "lower --max-batch or --ctx",
    )?;
    let (tx, rx) = mpsc::channel(opts.max_queue);
    let stats = Arc::new(Stats::default());
    let (engine_model, engine_stats, o) = (model.clone(), stats.clone(), opts.clone());
    std::thread::Builder::new()
        .name("serve-engine".into())
        .spawn(move || {
            let pool = match rayon::ThreadPoolBuilder::new().num_threads(o.par.threads).build() {
                Ok(p) => p,
                Err(e) => return eprintln!("serve: cannot start the thread pool: {e}"),
            };
            pool.install(|| engine::run(engine_model, rx, o.max_batch, o.ctx, o.par, engine_stats))
        })
        .context("cannot start the engine thread")?;
    let state = Arc::new(AppState {
        model,
        name,
        opts: opts.clone(),
        jobs: tx,
        stats,
        requests: AtomicU64::new(0),
        created: now(),
    });
    Ok(Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_card))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", "unknown route") })
        .method_not_allowed_fallback(|| async {
            ApiError::status(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(opts.body_limit))
        .with_state(state))
}

/// Binds `host:port` (port 0: any free port) and serves until the process ends; `ready` gets
/// the bound address.
pub async fn serve(
    model: Arc<ChatModel>,
    name: String,
    opts: ServeOptions,
    host: &str,
    port: u16,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let app = router(model, name, opts)?;
    let listener =
        tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("cannot listen on {host}:{port}"))?;
    ready(listener.local_addr()?);
    axum::serve(listener, app).await.context("the server stopped")
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.opts.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_key(g.trim().as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => {
            Err(ApiError::status(StatusCode::UNAUTHORIZED, "invalid_request_error", "incorrect API key provided")
                .with_code("invalid_api_key"))
        }
        None => Err(ApiError::status(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing API key: send the header `Authorization: Bearer KEY`",
        )
        .with_code("invalid_api_key")),
    }
}

/// Compares keys in time independent of where they differ (a timing side channel would reveal
/// a key prefix by prefix).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(s): State<Shared>) -> axum::Json<Health> {
    let g = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::SeqCst);
    axum::Json(Health {
        status: "ok",
        model: s.name.clone(),
        active: g(&s.stats.active),
        queued: g(&s.stats.queued),
        completed: g(&s.stats.completed),
        cancelled: g(&s.stats.cancelled),
        generated_tokens: g(&s.stats.generated_tokens),
        peak_batch: g(&s.stats.peak_batch),
    })
}

fn card(s: &AppState) -> ModelCard {
    ModelCard { id: s.name.clone(), object: "model", created: s.created, owned_by: "anetrain" }
}

async fn models(State(s): State<Shared>, headers: HeaderMap) -> Result<axum::Json<ModelList>, ApiError> {
    check_key(&s, &headers)?;
    Ok(axum::Json(ModelList { object: "list", data: vec![card(&s)] }))
}

async fn model_card(
    State(s): State<Shared>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<ModelCard>, ApiError> {
    check_key(&s, &headers)?;
    check_model(&s, Some(&id))?;
    Ok(axum::Json(card(&s)))
}

fn check_model(s: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.name => Err(ApiError {
            param: Some("model"),
            ..ApiError::status(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{m}` does not exist; this server serves `{}`", s.name),
            )
            .with_code("model_not_found")
        }),
        _ => Ok(()),
    }
}

/// The body as JSON of type T; a body over the limit is 413, anything malformed 400.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes"),
        ),
        status => ApiError::status(status, "invalid_request_error", format!("cannot read the request body: {e}")),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "malformed JSON" } else { "invalid request" };
        ApiError::bad_request(format!("{what}: {e}"), None)
    })
}

/// A validated request, ready for the engine.
struct Plan {
    prompt: Vec<u32>,
    max_new: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn plan(s: &AppState, c: &Common, prompt: Vec<u32>, prompt_param: &'static str) -> Result<Plan, ApiError> {
    check_model(s, c.model.as_deref())?;
    let ctx = s.opts.ctx;
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::bad_request(format!("n = {n} is not supported (only 1)"), Some("n")));
    }
    let (param, max) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    if let Some(m) = max
        && m < 1
    {
        return Err(ApiError::bad_request(format!("{param} must be at least 1, got {m}"), Some(param)));
    }
    if prompt.len() >= ctx {
        return Err(ApiError::bad_request(
            format!(
                "this model's maximum context length is {ctx} tokens; the prompt alone has {} tokens",
                prompt.len()
            ),
            Some(prompt_param),
        )
        .with_code("context_length_exceeded"));
    }
    let room = ctx - prompt.len();
    let max_new = match max {
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError::bad_request(
                format!(
                    "this model's maximum context length is {ctx} tokens; you requested {} tokens ({} in the \
                     prompt, {m} in the completion)",
                    prompt.len() as u64 + m as u64,
                    prompt.len()
                ),
                Some(param),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => m as usize,
        None => room,
    };
    let temperature = c.temperature.unwrap_or(s.opts.temperature as f64);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(s.opts.top_p as f64);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!("top_p must be in (0, 1], got {top_p}"), Some("top_p")));
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop takes at most 4 non-empty strings", Some("stop")));
    }
    // Without a seed (the request's or the server's), each request draws its own.
    let seed = c.seed.or(s.opts.seed).unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (nanos as u64) ^ s.requests.fetch_add(1, Ordering::SeqCst).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    Ok(Plan {
        prompt,
        max_new,
        sampling: Sampling { temperature: temperature as f32, top_k: s.opts.top_k, top_p: top_p as f32, seed },
        stop,
        stream: c.stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// Queues the plan; 503 when the queue is full.
fn submit(s: &AppState, p: &Plan, stop_ids: Vec<u32>) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: p.prompt.clone(),
        max_new: p.max_new,
        sampling: p.sampling,
        stop: p.stop.clone(),
        stop_ids,
        events: tx,
    };
    s.stats.queued.fetch_add(1, Ordering::SeqCst);
    match s.jobs.try_send(job) {
        Ok(()) => Ok(rx),
        Err(e) => {
            s.stats.queued.fetch_sub(1, Ordering::SeqCst);
            let (message, retry) = match e {
                mpsc::error::TrySendError::Full(_) => {
                    (format!("the server is busy ({} requests waiting); retry shortly", s.opts.max_queue), 1)
                }
                mpsc::error::TrySendError::Closed(_) => ("the generation engine has stopped".to_string(), 30),
            };
            Err(ApiError {
                retry_after: Some(retry),
                ..ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            })
        }
    }
}

/// Collects a whole reply: (text, finish reason, usage).
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<(String, &'static str, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish_reason, prompt_tokens, completion_tokens } => {
                let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
                return Ok((text, finish_reason, usage));
            }
            Event::Failed(e) => return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e)),
        }
    }
    Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the generation engine stopped"))
}

fn messages_of(req: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must hold at least one message", Some("messages")));
    }
    let mut out = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role '{}' is not one of system, developer, user, assistant, tool", m.role),
                Some("messages"),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}]: a content part of type 'text' needs a `text` string"),
                                Some("messages"),
                            ));
                        }
                        (kind, _) => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}]: content parts of type '{kind}' are not supported (text only)"),
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        out.push(Message::new(role, &content));
    }
    Ok(out)
}

fn sse_json<T: serde::Serialize>(v: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_default())
}

async fn chat_completions(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_key(&s, &headers)?;
    let req: ChatRequest = parse_body(body, s.opts.body_limit)?;
    let messages = messages_of(&req)?;
    let ids = s.model.prompt_ids(&messages).map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("messages")))?;
    let p = plan(&s, &req.common, ids, "messages")?;
    let rx = submit(&s, &p, s.model.stop.clone())?;
    let id = format!("chatcmpl-{:x}{:x}", now(), s.requests.fetch_add(1, Ordering::SeqCst));
    let (created, model) = (now(), s.name.clone());
    if !p.stream {
        let (content, finish_reason, usage) = collect(rx).await?;
        let body = ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: OutMessage { role: "assistant", content },
                finish_reason,
                logprobs: None,
            }],
            usage,
        };
        return Ok(axum::Json(body).into_response());
    }
    let chunk = move |delta: Delta, finish: Option<&'static str>, usage: Option<Usage>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices: if usage.is_some() && finish.is_none() {
            Vec::new()
        } else {
            vec![ChunkChoice { index: 0, delta, finish_reason: finish, logprobs: None }]
        },
        usage,
    };
    let include_usage = p.include_usage;
    let first = sse_json(&chunk(Delta { role: Some("assistant"), content: Some(String::new()) }, None, None));
    let events = event_stream(rx, first, move |ev| match ev {
        Event::Text(t) => vec![sse_json(&chunk(Delta { content: Some(t), ..Delta::default() }, None, None))],
        Event::Done { finish_reason, prompt_tokens, completion_tokens } => {
            let mut out = vec![sse_json(&chunk(Delta::default(), Some(finish_reason), None))];
            if include_usage {
                let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
                out.push(sse_json(&chunk(Delta::default(), None, Some(usage))));
            }
            out
        }
        Event::Failed(e) => vec![error_event(e)],
    });
    Ok(Sse::new(events).into_response())
}

fn error_event(message: String) -> SseEvent {
    #[derive(serde::Serialize)]
    struct Inner {
        message: String,
        #[serde(rename = "type")]
        kind: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Outer {
        error: Inner,
    }
    sse_json(&Outer { error: Inner { message, kind: "server_error" } })
}

/// The SSE body: `first`, then each engine event mapped to events, then `data: [DONE]`.
/// Dropping it (the client went away) drops `rx`, which the engine sees as a cancellation.
fn event_stream(
    mut rx: mpsc::UnboundedReceiver<Event>,
    first: SseEvent,
    mut map: impl FnMut(Event) -> Vec<SseEvent> + Send + 'static,
) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let (tx, out) = mpsc::channel::<SseEvent>(64);
    let forward = async move {
        if tx.send(first).await.is_err() {
            return;
        }
        while let Some(ev) = rx.recv().await {
            let end = !matches!(ev, Event::Text(_));
            for e in map(ev) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if end {
                break;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    };
    // The forwarder ends as soon as the body is dropped (its sends fail), dropping `rx`.
    tokio::spawn(forward);
    tokio_stream::wrappers::ReceiverStream::new(out).map(Ok)
}

use tokio_stream::StreamExt as _;

async fn completions(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_key(&s, &headers)?;
    let req: CompletionRequest = parse_body(body, s.opts.body_limit)?;
    let text = match &req.prompt {
        Prompt::One(t) => t.clone(),
        Prompt::Many(v) if v.len() == 1 => v[0].clone(),
        Prompt::Many(v) => {
            return Err(ApiError::bad_request(
                format!("prompt holds {} strings; this server takes one", v.len()),
                Some("prompt"),
            ));
        }
    };
    let tok = &s.model.tokenizer;
    let encoded = tok.encode(&text).map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("prompt")))?;
    // A plain completion starts a document, as `generate --prompt` does, and ends at the next.
    let ids: Vec<u32> = tok.doc_token.into_iter().chain(encoded).collect();
    let p = plan(&s, &req.common, ids, "prompt")?;
    let rx = submit(&s, &p, tok.doc_token.into_iter().collect())?;
    let id = format!("cmpl-{:x}{:x}", now(), s.requests.fetch_add(1, Ordering::SeqCst));
    let (created, model) = (now(), s.name.clone());
    let body = move |text: String, finish: Option<&'static str>, usage: Option<Usage>| Completion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices: vec![TextChoice { index: 0, text, finish_reason: finish, logprobs: None }],
        usage,
    };
    if !p.stream {
        let (text, finish_reason, usage) = collect(rx).await?;
        return Ok(axum::Json(body(text, Some(finish_reason), Some(usage))).into_response());
    }
    let include_usage = p.include_usage;
    let first = sse_json(&body(String::new(), None, None));
    let events = event_stream(rx, first, move |ev| match ev {
        Event::Text(t) => vec![sse_json(&body(t, None, None))],
        Event::Done { finish_reason, prompt_tokens, completion_tokens } => {
            let usage = include_usage.then_some(Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            });
            vec![sse_json(&body(String::new(), Some(finish_reason), usage))]
        }
        Event::Failed(e) => vec![error_event(e)],
    });
    Ok(Sse::new(events).into_response())
}
