//! The captured request/response pair and its parts.

use serde::{Deserialize, Serialize};

/// Which API an exchange belongs to, decided from the request path.
///
/// Matching is on the path's ending so that prefixes (`/openai/deployments/x/chat/completions`,
/// `/proxy/v1/messages`) are recognised too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `/v1/completions`.
    Completions,
    /// OpenAI `/v1/responses`.
    Responses,
    /// Anthropic `/v1/messages`.
    AnthropicMessages,
    /// Anything else: forwarded, not captured.
    Other,
}

impl Route {
    /// Classifies a request path (without query string).
    pub fn from_path(path: &str) -> Route {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Route::ChatCompletions
        } else if path.ends_with("/completions") {
            Route::Completions
        } else if path.ends_with("/responses") {
            Route::Responses
        } else if path.ends_with("/messages") && !path.ends_with("/threads/messages") {
            Route::AnthropicMessages
        } else {
            Route::Other
        }
    }

    /// A short, low-cardinality label for metrics and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::Responses => "responses",
            Route::AnthropicMessages => "anthropic_messages",
            Route::Other => "other",
        }
    }

    /// Whether exchanges on this route are parsed and recorded.
    pub fn is_captured(self) -> bool {
        self != Route::Other
    }
}

/// One message of the prompt, flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, `developer`, … as the caller sent it.
    pub role: String,
    /// The text parts of the message joined with newlines; non-text parts are left out.
    pub content: String,
}

/// A tool (function) call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ToolCall {
    /// The call's id as the upstream gave it.
    pub id: Option<String>,
    /// The function name.
    pub name: String,
    /// The arguments, as the JSON text the model produced (possibly invalid JSON).
    pub arguments: String,
}

/// One generated alternative (OpenAI `n > 1` gives several).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Choice {
    /// The choice index.
    pub index: u32,
    /// The generated text.
    pub text: String,
    /// Why generation stopped (`stop`, `length`, `tool_calls`, `end_turn`, …).
    pub finish_reason: Option<String>,
    /// Tool calls made in this choice.
    pub tool_calls: Vec<ToolCall>,
}

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Usage {
    /// Prompt / input tokens.
    pub input_tokens: Option<u64>,
    /// Completion / output tokens.
    pub output_tokens: Option<u64>,
    /// Total tokens, when reported.
    pub total_tokens: Option<u64>,
}

/// What capture understood of a request body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedRequest {
    /// The `model` field.
    pub model: Option<String>,
    /// Whether the caller asked for a streamed answer.
    pub stream: bool,
    /// The prompt: messages with roles (a bare prompt string becomes one `user` message).
    pub prompt: Vec<Message>,
}

/// What capture understood of a response body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedResponse {
    /// The model the upstream says answered.
    pub model: Option<String>,
    /// The generated alternatives, ordered by index.
    pub choices: Vec<Choice>,
    /// Token usage, when reported.
    pub usage: Option<Usage>,
    /// Whether the stream reached its proper end (`[DONE]`, `message_stop`, `response.completed`).
    /// Always true for a complete JSON body.
    pub complete: bool,
    /// Why parsing failed, if it did. What was parsed before the failure is kept.
    pub error: Option<String>,
}

/// How the exchange ended, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The whole response reached the client.
    Complete,
    /// The client went away before the response ended.
    ClientAborted,
    /// The upstream failed mid-response (reset, malformed framing).
    UpstreamError,
    /// A timeout (first byte, idle gap or total) cut the response.
    Timeout,
    /// The gateway answered itself (413, 502, 504) without an upstream response.
    GatewayError,
    /// Enforce mode stopped the answer: the client got the block response, or a stream ended
    /// with an error event.
    Blocked,
}

impl Outcome {
    /// A short label for storage and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
            Outcome::GatewayError => "gateway_error",
            Outcome::Blocked => "blocked",
        }
    }
}

/// One captured request/response pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    /// Internal id, UUID v7 so rows sort by time.
    pub id: uuid::Uuid,
    /// The `x-request-id` echoed to the client (the caller's, or `id` when it sent none).
    pub request_id: String,
    /// When the gateway received the request, in microseconds since the Unix epoch.
    pub started_at_us: i64,
    /// HTTP method.
    pub method: String,
    /// Request path (no query string).
    pub path: String,
    /// The API the path belongs to.
    pub route: Route,
    /// SHA-256 (hex, first 16 bytes) of the caller's API key; the key itself is never kept.
    pub api_key_hash: Option<String>,
    /// The `model` the caller asked for.
    pub model: Option<String>,
    /// The model the upstream says answered.
    pub response_model: Option<String>,
    /// Whether the caller asked for a stream.
    pub stream: bool,
    /// The prompt messages.
    pub prompt: Vec<Message>,
    /// The generated alternatives.
    pub choices: Vec<Choice>,
    /// Token usage.
    pub usage: Option<Usage>,
    /// Upstream HTTP status, when one came.
    pub status: Option<u16>,
    /// Time from receiving the request to the upstream's response headers, microseconds.
    pub ttfb_us: Option<u64>,
    /// Time from receiving the request to the last byte handed to the client, microseconds.
    pub latency_us: u64,
    /// How the exchange ended.
    pub outcome: Outcome,
    /// True when the response did not reach its proper end (client abort, upstream cut,
    /// timeout, or a stream that ended without its terminator).
    pub truncated: bool,
    /// True when capture missed bytes (the side channel was full, or the body exceeded the
    /// capture limit). The client got everything regardless.
    pub capture_incomplete: bool,
    /// Why the request or response could not be parsed, if so.
    pub parse_error: Option<String>,
}

impl Exchange {
    /// A completed chat exchange of one user prompt and one answer, as offline evaluation,
    /// policy checks, benchmarks and tests build them: `model` is its scope.
    pub fn from_texts(model: &str, prompt: &str, output: &str) -> Exchange {
        Exchange {
            id: uuid::Uuid::now_v7(),
            request_id: String::new(),
            started_at_us: 0,
            method: "POST".to_owned(),
            path: "/v1/chat/completions".to_owned(),
            route: Route::ChatCompletions,
            api_key_hash: None,
            model: Some(model.to_owned()),
            response_model: None,
            stream: false,
            prompt: vec![Message {
                role: "user".to_owned(),
                content: prompt.to_owned(),
            }],
            choices: vec![Choice {
                index: 0,
                text: output.to_owned(),
                finish_reason: Some("stop".to_owned()),
                tool_calls: Vec::new(),
            }],
            usage: None,
            status: Some(200),
            ttfb_us: None,
            latency_us: 0,
            outcome: Outcome::Complete,
            truncated: false,
            capture_incomplete: false,
            parse_error: None,
        }
    }

    /// The text of the first choice, which detectors read.
    pub fn output(&self) -> &str {
        self.choices.first().map_or("", |c| c.text.as_str())
    }

    /// The finish reason of the first choice.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }
}
