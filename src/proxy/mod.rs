//! The proxy: a hyper server that forwards every request to the configured upstream unchanged
//! and streams the answer back, teeing each response body to capture.
//!
//! The client never waits for capture: the tee offers copies with `try_send`, and capture runs
//! on its own tracked task. The one exception is enforce mode (`enforce`), taken only when an
//! enforce-mode blocking rule's scope admits the request. The upstream is fixed by
//! configuration; nothing in a request can point the gateway at another host.

mod enforce;
mod error;
mod headers;
mod service;
mod tee;

use std::sync::Arc;

use tokio::sync::Semaphore;

pub use enforce::{BYTES_PER_TOKEN, mask};
pub use error::ProxyError;
pub use headers::{X_REQUEST_ID, api_key_hash};
pub use service::{ProxyBody, handle, handle_current};
pub use tee::BodyError;

use crate::config::Config;
use crate::inspect::{ExchangeSink, SharedRules};
use crate::runtime::Tasks;
use crate::telemetry::Metrics;
use crate::telemetry::otel::ServerAddress;

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(String),
}

/// Everything a request needs: configuration, the pooled upstream client, metrics and the
/// capture side.
#[derive(Debug)]
pub struct Gateway {
    config: Arc<Config>,
    client: reqwest::Client,
    upstream_base: String,
    /// The upstream's host and port, for exchange spans.
    server_address: ServerAddress,
    metrics: Metrics,
    capture_slots: Arc<Semaphore>,
    sink: ExchangeSink,
    capture_tasks: Tasks,
    /// The rule set in force (swapped by reloads), read once per request by enforce mode.
    rules: SharedRules,
}

impl Gateway {
    /// Builds the gateway. Capture tasks are spawned on `capture_tasks`.
    pub fn new(
        config: Arc<Config>,
        metrics: Metrics,
        sink: ExchangeSink,
        capture_tasks: Tasks,
        rules: SharedRules,
    ) -> Result<Gateway, GatewayError> {
        let upstream = &config.upstream;
        let client = reqwest::Client::builder()
            .connect_timeout(upstream.connect_timeout)
            .pool_max_idle_per_host(upstream.pool_max_idle_per_host)
            .pool_idle_timeout(upstream.pool_idle_timeout)
            .tcp_nodelay(true)
            // A proxy passes redirects to its client; it does not follow them.
            .redirect(reqwest::redirect::Policy::none())
            // The upstream is configured explicitly; environment proxies do not apply.
            .no_proxy()
            .build()
            .map_err(|e| GatewayError::Client(crate::secret::describe_http_error(e)))?;
        let upstream_base = upstream.url.trim_end_matches('/').to_owned();
        let server_address = ServerAddress::from_url(&upstream_base);
        let capture_slots = Arc::new(Semaphore::new(config.limits.max_concurrent_captures));
        Ok(Gateway {
            config,
            client,
            upstream_base,
            server_address,
            metrics,
            capture_slots,
            sink,
            capture_tasks,
            rules,
        })
    }

    /// The upstream URL for a request URI: the configured base followed by the request's path
    /// and query. Only path and query are taken from the request, so it cannot change the host.
    fn upstream_url(&self, uri: &http::Uri) -> String {
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let path = if path.starts_with('/') { path } else { "/" };
        format!("{}{}", self.upstream_base, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_keeps_the_configured_host_and_prefix() {
        let mut config = Config::default();
        config.upstream.url = "https://api.example.com/prefix/".to_owned();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let gateway = Gateway::new(
            Arc::new(config),
            Metrics::default(),
            ExchangeSink::new(None, tx, Metrics::default()),
            Tasks::new(),
            Arc::new(arc_swap::ArcSwap::from_pointee(crate::inspect::Rules {
                engine: Arc::new(crate::policy::Engine::new(Vec::new(), Metrics::default())),
                alerts: None,
            })),
        )
        .unwrap();
        let uri: http::Uri = "/v1/chat/completions?x=1".parse().unwrap();
        assert_eq!(
            gateway.upstream_url(&uri),
            "https://api.example.com/prefix/v1/chat/completions?x=1"
        );
        // An absolute-form request target cannot redirect the gateway elsewhere.
        let uri: http::Uri = "http://evil.example/v1/models".parse().unwrap();
        assert_eq!(
            gateway.upstream_url(&uri),
            "https://api.example.com/prefix/v1/models"
        );
    }
}
