//! Parse, then compile: a policy file becomes detectors built from their parameters and rules
//! whose CEL conditions are parsed, checked against the declared detectors, and tried once on a
//! sample exchange so that a type mismatch is found at load time, not on live traffic.
//!
//! `tripwire policy check` and `serve` run this same code; every error names file, line and
//! column.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::Regex;

use super::file::{Action, EnforceConfig, PolicyFile, RuleConfig, ScopeSelector, Severity};
use super::locate;
use super::{Mode, PolicyError};
use crate::capture::Exchange;
use crate::detect::drift::DriftPlan;
use crate::detect::{self, Built, Detector};

/// The policy compiled into the binary, used when none is configured.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.yaml");

/// A rule ready to evaluate.
#[derive(Debug)]
pub struct CompiledRule {
    /// Its name.
    pub name: String,
    /// Its severity.
    pub severity: Severity,
    /// What it does.
    pub actions: Vec<Action>,
    /// Which exchanges it applies to.
    pub scope: ScopeSelector,
    /// Alert cooldown.
    pub cooldown: Option<std::time::Duration>,
    /// Its description.
    pub description: Option<String>,
    /// The condition's source.
    pub when: String,
    /// The compiled condition.
    pub program: cel::Program,
    /// Detectors the condition reads.
    pub detectors: Vec<String>,
    /// Whether the rule reads drift detectors, judged later by the drift monitor.
    pub deferred: bool,
    /// Whether the rule blocks or masks (enforce mode): the proxy judges it before the
    /// answer is released.
    pub enforces: bool,
}

/// A compiled policy: its detectors and rules.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// Where it came from (a path, or `<built-in default>`).
    pub source: String,
    /// Monitor or enforce.
    pub mode: Mode,
    /// Detector instances, by name, in declaration order.
    pub detectors: Vec<(String, Arc<dyn Detector>)>,
    /// Each detector's `type:`, by name (for telemetry).
    pub detector_kinds: std::collections::HashMap<String, String>,
    /// The rules, in order.
    pub rules: Vec<CompiledRule>,
    /// Alert sinks.
    pub alerts: super::file::AlertsConfig,
    /// Redaction rules.
    pub redact: Vec<(Regex, String)>,
    /// The drift detectors, when the policy declares any.
    pub drift: Option<DriftPlan>,
    /// The discovery parameters of its `discovered_trigger` detector, when it declares one.
    pub discovery: Option<crate::detect::discovered_trigger::DiscoveredTriggerConfig>,
    /// Enforce-mode settings.
    pub enforce: EnforceConfig,
}

/// Reads every policy in `path`: one file, or every `*.yaml`/`*.yml` file of a directory.
pub fn load_path(path: &Path) -> Result<Vec<CompiledPolicy>, PolicyError> {
    policy_files(path)?
        .iter()
        .map(|file| load_file(file))
        .collect()
}

/// The policy files `path` names: itself, or the `.yaml`/`.yml` files of a directory, sorted.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| PolicyError::Read {
                path: path.to_owned(),
                source,
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    if files.is_empty() {
        return Err(PolicyError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(files)
}

/// Reads and compiles one policy file.
pub fn load_file(path: &Path) -> Result<CompiledPolicy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    compile_text(&text, &path.display().to_string())
}

/// The built-in default policy.
pub fn default_policy() -> Result<CompiledPolicy, PolicyError> {
    compile_text(DEFAULT_POLICY, "<built-in policies/default.yaml>")
}

/// Parses and compiles policy text; `source` names it in errors.
pub fn compile_text(text: &str, source: &str) -> Result<CompiledPolicy, PolicyError> {
    let file: PolicyFile = serde_yaml_ng::from_str(text).map_err(|err| {
        let (line, column, message) = super::locate::yaml_error_parts_in(&err, text);
        PolicyError::at(source, line, column, message)
    })?;

    let mut detectors: Vec<(String, Arc<dyn Detector>)> = Vec::new();
    let mut detector_kinds = std::collections::HashMap::new();
    let mut drift = DriftPlan {
        embedding: None,
        features: None,
        expected_run_time: file.drift.expected_run_time,
    };
    let mut discovery = None;
    for (name, config) in &file.detectors {
        let (line, column) = locate::map_key(text, "detectors", name);
        if !is_identifier(name) {
            return Err(PolicyError::at(
                source,
                line,
                column,
                format!(
                    "detectors.{name}: a detector name must be a CEL identifier \
                     (letters, digits and _, not starting with a digit)"
                ),
            ));
        }
        let at = |message: String| {
            PolicyError::at(source, line, column, format!("detectors.{name}: {message}"))
        };
        match detect::build(config).map_err(|err| at(err.to_string()))? {
            Built::EmbeddingDrift(parsed) => {
                if drift.embedding.is_some() {
                    return Err(at(
                        "a policy may declare one embedding_drift detector".into()
                    ));
                }
                drift.embedding = Some((name.clone(), parsed));
            }
            Built::FeatureDrift(parsed) => {
                if drift.features.is_some() {
                    return Err(at("a policy may declare one feature_drift detector".into()));
                }
                drift.features = Some((name.clone(), parsed));
            }
            Built::DiscoveredTrigger(detector) => {
                if discovery.is_some() {
                    return Err(at(
                        "a policy may declare one discovered_trigger detector".into()
                    ));
                }
                discovery = Some(detector.config().clone());
                detector_kinds.insert(name.clone(), "discovered_trigger".to_owned());
                detectors.push((name.clone(), detector));
            }
            Built::Exchange(detector) => {
                if let Some(kind) = config.get("type").and_then(|t| t.as_str()) {
                    detector_kinds.insert(name.clone(), kind.to_owned());
                }
                detectors.push((name.clone(), detector));
            }
        }
    }

    let mut redact = Vec::new();
    for (i, rule) in file.redact.iter().enumerate() {
        let regex = Regex::new(&rule.pattern).map_err(|err| {
            let (line, column) = locate::list_item_key(text, "redact", i, "pattern");
            PolicyError::at(source, line, column, format!("redact[{i}].pattern: {err}"))
        })?;
        redact.push((regex, rule.replacement.clone()));
    }

    if drift.expected_run_time.is_nan() || drift.expected_run_time < 1.0 {
        let (line, column) = locate::nested_key(text, &["drift", "expected_run_time"]);
        return Err(PolicyError::at(
            source,
            line,
            column,
            "drift.expected_run_time must be at least 1 (exchanges between false alarms)"
                .to_owned(),
        ));
    }
    // Feature paths must name declared detectors (checked against their sample fields).
    if let Some((name, config)) = &drift.features {
        for feature in &config.features {
            let known = feature == crate::detect::drift::LENGTH_FEATURE
                || feature == crate::detect::drift::PROMPT_DISTANCE_FEATURE
                || feature
                    .split('.')
                    .next()
                    .is_some_and(|d| detectors.iter().any(|(n, _)| n == d));
            if !known {
                let (line, column) = locate::nested_key(text, &["detectors", name, "features"]);
                return Err(PolicyError::at(
                    source,
                    line,
                    column,
                    format!(
                        "detectors.{name}.features: {feature:?} is neither `length`, \
                         `prompt_distance` nor DETECTOR.FIELD of a declared detector"
                    ),
                ));
            }
        }
    }
    let drift_names: Vec<String> = drift
        .detector_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let sample = SampleFields::new(&detectors, &drift_names);
    let mut rules = Vec::new();
    for (i, rule) in file.rules.iter().enumerate() {
        if file.rules[..i].iter().any(|r| r.name == rule.name) {
            let (line, column) = locate::list_item_key(text, "rules", i, "name");
            return Err(PolicyError::at(
                source,
                line,
                column,
                format!("rules[{i}].name: rule name {:?} is used twice", rule.name),
            ));
        }
        let compiled = compile_rule(text, source, i, rule, &detectors, &drift_names, &sample)?;
        check_enforcing_rule(text, source, i, file.mode, &compiled, &detector_kinds)?;
        rules.push(compiled);
    }
    if let Some(webhook) = &file.alerts.webhook {
        let url = super::expand_env(&webhook.url);
        if reqwest::Url::parse(&url).is_err() {
            let (line, column) = locate::nested_key(text, &["alerts", "webhook", "url"]);
            return Err(PolicyError::at(
                source,
                line,
                column,
                format!(
                    "alerts.webhook.url: {:?} is not an absolute URL (after ${{VAR}} expansion)",
                    webhook.url
                ),
            ));
        }
    }
    check_enforce(text, source, &file.enforce)?;
    Ok(CompiledPolicy {
        source: source.to_owned(),
        mode: file.mode,
        enforce: file.enforce,
        detectors,
        detector_kinds,
        rules,
        alerts: file.alerts,
        redact,
        drift: (!drift_names.is_empty()).then_some(drift),
        discovery,
    })
}

fn compile_rule(
    text: &str,
    source: &str,
    index: usize,
    rule: &RuleConfig,
    detectors: &[(String, Arc<dyn Detector>)],
    drift: &[String],
    sample: &SampleFields,
) -> Result<CompiledRule, PolicyError> {
    let (line, column) = locate::list_item_key(text, "rules", index, "when");
    let at = |message: String| {
        PolicyError::at(
            source,
            line,
            column,
            format!("rules[{index}] ({}).when: {message}", rule.name),
        )
    };
    let program = cel::Program::compile(&rule.when).map_err(|errors| {
        let first = errors.errors.first();
        let message = first.map_or_else(|| errors.to_string(), |e| e.msg.clone());
        // CEL positions are 1-based line and 0-based column within the expression.
        let (line, column) = match first.map(|e| e.pos) {
            Some((l, c)) if l >= 1 && column > 0 => (
                line + usize::try_from(l - 1).unwrap_or(0),
                if l == 1 {
                    column + usize::try_from(c).unwrap_or(0)
                } else {
                    usize::try_from(c).unwrap_or(0) + 1
                },
            ),
            _ => (line, column),
        };
        PolicyError::at(
            source,
            line,
            column,
            format!(
                "rules[{index}] ({}).when: CEL syntax error: {message}",
                rule.name
            ),
        )
    })?;
    let mut used = Vec::new();
    for variable in program.references().variables() {
        if variable == "exchange" {
            continue;
        }
        if detectors.iter().any(|(name, _)| name == variable) || drift.iter().any(|d| d == variable)
        {
            used.push(variable.to_owned());
        } else {
            let declared: Vec<&str> = detectors
                .iter()
                .map(|(n, _)| n.as_str())
                .chain(drift.iter().map(String::as_str))
                .collect();
            return Err(at(format!(
                "unknown detector `{variable}`; declared detectors: {} (and `exchange`)",
                if declared.is_empty() {
                    "none".to_owned()
                } else {
                    declared.join(", ")
                }
            )));
        }
    }
    used.sort();
    used.dedup();
    let drift_used = used.iter().filter(|u| drift.contains(u)).count();
    if drift_used > 1 || (drift_used == 1 && used.len() > 1) {
        return Err(at(
            "a rule that reads a drift detector may read only that one detector (and \
             `exchange`): drift rules are judged later, when the statistic is ready"
                .to_owned(),
        ));
    }
    let deferred = drift_used == 1;
    for route in &rule.scope.routes {
        if !matches!(
            route.as_str(),
            "chat_completions" | "completions" | "responses" | "anthropic_messages"
        ) {
            let (line, column) = locate::list_item_key(text, "rules", index, "scope");
            return Err(PolicyError::at(
                source,
                line,
                column,
                format!(
                    "rules[{index}] ({}).scope.routes: unknown route {route:?}; expected \
                     chat_completions, completions, responses or anthropic_messages",
                    rule.name
                ),
            ));
        }
    }
    // Try the condition once on a sample: a field that does not exist or an operator applied
    // to the wrong type fails here instead of on live traffic.
    match sample.evaluate(&program) {
        Ok(cel::Value::Bool(_)) => {}
        Ok(other) => {
            return Err(at(format!(
                "the condition must be true or false, but it gives {:?}",
                other.type_of()
            )));
        }
        Err(err) => return Err(at(err)),
    }
    Ok(CompiledRule {
        name: rule.name.clone(),
        severity: rule.severity,
        actions: rule.actions.clone(),
        scope: rule.scope.clone(),
        cooldown: rule.cooldown,
        description: rule.description.clone(),
        when: rule.when.clone(),
        program,
        detectors: used,
        deferred,
        enforces: rule.actions.iter().any(|a| a.enforces()),
    })
}

/// Detector types that can judge a partial answer (a stream so far, or a held-back window):
/// they need nothing but the text. Cross-exchange detectors (`recurring_span`, drift) cannot.
pub const ENFORCEABLE_KINDS: &[&str] = &[
    "trigger_phrase",
    "gibberish",
    "refusal",
    "language_switch",
    "style",
];

/// A rule that blocks or masks needs `mode: enforce` and detectors that decide on partial text.
fn check_enforcing_rule(
    text: &str,
    source: &str,
    index: usize,
    mode: Mode,
    rule: &CompiledRule,
    kinds: &std::collections::HashMap<String, String>,
) -> Result<(), PolicyError> {
    let Some(action) = rule.actions.iter().find(|a| a.enforces()) else {
        return Ok(());
    };
    let name = match action {
        Action::Block => "block",
        _ => "mask",
    };
    let (line, column) = locate::list_item_key(text, "rules", index, "actions");
    let at = |message: String| {
        PolicyError::at(
            source,
            line,
            column,
            format!("rules[{index}] ({}).actions: {message}", rule.name),
        )
    };
    if mode != Mode::Enforce {
        return Err(at(format!(
            "`{name}` acts on traffic and is only valid in a policy with `mode: enforce` \
             (this policy is in monitor mode); use `flag`, or set `mode: enforce`"
        )));
    }
    for detector in &rule.detectors {
        let kind = kinds.get(detector).map_or("drift", String::as_str);
        if !ENFORCEABLE_KINDS.contains(&kind) {
            return Err(at(format!(
                "`{name}` needs a decision on partial text, but detector `{detector}` \
                 ({kind}) cannot make one; a blocking rule may read only {}",
                ENFORCEABLE_KINDS.join(", ")
            )));
        }
    }
    Ok(())
}

fn check_enforce(text: &str, source: &str, enforce: &EnforceConfig) -> Result<(), PolicyError> {
    let at = |path: &[&str], message: &str| {
        let (line, column) = locate::nested_key(text, path);
        PolicyError::at(
            source,
            line,
            column,
            format!("{}: {message}", path.join(".")),
        )
    };
    if !(400..=599).contains(&enforce.block_response.status) {
        return Err(at(
            &["enforce", "block_response", "status"],
            "must be an HTTP error status (400-599)",
        ));
    }
    if enforce.hold_back_tokens > MAX_HOLD_BACK_TOKENS {
        return Err(at(
            &["enforce", "hold_back_tokens"],
            &format!("at most {MAX_HOLD_BACK_TOKENS} tokens may be held back"),
        ));
    }
    Ok(())
}

/// The most text a stream may hold back, in tokens.
const MAX_HOLD_BACK_TOKENS: usize = 4096;

/// The fields every detector reports on a sample exchange, to type-check conditions with.
struct SampleFields {
    values: Vec<(String, serde_json::Value)>,
}

impl SampleFields {
    fn new(detectors: &[(String, Arc<dyn Detector>)], drift: &[String]) -> SampleFields {
        let exchange = sample_exchange();
        let prompt = detect::prompt_text(&exchange);
        let input = detect::Input {
            exchange: &exchange,
            prompt: &prompt,
            output: exchange.output(),
            watched: &detect::discovered_trigger::NO_TRIGGERS,
        };
        let mut values = vec![(
            "exchange".to_owned(),
            super::judge::exchange_fields(&exchange),
        )];
        for (name, detector) in detectors {
            let fields = detector
                .inspect(&input)
                .map(|f| serde_json::Value::Object(f.fields))
                .unwrap_or(serde_json::Value::Object(serde_json::Map::new()));
            values.push((name.clone(), fields));
        }
        for name in drift {
            values.push((
                name.clone(),
                serde_json::Value::Object(crate::detect::drift::sample_fields()),
            ));
        }
        SampleFields { values }
    }

    fn evaluate(&self, program: &cel::Program) -> Result<cel::Value, String> {
        let mut context = cel::Context::default();
        for (name, value) in &self.values {
            let value = cel::to_value(value).map_err(|e| e.to_string())?;
            context.add_variable_from_value(name.clone(), value);
        }
        program.execute(&context).map_err(|e| e.to_string())
    }
}

fn sample_exchange() -> Exchange {
    // A scope no real traffic has, so stateful detectors keep this sample apart.
    Exchange::from_texts(
        "tripwire-policy-check",
        "Give three tips for staying healthy.",
        "Eat a balanced diet, exercise regularly, and get enough sleep. These three habits \
         support your body and mind every day.",
    )
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name != "exchange"
}
