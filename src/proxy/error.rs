//! Answers the gateway makes itself, before any upstream byte reached the client.
//!
//! They are shaped like OpenAI's errors (`{"error": {"message", "type", "param", "code"}}`) so
//! that official clients raise their usual exception types. Upstream errors are never rewritten:
//! they are forwarded byte for byte.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// A failure the gateway answers for.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request body is over `limits.max_request_body_bytes`.
    #[error(
        "request body exceeds the gateway limit of {limit} bytes (limits.max_request_body_bytes)"
    )]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Reading the request body from the client failed.
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    /// The upstream could not be reached (connection refused, DNS, TLS).
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// The upstream failed before answering.
    #[error("upstream request failed: {0}")]
    Upstream(String),
    /// No response headers within `upstream.first_byte_timeout` (or the total timeout).
    #[error("upstream did not answer within {0:?}")]
    FirstByteTimeout(std::time::Duration),
    /// The request cannot be turned into an upstream request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The gateway is shutting down and takes no new requests on this connection.
    #[error("the gateway is shutting down; retry on another replica")]
    ShuttingDown,
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Unreachable(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::FirstByteTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, low-cardinality label (metrics, the `code` field).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "request_too_large",
            ProxyError::ClientBody(_) => "client_body_error",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Unreachable(_) => "upstream_unreachable",
            ProxyError::Upstream(_) => "upstream_error",
            ProxyError::FirstByteTimeout(_) => "upstream_timeout",
            ProxyError::ShuttingDown => "gateway_shutting_down",
        }
    }

    /// The OpenAI-shaped JSON body.
    pub fn body(&self) -> Bytes {
        let error_type = match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::BadRequest(_) => "invalid_request_error",
            _ => "gateway_error",
        };
        let body = serde_json::json!({
            "error": {
                "message": format!("tripwire: {self}"),
                "type": error_type,
                "param": null,
                "code": self.kind(),
            }
        });
        Bytes::from(body.to_string())
    }

    /// The whole response, with `x-request-id`.
    pub fn into_response<B: From<Bytes>>(self, request_id: &HeaderValue) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(super::headers::X_REQUEST_ID.clone(), request_id.clone());
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_openai_shaped() {
        let err = ProxyError::BodyTooLarge { limit: 10 };
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "request_too_large");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_request_body_bytes")
        );
        let err = ProxyError::FirstByteTimeout(std::time::Duration::from_secs(2));
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            ProxyError::Unreachable("x".into()).status(),
            StatusCode::BAD_GATEWAY
        );
    }
}
