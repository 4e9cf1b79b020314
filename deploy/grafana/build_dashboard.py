#!/usr/bin/env python3
"""Writes tripwire-dashboard.json beside this script: the panels as data, so they stay uniform.

Run it after editing; tests/deploy.rs checks the JSON (and that every metric it names is one a
running gateway exports).
"""

import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def q(le_expr: str, quantile: float, by: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({labels}) (rate({le_expr}[{RI}])))"


def panel(title, unit, targets, description, kind="timeseries", width=12):
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]}}
        if kind == "timeseries"
        else {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
        "_width": width,
    }


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


PANELS = [
    row("Traffic"),
    panel("Requests by route and status", "reqps",
          [(f"sum by (route, status) (rate(tripwire_proxy_requests_total[{RI}]))", "{{route}} {{status}}")],
          "Requests answered by the gateway, per second."),
    panel("In-flight requests and gateway errors", "short",
          [("sum(tripwire_proxy_in_flight_requests)", "in flight"),
           (f"sum by (reason) (rate(tripwire_proxy_gateway_errors_total[{RI}]))", "errors/s {{reason}}")],
          "Requests being served now; error answers the gateway made itself (413, 502, 504) per second."),
    panel("Upstream latency (request sent to headers)", "s",
          [(q("tripwire_proxy_upstream_latency_seconds_bucket", 0.5), "p50"),
           (q("tripwire_proxy_upstream_latency_seconds_bucket", 0.99), "p99"),
           (q("tripwire_proxy_ttfb_seconds_bucket", 0.99), "time to first byte p99")],
          "The model's own latency as the gateway sees it."),
    panel("Gateway overhead", "s",
          [(q("tripwire_proxy_overhead_seconds_bucket", 0.5), "p50"),
           (q("tripwire_proxy_overhead_seconds_bucket", 0.99), "p99"),
           (q("tripwire_proxy_overhead_seconds_bucket", 0.999), "p99.9")],
          "Total time minus time waiting on the upstream: what the gateway adds. The one to watch."),
    row("Detection"),
    panel("Detector latency p99", "s",
          [(q("tripwire_detect_latency_seconds_bucket", 0.99, "detector"), "{{detector}}")],
          "Time one detector takes on one exchange, off the request path."),
    panel("Exchanges inspected, shed and failing", "short",
          [(f"sum(rate(tripwire_detect_exchanges_total[{RI}]))", "inspected/s"),
           (f"sum(rate(tripwire_detect_shed_total[{RI}]))", "shed/s (stored uninspected)"),
           (f"sum by (detector, kind) (rate(tripwire_detect_errors_total[{RI}]))", "{{detector}} {{kind}}/s")],
          "Shed exchanges mean detection is saturated: raise detect.workers or detect.queue."),
    panel("Flags by rule and severity", "short",
          [(f"sum by (rule, severity) (increase(tripwire_policy_flags_total[{RI}]))", "{{rule}} ({{severity}})")],
          "Flags raised per interval."),
    panel("Alerts sent, dropped, suppressed", "short",
          [(f"sum by (reason) (increase(tripwire_alert_sent_total[{RI}]))", "sent {{reason}}"),
           (f"sum by (reason) (increase(tripwire_alert_dropped_total[{RI}]))", "dropped {{reason}}"),
           (f"sum(increase(tripwire_alert_suppressed_total[{RI}]))", "suppressed by cooldown")],
          "Alert deliveries per interval, by sink; dropped alerts never reached their sink."),
    row("Queues and store"),
    panel("Queue depths", "short",
          [("max(tripwire_detect_queue_depth)", "detect"),
           ("max(tripwire_store_queue_depth)", "store")],
          "Exchanges waiting for the detectors and for the store writer (bounded: detect.queue, store.queue)."),
    panel("Store writes and drops", "short",
          [(f"sum(rate(tripwire_store_rows_written_total[{RI}]))", "written/s"),
           (f"sum by (reason) (rate(tripwire_store_dropped_total[{RI}]))", "dropped/s {{reason}}"),
           (f"sum(rate(tripwire_capture_dropped_chunks_total[{RI}]))", "capture chunks dropped/s")],
          "Rows that reached SQLite, and what was lost on the way."),
    panel("Store batch time p99", "s",
          [(q("tripwire_store_batch_seconds_bucket", 0.99), "p99"),
           (q("tripwire_store_batch_seconds_bucket", 0.5), "p50")],
          "Time to write one batch (one transaction)."),
    panel("Captured exchanges by outcome", "short",
          [(f"sum by (route, outcome) (rate(tripwire_capture_exchanges_total[{RI}]))", "{{route}} {{outcome}}")],
          "Exchanges captured per second, by how they ended."),
    row("Embedding and drift"),
    panel("Embedding batch size", "short",
          [(q("tripwire_embed_batch_size_bucket", 0.5), "p50"),
           (q("tripwire_embed_batch_size_bucket", 0.99), "p99"),
           (f"sum(rate(tripwire_embed_batch_size_sum[{RI}])) / sum(rate(tripwire_embed_batch_size_count[{RI}]))", "mean")],
          "Texts per embedding batch (inference.max_batch caps it)."),
    panel("Embedding time", "s",
          [(q("tripwire_embed_inference_seconds_bucket", 0.99), "inference p99"),
           (q("tripwire_embed_queue_wait_seconds_bucket", 0.99), "queue wait p99"),
           (f"sum(rate(tripwire_embed_shed_total[{RI}]))", "shed/s")],
          "Time to tokenise and run one batch, and the time a text waits for its batch."),
    panel("Drift statistic vs threshold", "short",
          [("max by (detector, model, route, test) (tripwire_drift_statistic)", "{{detector}} {{model}} {{route}} {{test}}"),
           ("max by (detector, model, route, test) (tripwire_drift_threshold)", "threshold {{detector}} {{model}} {{route}} {{test}}")],
          "Each drift test's latest statistic and its calibrated alarm threshold: an alarm fires when the statistic crosses it."),
    panel("Drift: statistic / threshold", "percentunit",
          [("max by (detector, model, route, test) (tripwire_drift_statistic / tripwire_drift_threshold)", "{{detector}} {{model}} {{route}} {{test}}")],
          "How close each test is to alarming (1 = at the threshold)."),
    panel("Drift alarms, p-values, sampling", "short",
          [(f"sum by (detector, model, route) (increase(tripwire_drift_alarms_total[{RI}]))", "alarms {{detector}} {{model}} {{route}}"),
           ("min by (detector, model, route) (tripwire_drift_p_value)", "min p-value {{detector}} {{model}} {{route}}"),
           ("max by (model, route) (tripwire_drift_sample_rate)", "sample rate {{model}} {{route}}"),
           (f"sum by (reason) (rate(tripwire_drift_shed_total[{RI}]))", "not tested/s {{reason}}")],
          "Alarms raised, the smallest p-value per scope (small means drift), the embedding sample rate in force, and exchanges not tested."),
    panel("Drift reference learned", "short",
          [("max by (detector, model, route) (tripwire_drift_reference_size)", "{{detector}} {{model}} {{route}}")],
          "Reference observations learned so far per scope; tests start once the reference is full."),
]


def layout(panels):
    out, x, y, next_id = [], 0, 0, 1
    for p in panels:
        p = dict(p)
        p["id"] = next_id
        next_id += 1
        if p["type"] == "row":
            if x:
                x, y = 0, y + 8
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
        else:
            w = p.pop("_width")
            if x + w > 24:
                x, y = 0, y + 8
            p["gridPos"] = {"h": 8, "w": w, "x": x, "y": y}
            x += w
        out.append(p)
    return out


DASHBOARD = {
    "uid": "tripwire",
    "title": "tripwire",
    "description": "tripwire gateway: traffic, overhead, detection, flags, alerts, store, embedding and drift.",
    "tags": ["tripwire", "llm", "gateway"],
    "timezone": "browser",
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-6h", "to": "now"},
    "templating": {
        "list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0},
        ]
    },
    "annotations": {"list": []},
    "panels": layout(PANELS),
}

if __name__ == "__main__":
    target = pathlib.Path(__file__).resolve().parent / "tripwire-dashboard.json"
    target.write_text(json.dumps(DASHBOARD, indent=2) + "\n")
    print(f"wrote {target}")
