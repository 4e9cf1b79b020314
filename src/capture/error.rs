//! The error type of request capture.

/// Why a request body could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The route is not one capture understands ([`super::Route::Other`]).
    #[error("route is not captured")]
    NotCaptured,
    /// The body is not valid JSON; the message carries serde_json's line and column.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The body is valid JSON but its top level is not an object.
    #[error("request body is a JSON {found}, not an object")]
    NotAnObject {
        /// The JSON type found at the top level.
        found: &'static str,
    },
}

impl CaptureError {
    /// A short, low-cardinality label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CaptureError::NotCaptured => "not_captured",
            CaptureError::Json(_) => "json",
            CaptureError::NotAnObject { .. } => "not_an_object",
        }
    }
}
