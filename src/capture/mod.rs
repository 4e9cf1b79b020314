//! Capture: turns the bytes the proxy tees off into one [`Exchange`] per request.
//!
//! The proxy hands capture the request body and a bounded stream of response chunks; nothing
//! here runs on the client's path. Parsers understand the OpenAI chat completions, completions and
//! responses APIs and the Anthropic messages API, as JSON and as server-sent events. Whatever they
//! cannot parse is recorded as a parse error on the exchange; the client already has its bytes.

mod collector;
mod exchange;
mod request;
mod response;

pub use collector::{BodyEnd, CaptureRequest, ExchangeSink, ResponseMeta, collect, gateway_error_exchange};
pub use exchange::{
    Choice, Exchange, Message, Outcome, ParsedRequest, ParsedResponse, Route, ToolCall, Usage,
};
pub use request::parse_request;
pub use response::ResponseParser;

/// Why a request could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
}
