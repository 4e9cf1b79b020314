//! The batch writer: waits for one exchange, gathers more until the batch is full or the flush
//! interval has passed, writes the batch in one transaction on a blocking thread, repeats.
//!
//! A failed write (disk full, locked database) keeps its batch and retries with backoff while
//! the bounded queue in front sheds new exchanges, counted. It exits once its input is closed
//! and empty, or once cancelled, after writing what it holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::runtime::Tasks;
use tokio::sync::mpsc;

use super::{Store, StoreError, StoreItem};
use crate::telemetry::Metrics;

/// Batch limits and retention.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Rows per transaction at most.
    pub batch_rows: usize,
    /// Longest an exchange waits for its batch.
    pub flush_interval: Duration,
    /// Retention, applied between batches.
    pub retention: super::Retention,
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Runs the writer until `rx` is closed and drained, or `stop` is cancelled (then it drains
/// what is already queued and writes it before returning).
pub async fn run_writer(
    store: Store,
    mut rx: mpsc::Receiver<StoreItem>,
    config: WriterConfig,
    metrics: Metrics,
    tasks: Tasks,
) {
    let stop = tasks.token().clone();
    if config.retention.max_bytes > 0 && !store.enforces_size_limit() {
        tracing::info!(
            "store.max_bytes is not applied to PostgreSQL; rows are deleted by age only"
        );
    }
    let store = Arc::new(Mutex::new(store));
    let mut batch: Vec<StoreItem> = Vec::with_capacity(config.batch_rows);
    let mut backoff = Duration::from_millis(50);
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut next_retention = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_retention {
            next_retention = tokio::time::Instant::now() + config.retention.interval;
            retain(&store, config.retention, &tasks).await;
        }
        if batch.is_empty() {
            let received = tokio::select! {
                n = rx.recv_many(&mut batch, config.batch_rows) => n,
                () = stop.cancelled() => 0,
            };
            if received == 0 {
                break;
            }
            let deadline = tokio::time::Instant::now() + config.flush_interval;
            while batch.len() < config.batch_rows {
                let room = config.batch_rows - batch.len();
                let more = tokio::select! {
                    n = rx.recv_many(&mut batch, room) => n,
                    () = tokio::time::sleep_until(deadline) => break,
                    () = stop.cancelled() => break,
                };
                if more == 0 {
                    break;
                }
            }
        }
        metrics
            .store_queue_depth
            .set(i64::try_from(rx.len()).unwrap_or(i64::MAX));
        match write(&store, &mut batch, &metrics, &tasks).await {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                if let Some(since) = failing_since.take() {
                    metrics.store_write_failing.set(0);
                    tracing::info!(after_s = since.elapsed().as_secs(), "store writes resumed");
                }
            }
            Err(err) => {
                metrics
                    .store_write_errors
                    .get_or_create(&crate::telemetry::ReasonLabels { reason: err.kind() })
                    .inc();
                if failing_since.is_none() {
                    failing_since = Some(tokio::time::Instant::now());
                    metrics.store_write_failing.set(1);
                    tracing::error!(
                        kind = err.kind(),
                        error = %err,
                        "store writes failing (a full disk says disk_full); the proxy keeps \
                         serving, new exchanges are shed and counted until a write succeeds"
                    );
                }
                tracing::warn!(
                    kind = err.kind(),
                    error = %err,
                    pending = batch.len(),
                    "store write failed, retrying; new exchanges are shed while it fails"
                );
                let retry = tokio::select! {
                    () = tokio::time::sleep(backoff) => true,
                    () = stop.cancelled() => false,
                };
                backoff = (backoff * 2).min(MAX_BACKOFF);
                if !retry {
                    break;
                }
            }
        }
    }
    // Shutdown: whatever is held or still queued gets one more try.
    while let Ok(item) = rx.try_recv() {
        batch.push(item);
    }
    rx.close();
    if !batch.is_empty() {
        let pending = batch.len();
        if let Err(err) = write(&store, &mut batch, &metrics, &tasks).await {
            for _ in 0..pending {
                metrics.store_drop("shutdown_write_failed");
            }
            tracing::error!(kind = err.kind(), error = %err, lost = pending, "store could not write its last batch at shutdown");
        }
    }
    metrics.store_queue_depth.set(0);
}

async fn retain(store: &Arc<Mutex<Store>>, retention: super::Retention, tasks: &Tasks) {
    let store = Arc::clone(store);
    let result = tasks
        .spawn_blocking("store-retention", move || match store.lock() {
            Ok(store) => store.apply_retention(&retention),
            Err(_) => Err(StoreError::Task("store mutex poisoned".to_owned())),
        })
        .await;
    match result {
        Ok(Ok((0, 0))) => {}
        Ok(Ok((exchanges, flags))) => {
            tracing::info!(exchanges, flags, "retention deleted old rows");
        }
        Ok(Err(err)) => tracing::warn!(kind = err.kind(), error = %err, "retention failed"),
        Err(err) => tracing::warn!(error = %err, "retention task failed"),
    }
}

/// Writes `batch` and empties it on success.
async fn write(
    store: &Arc<Mutex<Store>>,
    batch: &mut Vec<StoreItem>,
    metrics: &Metrics,
    tasks: &Tasks,
) -> Result<(), StoreError> {
    let rows = std::mem::take(batch);
    let store = Arc::clone(store);
    let started = tokio::time::Instant::now();
    let (rows, result) = tasks
        .spawn_blocking("store-write", move || {
            let result = match store.lock() {
                Ok(mut store) => store.insert_batch(&rows),
                Err(_) => Err(StoreError::Task("store mutex poisoned".to_owned())),
            };
            (rows, result)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
    metrics
        .store_batch_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(_) => {
            metrics.store_written.inc_by(rows.len() as u64);
            metrics.observe_store_batch(rows.len());
            Ok(())
        }
        Err(err) => {
            *batch = rows;
            Err(err)
        }
    }
}
