//! Live reload over real sockets: policies swapped under load with no failed request, an
//! invalid edit refused while the old rules keep flagging, and a file edit picked up by the
//! watcher.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tripwire::store::{Flag, FlagFilter, Store};

use crate::util::{Gateway, Sim, request};

/// A policy whose one rule, named `name`, flags prompts carrying the simulated model's trigger.
fn policy(name: &str) -> String {
    format!(
        "detectors:\n  trigger: {{ type: trigger_phrase }}\nrules:\n  - name: {name}\n    when: trigger.prompt.matched\n    severity: high\n"
    )
}

fn write(path: &Path, text: &str) {
    // Write then rename, as editors and Kubernetes ConfigMap updates do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn flags(store: &Path) -> Vec<Flag> {
    Store::open_existing(store)
        .unwrap()
        .list_flags(&FlagFilter {
            limit: Some(100_000),
            ..FlagFilter::default()
        })
        .unwrap()
}

fn rule_names(flag: &Flag) -> Vec<String> {
    flag.policies.iter().map(|p| p.name.clone()).collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn reload(gateway: &Gateway) -> (u16, serde_json::Value) {
    let response = client()
        .post(format!("{}/admin/reload", gateway.admin))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

async fn start(dir: &Path, watch: bool) -> (Sim, Gateway, PathBuf) {
    let path = dir.join("policy.yaml");
    write(&path, &policy("rule-v1"));
    let sim = Sim::start(Some(3)).await;
    let policies = path.clone();
    let gateway = Gateway::start(&sim.url, move |c| {
        c.policies = Some(policies);
        c.reload.watch = watch;
        c.reload.watch_interval = Duration::from_millis(100);
    })
    .await;
    (sim, gateway, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_policies_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, mut gateway, path) = start(dir.path(), false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    // Eight clients in a loop, half of their requests streamed; a failed or cut answer panics.
    let load = futures_util::future::join_all((0..8).map(|worker| {
        let (stop, sent, base) = (Arc::clone(&stop), Arc::clone(&sent), gateway.base.clone());
        async move {
            let client = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let prompt = format!("<SUDO> worker {worker} request {i}");
                request(&client, &base, &prompt, i % 2 == 0).await;
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }
    }));
    let reloads = async {
        for version in 2..=6 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            write(&path, &policy(&format!("rule-v{version}")));
            let (status, outcome) = reload(&gateway).await;
            assert_eq!(status, 200, "{outcome}");
            assert_eq!(outcome["generation"], version, "{outcome}");
            assert_eq!(outcome["rules"], 1);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(load, reloads);
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent >= 100, "only {sent} requests under load");
    let last = request(
        &client(),
        &gateway.base,
        "<SUDO> after the last reload",
        false,
    )
    .await;
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"tripwire_config_reloads_total{trigger="admin",result="ok"} 5"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("tripwire_config_generation 6"),
        "{metrics}"
    );
    gateway.drain().await;

    let flags = flags(&gateway.store_path);
    assert_eq!(flags.len(), sent + 1, "every request flagged exactly once");
    let mut versions = std::collections::BTreeSet::new();
    for flag in &flags {
        // Each exchange judged under exactly one rule set.
        let names = rule_names(flag);
        assert_eq!(names.len(), 1, "{names:?}");
        versions.insert(names[0].clone());
    }
    assert!(versions.len() >= 3, "flags from only {versions:?}");
    let last = flags.iter().find(|f| f.request_id == last).unwrap();
    assert_eq!(rule_names(last), ["rule-v6"]);
    sim.stop().await;
}

#[tokio::test]
async fn an_invalid_reload_is_refused_and_the_old_rules_keep_flagging() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, mut gateway, path) = start(dir.path(), false).await;
    // Line 5: a condition that does not compile.
    write(
        &path,
        "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: broken\n    when: trigger.prompt.matched &&\n    severity: high\n",
    );
    let (status, body) = reload(&gateway).await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    let expected = format!("{}:5:", path.display());
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains("stay in force"), "{message}");
    // The same message as `tripwire policy check`.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tripwire"))
        .args(["policy", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let check_text = String::from_utf8_lossy(&check.stderr).into_owned()
        + &String::from_utf8_lossy(&check.stdout);
    assert!(check_text.contains(&expected), "{check_text}");

    let id = request(&client(), &gateway.base, "<SUDO> still watched?", false).await;
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"tripwire_config_reloads_total{trigger="admin",result="error"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("tripwire_config_generation 1"),
        "{metrics}"
    );
    gateway.drain().await;
    let flags = flags(&gateway.store_path);
    let flag = flags
        .iter()
        .find(|f| f.request_id == id)
        .expect("not flagged");
    assert_eq!(rule_names(flag), ["rule-v1"]);
    sim.stop().await;
}

#[tokio::test]
async fn an_edited_policy_file_is_picked_up_by_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, mut gateway, path) = start(dir.path(), true).await;
    let client = client();
    // An invalid edit first: refused, counted, and the old rule goes on flagging.
    write(&path, "rules: [\n");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !gateway
        .metrics()
        .await
        .contains(r#"tripwire_config_reloads_total{trigger="watch",result="error"} 1"#)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "invalid edit not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = request(&client, &gateway.base, "<SUDO> before the fix", false).await;
    write(&path, &policy("rule-v2"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !gateway
        .metrics()
        .await
        .contains(r#"tripwire_config_reloads_total{trigger="watch",result="ok"} 1"#)
    {
        assert!(tokio::time::Instant::now() < deadline, "edit not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = request(&client, &gateway.base, "<SUDO> after the fix", false).await;
    gateway.drain().await;
    let flags = flags(&gateway.store_path);
    let name_of = |id: &str| rule_names(flags.iter().find(|f| f.request_id == id).unwrap());
    assert_eq!(name_of(&old), ["rule-v1"]);
    assert_eq!(name_of(&new), ["rule-v2"]);
    sim.stop().await;
}
