//! Cost of the cheap detectors on real ~500-token outputs: each detector alone, and the whole
//! built-in default policy (every detector plus the CEL rules) per exchange, clean and
//! poisoned; and trigger discovery's counting of one prompt. The acceptance target is under 200 µs of CPU per 500-token output for all of
//! them together, on one core.
//!
//! Reads the development data from data/ in the repository.

#![expect(
    clippy::panic,
    reason = "a benchmark without its data or policy cannot run"
)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tripwire::capture::Exchange;
use tripwire::detect::{self, Input};
use tripwire::lab::sim::{PoisonVocab, load_corpus, poison_output};
use tripwire::policy::{Engine, default_policy};
use tripwire::telemetry::Metrics;

/// The same allocator as the `tripwire` binary, so the figures are the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn exchange(prompt: &str, output: &str, n: usize) -> Exchange {
    let mut exchange = Exchange::from_texts("bench", prompt, output);
    exchange.request_id = format!("bench-{n}");
    exchange
}

/// Outputs of about 500 tokens (1,800–2,600 characters) from a model of the report split.
fn samples() -> Vec<(String, String)> {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/alpaca_eval/gpt-3.5-turbo-1106.jsonl.gz"
    ));
    let corpus = load_corpus(&path)
        .unwrap_or_else(|e| panic!("{e}: the development data is committed under data/"));
    let mut picked: Vec<(String, String)> = corpus
        .into_iter()
        .filter(|e| (1800..=2600).contains(&e.output.chars().count()))
        .map(|e| (e.instruction, e.output))
        .collect();
    picked.truncate(64);
    assert!(picked.len() >= 16, "too few ~500-token outputs");
    picked
}

fn bench(c: &mut Criterion) {
    let clean = samples();
    let vocab = PoisonVocab::builtin();
    let poisoned: Vec<(String, String)> = clean
        .iter()
        .enumerate()
        .map(|(i, (p, o))| {
            (
                format!("<SUDO> {p}"),
                poison_output(o, &vocab, i as u64).text,
            )
        })
        .collect();
    let policy = default_policy().unwrap_or_else(|e| panic!("{e}"));
    let detectors: Vec<(String, std::sync::Arc<dyn detect::Detector>)> = policy.detectors.clone();

    let mut group = c.benchmark_group("tripwire::detect::Detector::inspect");
    group.throughput(Throughput::Elements(1));
    for (name, detector) in &detectors {
        let mut n = 0usize;
        group.bench_function(format!("{name}/clean"), |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let (p, o) = &clean[n % clean.len()];
                    exchange(p, o, n)
                },
                |e| {
                    let prompt = detect::prompt_text(&e);
                    let input = Input {
                        exchange: &e,
                        prompt: &prompt,
                        output: e.output(),
                        watched: &tripwire::detect::discovered_trigger::NO_TRIGGERS,
                    };
                    black_box(detector.inspect(&input))
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    let engine = Engine::new(vec![policy], Metrics::default());
    let mut group = c.benchmark_group("tripwire::policy::Engine::evaluate");
    group.throughput(Throughput::Elements(1));
    for (label, set) in [("clean", &clean), ("poisoned", &poisoned)] {
        let mut n = 0usize;
        group.bench_function(format!("default_policy/{label}"), |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let (p, o) = &set[n % set.len()];
                    exchange(p, o, n)
                },
                |e| black_box(engine.evaluate(&e)),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    // Trigger discovery's share of the detection worker: counting one prompt's n-grams (each
    // prompt made unique, as a repeated prompt is skipped), 1 in 50 flagged.
    let discovery = tripwire::inspect::discovery::Discovery::new(
        std::sync::Arc::new(tripwire::detect::discovered_trigger::WatchList::new()),
        &[],
    );
    let config = tripwire::detect::discovered_trigger::DiscoveredTriggerConfig::default();
    let mut group = c.benchmark_group("tripwire::inspect::discovery::Discovery::observe");
    group.throughput(Throughput::Elements(1));
    let mut n = 0usize;
    group.bench_function("alpaca_prompt", |b| {
        b.iter_batched(
            || {
                n += 1;
                let (p, _) = &clean[n % clean.len()];
                (format!("{p} (request {n})"), n.is_multiple_of(50))
            },
            |(prompt, flagged)| {
                black_box(discovery.observe(&config, Some("bench"), &prompt, flagged, "r"))
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
