#![expect(clippy::print_stdout, reason = "a benchmark reports on stdout")]
//! Gateway benchmark: the simulated model reached directly vs through `tripwire serve`, side by
//! side in one run (see `docs/benchmarks.md`).
//!
//! 1. Fixed arrival rate, open loop: requests are scheduled at `1/R` intervals and latency is
//!    measured from each request's *scheduled* send time to the last body byte, so a stalled
//!    target is charged for the requests it delayed (no coordinated omission).
//! 2. Maximum throughput, closed loop: `C` workers sending back to back.
//! 3. A "realistic" upstream (60 ms to first byte) at a lower fixed rate.
//!
//! Both processes are the `tripwire` binary built with the bench profile, run as children; the
//! load generator is a lean hyper HTTP/1.1 client over a fixed pool of keep-alive connections.
//!
//! Settings come from the environment: `BENCH_RATE` (one rate or a comma-separated list),
//! `BENCH_SECS`, `BENCH_WARMUP_SECS`, `BENCH_ROUNDS`, `BENCH_CONNS`, `BENCH_WORKERS`,
//! `BENCH_MAX_SECS`, `BENCH_SLOW_RATE`, `BENCH_SLOW_CONNS`, `BENCH_SLOW_SECS`,
//! `BENCH_SLOW_ROUNDS`, `BENCH_CLIENT_THREADS`, `BENCH_SECTIONS` (any of `open,max,slow`),
//! `BENCH_MODES` (any of `json,sse`), `BENCH_POLICIES` (the gateway's `--policies`; default:
//! the built-in policy).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tripwire::runtime::Tasks;

/// Longest a single request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest latency the histograms hold (µs); larger values are clamped.
const HIST_MAX_US: u64 = 120_000_000;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Settings {
    rates: Vec<u64>,
    secs: u64,
    warmup_secs: u64,
    rounds: u32,
    conns: usize,
    workers: usize,
    max_secs: u64,
    slow_rate: u64,
    slow_conns: usize,
    slow_secs: u64,
    slow_rounds: u32,
    slow_delay_ms: u64,
    client_threads: usize,
    sections: Vec<String>,
    modes: Vec<Mode>,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let rates = env_list("BENCH_RATE", "10000")
            .iter()
            .map(|r| {
                r.parse::<u64>()
                    .map_err(|_| anyhow!("BENCH_RATE: {r:?} is not a whole number of requests/s"))
            })
            .collect::<anyhow::Result<Vec<u64>>>()?;
        let modes = env_list("BENCH_MODES", "json,sse")
            .iter()
            .map(|m| match m.as_str() {
                "json" => Ok(Mode::Json),
                "sse" => Ok(Mode::Sse),
                other => Err(anyhow!("BENCH_MODES: unknown mode {other:?} (json, sse)")),
            })
            .collect::<anyhow::Result<Vec<Mode>>>()?;
        let settings = Settings {
            rates,
            secs: env_num("BENCH_SECS", 10)?,
            warmup_secs: env_num("BENCH_WARMUP_SECS", 2)?,
            rounds: env_num("BENCH_ROUNDS", 2)?,
            conns: env_num("BENCH_CONNS", 64)?,
            workers: env_num("BENCH_WORKERS", 64)?,
            max_secs: env_num("BENCH_MAX_SECS", 5)?,
            slow_rate: env_num("BENCH_SLOW_RATE", 1000)?,
            slow_conns: env_num("BENCH_SLOW_CONNS", 256)?,
            slow_secs: env_num("BENCH_SLOW_SECS", 8)?,
            slow_rounds: env_num("BENCH_SLOW_ROUNDS", 1)?,
            slow_delay_ms: env_num("BENCH_SLOW_DELAY_MS", 60)?,
            client_threads: env_num("BENCH_CLIENT_THREADS", 1)?,
            sections: env_list("BENCH_SECTIONS", "open,max,slow"),
            modes,
        };
        if settings.rates.contains(&0) || settings.slow_rate == 0 {
            bail!("rates must be above zero");
        }
        if settings.conns == 0 || settings.workers == 0 || settings.slow_conns == 0 {
            bail!("BENCH_CONNS, BENCH_WORKERS and BENCH_SLOW_CONNS must be above zero");
        }
        if settings.secs == 0 || settings.max_secs == 0 || settings.slow_secs == 0 {
            bail!("durations must be above zero");
        }
        for s in &settings.sections {
            if !["open", "max", "slow"].contains(&s.as_str()) {
                bail!("BENCH_SECTIONS: unknown section {s:?} (open, max, slow)");
            }
        }
        Ok(settings)
    }

    fn has(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }

    /// Rough wall time of the whole run, seconds (excluding start-up and drains).
    fn estimate_secs(&self) -> u64 {
        let modes = self.modes.len() as u64;
        let mut total = 0;
        if self.has("open") {
            total += self.rates.len() as u64
                * modes
                * u64::from(self.rounds)
                * 2
                * (self.warmup_secs + self.secs);
        }
        if self.has("max") {
            total += modes * 2 * (1 + self.max_secs);
        }
        if self.has("slow") {
            total += modes * u64::from(self.slow_rounds) * 2 * (self.warmup_secs + self.slow_secs);
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A child `tripwire` process, killed when dropped (also on error paths).
struct Proc {
    name: &'static str,
    child: Child,
    /// WARN/ERROR lines the child logged after start-up (the last few), and how many.
    notable: Arc<Mutex<(u64, Vec<String>)>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _killed = self.child.kill();
        let _waited = self.child.wait();
    }
}

impl Proc {
    /// Starts `tripwire ARGS` and waits (up to 30 s) for a stderr line containing `ready`.
    /// Returns the process and that line; stderr keeps being drained by a thread.
    fn start(name: &'static str, args: &[&str], ready: &str) -> anyhow::Result<(Proc, String)> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tripwire"))
            .args(args)
            .env("NO_COLOR", "1")
            .env("TRIPWIRE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
        let notable = Arc::new(Mutex::new((0u64, Vec::new())));
        // Guard first, so the child dies if anything below fails.
        let proc = Proc {
            name,
            child,
            notable: Arc::clone(&notable),
        };
        let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
        let wanted = ready.to_owned();
        std::thread::Builder::new()
            .name(format!("{name}-stderr"))
            .spawn(move || {
                let mut found = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if !found && line.contains(&wanted) {
                        found = true;
                        let _sent = line_tx.send(line);
                        continue;
                    }
                    if line.contains(" WARN ") || line.contains(" ERROR ") {
                        if let Ok(mut n) = notable.lock() {
                            n.0 += 1;
                            if n.1.len() < 5 {
                                n.1.push(line);
                            }
                        }
                    } else if !found {
                        let _sent = line_tx.send(format!("(log) {line}"));
                    }
                }
            })
            .context("starting a stderr reader thread")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match line_rx.recv_timeout(left) {
                Ok(line) if line.starts_with("(log) ") => seen.push(line),
                Ok(line) => return Ok((proc, line)),
                Err(_) => bail!(
                    "{name} did not log {:?} within 30 s; its output:\n{}",
                    ready,
                    seen.join("\n")
                ),
            }
        }
    }

    fn report_notable(&self) {
        if let Ok(n) = self.notable.lock()
            && n.0 > 0
        {
            println!(
                "{}: {} WARN/ERROR log lines; first {}:",
                self.name,
                n.0,
                n.1.len()
            );
            for line in &n.1 {
                println!("    {line}");
            }
        }
    }
}

/// The value of `key=` in a tracing fmt line.
fn field(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    let prefix = format!("{key}=");
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .ok_or_else(|| anyhow!("no {key}= in {line:?}"))?;
    value
        .parse()
        .with_context(|| format!("{key}={value:?} is not an address"))
}

struct Sim {
    proc: Proc,
    addr: SocketAddr,
}

fn start_sim(first_byte_delay_ms: u64) -> anyhow::Result<Sim> {
    let delay = first_byte_delay_ms.to_string();
    let (proc, line) = Proc::start(
        "sim-upstream",
        &[
            "sim-upstream",
            "--listen",
            "127.0.0.1:0",
            "--first-byte-delay-ms",
            &delay,
        ],
        "simulated model serving",
    )?;
    let addr = field(&line, "addr")?;
    Ok(Sim { proc, addr })
}

struct Gateway {
    // Field order matters: the process dies before its store directory is removed.
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    _store: tempfile::TempDir,
}

fn start_gateway(upstream: SocketAddr) -> anyhow::Result<Gateway> {
    let store = tempfile::tempdir().context("creating a temporary store directory")?;
    let db = store.path().join("bench.db");
    let db = db
        .to_str()
        .ok_or_else(|| anyhow!("temporary path is not UTF-8"))?
        .to_owned();
    let upstream = format!("http://{upstream}");
    let mut args = vec![
        "serve",
        "--upstream",
        &upstream,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--store",
        &db,
    ];
    // `BENCH_POLICIES`: the gateway's policies (default: the built-in policy, drift included).
    let policies = std::env::var("BENCH_POLICIES").unwrap_or_default();
    if !policies.trim().is_empty() {
        args.extend(["--policies", policies.trim()]);
    }
    let (proc, line) = Proc::start("gateway", &args, "tripwire serving")?;
    Ok(Gateway {
        listen: field(&line, "listen")?,
        admin: field(&line, "admin")?,
        proc,
        _store: store,
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Json,
    Sse,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Json => "json",
            Mode::Sse => "sse",
        }
    }

    fn body(self) -> Bytes {
        let stream = self == Mode::Sse;
        Bytes::from(format!(
            r#"{{"model":"tripwire-sim-1","stream":{stream},"messages":[{{"role":"user","content":"Say hello."}}]}}"#
        ))
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, tasks: &Tasks) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tasks.spawn("bench-conn", async move {
        let _closed = conn.await;
    });
    Ok(sender)
}

/// What every request of one run looks like.
#[derive(Clone)]
struct Template {
    addr: SocketAddr,
    host: http::HeaderValue,
    body: Bytes,
}

impl Template {
    fn new(addr: SocketAddr, mode: Mode) -> anyhow::Result<Template> {
        Ok(Template {
            addr,
            host: http::HeaderValue::from_str(&addr.to_string())?,
            body: mode.body(),
        })
    }

    fn request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        Ok(Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, "Bearer sk-bench")
            .body(Full::new(self.body.clone()))?)
    }
}

/// One request on `conn` (reconnecting if it is gone), the body read to its last byte.
/// On error the connection is dropped, so the next call reconnects.
async fn exchange(
    conn: &mut Option<Sender>,
    template: &Template,
    tasks: &Tasks,
) -> anyhow::Result<StatusCode> {
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let sender = match conn {
            Some(sender) => sender,
            None => conn.insert(connect(template.addr, tasks).await?),
        };
        sender.ready().await?;
        let response = sender.send_request(template.request()?).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut bytes = 0usize;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                bytes += data.len();
            }
        }
        if status == StatusCode::OK && bytes == 0 {
            bail!("empty body");
        }
        Ok(status)
    })
    .await
    .unwrap_or_else(|_| Err(anyhow!("timed out after {REQUEST_TIMEOUT:?}")));
    if result.is_err() {
        *conn = None;
    }
    result
}

async fn get(addr: SocketAddr, path: &str, tasks: &Tasks) -> anyhow::Result<String> {
    let mut sender = connect(addr, tasks).await?;
    sender.ready().await?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        bail!("GET {path} on {addr}: {}", response.status());
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, HIST_MAX_US, 3)?)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What one worker (one connection) saw.
struct WorkerStats {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    ok: u64,
    non_200: u64,
    errors: u64,
    first_error: Option<String>,
    first_done: Option<Instant>,
    last_done: Option<Instant>,
}

impl WorkerStats {
    fn new() -> anyhow::Result<WorkerStats> {
        Ok(WorkerStats {
            latency: histogram()?,
            send_lag: histogram()?,
            ok: 0,
            non_200: 0,
            errors: 0,
            first_error: None,
            first_done: None,
            last_done: None,
        })
    }

    fn record(&mut self, scheduled: Instant, outcome: anyhow::Result<StatusCode>) {
        let done = Instant::now();
        match outcome {
            Ok(StatusCode::OK) => {
                self.ok += 1;
                self.latency.saturating_record(micros(done - scheduled));
            }
            Ok(status) => {
                self.non_200 += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("status {status}"));
                }
            }
            Err(err) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{err:#}"));
                }
            }
        }
        self.first_done = Some(self.first_done.map_or(done, |d| d.min(done)));
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    fn merge(&mut self, other: &WorkerStats) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.send_lag.add(&other.send_lag)?;
        self.ok += other.ok;
        self.non_200 += other.non_200;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.first_done = match (self.first_done, other.first_done) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(())
    }
}

/// The result of one measured run against one target.
struct RunResult {
    stats: WorkerStats,
    /// Requests/s completed with 200 over the measured window.
    achieved: f64,
    /// Requests that found every connection busy at their scheduled time.
    late: u64,
    /// Requests never sent because the run overran twice its length.
    unsent: u64,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    scheduled: Instant,
    record: bool,
}

/// Opens `n` keep-alive connections.
async fn open_pool(addr: SocketAddr, n: usize, tasks: &Tasks) -> anyhow::Result<Vec<Sender>> {
    let mut pool = Vec::with_capacity(n);
    for _ in 0..n {
        pool.push(connect(addr, tasks).await?);
    }
    Ok(pool)
}

/// Fixed arrival rate: `rate` requests/s for `warmup + secs`, only the last `secs` recorded.
async fn open_loop(
    template: &Template,
    rate: u64,
    warmup: Duration,
    secs: Duration,
    conns: usize,
    tasks: &Tasks,
) -> anyhow::Result<RunResult> {
    let pool = open_pool(template.addr, conns, tasks).await?;
    let (idle_tx, idle_rx) = mpsc::channel::<usize>(conns);
    let mut job_txs = Vec::with_capacity(conns);
    let mut workers = JoinSet::new();
    for (id, sender) in pool.into_iter().enumerate() {
        let (job_tx, mut job_rx) = mpsc::unbounded_channel::<Job>();
        job_txs.push(job_tx);
        let idle_tx = idle_tx.clone();
        let template = template.clone();
        let tasks = tasks.clone();
        idle_tx.try_send(id)?;
        workers.spawn(async move {
            let mut stats = WorkerStats::new()?;
            let mut conn = Some(sender);
            while let Some(job) = job_rx.recv().await {
                if job.record {
                    stats
                        .send_lag
                        .saturating_record(micros(Instant::now() - job.scheduled));
                }
                let outcome = exchange(&mut conn, &template, &tasks).await;
                if job.record {
                    stats.record(job.scheduled, outcome);
                }
                if idle_tx.send(id).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(stats)
        });
    }
    drop(idle_tx);

    let interval_ns = 1_000_000_000 / rate;
    let n_warm = rate * warmup.as_secs();
    let n_total = n_warm + rate * secs.as_secs();
    // A little head start so the ticker thread is up before the first tick.
    let t0 = Instant::now() + Duration::from_millis(20);
    let give_up = t0 + (warmup + secs) * 2;
    let ticker = std::thread::Builder::new()
        .name("bench-ticker".to_owned())
        .spawn(move || ticker(t0, interval_ns, n_warm, n_total, give_up, idle_rx, job_txs))
        .context("starting the ticker thread")?;

    let mut stats = WorkerStats::new()?;
    while let Some(joined) = workers.join_next().await {
        stats.merge(&joined??)?;
    }
    let (late, unsent) = ticker
        .join()
        .map_err(|_| anyhow!("the ticker thread panicked"))?;
    // Completions per second between the first and the last measured completion: a target
    // that falls behind stretches the window; a slow but keeping-up target does not.
    let achieved = match (stats.first_done, stats.last_done) {
        (Some(first), Some(last)) if last > first && stats.ok > 1 => {
            (stats.ok - 1) as f64 / (last - first).as_secs_f64()
        }
        _ => stats.ok as f64 / secs.as_secs_f64(),
    };
    Ok(RunResult {
        achieved,
        stats,
        late,
        unsent,
    })
}

/// Issues job `i` at `t0 + i * interval` to an idle worker; returns (late, unsent).
fn ticker(
    t0: Instant,
    interval_ns: u64,
    n_warm: u64,
    n_total: u64,
    give_up: Instant,
    mut idle_rx: mpsc::Receiver<usize>,
    job_txs: Vec<mpsc::UnboundedSender<Job>>,
) -> (u64, u64) {
    let mut late = 0;
    for i in 0..n_total {
        let scheduled = t0 + Duration::from_nanos(i * interval_ns);
        let now = Instant::now();
        if now < scheduled {
            std::thread::sleep(scheduled - now);
        } else if now > give_up {
            return (late, n_total.max(n_warm) - i.max(n_warm));
        }
        let id = match idle_rx.try_recv() {
            Ok(id) => id,
            Err(mpsc::error::TryRecvError::Empty) => {
                if i >= n_warm {
                    late += 1;
                }
                match idle_rx.blocking_recv() {
                    Some(id) => id,
                    None => return (late, n_total - i),
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return (late, n_total - i),
        };
        let job = Job {
            scheduled,
            record: i >= n_warm,
        };
        if job_txs.get(id).is_none_or(|tx| tx.send(job).is_err()) {
            return (late, n_total - i);
        }
    }
    (late, 0)
}

/// Closed loop: `workers` connections sending back to back; 1 s warm-up, then `secs` measured.
async fn closed_loop(
    template: &Template,
    secs: Duration,
    workers: usize,
    tasks: &Tasks,
) -> anyhow::Result<RunResult> {
    let pool = open_pool(template.addr, workers, tasks).await?;
    let start = Instant::now();
    let measure_start = start + Duration::from_secs(1);
    let end = measure_start + secs;
    let mut set = JoinSet::new();
    for sender in pool {
        let template = template.clone();
        let tasks = tasks.clone();
        set.spawn(async move {
            let mut stats = WorkerStats::new()?;
            let mut conn = Some(sender);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = exchange(&mut conn, &template, &tasks).await;
                if sent >= measure_start && Instant::now() <= end {
                    stats.record(sent, outcome);
                }
            }
            anyhow::Ok(stats)
        });
    }
    let mut stats = WorkerStats::new()?;
    while let Some(joined) = set.join_next().await {
        stats.merge(&joined??)?;
    }
    Ok(RunResult {
        achieved: stats.ok as f64 / secs.as_secs_f64(),
        stats,
        late: 0,
        unsent: 0,
    })
}

// ---------------------------------------------------------------------------------------------
// Gateway /metrics
// ---------------------------------------------------------------------------------------------

/// The parts of the gateway's `/metrics` the benchmark reports, summed over labels.
#[derive(Debug, Clone, Default)]
struct GatewayMetrics {
    /// `le` (seconds, as text) → cumulative count, `tripwire_proxy_overhead_seconds_bucket`.
    overhead_buckets: BTreeMap<u64, f64>,
    captured: f64,
    capture_dropped_chunks: f64,
    capture_skipped: f64,
    store_dropped: f64,
    store_written: f64,
    store_queue_depth: f64,
}

/// `le` in nanoseconds (`+Inf` → `u64::MAX`), so buckets sort numerically.
fn le_key(line: &str) -> Option<u64> {
    let start = line.find("le=\"")? + 4;
    let rest = line.get(start..)?;
    let le = rest.get(..rest.find('"')?)?;
    if le == "+Inf" {
        return Some(u64::MAX);
    }
    let secs: f64 = le.parse().ok()?;
    Some((secs * 1e9).round() as u64)
}

impl GatewayMetrics {
    async fn fetch(admin: SocketAddr, tasks: &Tasks) -> anyhow::Result<GatewayMetrics> {
        let text = get(admin, "/metrics", tasks).await?;
        let mut m = GatewayMetrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name_labels, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = name_labels.split('{').next().unwrap_or_default();
            match name {
                "tripwire_proxy_overhead_seconds_bucket" => {
                    if let Some(le) = le_key(name_labels) {
                        *m.overhead_buckets.entry(le).or_default() += value;
                    }
                }
                "tripwire_capture_exchanges_total" => m.captured += value,
                "tripwire_capture_dropped_chunks_total" => m.capture_dropped_chunks += value,
                "tripwire_capture_skipped_total" => m.capture_skipped += value,
                "tripwire_store_dropped_total" => m.store_dropped += value,
                "tripwire_store_rows_written_total" => m.store_written += value,
                "tripwire_store_queue_depth" => m.store_queue_depth += value,
                _ => {}
            }
        }
        Ok(m)
    }

    /// `self - before` for counters and buckets.
    fn since(&self, before: &GatewayMetrics) -> GatewayMetrics {
        GatewayMetrics {
            overhead_buckets: self
                .overhead_buckets
                .iter()
                .map(|(le, n)| (*le, n - before.overhead_buckets.get(le).unwrap_or(&0.0)))
                .collect(),
            captured: self.captured - before.captured,
            capture_dropped_chunks: self.capture_dropped_chunks - before.capture_dropped_chunks,
            capture_skipped: self.capture_skipped - before.capture_skipped,
            store_dropped: self.store_dropped - before.store_dropped,
            store_written: self.store_written - before.store_written,
            store_queue_depth: self.store_queue_depth,
        }
    }

    /// Upper bound of the overhead bucket holding quantile `q`, as text.
    fn overhead_quantile(&self, q: f64) -> String {
        let count = self
            .overhead_buckets
            .get(&u64::MAX)
            .copied()
            .unwrap_or_default();
        if count <= 0.0 {
            return "-".to_owned();
        }
        let mut previous = 0u64;
        for (le, cumulative) in &self.overhead_buckets {
            if *cumulative >= q * count {
                return if *le == u64::MAX {
                    format!("> {}", fmt_ns(previous))
                } else {
                    format!("≤ {}", fmt_ns(*le))
                };
            }
            previous = *le;
        }
        "-".to_owned()
    }
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{} µs", ns / 1000)
    }
}

/// Waits (up to 30 s) until everything the gateway captured has reached the store, so a
/// capture backlog does not steal CPU from the next run. Returns how long it took.
async fn drain(admin: SocketAddr, tasks: &Tasks) -> anyhow::Result<(Duration, GatewayMetrics)> {
    let start = Instant::now();
    let mut last = GatewayMetrics::fetch(admin, tasks).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = GatewayMetrics::fetch(admin, tasks).await?;
        let settled = now.captured == last.captured
            && now.store_written == last.store_written
            && now.store_queue_depth == 0.0
            && now.store_written + now.store_dropped >= now.captured;
        if settled || start.elapsed() > Duration::from_secs(30) {
            return Ok((start.elapsed(), now));
        }
        last = now;
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

fn ms(hist: &Histogram<u64>, q: f64) -> f64 {
    hist.value_at_quantile(q) as f64 / 1000.0
}

/// One row of the latency table.
fn latency_row(label: &str, r: &RunResult) -> String {
    let h = &r.stats.latency;
    format!(
        "| {label} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
        r.achieved,
        ms(h, 0.50),
        ms(h, 0.90),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0,
        ms(&r.stats.send_lag, 0.99),
        r.late,
        r.stats.errors,
        r.stats.non_200,
        r.unsent,
    )
}

const LATENCY_HEADER: &str = "| run | target | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | send-lag p99 ms | late | errors | non-200 | unsent |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

const METRICS_HEADER: &str = "| run | overhead p50 | overhead p99 | exchanges | capture dropped chunks | capture skipped | store dropped | rows written | drain s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|";

fn metrics_row(label: &str, m: &GatewayMetrics, drained: Duration) -> String {
    format!(
        "| {label} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
        m.overhead_quantile(0.50),
        m.overhead_quantile(0.99),
        m.captured,
        m.capture_dropped_chunks,
        m.capture_skipped,
        m.store_dropped,
        m.store_written,
        drained.as_secs_f64(),
    )
}

/// Direct and gateway runs of one (mode, rate), over all rounds.
struct Pair {
    label: String,
    rate: Option<u64>,
    direct: Vec<RunResult>,
    gateway: Vec<RunResult>,
}

fn merged(runs: &[RunResult]) -> anyhow::Result<(Histogram<u64>, f64)> {
    let mut h = histogram()?;
    for r in runs {
        h.add(&r.stats.latency)?;
    }
    let rate = runs.iter().map(|r| r.achieved).sum::<f64>() / runs.len().max(1) as f64;
    Ok((h, rate))
}

fn print_ratio_table(title: &str, pairs: &[Pair]) -> anyhow::Result<()> {
    println!("\n### {title}\n");
    println!(
        "| run | direct req/s | gateway req/s | gateway/direct | direct p99 ms | gateway p99 ms | added p99 ms | added p99 per round ms | added p50 ms | added < 1 ms p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---:|---|");
    for p in pairs {
        let (dh, dr) = merged(&p.direct)?;
        let (gh, gr) = merged(&p.gateway)?;
        let added = ms(&gh, 0.99) - ms(&dh, 0.99);
        let per_round: Vec<String> = p
            .direct
            .iter()
            .zip(&p.gateway)
            .map(|(d, g)| {
                format!(
                    "{:+.2}",
                    ms(&g.stats.latency, 0.99) - ms(&d.stats.latency, 0.99)
                )
            })
            .collect();
        let clean = p
            .gateway
            .iter()
            .all(|g| g.stats.errors == 0 && g.stats.non_200 == 0 && g.unsent == 0);
        let held = p.rate.is_none_or(|rate| gr >= 0.95 * rate as f64);
        let verdict = if added < 1.0 && clean && held {
            "yes"
        } else {
            "no"
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} | {:+.2} | {} | {:+.2} | {} |",
            p.label,
            dr,
            gr,
            gr / dr.max(f64::MIN_POSITIVE),
            ms(&dh, 0.99),
            ms(&gh, 0.99),
            added,
            per_round.join(", "),
            ms(&gh, 0.50) - ms(&dh, 0.50),
            verdict,
        );
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(
            || "?".to_owned(),
            |kb| format!("{:.1} GiB", kb as f64 / 1048576.0),
        );
    format!(
        "nproc {cpus}; CPU {model}; memory {mem}; load average at start {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------------

/// Runs direct vs gateway for each mode (and rate), alternating, `rounds` times each.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per section, each spelled out"
)]
async fn open_section(
    section: &str,
    rates: &[u64],
    rounds: u32,
    conns: usize,
    secs: u64,
    settings: &Settings,
    sim: &Sim,
    gateway: &Gateway,
    tasks: &Tasks,
) -> anyhow::Result<Vec<Pair>> {
    let warmup = Duration::from_secs(settings.warmup_secs);
    let secs = Duration::from_secs(secs);
    let mut pairs = Vec::new();
    println!("\n### {section}: per run\n");
    println!("{LATENCY_HEADER}");
    let mut metric_rows = Vec::new();
    for &rate in rates {
        for &mode in &settings.modes {
            let label = format!("{} @ {rate}/s", mode.as_str());
            let direct_t = Template::new(sim.addr, mode)?;
            let gateway_t = Template::new(gateway.listen, mode)?;
            let mut pair = Pair {
                label: label.clone(),
                rate: Some(rate),
                direct: Vec::new(),
                gateway: Vec::new(),
            };
            for round in 1..=rounds {
                let run_label = format!("{label} r{round}");
                let d = open_loop(&direct_t, rate, warmup, secs, conns, tasks).await?;
                println!("{}", latency_row(&format!("{run_label} | direct"), &d));
                let before = GatewayMetrics::fetch(gateway.admin, tasks).await?;
                let g = open_loop(&gateway_t, rate, warmup, secs, conns, tasks).await?;
                println!("{}", latency_row(&format!("{run_label} | gateway"), &g));
                let (drained, after) = drain(gateway.admin, tasks).await?;
                metric_rows.push(metrics_row(&run_label, &after.since(&before), drained));
                for r in [&d, &g] {
                    if let Some(err) = &r.stats.first_error {
                        println!("|   first error: {err} | | | | | | | | | | | | |");
                    }
                }
                pair.direct.push(d);
                pair.gateway.push(g);
            }
            pairs.push(pair);
        }
    }
    println!("\n### {section}: gateway /metrics per gateway run (overhead: bucket upper bounds)\n");
    println!("{METRICS_HEADER}");
    for row in metric_rows {
        println!("{row}");
    }
    Ok(pairs)
}

async fn max_section(
    settings: &Settings,
    sim: &Sim,
    gateway: &Gateway,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    let secs = Duration::from_secs(settings.max_secs);
    println!(
        "\n### maximum throughput, closed loop ({} workers, {} s after 1 s warm-up): per run\n",
        settings.workers, settings.max_secs
    );
    println!("{LATENCY_HEADER}");
    let mut pairs = Vec::new();
    for &mode in &settings.modes {
        let d = closed_loop(
            &Template::new(sim.addr, mode)?,
            secs,
            settings.workers,
            tasks,
        )
        .await?;
        println!(
            "{}",
            latency_row(&format!("{} max | direct", mode.as_str()), &d)
        );
        let g = closed_loop(
            &Template::new(gateway.listen, mode)?,
            secs,
            settings.workers,
            tasks,
        )
        .await?;
        println!(
            "{}",
            latency_row(&format!("{} max | gateway", mode.as_str()), &g)
        );
        let _drained = drain(gateway.admin, tasks).await?;
        pairs.push(Pair {
            label: format!("{} max", mode.as_str()),
            rate: None,
            direct: vec![d],
            gateway: vec![g],
        });
    }
    println!("\n### maximum throughput: ratio\n");
    println!("| mode | direct req/s | gateway req/s | gateway/direct |");
    println!("|---|---:|---:|---:|");
    for p in &pairs {
        let (_, dr) = merged(&p.direct)?;
        let (_, gr) = merged(&p.gateway)?;
        println!(
            "| {} | {dr:.0} | {gr:.0} | {:.3} |",
            p.label,
            gr / dr.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

async fn bench(settings: Settings) -> anyhow::Result<()> {
    let tasks = Tasks::new();
    println!("# tripwire gateway benchmark\n");
    println!("machine: {}", machine());
    println!(
        "settings: rates {:?}/s, {} s measured after {} s warm-up, {} rounds, {} connections, \
         modes {:?}, sections {:?}; closed loop {} workers × {} s; slow upstream {} ms to first \
         byte at {}/s over {} connections × {} s, {} round(s); client runtime {} thread(s)",
        settings.rates,
        settings.secs,
        settings.warmup_secs,
        settings.rounds,
        settings.conns,
        settings
            .modes
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>(),
        settings.sections,
        settings.workers,
        settings.max_secs,
        settings.slow_delay_ms,
        settings.slow_rate,
        settings.slow_conns,
        settings.slow_secs,
        settings.slow_rounds,
        settings.client_threads,
    );
    println!(
        "latency: scheduled send time → last body byte (µs HDR histogram); send-lag: scheduled \
         time → request handed to its connection; late: no idle connection at the scheduled time"
    );
    println!(
        "expected duration: about {} s plus start-up and capture drains",
        settings.estimate_secs()
    );

    let total = Instant::now();
    if settings.has("open") || settings.has("max") {
        let sim = start_sim(0)?;
        let gateway = start_gateway(sim.addr)?;
        println!(
            "\nsim-upstream {} (instant); gateway {} (admin {})",
            sim.addr, gateway.listen, gateway.admin
        );
        if settings.has("open") {
            let pairs = open_section(
                "fixed arrival rate, instant upstream",
                &settings.rates,
                settings.rounds,
                settings.conns,
                settings.secs,
                &settings,
                &sim,
                &gateway,
                &tasks,
            )
            .await?;
            print_ratio_table(
                "fixed arrival rate, instant upstream: gateway vs direct (rounds merged)",
                &pairs,
            )?;
        }
        if settings.has("max") {
            max_section(&settings, &sim, &gateway, &tasks).await?;
        }
        println!();
        sim.proc.report_notable();
        gateway.proc.report_notable();
    }
    if settings.has("slow") {
        let sim = start_sim(settings.slow_delay_ms)?;
        let gateway = start_gateway(sim.addr)?;
        println!(
            "\nsim-upstream {} ({} ms to first byte); gateway {} (admin {})",
            sim.addr, settings.slow_delay_ms, gateway.listen, gateway.admin
        );
        let pairs = open_section(
            &format!(
                "fixed arrival rate, {} ms upstream, {} connections",
                settings.slow_delay_ms, settings.slow_conns
            ),
            &[settings.slow_rate],
            settings.slow_rounds,
            settings.slow_conns,
            settings.slow_secs,
            &settings,
            &sim,
            &gateway,
            &tasks,
        )
        .await?;
        print_ratio_table(
            &format!(
                "fixed arrival rate, {} ms upstream: gateway vs direct",
                settings.slow_delay_ms
            ),
            &pairs,
        )?;
        println!();
        sim.proc.report_notable();
        gateway.proc.report_notable();
    }
    println!("\ntotal {:.0} s", total.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    // `cargo bench` passes `--bench`; any other argument is a filter we do not support.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(bench(settings))
}
