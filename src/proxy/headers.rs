//! Header handling on the way through: hop-by-hop headers are dropped (RFC 9110 §7.6.1),
//! `x-forwarded-for` is appended, `x-request-id` is kept or made, and the caller's API key is
//! reduced to a hash before anything else sees it.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

/// The request id header, echoed on every response.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The forwarding chain header.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// de-facto `proxy-connection`. `host` and `content-length` are not hop-by-hop but are
/// set again for the upstream request, so they are dropped too on the way in.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including any that the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Prepares the headers of the request sent upstream: hop-by-hop and `host` removed,
/// `x-forwarded-for` extended with the client's address, `x-request-id` set.
pub fn upstream_request_headers(
    mut headers: HeaderMap,
    client: IpAddr,
    request_id: &HeaderValue,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    let forwarded = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::to_str) {
        Some(Ok(prior)) if !prior.trim().is_empty() => format!("{prior}, {client}"),
        _ => client.to_string(),
    };
    headers.remove(&X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    headers
}

/// Prepares the headers of the response sent back: hop-by-hop removed, `x-request-id` set.
pub fn client_response_headers(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// The caller's `x-request-id` when it is usable (1–200 visible ASCII characters), else none.
pub fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(&X_REQUEST_ID)?;
    let bytes = value.as_bytes();
    let usable =
        !bytes.is_empty() && bytes.len() <= 200 && bytes.iter().all(|b| b.is_ascii_graphic());
    usable.then(|| value.clone())
}

/// SHA-256 of the caller's API key (hex of the first 16 bytes), from `authorization: Bearer`,
/// `x-api-key` (Anthropic) or `api-key` (Azure OpenAI). The key itself goes no further.
pub fn api_key_hash(headers: &HeaderMap) -> Option<String> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            // `Bearer <key>` (any case), or a bare key.
            let v = v.trim();
            match v.split_once(char::is_whitespace) {
                Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
                None if v.eq_ignore_ascii_case("bearer") => "",
                _ => v,
            }
        })
        .or_else(|| {
            ["x-api-key", "api-key"]
                .iter()
                .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
                .map(str::trim)
        })
        .filter(|k| !k.is_empty())?;
    let digest = Sha256::digest(key.as_bytes());
    Some(hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-keep"),
        ]);
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["content-type", "authorization"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let id = HeaderValue::from_static("req-1");
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let out = upstream_request_headers(map(&[("x-forwarded-for", "1.2.3.4")]), ip, &id);
        assert_eq!(out["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        let out = upstream_request_headers(map(&[("host", "gw")]), ip, &id);
        assert_eq!(out["x-forwarded-for"], "10.0.0.9");
        assert_eq!(out["x-request-id"], "req-1");
        assert!(out.get("host").is_none());
    }

    #[test]
    fn request_id_must_be_visible_ascii() {
        assert!(client_request_id(&map(&[("x-request-id", "abc-123")])).is_some());
        assert!(client_request_id(&map(&[("x-request-id", "has space")])).is_none());
        assert!(client_request_id(&map(&[("x-request-id", &"a".repeat(201))])).is_none());
        assert!(client_request_id(&HeaderMap::new()).is_none());
    }

    #[test]
    fn api_key_hash_reads_every_key_header_and_never_returns_the_key() {
        let bearer = api_key_hash(&map(&[("authorization", "Bearer sk-test-123")])).unwrap();
        let anthropic = api_key_hash(&map(&[("x-api-key", "sk-test-123")])).unwrap();
        let azure = api_key_hash(&map(&[("api-key", "sk-test-123")])).unwrap();
        assert_eq!(bearer, anthropic);
        assert_eq!(bearer, azure);
        assert_eq!(bearer.len(), 32);
        assert!(!bearer.contains("sk-test"));
        assert_ne!(
            bearer,
            api_key_hash(&map(&[("authorization", "Bearer sk-other")])).unwrap()
        );
        assert!(api_key_hash(&map(&[("authorization", "Bearer ")])).is_none());
        assert!(api_key_hash(&HeaderMap::new()).is_none());
    }
}
