//! The webhook sink: a JSON POST per alert (tripwire's payload, or Slack's `{"text": …}`),
//! retried with exponential backoff on connection errors, 429 and 5xx.

use std::time::Duration;

use crate::policy::{Severity, WebhookConfig, WebhookFormat, expand_env};

use super::Alert;

/// Why a webhook could not be set up or an alert not delivered. Never contains the URL.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The HTTP client or a header could not be built.
    #[error("webhook set-up: {0}")]
    Setup(String),
    /// Every attempt failed.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

#[derive(Debug)]
pub(super) struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    config: WebhookConfig,
    headers: reqwest::header::HeaderMap,
}

impl Webhook {
    pub(super) fn new(config: WebhookConfig) -> Result<Webhook, WebhookError> {
        let url = reqwest::Url::parse(&expand_env(&config.url))
            .map_err(|e| WebhookError::Setup(format!("alerts.webhook.url is not a URL: {e}")))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| WebhookError::Setup(format!("header name {name:?}: {e}")))?;
            let mut value = reqwest::header::HeaderValue::from_str(&expand_env(value))
                .map_err(|_| WebhookError::Setup(format!("header {name}: invalid value")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .no_proxy()
            .build()
            .map_err(|e| WebhookError::Setup(crate::secret::describe_http_error(e)))?;
        Ok(Webhook {
            client,
            url,
            config,
            headers,
        })
    }

    pub(super) fn min_severity(&self) -> Severity {
        self.config.min_severity
    }

    fn body(&self, alert: &Alert) -> String {
        match self.config.format {
            WebhookFormat::Json => serde_json::to_string(alert).unwrap_or_default(),
            WebhookFormat::Slack => {
                let text = format!(
                    "*[{}] {}* on model `{}` ({})\n{}\nrequest `{}` — `{}`\n> {}",
                    alert.severity.as_str().to_uppercase(),
                    alert.rule,
                    alert.model.as_deref().unwrap_or("-"),
                    alert.route,
                    alert.description.as_deref().unwrap_or(""),
                    alert.request_id,
                    alert.inspect,
                    alert.output_excerpt.replace('\n', " "),
                );
                serde_json::json!({ "text": text }).to_string()
            }
        }
    }

    pub(super) async fn send(&self, alert: &Alert) -> Result<(), WebhookError> {
        let body = self.body(alert);
        let attempts = self.config.max_attempts.max(1);
        let mut backoff = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=attempts {
            let result = self
                .client
                .post(self.url.clone())
                .headers(self.headers.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            let retry_after = match result {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    last = format!("HTTP {status}");
                    if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                    {
                        // The endpoint refuses this payload; retrying will not help.
                        break;
                    }
                    response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs)
                }
                Err(err) => {
                    last = crate::secret::describe_http_error(err);
                    None
                }
            };
            if attempt < attempts {
                let wait = retry_after.unwrap_or(backoff).min(Duration::from_secs(30));
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        Err(WebhookError::GaveUp { attempts, last })
    }
}
