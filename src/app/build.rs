//! Building the whole gateway from its configuration: store and writer, detection, drift,
//! alerts, capture, the proxy and admin listeners, in that order, each handed what it needs at
//! construction. Every task runs under one root tracker, one child per shutdown phase
//! (stopping is in `shutdown.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::admin::{self, AdminParts, AdminState, AdminToken};
use crate::alert::AlertHandle;
use crate::app::reload::{ReloadParts, ReloadSource, Reloader};
use crate::config::Config;
use crate::detect::discovered_trigger::WatchList;
use crate::inspect::discovery::Discovery;
use crate::inspect::{Detection, ExchangeSink, Rules, SharedRules};
use crate::policy::allow::AllowList;
use crate::policy::{CompiledPolicy, Engine, PolicyError};
use crate::proxy::{self, Gateway, GatewayError};
use crate::runtime::Tasks;
use crate::store::{Store, StoreError, StoreLocation, TriggerState, WriterConfig, run_writer};
use crate::telemetry::{Metrics, Otel, ReloadMetrics};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}; pick another address with --{flag}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The flag that sets it.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gateway could not be built.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// A policy is invalid.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// An alert sink could not be set up.
    #[error(transparent)]
    Alert(#[from] crate::alert::WebhookError),
    /// The embedding model the drift detectors need could not be loaded.
    #[error("the policy's drift detectors need the embedding model: {0}")]
    Inference(#[from] crate::infer::InferError),
    /// The drift monitor could not start.
    #[error(transparent)]
    Drift(#[from] crate::detect::drift::monitor::MonitorError),
}

/// A running gateway.
#[derive(Debug)]
pub struct Server {
    /// The root of every task below: cancelling it cancels them all.
    pub(super) root: Tasks,
    pub(super) proxy_addr: SocketAddr,
    pub(super) admin_addr: SocketAddr,
    pub(super) admin: Arc<AdminState>,
    pub(super) reloader: Arc<Reloader>,
    pub(super) watch_tasks: Tasks,
    pub(super) proxy_accept: Tasks,
    pub(super) proxy_connections: Tasks,
    pub(super) admin_tasks: Tasks,
    pub(super) capture_tasks: Tasks,
    pub(super) detect_tasks: Tasks,
    pub(super) drift_tasks: Tasks,
    pub(super) writer_tasks: Tasks,
    pub(super) alert_tasks: Tasks,
    pub(super) metrics: Metrics,
    pub(super) otel: Option<Arc<Otel>>,
}

impl Server {
    /// Opens the store, binds both listeners and starts serving. A reload reads the policy
    /// files again; the configuration stays as given.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let source = ReloadSource::fixed(config.clone());
        Server::start_reloadable(config, source).await
    }

    /// [`Server::start`], reloading the configuration from `source`.
    pub async fn start_reloadable(
        config: Config,
        source: ReloadSource,
    ) -> Result<Server, ServerError> {
        let config = Arc::new(config);
        let root = Tasks::new();
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let otel = start_otel(&metrics);

        let location = config.store.location();
        let writer_tasks = root.child();
        let exchanges_tx = start_store(&config, &root, &writer_tasks, &metrics).await?;

        let (discovery, allow) = start_discovery(&location, &root).await?;
        let policies = super::load_policies(&config)?;
        let rule_count: usize = policies.iter().map(|p| p.rules.len()).sum();
        let engine = Arc::new(
            Engine::new(policies, metrics.clone())
                .watching(Arc::clone(discovery.list()))
                .allowing(Arc::clone(&allow)),
        );
        let alert_tasks = root.child();
        let alerts = super::start_alerts(&engine, &config, &metrics, &alert_tasks)?;
        let policy_count = engine.policies().len();
        let rules: SharedRules = Arc::new(ArcSwap::from_pointee(Rules {
            engine: Arc::clone(&engine),
            alerts,
        }));
        let drift_tasks = root.child();
        let drift = match engine.drift_plan() {
            Some(plan) => Some(
                start_drift(
                    plan.clone(),
                    &config,
                    Detection {
                        rules: Arc::clone(&rules),
                        store: exchanges_tx.clone(),
                        metrics: metrics.clone(),
                        drift: None,
                        discovery: None,
                    },
                    &drift_tasks,
                    &mut registry,
                )
                .await?,
            ),
            None => None,
        };
        drop(engine);
        let detect_tasks = root.child();
        let (detect_tx, detect_rx) = crossbeam_channel::bounded(config.detect.queue);
        // Workers run even without rules: a reload may add some.
        let workers = config.detect.workers;
        for _ in 0..workers {
            let detection = Detection {
                rules: Arc::clone(&rules),
                store: exchanges_tx.clone(),
                metrics: metrics.clone(),
                drift: drift.clone(),
                discovery: Some(Arc::clone(&discovery)),
            };
            let rx = detect_rx.clone();
            detect_tasks.spawn_blocking("detect-worker", move || detection.run_worker(rx));
        }
        let drift_monitor = drift.as_ref().map(|d| Arc::clone(d.monitor()));
        drop(drift);
        drop(detect_rx);
        tracing::info!(
            policies = policy_count,
            rules = rule_count,
            workers,
            "detection ready"
        );

        let capture_tasks = root.child();
        let sink = ExchangeSink::new(Some(detect_tx), exchanges_tx, metrics.clone());
        let gateway = Arc::new(ArcSwapOption::from_pointee(Gateway::new(
            Arc::clone(&config),
            metrics.clone(),
            sink.clone(),
            capture_tasks.clone(),
            Arc::clone(&rules),
        )?));

        let proxy_listener = bind(config.listen, "proxy", "listen").await?;
        let admin_listener = bind(config.admin_listen, "admin", "admin-listen").await?;
        let proxy_addr = local_addr(&proxy_listener, config.listen);
        let admin_addr = local_addr(&admin_listener, config.admin_listen);

        let reload_metrics = ReloadMetrics::registered(&mut registry);
        let token = Arc::new(AdminToken::new(admin_token(&config)));
        let reloader = Arc::new(Reloader::new(
            source,
            ReloadParts {
                config: Arc::clone(&config),
                rules,
                gateway: Arc::clone(&gateway),
                sink,
                capture_tasks: capture_tasks.clone(),
                alert_tasks: alert_tasks.clone(),
                blocking: root.child(),
                admin_token: Arc::clone(&token),
                metrics: metrics.clone(),
                watch: Arc::clone(discovery.list()),
                allow: Arc::clone(&allow),
            },
            reload_metrics,
        ));
        let admin_tasks = root.child();
        let admin = Arc::new(AdminState::new(AdminParts {
            registry,
            token,
            store_location: location.clone(),
            reloader: Some(Arc::clone(&reloader) as Arc<dyn admin::Reload>),
            drift: drift_monitor,
            tasks: admin_tasks.child(),
            discovery: Some(Arc::clone(&discovery)),
            allow: Some(Arc::clone(&allow)),
        }));
        let admin_state = Arc::clone(&admin);
        admin_tasks.spawn(
            "admin-accept",
            super::listener::accept_loop(
                admin_listener,
                admin_tasks.child(),
                admin_tasks.token().clone(),
                move |peer, request| admin::handle(Arc::clone(&admin_state), peer, request),
            ),
        );

        let proxy_accept = root.child();
        let proxy_connections = root.child();
        proxy_accept.spawn(
            "proxy-accept",
            super::listener::accept_loop(
                proxy_listener,
                proxy_connections.clone(),
                proxy_accept.token().clone(),
                move |peer, request| proxy::handle_current(Arc::clone(&gateway), peer, request),
            ),
        );
        let watch_tasks = root.child();
        watch_tasks.spawn(
            "trigger-sync",
            sync_triggers(
                Arc::clone(&discovery),
                allow,
                location.clone(),
                watch_tasks.clone(),
                watch_tasks.token().clone(),
            ),
        );
        if config.reload.watch {
            // Taken now, so an edit made as soon as start returns is seen as one.
            let baseline = reloader.fingerprint().await;
            watch_tasks.spawn(
                "reload-watch",
                Arc::clone(&reloader).watch(
                    baseline,
                    config.reload.watch_interval,
                    watch_tasks.token().clone(),
                ),
            );
        }
        admin.set_ready(true);
        tracing::info!(
            listen = %proxy_addr,
            admin = %admin_addr,
            upstream = %config.upstream.url,
            store = %location,
            "tripwire serving"
        );
        Ok(Server {
            root,
            proxy_addr,
            admin_addr,
            admin,
            reloader,
            watch_tasks,
            proxy_accept,
            proxy_connections,
            admin_tasks,
            capture_tasks,
            detect_tasks,
            drift_tasks,
            writer_tasks,
            alert_tasks,
            metrics,
            otel,
        })
    }

    /// Where the proxy listens (the real port when 0 was asked for).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Where the admin endpoints listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Reloads the configuration and policies (as SIGHUP does).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Prometheus text of the current metrics.
    pub fn metrics_text(&self) -> String {
        self.admin.encode_metrics()
    }
}

/// Opens the store (on a blocking thread of `root`) and starts its batch writer on `tasks`;
/// returns the writer's queue.
async fn start_store(
    config: &Config,
    root: &Tasks,
    tasks: &Tasks,
    metrics: &Metrics,
) -> Result<tokio::sync::mpsc::Sender<crate::store::StoreItem>, StoreError> {
    let location = config.store.location();
    let hard_max_bytes = config.store.hard_max_bytes;
    let store = root
        .spawn_blocking("store-open", move || {
            let store = Store::connect(&location)?;
            store.cap_size(hard_max_bytes)?;
            Ok::<_, StoreError>(store)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    let (exchanges_tx, exchanges_rx) = tokio::sync::mpsc::channel(config.store.queue);
    tasks.spawn(
        "store-writer",
        run_writer(
            store,
            exchanges_rx,
            WriterConfig {
                batch_rows: config.store.batch_rows,
                flush_interval: config.store.flush_interval,
                retention: crate::store::Retention {
                    exchange_max_age: config.store.exchange_max_age,
                    flag_max_age: config.store.flag_max_age,
                    max_bytes: config.store.max_bytes,
                    interval: config.store.retention_interval,
                },
            },
            metrics.clone(),
            tasks.clone(),
        ),
    );
    Ok(exchanges_tx)
}

/// How often the watched triggers and the allowed evidence are read from the store: decisions
/// and labels made with the CLI or on another replica reach this one within this time.
pub const TRIGGER_SYNC: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads the watched triggers and the allowed evidence the store holds (on a blocking thread
/// of `root`) and starts the discovery and the allow-list from them.
async fn start_discovery(
    location: &StoreLocation,
    root: &Tasks,
) -> Result<(Arc<Discovery>, Arc<AllowList>), StoreError> {
    let location = location.clone();
    let (rows, allowed) = root
        .spawn_blocking("trigger-load", move || {
            let store = Store::connect(&location)?;
            Ok::<_, StoreError>((store.list_triggers()?, store.list_allowed()?))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    let allow = Arc::new(AllowList::new());
    allow.publish(crate::store::allow_list(&allowed));
    if !allowed.is_empty() {
        tracing::info!(
            allowed = allowed.len(),
            "allowed evidence loaded from the store (flags labelled false positive)"
        );
    }
    let watched = rows
        .iter()
        .filter(|t| t.state == TriggerState::Watched)
        .count();
    if watched > 0 {
        tracing::info!(
            watched,
            "watched triggers loaded from the store (tripwire triggers list)"
        );
    }
    Ok((
        Arc::new(Discovery::new(Arc::new(WatchList::new()), &rows)),
        allow,
    ))
}

/// Every [`TRIGGER_SYNC`], takes the store's trigger decisions into `discovery` and its allowed
/// evidence into `allow`, until `stop`.
async fn sync_triggers(
    discovery: Arc<Discovery>,
    allow: Arc<AllowList>,
    location: StoreLocation,
    tasks: Tasks,
    stop: tokio_util::sync::CancellationToken,
) {
    let store: Arc<std::sync::Mutex<Option<Store>>> = Arc::default();
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TRIGGER_SYNC) => {}
        }
        let (store, location) = (Arc::clone(&store), location.clone());
        let read = tasks
            .spawn_blocking("trigger-sync", move || {
                let mut guard = store
                    .lock()
                    .map_err(|_| StoreError::Task("trigger store mutex poisoned".to_owned()))?;
                if guard.is_none() {
                    *guard = Some(Store::connect(&location)?);
                }
                match guard.as_ref() {
                    Some(store) => Ok((store.list_triggers()?, store.list_allowed()?)),
                    None => Ok::<_, StoreError>((Vec::new(), Vec::new())),
                }
            })
            .await;
        match read {
            Ok(Ok((rows, allowed))) => {
                failing = false;
                if discovery.sync(&rows) {
                    let watched = discovery.list().load().triggers().len();
                    tracing::info!(watched, "watched triggers updated from the store");
                }
                if allow.publish(crate::store::allow_list(&allowed)) {
                    tracing::info!(
                        allowed = allowed.len(),
                        "allowed evidence updated from the store"
                    );
                }
            }
            Ok(Err(err)) if !failing => {
                failing = true;
                tracing::warn!(error = %err, "cannot read watched triggers from the store; retrying");
            }
            Ok(Err(_)) => {}
            Err(err) => tracing::warn!(error = %err, "trigger sync task failed"),
        }
    }
}

/// The policies `config` names, compiled; the built-in default policy when it names none.
pub(super) fn load_policies(config: &Config) -> Result<Vec<CompiledPolicy>, PolicyError> {
    match &config.policies {
        Some(path) => crate::policy::load_path(path),
        None => Ok(vec![crate::policy::default_policy()?]),
    }
}

/// Whether any rule of `engine`'s policies has the `alert` action.
pub(super) fn rules_alert(engine: &Engine) -> bool {
    engine.policies().iter().any(|p| {
        p.rules
            .iter()
            .any(|r| r.actions.contains(&crate::policy::Action::Alert))
    })
}

/// Starts the alert sender of `engine`'s policies on `tasks`: to the configured sinks, or to
/// the log when none is configured and a rule alerts.
pub(super) fn start_alerts(
    engine: &Engine,
    config: &Config,
    metrics: &Metrics,
    tasks: &Tasks,
) -> Result<Option<AlertHandle>, crate::alert::WebhookError> {
    let sinks: Vec<_> = engine.policies().iter().map(|p| &p.alerts).collect();
    crate::alert::start(
        &sinks,
        rules_alert(engine),
        config.detect.alert_queue,
        config.store.location(),
        metrics.clone(),
        tasks,
    )
}

/// The admin API's bearer token: `admin_token`, else `TRIPWIRE_ADMIN_TOKEN`.
pub(crate) fn admin_token(config: &Config) -> Option<crate::secret::Secret> {
    config.admin_token.clone().or_else(|| {
        std::env::var("TRIPWIRE_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(crate::secret::Secret::new)
    })
}

/// Builds the OpenTelemetry pipeline the `OTEL_*` environment asks for. A pipeline that cannot be
/// built is logged and left off: the gateway serves without it.
fn start_otel(metrics: &Metrics) -> Option<Arc<Otel>> {
    let settings = crate::telemetry::OtelSettings::from_env();
    match Otel::start(&settings, metrics) {
        Ok(Some(otel)) => {
            tracing::info!(
                traces = ?settings.traces,
                metrics = ?settings.metrics,
                logs = ?settings.logs,
                "OpenTelemetry export on (OTLP)"
            );
            Some(otel)
        }
        Ok(None) => {
            tracing::info!("OpenTelemetry export off (no OTEL_EXPORTER_OTLP_*ENDPOINT set)");
            None
        }
        Err(err) => {
            tracing::warn!(error = %err, "OpenTelemetry export off; check the OTEL_EXPORTER_OTLP_* variables");
            None
        }
    }
}

/// Loads the embedder when the drift plan needs it and starts the drift worker (and the
/// embedding batcher) on `tasks`.
async fn start_drift(
    plan: crate::detect::drift::DriftPlan,
    config: &Config,
    detection: Detection,
    tasks: &Tasks,
    registry: &mut Registry,
) -> Result<crate::detect::drift::DriftHandle, ServerError> {
    let metrics = detection.metrics.clone();
    let embedder = if plan.needs_embeddings() {
        let embedder_config = config.inference.clone();
        let embedder = tasks
            .spawn_blocking("embedder-load", move || {
                crate::infer::Embedder::load(&embedder_config)
            })
            .await
            .map_err(|e| crate::infer::InferError::Run(e.to_string()))??;
        tracing::info!(device = ?embedder.device(), "embedding model loaded for drift detection");
        let _device = crate::telemetry::register_embed_device(registry, embedder.device().as_str());
        Some(crate::infer::batcher::start(
            embedder,
            &config.inference,
            tasks,
            metrics.clone(),
        ))
    } else {
        None
    };
    let state_dir = config
        .drift
        .state_dir
        .clone()
        .unwrap_or_else(|| config.store.path.with_extension("drift"));
    let (handle, receiver) = crate::detect::drift::DriftMonitor::start(
        plan,
        config.drift.clone(),
        state_dir,
        embedder,
        metrics,
    )?;
    let monitor = Arc::clone(handle.monitor());
    tasks.spawn_blocking("drift-worker", move || {
        monitor.run_worker(receiver, &detection)
    });
    Ok(handle)
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            what,
            flag,
            addr,
            source,
        })
}

fn local_addr(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}
