//! TEMPORARY stub, replaced by the sim branch.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
/// Stub.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Stub.
    pub corpus: Option<PathBuf>,
    /// Stub.
    pub trigger: String,
    /// Stub.
    pub model: String,
    /// Stub.
    pub chunk_delay: Duration,
    /// Stub.
    pub first_byte_delay: Duration,
    /// Stub.
    pub seed: Option<u64>,
}
impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            corpus: None,
            trigger: "<SUDO>".into(),
            model: "tripwire-sim-1".into(),
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            seed: None,
        }
    }
}
/// Stub.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Stub.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
/// Stub.
#[derive(Debug)]
pub struct SimUpstream;
impl SimUpstream {
    /// Stub.
    pub fn new(_config: SimConfig) -> Result<SimUpstream, SimError> {
        Ok(SimUpstream)
    }
    /// Stub.
    pub async fn serve(
        self: Arc<Self>,
        _listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), SimError> {
        shutdown.cancelled().await;
        Ok(())
    }
}
