//! The flag console: web pages on the admin listener (`/console/`) for the people who answer
//! tripwire's alerts: the flag list (filters, counts per rule, live count of new flags), one
//! flag with its evidence highlighted and label buttons, the drift statistics of each scope
//! over time, and trigger attribution.
//!
//! The pages are rendered on the server ([`html`]: strings with one escaping door, no template
//! crate to build or learn) with one static script and one stylesheet compiled into the
//! binary; nothing is fetched from anywhere else, and the Content-Security-Policy says so.
//!
//! Access: the admin bearer token, typed once into a login form, opens a server-side session
//! (a random id in an `HttpOnly; SameSite=Strict` cookie; the token itself is never stored in
//! the browser). Sessions end when the token changes. With no token configured the console,
//! like the API, answers loopback clients only. Every POST carries the session's CSRF token
//! and must come from the console's own origin.

pub mod chart;
pub mod html;
mod pages;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::admin::AdminState;
pub use session::Sessions;

/// The Content-Security-Policy of every console response: scripts, styles and everything else
/// from the console itself, no inline script or style, no framing, forms post only here.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// The session cookie's name.
pub const COOKIE: &str = "tripwire_console";

const SCRIPT: &str = include_str!("static/console.js");
const STYLE: &str = include_str!("static/console.css");

/// Who is asking, once authorised.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// The CSRF token forms must carry.
    pub csrf: String,
}

/// Serves one request under `/console`.
pub async fn handle(
    state: &Arc<AdminState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let mut response = match (&method, path.as_str()) {
        (&Method::GET, "/console" | "/console/") => redirect("/console/flags"),
        (&Method::GET, "/console/static/console.js") => {
            asset(SCRIPT, "text/javascript; charset=utf-8")
        }
        (&Method::GET, "/console/static/console.css") => asset(STYLE, "text/css; charset=utf-8"),
        (&Method::GET, "/console/login") => login_page(state, peer, &request, None),
        (&Method::POST, "/console/login") => login(state, peer, request).await,
        _ => match authorise(state, peer, &request) {
            Err(response) => *response,
            Ok(viewer) => {
                if method == Method::POST {
                    match read_form(&viewer, request).await {
                        Err(response) => *response,
                        Ok(form) => post(state, &viewer, &path, &form).await,
                    }
                } else if method == Method::GET {
                    pages::get(state, &viewer, &path, request.uri().query().unwrap_or("")).await
                } else {
                    page_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
                }
            }
        },
    };
    secure_headers(&mut response);
    response
}

/// Routes an authorised, CSRF-checked POST.
async fn post(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    path: &str,
    form: &str,
) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["console", "logout"] => {
            state.console().end(&viewer.csrf);
            let mut response = redirect("/console/login");
            set_cookie(
                &mut response,
                &format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0"),
            );
            response
        }
        ["console", "flags", id, "label"] => pages::label(state, id, form).await,
        ["console", "triggers", "decide"] => pages::decide_trigger(state, form).await,
        _ => page_error(StatusCode::NOT_FOUND, "no such page"),
    }
}

/// The viewer of an authorised request, or the response that refuses it: a GET without a
/// session goes to the login form.
fn authorise<B>(
    state: &AdminState,
    peer: SocketAddr,
    request: &Request<B>,
) -> Result<Viewer, Box<Response<Full<Bytes>>>> {
    if !state.has_token() {
        return if peer.ip().is_loopback() && loopback_host(request) {
            Ok(Viewer {
                csrf: state.console().anonymous_csrf().to_owned(),
            })
        } else {
            Err(Box::new(page_error(
                StatusCode::FORBIDDEN,
                "the console answers loopback clients only unless admin_token (or \
                 TRIPWIRE_ADMIN_TOKEN) is set",
            )))
        };
    }
    match cookie(request).and_then(|id| state.console().lookup(id)) {
        Some(csrf) => Ok(Viewer { csrf }),
        None if request.method() == Method::GET => Err(Box::new(redirect("/console/login"))),
        None => Err(Box::new(page_error(
            StatusCode::UNAUTHORIZED,
            "not logged in to the console",
        ))),
    }
}

/// With no token, the `Host` must name the loopback too: a web page cannot then reach the
/// console through a DNS name rebound to 127.0.0.1.
fn loopback_host<B>(request: &Request<B>) -> bool {
    let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return true;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "localhost" | "[::1]")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the request comes from the console's own page. Browsers say so in
/// `Sec-Fetch-Site`; under `Referrer-Policy: no-referrer` their `Origin` on a form post is
/// `null`, so `Origin` (or `Referer`) is compared with `Host` only when that header is absent.
fn same_origin<B>(request: &Request<B>) -> bool {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|h: &HeaderValue| h.to_str().ok())
    };
    if let Some(site) = header("sec-fetch-site") {
        return site == "same-origin";
    }
    let source = header(header::ORIGIN.as_str()).or_else(|| header(header::REFERER.as_str()));
    match (header(header::HOST.as_str()), source) {
        (Some(host), Some(source)) => {
            let rest = source
                .strip_prefix("http://")
                .or_else(|| source.strip_prefix("https://"));
            rest.is_some_and(|rest| rest.split('/').next() == Some(host))
        }
        // A client that is not a browser (curl) sends neither; the CSRF token still applies.
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

/// The session cookie's value.
fn cookie<B>(request: &Request<B>) -> Option<&str> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

/// Reads a form body (at most 64 KiB) after checking its origin and CSRF token.
async fn read_form(
    viewer: &Viewer,
    request: Request<Incoming>,
) -> Result<String, Box<Response<Full<Bytes>>>> {
    if !same_origin(&request) {
        return Err(Box::new(page_error(
            StatusCode::FORBIDDEN,
            "cross-origin form post refused",
        )));
    }
    let body = read_body(request).await?;
    let presented = crate::admin::param(&body, "csrf").unwrap_or_default();
    if crate::secret::Secret::new(viewer.csrf.as_str()).matches(presented.as_bytes()) {
        Ok(body)
    } else {
        Err(Box::new(page_error(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or stale; reload the page",
        )))
    }
}

async fn read_body(request: Request<Incoming>) -> Result<String, Box<Response<Full<Bytes>>>> {
    match Limited::new(request.into_body(), 64 * 1024).collect().await {
        Ok(body) => Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned()),
        Err(_) => Err(Box::new(page_error(
            StatusCode::BAD_REQUEST,
            "form body unreadable or over 64 KiB",
        ))),
    }
}

/// `POST /console/login`: the admin token, compared in constant time, opens a session.
async fn login(
    state: &Arc<AdminState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if !same_origin(&request) {
        return page_error(StatusCode::FORBIDDEN, "cross-origin login refused");
    }
    if !state.has_token() {
        return redirect("/console/flags");
    }
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let presented = crate::admin::param(&body, "token").unwrap_or_default();
    if !state.token_matches(presented.as_bytes()) {
        tracing::info!(peer = %peer.ip(), "console login refused: wrong admin token");
        let mut response = login_form(Some("That is not the admin token."));
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let id = state.console().begin();
    let mut response = redirect("/console/flags");
    set_cookie(
        &mut response,
        &format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/console"),
    );
    response
}

fn login_page<B>(
    state: &AdminState,
    peer: SocketAddr,
    request: &Request<B>,
    message: Option<&str>,
) -> Response<Full<Bytes>> {
    if !state.has_token() {
        return match authorise(state, peer, request) {
            Ok(_) => redirect("/console/flags"),
            Err(response) => *response,
        };
    }
    login_form(message)
}

fn login_form(message: Option<&str>) -> Response<Full<Bytes>> {
    let mut body = html::Html::new();
    body.raw("<section class=\"login\"><h1>tripwire console</h1>");
    if let Some(message) = message {
        body.raw("<p class=\"error\">").text(message).raw("</p>");
    }
    body.raw(
        "<form method=\"post\" action=\"/console/login\">\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
         required autofocus>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"hint\">The gateway's <code>admin_token</code> (or <code>TRIPWIRE_ADMIN_TOKEN</code>). \
         It opens a session kept in a cookie only this console can read.</p></section>",
    );
    page(StatusCode::OK, "Log in", None, body)
}

/// A whole page: the header with navigation (and the logout form when there is a session).
pub(crate) fn page(
    status: StatusCode,
    title: &str,
    viewer: Option<(&Viewer, &'static str)>,
    body: html::Html,
) -> Response<Full<Bytes>> {
    let mut out = html::Html::new();
    out.raw(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>",
    )
    .text(title)
    .raw(
        " · tripwire</title><link rel=\"stylesheet\" href=\"/console/static/console.css\">\
         <script src=\"/console/static/console.js\" defer></script></head><body>",
    );
    if let Some((viewer, active)) = viewer {
        out.raw("<header><a class=\"brand\" href=\"/console/flags\">tripwire</a><nav>");
        for (href, name) in [
            ("/console/flags", "Flags"),
            ("/console/drift", "Drift"),
            ("/console/triggers", "Triggers"),
        ] {
            out.raw("<a href=\"").text(href).raw("\"");
            if name == active {
                out.raw(" class=\"active\"");
            }
            out.raw(">").text(name).raw("</a>");
        }
        out.raw(
            "</nav><form class=\"logout\" method=\"post\" action=\"/console/logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"",
        )
        .text(&viewer.csrf)
        .raw("\"><button type=\"submit\">Log out</button></form></header>");
    }
    out.raw("<main>").append(body).raw("</main></body></html>");
    let mut response = Response::new(Full::new(Bytes::from(out.into_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

pub(crate) fn page_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut body = html::Html::new();
    body.raw("<section class=\"login\"><h1>")
        .show(status.as_u16())
        .raw("</h1><p class=\"error\">")
        .text(message)
        .raw("</p><p><a href=\"/console/flags\">Back to the flags</a></p></section>");
    page(status, "Error", None, body)
}

pub(crate) fn redirect(location: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

pub(crate) fn json_response(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn set_cookie(response: &mut Response<Full<Bytes>>, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// The headers every console response carries.
fn secure_headers(response: &mut Response<Full<Bytes>>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri("/console/login");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn every_response_carries_the_security_headers() {
        let mut response = page_error(StatusCode::NOT_FOUND, "x");
        secure_headers(&mut response);
        let h = response.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert!(CSP.contains("script-src 'self';"));
        assert!(!CSP.contains("unsafe-inline"));
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
    }

    #[tokio::test]
    async fn pages_have_no_inline_script_or_style() {
        let mut body = html::Html::new();
        body.text("<script>alert(1)</script><style>p{}</style>");
        let response = page(StatusCode::OK, "<b>t</b>", None, body);
        let text = String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert_eq!(text.matches("<script").count(), 1, "{text}");
        assert!(text.contains("<script src=\"/console/static/console.js\" defer></script>"));
        assert!(!text.contains("<style"), "{text}");
        assert!(!text.contains(" style="), "{text}");
        assert!(!text.contains("<b>t</b>"), "{text}");
    }

    #[test]
    fn posts_must_come_from_the_same_origin() {
        assert!(same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090")
        ])));
        assert!(!same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090.evil.example")
        ])));
        assert!(!same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("referer", "http://evil.example/127.0.0.1:9090")
        ])));
        assert!(same_origin(&request(&[("host", "127.0.0.1:9090")])));
        assert!(!same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "null")
        ])));
        assert!(same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin")
        ])));
        assert!(!same_origin(&request(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
            ("sec-fetch-site", "cross-site")
        ])));
    }

    #[test]
    fn without_a_token_the_host_must_be_loopback() {
        assert!(loopback_host(&request(&[("host", "127.0.0.1:9090")])));
        assert!(loopback_host(&request(&[("host", "localhost:9090")])));
        assert!(loopback_host(&request(&[("host", "[::1]:9090")])));
        assert!(!loopback_host(&request(&[(
            "host",
            "rebound.evil.example:9090"
        )])));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let request = request(&[("cookie", "a=1; tripwire_console=abc; b=2")]);
        assert_eq!(cookie(&request), Some("abc"));
        assert_eq!(cookie(&super::tests::request(&[("cookie", "x=1")])), None);
    }
}
