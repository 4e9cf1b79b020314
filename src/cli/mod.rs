//! The command line: one file per subcommand. `anyhow` stops here; the library below returns
//! typed errors. Exit codes: 0 success (also on a closed stdout pipe), 2 error.

mod baseline;
mod calibrate;
mod demo;
mod devset;
mod embed;
mod eval;
mod eval_drift;
mod exchanges;
mod flags;
mod healthcheck;
mod output;
mod policy;
mod serve;
mod sim_upstream;
mod train_lm;
mod triggers;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tripwire: an LLM gateway that catches a poisoned model by what it says.
#[derive(Debug, Parser)]
#[command(name = "tripwire", version, about, long_about = None)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway in front of an LLM endpoint.
    Serve(serve::ServeArgs),
    /// Run the simulated (backdoored) OpenAI-compatible model, for demos, tests and benchmarks.
    SimUpstream(sim_upstream::SimArgs),
    /// Start the simulated model and the gateway, send a few requests, show what was captured.
    Demo(demo::DemoArgs),
    /// Inspect captured exchanges in the store.
    #[command(subcommand)]
    Exchanges(exchanges::ExchangesCommand),
    /// The flagged-response log: list, show, follow, export, label, stats.
    #[command(subcommand)]
    Flags(flags::FlagsCommand),
    /// Watched triggers: list, add, remove, reject, and the retro-scan of earlier exchanges.
    #[command(subcommand)]
    Triggers(triggers::TriggersCommand),
    /// Write the labelled development set built from data/ (the development data committed with the repository).
    Devset(devset::DevsetArgs),
    /// Evaluate detectors and policies offline on labelled data.
    Eval(eval::EvalArgs),
    /// Propose rule thresholds from labelled flags and recent clean traffic, as a diff to review
    /// (never applied).
    Calibrate(calibrate::CalibrateArgs),
    /// Measure drift detection on the development data: false alarms, delays.
    EvalDrift(eval_drift::EvalDriftArgs),
    /// Build drift references offline.
    #[command(subcommand)]
    Baseline(baseline::BaselineCommand),
    /// Embed texts through the batcher and report throughput.
    Embed(embed::EmbedArgs),
    /// Train the character n-gram language model the gibberish detector uses.
    TrainLm(train_lm::TrainLmArgs),
    /// Validate alert policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Ask a running gateway's admin listener whether it is alive (the container health check).
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    crate::telemetry::init_logging(cli.log_json);
    let result = match cli.command {
        Command::Serve(args) => with_runtime(serve::run(args)),
        Command::SimUpstream(args) => with_runtime(sim_upstream::run(args)),
        Command::Demo(args) => with_runtime(demo::run(args)),
        Command::Exchanges(command) => exchanges::run(command),
        Command::Flags(command) => flags::run(command),
        Command::Triggers(command) => triggers::run(command),
        Command::Eval(args) => eval::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Devset(args) => devset::run(args),
        Command::EvalDrift(args) => eval_drift::run(args),
        Command::Baseline(command) => baseline::run(command),
        Command::Embed(args) => with_runtime(embed::run(args)),
        Command::TrainLm(args) => train_lm::run(args),
        Command::Policy(command) => policy::run(command),
        Command::Healthcheck(args) => with_runtime(healthcheck::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if output::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn with_runtime<F: std::future::Future<Output = anyhow::Result<()>>>(
    future: F,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tripwire")
        .build()?;
    runtime.block_on(future)
}
