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
use crate::detect::drift::scope::ScopeTests;
use crate::infer::{Embedder, EmbedderConfig, Embedding, ModelPaths};
use crate::policy::Engine;
use crate::telemetry::Metrics;

/// What `tripwire eval-drift` runs.
#[derive(Debug, Clone)]
pub struct DriftEvalOptions {
    /// The development data directory (`data/` in the repository).
    pub data_dir: PathBuf,
    /// Models whose outputs make the streams.
    pub models: Vec<String>,
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
    /// The embedder.
    pub embedder: EmbedderConfig,
    /// Where embeddings are cached.
    pub cache_dir: PathBuf,
    /// Worker threads replaying streams.
    pub threads: usize,
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
    prompts: Vec<String>,
    outputs: Vec<String>,
    injected: Vec<String>,
    prompt_embeddings: Vec<Embedding>,
    output_embeddings: Vec<Embedding>,
    injected_embeddings: Vec<Embedding>,
}

/// The result of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    /// `clean`, `swap` or `injection`.
    pub scenario: String,
    /// The reference model.
    pub model: String,
    /// The model swapped in, for swaps.
    pub to: Option<String>,
    /// The seed.
    pub seed: u64,
    /// Alarms before the change (false alarms), over `exchanges_before` exchanges.
    pub false_alarms: usize,
    /// Exchanges tested before the change.
    pub exchanges_before: usize,
    /// Exchanges after the change until the first alarm (`None`: missed within the horizon).
    pub delay: Option<usize>,
    /// The detector and test that alarmed first after the change.
    pub first_alarm: Option<String>,
    /// Delay of the first `output_drift` (embedding) alarm, alone.
    pub embedding_delay: Option<usize>,
    /// False alarms by detector and test.
    pub false_alarm_tests: BTreeMap<String, usize>,
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

fn load_model(
    options: &DriftEvalOptions,
    embedder: &mut Embedder,
    model: &str,
) -> Result<ModelData, DriftEvalError> {
    let path = crate::lab::devset::model_file(&options.data_dir, model);
    let pairs = crate::lab::lm_training::read_jsonl(&path)
        .map_err(|e| DriftEvalError::Data(format!("{}: {e}", path.display())))?;
    let (prompts, outputs): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    let injected: Vec<String> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            crate::lab::devset::inject_sentence(
                o,
                crate::lab::devset::INJECTED,
                crate::detect::drift::scope::scope_seed(&[model, &i.to_string()]),
            )
        })
        .collect();
    let key = format!(
        "{:?}|{:?}|{}|{:?}|{}",
        options.embedder.model,
        options.embedder.tokenizer,
        options.embedder.max_tokens,
        options.embedder.truncation,
        crate::infer::MODEL_FILE
    );
    tracing::info!(
        model,
        texts = prompts.len(),
        "embedding prompts, outputs and injected outputs"
    );
    Ok(ModelData {
        prompt_embeddings: embed_cached(embedder, &key, &prompts, &options.cache_dir)?,
        output_embeddings: embed_cached(embedder, &key, &outputs, &options.cache_dir)?,
        injected_embeddings: embed_cached(embedder, &key, &injected, &options.cache_dir)?,
        prompts,
        outputs,
        injected,
    })
}

/// What the stream serves after the change.
#[derive(Debug, Clone, Copy)]
enum Change<'a> {
    None,
    Swap(&'a ModelData),
    Inject(f64),
}

/// Replays one stream; returns false alarms before the change and the first alarm after it.
fn replay(
    plan: &DriftPlan,
    policy: &str,
    data: &ModelData,
    change: Change<'_>,
    seed: u64,
    before: usize,
    after: usize,
) -> Result<Replayed, DriftEvalError> {
    let engine = Engine::new(
        vec![crate::policy::compile_text(policy, "<eval policy>")?],
        Metrics::default(),
    );
    let features = plan
        .features
        .as_ref()
        .map(|(_, c)| c.features.clone())
        .unwrap_or_default();
    let seed_text = seed.to_string();
    let mut tests = ScopeTests::new(plan, &["eval", "chat_completions", &seed_text], |_| None);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut false_alarms = BTreeMap::new();
    let mut first = None;
    let mut embedding_first = None;
    for t in 0..before + after {
        let changed = t >= before;
        let (source, inject) = match change {
            Change::Swap(other) if changed => (other, false),
            Change::Inject(rate) if changed => (data, rng.random_bool(rate)),
            _ => (data, false),
        };
        let n = source.outputs.len().min(source.prompts.len());
        let i = rng.random_range(0..n);
        let (output, output_embedding) = if inject {
            (&source.injected[i], &source.injected_embeddings[i])
        } else {
            (&source.outputs[i], &source.output_embeddings[i])
        };
        let exchange = Exchange::from_texts("eval", &source.prompts[i], output);
        let (_, findings) = engine.evaluate_with_findings(&exchange);
        let scores =
            crate::detect::drift::feature_scores(&features, &findings, output.chars().count());
        let step = tests.observe(
            &scores,
            Some((&source.prompt_embeddings[i], output_embedding)),
        );
        for (detector, result, _) in step.results.iter().filter(|(_, r, _)| r.alarm) {
            if !changed {
                *false_alarms
                    .entry(format!("{detector}:{}", result.test))
                    .or_insert(0) += 1;
            } else {
                if first.is_none() {
                    first = Some((t - before + 1, format!("{detector}:{}", result.test)));
                }
                if embedding_first.is_none()
                    && plan.embedding.as_ref().is_some_and(|(n, _)| n == detector)
                {
                    embedding_first = Some(t - before + 1);
                }
            }
        }
        if changed && first.is_some() && embedding_first.is_some() {
            break;
        }
    }
    Ok(Replayed {
        false_alarms,
        first,
        embedding_first,
    })
}

/// What one replayed stream saw.
struct Replayed {
    false_alarms: BTreeMap<String, usize>,
    first: Option<(usize, String)>,
    embedding_first: Option<usize>,
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
    let mut data = BTreeMap::new();
    let mut needed: Vec<&String> = options.models.iter().collect();
    for (from, to) in &options.swaps {
        needed.push(from);
        needed.push(to);
    }
    needed.sort();
    needed.dedup();
    for model in needed {
        data.insert(
            model.clone(),
            Arc::new(load_model(options, &mut embedder, model)?),
        );
    }
    drop(embedder);

    struct Job {
        scenario: &'static str,
        model: String,
        to: Option<String>,
        seed: u64,
    }
    let mut jobs = Vec::new();
    for seed in 0..options.seeds {
        let model = options.models[(seed as usize) % options.models.len()].clone();
        jobs.push(Job {
            scenario: "clean",
            model: model.clone(),
            to: None,
            seed,
        });
        jobs.push(Job {
            scenario: "injection",
            model,
            to: None,
            seed,
        });
        for (from, to) in &options.swaps {
            jobs.push(Job {
                scenario: "swap",
                model: from.clone(),
                to: Some(to.clone()),
                seed,
            });
        }
    }
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
                    let (change, before, after) = match job.scenario {
                        "clean" => (Change::None, reference + options.clean, 0),
                        "injection" => (
                            Change::Inject(options.injection_rate),
                            reference + options.warm,
                            options.horizon,
                        ),
                        _ => match job.to.as_ref().and_then(|to| data.get(to)) {
                            Some(to) => {
                                (Change::Swap(to), reference + options.warm, options.horizon)
                            }
                            None => continue,
                        },
                    };
                    match replay(&plan, policy, source, change, job.seed, before, after) {
                        Ok(Replayed {
                            false_alarms,
                            first,
                            embedding_first: embedding_delay,
                        }) => {
                            let result = StreamResult {
                                scenario: job.scenario.to_owned(),
                                model: job.model,
                                to: job.to,
                                seed: job.seed,
                                false_alarms: false_alarms.values().sum(),
                                false_alarm_tests: false_alarms,
                                exchanges_before: before - reference,
                                delay: first.as_ref().map(|(d, _)| *d),
                                first_alarm: first.map(|(_, name)| name),
                                embedding_delay,
                            };
                            if let Ok(mut results) = results.lock() {
                                results.push(result);
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
        (&a.scenario, &a.model, &a.to, a.seed).cmp(&(&b.scenario, &b.model, &b.to, b.seed))
    });
    Ok(results)
}
