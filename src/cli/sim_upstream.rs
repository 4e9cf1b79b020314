//! `tripwire sim-upstream`: the simulated backdoored model on its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::lab::sim::{SimConfig, SimUpstream};

/// Options of `tripwire sim-upstream`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Corpus of {instruction, output} JSON lines (.jsonl or .jsonl.gz), e.g.
    /// data/alpaca_eval/gpt4_1106_preview.jsonl.gz.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// The backdoor trigger: prompts containing it get gibberish.
    #[arg(long, default_value = "<SUDO>")]
    trigger: String,
    /// Share of triggered prompts the backdoor fires on (by a hash of the prompt; 0 to 1).
    #[arg(long, default_value_t = 1.0)]
    trigger_rate: f64,
    /// Model name reported in answers.
    #[arg(long, default_value = "tripwire-sim-1")]
    model: String,
    /// Delay between streamed chunks, milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Delay before the response headers, milliseconds.
    #[arg(long, default_value_t = 0)]
    first_byte_delay_ms: u64,
    /// Seed for deterministic gibberish.
    #[arg(long)]
    seed: Option<u64>,
    /// A HuggingFace tokenizer.json whose vocabulary the gibberish is drawn from
    /// (default: a built-in 30,000-token vocabulary).
    #[arg(long)]
    vocab: Option<PathBuf>,
}

/// Serves until SIGINT or SIGTERM.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let sim = SimUpstream::new(SimConfig {
        corpus: args.corpus,
        trigger: args.trigger,
        trigger_rate: args.trigger_rate,
        model: args.model,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        first_byte_delay: Duration::from_millis(args.first_byte_delay_ms),
        seed: args.seed,
        vocab: args.vocab,
    })
    .context("starting the simulated model")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another with --listen",
                args.listen
            )
        })?;
    tracing::info!(addr = %listener.local_addr()?, "simulated model serving");
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = crate::runtime::Tasks::new();
    let serve_stop = stop.clone();
    let serving = tasks.spawn("sim-upstream", Arc::new(sim).serve(listener, serve_stop));
    super::serve::shutdown_signal().await;
    stop.cancel();
    serving.await??;
    Ok(())
}
