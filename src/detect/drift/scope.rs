//! The drift tests of one scope (model × route): first learning a reference, then testing
//! every new observation against it.
//!
//! * [`EmbeddingDrift`]: output embeddings projected by PCA, one online MMD test over all
//!   outputs and one per prompt topic (k-means on the reference prompts), so a poison aimed at
//!   one topic shows even when the overall mix is stable.
//! * [`FeatureDrift`]: one conformal CUSUM per per-response score.
//!
//! Both are plain state machines, deterministic given their seed: the gateway drives them from
//! its drift worker, `tripwire eval drift` from recorded data.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::EmbeddingDriftConfig;
use super::conformal::{Calibrator, ConformalCusum, OnlineConformalCusum, Watch};
use super::linalg::{KMeans, Projection};
use super::mmd::{MmdReference, OnlineMmd};
use super::reference::{REFERENCE_VERSION, Reference};

/// How the embedding tests are shaped: the detector's parameters and its test's share of the
/// scope's false-alarm budget.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSettings {
    /// The `embedding_drift` detector's parameters.
    pub config: EmbeddingDriftConfig,
    /// Expected run time between false alarms of each test, in observations.
    pub test_ert: f64,
}

impl EmbeddingSettings {
    /// The vector a test sees for one exchange.
    fn point(&self, prompt: &[f32], output: &[f32]) -> Vec<f32> {
        if self.config.subtract_prompt && prompt.len() == output.len() {
            output.iter().zip(prompt).map(|(o, p)| o - p).collect()
        } else {
            output.to_vec()
        }
    }
}

/// How the feature tests are shaped.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSettings {
    /// Features watched one way only.
    pub directions: BTreeMap<String, Watch>,
    /// Scores of each feature learned before its test starts.
    pub reference_size: usize,
    /// Expected run time between false alarms of each feature's test, in observations.
    pub test_ert: f64,
}

/// One test's result for one observation.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    /// Which test: `mmd`, `mmd/topic-3`, or the feature's name.
    pub test: String,
    /// The statistic (MMD², or ln of the CUSUM e-detector).
    pub statistic: f64,
    /// Its alarm threshold.
    pub threshold: f64,
    /// A p-value-like score: the chance of a statistic this high without drift (MMD), or the
    /// conformal p-value of this response's score (features).
    pub p_value: f64,
    /// For feature tests, `up` or `down`.
    pub direction: Option<&'static str>,
    /// Whether the test alarmed (and was then reset).
    pub alarm: bool,
    /// On an alarm of a per-topic test: the topic, named.
    pub topic: Option<TopicAlarm>,
}

/// A prompt topic of a scope: a k-means cluster of its reference prompts, named by their most
/// distinctive words.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicInfo {
    /// The cluster's index.
    pub id: usize,
    /// The most distinctive words of the cluster's reference prompts.
    pub terms: Vec<String>,
    /// Reference exchanges of the topic (request ids): what its answers were like.
    pub examples_before: Vec<String>,
    /// Reference exchanges in the topic.
    pub size: usize,
}

/// What an alarm of a per-topic test says of its topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicAlarm {
    /// The topic.
    pub info: Arc<TopicInfo>,
    /// Recent exchanges of the topic with unusual scores (request ids, newest last).
    pub examples_after: Vec<String>,
    /// Words shared by the prompts of those exchanges: what the unusual answers were asked
    /// about, which can be narrower than the topic.
    pub recent_terms: Vec<String>,
}

/// What the tests know of an exchange besides its scores and embeddings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// The exchange's request id.
    pub request_id: &'a str,
    /// Its prompt's words ([`prompt_terms`]), to name topics by; only the reference's are kept.
    pub prompt_terms: &'a [String],
    /// Its scores for the per-topic tests (`topic_features`). Apart from the feature scores,
    /// because the gateway tests those at once and the embeddings when they arrive.
    pub topic_scores: &'a [(String, f64)],
}

/// Words of a prompt that can name a topic: lower-case alphabetic words of 3 to 20 letters,
/// not among the most frequent English words, each once, at most [`MAX_PROMPT_TERMS`]. Words
/// with digits or symbols (identifiers, keys) are never kept.
pub fn prompt_terms(prompt: &str) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for word in prompt.split(|c: char| !c.is_alphanumeric()) {
        if terms.len() >= MAX_PROMPT_TERMS {
            break;
        }
        let length = word.chars().count();
        if !(3..=20).contains(&length) || !word.chars().all(char::is_alphabetic) {
            continue;
        }
        let word = word.to_lowercase();
        let common = crate::detect::ngram_lm::word_rank(&word).is_some_and(|r| r < STOP_WORDS);
        if common || terms.contains(&word) {
            continue;
        }
        terms.push(word);
    }
    terms
}

/// Prompt words kept per reference exchange.
pub const MAX_PROMPT_TERMS: usize = 32;

/// Most frequent English words, never a topic's name.
const STOP_WORDS: usize = 300;

/// The `keep` most distinctive words of each cluster's prompts: share of the cluster's prompts
/// holding the word times its inverse document frequency over all prompts; a word must appear
/// in at least two of the cluster's prompts.
fn name_topics(
    terms: &[Vec<String>],
    assignment: &[usize],
    topics: usize,
    keep: usize,
) -> Vec<Vec<String>> {
    use std::collections::HashMap;
    let n = terms.len().min(assignment.len());
    let mut df: HashMap<&str, usize> = HashMap::new();
    let mut cluster_df: Vec<HashMap<&str, usize>> = vec![HashMap::new(); topics];
    let mut sizes = vec![0usize; topics];
    for (words, &topic) in terms.iter().zip(assignment).take(n) {
        let Some(counts) = cluster_df.get_mut(topic) else {
            continue;
        };
        sizes[topic] += 1;
        for word in words {
            *df.entry(word).or_default() += 1;
            *counts.entry(word).or_default() += 1;
        }
    }
    cluster_df
        .iter()
        .zip(&sizes)
        .map(|(counts, &size)| {
            let mut scored: Vec<(f64, &str)> = counts
                .iter()
                .filter(|(_, c)| **c >= 2)
                .map(|(word, &c)| {
                    let idf = ((n as f64 + 1.0) / (df[word] as f64 + 1.0)).ln();
                    (c as f64 / size.max(1) as f64 * idf, *word)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
            scored
                .into_iter()
                .take(keep)
                .map(|(_, w)| w.to_owned())
                .collect()
        })
        .collect()
}

/// Stable seed for a scope, so that a restart fits the same tests.
pub fn scope_seed(parts: &[&str]) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

enum EmbeddingPhase {
    /// Gathering the reference (its `outputs`, `prompts` and the rest, in arrival order).
    Learning(Box<Reference>),
    Testing(Box<EmbeddingTests>),
}

struct EmbeddingTests {
    projection: Projection,
    overall: OnlineMmd,
    /// The MMD tests' prompt topics.
    topics: Option<(KMeans, Vec<Topic>)>,
    /// The topic-feature tests' finer prompt topics.
    feature_topics: Option<(KMeans, Vec<FeatureTopic>)>,
    /// Draws the ties of the topic features' conformal p-values.
    rng: StdRng,
}

/// One prompt topic of the MMD tests.
struct Topic {
    info: Arc<TopicInfo>,
    /// `None`: too few reference answers for a window; the overall test covers the topic.
    mmd: Option<OnlineMmd>,
}

/// One prompt topic of the topic-feature tests.
struct FeatureTopic {
    info: Arc<TopicInfo>,
    /// One test per topic feature, on online conformal p-values.
    features: Vec<(String, OnlineConformalCusum)>,
    /// Recent exchanges whose topic-feature score was unusual (p ≤ 0.05), with their prompts'
    /// words.
    unusual: std::collections::VecDeque<(String, Vec<String>)>,
}

/// Examples an alarm names from before.
const TOPIC_EXAMPLES: usize = 3;

/// Scores a feature topic's test keeps (then it tests against them as a fixed reference).
const TOPIC_SCORES_KEPT: usize = 2_000;

/// Unusual exchanges a feature topic remembers, to name in an alarm.
const UNUSUAL_KEPT: usize = 8;

/// The topic-feature tests' calibrator: a slant makes a rare kind of answer (in the top 5% of
/// the topic's reference) come several times as often in a small share of the traffic.
const TOPIC_CALIBRATOR: Calibrator = Calibrator::Exceedance {
    alpha: 0.05,
    rho: 4.0,
};

impl FeatureTopic {
    fn alarm(&self, keep: usize) -> TopicAlarm {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, terms) in &self.unusual {
            for term in terms {
                *counts.entry(term).or_default() += 1;
            }
        }
        let mut shared: Vec<(&str, usize)> = counts.into_iter().filter(|(_, n)| *n >= 2).collect();
        shared.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        TopicAlarm {
            info: Arc::clone(&self.info),
            examples_after: self.unusual.iter().map(|(id, _)| id.clone()).collect(),
            recent_terms: shared
                .into_iter()
                .take(keep)
                .map(|(t, _)| t.to_owned())
                .collect(),
        }
    }
}

impl Topic {
    fn alarm(&self) -> TopicAlarm {
        TopicAlarm {
            info: Arc::clone(&self.info),
            examples_after: Vec::new(),
            recent_terms: Vec::new(),
        }
    }
}

/// The embedding drift tests of one scope.
pub struct EmbeddingDrift {
    settings: EmbeddingSettings,
    seed: u64,
    phase: EmbeddingPhase,
    reference: Option<Arc<Reference>>,
}

impl std::fmt::Debug for EmbeddingDrift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingDrift")
            .field("settings", &self.settings)
            .field("testing", &self.is_testing())
            .finish_non_exhaustive()
    }
}

impl EmbeddingDrift {
    /// A scope that learns its reference from its first `reference_size` observations.
    pub fn learning(settings: EmbeddingSettings, seed: u64) -> EmbeddingDrift {
        EmbeddingDrift {
            phase: EmbeddingPhase::Learning(Box::new(Reference {
                version: REFERENCE_VERSION,
                source: "learned".to_owned(),
                ..Reference::default()
            })),
            settings,
            seed,
            reference: None,
        }
    }

    /// A scope testing against a stored reference. Returns `None` when the reference holds too
    /// few embeddings for the window.
    pub fn from_reference(
        settings: EmbeddingSettings,
        seed: u64,
        reference: Arc<Reference>,
    ) -> Option<EmbeddingDrift> {
        let tests = fit(&settings, seed, &reference)?;
        Some(EmbeddingDrift {
            settings,
            seed,
            phase: EmbeddingPhase::Testing(Box::new(tests)),
            reference: Some(reference),
        })
    }

    /// Whether the reference is learned and tests are running.
    pub fn is_testing(&self) -> bool {
        matches!(self.phase, EmbeddingPhase::Testing(_))
    }

    /// The reference in force, once there is one.
    pub fn reference(&self) -> Option<&Arc<Reference>> {
        self.reference.as_ref()
    }

    /// Reference observations gathered so far (while learning), or the reference's size.
    pub fn reference_len(&self) -> usize {
        match &self.phase {
            EmbeddingPhase::Learning(reference) => reference.outputs.len(),
            EmbeddingPhase::Testing(_) => self.reference.as_ref().map_or(0, |r| r.outputs.len()),
        }
    }

    /// Adds one exchange's embeddings, with its context (topic scores, prompt words). While
    /// learning, returns no results, and once the reference is complete, `Learned` with it
    /// (for the caller to persist).
    pub fn observe(
        &mut self,
        prompt: &[f32],
        output: &[f32],
        context: Context<'_>,
    ) -> EmbeddingStep {
        let scores = context.topic_scores;
        let topic_features = &self.settings.config.topic_features;
        match &mut self.phase {
            EmbeddingPhase::Learning(learning) => {
                learning.outputs.push(output.to_vec());
                learning.prompts.push(prompt.to_vec());
                for name in topic_features {
                    learning
                        .topic_scores
                        .entry(name.clone())
                        .or_default()
                        .push(super::score_of(scores, name));
                }
                if self.settings.config.names_topics() {
                    learning.prompt_terms.push(context.prompt_terms.to_vec());
                    learning.request_ids.push(context.request_id.to_owned());
                }
                if learning.outputs.len() < self.settings.config.reference.size {
                    return EmbeddingStep::Learning;
                }
                let mut reference = std::mem::take(&mut **learning);
                reference.created_at =
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                let reference = Arc::new(reference);
                match fit(&self.settings, self.seed, &reference) {
                    Some(tests) => {
                        self.phase = EmbeddingPhase::Testing(Box::new(tests));
                        self.reference = Some(Arc::clone(&reference));
                        EmbeddingStep::Learned(reference)
                    }
                    None => {
                        // Too few points for the window (cannot happen with a checked config):
                        // keep learning from what there is.
                        **learning = Arc::unwrap_or_clone(reference);
                        EmbeddingStep::Learning
                    }
                }
            }
            EmbeddingPhase::Testing(tests) => {
                let point = tests.projection.apply(&self.settings.point(prompt, output));
                let mut results = Vec::with_capacity(2);
                if let Some(stat) = tests.overall.push(point.clone()) {
                    if stat.alarm {
                        tests.overall.reset();
                    }
                    results.push(TestResult {
                        test: "mmd".to_owned(),
                        statistic: stat.statistic,
                        threshold: stat.threshold,
                        p_value: stat.p_value,
                        direction: None,
                        alarm: stat.alarm,
                        topic: None,
                    });
                }
                let prompt_point = tests.projection.apply(prompt);
                if let Some((kmeans, topics)) = &mut tests.topics {
                    let id = kmeans.assign(&prompt_point);
                    if let Some(topic) = topics.get_mut(id)
                        && let Some(online) = &mut topic.mmd
                        && let Some(stat) = online.push(point)
                    {
                        if stat.alarm {
                            online.reset();
                        }
                        results.push(TestResult {
                            test: format!("mmd/topic-{id}"),
                            statistic: stat.statistic,
                            threshold: stat.threshold,
                            p_value: stat.p_value,
                            direction: None,
                            alarm: stat.alarm,
                            topic: stat.alarm.then(|| topic.alarm()),
                        });
                    }
                }
                if let Some((kmeans, topics)) = &mut tests.feature_topics {
                    let id = kmeans.assign(prompt);
                    if let Some(topic) = topics.get_mut(id) {
                        let settings = &self.settings;
                        let mut alarmed = false;
                        let first = results.len();
                        for (name, test) in &mut topic.features {
                            let Some(score) = super::score_of(scores, name) else {
                                continue;
                            };
                            let Some(stat) = test.observe(score, &mut tests.rng) else {
                                continue;
                            };
                            if stat.p_high <= 0.05 && !context.request_id.is_empty() {
                                if topic.unusual.len() >= UNUSUAL_KEPT {
                                    topic.unusual.pop_front();
                                }
                                topic.unusual.push_back((
                                    context.request_id.to_owned(),
                                    context.prompt_terms.to_vec(),
                                ));
                            }
                            if stat.alarm {
                                test.reset();
                                alarmed = true;
                            }
                            results.push(TestResult {
                                test: format!("{name}/topic-{id}"),
                                statistic: stat.statistic,
                                threshold: stat.threshold,
                                p_value: stat.p_high,
                                direction: Some(stat.direction),
                                alarm: stat.alarm,
                                topic: None,
                            });
                        }
                        if alarmed {
                            let alarm = topic.alarm(settings.config.topic_terms);
                            for result in results[first..].iter_mut().filter(|r| r.alarm) {
                                result.topic = Some(alarm.clone());
                            }
                        }
                    }
                }
                EmbeddingStep::Tested(results)
            }
        }
    }

    /// The topics of the scope's MMD tests and of its topic-feature tests, once its
    /// reference is fitted.
    pub fn topics(&self) -> (Vec<Arc<TopicInfo>>, Vec<Arc<TopicInfo>>) {
        match &self.phase {
            EmbeddingPhase::Testing(tests) => (
                tests
                    .topics
                    .iter()
                    .flat_map(|(_, topics)| topics.iter().map(|t| Arc::clone(&t.info)))
                    .collect(),
                tests
                    .feature_topics
                    .iter()
                    .flat_map(|(_, topics)| topics.iter().map(|t| Arc::clone(&t.info)))
                    .collect(),
            ),
            EmbeddingPhase::Learning(_) => (Vec::new(), Vec::new()),
        }
    }

    /// The MMD topic and the feature topic a prompt falls in, once the reference is fitted.
    pub fn topic_of(&self, prompt: &[f32]) -> (Option<usize>, Option<usize>) {
        match &self.phase {
            EmbeddingPhase::Testing(tests) => {
                let point = tests.projection.apply(prompt);
                (
                    tests.topics.as_ref().map(|(k, _)| k.assign(&point)),
                    tests.feature_topics.as_ref().map(|(k, _)| k.assign(prompt)),
                )
            }
            EmbeddingPhase::Learning(_) => (None, None),
        }
    }
}

/// What one embedding observation did.
#[derive(Debug)]
pub enum EmbeddingStep {
    /// Still learning the reference.
    Learning,
    /// The reference just became complete; testing starts with the next observation.
    Learned(Arc<Reference>),
    /// Test results (empty while windows fill).
    Tested(Vec<TestResult>),
}

/// Fits the projection, the overall test and the topic tests. `None` when there are too few
/// points for the window.
fn fit(settings: &EmbeddingSettings, seed: u64, reference: &Reference) -> Option<EmbeddingTests> {
    let (outputs, prompts) = (&reference.outputs, &reference.prompts);
    let mut rng = StdRng::seed_from_u64(seed);
    // A random projection, not PCA: components fitted on the reference capture its own
    // sampling noise, so new outputs look drifted against it (measured on the development
    // data: clean windows scored five null standard deviations high).
    let width = outputs.first().map_or(0, Vec::len);
    let projection = Projection::random(width, settings.config.projection_dims, &mut rng);
    let projected: Vec<Vec<f32>> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let prompt = prompts.get(i).map_or(&[][..], Vec::as_slice);
            projection.apply(&settings.point(prompt, o))
        })
        .collect();
    let overall = MmdReference::fit_scaled(
        projected.clone(),
        settings.config.window,
        settings.test_ert,
        settings.config.bootstraps,
        settings.config.bandwidth_scale,
        &mut rng,
    )?;
    let paired = prompts.len() == outputs.len();
    let prompt_points: Vec<Vec<f32>> = if paired {
        prompts.iter().map(|p| projection.apply(p)).collect()
    } else {
        Vec::new()
    };
    let topics = (settings.config.topics > 1 && paired).then(|| {
        let (kmeans, members, infos) = cluster(
            settings,
            &prompt_points,
            reference,
            settings.config.topics,
            &mut rng,
        );
        let topics = members
            .into_iter()
            .zip(infos)
            .map(|(members, info)| Topic {
                // A topic too small for a window of its own is left to the overall test.
                mmd: MmdReference::fit_scaled(
                    members.iter().map(|&i| projected[i].clone()).collect(),
                    settings.config.topic_window,
                    settings.test_ert,
                    settings.config.bootstraps,
                    settings.config.bandwidth_scale,
                    &mut rng,
                )
                .map(|r| OnlineMmd::new(Arc::new(r))),
                info,
            })
            .collect();
        (kmeans, topics)
    });
    let feature_topics = (settings.config.feature_topics > 1
        && !settings.config.topic_features.is_empty()
        && paired)
        .then(|| {
            // On the whole prompt embeddings: finer subjects need more than the projection keeps.
            let (kmeans, members, infos) = cluster(
                settings,
                prompts,
                reference,
                settings.config.feature_topics,
                &mut rng,
            );
            let topics = members
                .into_iter()
                .zip(infos)
                .map(|(members, info)| FeatureTopic {
                    info,
                    features: settings
                        .config
                        .topic_features
                        .iter()
                        .map(|name| {
                            let scores: Vec<f64> = reference
                                .topic_scores
                                .get(name)
                                .map(|all| {
                                    members
                                        .iter()
                                        .filter_map(|&i| all.get(i).copied().flatten())
                                        .collect()
                                })
                                .unwrap_or_default();
                            let test = OnlineConformalCusum::new(
                                scores,
                                settings.config.topic_reference,
                                TOPIC_SCORES_KEPT,
                                settings.test_ert,
                                settings.config.topic_direction,
                                TOPIC_CALIBRATOR,
                            );
                            (name.clone(), test)
                        })
                        .collect(),
                    unusual: std::collections::VecDeque::new(),
                })
                .collect();
            (kmeans, topics)
        });
    Some(EmbeddingTests {
        projection,
        overall: OnlineMmd::new(Arc::new(overall)),
        topics,
        feature_topics,
        rng: StdRng::seed_from_u64(seed ^ 0x7091_c5ee),
    })
}

/// Clusters the reference prompts into `k` topics: the k-means, each topic's members (indices
/// into the reference) and its name.
fn cluster(
    settings: &EmbeddingSettings,
    prompt_points: &[Vec<f32>],
    reference: &Reference,
    k: usize,
    rng: &mut StdRng,
) -> (KMeans, Vec<Vec<usize>>, Vec<Arc<TopicInfo>>) {
    let kmeans = KMeans::fit(prompt_points, k, rng);
    let k = kmeans.centroids.len();
    let assignment: Vec<usize> = prompt_points.iter().map(|p| kmeans.assign(p)).collect();
    let names = name_topics(
        &reference.prompt_terms,
        &assignment,
        k,
        settings.config.topic_terms,
    );
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, &topic) in assignment.iter().enumerate() {
        members[topic].push(i);
    }
    let infos = members
        .iter()
        .zip(names)
        .enumerate()
        .map(|(id, (members, terms))| {
            Arc::new(TopicInfo {
                id,
                terms,
                examples_before: members
                    .iter()
                    .filter_map(|&i| reference.request_ids.get(i))
                    .filter(|id| !id.is_empty())
                    .take(TOPIC_EXAMPLES)
                    .cloned()
                    .collect(),
                size: members.len(),
            })
        })
        .collect();
    (kmeans, members, infos)
}

enum FeaturePhase {
    Learning(Vec<f64>),
    Testing(ConformalCusum),
}

/// The feature drift tests of one scope: one CUSUM per feature.
pub struct FeatureDrift {
    settings: FeatureSettings,
    rng: StdRng,
    features: BTreeMap<String, FeaturePhase>,
    reference: Option<Arc<Reference>>,
}

impl std::fmt::Debug for FeatureDrift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureDrift")
            .field("settings", &self.settings)
            .field("features", &self.features.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What one feature observation did.
#[derive(Debug, Default)]
pub struct FeatureStep {
    /// Results of the features under test.
    pub results: Vec<TestResult>,
    /// Set when this observation completed some feature's reference: the whole reference so
    /// far, for the caller to persist.
    pub learned: Option<Arc<Reference>>,
}

impl FeatureDrift {
    /// A scope learning each feature's reference from its first `reference_size` scores; a
    /// `reference` given (a stored or offline one) supplies the features it holds.
    pub fn new(
        settings: FeatureSettings,
        seed: u64,
        features: &[String],
        reference: Option<Arc<Reference>>,
    ) -> FeatureDrift {
        let mut phases = BTreeMap::new();
        for name in features {
            let phase = match reference.as_ref().and_then(|r| r.features.get(name)) {
                Some(scores) if !scores.is_empty() => {
                    FeaturePhase::Testing(ConformalCusum::watching(
                        scores.clone(),
                        settings.test_ert,
                        settings.directions.get(name).copied().unwrap_or_default(),
                    ))
                }
                _ => FeaturePhase::Learning(Vec::with_capacity(settings.reference_size)),
            };
            phases.insert(name.clone(), phase);
        }
        FeatureDrift {
            rng: StdRng::seed_from_u64(seed),
            settings,
            features: phases,
            reference,
        }
    }

    /// Whether every feature is under test.
    pub fn is_testing(&self) -> bool {
        self.features
            .values()
            .all(|p| matches!(p, FeaturePhase::Testing(_)))
    }

    /// The stored reference, when one was given or learned.
    pub fn reference(&self) -> Option<&Arc<Reference>> {
        self.reference.as_ref()
    }

    /// Adds one exchange's scores (features it does not know are ignored).
    pub fn observe(&mut self, scores: &[(String, f64)]) -> FeatureStep {
        let mut step = FeatureStep::default();
        let mut completed = false;
        for (name, score) in scores {
            if !score.is_finite() {
                continue;
            }
            let Some(phase) = self.features.get_mut(name) else {
                continue;
            };
            match phase {
                FeaturePhase::Learning(scores) => {
                    scores.push(*score);
                    if scores.len() >= self.settings.reference_size {
                        let scores = std::mem::take(scores);
                        let mut reference =
                            self.reference
                                .as_deref()
                                .cloned()
                                .unwrap_or_else(|| Reference {
                                    version: REFERENCE_VERSION,
                                    source: "learned".to_owned(),
                                    ..Reference::default()
                                });
                        reference.features.insert(name.clone(), scores.clone());
                        reference.created_at =
                            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                                .to_string();
                        self.reference = Some(Arc::new(reference));
                        *phase = FeaturePhase::Testing(ConformalCusum::watching(
                            scores,
                            self.settings.test_ert,
                            self.settings
                                .directions
                                .get(name)
                                .copied()
                                .unwrap_or_default(),
                        ));
                        completed = true;
                    }
                }
                FeaturePhase::Testing(cusum) => {
                    if let Some(stat) = cusum.observe(*score, &mut self.rng) {
                        if stat.alarm {
                            cusum.reset();
                        }
                        step.results.push(TestResult {
                            test: name.clone(),
                            statistic: stat.statistic,
                            threshold: stat.threshold,
                            p_value: stat.p_high,
                            direction: Some(stat.direction),
                            alarm: stat.alarm,
                            topic: None,
                        });
                    }
                }
            }
        }
        if completed {
            step.learned = self.reference.clone();
        }
        step
    }
}

/// Everything a scope tests, as the drift monitor and the offline replay both drive it.
#[derive(Debug)]
pub struct ScopeTests {
    embedding: Option<(String, EmbeddingDrift)>,
    features: Option<(String, FeatureDrift)>,
}

/// What one observation of a scope did.
#[derive(Debug, Default)]
pub struct ScopeStep {
    /// Each test result with its detector and the reference it was compared to.
    pub results: Vec<(String, TestResult, Option<Arc<Reference>>)>,
    /// References completed by this observation, by detector, for the caller to persist.
    pub learned: Vec<(String, Arc<Reference>)>,
}

impl ScopeTests {
    /// The tests of `plan` for one scope, identified by `scope` (model and route, for the seed).
    /// `stored(detector)` gives a reference to start from (a saved or offline one), if any.
    pub fn new(
        plan: &super::DriftPlan,
        scope: &[&str],
        stored: impl Fn(&str) -> Option<Arc<Reference>>,
    ) -> ScopeTests {
        let test_ert = plan.test_ert();
        let embedding = plan.embedding.as_ref().map(|(name, config)| {
            let settings = EmbeddingSettings {
                config: config.clone(),
                test_ert,
            };
            let mut parts = vec![name.as_str()];
            parts.extend_from_slice(scope);
            let seed = scope_seed(&parts);
            let state = stored(name)
                .filter(|r| !r.outputs.is_empty())
                .and_then(|r| EmbeddingDrift::from_reference(settings.clone(), seed, r))
                .unwrap_or_else(|| EmbeddingDrift::learning(settings, seed));
            (name.clone(), state)
        });
        let features = plan.features.as_ref().map(|(name, config)| {
            let settings = FeatureSettings {
                directions: config.directions.clone(),
                reference_size: config.reference.size,
                test_ert,
            };
            let mut parts = vec![name.as_str()];
            parts.extend_from_slice(scope);
            let state =
                FeatureDrift::new(settings, scope_seed(&parts), &config.features, stored(name));
            (name.clone(), state)
        });
        ScopeTests {
            embedding,
            features,
        }
    }

    /// The embedding tests, when the plan has them.
    pub fn embedding(&self) -> Option<&EmbeddingDrift> {
        self.embedding.as_ref().map(|(_, e)| e)
    }

    /// Adds one exchange: its feature scores, and its prompt and output embeddings when it was
    /// sampled (which also yields the `prompt_distance` feature).
    pub fn observe(
        &mut self,
        scores: &[(String, f64)],
        embeddings: Option<(&[f32], &[f32])>,
        context: Context<'_>,
    ) -> ScopeStep {
        let mut step = ScopeStep::default();
        let mut scores = scores.to_vec();
        if let Some((prompt, output)) = embeddings {
            scores.push((
                super::PROMPT_DISTANCE_FEATURE.to_owned(),
                super::prompt_distance(prompt, output),
            ));
            if let Some((name, state)) = &mut self.embedding {
                match state.observe(prompt, output, context) {
                    EmbeddingStep::Learning => {}
                    EmbeddingStep::Learned(reference) => {
                        step.learned.push((name.clone(), reference));
                    }
                    EmbeddingStep::Tested(results) => {
                        let reference = state.reference().cloned();
                        step.results.extend(
                            results
                                .into_iter()
                                .map(|r| (name.clone(), r, reference.clone())),
                        );
                    }
                }
            }
        }
        if let Some((name, state)) = &mut self.features
            && !scores.is_empty()
        {
            let observed = state.observe(&scores);
            if let Some(reference) = observed.learned {
                step.learned.push((name.clone(), reference));
            }
            let reference = state.reference().cloned();
            step.results.extend(
                observed
                    .results
                    .into_iter()
                    .map(|r| (name.clone(), r, reference.clone())),
            );
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use rand::RngExt;

    use super::*;

    /// A prompt embedding near axis `axis` of 8 dimensions, and an output embedding.
    fn point(axis: usize, rng: &mut StdRng) -> (Vec<f32>, Vec<f32>) {
        let mut prompt: Vec<f32> = (0..8).map(|_| rng.random::<f32>() * 0.05).collect();
        prompt[axis] += 1.0;
        let output: Vec<f32> = (0..8).map(|_| rng.random::<f32>()).collect();
        (prompt, output)
    }

    #[test]
    fn a_topic_whose_scores_rise_is_alarmed_and_named_by_its_prompts_words() {
        let config = EmbeddingDriftConfig {
            reference: super::super::ReferenceSource {
                size: 120,
                file: None,
            },
            window: 20,
            topics: 0,
            topic_window: 10,
            projection_dims: 4,
            bootstraps: 200,
            topic_features: vec!["sentiment.negative".to_owned()],
            topic_direction: Watch::Up,
            feature_topics: 2,
            topic_reference: 20,
            ..EmbeddingDriftConfig::default()
        };
        let settings = EmbeddingSettings {
            config,
            test_ert: 1e4,
        };
        let mut drift = EmbeddingDrift::learning(settings, 7);
        let mut rng = StdRng::seed_from_u64(1);
        let words = |axis: usize| -> Vec<String> {
            let words: &[&str] = if axis == 0 {
                &["recipe", "cake", "oven"]
            } else {
                &["planet", "moon", "orbit"]
            };
            words.iter().map(|w| w.to_string()).collect()
        };
        let mut alarm = None;
        for t in 0..600 {
            let axis = t % 2;
            let (prompt, output) = point(axis, &mut rng);
            // From exchange 300 on, the answers on axis 0 score far above anything before.
            let score = if t >= 300 && axis == 0 {
                5.0
            } else {
                rng.random::<f64>()
            };
            let scores = [("sentiment.negative".to_owned(), score)];
            let terms = words(axis);
            let id = format!("r{t}");
            let step = drift.observe(
                &prompt,
                &output,
                Context {
                    request_id: &id,
                    prompt_terms: &terms,
                    topic_scores: &scores,
                },
            );
            if let EmbeddingStep::Tested(results) = step {
                for result in results.into_iter().filter(|r| r.alarm) {
                    assert!(t >= 300, "false alarm at {t}: {result:?}");
                    alarm.get_or_insert((t, result));
                }
            }
        }
        let (t, result) = alarm.expect("the risen topic was not alarmed");
        assert!(t < 360, "alarmed late, at {t}");
        let topic = result.topic.expect("the alarm names no topic");
        assert!(
            result.test.starts_with("sentiment.negative/topic-"),
            "{}",
            result.test
        );
        assert!(
            topic
                .info
                .terms
                .iter()
                .any(|w| w == "recipe" || w == "cake"),
            "{topic:?}"
        );
        assert!(!topic.info.terms.iter().any(|w| w == "planet"), "{topic:?}");
        assert_eq!(topic.info.examples_before.len(), TOPIC_EXAMPLES);
        // Most examples after the change are the risen answers (even exchanges from 300 on);
        // the rest are earlier answers that were unusual by chance (5% of them).
        let risen = topic
            .examples_after
            .iter()
            .filter(|id| {
                let n: usize = id.trim_start_matches('r').parse().unwrap();
                n >= 300 && n.is_multiple_of(2)
            })
            .count();
        assert!(risen * 2 > topic.examples_after.len(), "{topic:?}");
        assert!(
            topic.recent_terms.iter().any(|w| w == "recipe"),
            "{topic:?}"
        );
        // The topic a cake prompt falls in is the one named.
        let (prompt, _) = point(0, &mut rng);
        assert_eq!(drift.topic_of(&prompt).1, Some(topic.info.id));
    }
}
