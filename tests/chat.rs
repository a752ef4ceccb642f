//! Chat: templates against transformers' rendering, multi-turn sessions over one KV cache,
//! and the `chat` command driven in a real terminal under tmux.

#[path = "common/chat_model.rs"]
mod common;
#[path = "common/shared_data.rs"]
mod shared_data;

use anetrain::chat::session::{ChatModel, ChatSession, TurnEnd};
use anetrain::chat::template::{ChatTemplate, Message};
use anetrain::generate::Sampling;
use anetrain::rng::Rng;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Deserialize)]
struct Golden {
    templates: HashMap<String, String>,
    conversations: Vec<Vec<Message>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: usize,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
}

/// Every case of tools/make_chat_template_goldens.py (transformers' Jinja setup) renders to
/// the same text, or fails with the same raise_exception message.
#[test]
fn templates_render_as_transformers_does() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template_golden.json");
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(golden.cases.len(), 18);
    for case in &golden.cases {
        let t = ChatTemplate::new(&golden.templates[&case.template], "<s>", "</s>").unwrap();
        let what =
            format!("{} on conversation {} (gen {})", case.template, case.conversation, case.add_generation_prompt);
        let got = t.render(&golden.conversations[case.conversation], case.add_generation_prompt);
        match (&case.text, &case.error) {
            (Some(text), None) => assert_eq!(&got.unwrap(), text, "{what}"),
            (None, Some(err)) => {
                let got = got.unwrap_err().to_string();
                assert!(got.contains(err.as_str()) && got.contains("line "), "{what}: {got}");
            }
            _ => unreachable!(),
        }
    }
}

fn greedy() -> Sampling {
    Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
}

#[test]
fn later_turns_prefill_only_new_tokens_and_match_a_fresh_prefill() {
    let dir = common::temp_dir("chat-session");
    common::write_tiny_chat_model(&dir, 32, 512, 3, true);
    let model = ChatModel::load(&dir, None).unwrap();
    let mut rng = Rng::new(0);
    let mut a = ChatSession::new(&model, 512, Some("Be kind.".into())).unwrap();
    let never = || false;
    let r1 = a.turn("Tell me about Lily.", 12, &greedy(), &mut rng, never, |_| {}).unwrap();
    assert_eq!(r1.reused, 0);
    let first_prompt = r1.prefilled;
    let r2 = a.turn("And her dog?", 12, &greedy(), &mut rng, never, |_| {}).unwrap();
    // The whole first prompt stays cached (and the reply, as far as its text re-tokenizes to
    // the same ids: a random model's bytes need not); only the rest is prefilled.
    assert!(r2.reused >= first_prompt, "reused {} of a first prompt of {first_prompt}", r2.reused);
    let mut history = vec![Message::new("system", "Be kind.")];
    history.extend(a.history[..3].iter().cloned());
    assert_eq!(r2.reused + r2.prefilled, model.prompt_ids(&history).unwrap().len());
    // A fresh session given the same history from scratch answers identically: the cached
    // keys and values are the ones a full prefill computes.
    let mut b = ChatSession::new(&model, 512, Some("Be kind.".into())).unwrap();
    b.history = vec![Message::new("user", "Tell me about Lily."), Message::new("assistant", &r1.reply)];
    let fresh = b.turn("And her dog?", 12, &greedy(), &mut rng, never, |_| {}).unwrap();
    assert_eq!(fresh.reused, 0);
    assert_eq!(fresh.reply, r2.reply);
    // Streamed pieces add up to the reply.
    let mut streamed = String::new();
    a.reset();
    let r3 = a.turn("Tell me about Lily.", 12, &greedy(), &mut rng, never, |t| streamed.push_str(t)).unwrap();
    assert_eq!((streamed.as_str(), r3.reply.as_str()), (r1.reply.as_str(), r1.reply.as_str()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interrupts_and_a_full_context_are_handled() {
    let dir = common::temp_dir("chat-limits");
    common::write_tiny_chat_model(&dir, 32, 512, 4, false);
    let model = ChatModel::load(&dir, None).unwrap();
    let mut rng = Rng::new(0);
    let mut s = ChatSession::new(&model, 96, None).unwrap();
    let mut n = 0;
    let r = s
        .turn(
            "hi",
            50,
            &greedy(),
            &mut rng,
            || {
                n += 1;
                n == 3
            },
            |_| {},
        )
        .unwrap();
    assert_eq!((r.end, r.generated), (TurnEnd::Interrupted, 3));
    // Turns of ~20 tokens in 96 positions: the oldest are dropped, and the session goes on.
    let mut dropped = 0;
    for i in 0..8 {
        let r = s.turn(&format!("message number {i} about a cat"), 8, &greedy(), &mut rng, || false, |_| {}).unwrap();
        dropped += r.dropped_turns;
        assert!(s.cached_tokens() <= 96);
    }
    assert!(dropped > 0, "no turn was dropped");
    assert_eq!(s.history.first().unwrap().role, "user");
    // A single message longer than the context is refused and leaves the session usable.
    let long = "cat ".repeat(200);
    let err = s.turn(&long, 8, &greedy(), &mut rng, || false, |_| {}).unwrap_err().to_string();
    assert!(err.contains("the context holds 96"), "{err}");
    assert!(s.turn("hi", 4, &greedy(), &mut rng, || false, |_| {}).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Text of the tmux pane.
fn capture(session: &str) -> String {
    let out = Command::new("tmux").args(["capture-pane", "-p", "-J", "-S", "-200", "-t", session]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(session: &str, what: impl Fn(&str) -> bool, label: &str) -> String {
    let start = Instant::now();
    loop {
        let pane = capture(session);
        if what(&pane) {
            return pane;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {label}; pane:\n{pane}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn keys(session: &str, keys: &[&str]) {
    let status = Command::new("tmux").args(["send-keys", "-t", session]).args(keys).status().unwrap();
    assert!(status.success());
}

/// The chat command in a real terminal: a reply streams, /system and /reset answer, Ctrl-C
/// stops a long reply without ending the program, /quit ends it.
#[test]
fn chat_command_under_tmux() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "tmux is missing on CI (.ci/run installs it)");
        eprintln!("skipping: tmux is not installed");
        return;
    }
    let dir = common::temp_dir("chat-tmux");
    // Wide enough that a 4000-token reply takes a while, so Ctrl-C lands mid-reply.
    common::write_tiny_chat_model(&dir, 256, 8192, 5, false);
    // Greedy replies to "hello" never stop early on this model (checked, so the test is exact).
    let model = ChatModel::load(&dir, None).unwrap();
    let mut probe = ChatSession::new(&model, 8192, None).unwrap();
    let r = probe.turn("hello", 40, &greedy(), &mut Rng::new(0), || false, |_| {}).unwrap();
    assert_eq!(r.end, TurnEnd::Length, "the probe reply stopped early: {r:?}");
    let session = format!("anetrain-chat-{}", std::process::id());
    let cmd = format!(
        "{} chat --model {} --temperature 0 --max-tokens 6000 --ctx 8192 --threads 1; sleep 30",
        env!("CARGO_BIN_EXE_anetrain"),
        dir.display()
    );
    let status = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "150", "-y", "50", &cmd])
        .status()
        .unwrap();
    assert!(status.success());
    let result = std::panic::catch_unwind(|| {
        wait_for(&session, |p| p.contains("chatting with") && p.trim_end().ends_with('>'), "the banner");
        keys(&session, &["/system You are terse.", "Enter"]);
        // Type only once the next prompt is out: keys sent earlier echo before the "> " and
        // the reply would not follow "> hello" in the pane (a race seen under load).
        wait_for(
            &session,
            |p| p.contains("[system prompt set; conversation reset]") && p.trim_end().ends_with('>'),
            "/system and the prompt after it",
        );
        keys(&session, &["hello", "Enter"]);
        // Wait for streamed text after the prompt line, then interrupt.
        wait_for(
            &session,
            |p| p.split("> hello").nth(1).is_some_and(|rest| rest.trim().len() > 20),
            "streamed reply text",
        );
        keys(&session, &["C-c"]);
        let pane = wait_for(&session, |p| p.contains("[stopped]"), "[stopped] after Ctrl-C");
        assert!(!pane.contains("[reply cut"), "the reply ran to its end before Ctrl-C:\n{pane}");
        wait_for(&session, |p| p.trim_end().ends_with('>'), "the prompt after Ctrl-C");
        keys(&session, &["/reset", "Enter"]);
        wait_for(&session, |p| p.contains("[conversation reset]") && p.trim_end().ends_with('>'), "/reset");
        keys(&session, &["/quit", "Enter"]);
        // The program exits (the pane's shell then sleeps): no prompt comes back.
        std::thread::sleep(Duration::from_millis(500));
        let out = Command::new("tmux")
            .args(["list-panes", "-t", &session, "-F", "#{pane_current_command}"])
            .output()
            .unwrap();
        let current = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_ne!(current, "anetrain", "chat did not exit on /quit");
    });
    let _ = Command::new("tmux").args(["kill-session", "-t", &session]).status();
    std::fs::remove_dir_all(&dir).unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// `chat --model <the SmolLM2 GGUF>`: the tokenizer and ChatML template come from the file's
/// metadata; greedy, it answers as transformers does ("The capital of France is Paris."), and
/// the second turn remembers the first (its prompt is prefilled on top of the cached one).
#[test]
fn chat_command_on_the_smollm2_gguf() {
    use std::io::Write;
    let Some(path) = shared_data::shared_data("data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_anetrain"))
        .args(["chat", "--model", path.to_str().unwrap(), "--temperature", "0", "--max-tokens", "40"])
        .args(["--ctx", "512", "--threads", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"What is the capital of France?\nAnd of Italy?\n/quit\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("chatting with SmolLM2-135M-Instruct.Q4_1"), "{text}");
    let (first, second) = text.split_once("> ").and_then(|(_, rest)| rest.split_once("> ")).unwrap();
    assert!(first.contains("Paris"), "{text}");
    assert!(second.contains("Rome"), "{text}");
}

fn anetrain(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_anetrain")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `prepare --chat` and `train --data` on chat lines, from the command line: the prepared
/// directory and the raw .jsonl both train, with the loss on assistant tokens only; a bad line
/// is named by its number.
#[test]
fn prepare_chat_and_train_on_chat_data() {
    let dir = common::temp_dir("chat-cli");
    let model = dir.join("model");
    common::write_tiny_chat_model(&model, 32, 512, 6, true);
    let lines: Vec<String> = (0..40)
        .map(|i| match i % 2 {
            0 => format!(
                r#"{{"messages": [{{"role": "user", "content": "What is {i} plus one?"}}, {{"role": "assistant", "content": "It is {}."}}]}}"#,
                i + 1
            ),
            _ => format!(r#"{{"prompt": "Name a color for {i}", "completion": "Blue."}}"#),
        })
        .collect();
    let jsonl = dir.join("chat.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let (s, j, tok, out) = (
        |p: &Path| p.to_str().unwrap().to_string(),
        jsonl.to_str().unwrap(),
        model.join("tokenizer.json"),
        dir.join("prepared"),
    );
    let (ok, text) = anetrain(&[
        "prepare",
        "--chat",
        "--input",
        j,
        "--tokenizer",
        &s(&tok),
        "--out",
        &s(&out),
        "--val-fraction",
        "0.1",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("40 examples") && text.contains("loss on assistant tokens only"), "{text}");
    assert!(out.join("tokenizer_config.json").is_file());
    let config = s(&model.join("config.json"));
    for (i, data) in [s(&out), j.to_string()].into_iter().enumerate() {
        let ckpt = s(&dir.join(format!("ckpt{i}")));
        let mut args =
            vec!["train", "--model", &config, "--data", &data, "--steps", "3", "--batch", "2", "--seq", "32"];
        args.extend(["--no-peak", "--eval-every", "3", "--threads", "1", "--ckpt-dir", &ckpt]);
        if data.ends_with(".jsonl") {
            args.extend(["--tokenizer", tok.to_str().unwrap()]);
        }
        let (ok, text) = anetrain(&args);
        assert!(ok, "train --data {data}: {text}");
        assert!(text.contains("val"), "{text}");
        // The checkpoint keeps the tokenizer and the chat template: `chat` talks to it as it is.
        let loaded = ChatModel::load(Path::new(&ckpt), None).unwrap();
        assert_eq!(loaded.template.source, anetrain::chat::template::CHATML, "the template saved with {ckpt}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_anetrain"))
            .args(["chat", "--model", &ckpt, "--temperature", "0", "--max-tokens", "5", "--threads", "1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"hello\n/quit\n").unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "chat on {ckpt}: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("chatting with") && text.matches("> ").count() >= 2, "{text}");
    }
    // Plain text trains a checkpoint without a template: chat says what to pass, and takes it.
    let plain = dir.join("plain.txt");
    std::fs::write(&plain, anetrain::corpus::stories(2, 60).join("\n\n")).unwrap();
    let ckpt = s(&dir.join("ckpt-plain"));
    let mut args = vec!["train", "--model", &config, "--data", plain.to_str().unwrap(), "--steps", "2"];
    args.extend(["--batch", "2", "--seq", "32", "--no-peak", "--threads", "1", "--ckpt-dir", &ckpt]);
    args.extend(["--tokenizer", tok.to_str().unwrap()]);
    let (ok, text) = anetrain(&args);
    assert!(ok, "{text}");
    let err = ChatModel::load(Path::new(&ckpt), None).err().unwrap().to_string();
    assert!(err.contains("no chat template") && err.contains("--chat-template"), "{err}");
    let template = dir.join("chatml.jinja");
    std::fs::write(&template, anetrain::chat::template::CHATML).unwrap();
    assert_eq!(
        ChatModel::load(Path::new(&ckpt), Some(&template)).unwrap().template.source,
        anetrain::chat::template::CHATML
    );
    // A bad line is named; a tokenizer without a template cannot render conversations.
    std::fs::write(&jsonl, format!("{}\n{{\"messages\": 3}}\n", lines[0])).unwrap();
    let (ok, text) = anetrain(&["prepare", "--chat", "--input", j, "--tokenizer", &s(&tok), "--out", &s(&out)]);
    assert!(!ok && text.contains("chat.jsonl:2"), "{text}");
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let (ok, text) = anetrain(&["prepare", "--chat", "--input", j, "--tokenizer", &s(&tok), "--out", &s(&out)]);
    assert!(!ok && text.contains("no chat template"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
