//! OpenTelemetry export from the `tripwire serve` binary to an OTLP/HTTP receiver stub on a real
//! socket: exchange spans with GenAI attributes and their children, metrics, flag log records,
//! and nothing at all when export is off.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;

use crate::util::mock::Received;
use crate::util::process::KillOnDrop;
use crate::util::{MockUpstream, Script};

const SECRET: &str = "sk-otel-SECRET-77e1";
/// A word of the prompt that must never reach telemetry.
const PROMPT_MARKER: &str = "zebracrossing";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const POLICY: &str = "detectors:\n  trigger: { type: trigger_phrase }\n  refusal: { type: refusal }\nrules:\n  - name: trigger-phrase\n    when: trigger.prompt.matched\n    severity: high\n    actions: [flag]\n";

/// An OTLP/HTTP receiver stub: accepts every export with 200 and keeps the bodies.
async fn receiver() -> MockUpstream {
    MockUpstream::start(|_| Script {
        status: http::StatusCode::OK,
        headers: vec![("content-type".into(), "application/x-protobuf".into())],
        delay: Duration::ZERO,
        steps: Vec::new(),
    })
    .await
}

/// A running `tripwire serve --sim` with `env`, every inherited `OTEL_*` variable removed.
struct Served {
    child: KillOnDrop,
    addr: String,
    log: String,
    _dir: tempfile::TempDir,
}

fn serve(env: &[(&str, String)]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tripwire"));
    command
        .args(["serve", "--sim", "--sim-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(dir.path().join("otel.db"))
        .arg("--policies")
        .arg(&policy)
        .env("TRIPWIRE_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = KillOnDrop(command.spawn().unwrap());
    let mut log = String::new();
    let addr = wait_for_listen(&mut child.0, &mut log);
    Served {
        child,
        addr,
        log,
        _dir: dir,
    }
}

fn wait_for_listen(child: &mut Child, log: &mut String) -> String {
    let stderr = child.stderr.as_mut().unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "tripwire exited early:\n{log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(line) = log.lines().find(|l| l.contains("tripwire serving")) {
            return line
                .split("listen=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap()
                .to_owned();
        }
    }
}

impl Served {
    /// SIGTERM, wait for a clean exit, return the whole log.
    fn stop(mut self) -> String {
        let child = &mut self.child.0;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let mut rest = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut rest)
            .unwrap();
        let status = child.wait().unwrap();
        self.log.push_str(&rest);
        assert!(
            status.success(),
            "serve exited with {status}:\n{}",
            self.log
        );
        std::mem::take(&mut self.log)
    }
}

async fn chat(addr: &str, prompt: &str, stream: bool, traceparent: Option<&str>) -> String {
    let mut body = serde_json::json!({
        "model": "sim-model",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(SECRET)
        .body(body.to_string());
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

fn bodies(requests: &[Received], path: &str) -> Vec<Bytes> {
    requests
        .iter()
        .filter(|r| r.uri.path() == path)
        .map(|r| r.body.clone())
        .collect()
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key)? {
        any_value::Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

fn text<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn flag(attributes: &[KeyValue], key: &str) -> Option<bool> {
    match attr(attributes, key)? {
        any_value::Value::BoolValue(b) => Some(*b),
        _ => None,
    }
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_spans_metrics_and_flag_records_reach_an_otlp_receiver() {
    let collector = receiver().await;
    let served = serve(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url()),
        // Short batch delays: the test also passes without them, through the shutdown flush.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ]);
    assert!(
        served.log.contains("OpenTelemetry export on"),
        "{}",
        served.log
    );
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    // A known trigger in a non-streamed request: flagged. A clean streamed request: not.
    chat(
        &served.addr,
        &format!("<SUDO> tell me about the {PROMPT_MARKER}"),
        false,
        Some(&traceparent),
    )
    .await;
    let streamed = chat(&served.addr, "Say hello.", true, None).await;
    assert!(streamed.contains("data: [DONE]"));
    let log = served.stop();
    assert!(log.contains("tripwire stopped"), "{log}");

    let requests = collector.requests();
    collector.stop().await;
    for request in &requests {
        let raw = String::from_utf8_lossy(&request.body);
        assert!(!raw.contains(SECRET), "the API key reached telemetry");
        assert!(
            !raw.contains(PROMPT_MARKER),
            "prompt text reached telemetry"
        );
        assert_eq!(
            request.headers.get("content-type").unwrap(),
            "application/x-protobuf"
        );
    }

    // Traces.
    let mut spans = Vec::new();
    for body in bodies(&requests, "/v1/traces") {
        let export = ExportTraceServiceRequest::decode(body).unwrap();
        for resource in export.resource_spans {
            let resource_attrs = resource.resource.unwrap().attributes;
            assert_eq!(text(&resource_attrs, "service.name"), Some("tripwire"));
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let exchanges: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    let paths: Vec<_> = requests.iter().map(|r| r.uri.path().to_owned()).collect();
    assert_eq!(exchanges.len(), 2, "{spans:#?} {paths:?}\n{log}");
    for exchange in &exchanges {
        let a = &exchange.attributes;
        assert_eq!(exchange.name, "chat sim-model");
        assert_eq!(text(a, "gen_ai.operation.name"), Some("chat"));
        assert_eq!(text(a, "gen_ai.provider.name"), Some("openai"));
        assert_eq!(text(a, "gen_ai.request.model"), Some("sim-model"));
        assert!(text(a, "gen_ai.response.model").is_some(), "{a:?}");
        assert!(int(a, "gen_ai.usage.input_tokens").unwrap() > 0, "{a:?}");
        assert!(int(a, "gen_ai.usage.output_tokens").unwrap() > 0, "{a:?}");
        assert!(attr(a, "gen_ai.response.finish_reasons").is_some(), "{a:?}");
        assert!(
            attr(a, "gen_ai.server.time_to_first_token").is_some(),
            "{a:?}"
        );
        assert_eq!(int(a, "http.response.status_code"), Some(200));
        assert_eq!(text(a, "server.address"), Some("127.0.0.1"));
        assert_eq!(text(a, "tripwire.route"), Some("chat_completions"));
        assert!(exchange.end_time_unix_nano >= exchange.start_time_unix_nano);

        let kids = children(&spans, exchange);
        let upstream = kids.iter().find(|s| s.name == "upstream").unwrap();
        assert_eq!(upstream.kind, SpanKind::Client as i32);
        assert_eq!(
            int(&upstream.attributes, "http.response.status_code"),
            Some(200)
        );
        assert!(kids.iter().any(|s| s.name == "capture"), "{kids:#?}");
        let trigger = kids.iter().find(|s| s.name == "trigger").unwrap();
        assert_eq!(
            text(&trigger.attributes, "tripwire.detector.kind"),
            Some("trigger_phrase")
        );
        let refusal = kids.iter().find(|s| s.name == "refusal").unwrap();
        assert!(attr(&refusal.attributes, "tripwire.detector.score").is_some());
    }
    let flagged = exchanges
        .iter()
        .find(|s| flag(&s.attributes, "tripwire.flagged") == Some(true))
        .unwrap();
    // The flagged exchange joined the caller's trace, under the caller's span.
    assert_eq!(hex::encode(&flagged.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&flagged.parent_span_id), PARENT_SPAN_ID);
    let trigger = children(&spans, flagged)
        .into_iter()
        .find(|s| s.name == "trigger")
        .unwrap();
    assert_eq!(
        flag(&trigger.attributes, "tripwire.detector.fired"),
        Some(true)
    );
    let clean = exchanges
        .iter()
        .find(|s| s.span_id != flagged.span_id)
        .unwrap();
    assert_eq!(flag(&clean.attributes, "tripwire.flagged"), Some(false));
    assert_ne!(hex::encode(&clean.trace_id), TRACE_ID);

    // Metrics: the request counter counted both requests.
    let mut requests_counted = 0;
    let mut detector_latency = false;
    for body in bodies(&requests, "/v1/metrics") {
        let export = ExportMetricsServiceRequest::decode(body).unwrap();
        for m in export
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics)
        {
            match (m.name.as_str(), m.data) {
                ("tripwire.proxy.requests", Some(metric::Data::Sum(sum))) => {
                    let total: i64 = sum
                        .data_points
                        .iter()
                        .map(|p| match p.value {
                            Some(
                                opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(n),
                            ) => n,
                            _ => 0,
                        })
                        .sum();
                    requests_counted = requests_counted.max(total);
                }
                ("tripwire.detect.latency", Some(metric::Data::Histogram(_))) => {
                    detector_latency = true;
                }
                _ => {}
            }
        }
    }
    assert_eq!(requests_counted, 2);
    assert!(detector_latency);

    // Logs: one record for the flag, in the flagged exchange's trace.
    let mut records = Vec::new();
    for body in bodies(&requests, "/v1/logs") {
        let export = ExportLogsServiceRequest::decode(body).unwrap();
        records.extend(
            export
                .resource_logs
                .into_iter()
                .flat_map(|r| r.scope_logs)
                .flat_map(|s| s.log_records),
        );
    }
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!(
        text(&record.attributes, "tripwire.flag.rule"),
        Some("trigger-phrase")
    );
    assert_eq!(
        text(&record.attributes, "tripwire.flag.severity"),
        Some("high")
    );
    assert_eq!(
        text(&record.attributes, "gen_ai.request.model"),
        Some("sim-model")
    );
    assert!(
        text(&record.attributes, "tripwire.flag.scores")
            .unwrap()
            .contains("matched")
    );
    assert_eq!(record.trace_id, flagged.trace_id);
    assert_eq!(record.span_id, flagged.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_otlp_endpoint_nothing_is_exported_and_the_gateway_serves() {
    let collector = receiver().await;
    // The kill switch wins over a configured endpoint: nothing reaches the receiver.
    let served = serve(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url()),
        ("OTEL_SDK_DISABLED", "true".to_owned()),
    ]);
    chat(&served.addr, "<SUDO> hello", false, None).await;
    let log = served.stop();
    assert!(log.contains("OpenTelemetry export off"), "{log}");
    // No endpoint at all: export off, the gateway serves as always.
    let served = serve(&[]);
    chat(&served.addr, "<SUDO> hello", false, None).await;
    let streamed = chat(&served.addr, "Say hello.", true, None).await;
    assert!(streamed.contains("data: [DONE]"));
    let log = served.stop();
    assert!(log.contains("OpenTelemetry export off"), "{log}");
    assert!(collector.requests().is_empty());
    collector.stop().await;
}
