//! The OpenAI-compatible server on an ephemeral port, driven by a real HTTP client: chat and
//! text completions, streaming and not, concurrency (continuous batching, identical greedy
//! replies), every bad request, disconnects, a full queue, the command line, and the chat page
//! in headless Chromium.

#[path = "common/chat_model.rs"]
mod common;
#[path = "common/shared_data.rs"]
mod shared_data;

use anetrain::chat::session::ChatModel;
use anetrain::ops::{GemmImpl, Par};
use anetrain::serve::{ServeOptions, router};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn options() -> ServeOptions {
    ServeOptions {
        api_key: None,
        max_batch: 8,
        max_queue: 16,
        ctx: 256,
        body_limit: 64 << 10,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: None,
        par: Par { threads: 2, gemm: GemmImpl::Gemm },
    }
}

/// Serves the model in `dir` on 127.0.0.1:0 in this process; returns the base URL.
async fn start(dir: &Path, opts: ServeOptions) -> String {
    serve_model(ChatModel::load(dir, None).unwrap(), "tiny", opts).await
}

async fn serve_model(model: ChatModel, name: &str, opts: ServeOptions) -> String {
    let app = router(Arc::new(model), name.into(), opts).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn chat_body(text: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0})
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of an SSE body, in order.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.lines().filter_map(|l| l.strip_prefix("data: ")).collect::<Vec<_>>().join("\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_stream_and_not() {
    let dir = common::temp_dir("serve-basic");
    common::write_tiny_chat_model(&dir, 32, 512, 7, false);
    let base = start(&dir, options()).await;
    let client = reqwest::Client::new();
    let (status, full) = post(&client, &format!("{base}/v1/chat/completions"), &chat_body("Hello there", 12)).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["model"], "tiny");
    assert_eq!(full["choices"][0]["message"]["role"], "assistant");
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    let content = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    let usage = &full["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt_tokens + 12);

    // The same request streamed: role first, content deltas, a finish chunk, usage, [DONE].
    let mut body = chat_body("Hello there", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = client.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, content, "streamed and whole replies differ");
    let finish: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 12);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    // A stop string ends the reply before it (and is not part of it).
    let cut: String = content.chars().skip(3).take(2).collect();
    let mut body = chat_body("Hello there", 12);
    body["stop"] = json!([cut.clone()]);
    let (status, stopped) = post(&client, &format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{stopped}");
    let want = &content[..content.find(&cut).unwrap()];
    assert_eq!(stopped["choices"][0]["message"]["content"], want);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Text completions, whole and streamed.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0});
    let (status, done) = post(&client, &format!("{base}/v1/completions"), &body).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["object"], "text_completion");
    assert_eq!(done["usage"]["completion_tokens"], 10);
    let text = done["choices"][0]["text"].as_str().unwrap().to_string();
    let mut body = body.clone();
    body["stream"] = json!(true);
    let events = sse(client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap()).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);

    // Seeded sampling repeats; models, health and the page answer.
    let mut body = chat_body("Hi", 16);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(42);
    let a = post(&client, &format!("{base}/v1/chat/completions"), &body).await.1;
    let b = post(&client, &format!("{base}/v1/chat/completions"), &body).await.1;
    assert_eq!(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]);
    let models: Value = client.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let health: Value = client.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let page = client.get(&base).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/v1/chat/completions") && page.contains("<html"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_replies_are_identical_alone_or_batched() {
    let dir = common::temp_dir("serve-batch");
    common::write_tiny_chat_model(&dir, 64, 512, 8, false);
    let base = start(&dir, options()).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let prompts: Vec<String> = (0..8).map(|i| format!("Question {i}: {}", "why ".repeat(i))).collect();
    let mut alone = Vec::new();
    for p in &prompts {
        let (status, r) = post(&client, &url, &chat_body(p, 24)).await;
        assert_eq!(status, 200, "{r}");
        alone.push(r["choices"][0]["message"]["content"].as_str().unwrap().to_string());
    }
    let health: Value = client.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["peak_batch"], 1, "sequential requests must decode alone");
    let together = futures_util::future::join_all(prompts.iter().map(|p| {
        let (client, url) = (client.clone(), url.clone());
        let body = chat_body(p, 24);
        async move { post(&client, &url, &body).await }
    }))
    .await;
    for (i, (status, r)) in together.iter().enumerate() {
        assert_eq!(*status, 200, "{r}");
        assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap(), alone[i], "prompt {i} differs batched");
    }
    let health: Value = client.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert!(health["peak_batch"].as_u64().unwrap() > 1, "concurrent requests were never batched: {health}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_a_clear_4xx_and_the_server_goes_on() {
    let dir = common::temp_dir("serve-bad");
    common::write_tiny_chat_model(&dir, 32, 512, 9, false);
    let base = start(&dir, ServeOptions { api_key: Some("sekrit".into()), ..options() }).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let send = |body: String, key: Option<&'static str>| {
        let mut r = client.post(&url).header("content-type", "application/json").body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").is_some();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (status, v, retry)
        }
    };
    let ok = chat_body("hi", 4).to_string();
    // Keys.
    let (s, v, _) = send(ok.clone(), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{v}");
    let (s, _, _) = send(ok.clone(), Some("wrong")).await;
    assert_eq!(s, 401);
    let long = "word ".repeat(400);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"messages\": [".into(), 400, "malformed JSON"),
        ("not json at all".into(), 400, "malformed JSON"),
        (json!({"messages": 3}).to_string(), 400, "invalid type"),
        (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}).to_string(), 400, "invalid type"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(),
            400,
            "invalid type",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).to_string(),
            400,
            "max_tokens must be at least 1, got -5",
        ),
        (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(), 400, "at least 1"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1_000_000_000_000i64})
                .to_string(),
            400,
            "maximum context length is 256 tokens",
        ),
        (json!({"messages": [{"role": "user", "content": long}]}).to_string(), 400, "the prompt alone has"),
        (json!({"messages": []}).to_string(), 400, "at least one message"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "role 'wizard'"),
        (json!({"messages": [{"role": "user", "content": "x"}], "n": 2}).to_string(), 400, "n = 2"),
        (json!({"messages": [{"role": "user", "content": "x"}], "temperature": 5}).to_string(), 400, "between 0 and 2"),
        (json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}).to_string(), 400, "top_p"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}).to_string(),
            400,
            "stop",
        ),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(), 400, "image_url"),
        (json!({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}).to_string(), 404, "gpt-9"),
        (
            format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}", "x".repeat(70_000)),
            413,
            "larger than",
        ),
    ];
    for (body, want, says) in cases {
        let (s, v, _) = send(body.clone(), Some("sekrit")).await;
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(s, want, "{} -> {v}", &body[..body.len().min(80)]);
        assert!(msg.contains(says), "{} -> {msg}", &body[..body.len().min(80)]);
        assert!(v["error"]["type"].is_string());
    }
    // The long-prompt refusal gives the numbers.
    let (_, v, _) = send(json!({"messages": [{"role": "user", "content": long}]}).to_string(), Some("sekrit")).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("256 tokens"), "{v}");
    // Routes and methods.
    let r = client.get(format!("{base}/v2/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = client.get(format!("{base}/v1/models/other")).bearer_auth("sekrit").send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Health and the page need no key; everything above left the server healthy.
    assert_eq!(client.get(format!("{base}/health")).send().await.unwrap().status(), 200);
    let (s, v, _) = send(ok, Some("sekrit")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn health(client: &reqwest::Client, base: &str) -> Value {
    client.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_stop_generation_and_a_full_queue_answers_503() {
    let dir = common::temp_dir("serve-limits");
    // Wide and long enough that a 3000-token reply takes a while.
    common::write_tiny_chat_model(&dir, 256, 4096, 10, false);
    let opts = ServeOptions { max_batch: 1, max_queue: 1, ctx: 4096, ..options() };
    let base = start(&dir, opts).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let mut long = chat_body("Tell me everything", 3000);
    long["stream"] = json!(true);
    // A: streams; once its first text arrives it holds the only batch slot.
    let a = client.post(&url).json(&long).send().await.unwrap();
    let mut a_stream = a.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let chunk = a_stream.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    // B waits in the queue (its one place); C finds the queue full.
    let b = tokio::spawn({
        let (client, url, body) = (client.clone(), url.clone(), chat_body("queued", 3));
        async move { post(&client, &url, &body).await }
    });
    let start = Instant::now();
    while health(&client, &base).await["queued"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "B never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = client.post(&url).json(&chat_body("one too many", 3)).send().await.unwrap();
    assert_eq!(c.status(), 503);
    assert_eq!(c.headers()["retry-after"], "1");
    let v: Value = c.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("busy"), "{v}");
    // A's client goes away: its generation stops, and B runs.
    drop(a_stream);
    let (status, b_reply) = b.await.unwrap();
    assert_eq!(status, 200, "{b_reply}");
    // B's reply can reach the client a moment before the engine retires its sequence.
    let start = Instant::now();
    let h = loop {
        let h = health(&client, &base).await;
        if h["active"] == 0 {
            break h;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "a finished request stayed active: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(h["cancelled"], 1, "{h}");
    assert!(h["generated_tokens"].as_u64().unwrap() < 3000, "A ran to its end: {h}");
    // Non-streaming: a client that gives up mid-reply stops its generation too.
    let quick = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    assert!(quick.post(&url).json(&chat_body("slow", 3000)).send().await.is_err());
    let start = Instant::now();
    while health(&client, &base).await["cancelled"] != 2 {
        assert!(start.elapsed() < Duration::from_secs(20), "the abandoned request kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(health(&client, &base).await["generated_tokens"].as_u64().unwrap() < 6000);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `anetrain serve --port 0` prints where it listens and answers there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_command_listens_on_the_printed_port() {
    use std::io::BufRead;
    let dir = common::temp_dir("serve-cli");
    common::write_tiny_chat_model(&dir, 32, 512, 11, true);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["serve", "--model", dir.to_str().unwrap(), "--port", "0", "--threads", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    let client = reqwest::Client::new();
    let h: Value = client.get(format!("{url}/health")).send().await.unwrap().json().await.unwrap();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let (status, v) = post(&client, &format!("{url}/v1/chat/completions"), &body).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(h["model"], dir.file_name().unwrap().to_str().unwrap());
    assert_eq!(status, 200, "{v}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The shared SmolLM2-135M-Instruct GGUF, served with the ChatML template from its metadata:
/// greedy, it answers the question transformers answers ("The capital of France is Paris."),
/// ending on its own end-of-turn token, streamed and not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_smollm2_gguf_with_its_own_template() {
    let Some(path) = shared_data::shared_data("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let model = ChatModel::load(&path, None).unwrap();
    assert_eq!(model.name, "SmolLM2-135M-Instruct.Q4_1");
    assert!(model.template.source.contains("<|im_start|>"));
    let base = serve_model(model, "smollm2", ServeOptions { max_batch: 2, ctx: 512, ..options() }).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                          "max_tokens": 40, "temperature": 0});
    let (status, v) = post(&client, &url, &body).await;
    assert_eq!(status, 200, "{v}");
    let reply = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(reply.contains("Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    body["stream"] = json!(true);
    let events = sse(client.post(&url).json(&body).send().await.unwrap()).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(String::from)
        })
        .collect();
    assert_eq!(streamed, reply);
}

/// Chromium driven through the DevTools protocol over `--remote-debugging-pipe`: the browser
/// reads commands from fd 3 and writes replies and events to fd 4, each a JSON text ended by NUL.
struct Browser {
    child: std::process::Child,
    commands: std::io::PipeWriter,
    replies: std::io::BufReader<std::io::PipeReader>,
    next_id: u64,
}

impl Browser {
    fn launch(browser: &str, args: &[String]) -> Browser {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        // std's pipes are close-on-exec, which keeps them out of other tests' children (the
        // pre_exec hook below gives the browser its two ends).
        let (browser_reads, commands) = std::io::pipe().unwrap();
        let (replies, browser_writes) = std::io::pipe().unwrap();
        let (read_end, write_end) = (browser_reads.as_raw_fd(), browser_writes.as_raw_fd());
        let mut cmd = std::process::Command::new(browser);
        cmd.args(args).arg("--remote-debugging-pipe").stdout(std::process::Stdio::null());
        cmd.stderr(std::process::Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2). The ends
        // are first copied above fd 9 so that dup2 onto 3 and 4 cannot clobber either (a copy
        // made by F_DUPFD and one made by dup2 are both without close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                let (r, w) = (libc::fcntl(read_end, libc::F_DUPFD, 10), libc::fcntl(write_end, libc::F_DUPFD, 10));
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // The browser's ends live on in the browser only, so that it sees EOF when we go.
        drop((browser_reads, browser_writes));
        Browser { child, commands, replies: std::io::BufReader::new(replies), next_id: 1 }
    }

    /// Sends `method` (to the page of `session`, or to the browser) and returns its result,
    /// skipping the events that arrive in between.
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        use std::io::{BufRead, Write};
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        loop {
            let mut buf = Vec::new();
            let n = self.replies.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "the browser closed the DevTools pipe during {method}");
            buf.pop();
            let reply: Value = serde_json::from_slice(&buf).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {}", reply["error"]);
                return reply["result"].clone();
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot's encoding in the DevTools protocol).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {:?}", c as char),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for group in digits.chunks(4) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..group.len()]);
    }
    out
}

#[test]
fn base64_decodes_what_it_should() {
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(base64_decode("YQ=="), b"a");
    assert_eq!(base64_decode("YWJj"), b"abc");
}

/// The chat page in headless Chromium: `/?q=...` sends a message, the reply streams into the
/// page from the API in several deltas, the finished reply equals the API's own (greedy), and a
/// screenshot of the page with it is written for a person to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_streams_a_reply_in_headless_chromium() {
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
    else {
        assert!(std::env::var_os("CI").is_none(), "chromium is missing on CI (.ci/run installs it)");
        eprintln!("skipping: no chromium");
        return;
    };
    let dir = common::temp_dir("serve-page");
    common::write_tiny_chat_model(&dir, 32, 512, 12, false);
    let base = start(&dir, ServeOptions { temperature: 0.0, ..options() }).await;
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chat-page.png");
    let _ = std::fs::remove_file(&shot);
    let args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=900,700",
        "about:blank",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", dir.join("profile").display())])
    .collect();
    let url = format!("{base}/?q=Hello%20from%20Chromium");
    let (page, png) = tokio::task::spawn_blocking(move || {
        let mut b = Browser::launch(browser, &args);
        let target = b.call("Target.createTarget", json!({"url": url}), None)["targetId"].clone();
        let session = b.call("Target.attachToTarget", json!({"targetId": target, "flatten": true}), None);
        let session = session["sessionId"].as_str().unwrap().to_string();
        let probe = "JSON.stringify([...document.querySelectorAll('.msg')].map(m => \
                     ({cls: m.className, text: m.textContent, done: m.dataset.done === '1', chunks: +(m.dataset.chunks || 0)})))";
        let start = Instant::now();
        let page = loop {
            let r = b.call("Runtime.evaluate", json!({"expression": probe, "returnByValue": true}), Some(&session));
            let msgs: Value = serde_json::from_str(r["result"]["value"].as_str().unwrap_or("[]")).unwrap();
            let msgs = msgs.as_array().cloned().unwrap_or_default();
            assert!(!msgs.iter().any(|m| m["cls"] == "msg error"), "the page shows an error: {msgs:?}");
            if msgs.iter().any(|m| m["cls"] == "msg assistant" && m["done"] == true) {
                break msgs;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no finished reply after 60 s: {msgs:?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let png = b.call("Page.captureScreenshot", json!({"format": "png"}), Some(&session));
        (page, base64_decode(png["data"].as_str().unwrap()))
    })
    .await
    .unwrap();
    assert_eq!(page.len(), 2, "{page:?}");
    assert_eq!(page[0]["cls"], "msg user");
    assert_eq!(page[0]["text"], "Hello from Chromium");
    let reply = page[1]["text"].as_str().unwrap();
    assert!(page[1]["chunks"].as_u64().unwrap() > 1, "the reply arrived in one piece, not streamed: {page:?}");
    // The page's reply is the API's greedy reply to the same conversation.
    let body = json!({"messages": [{"role": "user", "content": "Hello from Chromium"}]});
    let (status, v) = post(&reqwest::Client::new(), &format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(reply, v["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000, "not a screenshot: {} bytes", png.len());
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot of the chat page: {}", shot.display());
    std::fs::remove_dir_all(&dir).unwrap();
}
