//! The admin listener: `/healthz` (the process answers), `/readyz` (it accepts traffic; turns
//! 503 as soon as shutdown begins so load balancers stop sending), `/metrics` in the
//! Prometheus text format, and the flag API:
//!
//! * `GET /admin/flags?since=1h&policy=…&severity=…&model=…&route=…&label=…&limit=…&before=…`
//! * `GET /admin/flags/{id}`
//! * `POST /admin/flags/{id}/label` with `{"verdict": "true-positive"|"false-positive", "note": …}`;
//!   a false positive's evidence is allowed for its rules in its scope at once (`policy::allow`)
//! * `GET /admin/flags/stats?since=…`
//! * `POST /admin/reload`: reads the configuration and policies again (through the [`Reload`]
//!   the composition root hands in); 200 with what changed, or 422 with the file:line:col
//!   error while the old set stays
//!
//! * `/console/…`: the web pages of [`console`]
//!
//! `/admin/…` needs `Authorization: Bearer <admin_token>` (compared in constant time); with no
//! token configured it answers loopback clients only.

pub mod console;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;

use crate::inspect::discovery::Discovery;
use crate::policy::Severity;
use crate::policy::allow::AllowList;
use crate::runtime::Tasks;
use crate::secret::Secret;
use crate::store::{
    Flag, FlagFilter, Review, Store, StoreError, StoreLocation, TriggerState, WatchedTrigger,
};
use crate::telemetry::ProcessMetrics;

/// What `POST /admin/reload` reaches: the gateway's reloader, handed in by the composition
/// root (admin knows nothing of how a reload is done).
pub trait Reload: Send + Sync {
    /// Reads, validates and swaps in the configuration and policies.
    fn reload(&self) -> Pin<Box<dyn Future<Output = ReloadAnswer> + Send + '_>>;
}

/// How a reload went, as the admin API answers it.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadAnswer {
    /// It took effect; what changed.
    Reloaded(serde_json::Value),
    /// Shutdown has begun.
    ShuttingDown,
    /// It was refused (the file:line:col error); the old set stays.
    Refused(String),
}

/// The admin API's bearer token, shared by the admin listener (which checks it) and the
/// reloader (which replaces it).
#[derive(Debug, Default)]
pub struct AdminToken {
    token: ArcSwapOption<Secret>,
    /// One more per change: console sessions opened under an older token end.
    generation: AtomicU64,
}

impl AdminToken {
    /// A token cell holding `token` (none: the admin API answers loopback clients only).
    pub fn new(token: Option<Secret>) -> AdminToken {
        AdminToken {
            token: ArcSwapOption::from(token.map(Arc::new)),
            generation: AtomicU64::new(0),
        }
    }

    /// Replaces the token (a reload); open console sessions end.
    pub fn set(&self, token: Option<Secret>) {
        self.token.store(token.map(Arc::new));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a token is configured.
    pub fn is_set(&self) -> bool {
        self.token.load().is_some()
    }

    /// Whether `presented` is the token (constant time); false when none is set.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.token
            .load()
            .as_deref()
            .is_some_and(|token| token.matches(presented))
    }
}

/// What the admin listener serves from.
pub struct AdminParts {
    /// The metrics registry, filled by every part of the gateway.
    pub registry: Registry,
    /// The bearer token.
    pub token: Arc<AdminToken>,
    /// The flag log the API and the console read.
    pub store_location: StoreLocation,
    /// `POST /admin/reload`'s way in; none answers 503.
    pub reloader: Option<Arc<dyn Reload>>,
    /// The drift monitor, when a policy declares drift detectors (the console's charts).
    pub drift: Option<Arc<crate::detect::drift::DriftMonitor>>,
    /// Where store reads run (blocking threads, tracked).
    pub tasks: Tasks,
    /// The watched triggers, told at once when the API changes one.
    pub discovery: Option<Arc<Discovery>>,
    /// The allow-list from false-positive labels, told at once when a flag is labelled.
    pub allow: Option<Arc<AllowList>>,
}

/// What the admin endpoints read, all given at construction.
pub struct AdminState {
    registry: Registry,
    process: ProcessMetrics,
    ready: AtomicBool,
    token: Arc<AdminToken>,
    /// The token generation the console's sessions were opened under.
    sessions_generation: AtomicU64,
    store_location: StoreLocation,
    store: Mutex<Option<Store>>,
    reloader: Option<Arc<dyn Reload>>,
    console: console::Sessions,
    drift: Option<Arc<crate::detect::drift::DriftMonitor>>,
    tasks: Tasks,
    discovery: Option<Arc<Discovery>>,
    allow: Option<Arc<AllowList>>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.ready)
            .field("store_location", &self.store_location)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// State over its parts; not ready until [`AdminState::set_ready`].
    pub fn new(parts: AdminParts) -> AdminState {
        let AdminParts {
            mut registry,
            token,
            store_location,
            reloader,
            drift,
            tasks,
            discovery,
            allow,
        } = parts;
        let process = ProcessMetrics::registered(&mut registry);
        let sessions_generation = AtomicU64::new(token.generation.load(Ordering::SeqCst));
        AdminState {
            registry,
            process,
            ready: AtomicBool::new(false),
            token,
            sessions_generation,
            store_location,
            store: Mutex::new(None),
            reloader,
            console: console::Sessions::default(),
            drift,
            tasks,
            discovery,
            allow,
        }
    }

    /// Whether an admin token is configured.
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_set()
    }

    /// Whether `presented` is the admin token (constant time); false when none is set.
    pub(crate) fn token_matches(&self, presented: &[u8]) -> bool {
        self.token.matches(presented)
    }

    /// The console's sessions (all ended when the token changed since they were opened).
    pub(crate) fn console(&self) -> &console::Sessions {
        let now = self.token.generation.load(Ordering::SeqCst);
        if self.sessions_generation.swap(now, Ordering::SeqCst) != now {
            self.console.clear();
        }
        &self.console
    }

    /// The drift monitor, when a policy declares drift detectors.
    pub(crate) fn drift(&self) -> Option<&Arc<crate::detect::drift::DriftMonitor>> {
        self.drift.as_ref()
    }

    /// Marks the gateway ready (or not) for traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The metrics as Prometheus text.
    pub fn encode_metrics(&self) -> String {
        self.process.refresh();
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %err, "metrics encoding failed");
        }
        text
    }

    /// Records a decision about a trigger (watch, remove, reject; removing needs one on the
    /// list) and tells the running discovery at once. `None`: nothing to decide about.
    pub(crate) async fn decide_trigger(
        self: &Arc<Self>,
        ngram: String,
        model: Option<String>,
        decision: TriggerState,
        note: Option<String>,
    ) -> Result<Option<WatchedTrigger>, StoreError> {
        let model = model.filter(|m| !m.is_empty());
        let note = note.filter(|n| !n.trim().is_empty());
        let (decided, rows) = self
            .with_store(move |store| {
                let decided =
                    store.decide_trigger(&ngram, model.as_deref(), decision, note.as_deref())?;
                Ok((decided, store.list_triggers()?))
            })
            .await?;
        if let (Some(decided), Some(discovery)) = (&decided, &self.discovery) {
            discovery.sync(&rows);
            tracing::info!(
                ngram = %decided.ngram,
                model = decided.model.as_deref().unwrap_or("*"),
                state = decided.state.as_str(),
                "watched trigger decided"
            );
        }
        Ok(decided)
    }

    /// Labels a flag (API and console) and tells the running engine's allow-list at once, so
    /// a false positive stops firing on this replica without waiting for the next sync.
    /// `None`: no such flag.
    pub(crate) async fn label_flag(
        self: &Arc<Self>,
        id: String,
        verdict: Review,
        note: Option<String>,
    ) -> Result<Option<Flag>, StoreError> {
        let (flag, allowed) = self
            .with_store(move |store| {
                let flag = store.label_flag(&id, verdict, note.as_deref())?;
                Ok((flag, store.list_allowed()?))
            })
            .await?;
        if let (Some(flag), Some(allow)) = (&flag, &self.allow) {
            allow.publish(crate::store::allow_list(&allowed));
            tracing::info!(
                flag = %flag.id,
                verdict = verdict.as_str(),
                allowed = allowed.len(),
                "flag labelled; allow-list updated"
            );
        }
        Ok(flag)
    }

    /// Runs `f` on the admin's own store connection, on a blocking thread.
    pub(crate) async fn with_store<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let state = Arc::clone(self);
        self.tasks
            .spawn_blocking("admin-store", move || {
                let mut guard = state
                    .store
                    .lock()
                    .map_err(|_| StoreError::Task("admin store mutex poisoned".to_owned()))?;
                if guard.is_none() {
                    *guard = Some(Store::connect(&state.store_location)?);
                }
                match guard.as_ref() {
                    Some(store) => f(store),
                    None => Err(StoreError::Task("admin store unavailable".to_owned())),
                }
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Serves one admin request.
pub async fn handle(
    state: Arc<AdminState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let response = match (request.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(state.encode_metrics())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (_, p) if p == "/console" || p.starts_with("/console/") => {
            crate::admin::console::handle(&state, peer, request).await
        }
        (_, p) if p.starts_with("/admin/") => match authorize(&state, peer, &request) {
            Err(response) => *response,
            Ok(()) => admin_api(&state, request).await,
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

/// `POST /admin/reload`.
async fn reload(state: &AdminState) -> Response<Full<Bytes>> {
    let Some(reloader) = &state.reloader else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload is unavailable: this gateway was started without a reloader",
        );
    };
    match reloader.reload().await {
        ReloadAnswer::Reloaded(outcome) => json(StatusCode::OK, &outcome),
        ReloadAnswer::ShuttingDown => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        ),
        ReloadAnswer::Refused(err) => json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("{err}; the previous configuration and policies stay in force"),
        ),
    }
}

fn authorize<B>(
    state: &AdminState,
    peer: SocketAddr,
    request: &Request<B>,
) -> Result<(), Box<Response<Full<Bytes>>>> {
    match state.token.token.load().as_deref() {
        Some(token) => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            if presented.is_some_and(|p| token.matches(p)) {
                Ok(())
            } else {
                Err(Box::new(json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token for the admin API",
                )))
            }
        }
        None if peer.ip().is_loopback() => Ok(()),
        None => Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "the admin API answers loopback clients only unless admin_token (or \
             TRIPWIRE_ADMIN_TOKEN) is set",
        ))),
    }
}

async fn admin_api(state: &Arc<AdminState>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (request.method().clone(), segments.as_slice()) {
        (Method::POST, ["admin", "reload"]) => return reload(state).await,
        (Method::GET, ["admin", "flags"]) => match flag_filter(&query) {
            Ok(filter) => {
                let limit = filter.limit.unwrap_or(50);
                state
                    .with_store(move |store| store.list_flags(&filter))
                    .await
                    .map(|flags| {
                        let next = (flags.len() == limit as usize)
                            .then(|| flags.last().map(|f| f.created_at_us))
                            .flatten();
                        json(
                            StatusCode::OK,
                            &serde_json::json!({ "flags": flags, "next_before": next }),
                        )
                    })
            }
            Err(message) => Ok(json_error(StatusCode::BAD_REQUEST, &message)),
        },
        (Method::GET, ["admin", "flags", "stats"]) => {
            let since = match param(&query, "since").map(|s| since_us(&s)).transpose() {
                Ok(since) => since,
                Err(message) => return json_error(StatusCode::BAD_REQUEST, &message),
            };
            state
                .with_store(move |store| store.flag_stats(since))
                .await
                .map(|stats| {
                    let mut value = serde_json::to_value(&stats).unwrap_or_default();
                    value["false_positive_share"] = serde_json::json!(stats.false_positive_share());
                    json(StatusCode::OK, &value)
                })
        }
        (Method::GET, ["admin", "flags", id]) => {
            let id = (*id).to_owned();
            state
                .with_store(move |store| store.get_flag(&id))
                .await
                .map(|flag| match flag {
                    Some(flag) => json(StatusCode::OK, &flag),
                    None => json_error(StatusCode::NOT_FOUND, "no such flag"),
                })
        }
        (Method::POST, ["admin", "flags", id, "label"]) => {
            let id = (*id).to_owned();
            let body = match Limited::new(request.into_body(), 64 * 1024).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "label body unreadable or over 64 KiB",
                    );
                }
            };
            let parsed: Result<LabelRequest, _> = serde_json::from_slice(&body);
            match parsed {
                Err(err) => Ok(json_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "expected {{\"verdict\": \"true-positive\"|\"false-positive\", \"note\": \"…\"}}: {err}"
                    ),
                )),
                Ok(label) => match Review::parse(&label.verdict) {
                    None => Ok(json_error(
                        StatusCode::BAD_REQUEST,
                        "verdict must be true-positive or false-positive",
                    )),
                    Some(verdict) => {
                        state
                            .label_flag(id, verdict, label.note)
                            .await
                            .map(|flag| match flag {
                                Some(flag) => json(StatusCode::OK, &flag),
                                None => json_error(StatusCode::NOT_FOUND, "no such flag"),
                            })
                    }
                },
            }
        }
        (Method::GET, ["admin", "triggers"]) => {
            let live = state.discovery.as_ref().map(|d| d.list().load());
            state
                .with_store(|store| store.list_triggers())
                .await
                .map(|rows| {
                    let watching: Vec<serde_json::Value> = live
                        .iter()
                        .flat_map(|w| w.triggers())
                        .map(|w| serde_json::json!({"ngram": w.ngram, "model": w.model}))
                        .collect();
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "triggers": rows, "watching": watching }),
                    )
                })
        }
        (Method::GET, ["admin", "triggers", "scan"]) => {
            let Some(ngram) = param(&query, "ngram").filter(|n| !n.trim().is_empty()) else {
                return json_error(StatusCode::BAD_REQUEST, "ngram= is required");
            };
            let model = param(&query, "model").filter(|m| !m.is_empty());
            let limit = match param(&query, "limit").map(|l| l.parse::<usize>()) {
                None => 50,
                Some(Ok(n)) if n <= 10_000 => n,
                Some(_) => {
                    return json_error(StatusCode::BAD_REQUEST, "limit must be 0 to 10000");
                }
            };
            state
                .with_store(move |store| store.retro_scan(&ngram, model.as_deref(), limit))
                .await
                .map(|scan| json(StatusCode::OK, &scan))
        }
        (Method::POST, ["admin", "triggers"]) => {
            let body = match Limited::new(request.into_body(), 64 * 1024).collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "trigger body unreadable or over 64 KiB",
                    );
                }
            };
            match serde_json::from_slice::<TriggerRequest>(&body) {
                Err(err) => Ok(json_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "expected {{\"ngram\": \"…\", \"model\": \"…\" (optional), \"state\": \"watched\"|\"removed\"|\"rejected\", \"note\": \"…\"}}: {err}"
                    ),
                )),
                Ok(request) => decide_trigger(state, request).await,
            }
        }
        _ => Ok(json_error(StatusCode::NOT_FOUND, "no such admin endpoint")),
    };
    result.unwrap_or_else(|err| {
        tracing::warn!(kind = err.kind(), error = %err, "admin API store error");
        json_error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    })
}

/// `POST /admin/triggers`: watch, stop watching, or reject an n-gram.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    ngram: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "watched")]
    state: TriggerState,
    #[serde(default)]
    note: Option<String>,
}

fn watched() -> TriggerState {
    TriggerState::Watched
}

/// `POST /admin/triggers`: the decision, answered with the trigger as it now stands.
async fn decide_trigger(
    state: &Arc<AdminState>,
    request: TriggerRequest,
) -> Result<Response<Full<Bytes>>, StoreError> {
    let TriggerRequest {
        ngram,
        model,
        state: decision,
        note,
    } = request;
    Ok(
        match state.decide_trigger(ngram, model, decision, note).await? {
            Some(decided) => json(StatusCode::OK, &decided),
            None => json_error(
                StatusCode::NOT_FOUND,
                "no such trigger (an n-gram needs words; removing needs one on the list)",
            ),
        },
    )
}

#[derive(Debug, serde::Deserialize)]
struct LabelRequest {
    verdict: String,
    #[serde(default)]
    note: Option<String>,
}

pub(crate) fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn since_us(text: &str) -> Result<i64, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("since: {e} (use e.g. 30m, 1h, 7d)"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    Ok(now - i64::try_from(duration.as_micros()).unwrap_or(0))
}

pub(crate) fn flag_filter(query: &str) -> Result<FlagFilter, String> {
    let limit = match param(query, "limit") {
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| "limit must be a number".to_owned())?
                .clamp(1, 1000),
        ),
        None => Some(50),
    };
    let label = match param(query, "label").as_deref() {
        None => None,
        Some("none") => Some(None),
        Some(v) => Some(Some(
            Review::parse(v).ok_or("label must be true-positive, false-positive or none")?,
        )),
    };
    Ok(FlagFilter {
        since_us: param(query, "since").map(|s| since_us(&s)).transpose()?,
        before_us: param(query, "before")
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| "before must be a number".to_owned())
            })
            .transpose()?,
        rule: param(query, "policy").or_else(|| param(query, "rule")),
        min_severity: param(query, "severity")
            .map(|s| Severity::parse(&s).ok_or("severity must be info, warning, high or critical"))
            .transpose()?,
        model: param(query, "model"),
        route: param(query, "route"),
        label,
        limit,
    })
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": { "message": message } }),
    )
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(
            param("a=1&policy=trigger%2Dphrase", "policy").as_deref(),
            Some("trigger-phrase")
        );
        assert_eq!(param("a=x+y", "a").as_deref(), Some("x y"));
        assert_eq!(param("a=1", "b"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn flag_filters_are_validated() {
        assert!(flag_filter("severity=loud").is_err());
        assert!(flag_filter("limit=x").is_err());
        assert!(flag_filter("since=forever").is_err());
        let filter = flag_filter("severity=high&label=none&limit=5000").unwrap();
        assert_eq!(filter.min_severity, Some(Severity::High));
        assert_eq!(filter.label, Some(None));
        assert_eq!(filter.limit, Some(1000));
    }
}
