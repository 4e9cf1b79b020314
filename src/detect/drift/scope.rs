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
use super::conformal::ConformalCusum;
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
    Learning {
        outputs: Vec<Vec<f32>>,
        prompts: Vec<Vec<f32>>,
    },
    Testing(Box<EmbeddingTests>),
}

struct EmbeddingTests {
    projection: Projection,
    overall: OnlineMmd,
    topics: Option<(KMeans, Vec<Option<OnlineMmd>>)>,
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
            phase: EmbeddingPhase::Learning {
                outputs: Vec::with_capacity(settings.config.reference.size),
                prompts: Vec::with_capacity(settings.config.reference.size),
            },
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
        let tests = fit(&settings, seed, &reference.outputs, &reference.prompts)?;
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
            EmbeddingPhase::Learning { outputs, .. } => outputs.len(),
            EmbeddingPhase::Testing(_) => self.reference.as_ref().map_or(0, |r| r.outputs.len()),
        }
    }

    /// Adds one exchange's embeddings. While learning, returns no results, and once the
    /// reference is complete, `Learned` with it (for the caller to persist).
    pub fn observe(&mut self, prompt: &[f32], output: &[f32]) -> EmbeddingStep {
        match &mut self.phase {
            EmbeddingPhase::Learning { outputs, prompts } => {
                outputs.push(output.to_vec());
                prompts.push(prompt.to_vec());
                if outputs.len() < self.settings.config.reference.size {
                    return EmbeddingStep::Learning;
                }
                let reference = Arc::new(Reference {
                    version: REFERENCE_VERSION,
                    source: "learned".to_owned(),
                    created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                        .to_string(),
                    outputs: std::mem::take(outputs),
                    prompts: std::mem::take(prompts),
                    features: BTreeMap::new(),
                });
                match fit(
                    &self.settings,
                    self.seed,
                    &reference.outputs,
                    &reference.prompts,
                ) {
                    Some(tests) => {
                        self.phase = EmbeddingPhase::Testing(Box::new(tests));
                        self.reference = Some(Arc::clone(&reference));
                        EmbeddingStep::Learned(reference)
                    }
                    None => EmbeddingStep::Learning,
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
                    });
                }
                if let Some((kmeans, windows)) = &mut tests.topics {
                    let topic = kmeans.assign(&tests.projection.apply(prompt));
                    if let Some(Some(online)) = windows.get_mut(topic)
                        && let Some(stat) = online.push(point)
                    {
                        if stat.alarm {
                            online.reset();
                        }
                        results.push(TestResult {
                            test: format!("mmd/topic-{topic}"),
                            statistic: stat.statistic,
                            threshold: stat.threshold,
                            p_value: stat.p_value,
                            direction: None,
                            alarm: stat.alarm,
                        });
                    }
                }
                EmbeddingStep::Tested(results)
            }
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
fn fit(
    settings: &EmbeddingSettings,
    seed: u64,
    outputs: &[Vec<f32>],
    prompts: &[Vec<f32>],
) -> Option<EmbeddingTests> {
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
    let topics = (settings.config.topics > 1 && prompts.len() == outputs.len()).then(|| {
        let prompt_points: Vec<Vec<f32>> = prompts.iter().map(|p| projection.apply(p)).collect();
        let kmeans = KMeans::fit(&prompt_points, settings.config.topics, &mut rng);
        let mut members: Vec<Vec<Vec<f32>>> = vec![Vec::new(); kmeans.centroids.len()];
        for (prompt, output) in prompt_points.iter().zip(&projected) {
            members[kmeans.assign(prompt)].push(output.clone());
        }
        let windows = members
            .into_iter()
            .map(|points| {
                // A topic too small for a window of its own is left to the overall test.
                MmdReference::fit_scaled(
                    points,
                    settings.config.topic_window,
                    settings.test_ert,
                    settings.config.bootstraps,
                    settings.config.bandwidth_scale,
                    &mut rng,
                )
                .map(|r| OnlineMmd::new(Arc::new(r)))
            })
            .collect();
        (kmeans, windows)
    });
    Some(EmbeddingTests {
        projection,
        overall: OnlineMmd::new(Arc::new(overall)),
        topics,
    })
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
                    FeaturePhase::Testing(ConformalCusum::new(scores.clone(), settings.test_ert))
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
                        *phase = FeaturePhase::Testing(ConformalCusum::new(
                            scores,
                            self.settings.test_ert,
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
    ) -> ScopeStep {
        let mut step = ScopeStep::default();
        let mut scores = scores.to_vec();
        if let Some((prompt, output)) = embeddings {
            scores.push((
                super::PROMPT_DISTANCE_FEATURE.to_owned(),
                super::prompt_distance(prompt, output),
            ));
            if let Some((name, state)) = &mut self.embedding {
                match state.observe(prompt, output) {
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
