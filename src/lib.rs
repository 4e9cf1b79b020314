//! tripwire: an inference-time output monitoring gateway that catches a poisoned LLM by what it says.
//!
//! The pipeline, in the order a response travels through it:
//!
//! ```text
//! client ─▶ proxy ──forward, untouched──▶ upstream LLM
//!             │ tee (bounded, lossy, counted; enforce mode may hold the answer for a decision)
//!             ▼
//!           capture ── SSE / JSON parsed into one Exchange per request
//!             ▼
//!           inspect ── bounded queue to the detection workers (sheds, never waits)
//!             │   detect (→ infer)      per-exchange detectors; drift tests per scope
//!             │   policy                the one judge: CEL rules over the detectors' fields
//!             ▼
//!           store (flag log: SQLite or PostgreSQL) · alert (webhook, log) · telemetry (OTLP)
//! ```
//!
//! * [`proxy`] forwards every request untouched and tees each response body to the side.
//! * [`capture`] turns the teed bytes into one [`capture::Exchange`] per request.
//! * [`inspect`] queues exchanges for detection and records what the rules conclude.
//! * [`detect`] holds the detectors, drift included; [`infer`] runs the embedding model.
//! * [`policy`] compiles policy files and judges an exchange's findings with their rules.
//! * [`store`] records exchanges and flags; [`alert`] sends alerts; [`telemetry`] holds every
//!   metric family, logging and OpenTelemetry export.
//! * [`admin`] serves health, metrics, the flag API and the console.
//! * [`app`] is the composition root: it builds all of the above, reloads it, and stops it in
//!   written phases. [`config`] is what it is built from; [`runtime`] tracks every task;
//!   [`secret`] keeps credentials out of logs.
//! * [`lab`] measures the gateway (development set, offline evaluation, LM training, the
//!   simulated backdoored model); [`cli`] is the command line.
//!
//! No two of these modules import each other (`tests/layout.rs`).

pub mod admin;
pub mod alert;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod detect;
pub mod infer;
pub mod inspect;
pub mod lab;
pub mod policy;
pub mod proxy;
pub mod runtime;
pub mod secret;
pub mod store;
pub mod telemetry;
