//! Background tasks: every task the gateway starts goes through [`Tasks`], so shutdown can
//! cancel them in order and wait until each has drained.
//!
//! A bare `tokio::spawn` is refused by clippy (see `clippy.toml`): a task nobody tracks is a
//! task whose work can be lost at shutdown.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// A task tracker plus the cancellation token its tasks watch.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    /// A new, empty set of tasks.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// A child set: cancelled when this one is, cancellable on its own, tracked separately so a
    /// shutdown phase can wait for just these tasks.
    pub fn child(&self) -> Tasks {
        Tasks {
            tracker: TaskTracker::new(),
            token: self.token.child_token(),
        }
    }

    /// Spawns a tracked task inside a span named after it (`name` is kebab-case, e.g.
    /// `store-writer`).
    pub fn spawn<F>(&self, name: &'static str, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker
            .spawn(future.instrument(tracing::debug_span!("task", name)))
    }

    /// Runs a blocking function on the blocking thread pool, tracked like a task (workers that
    /// run detectors or SQLite).
    pub fn spawn_blocking<F, T>(&self, name: &'static str, f: F) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let span = tracing::debug_span!("task", name);
        self.tracker.spawn_blocking(move || span.in_scope(f))
    }

    /// The token this set's tasks watch for cancellation.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Asks every task in this set to stop.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Closes the set to new tasks and waits for every tracked task to finish.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Number of tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}
