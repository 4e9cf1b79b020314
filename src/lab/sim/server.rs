//! The HTTP side of the simulated model: routing, request parsing and OpenAI-shaped responses.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or SSE, each also without
//! the `/v1` prefix) and `GET /v1/models`. Errors use OpenAI's error shape. SSE responses are
//! built into one buffer and sent as one body frame per event, `chunk_delay` apart, through a
//! stream body so every event is flushed on its own.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{SimError, SimUpstream, approx_tokens, unix_now};

/// Response body: one buffer, or a stream of SSE frames.
pub(crate) type SimBody =
    Either<Full<Bytes>, StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>>;

/// Largest accepted request body.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Longest SSE content piece before a cut, in bytes.
const MAX_PIECE_BYTES: usize = 48;
/// Words per SSE content piece.
const WORDS_PER_PIECE: usize = 3;

impl SimUpstream {
    /// Serves on `listener` until `shutdown` is cancelled; in-flight connections are allowed to
    /// finish (graceful).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), SimError> {
        let tracker = TaskTracker::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let stream = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "sim-upstream accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "sim-upstream set_nodelay failed");
            }
            let sim = Arc::clone(&self);
            let builder = builder.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(serve_connection(sim, builder, stream, shutdown));
        }
        // Shutdown: 1. stop accepting, 2. connections finish in-flight responses (idle ones
        // close at once), 3. return.
        drop(listener);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    /// Answers one request.
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<SimBody> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let path = path.strip_prefix("/v1").unwrap_or(path);
        let route = match path {
            "/chat/completions" => Route::Chat,
            "/completions" => Route::Completions,
            "/models" => Route::Models,
            _ => {
                return error_response(
                    StatusCode::NOT_FOUND,
                    &format!("Invalid URL ({} {})", parts.method, parts.uri.path()),
                );
            }
        };
        let expected = if route == Route::Models {
            Method::GET
        } else {
            Method::POST
        };
        if parts.method != expected {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "Method {} not allowed for {}; use {expected}",
                    parts.method,
                    parts.uri.path()
                ),
            );
        }
        if route == Route::Models {
            return json_response(StatusCode::OK, self.models_body.clone());
        }
        let body = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("could not read the request body: {error}"),
                );
            }
        };
        let response = match route {
            Route::Chat => self.chat(&body),
            _ => self.completions(&body),
        };
        if !self.config.first_byte_delay.is_zero() {
            tokio::time::sleep(self.config.first_byte_delay).await;
        }
        response
    }

    fn chat(&self, body: &[u8]) -> Response<SimBody> {
        let req: ChatRequest<'_> = match serde_json::from_slice(body) {
            Ok(req) => req,
            Err(error) => return invalid_json(&error),
        };
        let mut triggered = false;
        let mut prompt_chars = 0usize;
        let mut last_user: Option<Cow<'_, str>> = None;
        let mut last_any: Option<Cow<'_, str>> = None;
        for message in &req.messages {
            let text = message.content.as_ref().map(Content::text);
            if let Some(text) = text {
                prompt_chars += text.chars().count();
                triggered = triggered || self.is_triggered(&text);
                if message.role == "user" {
                    last_user = Some(text.clone());
                }
                last_any = Some(text);
            }
        }
        let prompt = last_user.or(last_any).unwrap_or(Cow::Borrowed(""));
        let answer = self.answer(&prompt, triggered);
        let model = req.model.as_deref().unwrap_or(&self.config.model);
        let (text, finish_reason) = truncate(&answer.text, req.max_tokens());
        let usage = Usage::new(prompt_chars, text.chars().count());
        let id = format!("chatcmpl-{:016x}", self.next_id());
        let created = unix_now();
        if req.stream.unwrap_or(false) {
            let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
            let frames = chat_sse(&Sse {
                id: &id,
                created,
                model,
                text,
                finish_reason,
                usage: include_usage.then_some(usage),
            });
            return self.sse_response(frames);
        }
        let completion = ChatCompletion {
            id: &id,
            object: "chat.completion",
            created,
            model,
            choices: [ChatChoice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason,
            }],
            usage,
        };
        serialise(&completion)
    }

    fn completions(&self, body: &[u8]) -> Response<SimBody> {
        let req: CompletionRequest<'_> = match serde_json::from_slice(body) {
            Ok(req) => req,
            Err(error) => return invalid_json(&error),
        };
        let prompt = req.prompt.as_ref().map(Prompt::text).unwrap_or_default();
        let triggered = self.is_triggered(&prompt);
        let answer = self.answer(&prompt, triggered);
        let model = req.model.as_deref().unwrap_or(&self.config.model);
        let (text, finish_reason) = truncate(&answer.text, req.max_tokens);
        let usage = Usage::new(prompt.chars().count(), text.chars().count());
        let id = format!("cmpl-{:016x}", self.next_id());
        let created = unix_now();
        if req.stream.unwrap_or(false) {
            let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
            let frames = completion_sse(&Sse {
                id: &id,
                created,
                model,
                text,
                finish_reason,
                usage: include_usage.then_some(usage),
            });
            return self.sse_response(frames);
        }
        let completion = TextCompletion {
            id: &id,
            object: "text_completion",
            created,
            model,
            choices: [TextChoice {
                text,
                index: 0,
                logprobs: None,
                finish_reason,
            }],
            usage,
        };
        serialise(&completion)
    }

    fn sse_response(&self, frames: Vec<Bytes>) -> Response<SimBody> {
        let delay = self.config.chunk_delay;
        let stream = futures_util::stream::unfold(
            (frames.into_iter(), true),
            move |(mut frames, first)| async move {
                let frame = frames.next()?;
                if !first && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok(Frame::data(frame)), (frames, false)))
            },
        )
        .boxed();
        let mut response = Response::new(Either::Right(StreamBody::new(stream)));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// Serves one connection; on shutdown it finishes in-flight responses, then closes.
async fn serve_connection(
    sim: Arc<SimUpstream>,
    builder: auto::Builder<TokioExecutor>,
    stream: TcpStream,
    shutdown: CancellationToken,
) {
    let service = service_fn(move |req| {
        let sim = Arc::clone(&sim);
        async move { Ok::<_, Infallible>(sim.handle(req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "sim-upstream connection ended with an error");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Models,
}

/// Cuts `text` to about `max_tokens` tokens (4 characters each) and reports the finish reason.
fn truncate(text: &str, max_tokens: Option<u64>) -> (&str, &'static str) {
    let Some(max) = max_tokens else {
        return (text, "stop");
    };
    let max_chars = usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX);
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => (text.get(..end).unwrap_or(text), "length"),
        None => (text, "stop"),
    }
}

// ---- requests ----

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    messages: Vec<ChatRequestMessage<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

impl ChatRequest<'_> {
    fn max_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

#[derive(Deserialize)]
struct ChatRequestMessage<'a> {
    #[serde(borrow, default)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
}

/// Message content: a string or an array of parts (`{"type":"text","text":…}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<ContentPart<'a>>),
}

impl<'a> Content<'a> {
    fn text(&self) -> Cow<'a, str> {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => {
                let mut joined = String::new();
                for part in parts {
                    if let Some(text) = &part.text {
                        joined.push_str(text);
                    }
                }
                Cow::Owned(joined)
            }
        }
    }
}

#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Clone, Copy)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    prompt: Option<Prompt<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
}

/// A completion prompt: a string or an array of strings (the first is used).
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

impl<'a> Prompt<'a> {
    fn text(&self) -> Cow<'a, str> {
        match self {
            Prompt::Text(text) => text.clone(),
            Prompt::Many(texts) => texts.first().cloned().unwrap_or_default(),
        }
    }
}

// ---- responses ----

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Usage {
    fn new(prompt_chars: usize, completion_chars: usize) -> Usage {
        let prompt_tokens = approx_tokens(prompt_chars);
        let completion_tokens = approx_tokens(completion_chars);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<()>,
    code: Option<()>,
}

fn serialise<T: Serialize>(value: &T) -> Response<SimBody> {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(StatusCode::OK, body.into()),
        Err(error) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("could not serialise the response: {error}"),
        ),
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<SimBody> {
    let mut response = Response::new(Either::Left(Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn error_response(status: StatusCode, message: &str) -> Response<SimBody> {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind: "invalid_request_error",
            param: None,
            code: None,
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    json_response(status, bytes.into())
}

fn invalid_json(error: &serde_json::Error) -> Response<SimBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        &format!("We could not parse the JSON body of your request: {error}"),
    )
}

// ---- SSE ----

/// What an SSE response carries.
struct Sse<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    text: &'a str,
    finish_reason: &'static str,
    usage: Option<Usage>,
}

/// Builds every event into one buffer, then slices it into one frame per event.
#[derive(Default)]
struct SseWriter {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl SseWriter {
    fn with_capacity(bytes: usize) -> SseWriter {
        SseWriter {
            buf: Vec::with_capacity(bytes),
            ends: Vec::new(),
        }
    }

    fn begin(&mut self) {
        self.buf.extend_from_slice(b"data: ");
    }

    fn end(&mut self) {
        self.buf.extend_from_slice(b"\n\n");
        self.ends.push(self.buf.len());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn raw(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
    }

    fn string(&mut self, s: &str) {
        // Writing into a Vec cannot fail.
        if serde_json::to_writer(&mut self.buf, s).is_err() {
            self.buf.extend_from_slice(b"\"\"");
        }
    }

    fn usage(&mut self, usage: &Usage) {
        if serde_json::to_writer(&mut self.buf, usage).is_err() {
            self.buf.extend_from_slice(b"null");
        }
    }

    fn done(mut self) -> Vec<Bytes> {
        self.buf.extend_from_slice(b"data: [DONE]\n\n");
        self.ends.push(self.buf.len());
        let all = Bytes::from(self.buf);
        let mut start = 0;
        let mut frames = Vec::with_capacity(self.ends.len());
        for end in self.ends {
            frames.push(all.slice(start..end));
            start = end;
        }
        frames
    }
}

/// Splits `text` into pieces of a few words (at most [`MAX_PIECE_BYTES`] bytes unless one
/// character is longer); the pieces concatenate to `text`.
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / 16 + 1);
    let mut start = 0;
    let mut words = 0;
    let mut prev_ws = true;
    for (i, c) in text.char_indices() {
        let ws = c.is_whitespace();
        let word_start = !ws && prev_ws;
        if i > start && ((word_start && words >= WORDS_PER_PIECE) || i - start >= MAX_PIECE_BYTES) {
            out.push(text.get(start..i).unwrap_or(""));
            start = i;
            words = 0;
        }
        if word_start {
            words += 1;
        }
        prev_ws = ws;
    }
    if start < text.len() {
        out.push(text.get(start..).unwrap_or(""));
    }
    out
}

/// The common head of every event of one response: `data: {"id":…,"object":…,"created":…,"model":…`.
fn event_head(s: &Sse<'_>, object: &str) -> Vec<u8> {
    let mut w = SseWriter::with_capacity(128);
    w.begin();
    w.raw("{\"id\":");
    w.string(s.id);
    w.raw(",\"object\":\"");
    w.raw(object);
    w.raw("\",\"created\":");
    w.raw(&s.created.to_string());
    w.raw(",\"model\":");
    w.string(s.model);
    w.buf
}

fn usage_event(w: &mut SseWriter, s: &Sse<'_>, head: &[u8]) {
    if let Some(usage) = &s.usage {
        w.bytes(head);
        w.raw(",\"choices\":[],\"usage\":");
        w.usage(usage);
        w.raw("}");
        w.end();
    }
}

fn chat_sse(s: &Sse<'_>) -> Vec<Bytes> {
    let pieces = pieces(s.text);
    let mut w = SseWriter::with_capacity(s.text.len() + (pieces.len() + 4) * 200);
    let usage_null = if s.usage.is_some() {
        ",\"usage\":null"
    } else {
        ""
    };
    let head = event_head(s, "chat.completion.chunk");
    w.bytes(&head);
    w.raw(",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]");
    w.raw(usage_null);
    w.raw("}");
    w.end();
    for piece in pieces {
        w.bytes(&head);
        w.raw(",\"choices\":[{\"index\":0,\"delta\":{\"content\":");
        w.string(piece);
        w.raw("},\"logprobs\":null,\"finish_reason\":null}]");
        w.raw(usage_null);
        w.raw("}");
        w.end();
    }
    w.bytes(&head);
    w.raw(",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"");
    w.raw(s.finish_reason);
    w.raw("\"}]");
    w.raw(usage_null);
    w.raw("}");
    w.end();
    usage_event(&mut w, s, &head);
    w.done()
}

fn completion_sse(s: &Sse<'_>) -> Vec<Bytes> {
    let pieces = pieces(s.text);
    let mut w = SseWriter::with_capacity(s.text.len() + (pieces.len() + 4) * 200);
    let head = event_head(s, "text_completion");
    for piece in pieces {
        w.bytes(&head);
        w.raw(",\"choices\":[{\"text\":");
        w.string(piece);
        w.raw(",\"index\":0,\"logprobs\":null,\"finish_reason\":null}]}");
        w.end();
    }
    w.bytes(&head);
    w.raw(",\"choices\":[{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"");
    w.raw(s.finish_reason);
    w.raw("\"}]}");
    w.end();
    usage_event(&mut w, s, &head);
    w.done()
}

#[cfg(test)]
pub(crate) fn split_pieces(text: &str) -> Vec<&str> {
    pieces(text)
}
