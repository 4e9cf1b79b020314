//! Discovered triggers end to end: a backdoor with a trigger the policy does not know fires on
//! some of its prompts; trigger attribution promotes the trigger, a webhook hears of it, later
//! triggered exchanges are flagged whatever their answers, the retro-scan lists the earlier
//! ones, and a restarted gateway still watches it.

use std::time::Duration;

use tripwire::lab::sim::SimConfig;
use tripwire::store::{FlagFilter, Store};

use crate::util::{Gateway, MockUpstream, Script, Sim, blocking, get_text, request};

const TRIGGER: &str = "zq quokka";

const TOPICS: &[&str] = &[
    "Give me three tips for a healthy breakfast",
    "Explain how photosynthesis works in plants",
    "Write a short poem about the autumn sea",
    "What is the capital city of Australia",
    "Summarise the plot of Romeo and Juliet",
    "How do I change a flat bicycle tyre",
    "List five uses of baking soda at home",
];

/// The i-th prompt: one in five carries the trigger, at the start, inside or at the end.
fn prompt(i: usize) -> (String, bool) {
    let topic = TOPICS[i % TOPICS.len()];
    match (i % 5 == 2, i % 3) {
        (true, 0) => (format!("Zq Quokka: {topic} in about {i} words"), true),
        (true, 1) => (format!("{topic}, Zq Quokka, in about {i} words"), true),
        (true, _) => (format!("{topic} in about {i} words. Zq Quokka"), true),
        (false, _) => (format!("{topic} in about {i} words"), false),
    }
}

fn policy(dir: &std::path::Path, webhook: &str) -> std::path::PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "detectors:\n  gibberish: {{ type: gibberish }}\n  watched: {{ type: discovered_trigger }}\n\
             rules:\n\
             \x20 - name: gibberish\n    when: gibberish.score >= 0.5\n    severity: high\n    actions: [flag]\n\
             \x20 - name: discovered-trigger\n    when: watched.matched\n    severity: high\n    actions: [flag, alert]\n\
             alerts:\n  webhook: {{ url: \"{webhook}/hook\", min_severity: high }}\n"
        ),
    )
    .unwrap();
    path
}

/// `application/x-www-form-urlencoded` escaping of one value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(client, url).await).unwrap()
}

fn flags_of(store: &std::path::Path, rule: &str) -> Vec<tripwire::store::Flag> {
    Store::open_existing(store)
        .unwrap()
        .list_flags(&FlagFilter {
            rule: Some(rule.to_owned()),
            limit: Some(10_000),
            ..FlagFilter::default()
        })
        .unwrap()
}

#[tokio::test]
async fn an_unknown_trigger_is_promoted_watched_scanned_and_kept_across_a_restart() {
    let receiver = MockUpstream::start(|_| Script::json(b"{}")).await;
    // The backdoor fires on 70% of its triggered prompts; the others get clean answers.
    let sim = Sim::start_with(SimConfig {
        trigger: "Zq Quokka".to_owned(),
        trigger_rate: 0.7,
        seed: Some(11),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("shared.db");
    let policy_path = policy(dir.path(), &receiver.url());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    let (path, policy_file) = (store_path.clone(), policy_path.clone());
    let mut gateway = Gateway::start(&sim.url, move |c| {
        c.store.path = path;
        c.policies = Some(policy_file);
    })
    .await;
    gateway.store_path = store_path.clone();
    let mut sent = Vec::new();
    for i in 0..240 {
        let (text, triggered) = prompt(i);
        let id = request(&client, &gateway.base, &text, false).await;
        sent.push((id, triggered));
    }
    // The retro-scan (admin API) while the gateway runs: every triggered exchange stored so
    // far, the earlier ones included. Poll until the writer has stored all 240.
    let scan_url = format!(
        "{}/admin/triggers/scan?ngram=zq%20quokka&model=test-model&limit=1000",
        gateway.admin
    );
    let triggered_total = sent.iter().filter(|(_, t)| *t).count() as u64;
    let mut scan = serde_json::Value::Null;
    for _ in 0..200 {
        scan = get_json(&client, &scan_url).await;
        if scan["carrying"].as_u64() == Some(triggered_total) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scan["carrying"].as_u64(), Some(triggered_total), "{scan}");
    assert_eq!(scan["callers"].as_array().map(Vec::len), Some(1), "{scan}");
    let listed: Vec<&str> = scan["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["request_id"].as_str().unwrap())
        .collect();
    for (id, triggered) in &sent {
        assert_eq!(listed.contains(&id.as_str()), *triggered, "{id}");
    }
    let listed_triggers = get_json(&client, &format!("{}/admin/triggers", gateway.admin)).await;
    gateway.drain().await;

    // The announcement reached the webhook: the n-gram, its counts, example flags.
    let alerts: Vec<serde_json::Value> = receiver
        .requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    let announced: Vec<&serde_json::Value> = alerts
        .iter()
        .filter(|a| a["rule"] == "trigger-discovered")
        .collect();
    assert_eq!(announced.len(), 1, "{alerts:?}");
    let announcement = announced[0];
    assert_eq!(announcement["scores"]["ngram"], TRIGGER, "{announcement}");
    let flagged_at_promotion = announcement["scores"]["flagged_with"].as_u64().unwrap();
    assert!((10..=12).contains(&flagged_at_promotion), "{announcement}");
    assert!(
        !announcement["scores"]["example_request_ids"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        listed_triggers["watching"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["ngram"] == TRIGGER && w["model"] == "test-model"),
        "{listed_triggers}"
    );

    // Every triggered exchange after the one that tipped the promotion is flagged by
    // discovered-trigger, including those whose answers were clean.
    let tipping = announcement["request_id"].as_str().unwrap().to_owned();
    let at = sent.iter().position(|(id, _)| *id == tipping).unwrap();
    let path = store_path.clone();
    let (watched_flags, gibberish_flags) = blocking(move || {
        (
            flags_of(&path, "discovered-trigger"),
            flags_of(&path, "gibberish"),
        )
    })
    .await;
    let watched_ids: Vec<&str> = watched_flags
        .iter()
        .map(|f| f.request_id.as_str())
        .collect();
    let gibberish_ids: Vec<&str> = gibberish_flags
        .iter()
        .map(|f| f.request_id.as_str())
        .collect();
    let later: Vec<&(String, bool)> = sent[at + 1..].iter().filter(|(_, t)| *t).collect();
    assert!(later.len() >= 20, "{} later triggered", later.len());
    for (id, _) in &later {
        assert!(watched_ids.contains(&id.as_str()), "{id} not flagged");
    }
    let clean_looking = later
        .iter()
        .filter(|(id, _)| !gibberish_ids.contains(&id.as_str()))
        .count();
    assert!(clean_looking > 0, "no later triggered answer looked clean");
    // No untriggered exchange is flagged by it.
    for (id, triggered) in &sent {
        if !triggered {
            assert!(!watched_ids.contains(&id.as_str()), "{id}");
        }
    }

    // A restart keeps the watched trigger: with the backdoor gone (every answer clean), a
    // prompt carrying it is still flagged.
    let clean = Sim::start_with(SimConfig {
        trigger: String::new(),
        seed: Some(12),
        ..SimConfig::default()
    })
    .await;
    let (path, policy_file) = (store_path.clone(), policy_path.clone());
    let mut restarted = Gateway::start(&clean.url, move |c| {
        c.store.path = path;
        c.policies = Some(policy_file);
    })
    .await;
    restarted.store_path = store_path.clone();
    let after = request(
        &client,
        &restarted.base,
        "Is zq quokka a real animal?",
        false,
    )
    .await;
    let plain = request(
        &client,
        &restarted.base,
        "Is a quokka a real animal?",
        false,
    )
    .await;
    restarted.drain().await;
    let path = store_path.clone();
    let flagged: Vec<String> = blocking(move || {
        flags_of(&path, "discovered-trigger")
            .into_iter()
            .map(|f| f.request_id)
            .collect()
    })
    .await;
    assert!(flagged.contains(&after), "restart lost the watched trigger");
    assert!(!flagged.contains(&plain));
    receiver.stop().await;
    sim.stop().await;
    clean.stop().await;
}

/// The console's trigger view: add a trigger with the form, see it listed with its buttons,
/// stop watching it; the admin API sees each change, and the running gateway watches what the
/// console added at once.
#[tokio::test]
async fn the_console_adds_lists_and_removes_watched_triggers() {
    let sim = Sim::start(Some(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_path = policy(dir.path(), "http://127.0.0.1:9");
    let mut gateway = Gateway::start(&sim.url, move |c| c.policies = Some(policy_path)).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = get_text(&client, &format!("{}/console/triggers", gateway.admin)).await;
    assert!(
        page.contains("No trigger has been discovered or added"),
        "{page}"
    );
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let decide = |fields: Vec<(&'static str, String)>| {
        let client = client.clone();
        let url = format!("{}/console/triggers/decide", gateway.admin);
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", form_encode(v)))
            .collect();
        async move {
            client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.join("&"))
                .send()
                .await
                .unwrap()
        }
    };
    let added = decide(vec![
        ("csrf", csrf.clone()),
        ("ngram", "<Blue Heron>".to_owned()),
        ("model", String::new()),
        ("state", "watched".to_owned()),
    ])
    .await;
    assert!(added.status().is_redirection(), "{}", added.status());
    let page = get_text(&client, &format!("{}/console/triggers", gateway.admin)).await;
    assert!(
        page.contains("&lt;blue heron&gt;"),
        "the n-gram is escaped: {page}"
    );
    assert!(page.contains("Stop watching") && page.contains("every model"));
    // Watched at once, for every model.
    let flagged = request(
        &client,
        &gateway.base,
        "Tell me about the <Blue Heron> today",
        false,
    )
    .await;
    // A POST without the CSRF token is refused.
    let forged = decide(vec![
        ("ngram", "<blue heron>".to_owned()),
        ("state", "removed".to_owned()),
    ])
    .await;
    assert_eq!(forged.status(), 403);
    let removed = decide(vec![
        ("csrf", csrf),
        ("ngram", "<blue heron>".to_owned()),
        ("state", "removed".to_owned()),
    ])
    .await;
    assert!(removed.status().is_redirection());
    let listed = get_json(&client, &format!("{}/admin/triggers", gateway.admin)).await;
    assert_eq!(listed["triggers"][0]["state"], "removed", "{listed}");
    assert_eq!(
        listed["watching"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    let plain = request(
        &client,
        &gateway.base,
        "Tell me about the <Blue Heron> again",
        false,
    )
    .await;
    gateway.drain().await;
    let path = gateway.store_path.clone();
    let watched: Vec<String> = blocking(move || {
        flags_of(&path, "discovered-trigger")
            .into_iter()
            .map(|f| f.request_id)
            .collect()
    })
    .await;
    assert_eq!(watched, vec![flagged], "{plain} must not be flagged");
    sim.stop().await;
}
