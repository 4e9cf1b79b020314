//! Labels feed back, end to end over real sockets: a flag labelled false positive through the
//! admin API allows its evidence for its rule and scope, so the same answer is not flagged
//! again for that model (another model still is); relabelled true positive through the store,
//! as `tripwire flags label` does, it fires again once the gateway's sync has read the store.

use std::time::Duration;

use tripwire::store::{FlagFilter, Review, Store};

use crate::util::{Gateway, MockUpstream, Script, blocking, get_text};

const ANSWER: &[u8] = br#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Welcome to Acme Turbo, the fastest way to ship."},"finish_reason":"stop"}]}"#;

fn policy(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        "detectors:\n  brand: { type: trigger_phrase, defaults: false, scan: [output], phrases: [\"acme turbo\"] }\n\
         rules:\n  - { name: brand-phrase, when: brand.count >= 1, severity: high, actions: [flag] }\n",
    )
    .unwrap();
    path
}

/// Sends the chat request for `model`; returns its request id.
async fn send(client: &reqwest::Client, gateway: &Gateway, model: &str) -> String {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is this product?"}],
    });
    let response = client
        .post(gateway.url("/v1/chat/completions"))
        .body(body.to_string())
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

/// (held back by the allow-list, flagged) for the rule, from the gateway's metrics.
async fn counts(gateway: &Gateway) -> (f64, f64) {
    let text = gateway.metrics().await;
    let value = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    (
        value("tripwire_policy_rule_allowed_total{rule=\"brand-phrase\"} "),
        value("tripwire_policy_flags_total{rule=\"brand-phrase\",severity=\"high\"} "),
    )
}

/// Sends one request for `model` and waits until the engine has judged it: it was either held
/// back or flagged. Returns its request id and whether it was flagged.
async fn judged(client: &reqwest::Client, gateway: &Gateway, model: &str) -> (String, bool) {
    let before = counts(gateway).await;
    let id = send(client, gateway, model).await;
    for _ in 0..400 {
        let now = counts(gateway).await;
        if now.1 > before.1 {
            return (id, true);
        }
        if now.0 > before.0 {
            return (id, false);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{id} was neither flagged nor held back");
}

#[tokio::test]
async fn a_false_positive_label_stops_the_same_answer_in_its_scope_until_relabelled() {
    let upstream = MockUpstream::start(|_| Script::json(ANSWER)).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_path = policy(dir.path());
    let mut gateway =
        Gateway::start(&upstream.url(), move |c| c.policies = Some(policy_path)).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    let (first, flagged) = judged(&client, &gateway, "model-a").await;
    assert!(flagged, "the answer is flagged before any label");
    // Wait for the flag to be written, then label it false positive through the admin API.
    let mut flag_id = None;
    for _ in 0..200 {
        let listed: serde_json::Value = serde_json::from_str(
            &get_text(
                &client,
                &format!("{}/admin/flags?policy=brand-phrase", gateway.admin),
            )
            .await,
        )
        .unwrap();
        flag_id = listed["flags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["request_id"] == first.as_str())
            .map(|f| f["id"].as_str().unwrap().to_owned());
        if flag_id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let flag_id = flag_id.expect("the flag reaches the store");
    let labelled = client
        .post(format!("{}/admin/flags/{flag_id}/label", gateway.admin))
        .body(r#"{"verdict": "false-positive", "note": "our product name"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(labelled.status(), 200);

    let (again, flagged) = judged(&client, &gateway, "model-a").await;
    assert!(!flagged, "the same false positive came back");
    let (other, flagged) = judged(&client, &gateway, "model-b").await;
    assert!(flagged, "another model's scope still fires");
    assert!(
        gateway
            .metrics()
            .await
            .contains("tripwire_policy_rule_allowed_total{rule=\"brand-phrase\"} 1")
    );

    // Relabelled true positive the way `tripwire flags label` does (the store, not the API):
    // the gateway's sync reads it within its interval and the rule fires again.
    let path = gateway.store_path.clone();
    let id = flag_id.clone();
    blocking(move || {
        Store::open_existing(&path)
            .unwrap()
            .label_flag(&id, Review::TruePositive, None)
            .unwrap()
            .unwrap();
    })
    .await;
    let mut refired = None;
    for _ in 0..40 {
        let (id, flagged) = judged(&client, &gateway, "model-a").await;
        if flagged {
            refired = Some(id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refired = refired.expect("the rule fires again after the true-positive relabel");

    gateway.drain().await;
    let path = gateway.store_path.clone();
    let flagged: Vec<String> = blocking(move || {
        Store::open_existing(&path)
            .unwrap()
            .list_flags(&FlagFilter {
                rule: Some("brand-phrase".to_owned()),
                limit: Some(1000),
                ..FlagFilter::default()
            })
            .unwrap()
            .into_iter()
            .map(|f| f.request_id)
            .collect()
    })
    .await;
    assert!(flagged.contains(&first) && flagged.contains(&other) && flagged.contains(&refired));
    assert!(!flagged.contains(&again), "{again} must not be flagged");
    upstream.stop().await;
}
