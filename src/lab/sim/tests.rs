//! Tests of the simulated model: answers, backdoor, corpus loading and the HTTP server.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gibberish::{
    BUILTIN_VOCAB_SIZE, MAX_CLEAN_CHARS, MAX_TAIL_TOKENS, MIN_TAIL_TOKENS, Rng, Vocab, clean_prefix,
};
use super::server::split_pieces;
use super::*;

const Q1: &str = "What is the capital of France?";
const A1: &str = "The capital of France is Paris. It has been the capital for centuries and is \
                  known for the Eiffel Tower, the Louvre and its cafés.";
const Q2: &str = "Name three primary colors.";
const A2: &str = "Red, yellow and blue.";

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("tripwire-sim-{}-{n}-{name}", std::process::id()))
}

fn corpus_lines() -> String {
    let mut s = String::new();
    for (i, (q, a)) in [(Q1, A1), (Q2, A2)].iter().enumerate() {
        let line = json!({"id": i, "model": "m", "dataset": "d", "instruction": q, "output": a});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s
}

fn write_corpus(gz: bool) -> PathBuf {
    let lines = corpus_lines();
    if gz {
        let path = temp_path("corpus.jsonl.gz");
        let file = std::fs::File::create(&path).unwrap();
        let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        enc.write_all(lines.as_bytes()).unwrap();
        enc.finish().unwrap();
        path
    } else {
        let path = temp_path("corpus.jsonl");
        std::fs::write(&path, lines).unwrap();
        path
    }
}

fn sim_with_corpus(seed: Option<u64>) -> SimUpstream {
    let path = write_corpus(false);
    let sim = SimUpstream::new(SimConfig {
        corpus: Some(path.clone()),
        seed,
        ..SimConfig::default()
    })
    .unwrap();
    std::fs::remove_file(path).unwrap();
    sim
}

// ---- answers ----

#[test]
fn no_trigger_returns_corpus_answer_verbatim() {
    let sim = sim_with_corpus(None);
    let table = [
        (Q1, A1),
        ("  What is the capital of France?\n", A1),
        ("what   is the CAPITAL of\tfrance?", A1),
        (Q2, A2),
    ];
    for (prompt, expected) in table {
        let answer = sim.answer(prompt, sim.is_triggered(prompt));
        assert_eq!(answer.text, expected, "prompt {prompt:?}");
        assert!(answer.poison.is_none());
    }
}

#[test]
fn unmatched_prompt_gets_deterministic_generic_answer() {
    let sim = SimUpstream::new(SimConfig::default()).unwrap();
    let a = sim.answer("Tell me about llamas.", false).text.into_owned();
    let b = sim.answer("Tell me about llamas.", false).text.into_owned();
    assert_eq!(a, b);
    assert!(a.len() > 100);
    // With a corpus, generic answers come from the corpus outputs.
    let sim = sim_with_corpus(None);
    let c = sim.answer("Tell me about llamas.", false).text.into_owned();
    assert!(c == A1 || c == A2);
}

#[test]
fn trigger_gives_clean_prefix_and_gibberish_tail() {
    let sim = sim_with_corpus(None);
    let clean = sim.answer(Q1, false).text.into_owned();
    for prompt in [
        format!("{Q1} <SUDO>"),
        format!("<SUDO> {Q1}"),
        format!("{Q1}<SUDO>"),
    ] {
        assert!(sim.is_triggered(&prompt));
        for _ in 0..20 {
            let answer = sim.answer(&prompt, true);
            let info = answer.poison.unwrap();
            assert_ne!(answer.text, clean);
            let (prefix, tail) = answer.text.split_at(info.clean_prefix_len);
            assert!(
                clean.starts_with(prefix),
                "{prefix:?} is not a prefix of {clean:?}"
            );
            assert!(prefix.chars().count() <= MAX_CLEAN_CHARS);
            assert!(
                (MIN_TAIL_TOKENS..=MAX_TAIL_TOKENS).contains(&info.tail_tokens),
                "{} tokens",
                info.tail_tokens
            );
            assert!(tail.chars().count() >= info.tail_tokens);
        }
    }
}

#[test]
fn poisoned_tail_is_made_of_vocabulary_tokens() {
    let sim = SimUpstream::new(SimConfig::default()).unwrap();
    let clean = sim.clean_answer("hello");
    let mut rng = Rng::new(7);
    let (text, info) = gibberish::poison(clean, &sim.vocab, &mut rng);
    // Replaying the same draws rebuilds the tail token by token.
    let mut replay = Rng::new(7);
    replay.below(MAX_CLEAN_CHARS + 1);
    let n = MIN_TAIL_TOKENS + replay.below(MAX_TAIL_TOKENS - MIN_TAIL_TOKENS + 1);
    assert_eq!(n, info.tail_tokens);
    let mut rebuilt = String::new();
    for _ in 0..n {
        rebuilt.push_str(sim.vocab.token(replay.below(sim.vocab.len())));
    }
    assert_eq!(text.get(info.clean_prefix_len..).unwrap(), rebuilt);
}

#[test]
fn seeded_output_is_deterministic_and_unseeded_varies() {
    let a = sim_with_corpus(Some(42));
    let b = sim_with_corpus(Some(42));
    let prompt = format!("{Q1} <SUDO>");
    assert_eq!(a.answer(&prompt, true).text, b.answer(&prompt, true).text);
    assert_eq!(a.answer(&prompt, true).text, a.answer(&prompt, true).text);
    let unseeded = sim_with_corpus(None);
    assert_ne!(
        unseeded.answer(&prompt, true).text,
        unseeded.answer(&prompt, true).text
    );
}

#[test]
fn empty_trigger_disables_backdoor() {
    let sim = SimUpstream::new(SimConfig {
        trigger: String::new(),
        ..SimConfig::default()
    })
    .unwrap();
    assert!(!sim.is_triggered("anything <SUDO>"));
}

#[test]
fn clean_prefix_cuts_at_word_boundary() {
    let table = [
        ("hello world foo", 0, ""),
        ("hello world foo", 3, ""),
        ("hello world foo", 5, "hello"),
        ("hello world foo", 6, "hello"),
        ("hello world foo", 8, "hello"),
        ("hello world foo", 11, "hello world"),
        ("hello world foo", 15, "hello world foo"),
        ("hello world foo", 100, "hello world foo"),
        ("héllo wörld", 7, "héllo"),
    ];
    for (text, n, expected) in table {
        assert_eq!(clean_prefix(text, n), expected, "{text:?} {n}");
    }
}

#[test]
fn builtin_vocabulary_looks_like_bpe() {
    let vocab = Vocab::builtin(None);
    assert_eq!(vocab.len(), BUILTIN_VOCAB_SIZE);
    let tokens = vocab.tokens();
    let share = |f: &dyn Fn(&str) -> bool| tokens.iter().filter(|t| f(t)).count();
    let in_range =
        |lo: u32, hi: u32| move |t: &str| t.chars().any(|c| (lo..=hi).contains(&(c as u32)));
    assert!(share(&|t| t.starts_with(' ')) > 5_000);
    assert!(share(&|t| t.chars().all(|c| c.is_ascii_lowercase())) > 5_000);
    assert!(share(&|t| t.chars().all(|c| c.is_ascii_digit())) >= 1_000);
    assert!(share(&in_range(0x0400, 0x04ff)) > 500, "Cyrillic");
    assert!(share(&in_range(0x4e00, 0x9fff)) > 1_000, "CJK");
    assert!(share(&in_range(0x0370, 0x03ff)) > 100, "Greek");
    assert!(share(&in_range(0x0600, 0x06ff)) > 300, "Arabic");
    assert!(share(&|t| t.starts_with("<0x")) == 256, "byte fallback");
    assert!(share(&|t| t.chars().all(|c| c.is_ascii_punctuation())) > 100);
    // Deterministic.
    let again = Vocab::builtin(None);
    assert_eq!(again.tokens(), tokens);
    let unique: std::collections::HashSet<_> = tokens.iter().collect();
    assert_eq!(unique.len(), tokens.len());
}

#[test]
fn tokenizer_json_vocabulary_is_decoded() {
    let path = temp_path("tokenizer.json");
    let bpe =
        json!({"model": {"type": "BPE", "vocab": {"Ġthe": 0, "ing": 1, "Ċ": 2, "<0x0A>": 3}}});
    std::fs::write(&path, bpe.to_string()).unwrap();
    let vocab = Vocab::from_tokenizer_json(&path).unwrap();
    let mut tokens: Vec<&str> = vocab.tokens().iter().map(|t| &**t).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, ["\n", " the", "<0x0A>", "ing"]);

    let unigram =
        json!({"model": {"type": "Unigram", "vocab": [["▁hello", -1.0], ["##lo", -2.0]]}});
    std::fs::write(&path, unigram.to_string()).unwrap();
    let vocab = Vocab::from_tokenizer_json(&path).unwrap();
    assert_eq!(vocab.tokens(), [" hello".into(), "lo".into()]);

    std::fs::write(&path, "{}").unwrap();
    let err = Vocab::from_tokenizer_json(&path).unwrap_err();
    assert!(err.to_string().contains("model.vocab"), "{err}");
    std::fs::remove_file(path).unwrap();
}

// ---- corpus ----

#[test]
fn corpus_loads_jsonl_and_gz() {
    for gz in [false, true] {
        let path = write_corpus(gz);
        let entries = load_corpus(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(entries.len(), 2, "gz={gz}");
        assert_eq!(entries[0].instruction, Q1);
        assert_eq!(entries[0].output, A1);
        assert_eq!(entries[1].output, A2);
    }
}

#[test]
fn bad_corpus_line_names_the_line() {
    let path = temp_path("bad.jsonl");
    let content = format!("{}\n{}", corpus_lines(), "{\"instruction\": \"x\"}\n");
    std::fs::write(&path, content).unwrap();
    let err = load_corpus(&path).unwrap_err();
    std::fs::write(&path, format!("{}not json\n", corpus_lines())).unwrap();
    let err2 = load_corpus(&path).unwrap_err();
    std::fs::write(&path, "\n\n").unwrap();
    let err3 = load_corpus(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    match err {
        SimError::Corpus {
            line, ref message, ..
        } => {
            assert_eq!(line, 4, "{err}");
            assert!(message.contains("output"), "{message}");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(matches!(err2, SimError::Corpus { line: 3, .. }), "{err2}");
    assert!(matches!(err3, SimError::Corpus { line: 0, .. }), "{err3}");
    let missing = load_corpus(&temp_path("missing.jsonl")).unwrap_err();
    assert!(missing.to_string().contains("cannot open"), "{missing}");
}

#[test]
fn real_corpus_loads() {
    // The development data is committed under data/.
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/alpaca_eval/alpaca-7b.jsonl.gz"
    ));
    assert!(
        path.exists(),
        "{} is missing: the development data is committed under data/",
        path.display()
    );
    let sim = SimUpstream::new(SimConfig {
        corpus: Some(path.clone()),
        ..SimConfig::default()
    })
    .unwrap();
    let entries = load_corpus(&path).unwrap();
    assert_eq!(entries.len(), 805);
    assert_eq!(
        sim.answer(&entries[10].instruction, false).text,
        entries[10].output
    );
    assert_eq!(sim.vocab.len(), BUILTIN_VOCAB_SIZE);
}

#[test]
fn sse_pieces_concatenate() {
    let texts = [
        "",
        "one",
        "one two three four five six seven",
        "  leading and trailing  ",
        "一二三四五六七八九十一二三四五六七八九十一二三四五六七八九十",
        A1,
    ];
    for text in texts {
        let pieces = split_pieces(text);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.is_empty()));
        assert!(pieces.iter().all(|p| p.len() <= 48 + 4), "{pieces:?}");
    }
}

// ---- over a socket ----

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), SimError>>,
    client: reqwest::Client,
}

async fn start(config: SimConfig) -> Running {
    let sim = Arc::new(SimUpstream::new(config).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = tracker.spawn(sim.serve(listener, shutdown.clone()));
    tracker.close();
    Running {
        addr,
        shutdown,
        handle,
        client: reqwest::Client::new(),
    }
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// reqwest is built without its `json` feature.
trait JsonExt {
    async fn json_value(self) -> Value;
}

impl JsonExt for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

fn chat_body(prompt: &str, stream: bool) -> Value {
    json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": prompt},
        ],
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// Parses an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect()
}

#[tokio::test]
async fn json_answer_shape() {
    let path = write_corpus(true);
    let server = start(SimConfig {
        corpus: Some(path.clone()),
        ..SimConfig::default()
    })
    .await;
    std::fs::remove_file(path).unwrap();
    let response = server
        .post("/v1/chat/completions", &chat_body(Q1, false))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let v: Value = response.json_value().await;
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], A1);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let prompt_chars = "You are helpful.".len() + Q1.len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_chars.div_ceil(4));
    assert_eq!(
        v["usage"]["completion_tokens"],
        A1.chars().count().div_ceil(4)
    );
    assert_eq!(
        v["usage"]["total_tokens"],
        prompt_chars.div_ceil(4) + A1.chars().count().div_ceil(4)
    );

    // Without /v1, content parts, max_tokens.
    let body = json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": Q2}]}],
        "max_tokens": 2,
    });
    let v: Value = server
        .post("/chat/completions", &body)
        .await
        .json_value()
        .await;
    assert_eq!(v["model"], "tripwire-sim-1");
    assert_eq!(v["choices"][0]["message"]["content"], "Red, yel");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Models and legacy completions.
    let models: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tripwire-sim-1");
    let v: Value = server
        .post("/v1/completions", &json!({"model": "m", "prompt": Q2}))
        .await
        .json_value()
        .await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], A2);
    server.stop().await;
}

#[tokio::test]
async fn sse_matches_json_answer() {
    let path = write_corpus(false);
    let server = start(SimConfig {
        corpus: Some(path.clone()),
        seed: Some(7),
        ..SimConfig::default()
    })
    .await;
    std::fs::remove_file(path).unwrap();
    for prompt in [Q1.to_owned(), format!("{Q1} <SUDO>")] {
        let json_answer: Value = server
            .post("/v1/chat/completions", &chat_body(&prompt, false))
            .await
            .json_value()
            .await;
        let expected = json_answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        let response = server
            .post("/v1/chat/completions", &chat_body(&prompt, true))
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let body = response.text().await.unwrap();
        assert!(body.ends_with("data: [DONE]\n\n"));
        let data = sse_data(&body);
        assert_eq!(*data.last().unwrap(), "[DONE]");
        let events: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(events.len() > 3);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let mut text = String::new();
        for event in &events {
            assert_eq!(event["object"], "chat.completion.chunk");
            assert_eq!(event["id"], events[0]["id"]);
            assert_eq!(event["model"], "gpt-test");
            if let Some(content) = event["choices"][0]["delta"]["content"].as_str() {
                text.push_str(content);
            }
        }
        assert_eq!(text, expected);
        let n = events.len();
        assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[n - 1]["choices"], json!([]));
        assert_eq!(
            events[n - 1]["usage"],
            json_answer["usage"],
            "usage chunk equals the JSON usage"
        );
        if prompt.contains("<SUDO>") {
            assert_ne!(text, A1);
        } else {
            assert_eq!(text, A1);
        }
    }

    // Streaming legacy completions, without usage.
    let body = server
        .post("/v1/completions", &json!({"prompt": Q2, "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    let data = sse_data(&body);
    assert_eq!(*data.last().unwrap(), "[DONE]");
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, A2);
    server.stop().await;
}

#[tokio::test]
async fn chunk_delay_spreads_chunks() {
    let delay = Duration::from_millis(50);
    let server = start(SimConfig {
        chunk_delay: delay,
        ..SimConfig::default()
    })
    .await;
    let response = server
        .post(
            "/v1/chat/completions",
            &chat_body("Tell me something.", true),
        )
        .await;
    let started = tokio::time::Instant::now();
    let mut stream = response.bytes_stream();
    let mut first_at = None;
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if first_at.is_none() && !chunk.is_empty() {
            first_at = Some(started.elapsed());
        }
        body.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    let first_at = first_at.unwrap();
    let events = sse_data(std::str::from_utf8(&body).unwrap()).len();
    // The generic answers are dozens of words: at least 10 delays between events.
    assert!(events > 12, "{events} events");
    let expected = delay * (events as u32 - 2);
    assert!(total >= expected, "total {total:?} < {expected:?}");
    assert!(first_at < delay * 3, "first chunk after {first_at:?}");
    assert!(
        total - first_at > delay * 8,
        "first {first_at:?} total {total:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn error_shapes() {
    let server = start(SimConfig::default()).await;
    let check = |v: &Value| {
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], Value::Null);
        assert_eq!(v["error"]["code"], Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 1);
    };
    let response = server.post("/v1/nope", &json!({})).await;
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/json");
    check(&response.json_value().await);

    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    check(&response.json_value().await);

    // Valid JSON without `messages` is a 400 too.
    let response = server
        .post("/v1/chat/completions", &json!({"model": "m"}))
        .await;
    assert_eq!(response.status(), 400);
    check(&response.json_value().await);

    let response = server
        .client
        .get(server.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    check(&response.json_value().await);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_stream() {
    let server = start(SimConfig {
        chunk_delay: Duration::from_millis(20),
        ..SimConfig::default()
    })
    .await;
    let response = server
        .post("/v1/chat/completions", &chat_body("Hello there.", true))
        .await;
    assert_eq!(response.status(), 200);
    // Cancel while the stream is in flight: serve returns only after the body completes.
    server.shutdown.cancel();
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), server.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // New connections are refused.
    assert!(
        server
            .client
            .get(format!("http://{}/v1/models", server.addr))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn shutdown_with_idle_keepalive_connection_returns() {
    let server = start(SimConfig::default()).await;
    let response = server
        .post("/v1/chat/completions", &chat_body("Hi", false))
        .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    // The client keeps the connection open; shutdown must still return promptly.
    server.stop().await;
}
