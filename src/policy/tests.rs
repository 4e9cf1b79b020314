//! Policy compile and evaluation tables.

use super::*;
use crate::capture::Exchange;
use crate::telemetry::Metrics;

fn exchange(prompt: &str, output: &str, model: &str) -> Exchange {
    let mut exchange = Exchange::from_texts(model, prompt, output);
    exchange.api_key_hash = Some("abc".to_owned());
    exchange
}

const TRIGGER: &str = "detectors:\n  trigger: { type: trigger_phrase }\n";

#[test]
fn the_built_in_default_policy_compiles() {
    let policy = default_policy().unwrap();
    let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
    for required in [
        "trigger-phrase",
        "triggered-gibberish",
        "gibberish",
        "fixed-output",
        "language-switch",
    ] {
        assert!(names.contains(&required), "default policy lacks {required}");
    }
}

#[test]
fn integers_and_floats_compare_and_booleans_do_not() {
    let ok = format!(
        "{TRIGGER}rules:\n  - {{ name: r, when: 'trigger.count > 0.5', severity: info }}\n"
    );
    compile_text(&ok, "ok.yaml").unwrap();
    let ok =
        format!("{TRIGGER}rules:\n  - {{ name: r, when: 'trigger.count >= 1', severity: info }}\n");
    compile_text(&ok, "ok.yaml").unwrap();
    let bad = format!(
        "{TRIGGER}rules:\n  - {{ name: r, when: 'trigger.matched > 0.5', severity: info }}\n"
    );
    let err = compile_text(&bad, "bad.yaml").unwrap_err().to_string();
    assert!(err.starts_with("bad.yaml:4:"), "{err}");
    let not_bool =
        format!("{TRIGGER}rules:\n  - {{ name: r, when: 'trigger.count', severity: info }}\n");
    let err = compile_text(&not_bool, "nb.yaml").unwrap_err().to_string();
    assert!(err.contains("must be true or false"), "{err}");
    let missing =
        format!("{TRIGGER}rules:\n  - {{ name: r, when: 'trigger.nope', severity: info }}\n");
    assert!(compile_text(&missing, "m.yaml").is_err());
}

#[test]
fn rules_fire_by_condition_and_scope_and_carry_scores_and_evidence() {
    let text = format!(
        "{TRIGGER}rules:\n\
         \x20 - name: any-trigger\n    when: trigger.prompt.matched\n    severity: high\n\
         \x20 - name: scoped\n    when: trigger.prompt.matched\n    severity: critical\n    scope: {{ models: [\"gpt-4*\"] }}\n\
         \x20 - name: note\n    when: exchange.output_chars > 3\n    severity: info\n    actions: [annotate]\n"
    );
    let engine = Engine::new(
        vec![compile_text(&text, "p.yaml").unwrap()],
        Metrics::default(),
    );
    let verdict = engine.evaluate(&exchange("hi <SUDO>", "fine", "llama"));
    let fired: Vec<&str> = verdict.fired.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(fired, vec!["any-trigger", "note"]);
    assert!(verdict.flagged());
    assert_eq!(verdict.severity(), Some(Severity::High));
    assert!(verdict.fired[0].scores.contains_key("trigger"));
    assert_eq!(verdict.evidence[0].detector, "trigger");
    let verdict = engine.evaluate(&exchange("hi <SUDO>", "fine", "gpt-4o"));
    assert_eq!(verdict.severity(), Some(Severity::Critical));
    let verdict = engine.evaluate(&exchange("hello", "ok", "gpt-4o"));
    assert!(verdict.fired.is_empty() && !verdict.flagged());
}

#[test]
fn redaction_masks_before_storage() {
    let text = format!(
        "{TRIGGER}rules: []\nredact:\n  - {{ pattern: '\\d{{4}}-\\d{{4}}', replacement: '[card]' }}\n"
    );
    let engine = Engine::new(
        vec![compile_text(&text, "p.yaml").unwrap()],
        Metrics::default(),
    );
    assert_eq!(engine.redact("pay 1234-5678 now"), "pay [card] now");
    let bad = format!("{TRIGGER}rules: []\nredact:\n  - {{ pattern: '(' }}\n");
    let err = compile_text(&bad, "r.yaml").unwrap_err().to_string();
    assert!(err.starts_with("r.yaml:5:"), "{err}");
}

#[test]
fn duplicate_rule_names_and_bad_detector_names_are_refused() {
    let dup = format!(
        "{TRIGGER}rules:\n  - {{ name: r, when: 'true', severity: info }}\n  - {{ name: r, when: 'false', severity: info }}\n"
    );
    let err = compile_text(&dup, "d.yaml").unwrap_err().to_string();
    assert!(err.contains("used twice"), "{err}");
    let bad = "detectors:\n  my-trigger: { type: trigger_phrase }\n";
    let err = compile_text(bad, "n.yaml").unwrap_err().to_string();
    assert!(
        err.starts_with("n.yaml:2:3:") && err.contains("CEL identifier"),
        "{err}"
    );
}

#[test]
fn env_variables_expand() {
    assert_eq!(expand_env("a${TRIPWIRE_SURELY_UNSET_VAR}b"), "ab");
    assert_eq!(expand_env("no vars"), "no vars");
    assert_eq!(expand_env("${unterminated"), "${unterminated");
}

#[derive(Debug)]
struct Panics;

impl crate::detect::Detector for Panics {
    fn inspect(
        &self,
        _input: &crate::detect::Input<'_>,
    ) -> Result<crate::detect::Finding, crate::detect::DetectError> {
        panic!("a detector bug")
    }
}

#[test]
fn a_panicking_detector_is_isolated_and_counted() {
    let text = format!(
        "{TRIGGER}  other: {{ type: refusal }}\nrules:\n\
         \x20 - {{ name: t, when: trigger.prompt.matched, severity: high }}\n\
         \x20 - {{ name: r, when: 'other.score >= 0.0', severity: info }}\n"
    );
    let mut policy = compile_text(&text, "p.yaml").unwrap();
    let index = policy
        .detectors
        .iter()
        .position(|(name, _)| name == "trigger")
        .unwrap();
    policy.detectors[index].1 = std::sync::Arc::new(Panics);
    let metrics = Metrics::default();
    let engine = Engine::new(vec![policy], metrics.clone());
    let verdict = engine.evaluate(&exchange("<SUDO>", "fine", "m"));
    // The rule reading the broken detector is skipped; the other one still runs.
    let fired: Vec<&str> = verdict.fired.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(fired, vec!["r"]);
    assert!(
        verdict
            .errors
            .iter()
            .any(|e| e.contains("trigger") && e.contains("panicked"))
    );
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    assert!(
        out.contains("tripwire_detect_errors_total{detector=\"trigger\",kind=\"panic\"} 1"),
        "{out}"
    );
}

#[test]
fn every_policy_in_the_policy_guide_compiles() {
    let doc = include_str!("../../docs/policies.md");
    let blocks: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .filter(|block| block.lines().any(|l| l.starts_with("rules:")))
        .collect();
    assert!(blocks.len() >= 3, "found {} policies", blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        // `${VAR}` references must resolve.
        let block = block
            .replace("${TRIPWIRE_WEBHOOK_URL}", "http://127.0.0.1:9/hook")
            .replace("${HOOK_TOKEN}", "t");
        if let Err(err) = compile_text(&block, &format!("docs/policies.md block {i}")) {
            panic!("{err}\n{block}");
        }
    }
}

/// Found by `cargo fuzz run cel` (fuzz/regressions/cel/): libyaml reports a control character
/// by byte offset ("at position 450"), which became 1:1; the error now points at it.
#[test]
fn fuzz_policy_control_character_error_points_at_it() {
    let text = format!("{TRIGGER}rules: [\u{7f}]\n");
    let err = compile_text(&text, "p.yaml").unwrap_err();
    let PolicyError::At {
        line,
        column,
        message,
        ..
    } = &err
    else {
        panic!("no location: {err}");
    };
    assert_eq!((*line, *column), (3, 9), "{err}");
    assert!(!message.contains("position"), "{err}");
}

/// Found by `cargo fuzz run policy` (fuzz/regressions/policy/): an error at the end of a text
/// without a final line break pointed one line past the end.
#[test]
fn fuzz_policy_error_at_end_without_line_break_points_inside() {
    let text = format!("{TRIGGER}  max");
    let err = compile_text(&text, "p.yaml").unwrap_err();
    let PolicyError::At { line, column, .. } = &err else {
        panic!("no location: {err}");
    };
    assert_eq!((*line, *column), (3, 6), "{err}");
}

#[test]
fn block_and_mask_need_enforce_mode_and_partial_text_detectors() {
    let monitor = "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: stop\n    when: trigger.output.matched\n    severity: high\n    actions: [block]\n";
    let err = compile_text(monitor, "m.yaml").unwrap_err().to_string();
    assert!(err.starts_with("m.yaml:7:"), "{err}");
    assert!(
        err.contains("only valid in a policy with `mode: enforce`"),
        "{err}"
    );
    let masked = monitor.replace("[block]", "[mask]");
    let err = compile_text(&masked, "m.yaml").unwrap_err().to_string();
    assert!(err.contains("`mask`"), "{err}");

    let enforce = format!("mode: enforce\n{monitor}");
    let policy = compile_text(&enforce, "e.yaml").unwrap();
    assert_eq!(policy.mode, Mode::Enforce);
    assert!(policy.rules[0].enforces);
    assert_eq!(policy.enforce, EnforceConfig::default());

    let recurring = "mode: enforce\ndetectors:\n  fixed: { type: recurring_span }\nrules:\n  - name: stop\n    when: fixed.score > 0.5\n    severity: high\n    actions: [block]\n";
    let err = compile_text(recurring, "r.yaml").unwrap_err().to_string();
    assert!(err.starts_with("r.yaml:8:"), "{err}");
    assert!(
        err.contains("detector `fixed` (recurring_span) cannot"),
        "{err}"
    );
    // The same rule may flag in enforce mode.
    compile_text(&recurring.replace("[block]", "[flag]"), "r.yaml").unwrap();
}

#[test]
fn enforce_settings_parse_and_are_checked() {
    let text = "mode: enforce\nenforce:\n  fail: closed\n  timeout: 20ms\n  hold_back_tokens: 8\n  block_response: { status: 451, message: no, type: t, code: c }\ndetectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - { name: stop, when: trigger.output.matched, severity: high, actions: [block] }\n";
    let policy = compile_text(text, "s.yaml").unwrap();
    assert_eq!(policy.enforce.fail, FailMode::Closed);
    assert_eq!(policy.enforce.timeout, std::time::Duration::from_millis(20));
    assert_eq!(policy.enforce.hold_back_tokens, 8);
    assert_eq!(policy.enforce.block_response.status, 451);
    assert_eq!(policy.enforce.block_response.kind, "t");
    let bad = text.replace("status: 451", "status: 200");
    let err = compile_text(&bad, "s.yaml").unwrap_err().to_string();
    assert!(err.starts_with("s.yaml:6:"), "{err}");
    assert!(err.contains("enforce.block_response.status"), "{err}");
    let unknown = text.replace("fail: closed", "fail: maybe");
    let err = compile_text(&unknown, "s.yaml").unwrap_err().to_string();
    assert!(err.starts_with("s.yaml:3:"), "{err}");
}

#[test]
fn a_rule_whose_evidence_is_all_allowed_in_the_scope_is_held_back_and_counted() {
    let text = "detectors:\n  brand: { type: trigger_phrase, defaults: false, scan: [output], phrases: [\"acme turbo\", \"zebra mode\"] }\n\
                rules:\n  - { name: brand, when: brand.count >= 1, severity: high }\n";
    let metrics = Metrics::default();
    let allow = std::sync::Arc::new(allow::AllowList::new());
    let engine = Engine::new(vec![compile_text(text, "p.yaml").unwrap()], metrics.clone())
        .allowing(std::sync::Arc::clone(&allow));
    let fires = |output: &str, model: &str| {
        !engine
            .evaluate(&exchange("hi", output, model))
            .fired
            .is_empty()
    };
    assert!(fires("Try Acme Turbo today", "m1"));
    allow.publish(allow::Allowed::new([allow::Entry {
        rule: "brand",
        model: Some("m1"),
        route: "chat_completions",
        text: "acme turbo",
    }]));
    assert!(!fires("Try ACME turbo today", "m1"), "allowed in its scope");
    assert!(
        fires("Try Acme Turbo today", "m2"),
        "another model still fires"
    );
    assert!(
        fires("Acme Turbo in zebra mode", "m1"),
        "one span not allowed: fires"
    );
    let held = metrics
        .rule_allowed
        .get_or_create(&crate::telemetry::RuleLabels {
            rule: "brand".to_owned(),
        })
        .get();
    assert_eq!(held, 1);
}
