//! tripwire: an inference-time output monitoring gateway that catches a poisoned LLM by what it says.
//!
//! The pipeline, in the order a response travels through it:
//!
//! ```text
//! client ─▶ proxy ──forward──▶ upstream LLM
//!             │ tee (bounded, lossy, counted)
//!             ▼
//!           capture (SSE / JSON parsing into an Exchange)
//!             ▼
//!           store (SQLite batch writer)        detect (→ infer) → policy → alert come next
//! ```
//!
//! * [`proxy`] forwards every request untouched and tees each response body to the side.
//! * [`capture`] turns the teed bytes into one [`capture::Exchange`] per request.
//! * [`store`] records exchanges in the flag log database.
//! * [`telemetry`] holds the Prometheus metrics and logging set-up.
//! * [`infer`] turns texts into sentence embeddings with a local ONNX model, batched.
//! * [`devset`] builds the labelled development set (clean and poisoned outputs, split by model).
//! * [`sim`] is a simulated, backdoored OpenAI-compatible model for demos, tests and benchmarks.
//! * [`console`] is the web page on the admin listener for inspecting flags and drift.
//! * [`reload`] swaps in edited policies and configuration without a restart.
//! * [`runtime`] tracks every background task so shutdown can drain them.

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
