//! Overload: far more traffic than detection can keep up with. The gateway sheds detector
//! work (counted), never traffic; its memory stays within what the configured bounds allow;
//! once the load drops, detection works again without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::util::process::{KillOnDrop, flags_json, metric, serve, terminate};
use crate::util::request;

async fn scrape(client: &reqwest::Client, admin: &str) -> String {
    client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Starts `serve --sim` with `config` and `policy`; returns the child and the proxy and admin
/// addresses.
fn start(dir: &std::path::Path, config: &str, policy: &str) -> (KillOnDrop, String, String) {
    let config_path = dir.join("gateway.yaml");
    std::fs::write(&config_path, config).unwrap();
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let store = dir.join("overload.db");
    let (guard, listen, admin, _log) = serve(&[
        "--sim".as_ref(),
        "--sim-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--config".as_ref(),
        config_path.as_os_str(),
        "--policies".as_ref(),
        policy_path.as_os_str(),
        "--store".as_ref(),
        store.as_os_str(),
    ]);
    (guard, listen, admin)
}

const CONFIG: &str = "\
detect:
  workers: 1
  queue: 4
limits:
  max_concurrent_captures: 32
  max_capture_body_bytes: 262144
shutdown_grace: 20s
";

const POLICY: &str = "\
detectors:
  trigger: { type: trigger_phrase }
  gibberish: { type: gibberish }
  recurring: { type: recurring_span }
  language: { type: language_switch }
rules:
  - name: triggered-gibberish
    when: trigger.prompt.matched && gibberish.score >= 0.5
    severity: critical
  - name: trigger-phrase
    when: trigger.prompt.matched
    severity: high
  - name: recurring
    when: recurring.matched
    severity: high
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_detection_not_traffic_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut guard, listen, admin) = start(dir.path(), CONFIG, POLICY);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{listen}");
    // Every answer must be 200 and whole: traffic is never shed.
    let send = |prompt: String, stream: bool| {
        let (client, base) = (client.clone(), base.clone());
        async move { request(&client, &base, &prompt, stream).await }
    };
    for i in 0..20 {
        send(format!("warm-up {i}"), i % 2 == 0).await;
    }
    let baseline = metric(
        &scrape(&client, &admin).await,
        "process_resident_memory_bytes",
    );
    assert!(baseline > 0.0);

    // 48 clients as fast as they can, half of them streaming, many with the trigger: far beyond
    // what one detection worker with a queue of 4 keeps up with.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = futures_util::future::join_all((0..48).map(|worker| {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let prompt = format!("<SUDO> client {worker} asks question {i}");
                send(prompt, (worker + i) % 2 == 0).await;
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }
    }));
    let watch = async {
        let mut peak: f64 = 0.0;
        for _ in 0..16 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let text = scrape(&client, &admin).await;
            peak = peak.max(metric(&text, "process_resident_memory_bytes"));
        }
        stop.store(true, Ordering::Relaxed);
        peak
    };
    let (_, peak) = tokio::join!(load, watch);
    let sent = sent.load(Ordering::Relaxed);

    let text = scrape(&client, &admin).await;
    let shed = metric(&text, "tripwire_detect_shed_total");
    let inspected = metric(&text, "tripwire_detect_exchanges_total");
    eprintln!(
        "overload: {sent} requests in 4 s, {shed} shed from detection, {inspected} inspected, \
         resident memory {baseline} -> peak {peak} bytes"
    );
    assert!(
        shed > 0.0,
        "no detector work shed at {sent} requests:\n{text}"
    );
    assert!(inspected > 0.0);
    // Every request was answered and captured; the shed ones are stored uninspected.
    assert!(
        metric(&text, "tripwire_proxy_requests_total") >= (sent + 20) as f64,
        "{text}"
    );
    // Memory: the captures in flight are bounded by max_concurrent_captures ×
    // max_capture_body_bytes (8 MiB here) and the queues by their lengths; allow that four
    // times over plus 96 MiB for allocator slack and the simulated model's own traffic.
    let bound = 4.0 * 32.0 * 262_144.0 + 96.0 * 1024.0 * 1024.0;
    assert!(
        peak - baseline < bound,
        "resident memory grew from {baseline} to {peak} bytes under overload"
    );

    // Load gone: the queue drains and every new exchange is inspected again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(
        &scrape(&client, &admin).await,
        "tripwire_detect_queue_depth",
    ) > 0.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never drained"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shed_before = metric(&scrape(&client, &admin).await, "tripwire_detect_shed_total");
    let mut after = Vec::new();
    for i in 0..5 {
        after.push(send(format!("<SUDO> calm again {i}"), false).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = scrape(&client, &admin).await;
    assert_eq!(
        metric(&text, "tripwire_detect_shed_total"),
        shed_before,
        "{text}"
    );

    terminate(&mut guard.0);
    assert!(guard.0.wait().unwrap().success());
    let flags = flags_json(&dir.path().join("overload.db"));
    for id in &after {
        assert!(
            flags.iter().any(|f| f["request_id"] == id.as_str()),
            "request {id} not flagged after recovery"
        );
    }
}
