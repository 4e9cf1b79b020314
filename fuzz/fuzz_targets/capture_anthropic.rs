//! Anthropic messages responses (JSON or SSE, any content-encoding) through capture: never
//! panics, output bounded by the capture limit, and the same exchange however the body is
//! chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripwire::capture::Route;
use tripwire_fuzz::CaptureCase;

fuzz_target!(|data: &[u8]| {
    let Some(case) = CaptureCase::parse(data) else {
        return;
    };
    case.run(Route::AnthropicMessages, "/v1/messages");
});
