//! `tripwire serve`: the gateway, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::app::Server;
use crate::app::reload::{ReloadSource, Trigger};
use crate::config::{Config, ConfigError};
use crate::lab::sim::{SimConfig, SimUpstream};

/// Options of `tripwire serve`; each overrides the same setting of the config file.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// YAML configuration file (see docs/operations.md).
    #[arg(long, env = "TRIPWIRE_CONFIG")]
    config: Option<PathBuf>,
    /// Proxy listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listen address (/healthz, /readyz, /metrics) [default: 127.0.0.1:9090].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Upstream base URL, e.g. https://api.openai.com (the request path is appended).
    #[arg(long, env = "TRIPWIRE_UPSTREAM")]
    upstream: Option<String>,
    /// SQLite file for captured exchanges [default: tripwire.db].
    #[arg(long)]
    store: Option<PathBuf>,
    /// PostgreSQL store shared by replicas (postgres://user:password@host:port/db); replaces
    /// the SQLite file.
    #[arg(long, env = "TRIPWIRE_STORE_URL", hide_env_values = true)]
    store_url: Option<String>,
    /// Policy file or directory.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Front the built-in simulated model (started in this process) instead of --upstream.
    #[arg(long, conflicts_with = "upstream")]
    sim: bool,
    /// With --sim: where the simulated model listens.
    #[arg(long, default_value = "127.0.0.1:8000", requires = "sim")]
    sim_listen: SocketAddr,
    /// With --sim: corpus of {instruction, output} JSON lines (.jsonl or .jsonl.gz).
    #[arg(long, requires = "sim")]
    sim_corpus: Option<PathBuf>,
}

impl ServeArgs {
    /// The config file (when given) with these options applied on top.
    fn config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(admin) = self.admin_listen {
            config.admin_listen = admin;
        }
        if let Some(upstream) = &self.upstream {
            config.upstream.url.clone_from(upstream);
        }
        if let Some(store) = &self.store {
            config.store.path.clone_from(store);
        }
        if let Some(url) = self.store_url.as_deref().filter(|u| !u.trim().is_empty()) {
            config.store.url =
                Some(
                    crate::store::PostgresUrl::parse(url).map_err(|e| ConfigError::Invalid {
                        field: "--store-url",
                        message: e.to_string(),
                    })?,
                );
        }
        if let Some(policies) = &self.policies {
            config.policies = Some(policies.clone());
        }
        Ok(config)
    }
}

/// Runs the gateway until a shutdown signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.config()?;
    let sim_stop = tokio_util::sync::CancellationToken::new();
    let sim_tasks = crate::runtime::Tasks::new();
    if args.sim {
        let sim = SimUpstream::new(SimConfig {
            corpus: args.sim_corpus.clone(),
            ..SimConfig::default()
        })
        .context("starting the simulated model")?;
        let listener = tokio::net::TcpListener::bind(args.sim_listen)
            .await
            .with_context(|| {
                format!(
                    "simulated model cannot listen on {}; pick another with --sim-listen",
                    args.sim_listen
                )
            })?;
        let addr = listener.local_addr()?;
        config.upstream.url = format!("http://{addr}");
        let stop = sim_stop.clone();
        sim_tasks.spawn("sim-upstream", async move {
            if let Err(err) = Arc::new(sim).serve(listener, stop).await {
                tracing::error!(error = %err, "simulated model stopped");
            }
        });
        tracing::info!(%addr, "simulated backdoored model serving (trigger: <SUDO>)");
    }
    config.validate()?;
    // A reload reads the file again and applies the same command-line options.
    let sim_upstream = args.sim.then(|| config.upstream.url.clone());
    let reload_args = args.clone();
    let source = ReloadSource::new(args.config.clone(), move || {
        let mut config = reload_args.config()?;
        if let Some(url) = &sim_upstream {
            config.upstream.url.clone_from(url);
        }
        config.validate()?;
        Ok(config)
    });
    let server = Server::start_reloadable(config, source).await?;
    let signal_tasks = crate::runtime::Tasks::new();
    #[cfg(unix)]
    reload_on_sighup(&server, &signal_tasks);
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    signal_tasks.cancel();
    signal_tasks.wait().await;
    server.shutdown().await;
    sim_stop.cancel();
    sim_tasks.wait().await;
    Ok(())
}

/// Reloads the configuration and policies on every SIGHUP, until `tasks` is cancelled.
#[cfg(unix)]
fn reload_on_sighup(server: &Server, tasks: &crate::runtime::Tasks) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGHUP; reload with POST /admin/reload");
            return;
        }
    };
    let reloader = std::sync::Arc::clone(server.reloader());
    let stop = tasks.token().clone();
    tasks.spawn("reload-on-sighup", async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    // Logged and counted inside.
                    let _outcome = reloader.reload(Trigger::Signal).await;
                }
            }
        }
    });
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops the gateway");
                let _interrupted = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _interrupted = interrupt.await;
    }
}
