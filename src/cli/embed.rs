//! `tripwire embed`: embeds one field of every line of a JSONL file through the batcher, the
//! same path the model-based detectors use, and reports throughput and per-item latency.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::time::Instant;

use crate::infer::{Device, Embedder, EmbedderConfig, Pooling, Truncation, batcher};
use crate::runtime::Tasks;

/// Arguments of `tripwire embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// JSONL (or JSONL.gz) file, one object per line.
    #[arg(long)]
    pub input: PathBuf,
    /// The string field to embed.
    #[arg(long, default_value = "output")]
    pub field: String,
    /// Write each input object with an `embedding` field added, as JSONL.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Embed at most this many texts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// ONNX Runtime threads per operator.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Most texts per batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Longest a batch waits to fill.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Longest input in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Keep the head and the tail of long texts instead of the head only.
    #[arg(long)]
    pub head_tail: bool,
    /// Split a long text into up to this many windows of `--max-tokens` and average their
    /// embeddings.
    #[arg(long, default_value_t = 1)]
    pub chunks: usize,
    /// Embed this many texts first, untimed (ONNX Runtime's first runs allocate).
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Print the report as one JSON object (for benches/infer/).
    #[arg(long)]
    pub json: bool,
    /// The ONNX Runtime library (default: $ORT_DYLIB_PATH, then models/).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
    /// The ONNX model (default: models/all-MiniLM-L6-v2-int8.onnx on the CPU,
    /// models/all-MiniLM-L6-v2-fp16.onnx on CUDA).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The tokenizer.json (default: models/all-MiniLM-L6-v2-tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// How token states are pooled: mean, or cls (the first token).
    #[arg(long, value_enum, default_value_t = Pooling::Mean)]
    pub pooling: Pooling,
}

/// Runs `tripwire embed`.
pub async fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let records = read_records(&args)?;
    anyhow::ensure!(
        !records.is_empty(),
        "no line of {} has a string field `{}`",
        args.input.display(),
        args.field
    );
    let config = EmbedderConfig {
        onnxruntime: args.onnxruntime.clone(),
        model: args.model.clone(),
        tokenizer: args.tokenizer.clone(),
        device: args.device,
        intra_threads: args.threads,
        max_tokens: args.max_tokens,
        truncation: if args.head_tail {
            Truncation::HeadTail
        } else {
            Truncation::Head
        },
        chunks: args.chunks,
        max_batch: args.max_batch,
        max_wait: args.max_wait,
        queue_capacity: args.max_batch.max(1) * 4,
        pooling: args.pooling,
    };
    let embedder = tokio::task::block_in_place(|| Embedder::load(&config))?;
    let device = embedder.device();
    let tasks = Tasks::new();
    let batches: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let observed = Arc::clone(&batches);
    let observer: batcher::BatchObserver = Arc::new(move |_texts, elapsed| {
        observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(elapsed);
    });
    let handle = batcher::start_observed(
        embedder,
        &config,
        &tasks,
        crate::telemetry::Metrics::default(),
        Some(observer),
    );
    if args.warmup > 0 {
        let mut warming = Vec::new();
        for (_, text) in records.iter().take(args.warmup) {
            warming.push(handle.submit(text.clone()).await?);
        }
        for receiver in warming {
            receiver.await.context("the embedding worker stopped")??;
        }
        batches.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    // A producer fills the queue as fast as it drains; answers are awaited here in order, and
    // each latency runs from submission to answer.
    let texts: Vec<String> = records.iter().map(|(_, text)| text.clone()).collect();
    let (pending_tx, mut pending_rx) = tokio::sync::mpsc::unbounded_channel();
    let producer_handle = handle.clone();
    let producer = tasks.spawn("embed-producer", async move {
        for text in texts {
            let submitted = Instant::now();
            let receiver = producer_handle.submit(text).await?;
            let timed = async move {
                let answer = receiver.await;
                (answer, submitted.elapsed())
            };
            if pending_tx.send(Box::pin(timed)).is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    drop(handle);

    let started = Instant::now();
    let mut latencies = Vec::with_capacity(records.len());
    let mut embeddings = Vec::with_capacity(records.len());
    let mut inflight = futures_util::stream::FuturesOrdered::new();
    let mut producing = true;
    loop {
        use futures_util::StreamExt;
        tokio::select! {
            next = pending_rx.recv(), if producing => match next {
                Some(timed) => inflight.push_back(timed),
                None => producing = false,
            },
            Some((answer, latency)) = inflight.next(), if !inflight.is_empty() => {
                let embedding = answer.context("the embedding worker stopped")??;
                latencies.push(latency);
                embeddings.push(embedding);
            },
            else => break,
        }
    }
    let elapsed = started.elapsed();
    producer.await??;
    tasks.wait().await;

    if let Some(path) = &args.output {
        write_output(path, &records, &embeddings)?;
    }
    let mut batches = std::mem::take(&mut *batches.lock().unwrap_or_else(|p| p.into_inner()));
    report(
        &args,
        device,
        embeddings.len(),
        elapsed,
        &mut latencies,
        &mut batches,
    )
}

/// Each line that has the field (its object and the text), up to `--limit`.
fn read_records(args: &EmbedArgs) -> anyhow::Result<Vec<(serde_json::Value, String)>> {
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let reader: Box<dyn Read> = if args.input.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut records = Vec::new();
    for (number, line) in BufReader::new(reader).lines().enumerate() {
        if records.len() >= limit {
            break;
        }
        let line = line.with_context(|| format!("reading {}", args.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", args.input.display(), number + 1))?;
        if let Some(text) = value.get(&args.field).and_then(|v| v.as_str()) {
            let text = text.to_owned();
            records.push((value, text));
        }
    }
    Ok(records)
}

fn write_output(
    path: &PathBuf,
    records: &[(serde_json::Value, String)],
    embeddings: &[crate::infer::Embedding],
) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for ((record, _), embedding) in records.iter().zip(embeddings) {
        let mut record = record.clone();
        if let Some(object) = record.as_object_mut() {
            object.insert("embedding".to_owned(), serde_json::json!(embedding));
        }
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn report(
    args: &EmbedArgs,
    device: Device,
    items: usize,
    elapsed: Duration,
    latencies: &mut [Duration],
    batches: &mut [Duration],
) -> anyhow::Result<()> {
    latencies.sort_unstable();
    batches.sort_unstable();
    let (latencies, batches) = (&*latencies, &*batches);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let item = |q| ms(quantile(latencies, q));
    let batch = |q| ms(quantile(batches, q));
    let per_second = items as f64 / elapsed.as_secs_f64().max(1e-9);
    if args.json {
        let report = serde_json::json!({
            "items": items,
            "seconds": elapsed.as_secs_f64(),
            "items_per_s": per_second,
            "batches": batches.len(),
            "batch_p50_ms": batch(0.5),
            "batch_p99_ms": batch(0.99),
            "item_p50_ms": item(0.5),
            "item_p99_ms": item(0.99),
            "device": device.as_str(),
            "threads": args.threads,
            "max_batch": args.max_batch,
            "max_tokens": args.max_tokens,
        });
        return super::output::emit(&format!("{report}\n"));
    }
    super::output::emit(&format!(
        "embedded {items} texts in {:.2} s: {per_second:.1} items/s; latency per item p50 {:.1} ms, p99 {:.1} ms; \
         per batch ({} batches) p50 {:.1} ms, p99 {:.1} ms \
         (device {:?}, {} intra-op threads, max batch {}, max wait {:?}, max tokens {})\n",
        elapsed.as_secs_f64(),
        item(0.5),
        item(0.99),
        batches.len(),
        batch(0.5),
        batch(0.99),
        device,
        args.threads,
        args.max_batch,
        args.max_wait,
        args.max_tokens,
    ))
}

/// The `q` quantile of sorted `values` (nearest rank), zero when empty.
fn quantile(values: &[Duration], q: f64) -> Duration {
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values.get(index).copied().unwrap_or_default()
}
