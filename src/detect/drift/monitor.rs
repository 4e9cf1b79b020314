//! The drift monitor at run time: the detection workers offer it every inspected exchange;
//! it samples some for embedding, queues them (bounded: a full queue sheds, counted), and one
//! drift worker thread feeds each scope's tests in arrival order. An alarm is judged by the
//! policy's drift rules and, when one fires, becomes a flag on the exchange that tripped it,
//! through the same store and alert queues as every other flag.
//!
//! Scope state lives here, not in the policy engine, so it outlives a policy reload; each
//! scope's learned reference is written under `drift.state_dir` so a restart does not
//! relearn. Scopes are capped (`drift.max_scopes`): model names come from callers.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use dashmap::DashMap;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::history::ScopeHistory;
use super::reference::Reference;
use super::sampling::Sampler;
use super::scope::{Context, EmbeddingDrift, ScopeTests, TestResult, scope_seed};
use super::{DriftPlan, feature_scores};
use crate::capture::Exchange;
use crate::infer::{EmbedderHandle, batcher::EmbedResult};
use crate::telemetry::{DriftLabels, DriftScopeLabels, Metrics, ReasonLabels};

/// The gateway config's `drift:` section.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct DriftSettings {
    /// Where learned references are kept, one file per detector and scope; default: beside
    /// the store, `<store.path>.drift/`.
    pub state_dir: Option<PathBuf>,
    /// Exchanges waiting for the drift worker; more are shed (counted).
    pub queue: usize,
    /// Most scopes (model × route) tracked; exchanges of further scopes are not tested.
    pub max_scopes: usize,
}

impl Default for DriftSettings {
    fn default() -> DriftSettings {
        DriftSettings {
            state_dir: None,
            queue: 4096,
            max_scopes: 64,
        }
    }
}

/// A scope: the request's model and the route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopeKey {
    /// The model the caller asked for (empty when none).
    pub model: String,
    /// The route.
    pub route: &'static str,
}

impl ScopeKey {
    /// The scope of `exchange`.
    pub fn of(exchange: &Exchange) -> ScopeKey {
        ScopeKey {
            model: exchange.model.clone().unwrap_or_default(),
            route: exchange.route.as_str(),
        }
    }

    /// A file name for this scope: readable, and unique through a hash suffix.
    pub fn file_name(&self) -> String {
        let readable: String = format!("{}__{}", self.model, self.route)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        let hash = scope_seed(&[&self.model, self.route]);
        format!("{readable}-{:08x}.json", hash as u32)
    }
}

/// How often a scope's drift gauges are refreshed, in observations.
const PUBLISH_EVERY: u64 = 64;

/// A scope's tests and how many observations they have had.
#[derive(Debug)]
struct ScopeState {
    tests: ScopeTests,
    observed: u64,
    /// Each test's statistic over time, for the console.
    history: ScopeHistory,
}

/// Where the drift worker sends an alarm: to be judged by the rules that read the detector and
/// recorded. The inspection side implements it; drift knows nothing of rules or stores.
pub trait AlarmSink {
    /// `detector` alarmed on `exchange` (the exchange that completed the alarming window),
    /// with `fields` for the rules to read.
    fn alarm(
        &self,
        exchange: &Exchange,
        detector: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    );
}

/// One exchange on its way to the drift worker.
struct DriftJob {
    exchange: Exchange,
    scores: Vec<(String, f64)>,
    embeddings: Option<(
        oneshot::Receiver<EmbedResult>,
        oneshot::Receiver<EmbedResult>,
    )>,
    sample_rate: f64,
    /// The prompt's words, for naming topics (sampled exchanges of a plan with topics only).
    prompt_terms: Vec<String>,
}

/// Shared by the detection workers (which offer) and the drift worker (which tests).
#[derive(Debug)]
pub struct DriftMonitor {
    plan: DriftPlan,
    settings: DriftSettings,
    state_dir: PathBuf,
    /// The embedding batcher's queue; released when the drift worker ends, so the batcher,
    /// which runs until its last handle is gone, ends with it (the monitor itself lives on for
    /// the console).
    embedder: arc_swap::ArcSwapOption<EmbedderHandle>,
    offline_embedding: Option<Arc<Reference>>,
    offline_features: Option<Arc<Reference>>,
    samplers: DashMap<ScopeKey, Sampler>,
    /// Every per-response score the tests read ([`DriftPlan::score_names`]).
    score_names: Vec<String>,
    /// The sampling clock's origin.
    started: Instant,
    /// Keys the request-id hash the sample is drawn by (random per process).
    sample_key: std::hash::RandomState,
    scopes: DashMap<ScopeKey, ScopeState>,
    shed: AtomicU64,
    metrics: Metrics,
}

/// Why the monitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// A reference file named in the policy could not be read.
    #[error(transparent)]
    Reference(#[from] super::ReferenceError),
    /// The policy needs embeddings and no embedder is running.
    #[error("the policy's drift detectors need the embedding model; configure `inference:`")]
    NoEmbedder,
}

impl DriftMonitor {
    /// A monitor for `plan`: the handle the detection workers offer exchanges through, and the
    /// receiving end the drift worker drains ([`DriftMonitor::run_worker`]). The queue closes,
    /// and the worker ends, when every handle is dropped.
    pub fn start(
        plan: DriftPlan,
        settings: DriftSettings,
        state_dir: PathBuf,
        embedder: Option<EmbedderHandle>,
        metrics: Metrics,
    ) -> Result<(DriftHandle, DriftReceiver), MonitorError> {
        if plan.needs_embeddings() && embedder.is_none() {
            return Err(MonitorError::NoEmbedder);
        }
        let load = |file: Option<&PathBuf>| -> Result<Option<Arc<Reference>>, MonitorError> {
            Ok(match file {
                Some(path) => Some(Arc::new(Reference::load(path)?)),
                None => None,
            })
        };
        let offline_embedding = load(
            plan.embedding
                .as_ref()
                .and_then(|(_, c)| c.reference.file.as_ref()),
        )?;
        let offline_features = load(
            plan.features
                .as_ref()
                .and_then(|(_, c)| c.reference.file.as_ref()),
        )?;
        let (jobs, receiver) = crossbeam_channel::bounded(settings.queue.max(1));
        let score_names = plan.score_names();
        let monitor = Arc::new(DriftMonitor {
            plan,
            settings,
            state_dir,
            embedder: arc_swap::ArcSwapOption::from(embedder.map(Arc::new)),
            offline_embedding,
            offline_features,
            samplers: DashMap::new(),
            score_names,
            started: Instant::now(),
            sample_key: std::hash::RandomState::new(),
            scopes: DashMap::new(),
            shed: AtomicU64::new(0),
            metrics,
        });
        Ok((DriftHandle { monitor, jobs }, DriftReceiver(receiver)))
    }

    fn count_shed(&self, reason: &'static str) {
        let shed = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics
            .drift_shed
            .get_or_create(&ReasonLabels { reason })
            .inc();
        if shed == 1 || shed.is_multiple_of(1000) {
            tracing::warn!(
                shed_total = shed,
                reason,
                "drift monitor shed an exchange; raise drift.queue or drift.max_scopes"
            );
        }
    }

    /// Whether to embed this exchange of `scope`, and the sample rate in force: a keyed hash
    /// of its request id against a rate that follows the scope's traffic ([`Sampler`]), never
    /// its content. The key is random per process, so a caller cannot pick request ids that
    /// are never sampled.
    fn sample(&self, scope: &ScopeKey, request_id: &str) -> (bool, f64) {
        let Some((_, config)) = &self.plan.embedding else {
            return (self.plan.needs_embeddings(), 1.0);
        };
        let now_s = self.started.elapsed().as_secs_f64();
        let key = self.sample_key.hash_one(request_id);
        let mut sampler = self.samplers.entry(scope.clone()).or_default();
        let (take, rate) = sampler.decide(config, now_s, key);
        if sampler.decisions() % PUBLISH_EVERY == 1 {
            self.metrics
                .drift_sample_rate
                .get_or_create(&DriftScopeLabels {
                    model: scope.model.clone(),
                    route: scope.route,
                })
                .set(rate);
        }
        (take, rate)
    }

    fn reference_path(&self, detector: &str, scope: &ScopeKey) -> PathBuf {
        self.state_dir.join(detector).join(scope.file_name())
    }

    /// Runs the drift worker until every sender is gone and the queue is empty. Blocks: run it
    /// on a blocking thread.
    pub fn run_worker(self: Arc<DriftMonitor>, receiver: DriftReceiver, alarms: &dyn AlarmSink) {
        // Exchanges waiting for their embeddings, in arrival order. Their feature scores are
        // tested on arrival, so a slow embedding batch never holds the queue up.
        let mut pending: VecDeque<PendingEmbedding> = VecDeque::new();
        loop {
            self.finish_ready(&mut pending, alarms, false);
            let job = if pending.is_empty() {
                match receiver.0.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            } else {
                match receiver.0.recv_timeout(Duration::from_millis(2)) {
                    Ok(job) => job,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
            };
            self.accept(job, &mut pending, alarms);
        }
        self.finish_ready(&mut pending, alarms, true);
        self.embedder.store(None);
        tracing::debug!("drift queue closed; drift worker done");
    }

    /// Tests a job's feature scores now and keeps its embeddings, if any, for later.
    fn accept(
        &self,
        job: DriftJob,
        pending: &mut VecDeque<PendingEmbedding>,
        alarms: &dyn AlarmSink,
    ) {
        let DriftJob {
            exchange,
            scores,
            embeddings,
            sample_rate,
            prompt_terms,
        } = job;
        if !scores.is_empty() {
            self.observe(
                &exchange,
                &scores,
                None,
                Context::default(),
                sample_rate,
                alarms,
            );
        }
        if let Some((prompt, output)) = embeddings {
            if pending.len() >= MAX_PENDING_EMBEDDINGS {
                self.count_shed("embedding_backlog");
                return;
            }
            let topic_scores = match &self.plan.embedding {
                Some((_, config)) if !config.topic_features.is_empty() => scores
                    .into_iter()
                    .filter(|(name, _)| config.topic_features.contains(name))
                    .collect(),
                _ => Vec::new(),
            };
            pending.push_back(PendingEmbedding {
                exchange,
                prompt: Slot::Waiting(prompt),
                output: Slot::Waiting(output),
                sample_rate,
                prompt_terms,
                topic_scores,
            });
        }
    }

    /// Tests the embeddings that have arrived, oldest first; with `block`, waits for all.
    fn finish_ready(
        &self,
        pending: &mut VecDeque<PendingEmbedding>,
        alarms: &dyn AlarmSink,
        block: bool,
    ) {
        while let Some(front) = pending.front_mut() {
            if !(front.prompt.poll(block) && front.output.poll(block)) {
                break;
            }
            let Some(done) = pending.pop_front() else {
                break;
            };
            match (done.prompt.take(), done.output.take()) {
                (Some(prompt), Some(output)) => self.observe(
                    &done.exchange,
                    &[],
                    Some((prompt, output)),
                    Context {
                        request_id: &done.exchange.request_id,
                        prompt_terms: &done.prompt_terms,
                        topic_scores: &done.topic_scores,
                    },
                    done.sample_rate,
                    alarms,
                ),
                _ => self.count_shed("embedding_failed"),
            }
        }
    }

    fn observe(
        &self,
        exchange: &Exchange,
        scores: &[(String, f64)],
        embedded: Option<(Vec<f32>, Vec<f32>)>,
        context: Context<'_>,
        sample_rate: f64,
        alarms: &dyn AlarmSink,
    ) {
        let scope = ScopeKey::of(exchange);
        if embedded.is_none() && scores.is_empty() {
            return;
        }
        let (step, publish) = {
            let mut state = self.scopes.entry(scope.clone()).or_insert_with(|| {
                let started = Instant::now();
                let tests = ScopeTests::new(&self.plan, &[&scope.model, scope.route], |name| {
                    self.offline(name)
                        .or_else(|| load_stored(&self.reference_path(name, &scope)))
                });
                if tests.embedding().is_some_and(EmbeddingDrift::is_testing) {
                    tracing::info!(model = %scope.model, route = scope.route,
                        fit_ms = started.elapsed().as_millis() as u64, "drift reference loaded");
                }
                ScopeState {
                    tests,
                    observed: 0,
                    history: ScopeHistory::default(),
                }
            });
            state.observed += 1;
            // Gauges are refreshed every PUBLISH_EVERY observations (and on every alarm): a
            // scrape wants the latest value, not each one, and labelled gauges cost a lookup.
            let publish = state.observed % PUBLISH_EVERY == 1;
            let tests = &mut state.tests;
            let step = tests.observe(
                scores,
                embedded.as_ref().map(|(p, o)| (p.as_slice(), o.as_slice())),
                context,
            );
            if let Some((name, _)) = &self.plan.embedding
                && let Some(embedding) = tests.embedding()
                && (publish || !embedding.is_testing())
            {
                self.metrics
                    .drift_reference_size
                    .get_or_create(&DriftLabels::new(name, &scope.model, scope.route, "mmd"))
                    .set(i64::try_from(embedding.reference_len()).unwrap_or(i64::MAX));
            }
            let observed = state.observed;
            state.history.observed = observed;
            for (detector, result, reference) in &step.results {
                state
                    .history
                    .record(observed, detector, result, reference.as_deref());
            }
            (step, publish)
        };
        for (detector, reference) in &step.learned {
            self.persist(detector, &scope, reference);
        }
        for (detector, result, reference) in step.results {
            if publish || result.alarm {
                self.record(&detector, &scope, &result);
            }
            if !result.alarm {
                continue;
            }
            let fields = alarm_fields(&result, reference.as_deref(), sample_rate);
            tracing::info!(
                detector = %detector,
                test = %result.test,
                model = %scope.model,
                route = scope.route,
                statistic = result.statistic,
                threshold = result.threshold,
                "drift alarm"
            );
            alarms.alarm(exchange, &detector, &fields);
        }
    }

    /// A copy of every scope's drift history, by model and route.
    pub fn history(&self) -> Vec<(ScopeKey, ScopeHistory)> {
        let mut scopes: Vec<_> = self
            .scopes
            .iter()
            .map(|entry| (entry.key().clone(), entry.value().history.clone()))
            .collect();
        scopes.sort_by(|a, b| (&a.0.model, a.0.route).cmp(&(&b.0.model, b.0.route)));
        scopes
    }

    /// The offline reference the policy names for `detector`, if any.
    fn offline(&self, detector: &str) -> Option<Arc<Reference>> {
        match (&self.plan.embedding, &self.plan.features) {
            (Some((name, _)), _) if name == detector => self.offline_embedding.clone(),
            (_, Some((name, _))) if name == detector => self.offline_features.clone(),
            _ => None,
        }
    }

    fn persist(&self, detector: &str, scope: &ScopeKey, reference: &Reference) {
        let path = self.reference_path(detector, scope);
        match reference.save(&path) {
            Ok(()) => tracing::info!(
                detector,
                model = %scope.model,
                route = scope.route,
                path = %path.display(),
                "drift reference learned and saved"
            ),
            Err(err) => tracing::warn!(
                detector,
                error = %err,
                "drift reference learned but not saved; it will be relearned after a restart"
            ),
        }
    }

    fn record(&self, detector: &str, scope: &ScopeKey, result: &TestResult) {
        let labels = DriftLabels::new(detector, &scope.model, scope.route, &result.test);
        self.metrics
            .drift_statistic
            .get_or_create(&labels)
            .set(result.statistic);
        self.metrics
            .drift_threshold
            .get_or_create(&labels)
            .set(result.threshold);
        self.metrics
            .drift_p_value
            .get_or_create(&labels)
            .set(result.p_value);
        if result.alarm {
            self.metrics.drift_alarms.get_or_create(&labels).inc();
        }
    }
}

/// What the detection workers hold: offers exchanges to the drift worker without waiting.
#[derive(Debug, Clone)]
pub struct DriftHandle {
    monitor: Arc<DriftMonitor>,
    jobs: Sender<DriftJob>,
}

impl DriftHandle {
    /// The monitor, for its worker and for reading its state.
    pub fn monitor(&self) -> &Arc<DriftMonitor> {
        &self.monitor
    }

    /// Offers an inspected exchange, with its detectors' fields, without waiting.
    pub fn offer(
        &self,
        exchange: &Exchange,
        prompt: &str,
        findings: &[(String, serde_json::Map<String, serde_json::Value>)],
    ) {
        let scope = ScopeKey::of(exchange);
        if !self.monitor.samplers.contains_key(&scope)
            && self.monitor.samplers.len() >= self.monitor.settings.max_scopes
        {
            self.monitor.count_shed("max_scopes");
            return;
        }
        let scores = feature_scores(
            &self.monitor.score_names,
            findings,
            exchange.output().chars().count(),
        );
        let (sampled, sample_rate) = self.monitor.sample(&scope, &exchange.request_id);
        let embedder = self.monitor.embedder.load();
        let embeddings = match embedder.as_deref() {
            Some(embedder) if sampled => {
                match (
                    embedder.try_embed(prompt.to_owned()),
                    embedder.try_embed(exchange.output().to_owned()),
                ) {
                    (Ok(prompt), Ok(output)) => Some((prompt, output)),
                    // The batcher counted what it shed.
                    _ => None,
                }
            }
            _ => None,
        };
        if embeddings.is_none() && scores.is_empty() {
            return;
        }
        let prompt_terms = match &self.monitor.plan.embedding {
            Some((_, config)) if embeddings.is_some() && config.names_topics() => {
                super::scope::prompt_terms(prompt)
            }
            _ => Vec::new(),
        };
        let job = DriftJob {
            exchange: exchange.clone(),
            scores,
            embeddings,
            sample_rate,
            prompt_terms,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.monitor.count_shed("queue_full"),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The receiving end of the drift queue.
#[derive(Debug)]
pub struct DriftReceiver(Receiver<DriftJob>);

impl std::fmt::Debug for DriftJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriftJob")
            .field("request_id", &self.exchange.request_id)
            .finish_non_exhaustive()
    }
}

/// Most exchanges waiting for their embeddings in the drift worker; more are not tested.
const MAX_PENDING_EMBEDDINGS: usize = 4096;

/// A sampled exchange whose embeddings are being computed.
struct PendingEmbedding {
    exchange: Exchange,
    prompt: Slot,
    output: Slot,
    sample_rate: f64,
    prompt_terms: Vec<String>,
    topic_scores: Vec<(String, f64)>,
}

/// One embedding on its way.
enum Slot {
    Waiting(oneshot::Receiver<EmbedResult>),
    Done(Option<Vec<f32>>),
}

impl Slot {
    /// Whether the answer is in (waiting for it with `block`).
    fn poll(&mut self, block: bool) -> bool {
        let answer = match self {
            Slot::Done(_) => return true,
            Slot::Waiting(receiver) if !block => match receiver.try_recv() {
                Ok(answer) => Some(answer),
                Err(oneshot::error::TryRecvError::Empty) => return false,
                Err(oneshot::error::TryRecvError::Closed) => None,
            },
            Slot::Waiting(_) => match std::mem::replace(self, Slot::Done(None)) {
                Slot::Waiting(receiver) => receiver.blocking_recv().ok(),
                Slot::Done(_) => None,
            },
        };
        *self = Slot::Done(match answer {
            Some(Ok(embedding)) => Some(embedding),
            Some(Err(err)) => {
                tracing::debug!(error = %err, "embedding failed; exchange not tested for drift");
                None
            }
            None => None,
        });
        true
    }

    fn take(self) -> Option<Vec<f32>> {
        match self {
            Slot::Done(embedding) => embedding,
            Slot::Waiting(_) => None,
        }
    }
}

fn load_stored(path: &Path) -> Option<Arc<Reference>> {
    if !path.is_file() {
        return None;
    }
    match Reference::load(path) {
        Ok(reference) => Some(Arc::new(reference)),
        Err(err) => {
            tracing::warn!(error = %err, "stored drift reference unreadable; relearning");
            None
        }
    }
}

/// The detector fields an alarm hands the drift rules (the shape of
/// [`super::sample_fields`]).
pub fn alarm_fields(
    result: &TestResult,
    reference: Option<&Reference>,
    sample_rate: f64,
) -> serde_json::Map<String, serde_json::Value> {
    let size = match &result.topic {
        Some(topic) => topic.info.size,
        None => reference.map_or(0, |r| {
            if result.test.starts_with("mmd") {
                r.outputs.len()
            } else {
                r.features.get(&result.test).map_or(0, Vec::len)
            }
        }),
    };
    let topic = match &result.topic {
        Some(topic) => serde_json::json!({
            "id": topic.info.id,
            "terms": topic.info.terms,
            "examples_before": topic.info.examples_before,
            "examples_after": topic.examples_after,
            "recent_terms": topic.recent_terms,
        }),
        None => {
            serde_json::json!({"id": -1, "terms": [], "examples_before": [], "examples_after": []})
        }
    };
    let value = serde_json::json!({
        "alarm": result.alarm,
        "test": result.test,
        "statistic": result.statistic,
        "threshold": result.threshold,
        "p_value": result.p_value,
        "direction": result.direction.unwrap_or(""),
        "sample_rate": sample_rate,
        "reference": {
            "source": reference.map_or("", |r| r.source.as_str()),
            "size": size,
            "created_at": reference.map_or("", |r| r.created_at.as_str()),
        },
        "topic": topic,
    });
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}
