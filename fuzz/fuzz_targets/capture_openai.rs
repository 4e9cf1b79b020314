//! OpenAI responses (chat completions, completions, responses API; JSON or SSE, any
//! content-encoding) through capture: never panics, output bounded by the capture limit, and
//! the same exchange however the body is chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripwire::capture::Route;
use tripwire_fuzz::CaptureCase;

fuzz_target!(|data: &[u8]| {
    let Some(case) = CaptureCase::parse(data) else {
        return;
    };
    let (route, path) = match case.route_byte % 3 {
        0 => (Route::ChatCompletions, "/v1/chat/completions"),
        1 => (Route::Completions, "/v1/completions"),
        _ => (Route::Responses, "/v1/responses"),
    };
    case.run(route, path);
});
