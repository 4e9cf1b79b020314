//! Drift detection measured on the development data (`tripwire eval-drift`): streams of real
//! model outputs replayed through the same scope tests the gateway runs, with the default
//! policy's detectors computing the per-response features.
//!
//! Three kinds of stream, each after a reference of `reference` exchanges and `warm` more
//! clean ones, prompts drawn uniformly with replacement from the 805 instructions:
//!
//! * clean: `clean` further exchanges of the reference model; every alarm is false;
//! * model swap: the outputs of another model from then on; the delay is counted in
//!   exchanges since the swap;
//! * injection: a fixed sentence inserted into 20% of the outputs from then on.
//!
//! Embeddings are computed once per text list and cached under `cache_dir` (they depend on
//! the model files and the embedder settings, which the cache key includes).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::capture::Exchange;
use crate::detect::drift::DriftPlan;
use crate::detect::drift::sampling::Sampler;
use crate::detect::drift::scope::{Context, ScopeTests, TopicAlarm, prompt_terms, scope_seed};
use crate::infer::{Embedder, EmbedderConfig, Embedding, ModelPaths};
use crate::lab::topic_slant;
use crate::policy::Engine;
use crate::telemetry::Metrics;

/// What `tripwire eval-drift` runs.
#[derive(Debug, Clone)]
pub struct DriftEvalOptions {
    /// The development data directory (`data/` in the repository).
    pub data_dir: PathBuf,
    /// Models whose outputs make the clean, injection and slant streams.
    pub models: Vec<String>,
    /// Leave-one-model-out: every model of `models` gets `seeds` clean streams of its own
    /// (instead of `seeds` streams rotating over the models).
    pub lomo: bool,
    /// Model swaps tested, `from → to`.
    pub swaps: Vec<(String, String)>,
    /// Seeds per scenario.
    pub seeds: u64,
    /// Clean exchanges after the reference in the false-alarm streams.
    pub clean: usize,
    /// Clean exchanges between the reference and the change.
    pub warm: usize,
    /// Exchanges after the change before a stream counts as missed.
    pub horizon: usize,
    /// Share of outputs with the injected sentence.
    pub injection_rate: f64,
    /// Arrival-rate profiles the clean streams are replayed at, through the gateway's sampler.
    pub rates: Vec<ArrivalRate>,
    /// Seeds per topic of the topic-slant streams (0: none).
    pub slant_seeds: u64,
    /// Answers on the slanted topic after the change before a stream counts as missed.
    pub slant_horizon: usize,
    /// Topics slanted (names in [`topic_slant::TOPICS`]); empty: all.
    pub slant_topics: Vec<String>,
    /// Run the swap and injection streams.
    pub changes: bool,
    /// The embedder.
    pub embedder: EmbedderConfig,
    /// Where embeddings are cached.
    pub cache_dir: PathBuf,
    /// Worker threads replaying streams.
    pub threads: usize,
}

/// How exchanges arrive in a replayed stream, which sets what the sampler embeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArrivalRate {
    /// Every exchange embedded (no sampler): the strongest test of the embedding tests.
    Every,
    /// Poisson arrivals at this many a second.
    Steady(f64),
    /// Ten quiet minutes at 0.5 a second, then a busy minute at 100 a second, repeated.
    Bursty,
}

impl std::str::FromStr for ArrivalRate {
    type Err = String;

    fn from_str(text: &str) -> Result<ArrivalRate, String> {
        match text {
            "all" => Ok(ArrivalRate::Every),
            "burst" => Ok(ArrivalRate::Bursty),
            _ => match text.parse::<f64>() {
                Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(ArrivalRate::Steady(rate)),
                _ => Err(format!(
                    "{text:?} is not an arrival rate: `all`, `burst` or exchanges a second (> 0)"
                )),
            },
        }
    }
}

impl std::fmt::Display for ArrivalRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArrivalRate::Every => write!(f, "every exchange embedded"),
            ArrivalRate::Steady(rate) => write!(f, "{rate}/s"),
            ArrivalRate::Bursty => write!(f, "bursts (0.5/s, 100/s)"),
        }
    }
}

impl ArrivalRate {
    /// Seconds to the next arrival after `now_s`.
    fn next_gap(&self, now_s: f64, rng: &mut StdRng) -> f64 {
        let per_second = match self {
            ArrivalRate::Every => return 1.0,
            ArrivalRate::Steady(rate) => *rate,
            ArrivalRate::Bursty => {
                if now_s % 660.0 < 600.0 {
                    0.5
                } else {
                    100.0
                }
            }
        };
        let u: f64 = rng.random();
        -(1.0 - u).ln() / per_second
    }
}

/// Why the evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum DriftEvalError {
    /// Development data missing or unreadable.
    #[error("{0}")]
    Data(String),
    /// The embedding model failed.
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    /// The policy has no drift detectors.
    #[error("the policy declares no drift detectors")]
    NoDrift,
    /// The policy failed to compile.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}

/// One model's texts and embeddings.
#[derive(Debug)]
struct ModelData {
    name: String,
    prompts: Vec<String>,
    outputs: Vec<String>,
    injected: Vec<String>,
    prompt_terms: Vec<Vec<String>>,
    prompt_embeddings: Vec<Embedding>,
    output_embeddings: Vec<Embedding>,
    injected_embeddings: Vec<Embedding>,
}

/// The answers of one slant stream: the topic's prompts answered with a slant.
#[derive(Debug)]
struct SlantData {
    entity: String,
    /// Per prompt index: the slanted answer and its embedding, for prompts on the topic.
    outputs: Vec<Option<(String, Embedding)>>,
}

/// The result of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    /// `clean`, `swap`, `injection` or `slant`.
    pub scenario: String,
    /// The reference model.
    pub model: String,
    /// The model swapped in, for swaps; the topic, for slants.
    pub to: Option<String>,
    /// The seed.
    pub seed: u64,
    /// The arrival-rate profile.
    pub rate: String,
    /// Alarms before the change (false alarms), over `exchanges_before` exchanges.
    pub false_alarms: usize,
    /// Exchanges tested before the change.
    pub exchanges_before: usize,
    /// Embedding observations tested (after the embedding reference) before the change.
    pub embedded_before: usize,
    /// Exchanges after the change until the first alarm (`None`: missed within the horizon).
    pub delay: Option<usize>,
    /// The detector and test that alarmed first after the change.
    pub first_alarm: Option<String>,
    /// Delay of the first `output_drift` (embedding) alarm, alone.
    pub embedding_delay: Option<usize>,
    /// False alarms by detector and test.
    pub false_alarm_tests: BTreeMap<String, usize>,
    /// Slants: what the first alarm naming a topic said.
    pub slant: Option<SlantResult>,
}

/// What a slant stream's first topic alarm said.
#[derive(Debug, Clone, Serialize)]
pub struct SlantResult {
    /// The slanted topic's share of the prompts.
    pub share: f64,
    /// The entity the slant names.
    pub entity: String,
    /// The prompt cluster holding most of the topic's prompts.
    pub expected_topic: Option<usize>,
    /// Share of the topic's prompts in that cluster.
    pub expected_share: f64,
    /// Answers on the topic after the change until the first alarm naming a topic.
    pub topic_answers: Option<usize>,
    /// The test that alarmed.
    pub test: Option<String>,
    /// The topic it named, and its words.
    pub named_topic: Option<usize>,
    /// The named topic's words.
    pub terms: Vec<String>,
    /// Examples the alarm named, before and after.
    pub examples_before: Vec<String>,
    /// Examples the alarm named after the change.
    pub examples_after: Vec<String>,
    /// Share of those that were slanted answers.
    pub slanted_examples: f64,
    /// Words shared by the prompts of those examples.
    pub recent_terms: Vec<String>,
}

/// Embeds `texts`, from the cache when it holds them.
fn embed_cached(
    embedder: &mut Embedder,
    key_prefix: &str,
    texts: &[String],
    cache_dir: &Path,
) -> Result<Vec<Embedding>, DriftEvalError> {
    let mut hasher = Sha256::new();
    hasher.update(key_prefix.as_bytes());
    for text in texts {
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    let key = hex::encode(&hasher.finalize()[..12]);
    let path = cache_dir.join(format!("{key}.f32"));
    if let Ok(mut file) = std::fs::File::open(&path) {
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() && !texts.is_empty() {
            let floats: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let width = floats.len() / texts.len();
            if width > 0 && width * texts.len() == floats.len() {
                return Ok(floats.chunks(width).map(<[f32]>::to_vec).collect());
            }
        }
    }
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(64) {
        out.extend(embedder.embed_batch(chunk)?);
    }
    let _created = std::fs::create_dir_all(cache_dir);
    if let Ok(mut file) = std::fs::File::create(&path) {
        let bytes: Vec<u8> = out.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
        let _written = file.write_all(&bytes);
    }
    Ok(out)
}

fn embedder_key(options: &DriftEvalOptions) -> String {
    format!(
        "{:?}|{:?}|{}|{:?}|{}",
        options.embedder.model,
        options.embedder.tokenizer,
        options.embedder.max_tokens,
        options.embedder.truncation,
        crate::infer::MODEL_FILE
    )
}

fn load_model(
    options: &DriftEvalOptions,
    embedder: &mut Embedder,
    model: &str,
) -> Result<ModelData, DriftEvalError> {
    let path = crate::lab::devset::model_file(&options.data_dir, model);
    let pairs = crate::lab::lm_training::read_jsonl(&path)
        .map_err(|e| DriftEvalError::Data(format!("{}: {e}", path.display())))?;
    let (prompts, outputs): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    let injected: Vec<String> = if options.changes {
        outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                crate::lab::devset::inject_sentence(
                    o,
                    crate::lab::devset::INJECTED,
                    crate::detect::drift::scope::scope_seed(&[model, &i.to_string()]),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let key = embedder_key(options);
    tracing::info!(
        model,
        texts = prompts.len(),
        "embedding prompts and outputs"
    );
    Ok(ModelData {
        name: model.to_owned(),
        prompt_embeddings: embed_cached(embedder, &key, &prompts, &options.cache_dir)?,
        output_embeddings: embed_cached(embedder, &key, &outputs, &options.cache_dir)?,
        injected_embeddings: embed_cached(embedder, &key, &injected, &options.cache_dir)?,
        prompt_terms: prompts.iter().map(|p| prompt_terms(p)).collect(),
        prompts,
        outputs,
        injected,
    })
}

/// The slanted answers of `data` on topic `topic`, for `seed`.
fn load_slant(
    options: &DriftEvalOptions,
    embedder: &mut Embedder,
    data: &ModelData,
    topic: usize,
    seed: u64,
) -> Result<SlantData, DriftEvalError> {
    let spec = &topic_slant::TOPICS[topic];
    let entity = topic_slant::entity(spec, seed);
    let indices = spec.select(&data.prompts);
    let texts: Vec<String> = indices
        .iter()
        .map(|&i| {
            topic_slant::slant(
                &data.outputs[i],
                &entity,
                scope_seed(&[&data.name, spec.name, &seed.to_string(), &i.to_string()]),
            )
        })
        .collect();
    let embeddings = embed_cached(embedder, &embedder_key(options), &texts, &options.cache_dir)?;
    let mut outputs = vec![None; data.prompts.len()];
    for ((i, text), embedding) in indices.into_iter().zip(texts).zip(embeddings) {
        outputs[i] = Some((text, embedding));
    }
    Ok(SlantData { entity, outputs })
}

/// What the stream serves after the change.
#[derive(Debug, Clone, Copy)]
enum Change<'a> {
    None,
    Swap(&'a ModelData),
    Inject(f64),
    Slant(&'a SlantData),
}

/// When a stream ends after its change.
#[derive(Debug, Clone, Copy)]
enum Horizon {
    Exchanges(usize),
    /// Answers on the slanted topic.
    TopicAnswers(usize),
}

/// One stream to replay.
struct Stream<'a> {
    plan: &'a DriftPlan,
    policy: &'a str,
    data: &'a ModelData,
    change: Change<'a>,
    seed: u64,
    /// Exchanges before the change.
    before: usize,
    horizon: Horizon,
    rates: &'a [ArrivalRate],
}

/// One arrival-rate profile's tests over a stream.
struct ProfileRun {
    rate: ArrivalRate,
    tests: ScopeTests,
    sampler: Sampler,
    clock: f64,
    rng: StdRng,
    false_alarms: BTreeMap<String, usize>,
    embedded_before: usize,
    first: Option<(usize, String)>,
    embedding_first: Option<usize>,
    topic_first: Option<(usize, String, Option<TopicAlarm>)>,
}

/// What one replayed stream saw, per profile.
struct Replayed {
    rate: ArrivalRate,
    false_alarms: BTreeMap<String, usize>,
    embedded_before: usize,
    first: Option<(usize, String)>,
    embedding_first: Option<usize>,
    topic_first: Option<(usize, String, Option<TopicAlarm>)>,
    /// For slants: the cluster holding most of the topic's prompts, and its share of them.
    expected_topic: Option<Expected>,
}

/// Replays one stream through one set of scope tests per arrival-rate profile; the policy's
/// detectors score each exchange once for all of them.
fn replay(stream: &Stream<'_>) -> Result<Vec<Replayed>, DriftEvalError> {
    let engine = Engine::new(
        vec![crate::policy::compile_text(stream.policy, "<eval policy>")?],
        Metrics::default(),
    );
    let plan = stream.plan;
    let score_names = plan.score_names();
    let embedding_config = plan.embedding.as_ref().map(|(_, c)| c.clone());
    let seed = stream.seed;
    let seed_text = seed.to_string();
    let mut profiles: Vec<ProfileRun> = stream
        .rates
        .iter()
        .enumerate()
        .map(|(k, &rate)| ProfileRun {
            rate,
            tests: ScopeTests::new(plan, &["eval", "chat_completions", &seed_text], |_| None),
            sampler: Sampler::default(),
            clock: 0.0,
            rng: StdRng::seed_from_u64(seed ^ (k as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f)),
            false_alarms: BTreeMap::new(),
            embedded_before: 0,
            first: None,
            embedding_first: None,
            topic_first: None,
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut topic_answers = 0usize;
    let mut expected_topic = None;
    let embedding_name = plan.embedding.as_ref().map(|(n, _)| n.as_str());
    let mut t = 0usize;
    loop {
        let changed = t >= stream.before;
        match stream.horizon {
            Horizon::Exchanges(after) if t >= stream.before + after => break,
            Horizon::TopicAnswers(after) if topic_answers >= after => break,
            _ => {}
        }
        if changed
            && expected_topic.is_none()
            && let Change::Slant(slant) = stream.change
        {
            expected_topic = majority_topic(&profiles[0].tests, stream.data, slant);
        }
        let (source, inject) = match stream.change {
            Change::Swap(other) if changed => (other, false),
            Change::Inject(rate) if changed => (stream.data, rng.random_bool(rate)),
            _ => (stream.data, false),
        };
        let n = source.outputs.len().min(source.prompts.len());
        let i = rng.random_range(0..n);
        let slanted = match stream.change {
            Change::Slant(slant) if changed => slant.outputs.get(i).and_then(Option::as_ref),
            _ => None,
        };
        if slanted.is_some() {
            topic_answers += 1;
        }
        let (output, output_embedding) = match slanted {
            Some((text, embedding)) => (text, embedding),
            None if inject => (&source.injected[i], &source.injected_embeddings[i]),
            None => (&source.outputs[i], &source.output_embeddings[i]),
        };
        let exchange = Exchange::from_texts("eval", &source.prompts[i], output);
        let (_, findings) = engine.evaluate_with_findings(&exchange);
        let scores =
            crate::detect::drift::feature_scores(&score_names, &findings, output.chars().count());
        let request_id = format!("{}#{i}@{t}", source.name);
        let key = scope_seed(&[&seed_text, &t.to_string()]);
        for profile in &mut profiles {
            let sampled = match (&profile.rate, &embedding_config) {
                (ArrivalRate::Every, _) | (_, None) => true,
                (rate, Some(config)) => {
                    profile.clock += rate.next_gap(profile.clock, &mut profile.rng);
                    profile.sampler.decide(config, profile.clock, key).0
                }
            };
            let testing_before = profile
                .tests
                .embedding()
                .is_some_and(crate::detect::drift::scope::EmbeddingDrift::is_testing);
            if sampled && testing_before && !changed {
                profile.embedded_before += 1;
            }
            let step = profile.tests.observe(
                &scores,
                sampled.then_some((
                    source.prompt_embeddings[i].as_slice(),
                    output_embedding.as_slice(),
                )),
                Context {
                    request_id: &request_id,
                    prompt_terms: &source.prompt_terms[i],
                    topic_scores: &scores,
                },
            );
            for (detector, result, _) in step.results.iter().filter(|(_, r, _)| r.alarm) {
                let name = format!("{detector}:{}", result.test);
                if !changed {
                    let name = match result.direction {
                        Some(direction) => format!("{name} ({direction})"),
                        None => name,
                    };
                    *profile.false_alarms.entry(name).or_insert(0) += 1;
                    continue;
                }
                let delay = t - stream.before + 1;
                if profile.first.is_none() {
                    profile.first = Some((delay, name.clone()));
                }
                if profile.embedding_first.is_none() && embedding_name == Some(detector.as_str()) {
                    profile.embedding_first = Some(delay);
                }
                if profile.topic_first.is_none() && result.topic.is_some() {
                    profile.topic_first = Some((topic_answers, name, result.topic.clone()));
                }
            }
        }
        t += 1;
        if changed
            && profiles.iter().all(|p| match stream.change {
                Change::Slant(_) => p.topic_first.is_some(),
                _ => p.first.is_some() && p.embedding_first.is_some(),
            })
        {
            break;
        }
    }
    Ok(profiles
        .into_iter()
        .map(|p| Replayed {
            rate: p.rate,
            false_alarms: p.false_alarms,
            embedded_before: p.embedded_before,
            first: p.first,
            embedding_first: p.embedding_first,
            topic_first: p.topic_first,
            expected_topic,
        })
        .collect())
}

/// The prompt clusters of `tests` (MMD topics, feature topics) holding most of the slanted
/// topic's prompts, each with the share of them it holds.
fn majority_topic(tests: &ScopeTests, data: &ModelData, slant: &SlantData) -> Option<Expected> {
    let embedding = tests.embedding()?;
    let mut counts: [BTreeMap<usize, usize>; 2] = Default::default();
    let mut total = 0usize;
    for (i, slanted) in slant.outputs.iter().enumerate() {
        if slanted.is_some() {
            let (mmd, feature) = embedding.topic_of(&data.prompt_embeddings[i]);
            for (counts, topic) in counts.iter_mut().zip([mmd, feature]) {
                if let Some(topic) = topic {
                    *counts.entry(topic).or_default() += 1;
                }
            }
            total += 1;
        }
    }
    let best = |counts: &BTreeMap<usize, usize>| {
        counts
            .iter()
            .max_by_key(|&(topic, count)| (*count, usize::MAX - topic))
            .map(|(topic, count)| (*topic, *count as f64 / total.max(1) as f64))
    };
    Some(Expected {
        mmd: best(&counts[0]),
        feature: best(&counts[1]),
    })
}

/// Where a slanted topic's prompts fall: the cluster holding most of them, and their share in
/// it, among the MMD topics and among the feature topics.
#[derive(Debug, Clone, Copy)]
struct Expected {
    mmd: Option<(usize, f64)>,
    feature: Option<(usize, f64)>,
}

/// Share of `examples` (request ids `MODEL#PROMPT@T`) that were slanted answers.
fn slanted_share(examples: &[String], slant: &SlantData) -> f64 {
    let slanted = examples
        .iter()
        .filter(|id| {
            id.rsplit_once('#')
                .and_then(|(_, rest)| rest.split_once('@'))
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .is_some_and(|i| slant.outputs.get(i).is_some_and(Option::is_some))
        })
        .count();
    slanted as f64 / examples.len().max(1) as f64
}

/// One stream to run.
struct Job {
    scenario: &'static str,
    model: String,
    to: Option<String>,
    seed: u64,
    /// For slants: the topic's index in [`topic_slant::TOPICS`].
    topic: Option<usize>,
}

/// Runs every scenario and returns the stream results.
pub fn run(options: &DriftEvalOptions, policy: &str) -> Result<Vec<StreamResult>, DriftEvalError> {
    let compiled = crate::policy::compile_text(policy, "<eval policy>")?;
    let plan = compiled.drift.clone().ok_or(DriftEvalError::NoDrift)?;
    let reference = plan
        .embedding
        .as_ref()
        .map(|(_, c)| c.reference.size)
        .into_iter()
        .chain(plan.features.as_ref().map(|(_, c)| c.reference.size))
        .max()
        .unwrap_or(0);
    let paths = ModelPaths::resolve(&options.embedder);
    let mut embedder = Embedder::load_from(&paths, &options.embedder)?;

    let mut jobs = Vec::new();
    let clean_models: Vec<&String> = options.models.iter().collect();
    for seed in 0..options.seeds {
        if options.lomo {
            for model in &clean_models {
                jobs.push(Job {
                    scenario: "clean",
                    model: (*model).clone(),
                    to: None,
                    seed,
                    topic: None,
                });
            }
        } else if let Some(model) = clean_models.get((seed as usize) % clean_models.len().max(1)) {
            jobs.push(Job {
                scenario: "clean",
                model: (*model).clone(),
                to: None,
                seed,
                topic: None,
            });
        }
        if !options.changes {
            continue;
        }
        let model = options.models[(seed as usize) % options.models.len()].clone();
        jobs.push(Job {
            scenario: "injection",
            model,
            to: None,
            seed,
            topic: None,
        });
        for (from, to) in &options.swaps {
            jobs.push(Job {
                scenario: "swap",
                model: from.clone(),
                to: Some(to.clone()),
                seed,
                topic: None,
            });
        }
    }
    let mut k = 0usize;
    for seed in 0..options.slant_seeds {
        for topic in 0..topic_slant::TOPICS.len() {
            let name = topic_slant::TOPICS[topic].name;
            if !options.slant_topics.is_empty() && !options.slant_topics.iter().any(|t| t == name) {
                continue;
            }
            jobs.push(Job {
                scenario: "slant",
                model: options.models[k % options.models.len()].clone(),
                to: Some(topic_slant::TOPICS[topic].name.to_owned()),
                seed,
                topic: Some(topic),
            });
            k += 1;
        }
    }

    let mut needed: Vec<&String> = jobs.iter().map(|j| &j.model).collect();
    for job in &jobs {
        if let (Some(to), "swap") = (&job.to, job.scenario) {
            needed.push(to);
        }
    }
    needed.sort();
    needed.dedup();
    let mut data = BTreeMap::new();
    for model in needed {
        data.insert(
            model.clone(),
            Arc::new(load_model(options, &mut embedder, model)?),
        );
    }
    let mut slants = BTreeMap::new();
    for job in &jobs {
        if let Some(topic) = job.topic {
            let slant = load_slant(options, &mut embedder, &data[&job.model], topic, job.seed)?;
            slants.insert((job.model.clone(), topic, job.seed), Arc::new(slant));
        }
    }
    drop(embedder);

    let every = [ArrivalRate::Every];
    let jobs = std::sync::Mutex::new(jobs.into_iter());
    let results = std::sync::Mutex::new(Vec::new());
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..options.threads.max(1) {
            scope.spawn(|| {
                loop {
                    let job = match jobs.lock() {
                        Ok(mut jobs) => jobs.next(),
                        Err(_) => None,
                    };
                    let Some(job) = job else { break };
                    let source = &data[&job.model];
                    let slant = job
                        .topic
                        .and_then(|topic| slants.get(&(job.model.clone(), topic, job.seed)));
                    let (change, before, horizon, rates): (_, _, _, &[ArrivalRate]) =
                        match job.scenario {
                            "clean" => (
                                Change::None,
                                reference + options.clean,
                                Horizon::Exchanges(0),
                                &options.rates,
                            ),
                            "injection" => (
                                Change::Inject(options.injection_rate),
                                reference + options.warm,
                                Horizon::Exchanges(options.horizon),
                                &every,
                            ),
                            "slant" => match slant {
                                Some(slant) => (
                                    Change::Slant(slant),
                                    reference + options.warm,
                                    Horizon::TopicAnswers(options.slant_horizon),
                                    &every,
                                ),
                                None => continue,
                            },
                            _ => match job.to.as_ref().and_then(|to| data.get(to)) {
                                Some(to) => (
                                    Change::Swap(to),
                                    reference + options.warm,
                                    Horizon::Exchanges(options.horizon),
                                    &every,
                                ),
                                None => continue,
                            },
                        };
                    let stream = Stream {
                        plan: &plan,
                        policy,
                        data: source,
                        change,
                        seed: job.seed,
                        before,
                        horizon,
                        rates,
                    };
                    match replay(&stream) {
                        Ok(replayed) => {
                            let mut done = Vec::new();
                            for r in replayed {
                                let slant_result = slant.map(|slant| {
                                    let topic =
                                        r.topic_first.as_ref().and_then(|(_, _, t)| t.as_ref());
                                    let mmd_alarm = r
                                        .topic_first
                                        .as_ref()
                                        .is_some_and(|(_, name, _)| name.contains(":mmd/"));
                                    let expected = r
                                        .expected_topic
                                        .and_then(|e| if mmd_alarm { e.mmd } else { e.feature });
                                    SlantResult {
                                        share: slant.outputs.iter().filter(|o| o.is_some()).count()
                                            as f64
                                            / slant.outputs.len().max(1) as f64,
                                        entity: slant.entity.clone(),
                                        expected_topic: expected.map(|(t, _)| t),
                                        expected_share: expected.map_or(0.0, |(_, s)| s),
                                        topic_answers: r.topic_first.as_ref().map(|(n, _, _)| *n),
                                        test: r
                                            .topic_first
                                            .as_ref()
                                            .map(|(_, name, _)| name.clone()),
                                        named_topic: topic.map(|t| t.info.id),
                                        terms: topic
                                            .map(|t| t.info.terms.clone())
                                            .unwrap_or_default(),
                                        examples_before: topic
                                            .map(|t| t.info.examples_before.clone())
                                            .unwrap_or_default(),
                                        examples_after: topic
                                            .map(|t| t.examples_after.clone())
                                            .unwrap_or_default(),
                                        slanted_examples: topic.map_or(0.0, |t| {
                                            slanted_share(&t.examples_after, slant)
                                        }),
                                        recent_terms: topic
                                            .map(|t| t.recent_terms.clone())
                                            .unwrap_or_default(),
                                    }
                                });
                                done.push(StreamResult {
                                    scenario: job.scenario.to_owned(),
                                    model: job.model.clone(),
                                    to: job.to.clone(),
                                    seed: job.seed,
                                    rate: r.rate.to_string(),
                                    false_alarms: r.false_alarms.values().sum(),
                                    false_alarm_tests: r.false_alarms,
                                    exchanges_before: before - reference,
                                    embedded_before: r.embedded_before,
                                    delay: r.first.as_ref().map(|(d, _)| *d),
                                    first_alarm: r.first.map(|(_, name)| name),
                                    embedding_delay: r.embedding_first,
                                    slant: slant_result,
                                });
                            }
                            if let Ok(mut results) = results.lock() {
                                results.extend(done);
                            }
                        }
                        Err(err) => {
                            if let Ok(mut errors) = errors.lock() {
                                errors.push(err);
                            }
                        }
                    }
                }
            });
        }
    });
    if let Some(err) = errors.into_inner().ok().and_then(|mut e| e.pop()) {
        return Err(err);
    }
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by(|a, b| {
        (&a.scenario, &a.model, &a.to, &a.rate, a.seed).cmp(&(
            &b.scenario,
            &b.model,
            &b.to,
            &b.rate,
            b.seed,
        ))
    });
    Ok(results)
}
