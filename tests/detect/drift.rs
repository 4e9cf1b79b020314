//! Drift detection end to end: a model swap behind the gateway is flagged by the drift rules
//! off the request path, the reference each scope learned is kept on disk, and a restarted
//! gateway tests against it at once instead of relearning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tripwire::store::{FlagFilter, Store};

use crate::util::{Gateway, MockUpstream, Script, Step, send_chat};

const POLICY: &str = "\
detectors:
  output_drift:
    type: embedding_drift
    sample_rate: 1.0
    max_sampled_per_minute: 600000
    reference: { size: 40 }
    window: 10
    topics: 0
    bootstraps: 2000
  feature_drift: { type: feature_drift, features: [length], reference: { size: 40 } }
drift:
  expected_run_time: 1000
rules:
  - name: output-drift
    when: output_drift.alarm
    severity: high
  - name: feature-drift
    when: feature_drift.alarm && feature_drift.test == 'length'
    severity: warning
";

const TOPICS: [&str; 8] = [
    "gardening",
    "tax returns",
    "sourdough",
    "bicycle repair",
    "jazz history",
    "sleep",
    "python lists",
    "the solar system",
];

/// The `i`-th question the tests ask.
fn prompt(i: usize) -> String {
    format!("Question {i}: tell me about {}", TOPICS[i % TOPICS.len()])
}

/// A short, plain answer before the swap; a long, shouty advertisement after it.
fn content(i: usize, swapped: bool) -> String {
    if swapped {
        "BUY NOVACLOUD PRO NOW!!! Unlimited storage, unlimited speed, unlimited savings. \
         Visit novacloud.example/deal today and use code WIN50 for half price on every plan!!!"
            .repeat(3)
    } else {
        const OPENINGS: [&str; 5] = [
            "A good first step is to start small and be consistent",
            "Most people find it easiest to read a short guide first",
            "It helps to set aside twenty minutes a day",
            "The usual advice is to ask someone experienced",
            "Begin with the basics and keep notes as you go",
        ];
        format!(
            "{} with {}. Lesson {i} covers the essentials. Ask again if you want more detail.",
            OPENINGS[(i / 8) % OPENINGS.len()],
            TOPICS[i % TOPICS.len()]
        )
    }
}

/// The upstream's chat completion carrying [`content`].
fn answer(i: usize, swapped: bool) -> Script {
    let content = content(i, swapped);
    let body = serde_json::json!({
        "id": format!("c{i}"),
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

fn drift_flags(store: &std::path::Path) -> Vec<(String, serde_json::Value)> {
    Store::open_existing(store)
        .unwrap()
        .list_flags(&FlagFilter {
            limit: Some(1000),
            ..FlagFilter::default()
        })
        .unwrap()
        .into_iter()
        .flat_map(|f| {
            f.policies
                .into_iter()
                .map(|p| (p.name.clone(), serde_json::Value::Object(p.scores)))
        })
        .collect()
}

async fn ask(gateway: &Gateway, n: usize) {
    for i in 0..n {
        let response = send_chat(gateway, &prompt(i), false).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_swap_is_flagged_and_the_learned_reference_survives_a_restart() {
    let swapped = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let (flag, counter) = (Arc::clone(&swapped), Arc::clone(&count));
    let upstream = MockUpstream::start(move |_| {
        answer(
            counter.fetch_add(1, Ordering::Relaxed),
            flag.load(Ordering::Relaxed),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("drift.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let state = dir.path().join("drift-state");

    let config_policy = policy.clone();
    let config_state = state.clone();
    let mut first = Gateway::start(&upstream.url(), |c| {
        c.policies = Some(config_policy);
        c.drift.state_dir = Some(config_state);
    })
    .await;
    // The reference: the first 40 exchanges of the scope. Then a reload (drift state must
    // survive it: a relearned reference would be the swapped model's), then the model is
    // swapped.
    ask(&first, 40).await;
    std::fs::write(&policy, format!("{POLICY}\n# edited\n")).unwrap();
    let reloaded = reqwest::Client::new()
        .post(format!("{}/admin/reload", first.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200, "{}", reloaded.text().await.unwrap());
    swapped.store(true, Ordering::Relaxed);
    ask(&first, 30).await;
    first.drain().await;
    let flags = drift_flags(&first.store_path);
    let output = flags
        .iter()
        .find(|(rule, _)| rule == "output-drift")
        .unwrap_or_else(|| panic!("no output-drift flag: {flags:?}"));
    let fields = &output.1["output_drift"];
    assert_eq!(fields["alarm"], true);
    assert_eq!(fields["test"], "mmd");
    assert!(fields["statistic"].as_f64().unwrap() > fields["threshold"].as_f64().unwrap());
    assert_eq!(fields["reference"]["size"], 40);
    assert_eq!(fields["reference"]["source"], "learned");
    assert!(
        flags.iter().any(|(rule, _)| rule == "feature-drift"),
        "no feature-drift flag: {flags:?}"
    );
    let saved: Vec<_> = std::fs::read_dir(state.join("output_drift"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");

    // A new gateway with the same state directory tests at once: 15 exchanges are far fewer
    // than a reference, so only a loaded reference can raise this alarm.
    let mut second = Gateway::start(&upstream.url(), |c| {
        c.policies = Some(policy);
        c.drift.state_dir = Some(state);
    })
    .await;
    ask(&second, 15).await;
    second.drain().await;
    let flags = drift_flags(&second.store_path);
    assert!(
        flags.iter().any(|(rule, _)| rule == "output-drift"),
        "the restarted gateway relearned instead of loading its reference: {flags:?}"
    );
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_built_offline_is_used_from_the_first_exchange() {
    let dir = tempfile::tempdir().unwrap();
    // Known-good exchanges, as a team would export them.
    let mut lines = String::new();
    for i in 0..40 {
        let output = content(i, false);
        lines
            .push_str(&serde_json::json!({"instruction": prompt(i), "output": output}).to_string());
        lines.push('\n');
    }
    let input = dir.path().join("good.jsonl");
    std::fs::write(&input, lines).unwrap();
    let baseline = dir.path().join("baseline.json");
    let policy = dir.path().join("drift.yaml");
    std::fs::write(
        &policy,
        POLICY.replace(
            "reference: { size: 40 }\n    window",
            &format!("reference: {{ file: {} }}\n    window", baseline.display()),
        ),
    )
    .unwrap();
    let built = std::process::Command::new(env!("CARGO_BIN_EXE_tripwire"))
        .args(["baseline", "build", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&baseline)
        .arg("--policies")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let reference = tripwire::detect::drift::Reference::load(&baseline).unwrap();
    assert_eq!(reference.outputs.len(), 40);
    assert_eq!(reference.prompts.len(), 40);
    assert_eq!(reference.features["length"].len(), 40);

    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    let upstream =
        MockUpstream::start(move |_| answer(counter.fetch_add(1, Ordering::Relaxed), true)).await;
    let mut gateway = Gateway::start(&upstream.url(), |c| {
        c.policies = Some(policy);
        c.drift.state_dir = Some(dir.path().join("state"));
    })
    .await;
    ask(&gateway, 15).await;
    gateway.drain().await;
    let flags = drift_flags(&gateway.store_path);
    let output = flags
        .iter()
        .find(|(rule, _)| rule == "output-drift")
        .unwrap_or_else(|| panic!("no output-drift flag from the offline baseline: {flags:?}"));
    assert_eq!(
        output.1["output_drift"]["reference"]["source"],
        input.display().to_string()
    );
    upstream.stop().await;
}
