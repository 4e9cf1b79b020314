//! The drift evaluation in small (`make eval-drift` runs it in full): leave-one-model-out
//! clean streams through the gateway's sampler at two arrival rates, and topic-slant streams.

use tripwire::infer::{EmbedderConfig, Truncation};
use tripwire::lab::drift_replay::{ArrivalRate, DriftEvalOptions, run};

fn options() -> DriftEvalOptions {
    DriftEvalOptions {
        data_dir: "data".into(),
        // Two of the report models: nothing in the default policy was fitted on them.
        models: vec!["gemma-7b-it".to_owned(), "gpt-3.5-turbo-1106".to_owned()],
        lomo: true,
        swaps: Vec::new(),
        seeds: 1,
        clean: 1_500,
        warm: 500,
        horizon: 0,
        injection_rate: 0.0,
        rates: vec![ArrivalRate::Every, ArrivalRate::Steady(1.0)],
        slant_seeds: 0,
        slant_horizon: 300,
        slant_topics: Vec::new(),
        changes: false,
        embedder: EmbedderConfig {
            intra_threads: 1,
            max_tokens: 256,
            truncation: Truncation::HeadTail,
            ..EmbedderConfig::default()
        },
        cache_dir: "target/drift-eval".into(),
        threads: 2,
    }
}

#[test]
fn clean_streams_of_held_out_models_raise_no_drift_alarm_at_any_arrival_rate() {
    let results = run(&options(), tripwire::policy::DEFAULT_POLICY).unwrap();
    // 2 models × 1 seed × 2 rates.
    assert_eq!(results.len(), 4, "{results:?}");
    for result in &results {
        assert_eq!(result.scenario, "clean");
        assert_eq!(result.exchanges_before, 1_500);
        assert_eq!(
            result.false_alarms, 0,
            "{} at {}: {:?}",
            result.model, result.rate, result.false_alarm_tests
        );
    }
    // Every exchange embedded: the embedding tests ran on all 1,500; at 1/s (sample rate 10%)
    // on the few sampled after their reference.
    let every = results
        .iter()
        .find(|r| r.rate == ArrivalRate::Every.to_string())
        .unwrap();
    assert_eq!(every.embedded_before, 1_500);
    let sampled = results.iter().find(|r| r.rate == "1/s").unwrap();
    assert!(sampled.embedded_before < 200, "{}", sampled.embedded_before);
}

#[test]
fn a_slant_stream_raises_no_alarm_before_its_change_and_maps_its_topic() {
    // Whether the slant is caught is measured by `make eval-drift` (docs/detection.md: the
    // per-topic tests do not yet catch this generator within 300 answers on the topic); the
    // alarm's naming is unit-tested in `detect::drift::scope`. Here: the stream runs through
    // the real policy, nothing alarms before the change, and the topic's prompts fall mostly
    // in one of the feature topics the alarm would name.
    let options = DriftEvalOptions {
        models: vec!["gemma-7b-it".to_owned()],
        lomo: false,
        seeds: 0,
        slant_seeds: 1,
        slant_horizon: 100,
        slant_topics: vec!["cooking".to_owned()],
        ..options()
    };
    let results = run(&options, tripwire::policy::DEFAULT_POLICY).unwrap();
    assert_eq!(results.len(), 1, "{results:?}");
    let stream = &results[0];
    assert_eq!(stream.scenario, "slant");
    assert_eq!(stream.false_alarms, 0, "{:?}", stream.false_alarm_tests);
    let slant = stream.slant.as_ref().unwrap();
    assert!((0.01..=0.05).contains(&slant.share), "{slant:?}");
    assert!(slant.expected_share > 0.5, "{slant:?}");
    if let Some(answers) = slant.topic_answers {
        assert!(answers <= 100, "{slant:?}");
        assert!(!slant.terms.is_empty(), "{slant:?}");
    }
}
