//! TEMPORARY stub, replaced by the capture branch.
use super::{ParsedResponse, Route};
/// Stub.
#[derive(Debug)]
pub struct ResponseParser { buf: Vec<u8> }
impl ResponseParser {
    /// Stub.
    pub fn new(_route: Route, _ct: Option<&str>, _ce: Option<&str>) -> Self { ResponseParser { buf: Vec::new() } }
    /// Stub.
    pub fn push(&mut self, chunk: &[u8]) { self.buf.extend_from_slice(chunk) }
    /// Stub.
    pub fn finish(self) -> ParsedResponse { ParsedResponse { complete: true, ..Default::default() } }
}
