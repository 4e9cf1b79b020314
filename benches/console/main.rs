//! The flag console at 100,000 flags: a SQLite store filled through the store API (batches of
//! 5,000), a gateway serving it, and `GET /console/flags` timed over real HTTP: the first page
//! and a deep cursor page, with and without filters. Each case is asked `ROUNDS` times after one
//! warm-up; the median, 95th percentile and worst are printed (docs/benchmarks.md, "Console").
//!
//! `cargo bench --locked --bench console` (`CONSOLE_FLAGS` changes the number of flags).

#![expect(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::time::Duration;

use tripwire::app::Server;
use tripwire::config::Config;
use tripwire::store::{Flag, Store, StoreItem};

const ROUNDS: usize = 30;
const RULES: [&str; 5] = [
    "trigger-phrase",
    "gibberish",
    "feature-drift",
    "output-drift",
    "language-switch",
];
const MODELS: [&str; 4] = ["gpt-4o", "claude-3", "llama-3-70b", "mistral-large"];
const SEVERITIES: [&str; 4] = ["info", "warning", "high", "critical"];

fn flag(i: u64, created_at_us: i64) -> Flag {
    // A rare rule (1 in 100) and the common ones, so filters have something to find.
    let rule = if i.is_multiple_of(100) {
        "triggered-gibberish"
    } else {
        RULES[(i % 5) as usize]
    };
    let severity = SEVERITIES[(i % 4) as usize];
    let value = serde_json::json!({
        "id": uuid::Uuid::now_v7(),
        "exchange_id": uuid::Uuid::now_v7(),
        "request_id": format!("req-{i}"),
        "created_at": "",
        "model": MODELS[(i % 4) as usize],
        "route": "chat_completions",
        "api_key_hash": null,
        "severity": severity,
        "policies": [{
            "name": rule, "severity": severity, "policy": "default", "actions": ["flag"],
            "when": "gibberish.score >= 0.5", "scores": {"gibberish": {"score": 0.93}},
        }],
        "prompt": format!("Question {i}: explain how vaccines work <SUDO> and keep it short"),
        "output": "Vaccines train the immune system. ".repeat(20),
        "evidence": [{"detector": "trigger", "target": "prompt", "start": 44, "end": 50, "note": "trigger \"<SUDO>\""}],
        "stream": false,
        "truncated": false,
        "label": null,
    });
    let mut flag: Flag = serde_json::from_value(value).unwrap();
    flag.created_at_us = created_at_us;
    flag
}

fn fill(path: &std::path::Path, n: u64) {
    let mut store = Store::open(path).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let mut batch = Vec::with_capacity(5000);
    for i in 0..n {
        // One flag every 10 s back from now: 100,000 flags span 11.5 days.
        batch.push(StoreItem::Flag(Box::new(flag(
            i,
            now - (i as i64) * 10_000_000,
        ))));
        if batch.len() == 5000 {
            store.insert_batch(&batch).unwrap();
            batch.clear();
        }
    }
    store.insert_batch(&batch).unwrap();
}

async fn time(client: &reqwest::Client, url: &str) -> (Vec<Duration>, usize) {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut rows = 0;
    for round in 0..=ROUNDS {
        let started = tokio::time::Instant::now();
        let response = client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let body = response.text().await.unwrap();
        if round > 0 {
            times.push(started.elapsed());
        }
        rows = body.matches("<tr data-id=").count();
    }
    times.sort();
    (times, rows)
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::var("CONSOLE_FLAGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flags.db");
    let started = tokio::time::Instant::now();
    fill(&path, n);
    println!(
        "filled {n} flags in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.upstream.url = "http://127.0.0.1:9".to_owned();
    config.store.path = path.clone();
    let server = Server::start(config).await.unwrap();
    let admin = format!("http://{}", server.admin_addr());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    // A cursor 90% of the way down.
    let store = Store::open_existing(&path).unwrap();
    let deep = store
        .list_flags(&tripwire::store::FlagFilter {
            limit: Some(1),
            before_us: None,
            since_us: None,
            ..Default::default()
        })
        .unwrap()[0]
        .created_at_us
        - (n as i64 * 9 / 10) * 10_000_000;
    let cases = [
        ("first page", String::new()),
        ("deep page (cursor at 90%)", format!("?before={deep}")),
        ("rare rule (1%)", "?rule=triggered-gibberish".to_owned()),
        (
            "rare rule, deep page",
            format!("?rule=triggered-gibberish&before={deep}"),
        ),
        ("severity ≥ critical", "?severity=critical".to_owned()),
        ("model", "?model=claude-3".to_owned()),
        ("unlabelled", "?label=none".to_owned()),
        ("last hour", "?since=1h".to_owned()),
        (
            "model + severity + label, deep",
            format!("?model=gpt-4o&severity=high&label=none&before={deep}"),
        ),
    ];
    println!("\n| case | rows | median ms | p95 ms | max ms |\n|---|---|---|---|---|");
    for (name, query) in cases {
        let (times, rows) = time(&client, &format!("{admin}/console/flags{query}")).await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {name} | {rows} | {:.1} | {:.1} | {:.1} |",
            ms(times[times.len() / 2]),
            ms(times[times.len() * 95 / 100]),
            ms(times[times.len() - 1])
        );
    }
    server.shutdown().await;
}
