//! Response parser tests: every fixture whole, split at every byte offset, byte by byte and
//! compressed; then the malformed cases.

use std::io::Write as _;

use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use proptest::prelude::*;

use super::*;

const SSE: Option<&str> = Some("text/event-stream; charset=utf-8");
const JSON: Option<&str> = Some("application/json");

struct Fixture {
    name: &'static str,
    route: Route,
    content_type: Option<&'static str>,
    body: &'static [u8],
    want: ParsedResponse,
}

fn parse_with(
    route: Route,
    content_type: Option<&str>,
    encoding: Option<&str>,
    limit: usize,
    chunks: &[&[u8]],
) -> ParsedResponse {
    let mut parser = ResponseParser::with_limit(route, content_type, encoding, limit);
    for chunk in chunks {
        parser.push(chunk);
    }
    parser.finish()
}

fn parse(route: Route, content_type: Option<&str>, chunks: &[&[u8]]) -> ParsedResponse {
    parse_with(route, content_type, None, DEFAULT_CAPTURE_LIMIT, chunks)
}

fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: Some(id.to_owned()),
        name: name.to_owned(),
        arguments: arguments.to_owned(),
    }
}

fn choice(index: u32, text: &str, finish: Option<&str>, tool_calls: Vec<ToolCall>) -> Choice {
    Choice {
        index,
        text: text.to_owned(),
        finish_reason: finish.map(str::to_owned),
        tool_calls,
    }
}

fn usage(input: u64, output: u64, total: Option<u64>) -> Option<Usage> {
    Some(Usage {
        input_tokens: Some(input),
        output_tokens: Some(output),
        total_tokens: total,
    })
}

fn complete(model: &str, choices: Vec<Choice>, usage: Option<Usage>) -> ParsedResponse {
    ParsedResponse {
        model: Some(model.to_owned()),
        choices,
        usage,
        complete: true,
        error: None,
    }
}

fn fixtures() -> Vec<Fixture> {
    vec![
        Fixture {
            name: "openai_chat_stream.sse",
            route: Route::ChatCompletions,
            content_type: SSE,
            body: include_bytes!("../../../tests/data/openai_chat_stream.sse"),
            want: complete(
                "gpt-4o-2024-08-06",
                vec![choice(
                    0,
                    "The café on the corner serves crêpes 🥞 and strong coffee.",
                    Some("stop"),
                    vec![],
                )],
                usage(19, 12, Some(31)),
            ),
        },
        Fixture {
            name: "openai_chat_tools_stream.sse",
            route: Route::ChatCompletions,
            content_type: SSE,
            body: include_bytes!("../../../tests/data/openai_chat_tools_stream.sse"),
            want: complete(
                "gpt-4o-2024-08-06",
                vec![choice(
                    0,
                    "",
                    Some("tool_calls"),
                    vec![
                        call(
                            "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                            "get_weather",
                            r#"{"location":"Paris, France"}"#,
                        ),
                        call(
                            "call_ABCDEFGH12345678abcdefgh",
                            "get_time",
                            r#"{"tz":"Europe/Paris"}"#,
                        ),
                    ],
                )],
                None,
            ),
        },
        Fixture {
            name: "openai_chat.json",
            route: Route::ChatCompletions,
            content_type: JSON,
            body: include_bytes!("../../../tests/data/openai_chat.json"),
            want: complete(
                "gpt-4.1-2025-04-14",
                vec![
                    choice(
                        0,
                        "Hello! How can I assist you today?",
                        Some("stop"),
                        vec![],
                    ),
                    choice(
                        1,
                        "",
                        Some("tool_calls"),
                        vec![call(
                            "call_abc123",
                            "get_current_weather",
                            "{\n\"location\": \"Boston, MA\"\n}",
                        )],
                    ),
                ],
                usage(19, 10, Some(29)),
            ),
        },
        Fixture {
            name: "openai_completions_stream.sse",
            route: Route::Completions,
            content_type: SSE,
            body: include_bytes!("../../../tests/data/openai_completions_stream.sse"),
            want: complete(
                "gpt-3.5-turbo-instruct",
                vec![
                    choice(0, "\n\nThis is a test.", Some("length"), vec![]),
                    choice(1, "\n\nYes, indeed!", Some("stop"), vec![]),
                ],
                None,
            ),
        },
        Fixture {
            name: "openai_completions.json",
            route: Route::Completions,
            content_type: JSON,
            body: include_bytes!("../../../tests/data/openai_completions.json"),
            want: complete(
                "gpt-3.5-turbo-instruct",
                vec![choice(
                    0,
                    "\n\nThis is indeed a test",
                    Some("length"),
                    vec![],
                )],
                usage(5, 7, Some(12)),
            ),
        },
        Fixture {
            name: "openai_responses_stream.sse",
            route: Route::Responses,
            content_type: SSE,
            body: include_bytes!("../../../tests/data/openai_responses_stream.sse"),
            want: complete(
                "gpt-4.1-2025-04-14",
                vec![choice(
                    0,
                    "Hi there! Überraschung — how can I help?",
                    Some("completed"),
                    vec![call(
                        "call_pqJ9b6sT2Pl5Xk3r",
                        "get_weather",
                        r#"{"location":"Berlin"}"#,
                    )],
                )],
                usage(37, 28, Some(65)),
            ),
        },
        Fixture {
            name: "openai_responses.json",
            route: Route::Responses,
            content_type: JSON,
            body: include_bytes!("../../../tests/data/openai_responses.json"),
            want: complete(
                "gpt-4.1-2025-04-14",
                vec![choice(
                    0,
                    "In a peaceful grove beneath a silver moon, a unicorn named Lumina discovered a \
                     hidden pool.",
                    Some("completed"),
                    vec![call(
                        "call_pqJ9b6sT2Pl5Xk3r",
                        "get_weather",
                        r#"{"location":"Berlin"}"#,
                    )],
                )],
                usage(36, 87, Some(123)),
            ),
        },
        Fixture {
            name: "anthropic_messages_stream.sse",
            route: Route::AnthropicMessages,
            content_type: SSE,
            body: include_bytes!("../../../tests/data/anthropic_messages_stream.sse"),
            want: complete(
                "claude-sonnet-4-5-20250929",
                vec![choice(
                    0,
                    "Okay, let's check the weather for San Francisco, CA — 🌁:",
                    Some("tool_use"),
                    vec![call(
                        "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                        "get_weather",
                        r#"{"location": "San Francisco, CA", "unit": "fahrenheit"}"#,
                    )],
                )],
                usage(472, 89, None),
            ),
        },
        Fixture {
            name: "anthropic_messages.json",
            route: Route::AnthropicMessages,
            content_type: JSON,
            body: include_bytes!("../../../tests/data/anthropic_messages.json"),
            want: complete(
                "claude-sonnet-4-5-20250929",
                vec![choice(
                    0,
                    "I'll look that up.",
                    Some("tool_use"),
                    vec![call(
                        "toolu_01A09q90qw90lq917835lq9",
                        "get_weather",
                        r#"{"location":"San Francisco, CA","unit":"celsius"}"#,
                    )],
                )],
                usage(2095, 503, None),
            ),
        },
    ]
}

#[test]
fn fixtures_parse_whole() {
    for f in fixtures() {
        let got = parse(f.route, f.content_type, &[f.body]);
        assert_eq!(got, f.want, "{}", f.name);
    }
}

#[test]
fn fixtures_parse_split_at_every_offset_and_byte_by_byte() {
    for f in fixtures() {
        for split in 0..=f.body.len() {
            let (a, b) = f.body.split_at(split);
            let got = parse(f.route, f.content_type, &[a, b]);
            assert_eq!(got, f.want, "{} split at {split}", f.name);
        }
        let bytes: Vec<&[u8]> = f.body.chunks(1).collect();
        assert_eq!(
            parse(f.route, f.content_type, &bytes),
            f.want,
            "{} bytewise",
            f.name
        );
    }
}

#[test]
fn sse_fixtures_parse_with_other_line_endings() {
    for f in fixtures().into_iter().filter(|f| f.content_type == SSE) {
        for ending in ["\r\n", "\r"] {
            let text = String::from_utf8_lossy(f.body).replace('\n', ending);
            let bytes: Vec<&[u8]> = text.as_bytes().chunks(3).collect();
            let got = parse(f.route, f.content_type, &bytes);
            assert_eq!(got, f.want, "{} with {ending:?}", f.name);
        }
    }
}

fn compress(encoding: &str, body: &[u8]) -> Vec<u8> {
    match encoding {
        "gzip" => {
            let mut e = GzEncoder::new(Vec::new(), Compression::default());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        "zlib" => {
            let mut e = ZlibEncoder::new(Vec::new(), Compression::fast());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        "raw" => {
            let mut e = DeflateEncoder::new(Vec::new(), Compression::best());
            e.write_all(body).unwrap();
            e.finish().unwrap()
        }
        other => panic!("no encoder {other}"),
    }
}

#[test]
fn compressed_fixtures_parse_the_same() {
    let table = [
        ("gzip", "gzip"),
        ("gzip", "GZIP"),
        ("zlib", "deflate"),
        ("raw", "deflate"),
    ];
    for f in fixtures() {
        for (format, header) in table {
            let compressed = compress(format, f.body);
            for size in [1, 2, 7, 64, 100_000] {
                let chunks: Vec<&[u8]> = compressed.chunks(size).collect();
                let got = parse_with(
                    f.route,
                    f.content_type,
                    Some(header),
                    DEFAULT_CAPTURE_LIMIT,
                    &chunks,
                );
                assert_eq!(
                    got, f.want,
                    "{} {format} as {header} in {size}-byte chunks",
                    f.name
                );
            }
        }
    }
}

#[test]
fn encodings_table() {
    let chat = br#"{"model":"m","choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"stop"}]}"#;
    let gz = compress("gzip", chat);
    let mut corrupt = gz.clone();
    if let Some(b) = corrupt.get_mut(12) {
        *b ^= 0xFF;
    }
    let truncated = gz.get(..gz.len() - 4).unwrap();
    /// Name, content-encoding, body, error prefix, number of choices.
    type Case<'a> = (&'a str, Option<&'a str>, &'a [u8], Option<&'a str>, usize);
    let table: &[Case] = &[
        ("identity", Some("identity"), chat, None, 1),
        ("none", None, chat, None, 1),
        ("padded gzip", Some(" gzip "), &gz, None, 1),
        ("x-gzip", Some("x-gzip"), &gz, None, 1),
        (
            "brotli",
            Some("br"),
            chat,
            Some("unsupported content-encoding br"),
            0,
        ),
        (
            "zstd",
            Some("zstd"),
            &gz,
            Some("unsupported content-encoding zstd"),
            0,
        ),
        (
            "corrupt gzip",
            Some("gzip"),
            &corrupt,
            Some("content-encoding gzip: "),
            0,
        ),
        (
            "truncated gzip",
            Some("gzip"),
            truncated,
            Some("content-encoding gzip: "),
            1,
        ),
        (
            "gzip header but plain",
            Some("gzip"),
            chat,
            Some("content-encoding gzip: "),
            0,
        ),
        (
            "deflate garbage",
            Some("deflate"),
            b"\xFF\xFF\xFF\xFF",
            Some("content-encoding deflate: "),
            0,
        ),
        (
            "one deflate byte",
            Some("deflate"),
            b"x",
            Some("content-encoding deflate: "),
            0,
        ),
    ];
    for (name, encoding, body, want_error, want_choices) in table {
        let chunks: Vec<&[u8]> = body.chunks(5).collect();
        let got = parse_with(
            Route::ChatCompletions,
            JSON,
            *encoding,
            DEFAULT_CAPTURE_LIMIT,
            &chunks,
        );
        match want_error {
            None => assert_eq!(got.error, None, "{name}"),
            Some(prefix) => {
                let error = got.error.clone().unwrap_or_default();
                assert!(error.starts_with(prefix), "{name}: {error}");
            }
        }
        assert_eq!(got.choices.len(), *want_choices, "{name}: {got:?}");
    }
}

fn first_half_events(body: &[u8], keep: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let events: Vec<&str> = text.split_inclusive("\n\n").take(keep).collect();
    events.concat().into_bytes()
}

#[test]
fn truncated_streams_keep_text_so_far() {
    let chat = first_half_events(
        include_bytes!("../../../tests/data/openai_chat_stream.sse"),
        4,
    );
    let got = parse(Route::ChatCompletions, SSE, &[&chat]);
    assert_eq!(got.choices, vec![choice(0, "The café on", None, vec![])]);
    assert!(!got.complete);
    assert_eq!(got.error, None);

    // Cut in the middle of an event: the partial event is dropped.
    let mut cut = chat.clone();
    cut.extend_from_slice(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"}}]}\n",
    );
    assert_eq!(parse(Route::ChatCompletions, SSE, &[&cut]), got);

    let anthropic = first_half_events(
        include_bytes!("../../../tests/data/anthropic_messages_stream.sse"),
        6,
    );
    let got = parse(Route::AnthropicMessages, SSE, &[&anthropic]);
    assert_eq!(
        got.choices,
        vec![choice(
            0,
            "Okay, let's check the weather for San Francisco",
            None,
            vec![]
        )]
    );
    assert_eq!(
        got.usage,
        Some(Usage {
            input_tokens: Some(472),
            output_tokens: Some(2),
            total_tokens: None
        })
    );
    assert!(!got.complete);

    let responses = first_half_events(
        include_bytes!("../../../tests/data/openai_responses_stream.sse"),
        7,
    );
    let got = parse(Route::Responses, SSE, &[&responses]);
    assert_eq!(got.choices, vec![choice(0, "Hi there!", None, vec![])]);
    assert_eq!(got.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    assert!(!got.complete);
}

#[test]
fn malformed_table() {
    /// Name, route, content-type, body, first choice's text, error, complete.
    type Case<'a> = (
        &'a str,
        Route,
        Option<&'a str>,
        &'a [u8],
        &'a str,
        Option<&'a str>,
        bool,
    );
    let table: &[Case] = &[
        (
            "garbage data line then more events",
            Route::ChatCompletions,
            SSE,
            b"data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n\
              data: {not json\n\n\
              data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n\
              data: [DONE]\n\n",
            "ab",
            Some("malformed SSE data: key must be a string at line 1 column 2"),
            true,
        ),
        (
            "data that is not an object",
            Route::Completions,
            SSE,
            b"data: 42\n\ndata: {\"choices\":[{\"index\":0,\"text\":\"x\"}]}\n\ndata: [DONE]\n\n",
            "x",
            Some("malformed SSE data: a JSON number, not an object"),
            true,
        ),
        (
            "invalid utf-8 in data",
            Route::ChatCompletions,
            SSE,
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\xFF\xC3b\"}}]}\n\ndata: [DONE]\n\n",
            "a\u{FFFD}\u{FFFD}b",
            None,
            true,
        ),
        (
            "invalid utf-8 in json body",
            Route::ChatCompletions,
            JSON,
            b"{\"choices\":[{\"index\":0,\"message\":{\"content\":\"a\xFFb\"}}]}",
            "",
            Some("invalid JSON response body: invalid unicode code point at line 1 column 47"),
            false,
        ),
        (
            "error chunk mid-stream",
            Route::ChatCompletions,
            SSE,
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"par\"}}]}\n\n\
              data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\"}}\n\n",
            "par",
            Some("upstream error: The server had an error while processing your request."),
            false,
        ),
        (
            "openai error body",
            Route::ChatCompletions,
            JSON,
            br#"{"error":{"message":"Incorrect API key provided: sk-abc.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            "",
            Some("upstream error: Incorrect API key provided: sk-abc."),
            true,
        ),
        (
            "anthropic error body",
            Route::AnthropicMessages,
            JSON,
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            "",
            Some("upstream error: Overloaded"),
            true,
        ),
        (
            "anthropic error event",
            Route::AnthropicMessages,
            SSE,
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"c\"}}\n\n\
              event: ping\ndata: {\"type\": \"ping\"}\n\n\
              event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            "",
            Some("upstream error: Overloaded"),
            false,
        ),
        (
            "responses error event",
            Route::Responses,
            SSE,
            b"event: error\ndata: {\"type\":\"error\",\"code\":\"ERR_SOMETHING\",\"message\":\"Something went wrong\",\"param\":null,\"sequence_number\":1}\n\n",
            "",
            Some("upstream error: Something went wrong"),
            false,
        ),
        (
            "responses failed",
            Route::Responses,
            SSE,
            b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hal\"}\n\n\
              event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"model\":\"gpt\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"The model failed\"},\"output\":[]}}\n\n",
            "Hal",
            Some("upstream error: The model failed"),
            false,
        ),
        (
            "responses body with null error is fine",
            Route::Responses,
            JSON,
            br#"{"model":"gpt","status":"incomplete","error":null,"incomplete_details":{"reason":"max_output_tokens"},"output":[{"type":"message","content":[{"type":"output_text","text":"Once upon"}]}]}"#,
            "Once upon",
            None,
            true,
        ),
        (
            "html error page",
            Route::ChatCompletions,
            Some("text/html"),
            b"<html><body>502 Bad Gateway</body></html>",
            "",
            Some("invalid JSON response body: expected value at line 1 column 1"),
            false,
        ),
        ("empty body", Route::Completions, JSON, b"", "", Some("empty response body"), false),
        (
            "array body",
            Route::Completions,
            JSON,
            b"[]",
            "",
            Some("response body is a JSON array, not an object"),
            false,
        ),
        (
            "several errors are counted",
            Route::ChatCompletions,
            SSE,
            b"data: x\n\ndata: y\n\ndata: z\n\n",
            "",
            Some("malformed SSE data: expected value at line 1 column 1 (and 2 more)"),
            false,
        ),
        (
            "[DONE] after an anthropic stream is ignored",
            Route::AnthropicMessages,
            SSE,
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\ndata: [DONE]\n\n",
            "",
            None,
            true,
        ),
        (
            "route not captured",
            Route::Other,
            JSON,
            b"{}",
            "",
            Some("route is not captured"),
            false,
        ),
    ];
    for (name, route, content_type, body, text, error, complete) in table {
        let got = parse(*route, *content_type, &[body]);
        assert_eq!(got.error.as_deref(), *error, "{name}");
        assert_eq!(
            got.choices.first().map_or("", |c| c.text.as_str()),
            *text,
            "{name}"
        );
        assert_eq!(got.complete, *complete, "{name}");
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(parse(*route, *content_type, &bytes), got, "{name} bytewise");
    }
}

#[test]
fn capture_limit_table() {
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"héllo wörld\"}}]}\n\n\
                  data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!!\"}}]}\n\n\
                  data: [DONE]\n\n";
    let tools = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\
                 \"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":12345}\"}}]}}]}\n\n";
    let json = r#"{"choices":[{"index":0,"message":{"content":"0123456789abcdef"}}]}"#;
    /// Name, content-type, body, limit, text, first tool call's arguments, error.
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a str,
        usize,
        &'a str,
        &'a str,
        Option<&'a str>,
    );
    let table: &[Case] = &[
        (
            "text cut on a char boundary",
            SSE,
            stream,
            2,
            "h",
            "",
            Some("output larger than capture limit"),
        ),
        (
            "text fits exactly",
            SSE,
            stream,
            15,
            "héllo wörld!!",
            "",
            None,
        ),
        (
            "text cut, error once",
            SSE,
            stream,
            8,
            "héllo w",
            "",
            Some("output larger than capture limit"),
        ),
        (
            "arguments cut",
            SSE,
            tools,
            5,
            "",
            "{\"a\":",
            Some("output larger than capture limit"),
        ),
        (
            "json body over limit",
            JSON,
            json,
            20,
            "",
            "",
            Some("body larger than capture limit"),
        ),
        (
            "json body within limit",
            JSON,
            json,
            200,
            "0123456789abcdef",
            "",
            None,
        ),
    ];
    for (name, content_type, body, limit, text, arguments, error) in table {
        let chunks: Vec<&[u8]> = body.as_bytes().chunks(4).collect();
        let got = parse_with(Route::ChatCompletions, *content_type, None, *limit, &chunks);
        assert_eq!(got.error.as_deref(), *error, "{name}");
        let first = got.choices.first();
        assert_eq!(first.map_or("", |c| c.text.as_str()), *text, "{name}");
        let args = first
            .and_then(|c| c.tool_calls.first())
            .map_or("", |t| t.arguments.as_str());
        assert_eq!(args, *arguments, "{name}");
    }
}

#[test]
fn choices_sorted_and_bounded() {
    let mut body = String::new();
    for index in [3, 1, 2, 0] {
        body.push_str(&format!(
            "data: {{\"choices\":[{{\"index\":{index},\"text\":\"{index}\"}}]}}\n\n"
        ));
    }
    let got = parse(Route::Completions, SSE, &[body.as_bytes()]);
    let order: Vec<u32> = got.choices.iter().map(|c| c.index).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);

    let mut many = String::new();
    for index in 0..=MAX_CHOICES {
        many.push_str(&format!(
            "data: {{\"choices\":[{{\"index\":{index},\"text\":\"x\"}}]}}\n\n"
        ));
    }
    let got = parse(Route::Completions, SSE, &[many.as_bytes()]);
    assert_eq!(got.choices.len(), MAX_CHOICES);
    assert_eq!(got.error.as_deref(), Some("more than 128 choices"));
}

fn routes() -> impl Strategy<Value = Route> {
    prop::sample::select(vec![
        Route::ChatCompletions,
        Route::Completions,
        Route::Responses,
        Route::AnthropicMessages,
        Route::Other,
    ])
}

proptest! {
    #[test]
    fn arbitrary_input_never_panics_and_chunking_does_not_matter(
        route in routes(),
        sse in any::<bool>(),
        encoding in prop::sample::select(vec![None, Some("gzip"), Some("deflate")]),
        body in prop::collection::vec(any::<u8>(), 0..300),
        size in 1usize..40,
    ) {
        let content_type = if sse { SSE } else { JSON };
        let whole = parse_with(route, content_type, encoding, DEFAULT_CAPTURE_LIMIT, &[&body]);
        let chunks: Vec<&[u8]> = body.chunks(size).collect();
        let chunked = parse_with(route, content_type, encoding, DEFAULT_CAPTURE_LIMIT, &chunks);
        prop_assert_eq!(chunked, whole);
    }

    #[test]
    fn mutated_fixtures_never_panic(
        index in 0usize..9,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        size in 1usize..64,
    ) {
        let fixtures = fixtures();
        let f = &fixtures[index % fixtures.len()];
        let mut body = f.body.to_vec();
        for (at, byte) in flips {
            let i = at.index(body.len());
            body[i] = byte;
        }
        let chunks: Vec<&[u8]> = body.chunks(size).collect();
        let chunked = parse(f.route, f.content_type, &chunks);
        prop_assert_eq!(chunked, parse(f.route, f.content_type, &[&body]));
    }
}
