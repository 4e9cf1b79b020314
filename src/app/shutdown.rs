//! Stopping the gateway: the numbered phases, in order, under one grace timeout. Each phase
//! waits for its own child of the root tracker; what is still running when the grace runs out
//! is logged as abandoned, by phase.

use std::time::Duration;

use super::Server;

/// The share of the grace kept for the last phases (store, alerts, telemetry, admin), so a
/// slow drain of traffic still leaves the writer time to commit: a quarter, at most this.
const FINAL_PHASES_MAX: Duration = Duration::from_secs(5);

impl Server {
    /// Stops the gateway. Everything it captured before is in the store when this returns,
    /// unless the grace period ran out first (then what was lost is logged and counted, and
    /// every task still running is logged as abandoned).
    pub async fn shutdown(mut self) {
        let grace = self.reloader.config().await.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        // Phases 1 to 5 drain traffic and detection; 6 to 8 keep a share of the grace.
        let drained_by = deadline - (grace / 4).min(FINAL_PHASES_MAX);
        // 1. Not ready: load balancers stop sending new traffic. No more reloads from files.
        self.admin.set_ready(false);
        self.watch_tasks.cancel();
        let _watch = tokio::time::timeout_at(drained_by, self.watch_tasks.wait()).await;
        // 2. Stop accepting; open connections finish their in-flight responses and close.
        self.proxy_accept.cancel();
        let drained = tokio::time::timeout_at(drained_by, async {
            self.proxy_accept.wait().await;
            self.proxy_connections.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = self.proxy_connections.len(),
                "shutdown grace ran out with connections still open; dropping them"
            );
        }
        // 3. Every response body has ended or been dropped, which closes every tee channel:
        //    capture tasks finish and hand their exchanges to the store queue.
        if tokio::time::timeout_at(drained_by, self.capture_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.capture_tasks.len(),
                "shutdown grace ran out with exchanges still being captured"
            );
        }
        // 4. No more exchanges can come: closing the capture side lets the detection workers
        //    finish what is queued and exit.
        self.reloader.close().await;
        if tokio::time::timeout_at(drained_by, self.detect_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace ran out with exchanges still queued for detection");
        }
        // 5. The detection workers held the drift queue: the drift worker tests what is queued
        //    and exits, and the embedding batcher with it.
        if tokio::time::timeout_at(drained_by, self.drift_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace ran out with exchanges still queued for drift tests");
        }
        self.reloader.release_alerts();
        // 6. The workers held the last store and alert senders: the writer drains its queue,
        //    commits and exits; the alert sender delivers what is queued. A writer still busy
        //    halfway through the last share is asked to write what it holds now.
        let writer_by = drained_by + (deadline - drained_by) / 2;
        if tokio::time::timeout_at(writer_by, self.writer_tasks.wait())
            .await
            .is_err()
        {
            self.writer_tasks.cancel();
            if tokio::time::timeout_at(deadline, self.writer_tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!("shutdown grace ran out before the store writer drained");
            }
        }
        if tokio::time::timeout_at(deadline, self.alert_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace ran out with alerts still undelivered");
        }
        // 7. Every exchange is ended and every flag recorded: export the last spans, metrics and
        //    flag log records to the collector.
        if let Some(otel) = self.otel.take() {
            let flush = self
                .root
                .spawn_blocking("otel-flush", move || otel.shutdown());
            if tokio::time::timeout_at(deadline, flush).await.is_err() {
                tracing::warn!(
                    "OpenTelemetry export did not finish before the shutdown grace ran out"
                );
            }
        }
        // 8. Admin goes last so /readyz and /metrics answer throughout.
        self.admin_tasks.cancel();
        let _admin = tokio::time::timeout_at(deadline, self.admin_tasks.wait()).await;
        // Whatever still runs is abandoned: say what.
        self.root.cancel();
        let phases = [
            ("reload-watch", &self.watch_tasks),
            ("proxy-accept", &self.proxy_accept),
            ("proxy-connections", &self.proxy_connections),
            ("capture", &self.capture_tasks),
            ("detect", &self.detect_tasks),
            ("drift", &self.drift_tasks),
            ("store-writer", &self.writer_tasks),
            ("alerts", &self.alert_tasks),
            ("admin", &self.admin_tasks),
            ("blocking", &self.root),
        ];
        for (phase, tasks) in phases {
            if !tasks.is_empty() {
                tracing::warn!(
                    phase,
                    tasks = tasks.len(),
                    "abandoned at shutdown: still running when the grace ran out"
                );
            }
        }
        tracing::info!("tripwire stopped");
    }
}
