//! Test harness: a mock upstream and a real tripwire gateway on `127.0.0.1:0`, and `drain()`,
//! which shuts the gateway down the way production does and returns what it stored.

pub mod mock;
pub mod pg;
pub mod process;

use std::path::PathBuf;

use tripwire::app::Server;
use tripwire::capture::Exchange;
use tripwire::config::Config;
use tripwire::store::{ExchangeFilter, Store};

pub use mock::{MockUpstream, Script, Step};

/// A running gateway with its own store in a temporary directory.
pub struct Gateway {
    server: Option<Server>,
    pub base: String,
    pub admin: String,
    pub store_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway in front of `upstream` with test-friendly defaults, then `tweak`.
    pub async fn start(upstream: &str, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("store.db");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        config.upstream.url = upstream.to_owned();
        config.store.path = store_path.clone();
        config.store.flush_interval = std::time::Duration::from_millis(5);
        config.shutdown_grace = std::time::Duration::from_secs(10);
        tweak(&mut config);
        config.validate().unwrap();
        let server = Server::start(config).await.unwrap();
        Gateway {
            base: format!("http://{}", server.proxy_addr()),
            admin: format!("http://{}", server.admin_addr()),
            server: Some(server),
            store_path,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The gateway's /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Shuts the gateway down (every in-flight exchange is captured and written), then reads
    /// the store, oldest first.
    pub async fn drain(&mut self) -> Vec<Exchange> {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let store = Store::open_existing(&self.store_path).unwrap();
        let mut rows = store
            .list_exchanges(&ExchangeFilter {
                limit: Some(10_000),
                ..ExchangeFilter::default()
            })
            .unwrap();
        rows.reverse();
        rows
    }
}

/// Posts a chat completion through `gateway`.
pub async fn send_chat(gateway: &Gateway, prompt: &str, stream: bool) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(gateway.url("/v1/chat/completions"))
        .body(chat_body(prompt, stream))
        .send()
        .await
        .unwrap()
}

/// A chat completion request body.
pub fn chat_body(prompt: &str, stream: bool) -> String {
    serde_json::json!({
        "model": "test-model",
        "stream": stream,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
    })
    .to_string()
}

/// The built-in simulated model on `127.0.0.1:0`.
pub struct Sim {
    pub url: String,
    stop: tokio_util::sync::CancellationToken,
    tasks: tripwire::runtime::Tasks,
}

impl Sim {
    pub async fn start(seed: Option<u64>) -> Sim {
        Sim::start_with(tripwire::lab::sim::SimConfig {
            seed,
            ..tripwire::lab::sim::SimConfig::default()
        })
        .await
    }

    pub async fn start_with(config: tripwire::lab::sim::SimConfig) -> Sim {
        let sim = tripwire::lab::sim::SimUpstream::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = tripwire::runtime::Tasks::new();
        tasks.spawn(
            "sim",
            std::sync::Arc::new(sim).serve(listener, stop.clone()),
        );
        Sim { url, stop, tasks }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// Sends one request (streamed or not) and checks the answer is whole; returns its request id.
pub async fn request(
    client: &reqwest::Client,
    gateway: &str,
    prompt: &str,
    stream: bool,
) -> String {
    let response = client
        .post(format!("{gateway}/v1/chat/completions"))
        .body(chat_body(prompt, stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "prompt {prompt:?}");
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.text().await.unwrap();
    if stream {
        assert!(
            body.trim_end().ends_with("data: [DONE]"),
            "cut stream: {body}"
        );
    } else {
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            json["choices"][0]["message"]["content"].is_string(),
            "{body}"
        );
    }
    id
}

/// The body of a GET, as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Runs a test's own blocking call (a file, a database) off the runtime's threads and waits
/// for it. The gateway's code goes through `runtime::Tasks`; a test awaits its call in place.
#[expect(
    clippy::disallowed_methods,
    reason = "awaited in place: nothing outlives the test"
)]
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}
