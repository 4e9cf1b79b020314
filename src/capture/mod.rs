//! Capture: turns the bytes the proxy tees off into one [`Exchange`] per request.
//!
//! The proxy hands capture the request body and a bounded stream of response chunks; nothing
//! here runs on the client's path. Parsers understand the OpenAI chat completions, completions and
//! responses APIs and the Anthropic messages API, as JSON and as server-sent events. Whatever they
//! cannot parse is recorded as a parse error on the exchange; the client already has its bytes.
//!
//! * [`parse_request`] reads a request body into a [`ParsedRequest`].
//! * [`ResponseParser`] reads a response body, chunk by chunk, into a [`ParsedResponse`].
//! * [`SseFramer`] is the one framer of server-sent events: [`SseDecoder`], the incremental
//!   decoder the parser uses, and [`SseSplitter`], which keeps whole raw events for enforce
//!   mode, both cut the stream with it.
//! * [`collect`] is the capture task of one exchange, fed by the proxy's tee.

mod collector;
mod error;
mod exchange;
mod json;
mod providers;
mod request;
mod response;
mod sse;

pub use collector::{BodyEnd, CaptureRequest, ResponseMeta, collect, gateway_error_exchange};
pub use error::CaptureError;
pub use exchange::{
    Choice, Exchange, Message, Outcome, ParsedRequest, ParsedResponse, Route, ToolCall, Usage,
};
pub use request::parse_request;
pub use response::{DEFAULT_CAPTURE_LIMIT, ResponseParser};
pub use sse::{DEFAULT_MAX_LINE, SseDecoder, SseError, SseEvent, SseFramer, SsePiece, SseSplitter};
