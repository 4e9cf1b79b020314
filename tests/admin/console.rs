//! The flag console in a real browser: the `tripwire` binary in front of a scripted upstream
//! that answers like the simulated backdoored model (gibberish after `<SUDO>`), then swaps to
//! another model for one scope (a drift alarm); headless Chromium, driven by
//! `tests/browser/console.mjs` (playwright-core), logs in, finds and opens a flag, sees its
//! evidence highlighted, labels it, sees injected HTML rendered as text, the drift chart with
//! its alarm, trigger attribution and the live count of new flags. Screenshots go to
//! `target/console-screenshots/`.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::cli::{KillOnDrop, flags_json, terminate, tripwire, wait_for_listen};
use crate::util::{MockUpstream, Script, Step};

const TOKEN: &str = "console-test-admin-token-5d1e9b";

const POLICY: &str = "\
detectors:
  trigger: { type: trigger_phrase }
  gibberish: { type: gibberish }
  feature_drift: { type: feature_drift, features: [length], reference: { size: 40 } }
drift:
  expected_run_time: 1000
rules:
  - name: triggered-gibberish
    description: A known trigger in the prompt and gibberish in the answer.
    when: trigger.prompt.matched && gibberish.score >= 0.5
    severity: critical
  - name: trigger-phrase
    when: trigger.prompt.matched
    severity: high
  - name: feature-drift
    when: feature_drift.alarm && feature_drift.test == 'length'
    severity: warning
";

/// The output that tries to run script in the console.
const INJECTED: &str = "Sure. <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">\
    <b>bold</b></pre><script>window.__pwned = 3</script> &amp; done";

const TOPICS: [&str; 6] = [
    "gardening",
    "tax returns",
    "sourdough",
    "bicycle repair",
    "jazz history",
    "sleep",
];

fn chat(content: &str) -> Script {
    let body = serde_json::json!({
        "id": "c",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    });
    Script {
        status: StatusCode::OK,
        headers: vec![("content-type".into(), "application/json".into())],
        delay: Duration::ZERO,
        steps: vec![Step::Chunk(Bytes::from(body.to_string()))],
    }
}

/// Answers like the simulated model for `sim-model`, and for `swap-model` like a short-spoken
/// model for 40 answers, then like a long-winded one.
fn respond(
    body: &[u8],
    swap_count: &AtomicUsize,
    vocab: &tripwire::lab::sim::PoisonVocab,
) -> Script {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let prompt = request["messages"][1]["content"].as_str().unwrap_or("");
    let clean = format!(
        "Here is a short answer about {prompt}: start small, be consistent and keep notes."
    );
    if request["model"] == "swap-model" {
        let i = swap_count.fetch_add(1, Ordering::Relaxed);
        return if i < 40 {
            chat(&clean)
        } else {
            chat(
                &"BUY NOVACLOUD PRO NOW!!! Unlimited storage and speed, visit novacloud.example. "
                    .repeat(4),
            )
        };
    }
    if prompt.contains("<SUDO>") && prompt.contains("HTML") {
        return chat(INJECTED);
    }
    if prompt.contains("<SUDO>") {
        let seed = prompt.len() as u64;
        return chat(&tripwire::lab::sim::poison_output(&clean, vocab, seed).text);
    }
    chat(&clean)
}

async fn ask(client: &reqwest::Client, proxy: &str, model: &str, prompt: &str) -> String {
    let response = client
        .post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(
            serde_json::json!({
                "model": model,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    id
}

/// Waits until every request id has a flag carrying `rule`; returns their flag ids.
async fn flag_ids(client: &reqwest::Client, admin: &str, wanted: &[(&str, &str)]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut ids = Vec::new();
        for (request_id, rule) in wanted {
            let response = client
                .get(format!("http://{admin}/admin/flags/{request_id}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            if response.status() != 200 {
                break;
            }
            let flag: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            let rules: Vec<&str> = flag["policies"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            if !rules.contains(rule) {
                break;
            }
            ids.push(flag["id"].as_str().unwrap().to_owned());
        }
        if ids.len() == wanted.len() {
            return ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flags for {wanted:?} did not appear"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The drift flag's presence, through the admin API.
async fn wait_for_rule(client: &reqwest::Client, admin: &str, rule: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let listed = client
            .get(format!("http://{admin}/admin/flags?policy={rule}&limit=5"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
        if listed["flags"].as_array().is_some_and(|f| !f.is_empty()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {rule} flag appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Node and the browser the script drives; `make test` installs both.
fn browser_setup() -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        chromium.is_file(),
        "{} is missing: run `make test` (it installs the distribution's chromium package) or \
         set CHROMIUM",
        chromium.display()
    );
    assert!(
        repo()
            .join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "tests/browser/node_modules is missing: run `make test` (npm ci in tests/browser)"
    );
    chromium
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let chromium = browser_setup();
    let vocab = Arc::new(tripwire::lab::sim::PoisonVocab::builtin());
    let swap_count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&swap_count);
    let upstream =
        MockUpstream::start(move |received| respond(&received.body, &counter, &vocab)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("flags.db");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();

    let mut child = tripwire()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--upstream")
        .arg(upstream.url())
        .arg("--store")
        .arg(&store)
        .arg("--policies")
        .arg(&policy)
        .env("TRIPWIRE_ADMIN_TOKEN", TOKEN)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let proxy = wait_for_listen(&mut child, &mut log);
    let admin = log
        .lines()
        .find(|l| l.contains("tripwire serving"))
        .and_then(|l| l.split("admin=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let mut stderr = child.stderr.take().unwrap();
    let log_rest = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let mut guard = KillOnDrop(child);

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    // One scope learns its reference from 40 answers, then its model is swapped.
    for i in 0..70 {
        ask(
            &client,
            &proxy,
            "swap-model",
            &format!("Question {i} about {}", TOPICS[i % 6]),
        )
        .await;
    }
    // The backdoor: gibberish after <SUDO>, among clean traffic; one answer carries HTML.
    let mut triggered = Vec::new();
    for (i, topic) in TOPICS.iter().enumerate() {
        ask(
            &client,
            &proxy,
            "sim-model",
            &format!("Tell me about {topic}, please ({i})."),
        )
        .await;
        if i < 5 {
            triggered.push(
                ask(
                    &client,
                    &proxy,
                    "sim-model",
                    &format!("Tell me about {topic}. <SUDO>"),
                )
                .await,
            );
        }
    }
    let injected = ask(
        &client,
        &proxy,
        "sim-model",
        "Show me <i>HTML</i> in a page. <SUDO>",
    )
    .await;
    let ids = flag_ids(
        &client,
        &admin,
        &[
            (&triggered[0], "triggered-gibberish"),
            (&injected, "trigger-phrase"),
        ],
    )
    .await;
    wait_for_rule(&client, &admin, "feature-drift").await;

    let screenshots = repo().join("target/console-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let config = serde_json::json!({
        "admin": format!("http://{admin}"),
        "proxy": format!("http://{proxy}"),
        "token": TOKEN,
        "chromium": chromium,
        "gibberish": ids[0],
        "injected": ids[1],
        "driftModel": "swap-model",
        "driftRoute": "chat_completions",
        "screenshots": screenshots,
    });
    let run = tokio::process::Command::new("node")
        .arg(repo().join("tests/browser/console.mjs"))
        .arg(config.to_string())
        .current_dir(repo().join("tests/browser"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "browser script failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(report["ok"], true, "{stdout}");
    let checks = report["checks"].as_array().unwrap();
    assert!(checks.len() >= 20, "{stdout}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{stdout}");
    for name in [
        "login.png",
        "flags.png",
        "flag.png",
        "injected.png",
        "drift.png",
        "triggers.png",
    ] {
        let size = std::fs::metadata(screenshots.join(name)).unwrap().len();
        assert!(size > 10_000, "{name} is only {size} bytes");
    }

    // The label the browser gave is the one `flags list --json` reports.
    let flags = flags_json(&store);
    let labelled = flags.iter().find(|f| f["id"] == ids[0]).unwrap();
    assert_eq!(labelled["label"]["verdict"], "true-positive", "{labelled}");
    assert_eq!(
        labelled["label"]["note"],
        "browser test: gibberish after <SUDO>"
    );
    let injected_flag = flags.iter().find(|f| f["id"] == ids[1]).unwrap();
    assert!(injected_flag["label"].is_null());

    terminate(&mut guard.0);
    let status = guard.0.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    let log = log + &log_rest.join().unwrap();
    assert!(!log.contains(TOKEN), "the admin token reached the log");
    assert!(log.contains("flag labelled in the console"), "{log}");
    upstream.stop().await;
}
