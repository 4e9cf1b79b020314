//! The request body parser on every route: never panics, and the prompt text it extracts is no
//! larger than the body it came from (roles may be made up: a bare prompt is a `user` message).
//!
//! Layout: byte 0 picks the route; the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripwire::capture::{Route, parse_request};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let route = match selector % 5 {
        0 => Route::ChatCompletions,
        1 => Route::Completions,
        2 => Route::Responses,
        3 => Route::AnthropicMessages,
        _ => Route::Other,
    };
    match parse_request(route, body) {
        Ok(request) => {
            assert_ne!(route, Route::Other, "an uncaptured route parsed");
            let prompt: usize = request.prompt.iter().map(|m| m.content.len()).sum();
            assert!(
                prompt <= body.len(),
                "prompt {prompt} bytes from a {}-byte body",
                body.len()
            );
        }
        Err(err) => {
            assert!(!err.to_string().is_empty());
        }
    }
});
