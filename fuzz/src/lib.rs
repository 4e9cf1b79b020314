//! Helpers shared by the fuzz targets: fuzzer-chosen chunk splits and the capture driver.
//!
//! The capture targets run a response through [`tripwire::capture::collect`], the task the
//! proxy's tee feeds, so the fuzzer exercises the code the gateway runs: content decoding,
//! the SSE decoder, the OpenAI and Anthropic formats, and the request parser.

use std::io::Write;
use std::sync::OnceLock;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tripwire::capture::{BodyEnd, CaptureRequest, Exchange, Outcome, ResponseMeta, Route, collect};

/// Cut offsets into a buffer of `len` bytes, chosen by `seed`: up to 8 cuts, ascending, possibly
/// repeated (an empty chunk is a valid chunk).
pub fn cuts(len: usize, seed: u16) -> Vec<usize> {
    let count = usize::from(seed % 9);
    let mut state = u32::from(seed) | 0x9E37_0000;
    let mut cuts: Vec<usize> = (0..count)
        .map(|_| {
            // xorshift32
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            usize::try_from(state).unwrap_or(0) % (len + 1)
        })
        .collect();
    cuts.sort_unstable();
    cuts
}

/// `data` split at `cuts`.
pub fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        chunks.push(&data[start..cut]);
        start = cut;
    }
    chunks.push(&data[start..]);
    chunks
}

/// How the response body travels: its content-encoding, and whether the bytes are a valid
/// stream in it (compressed here) or arbitrary bytes labelled with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No content-encoding.
    Identity,
    /// Compressed here with gzip.
    Gzip,
    /// Compressed here with zlib, sent as `deflate`.
    Zlib,
    /// Compressed here with raw deflate, sent as `deflate`.
    RawDeflate,
    /// The fuzzer's bytes as they are, labelled `gzip`.
    CorruptGzip,
    /// The fuzzer's bytes as they are, labelled `deflate`.
    CorruptDeflate,
    /// An encoding capture does not decode.
    Unsupported,
}

impl Encoding {
    fn from_bits(bits: u8) -> Encoding {
        match bits % 7 {
            0 => Encoding::Identity,
            1 => Encoding::Gzip,
            2 => Encoding::Zlib,
            3 => Encoding::RawDeflate,
            4 => Encoding::CorruptGzip,
            5 => Encoding::CorruptDeflate,
            _ => Encoding::Unsupported,
        }
    }

    fn header(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip | Encoding::CorruptGzip => Some("gzip"),
            Encoding::Zlib | Encoding::RawDeflate | Encoding::CorruptDeflate => Some("deflate"),
            Encoding::Unsupported => Some("br"),
        }
    }

    fn encode(self, body: &[u8]) -> Vec<u8> {
        use flate2::Compression;
        use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
        let level = Compression::fast();
        let encoded = match self {
            Encoding::Gzip => {
                let mut e = GzEncoder::new(Vec::new(), level);
                e.write_all(body).and_then(|()| e.finish())
            }
            Encoding::Zlib => {
                let mut e = ZlibEncoder::new(Vec::new(), level);
                e.write_all(body).and_then(|()| e.finish())
            }
            Encoding::RawDeflate => {
                let mut e = DeflateEncoder::new(Vec::new(), level);
                e.write_all(body).and_then(|()| e.finish())
            }
            _ => Ok(body.to_vec()),
        };
        encoded.unwrap_or_default()
    }

    /// Whether the body is the same whatever its chunking: true unless the bytes are corrupt,
    /// where how much decodes before the error may depend on where chunks end.
    fn split_invariant(self) -> bool {
        !matches!(self, Encoding::CorruptGzip | Encoding::CorruptDeflate)
    }
}

/// One capture case decoded from fuzzer input.
///
/// Layout: byte 0 bit 0 = SSE content type, bits 1..4 = [`Encoding`], bit 5 = a small capture
/// limit (512 bytes) instead of 64 KiB; byte 1 = route; bytes 2..4 = split seed; the rest is the
/// response body.
#[derive(Debug)]
pub struct CaptureCase<'a> {
    /// The body is served as `text/event-stream`.
    pub sse: bool,
    /// Its content-encoding.
    pub encoding: Encoding,
    /// The capture limit.
    pub limit: usize,
    /// The selector byte for the route.
    pub route_byte: u8,
    /// The split seed.
    pub seed: u16,
    /// The response body, before encoding.
    pub body: &'a [u8],
}

impl<'a> CaptureCase<'a> {
    /// Decodes the header; `None` for inputs shorter than it.
    pub fn parse(data: &'a [u8]) -> Option<CaptureCase<'a>> {
        let (&[flags, route_byte, s0, s1], body) = data.split_first_chunk::<4>()?;
        Some(CaptureCase {
            sse: flags & 1 == 1,
            encoding: Encoding::from_bits((flags >> 1) & 0x0F),
            limit: if flags & 0x20 != 0 { 512 } else { 64 * 1024 },
            route_byte,
            seed: u16::from_le_bytes([s0, s1]),
            body,
        })
    }

    /// Captures the response on `route`, once in one chunk and once split, checks the
    /// invariants, and returns the whole-body exchange.
    pub fn run(&self, route: Route, path: &str) -> Exchange {
        let wire = self.encoding.encode(self.body);
        let whole = capture(self, route, path, &[&wire]);
        check_bounds(&whole, self.limit);
        let chunks = split(&wire, &cuts(wire.len(), self.seed));
        let chunked = capture(self, route, path, &chunks);
        check_bounds(&chunked, self.limit);
        if self.encoding.split_invariant() {
            assert_eq!(whole, chunked, "chunking changed the capture");
        }
        whole
    }
}

/// The request body capture pairs with the response (the request parser has its own target).
fn request_body(route: Route, stream: bool) -> Bytes {
    let body = match route {
        Route::Completions => {
            format!(r#"{{"model":"gpt-3.5-turbo-instruct","prompt":"Say hi","stream":{stream}}}"#)
        }
        Route::Responses => format!(r#"{{"model":"gpt-4.1","input":"Say hi","stream":{stream}}}"#),
        Route::AnthropicMessages => format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{{"role":"user","content":"Say hi"}}],"stream":{stream}}}"#
        ),
        _ => format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"Say hi"}}],"stream":{stream}}}"#
        ),
    };
    Bytes::from(body)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

/// Runs [`collect`] over `chunks` as the tee would send them, then a complete end.
fn capture(case: &CaptureCase<'_>, route: Route, path: &str, chunks: &[&[u8]]) -> Exchange {
    let request = CaptureRequest {
        id: uuid::Uuid::nil(),
        request_id: "fuzz".to_owned(),
        started_at_us: 0,
        method: "POST".to_owned(),
        path: path.to_owned(),
        route,
        api_key_hash: None,
        body: request_body(route, case.sse),
    };
    let meta = ResponseMeta {
        status: 200,
        content_type: Some(
            if case.sse {
                "text/event-stream; charset=utf-8"
            } else {
                "application/json"
            }
            .to_owned(),
        ),
        content_encoding: case.encoding.header().map(str::to_owned),
        ttfb_us: 1,
    };
    let (tx, rx) = mpsc::channel(chunks.len() + 1);
    for chunk in chunks {
        tx.try_send(Bytes::copy_from_slice(chunk))
            .expect("channel sized for every chunk");
    }
    drop(tx);
    let (end_tx, end_rx) = oneshot::channel();
    end_tx
        .send(BodyEnd {
            outcome: Outcome::Complete,
            latency_us: 2,
            chunks_dropped: false,
        })
        .expect("receiver alive");
    runtime().block_on(collect(request, meta, rx, end_rx, case.limit))
}

/// Capture output is bounded by the capture limit, whatever the input.
fn check_bounds(exchange: &Exchange, limit: usize) {
    assert!(
        exchange.choices.len() <= 128,
        "{} choices",
        exchange.choices.len()
    );
    for choice in &exchange.choices {
        assert!(
            choice.text.len() <= limit,
            "text {} > {limit}",
            choice.text.len()
        );
        assert!(choice.tool_calls.len() <= 256);
        for call in &choice.tool_calls {
            assert!(
                call.arguments.len() <= limit,
                "arguments {} > {limit}",
                call.arguments.len()
            );
        }
    }
}
