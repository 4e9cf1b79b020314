//! The composition root: builds the whole gateway from its configuration (store and writer,
//! detection, drift, alerts, the proxy and admin listeners), reloads what may change while it
//! runs, and stops it in written phases under one grace timeout.

mod build;
pub mod listener;
pub mod reload;
mod shutdown;

pub(crate) use build::admin_token;
pub use build::{Server, ServerError};
use build::{load_policies, rules_alert, start_alerts};
