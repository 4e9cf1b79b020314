//! A scriptable upstream for the proxy tests: each test decides what the "model" answers,
//! how fast, and how it fails. It records every request it receives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tripwire::runtime::Tasks;

/// What the mock upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One step of a scripted body.
#[derive(Debug, Clone)]
pub enum Step {
    /// Wait, then continue.
    Sleep(Duration),
    /// Send these bytes as one frame.
    Chunk(Bytes),
    /// Fail the body (the connection is reset mid-response).
    Fail,
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Script {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    /// Delay before the headers.
    pub delay: Duration,
    pub steps: Vec<Step>,
}

impl Script {
    pub fn json(body: &'static [u8]) -> Script {
        Script {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "application/json".into())],
            delay: Duration::ZERO,
            steps: vec![Step::Chunk(Bytes::from_static(body))],
        }
    }

    pub fn sse(chunks: &[&'static [u8]], gap: Duration) -> Script {
        let mut steps = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 && !gap.is_zero() {
                steps.push(Step::Sleep(gap));
            }
            steps.push(Step::Chunk(Bytes::from_static(chunk)));
        }
        Script {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            delay: Duration::ZERO,
            steps,
        }
    }
}

type Responder = Arc<dyn Fn(&Received) -> Script + Send + Sync>;

/// The running mock.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Set when a scripted body could not be delivered because the peer went away.
    pub peer_gone: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    tasks: Tasks,
}

impl MockUpstream {
    pub async fn start(
        respond: impl Fn(&Received) -> Script + Send + Sync + 'static,
    ) -> MockUpstream {
        let respond: Responder = Arc::new(respond);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let peer_gone = Arc::new(tokio::sync::Notify::new());
        let stop = CancellationToken::new();
        let tasks = Tasks::new();
        let handler_received = Arc::clone(&received);
        let handler_gone = Arc::clone(&peer_gone);
        let body_tasks = tasks.clone();
        tasks.spawn(
            "mock-accept",
            tripwire::app::listener::accept_loop(
                listener,
                tasks.child(),
                stop.clone(),
                move |_peer, req| {
                    let respond = Arc::clone(&respond);
                    let received = Arc::clone(&handler_received);
                    let gone = Arc::clone(&handler_gone);
                    let body_tasks = body_tasks.clone();
                    async move {
                        Ok::<_, Infallible>(serve(req, respond, received, gone, body_tasks).await)
                    }
                },
            ),
        );
        MockUpstream {
            addr,
            received,
            peer_gone,
            stop,
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _stopped = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

type MockBody =
    StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::io::Error>>>;

async fn serve(
    req: Request<Incoming>,
    respond: Responder,
    received: Arc<Mutex<Vec<Received>>>,
    gone: Arc<tokio::sync::Notify>,
    tasks: Tasks,
) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let request = Received {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    };
    let script = respond(&request);
    received.lock().unwrap().push(request);
    tokio::time::sleep(script.delay).await;
    let (tx, rx) = mpsc::channel(1);
    tasks.spawn("mock-body", async move {
        for step in script.steps {
            match step {
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Chunk(bytes) => {
                    if tx.send(Ok(Frame::data(bytes))).await.is_err() {
                        gone.notify_one();
                        return;
                    }
                }
                Step::Fail => {
                    let _closed = tx
                        .send(Err(std::io::Error::other("scripted upstream failure")))
                        .await;
                    return;
                }
            }
        }
    });
    let mut response = Response::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *response.status_mut() = script.status;
    for (k, v) in script.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    response
}
