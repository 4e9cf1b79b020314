//! Live reload: the policies and the parts of the configuration that neither bind a listener
//! nor size a queue are read again on SIGHUP, on `POST /admin/reload`, and when a watched file
//! changes.
//!
//! A reload validates everything before it swaps anything: the configuration file (with the
//! command-line overrides the gateway started with) and every policy file are parsed and
//! compiled first, and an error refuses the reload with the same file:line:col message as
//! `tripwire policy check` while the old set stays in force. The swap is one atomic pointer store
//! per part, and each exchange loads the rule set (each request the gateway) once: in-flight
//! exchanges finish under the set they started with.
//!
//! Applied live: policies and their alert sinks (cooldowns carry over), `upstream`, `limits`,
//! `admin_token`, `shutdown_grace`. Reported as needing a restart, and left as they were:
//! `listen`, `admin_listen`, `store`, `detect`, `inference`, `drift`, `reload`, and a change to
//! the policies' drift detectors. Drift state and references belong to the running drift
//! monitor, so every reload keeps them.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminToken, Reload, ReloadAnswer};
use crate::config::{Config, ConfigError};
use crate::detect::discovered_trigger::WatchList;
use crate::inspect::{ExchangeSink, Rules, SharedRules};
use crate::policy::allow::AllowList;
use crate::policy::{CompiledPolicy, Engine, PolicyError};
use crate::proxy::{Gateway, GatewayError};
use crate::runtime::Tasks;
use crate::telemetry::{Metrics, ReloadMetrics};

/// Reads the configuration again: the file, then the command-line overrides.
pub type LoadConfig = dyn Fn() -> Result<Config, ConfigError> + Send + Sync;

/// Where a reload reads the configuration from.
pub struct ReloadSource {
    load: Box<LoadConfig>,
    config_file: Option<PathBuf>,
}

impl std::fmt::Debug for ReloadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadSource")
            .field("config_file", &self.config_file)
            .finish_non_exhaustive()
    }
}

impl ReloadSource {
    /// Reads through `load`, which reads `config_file` (watched for changes when given) and
    /// applies the overrides the gateway was started with.
    pub fn new(
        config_file: Option<PathBuf>,
        load: impl Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
    ) -> ReloadSource {
        ReloadSource {
            load: Box::new(load),
            config_file,
        }
    }

    /// A configuration held in memory: a reload reads the policy files again and nothing else.
    pub fn fixed(config: Config) -> ReloadSource {
        ReloadSource::new(None, move || Ok(config.clone()))
    }
}

/// What asked for a reload (the `trigger` label of `tripwire_config_reloads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /admin/reload`.
    Admin,
    /// A watched file changed.
    Watch,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
            Trigger::Watch => "watch",
        }
    }
}

/// Why a reload was refused. The old configuration and policies stay in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A policy file is invalid.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// An alert sink could not be set up.
    #[error(transparent)]
    Alert(#[from] crate::alert::WebhookError),
    /// The upstream client could not be built.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The blocking task that read the files failed.
    #[error("reload task failed: {0}")]
    Task(String),
    /// Shutdown has begun.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// Counts reloads that took effect; the start-up configuration is generation 1.
    pub generation: u64,
    /// Policies now in force.
    pub policies: usize,
    /// Rules now in force.
    pub rules: usize,
    /// Sections that changed and took effect.
    pub applied: Vec<&'static str>,
    /// Sections that changed but take effect only at the next restart.
    pub restart_required: Vec<&'static str>,
}

/// What the gateway needs to build the parts a reload replaces.
#[derive(Debug)]
pub struct ReloadParts {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The rule set the detection workers read.
    pub rules: SharedRules,
    /// The gateway the proxy listener serves through.
    pub gateway: Arc<ArcSwapOption<Gateway>>,
    /// Where captured exchanges go (new gateways share it).
    pub sink: ExchangeSink,
    /// Where gateways spawn capture tasks.
    pub capture_tasks: Tasks,
    /// Where new alert senders run.
    pub alert_tasks: Tasks,
    /// Where a reload reads and compiles files (blocking threads).
    pub blocking: Tasks,
    /// The admin API's bearer token (reloadable).
    pub admin_token: Arc<AdminToken>,
    /// The gateway metrics.
    pub metrics: Metrics,
    /// The watched triggers every engine matches prompts against.
    pub watch: Arc<WatchList>,
    /// The allow-list from false-positive labels every engine holds rules back with.
    pub allow: Arc<AllowList>,
}

#[derive(Debug)]
struct State {
    config: Arc<Config>,
    /// `None` once shutdown began: no gateway may be built after the capture side closed.
    sink: Option<ExchangeSink>,
    generation: u64,
}

/// Reloads the configuration and policies; one reload at a time.
#[derive(Debug)]
pub struct Reloader {
    source: ReloadSource,
    state: tokio::sync::Mutex<State>,
    rules: SharedRules,
    gateway: Arc<ArcSwapOption<Gateway>>,
    capture_tasks: Tasks,
    alert_tasks: Tasks,
    blocking: Tasks,
    admin_token: Arc<AdminToken>,
    metrics: Metrics,
    watch: Arc<WatchList>,
    allow: Arc<AllowList>,
    reload_metrics: ReloadMetrics,
    /// The drift plan the running drift monitor follows, to tell when a reload changes it.
    drift_plan: Option<crate::detect::drift::DriftPlan>,
}

impl Reloader {
    /// A reloader over the parts the gateway started with.
    pub fn new(
        source: ReloadSource,
        parts: ReloadParts,
        reload_metrics: ReloadMetrics,
    ) -> Reloader {
        let drift_plan = parts.rules.load().engine.drift_plan().cloned();
        Reloader {
            source,
            state: tokio::sync::Mutex::new(State {
                config: parts.config,
                sink: Some(parts.sink),
                generation: 1,
            }),
            rules: parts.rules,
            gateway: parts.gateway,
            capture_tasks: parts.capture_tasks,
            alert_tasks: parts.alert_tasks,
            blocking: parts.blocking,
            admin_token: parts.admin_token,
            metrics: parts.metrics,
            watch: parts.watch,
            allow: parts.allow,
            reload_metrics,
            drift_plan,
        }
    }

    /// The configuration in force.
    pub async fn config(&self) -> Arc<Config> {
        Arc::clone(&self.state.lock().await.config)
    }

    /// Reads, validates and swaps in the configuration and policies; on an error nothing
    /// changes. Logged and counted either way.
    pub async fn reload(&self, trigger: Trigger) -> Result<ReloadOutcome, ReloadError> {
        let result = self.reload_inner().await;
        self.reload_metrics.count(trigger.as_str(), result.is_ok());
        match &result {
            Ok(outcome) => {
                tracing::info!(
                    trigger = trigger.as_str(),
                    generation = outcome.generation,
                    policies = outcome.policies,
                    rules = outcome.rules,
                    applied = ?outcome.applied,
                    "configuration reloaded"
                );
                if !outcome.restart_required.is_empty() {
                    tracing::warn!(
                        sections = ?outcome.restart_required,
                        "changed settings take effect only after a restart; the running values stay"
                    );
                }
            }
            Err(err) => tracing::error!(
                trigger = trigger.as_str(),
                error = %err,
                "reload refused; the previous configuration and policies stay in force"
            ),
        }
        result
    }

    async fn reload_inner(&self) -> Result<ReloadOutcome, ReloadError> {
        let mut state = self.state.lock().await;
        let sink = state.sink.clone().ok_or(ReloadError::ShuttingDown)?;
        // Everything that can fail happens before the first swap.
        let (next, policies) = self.read().await?;
        let old = Arc::clone(&state.config);
        let mut restart_required = restart_required(&old, &next);
        // The sections that reload live come from the new file; the rest stays as it runs.
        let config = Arc::new(Config {
            upstream: next.upstream,
            limits: next.limits,
            admin_token: next.admin_token,
            shutdown_grace: next.shutdown_grace,
            policies: next.policies,
            ..(*old).clone()
        });
        let engine = Arc::new(
            Engine::new(policies, self.metrics.clone())
                .watching(Arc::clone(&self.watch))
                .allowing(Arc::clone(&self.allow)),
        );
        if engine.drift_plan() != self.drift_plan.as_ref() {
            restart_required.push("policies.drift");
        }
        let mut applied = vec!["policies"];
        let gateway_changed = old.upstream != config.upstream || old.limits != config.limits;
        let gateway = if gateway_changed {
            Some(Arc::new(Gateway::new(
                Arc::clone(&config),
                self.metrics.clone(),
                sink,
                self.capture_tasks.clone(),
                Arc::clone(&self.rules),
            )?))
        } else {
            None
        };
        let current = self.rules.load_full();
        let alerts = if alert_sinks(&current.engine) == alert_sinks(&engine)
            && super::rules_alert(&current.engine) == super::rules_alert(&engine)
        {
            current.alerts.clone()
        } else {
            let mut alerts =
                super::start_alerts(&engine, &config, &self.metrics, &self.alert_tasks)?;
            if let (Some(handle), Some(previous)) = (alerts.as_mut(), &current.alerts) {
                handle.keep_cooldowns_of(previous);
            }
            alerts
        };

        // The swap.
        let policies = engine.policies().len();
        let rules: usize = engine.policies().iter().map(|p| p.rules.len()).sum();
        self.rules.store(Arc::new(Rules { engine, alerts }));
        if let Some(gateway) = gateway {
            self.gateway.store(Some(gateway));
            if old.upstream != config.upstream {
                applied.push("upstream");
            }
            if old.limits != config.limits {
                applied.push("limits");
            }
        }
        if old.admin_token.as_ref().map(|t| t.expose().to_owned())
            != config.admin_token.as_ref().map(|t| t.expose().to_owned())
        {
            self.admin_token.set(super::admin_token(&config));
            applied.push("admin_token");
        }
        if old.shutdown_grace != config.shutdown_grace {
            applied.push("shutdown_grace");
        }
        state.config = config;
        state.generation += 1;
        self.reload_metrics.succeeded(state.generation);
        Ok(ReloadOutcome {
            generation: state.generation,
            policies,
            rules,
            applied,
            restart_required,
        })
    }

    /// Reads the configuration and compiles the policies on a blocking thread.
    async fn read(&self) -> Result<(Config, Vec<CompiledPolicy>), ReloadError> {
        let config = (self.source.load)()?;
        self.blocking
            .spawn_blocking("reload-read", move || {
                let policies = super::load_policies(&config)?;
                Ok((config, policies))
            })
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))?
    }

    /// Ends reloading for shutdown and drops this side's hold on the capture side (the sink and
    /// the gateway), so the detection queue closes once in-flight exchanges are handed over.
    pub async fn close(&self) {
        let mut state = self.state.lock().await;
        state.sink = None;
        self.gateway.store(None);
    }

    /// Drops this side's hold on the alert queue, so the alert sender drains and exits once
    /// the detection and drift workers are done with it. Call after [`Reloader::close`].
    pub fn release_alerts(&self) {
        let current = self.rules.load_full();
        self.rules.store(Arc::new(Rules {
            engine: Arc::clone(&current.engine),
            alerts: None,
        }));
    }

    /// Watches the configuration file and the policy files, reloading when their contents
    /// change, until `stop`. Unreadable files are skipped for that round; an invalid edit is
    /// refused once and tried again when the files change again.
    /// `baseline` is [`Reloader::fingerprint`] taken when the configuration in force was read.
    pub async fn watch(
        self: Arc<Self>,
        baseline: u64,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut last = baseline;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let now = self.fingerprint().await;
            if now != last {
                last = now;
                // Logged and counted inside.
                let _outcome = self.reload(Trigger::Watch).await;
            }
        }
    }

    /// A hash of the watched files' paths and contents.
    pub async fn fingerprint(&self) -> u64 {
        let policies = self.state.lock().await.config.policies.clone();
        let config_file = self.source.config_file.clone();
        self.blocking
            .spawn_blocking("reload-fingerprint", move || {
                let mut files: Vec<PathBuf> = config_file.into_iter().collect();
                if let Some(path) = policies
                    && let Ok(found) = crate::policy::policy_files(&path)
                {
                    files.extend(found);
                }
                let mut hasher = DefaultHasher::new();
                for file in files {
                    file.hash(&mut hasher);
                    std::fs::read(&file).ok().hash(&mut hasher);
                }
                hasher.finish()
            })
            .await
            .unwrap_or(0)
    }
}

impl Reload for Reloader {
    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ReloadAnswer> + Send + '_>> {
        Box::pin(async move {
            match Reloader::reload(self, Trigger::Admin).await {
                Ok(outcome) => {
                    ReloadAnswer::Reloaded(serde_json::to_value(&outcome).unwrap_or_default())
                }
                Err(ReloadError::ShuttingDown) => ReloadAnswer::ShuttingDown,
                Err(err) => ReloadAnswer::Refused(err.to_string()),
            }
        })
    }
}

/// The sections whose change needs a restart: they bind listeners, size queues and worker
/// pools, or belong to state that lives for the whole process.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.admin_listen != new.admin_listen {
        changed.push("admin_listen");
    }
    let sections: [(&'static str, bool); 5] = [
        ("store", old.store != new.store),
        ("detect", old.detect != new.detect),
        ("inference", old.inference != new.inference),
        ("drift", old.drift != new.drift),
        ("reload", old.reload != new.reload),
    ];
    changed.extend(sections.iter().filter(|(_, c)| *c).map(|(name, _)| *name));
    changed
}

/// The alert sinks of an engine's policies, comparable across reloads.
fn alert_sinks(engine: &Engine) -> Vec<&crate::policy::AlertsConfig> {
    engine.policies().iter().map(|p| &p.alerts).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_store_and_worker_changes_need_a_restart() {
        let old = Config::default();
        let mut new = Config::default();
        assert!(restart_required(&old, &new).is_empty());
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.store.queue += 1;
        new.detect.workers += 1;
        new.upstream.url = "http://example.com".to_owned();
        new.limits.max_request_body_bytes += 1;
        assert_eq!(restart_required(&old, &new), ["listen", "store", "detect"]);
    }

    #[test]
    fn sections_compare_by_every_field() {
        let old = Config::default();
        let mut new = Config::default();
        assert_eq!(old.upstream, new.upstream);
        new.upstream.idle_timeout += Duration::from_millis(1);
        assert_ne!(old.upstream, new.upstream);
    }
}
