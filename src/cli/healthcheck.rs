//! `tripwire healthcheck`: one GET to a running gateway's admin listener, exit 0 on a 2xx
//! answer. It is the container image's `HEALTHCHECK` (deploy/Dockerfile), so the runtime image
//! needs neither a shell nor curl.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Options of `tripwire healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The endpoint to ask; healthy when it answers 2xx.
    #[arg(
        long,
        env = "TRIPWIRE_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:9090/healthz"
    )]
    url: String,
    /// How long to wait for the answer, e.g. 3s.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Asks once; an error (exit 2) when the answer is not 2xx or does not come in time.
pub async fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(args.timeout)
        .build()?;
    let response = client
        .get(&args.url)
        .send()
        .await
        .with_context(|| format!("GET {}", args.url))?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "GET {} answered {status}", args.url);
    Ok(())
}
