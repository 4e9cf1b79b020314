//! Process metrics under the names Prometheus' own process collector uses (resident memory,
//! open file descriptors, threads), plus the tokio runtime's live tasks: what a soak test and
//! an operator watch for leaks. Read from `/proc/self` when `/metrics` is scraped; elsewhere
//! than Linux only the task count is reported.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Gauges refreshed on every scrape.
#[derive(Debug, Clone, Default)]
pub struct ProcessMetrics {
    resident_memory_bytes: Gauge,
    open_fds: Gauge,
    threads: Gauge,
    alive_tasks: Gauge,
}

impl ProcessMetrics {
    /// New gauges, registered in `registry`.
    pub fn registered(registry: &mut Registry) -> ProcessMetrics {
        let metrics = ProcessMetrics::default();
        let process = registry.sub_registry_with_prefix("process");
        process.register(
            "resident_memory_bytes",
            "Resident memory of the gateway process, bytes",
            metrics.resident_memory_bytes.clone(),
        );
        process.register(
            "open_fds",
            "Open file descriptors (sockets included)",
            metrics.open_fds.clone(),
        );
        process.register(
            "threads",
            "Operating-system threads",
            metrics.threads.clone(),
        );
        registry.sub_registry_with_prefix("tripwire").register(
            "runtime_alive_tasks",
            "Tasks alive on the async runtime (connections, captures, workers)",
            metrics.alive_tasks.clone(),
        );
        metrics
    }

    /// Reads the current values.
    pub fn refresh(&self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.alive_tasks
                .set(i64::try_from(handle.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(kb) = status_field(&status, "VmRSS:") {
                self.resident_memory_bytes.set(kb.saturating_mul(1024));
            }
            if let Some(threads) = status_field(&status, "Threads:") {
                self.threads.set(threads);
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(entries.count()).unwrap_or(i64::MAX));
        }
    }
}

/// The number after `name` on its line of `/proc/self/status` (`VmRSS:   1234 kB`).
fn status_field(status: &str, name: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let status = "Name:\ttripwire\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(20480));
        assert_eq!(status_field(status, "Threads:"), Some(9));
        assert_eq!(status_field(status, "VmSwap:"), None);
    }

    #[tokio::test]
    async fn a_refresh_reads_this_process() {
        let mut registry = Registry::default();
        let metrics = ProcessMetrics::registered(&mut registry);
        metrics.refresh();
        assert!(metrics.resident_memory_bytes.get() > 1024 * 1024);
        assert!(metrics.open_fds.get() >= 3);
        assert!(metrics.threads.get() >= 1);
        assert!(metrics.alive_tasks.get() >= 0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("tripwire_runtime_alive_tasks "), "{text}");
    }
}
