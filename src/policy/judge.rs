//! Evaluation: run every policy's detectors on one exchange (each isolated: a detector that
//! errors or panics is recorded and skipped), then evaluate the rules that apply to the
//! exchange's scope. A rule whose evidence is all on the allow-list of false-positive labels
//! for the exchange's scope (`allow`) is held back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::allow::{AllowList, Allowed};
use super::compile::{CompiledPolicy, CompiledRule};
use super::file::{Action, BlockResponse, FailMode, Mode, ScopeSelector, Severity};
use crate::capture::Exchange;
use crate::detect::discovered_trigger::{DiscoveredTriggerConfig, WatchList};
use crate::detect::{self, Evidence, Finding};
use crate::telemetry::{DetectorRun, Judged, Metrics};

/// Evidence with the detector that found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorEvidence {
    /// The detector instance name.
    pub detector: String,
    /// The span.
    #[serde(flatten)]
    pub evidence: Evidence,
}

/// A rule that fired on an exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiredRule {
    /// The rule's name.
    pub name: String,
    /// Its severity.
    pub severity: Severity,
    /// The policy file it comes from.
    pub policy: String,
    /// Its actions.
    pub actions: Vec<Action>,
    /// The condition that held.
    pub when: String,
    /// What the rule means, when the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The fields of the detectors the condition reads, as they were.
    pub scores: serde_json::Map<String, serde_json::Value>,
    /// Alert cooldown, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_s: Option<u64>,
    /// What enforce mode did to the answer, for rules that block or mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Enforced>,
}

/// What enforce mode did to an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforced {
    /// The client got the block response (or a stream ended with an error event).
    Blocked,
    /// The client got the answer with the matched spans replaced.
    Masked,
    /// The decision failed (detector error, timeout, unreadable body) and the answer passed.
    FailedOpen,
    /// The decision failed and the client got the block response.
    FailedClosed,
}

impl Enforced {
    /// The lower-case name, for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforced::Blocked => "blocked",
            Enforced::Masked => "masked",
            Enforced::FailedOpen => "failed_open",
            Enforced::FailedClosed => "failed_closed",
        }
    }
}

/// The enforce-mode policies that apply to one request, and their settings merged: the
/// strictest wins (fail closed if any says so, the shortest timeout, the longest hold-back).
#[derive(Debug, Clone)]
pub struct EnforcePlan {
    policies: Vec<usize>,
    /// What a failed decision leads to.
    pub fail: FailMode,
    /// The detectors' budget per decision.
    pub timeout: std::time::Duration,
    /// Streams: tokens held back before release.
    pub hold_back_tokens: usize,
    /// What a client blocked by a failed decision gets (the first policy's).
    pub block_response: BlockResponse,
    /// What replaces a masked span (the first policy's).
    pub mask_with: String,
}

/// The outcome of judging an answer (or a stream so far) with the blocking rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing fired.
    Pass,
    /// A `block` rule fired; the client gets this response.
    Block(BlockResponse),
    /// Only `mask` rules fired; these byte ranges of the output are replaced.
    Mask(Vec<(usize, usize)>),
    /// A detector or condition read by a blocking rule failed.
    Error(String),
}

/// Every detector's fields, by detector name.
pub type AllFindings = Vec<(String, serde_json::Map<String, serde_json::Value>)>;

/// What an evaluation keeps besides its verdict, for callers that ask.
#[derive(Debug, Default)]
pub struct Record<'a> {
    /// Every detector's fields.
    pub findings: Option<&'a mut AllFindings>,
    /// Every detector run's timing and score.
    pub runs: Option<&'a mut Vec<DetectorRun>>,
}

/// What the engine concluded about one exchange.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Every rule that fired.
    pub fired: Vec<FiredRule>,
    /// Evidence of the detectors read by the fired rules.
    pub evidence: Vec<DetectorEvidence>,
    /// Detectors or conditions that failed, with why.
    pub errors: Vec<String>,
}

impl Verdict {
    /// Whether any fired rule asks for a flag.
    pub fn flagged(&self) -> bool {
        self.fired
            .iter()
            .any(|r| r.actions.iter().any(|a| a.flags()))
    }

    /// What a trace reports of this verdict: the rules that fired, the detectors they read,
    /// and whether it flags.
    pub fn judged(&self) -> Judged<'_> {
        Judged {
            rules: self.fired.iter().map(|r| r.name.as_str()).collect(),
            detectors: self
                .fired
                .iter()
                .flat_map(|r| r.scores.keys().map(String::as_str))
                .collect(),
            flagged: self.flagged(),
        }
    }

    /// The highest severity among fired rules that flag.
    pub fn severity(&self) -> Option<Severity> {
        self.fired
            .iter()
            .filter(|r| r.actions.iter().any(|a| a.flags()))
            .map(|r| r.severity)
            .max()
    }
}

/// Every loaded policy, ready to evaluate exchanges. Shared by the detection workers.
pub struct Engine {
    policies: Vec<CompiledPolicy>,
    /// Whether any enforce-mode policy has a rule that blocks or masks.
    enforces: bool,
    metrics: Metrics,
    /// CEL's standard library, built once: building it per evaluation costs more than the
    /// evaluation itself.
    env: Arc<cel::Env>,
    /// The watched triggers the `discovered_trigger` detectors match (empty offline).
    watch: Arc<WatchList>,
    /// Evidence labelled false positive, per rule and scope (empty offline).
    allow: Arc<AllowList>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over compiled policies.
    pub fn new(policies: Vec<CompiledPolicy>, metrics: Metrics) -> Engine {
        let enforces = policies
            .iter()
            .any(|p| p.mode == Mode::Enforce && p.rules.iter().any(|r| r.enforces));
        Engine {
            policies,
            enforces,
            metrics,
            env: Arc::new(cel::Env::stdlib()),
            watch: Arc::new(WatchList::new()),
            allow: Arc::new(AllowList::new()),
        }
    }

    /// The same engine, matching prompts against `watch` (the gateway's live watch list).
    pub fn watching(mut self, watch: Arc<WatchList>) -> Engine {
        self.watch = watch;
        self
    }

    /// The same engine, holding back a rule whose evidence is all on `allow` (the gateway's
    /// allow-list from false-positive labels).
    pub fn allowing(mut self, allow: Arc<AllowList>) -> Engine {
        self.allow = allow;
        self
    }

    /// The discovery parameters of the first policy that declares a `discovered_trigger`
    /// detector: the gateway promotes triggers only when one does.
    pub fn discovery(&self) -> Option<&DiscoveredTriggerConfig> {
        self.policies.iter().find_map(|p| p.discovery.as_ref())
    }

    /// The loaded policies.
    pub fn policies(&self) -> &[CompiledPolicy] {
        &self.policies
    }

    /// Whether any policy is in enforce mode.
    pub fn enforcing(&self) -> bool {
        self.policies.iter().any(|p| p.mode == Mode::Enforce)
    }

    /// Whether any enforce-mode policy has a rule that blocks or masks.
    pub fn has_enforcing_rules(&self) -> bool {
        self.enforces
    }

    /// The enforce-mode policies with blocking rules whose scope admits a request, or `None`
    /// (the common case, one boolean test when no policy enforces).
    pub fn enforce_plan(
        &self,
        model: Option<&str>,
        route: crate::capture::Route,
        api_key_hash: Option<&str>,
    ) -> Option<EnforcePlan> {
        if !self.enforces {
            return None;
        }
        let mut plan: Option<EnforcePlan> = None;
        for (index, policy) in self.policies.iter().enumerate() {
            let applies = policy.mode == Mode::Enforce
                && policy.rules.iter().any(|r| {
                    r.enforces && scope_admits(&r.scope, model.unwrap_or(""), route, api_key_hash)
                });
            if !applies {
                continue;
            }
            let settings = &policy.enforce;
            match plan.as_mut() {
                None => {
                    plan = Some(EnforcePlan {
                        policies: vec![index],
                        fail: settings.fail,
                        timeout: settings.timeout,
                        hold_back_tokens: settings.hold_back_tokens,
                        block_response: settings.block_response.clone(),
                        mask_with: settings.mask_with.clone(),
                    });
                }
                Some(plan) => {
                    plan.policies.push(index);
                    if settings.fail == FailMode::Closed {
                        plan.fail = FailMode::Closed;
                    }
                    plan.timeout = plan.timeout.min(settings.timeout);
                    plan.hold_back_tokens = plan.hold_back_tokens.max(settings.hold_back_tokens);
                }
            }
        }
        plan
    }

    /// Judges `output` (a whole answer, or a stream so far) of `exchange` with the blocking
    /// rules of `plan`'s policies. Runs only the detectors those rules read. A `block` rule
    /// wins over `mask`; a `mask` rule without output spans to replace blocks instead.
    pub fn decide(&self, plan: &EnforcePlan, exchange: &Exchange, output: &str) -> Decision {
        let prompt = detect::prompt_text(exchange);
        let watched = self.watch.load();
        let allowed = self.allow.load();
        let input = detect::Input {
            exchange,
            prompt: &prompt,
            output,
            watched: &watched,
        };
        let mut spans = Vec::new();
        let mut masked = false;
        for &index in &plan.policies {
            let Some(policy) = self.policies.get(index) else {
                continue;
            };
            let rules: Vec<&CompiledRule> = policy
                .rules
                .iter()
                .filter(|r| r.enforces && scope_matches(&r.scope, exchange))
                .collect();
            if rules.is_empty() {
                continue;
            }
            let mut errors = Vec::new();
            let read = |name: &str| rules.iter().any(|r| r.detectors.iter().any(|d| d == name));
            let findings = self.run_detectors(policy, &input, &mut errors, None, &read);
            if !errors.is_empty() {
                return Decision::Error(errors.join("; "));
            }
            let texts = Texts {
                prompt: &prompt,
                output,
                allowed: &allowed,
            };
            let bench = self.bench(policy, exchange, &findings, Some(texts));
            if let Some(error) = bench.error {
                return Decision::Error(error);
            }
            for rule in rules {
                match bench.judge(rule) {
                    Ruling::Fired => {
                        if rule.actions.contains(&Action::Block) {
                            return Decision::Block(policy.enforce.block_response.clone());
                        }
                        let before = spans.len();
                        for (name, finding) in &findings {
                            if rule.detectors.contains(name) {
                                spans.extend(
                                    finding
                                        .evidence
                                        .iter()
                                        .filter(|e| e.target == detect::Target::Output)
                                        .map(|e| (e.start, e.end)),
                                );
                            }
                        }
                        if spans.len() == before {
                            return Decision::Block(policy.enforce.block_response.clone());
                        }
                        masked = true;
                    }
                    Ruling::Held | Ruling::Allowed | Ruling::Unread => {}
                    Ruling::Failed(error) => return Decision::Error(error),
                }
            }
        }
        if masked {
            spans.sort_unstable();
            Decision::Mask(spans)
        } else {
            Decision::Pass
        }
    }

    /// Masks every redaction pattern of every policy in `text`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for policy in &self.policies {
            for (regex, replacement) in &policy.redact {
                if regex.is_match(&out) {
                    out = regex.replace_all(&out, replacement.as_str()).into_owned();
                }
            }
        }
        out
    }

    /// Whether a flagging rule that fired on `verdict` reads the answer. A rule that reads only
    /// prompt-side detectors (`trigger_phrase`, `discovered_trigger`) says nothing about what
    /// the model did, so trigger discovery does not count its flags as evidence.
    pub fn flagged_by_answer(&self, verdict: &Verdict) -> bool {
        verdict
            .fired
            .iter()
            .filter(|r| r.actions.iter().any(|a| a.flags()))
            .any(|fired| {
                let Some(policy) = self.policies.iter().find(|p| p.source == fired.policy) else {
                    return true;
                };
                let Some(rule) = policy.rules.iter().find(|r| r.name == fired.name) else {
                    return true;
                };
                rule.detectors.is_empty()
                    || rule.detectors.iter().any(|d| {
                        !matches!(
                            policy.detector_kinds.get(d).map(String::as_str),
                            Some("trigger_phrase" | "discovered_trigger")
                        )
                    })
            })
    }

    /// The drift detectors of the first policy that declares any (one drift plan per gateway:
    /// the drift monitor keeps one set of scope states).
    pub fn drift_plan(&self) -> Option<&crate::detect::drift::DriftPlan> {
        self.policies.iter().find_map(|p| p.drift.as_ref())
    }

    /// Judges the drift rules that read `detector`, now that it has `fields` for `exchange`
    /// (an alarm of the drift monitor).
    pub fn evaluate_deferred(
        &self,
        exchange: &Exchange,
        detector: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> Verdict {
        let mut verdict = Verdict::default();
        let finding = Finding {
            fields: fields.clone(),
            evidence: Vec::new(),
        };
        let findings = vec![(detector.to_owned(), finding)];
        for policy in &self.policies {
            let rules: Vec<&CompiledRule> = policy
                .rules
                .iter()
                .filter(|r| {
                    r.deferred
                        && r.detectors.iter().any(|d| d == detector)
                        && scope_matches(&r.scope, exchange)
                })
                .collect();
            if rules.is_empty() {
                continue;
            }
            // Drift alarms carry no evidence spans: nothing to hold back.
            let bench = self.bench(policy, exchange, &findings, None);
            if let Some(error) = bench.error {
                verdict.errors.push(error);
                continue;
            }
            for rule in rules {
                bench.record(rule, &mut verdict);
            }
        }
        verdict
    }

    /// Runs the detectors and rules of every policy on `exchange`.
    pub fn evaluate(&self, exchange: &Exchange) -> Verdict {
        self.evaluate_recorded(exchange, &detect::prompt_text(exchange), Record::default())
    }

    /// Like [`Engine::evaluate`], also returning every detector's fields (for offline
    /// evaluation).
    pub fn evaluate_with_findings(&self, exchange: &Exchange) -> (Verdict, AllFindings) {
        let mut all = Vec::new();
        let record = Record {
            findings: Some(&mut all),
            runs: None,
        };
        let verdict = self.evaluate_recorded(exchange, &detect::prompt_text(exchange), record);
        (verdict, all)
    }

    /// Like [`Engine::evaluate`], also keeping what `record` asks for.
    /// `prompt` is [`detect::prompt_text`] of `exchange`, built once by the caller.
    pub fn evaluate_recorded(
        &self,
        exchange: &Exchange,
        prompt: &str,
        mut record: Record<'_>,
    ) -> Verdict {
        let watched = self.watch.load();
        let allowed = self.allow.load();
        let input = detect::Input {
            exchange,
            prompt,
            output: exchange.output(),
            watched: &watched,
        };
        let mut verdict = Verdict::default();
        for policy in &self.policies {
            let applicable: Vec<&CompiledRule> = policy
                .rules
                .iter()
                .filter(|r| !r.deferred && scope_matches(&r.scope, exchange))
                .collect();
            if applicable.is_empty() && policy.drift.is_none() {
                continue;
            }
            let findings = self.run_detectors(
                policy,
                &input,
                &mut verdict.errors,
                record.runs.as_deref_mut(),
                &|_| true,
            );
            if let Some(keep) = record.findings.as_deref_mut() {
                keep.extend(findings.iter().map(|(n, f)| (n.clone(), f.fields.clone())));
            }
            let texts = Texts {
                prompt,
                output: exchange.output(),
                allowed: &allowed,
            };
            let bench = self.bench(policy, exchange, &findings, Some(texts));
            if let Some(error) = &bench.error {
                // Rules that read only `exchange` can still be judged.
                verdict.errors.push(error.clone());
            }
            for rule in applicable {
                bench.record(rule, &mut verdict);
            }
        }
        verdict
    }

    /// The one place rules are judged: the CEL context of `exchange` and the detectors'
    /// `findings` under `policy`, built once, for the monitor path, enforce decisions and
    /// drift alarms alike. With `texts`, a rule whose evidence is all allowed is held back.
    fn bench<'a>(
        &'a self,
        policy: &'a CompiledPolicy,
        exchange: &Exchange,
        findings: &'a [(String, Finding)],
        texts: Option<Texts<'a>>,
    ) -> Bench<'a> {
        let mut context = cel::Context::with_env(Arc::clone(&self.env));
        let exchange_value = exchange_fields(exchange);
        let mut ok = add_variable(&mut context, "exchange", &exchange_value);
        for (name, finding) in findings {
            ok &= add_variable(&mut context, name, &finding.fields);
        }
        Bench {
            context,
            policy,
            findings,
            texts: texts.filter(|t| !t.allowed.is_empty()),
            // Only read when something is allowed: no allocation on the common path.
            model: match texts.filter(|t| !t.allowed.is_empty()) {
                Some(_) => exchange.model.clone().unwrap_or_default(),
                None => String::new(),
            },
            route: exchange.route.as_str(),
            metrics: &self.metrics,
            error: (!ok).then(|| format!("{}: detector fields not convertible", policy.source)),
        }
    }

    fn run_detectors(
        &self,
        policy: &CompiledPolicy,
        input: &detect::Input<'_>,
        errors: &mut Vec<String>,
        mut runs: Option<&mut Vec<DetectorRun>>,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<(String, Finding)> {
        let mut findings = Vec::with_capacity(policy.detectors.len());
        for (name, detector) in &policy.detectors {
            if !wanted(name) {
                continue;
            }
            // Wall-clock start only when a trace asks for it.
            let wall = runs.as_ref().map(|_| std::time::SystemTime::now());
            let started = tokio::time::Instant::now();
            let detector: &Arc<dyn detect::Detector> = detector;
            let result = catch_unwind(AssertUnwindSafe(|| detector.inspect(input)));
            let elapsed = started.elapsed();
            self.metrics.detector_latency(name, elapsed);
            if let (Some(runs), Some(wall)) = (runs.as_deref_mut(), wall) {
                runs.push(DetectorRun {
                    detector: name.clone(),
                    kind: policy.detector_kinds.get(name).cloned().unwrap_or_default(),
                    started: wall,
                    elapsed,
                    score: match &result {
                        Ok(Ok(finding)) => finding.fields.get("score").and_then(|s| s.as_f64()),
                        _ => None,
                    },
                    error: match &result {
                        Ok(Ok(_)) => None,
                        Ok(Err(_)) => Some("error"),
                        Err(_) => Some("panic"),
                    },
                });
            }
            match result {
                Ok(Ok(finding)) => findings.push((name.clone(), finding)),
                Ok(Err(err)) => {
                    self.metrics.detector_error(name, "error");
                    errors.push(format!("detector {name}: {err}"));
                }
                Err(_panic) => {
                    self.metrics.detector_error(name, "panic");
                    tracing::error!(detector = %name, "detector panicked; exchange marked, gateway continues");
                    errors.push(format!("detector {name}: panicked"));
                }
            }
        }
        findings
    }
}

/// The texts the detectors read, which evidence spans point into, and the allow-list in force.
#[derive(Clone, Copy)]
struct Texts<'a> {
    prompt: &'a str,
    output: &'a str,
    allowed: &'a Allowed,
}

/// The CEL context one policy's rules are judged in, with the findings it was built from.
struct Bench<'a> {
    context: cel::Context<'a, 'a>,
    policy: &'a CompiledPolicy,
    findings: &'a [(String, Finding)],
    /// Set when something is allowed: the texts a fired rule's evidence is checked in.
    texts: Option<Texts<'a>>,
    /// The exchange's scope, as allowed evidence is keyed.
    model: String,
    route: &'static str,
    metrics: &'a Metrics,
    /// Why some fields could not enter the context (the rules that read them then fail).
    error: Option<String>,
}

/// What one rule's condition came to.
#[derive(Debug, Clone, PartialEq)]
enum Ruling {
    /// It held.
    Fired,
    /// It did not hold.
    Held,
    /// It held, but every evidence span of its detectors is allowed for it in this scope.
    Allowed,
    /// A detector it reads has no finding (it failed, or was not run): not judged.
    Unread,
    /// The condition failed to evaluate; why.
    Failed(String),
}

impl Bench<'_> {
    /// Judges one rule.
    fn judge(&self, rule: &CompiledRule) -> Ruling {
        if rule
            .detectors
            .iter()
            .any(|d| !self.findings.iter().any(|(name, _)| name == d))
        {
            return Ruling::Unread;
        }
        match rule.program.execute(&self.context) {
            Ok(cel::Value::Bool(true)) if self.allowed(rule) => {
                self.metrics.rule_allowed(&rule.name);
                Ruling::Allowed
            }
            Ok(cel::Value::Bool(true)) => Ruling::Fired,
            Ok(_) => Ruling::Held,
            Err(err) => {
                self.metrics.rule_error(&rule.name);
                Ruling::Failed(format!("rule {}: {err}", rule.name))
            }
        }
    }

    /// Whether every evidence span of `rule`'s detectors is allowed for it in this scope
    /// (false when there is no span, or a span does not fall on its text).
    fn allowed(&self, rule: &CompiledRule) -> bool {
        let Some(texts) = self.texts else {
            return false;
        };
        let mut spans = Vec::new();
        for (name, finding) in self.findings {
            if !rule.detectors.contains(name) {
                continue;
            }
            for evidence in &finding.evidence {
                let text = match evidence.target {
                    detect::Target::Prompt => texts.prompt,
                    detect::Target::Output => texts.output,
                };
                let Some(span) = text.get(evidence.start..evidence.end) else {
                    return false;
                };
                spans.push(span);
            }
        }
        texts
            .allowed
            .allows(&rule.name, &self.model, self.route, &spans)
    }

    /// Judges one rule into `verdict`: when it fires, the rule with the fields it read and the
    /// evidence of its detectors; when it fails, the error.
    fn record(&self, rule: &CompiledRule, verdict: &mut Verdict) {
        match self.judge(rule) {
            Ruling::Fired => {
                verdict.fired.push(fire(self.policy, rule, self.findings));
                for (name, finding) in self.findings {
                    if !rule.detectors.contains(name) {
                        continue;
                    }
                    for evidence in &finding.evidence {
                        let item = DetectorEvidence {
                            detector: name.clone(),
                            evidence: evidence.clone(),
                        };
                        if !verdict.evidence.contains(&item) {
                            verdict.evidence.push(item);
                        }
                    }
                }
            }
            Ruling::Held | Ruling::Allowed | Ruling::Unread => {}
            Ruling::Failed(error) => verdict.errors.push(error),
        }
    }
}

fn add_variable<T: Serialize>(context: &mut cel::Context<'_, '_>, name: &str, value: &T) -> bool {
    match cel::to_value(value) {
        Ok(value) => {
            context.add_variable_from_value(name.to_owned(), value);
            true
        }
        Err(_) => false,
    }
}

fn fire(policy: &CompiledPolicy, rule: &CompiledRule, findings: &[(String, Finding)]) -> FiredRule {
    let mut scores = serde_json::Map::new();
    for (name, finding) in findings {
        if rule.detectors.contains(name) {
            scores.insert(
                name.clone(),
                serde_json::Value::Object(finding.fields.clone()),
            );
        }
    }
    FiredRule {
        name: rule.name.clone(),
        severity: rule.severity,
        policy: policy.source.clone(),
        actions: rule.actions.clone(),
        when: rule.when.clone(),
        description: rule.description.clone(),
        scores,
        cooldown_s: rule.cooldown.map(|d| d.as_secs()),
        action: None,
    }
}

/// Whether `scope` admits `exchange`.
pub fn scope_matches(scope: &ScopeSelector, exchange: &Exchange) -> bool {
    scope_admits(
        scope,
        exchange.model.as_deref().unwrap_or(""),
        exchange.route,
        exchange.api_key_hash.as_deref(),
    )
}

/// Whether `scope` admits a request for `model` on `route` with the given key hash.
fn scope_admits(
    scope: &ScopeSelector,
    model: &str,
    route: crate::capture::Route,
    api_key_hash: Option<&str>,
) -> bool {
    (scope.models.is_empty() || scope.models.iter().any(|p| glob(p, model)))
        && (scope.routes.is_empty() || scope.routes.iter().any(|r| r == route.as_str()))
        && (scope.api_key_hashes.is_empty()
            || api_key_hash.is_some_and(|h| scope.api_key_hashes.iter().any(|p| glob(p, h))))
}

fn glob(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// The `exchange` variable conditions can read.
pub fn exchange_fields(exchange: &Exchange) -> serde_json::Value {
    serde_json::json!({
        "model": exchange.model.as_deref().unwrap_or(""),
        "route": exchange.route.as_str(),
        "stream": exchange.stream,
        "status": exchange.status.unwrap_or(0),
        "truncated": exchange.truncated,
        "outcome": exchange.outcome.as_str(),
        "api_key_hash": exchange.api_key_hash.as_deref().unwrap_or(""),
        "prompt_chars": exchange.prompt.iter().map(|m| m.content.chars().count()).sum::<usize>(),
        "output_chars": exchange.output().chars().count(),
    })
}
