//! The dynamic batcher: many callers, one model.
//!
//! Callers send jobs (a text and a oneshot for its answer) through an [`EmbedderHandle`] into a
//! bounded queue. One worker waits for a job, then takes more until it has `max_batch` or
//! `max_wait` has passed, runs the batch on a blocking thread (the [`Embedder`] sorts it by
//! token length and pads each sub-batch only to its own longest text) and answers every job.
//! On the request path [`EmbedderHandle::try_embed`] never waits: a full queue sheds the text
//! and counts it. The worker exits when every handle is dropped and the queue is empty.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Embedder, EmbedderConfig, Embedding, InferError};
use crate::runtime::Tasks;
use crate::telemetry::Metrics;

/// What a job's oneshot receives.
pub type EmbedResult = Result<Embedding, InferError>;

/// Why [`EmbedderHandle::try_embed`] did not take a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    /// The queue is full (counted in [`EmbedderHandle::shed_total`]).
    #[error("the embedding queue is full; raise `inference.queue_capacity` or sample fewer texts")]
    QueueFull,
    /// The worker has stopped.
    #[error("the embedding worker has stopped")]
    Stopped,
}

/// One text waiting for its embedding.
#[derive(Debug)]
struct Job {
    text: String,
    reply: oneshot::Sender<EmbedResult>,
    queued: Instant,
}

/// A cloneable way to send texts to the embedding worker.
#[derive(Debug, Clone)]
pub struct EmbedderHandle {
    jobs: mpsc::Sender<Job>,
    shed: Arc<AtomicU64>,
    metrics: Metrics,
}

impl EmbedderHandle {
    /// Queues `text` without waiting. The receiver gets the embedding, or the error that
    /// failed its batch.
    pub fn try_embed(&self, text: String) -> Result<oneshot::Receiver<EmbedResult>, Shed> {
        let (reply, receiver) = oneshot::channel();
        match self.jobs.try_send(Job {
            text,
            reply,
            queued: Instant::now(),
        }) {
            Ok(()) => Ok(receiver),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let shed = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
                self.metrics.embed_shed.inc();
                if shed == 1 || shed.is_multiple_of(1000) {
                    tracing::warn!(
                        shed_total = shed,
                        "embedding queue full, text shed; raise `inference.queue_capacity`"
                    );
                }
                Err(Shed::QueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Shed::Stopped),
        }
    }

    /// Queues `text`, waiting for room, and returns the receiver for its embedding (offline
    /// use: `tripwire embed`, evaluation).
    pub async fn submit(&self, text: String) -> Result<oneshot::Receiver<EmbedResult>, InferError> {
        let (reply, receiver) = oneshot::channel();
        self.jobs
            .send(Job {
                text,
                reply,
                queued: Instant::now(),
            })
            .await
            .map_err(|_| InferError::WorkerStopped)?;
        Ok(receiver)
    }

    /// Embeds `text`, waiting for room in the queue and for the answer.
    pub async fn embed(&self, text: String) -> EmbedResult {
        self.submit(text)
            .await?
            .await
            .map_err(|_| InferError::WorkerStopped)?
    }

    /// Texts shed because the queue was full, since start.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}

/// A handle and the queue's receiving end, with no worker yet.
fn channel(capacity: usize, metrics: Metrics) -> (EmbedderHandle, mpsc::Receiver<Job>) {
    let (jobs, receiver) = mpsc::channel(capacity.max(1));
    let handle = EmbedderHandle {
        jobs,
        shed: Arc::new(AtomicU64::new(0)),
        metrics,
    };
    (handle, receiver)
}

/// Called after each batch with its number of texts and the time it took to tokenise, run
/// and pool (exact per-batch figures, where the metrics only have histogram buckets).
pub type BatchObserver = Arc<dyn Fn(usize, Duration) + Send + Sync>;

/// Starts the `embed-batcher` worker on `tasks` with the batching knobs of `config`; batch
/// sizes, queue waits, inference times and shed texts go to `metrics`.
pub fn start(
    embedder: Embedder,
    config: &EmbedderConfig,
    tasks: &Tasks,
    metrics: Metrics,
) -> EmbedderHandle {
    start_observed(embedder, config, tasks, metrics, None)
}

/// [`start`], also telling `observer` about every batch (`tripwire embed` reports batch
/// latency from it).
pub fn start_observed(
    embedder: Embedder,
    config: &EmbedderConfig,
    tasks: &Tasks,
    metrics: Metrics,
    observer: Option<BatchObserver>,
) -> EmbedderHandle {
    let (handle, receiver) = channel(config.queue_capacity, metrics.clone());
    let worker = Worker {
        embedder,
        receiver,
        max_batch: config.max_batch.max(1),
        max_wait: config.max_wait,
        tasks: tasks.clone(),
        metrics,
        observer,
    };
    tasks.spawn("embed-batcher", worker.run());
    handle
}

struct Worker {
    embedder: Embedder,
    receiver: mpsc::Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    tasks: Tasks,
    metrics: Metrics,
    observer: Option<BatchObserver>,
}

impl Worker {
    async fn run(self) {
        let Worker {
            mut embedder,
            mut receiver,
            max_batch,
            max_wait,
            tasks,
            metrics,
            observer,
        } = self;
        let mut jobs: Vec<Job> = Vec::with_capacity(max_batch);
        while let Some(first) = receiver.recv().await {
            jobs.push(first);
            let deadline = Instant::now() + max_wait;
            while jobs.len() < max_batch {
                let room = max_batch - jobs.len();
                match tokio::time::timeout_at(deadline, receiver.recv_many(&mut jobs, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // Callers that gave up need no answer.
            jobs.retain(|job| !job.reply.is_closed());
            if jobs.is_empty() {
                continue;
            }
            let started = Instant::now();
            for job in &jobs {
                metrics
                    .embed_queue_wait
                    .observe(started.saturating_duration_since(job.queued).as_secs_f64());
            }
            metrics.observe_embed_batch(jobs.len());
            let texts_in_batch = jobs.len();
            let texts: Vec<String> = jobs
                .iter_mut()
                .map(|j| std::mem::take(&mut j.text))
                .collect();
            let ran = tasks
                .spawn_blocking("embed-batch", move || {
                    let result = embedder.embed_batch(&texts);
                    (embedder, result)
                })
                .await;
            match ran {
                Ok((back, result)) => {
                    let elapsed = started.elapsed();
                    metrics.embed_inference.observe(elapsed.as_secs_f64());
                    if let Some(observer) = &observer {
                        observer(texts_in_batch, elapsed);
                    }
                    embedder = back;
                    answer(&mut jobs, result);
                }
                Err(err) => {
                    tracing::error!(error = %err, "the embedding model panicked; the embedder stops");
                    answer(
                        &mut jobs,
                        Err(InferError::Run(format!(
                            "the embedding batch panicked: {err}"
                        ))),
                    );
                    return;
                }
            }
        }
        tracing::debug!("embedding queue closed; embed-batcher done");
    }
}

/// Sends each job its embedding, or the batch's error to all.
fn answer(jobs: &mut Vec<Job>, result: Result<Vec<Embedding>, InferError>) {
    match result {
        Ok(embeddings) if embeddings.len() == jobs.len() => {
            for (job, embedding) in jobs.drain(..).zip(embeddings) {
                // A caller that stopped waiting is not an error.
                let _unwanted = job.reply.send(Ok(embedding));
            }
        }
        Ok(embeddings) => {
            let err = InferError::Run(format!(
                "{} embeddings for {} texts",
                embeddings.len(),
                jobs.len()
            ));
            answer(jobs, Err(err));
        }
        Err(err) => {
            tracing::warn!(error = %err, kind = err.kind(), texts = jobs.len(), "embedding batch failed");
            for job in jobs.drain(..) {
                let _unwanted = job.reply.send(Err(err.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_sheds_instead_of_waiting() {
        let (handle, _receiver) = channel(2, Metrics::default());
        assert!(handle.try_embed("a".to_owned()).is_ok());
        assert!(handle.try_embed("b".to_owned()).is_ok());
        assert_eq!(
            handle.try_embed("c".to_owned()).err(),
            Some(Shed::QueueFull)
        );
        assert_eq!(
            handle.try_embed("d".to_owned()).err(),
            Some(Shed::QueueFull)
        );
        assert_eq!(handle.shed_total(), 2);
        assert_eq!(handle.metrics.embed_shed.get(), 2);
    }

    #[tokio::test]
    async fn a_stopped_worker_is_not_counted_as_shed() {
        let (handle, receiver) = channel(2, Metrics::default());
        drop(receiver);
        assert_eq!(handle.try_embed("a".to_owned()).err(), Some(Shed::Stopped));
        assert_eq!(handle.shed_total(), 0);
        assert!(matches!(
            handle.embed("a".to_owned()).await,
            Err(InferError::WorkerStopped)
        ));
    }
}
