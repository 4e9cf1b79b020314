//! TEMPORARY stub, replaced by the capture branch.
use super::{CaptureError, ParsedRequest, Route};
/// Stub.
pub fn parse_request(_route: Route, body: &[u8]) -> Result<ParsedRequest, CaptureError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| CaptureError::Json(e.to_string()))?;
    Ok(ParsedRequest { model: v["model"].as_str().map(str::to_owned), stream: v["stream"].as_bool().unwrap_or(false), prompt: vec![] })
}
