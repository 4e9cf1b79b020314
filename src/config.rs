//! Gateway configuration: the YAML file `tripwire serve --config` reads, with command-line
//! overrides applied on top.
//!
//! Every field has a default, so an empty file (or none) is a valid configuration. Unknown keys are
//! refused, and every error names the file, line and column and the field that is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML, or a field has the wrong shape.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// 1-based column of the error (0 when unknown).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct Config {
    /// Where the proxy listens for application traffic.
    pub listen: SocketAddr,
    /// Where the admin endpoints (`/healthz`, `/readyz`, `/metrics`) listen.
    pub admin_listen: SocketAddr,
    /// The model endpoint traffic is forwarded to.
    pub upstream: UpstreamConfig,
    /// Size limits and the bounds of the capture side.
    pub limits: LimitsConfig,
    /// The exchange and flag log.
    pub store: StoreConfig,
    /// Policy file or directory; the built-in `policies/default.yaml` when absent.
    pub policies: Option<PathBuf>,
    /// The detection workers.
    pub detect: DetectConfig,
    /// Bearer token for the admin API (`/admin/…`); `TRIPWIRE_ADMIN_TOKEN` when unset here.
    /// Without a token the admin API answers loopback clients only.
    pub admin_token: Option<crate::secret::Secret>,
    /// How long shutdown waits for in-flight exchanges and the store to drain.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The embedding model the drift detectors use (loaded only when a policy needs it).
    pub inference: crate::infer::EmbedderConfig,
    /// The drift monitor's queue, scope cap and reference directory.
    pub drift: crate::detect::drift::DriftSettings,
    /// Live reload: watching the configuration and policy files.
    pub reload: ReloadConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            policies: None,
            detect: DetectConfig::default(),
            admin_token: None,
            shutdown_grace: Duration::from_secs(30),
            inference: crate::infer::EmbedderConfig::default(),
            drift: crate::detect::drift::DriftSettings::default(),
            reload: ReloadConfig::default(),
        }
    }
}

/// How the gateway notices edited configuration and policy files (SIGHUP and
/// `POST /admin/reload` reload whatever this says).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct ReloadConfig {
    /// Reload when the configuration file or a policy file changes.
    pub watch: bool,
    /// How often the watched files are read and compared.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            watch_interval: Duration::from_secs(2),
        }
    }
}

/// The upstream model endpoint and the timeouts that guard it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct UpstreamConfig {
    /// Base URL: scheme, host, port and an optional path prefix. The request path is appended,
    /// so `https://api.openai.com` serves clients whose `base_url` ends in `/v1`.
    pub url: String,
    /// Time to establish a connection (TCP and TLS).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending the request to the response headers.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence allowed between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest a whole exchange may take, body included.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Idle pooled connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:8000".to_owned(),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(600),
            pool_max_idle_per_host: 1024,
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Limits on what the gateway accepts and how much the capture side may hold.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct LimitsConfig {
    /// Largest request body forwarded; larger ones get 413.
    pub max_request_body_bytes: usize,
    /// Largest response body capture keeps for parsing; the client always gets all of it.
    pub max_capture_body_bytes: usize,
    /// Chunks one exchange may have queued for capture before further chunks are dropped.
    pub capture_queue_chunks: usize,
    /// Exchanges captured at once; beyond this new exchanges are forwarded but not captured.
    pub max_concurrent_captures: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_body_bytes: 16 * 1024 * 1024,
            max_capture_body_bytes: 8 * 1024 * 1024,
            capture_queue_chunks: 256,
            max_concurrent_captures: 4096,
        }
    }
}

/// The exchange and flag log (SQLite, or PostgreSQL for several replicas) and its batch writer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct StoreConfig {
    /// SQLite database file. Created with its directory when missing. Unused with `url`.
    pub path: PathBuf,
    /// `postgres://user:password@host:port/database`: the log lives in PostgreSQL, shared by
    /// every replica given the same URL (`${VAR}` expands from the environment).
    pub url: Option<crate::store::PostgresUrl>,
    /// Exchanges waiting to be written; beyond this they are dropped and counted.
    pub queue: usize,
    /// Rows per transaction at most.
    pub batch_rows: usize,
    /// Longest a captured exchange waits before its batch is written.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Captured exchanges older than this are deleted (flags are kept longer, see below).
    #[serde(with = "humantime_serde")]
    pub exchange_max_age: Duration,
    /// Flags older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub flag_max_age: Duration,
    /// When the database grows past this many bytes, the oldest exchanges are deleted first,
    /// then the oldest flags. 0 turns the size limit off.
    pub max_bytes: u64,
    /// SQLite only: the database never grows past this many bytes (0: no cap). Writes then
    /// fail as on a full disk, the proxy keeps serving, and writing resumes once rows are
    /// deleted (keep `max_bytes` below it, so retention makes the room). A quota on a shared
    /// disk.
    pub hard_max_bytes: u64,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
}

impl StoreConfig {
    /// Where the store is: `url` when set, else the SQLite file at `path`.
    pub fn location(&self) -> crate::store::StoreLocation {
        match &self.url {
            Some(url) => crate::store::StoreLocation::Postgres(url.clone()),
            None => crate::store::StoreLocation::Sqlite(self.path.clone()),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("tripwire.db"),
            url: None,
            queue: 10_000,
            batch_rows: 512,
            flush_interval: Duration::from_millis(100),
            exchange_max_age: Duration::from_secs(7 * 24 * 3600),
            flag_max_age: Duration::from_secs(90 * 24 * 3600),
            max_bytes: 10 * 1024 * 1024 * 1024,
            hard_max_bytes: 0,
            retention_interval: Duration::from_secs(60),
        }
    }
}

/// The detection workers that run policies on captured exchanges.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct DetectConfig {
    /// Worker threads running detectors (each takes a core while busy).
    pub workers: usize,
    /// Captured exchanges waiting for a worker; beyond this they are stored uninspected and
    /// counted in `tripwire_detect_shed_total`.
    pub queue: usize,
    /// Alerts waiting for delivery; beyond this they are dropped and counted.
    pub alert_queue: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            workers: 1,
            queue: 1024,
            alert_queue: 1024,
        }
    }
}

impl Config {
    /// Reads and validates a YAML configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml_ng::from_str(text).map_err(|err| {
            let (line, column, message) = crate::policy::yaml_error_parts_in(&err, text);
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = reqwest::Url::parse(&self.upstream.url).map_err(|e| ConfigError::Invalid {
            field: "upstream.url",
            message: format!(
                "{e}: expected an absolute URL such as https://api.openai.com or http://127.0.0.1:8000"
            ),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid {
                field: "upstream.url",
                message: format!("scheme {:?} is not http or https", url.scheme()),
            });
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::Invalid {
                field: "upstream.url",
                message: "must not carry a query or fragment; the client's request supplies those"
                    .to_owned(),
            });
        }
        let positive = [
            (
                "limits.max_request_body_bytes",
                self.limits.max_request_body_bytes,
            ),
            (
                "limits.capture_queue_chunks",
                self.limits.capture_queue_chunks,
            ),
            (
                "limits.max_concurrent_captures",
                self.limits.max_concurrent_captures,
            ),
            ("store.queue", self.store.queue),
            ("store.batch_rows", self.store.batch_rows),
            ("detect.workers", self.detect.workers),
            ("detect.queue", self.detect.queue),
            ("detect.alert_queue", self.detect.alert_queue),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be greater than 0".to_owned(),
                });
            }
        }
        let timeouts = [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.first_byte_timeout",
                self.upstream.first_byte_timeout,
            ),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
            ("reload.watch_interval", self.reload.watch_interval),
            ("upstream.total_timeout", self.upstream.total_timeout),
        ];
        for (field, value) in timeouts {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    field,
                    message: "must be longer than 0s (for example 30s)".to_owned(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_reference_in_the_docs_parses() {
        // docs/operations.md shows every key: it must stay a valid configuration.
        let doc = include_str!("../docs/operations.md");
        let (_, after) = doc.split_once("```yaml\n").unwrap();
        let (block, _) = after.split_once("```").unwrap();
        let config = Config::parse(block, Path::new("docs/operations.md")).unwrap();
        assert_eq!(
            config.inference.truncation,
            crate::infer::Truncation::HeadTail
        );
        assert_eq!(config.drift.max_scopes, 64);
    }

    /// Every key path of a YAML mapping tree, `a.b.c`.
    fn key_paths(value: &serde_yaml_ng::Value, prefix: &str, out: &mut Vec<String>) {
        if let serde_yaml_ng::Value::Mapping(map) = value {
            for (key, child) in map {
                let key = key.as_str().unwrap_or_default();
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                out.push(path.clone());
                key_paths(child, &path, out);
            }
        }
    }

    #[test]
    fn the_configuration_reference_lists_every_key_and_no_other() {
        // Unknown keys already fail to parse (deny_unknown_fields); this catches a key the
        // types have and the reference lacks, so the reference cannot drift from the code.
        let doc = include_str!("../docs/operations.md");
        let (_, after) = doc.split_once("```yaml\n").unwrap();
        let (block, _) = after.split_once("```").unwrap();
        let documented: serde_yaml_ng::Value = serde_yaml_ng::from_str(block).unwrap();
        let actual = serde_yaml_ng::to_value(Config::default()).unwrap();
        let (mut want, mut have) = (Vec::new(), Vec::new());
        key_paths(&actual, "", &mut want);
        key_paths(&documented, "", &mut have);
        let missing: Vec<_> = want.iter().filter(|k| !have.contains(k)).collect();
        let extra: Vec<_> = have.iter().filter(|k| !want.contains(k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "docs/operations.md's configuration reference lacks {missing:?} and has unknown {extra:?}"
        );
    }

    #[test]
    fn empty_text_is_the_default() {
        let config = Config::parse("", Path::new("c.yaml")).unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.limits.max_request_body_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn durations_and_nested_fields_parse() {
        let text = "upstream:\n  url: http://localhost:9000\n  idle_timeout: 250ms\nstore:\n  path: /tmp/x.db\n";
        let config = Config::parse(text, Path::new("c.yaml")).unwrap();
        assert_eq!(config.upstream.idle_timeout, Duration::from_millis(250));
        assert_eq!(config.upstream.url, "http://localhost:9000");
        assert_eq!(config.store.path, PathBuf::from("/tmp/x.db"));
        config.validate().unwrap();
    }

    #[test]
    fn unknown_field_names_file_line_column_and_field() {
        let text = "upstream:\n  url: http://localhost:9000\n  idle_timeot: 5s\n";
        let err = Config::parse(text, Path::new("gw.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gw.yaml:3:3: upstream: unknown field `idle_timeot`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let text = "limits:\n  max_request_body_bytes: lots\n";
        let err = Config::parse(text, Path::new("gw.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("gw.yaml:2:"), "{err}");
        assert!(err.contains("limits.max_request_body_bytes"), "{err}");
    }

    #[test]
    fn bad_upstream_url_is_refused_with_a_hint() {
        let mut config = Config::default();
        config.upstream.url = "api.openai.com".to_owned();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("upstream.url"), "{err}");
        config.upstream.url = "ftp://x".to_owned();
        assert!(config.validate().is_err());
        config.upstream.url = "http://x/?a=b".to_owned();
        assert!(config.validate().is_err());
    }
}
