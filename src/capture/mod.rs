//! Capture: turns the bytes the proxy tees off into one [`Exchange`] per request.
//!
//! The proxy hands capture the request body and a bounded stream of response chunks; nothing
//! here runs on the client's path. Parsers understand the OpenAI chat completions, completions and
//! responses APIs and the Anthropic messages API, as JSON and as server-sent events. Whatever they
//! cannot parse is recorded as a parse error on the exchange; the client already has its bytes.

mod exchange;

pub use exchange::{
    Choice, Exchange, Message, Outcome, ParsedRequest, ParsedResponse, Route, ToolCall, Usage,
};
