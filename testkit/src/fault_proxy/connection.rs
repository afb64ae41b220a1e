//! One client connection: hyper's HTTP/1.1 server in front, a hyper client
//! connection to the upstream behind, and the faults applied to each request
//! in between.
//!
//! A reset is a tripwire: whoever fires it (the request body part-way, the
//! handler when a response begins) then waits forever, and the tasks that own
//! the client and the upstream connection take their sockets back from hyper
//! and close them with `SO_LINGER` 0, which sends an RST.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::faults::Plan;
use super::{Recorded, Shared, lock, upload};

/// What a body's or a service's error is.
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends, either way.
pub(super) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Before answering a request with an injected error, the proxy reads and
/// discards its body for up to this long, so that closing the connection
/// after the answer does not reset it before the client read the answer.
const LINGER: Duration = Duration::from_secs(2);

/// Accepts connections until `stop` fires or its sender is dropped.
pub(super) async fn accept(shared: Arc<Shared>, listener: TcpListener, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(Arc::clone(&shared), stream));
                }
                Err(error) => {
                    shared.log(&format!("accept failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// One client connection, shared by its requests (which come one at a time).
pub(super) struct Connection {
    pub(super) shared: Arc<Shared>,
    /// Fired to reset the client connection and the upstream one.
    wire: watch::Sender<bool>,
    /// Set when the request under way reached the upstream completely and its
    /// connections are to be reset when the response begins.
    pub(super) lose_response: AtomicBool,
    /// The upstream connection while it is open and no request uses it.
    upstream: std::sync::Mutex<Option<SendRequest<Body>>>,
}

impl Connection {
    /// Resets both connections (once): see the module doc.
    pub(super) fn reset(&self, what: &str) {
        if !self.wire.send_replace(true) {
            self.shared.stats().resets += 1;
            self.shared.log(&format!("resetting {what}"));
        }
    }

    /// An open upstream connection: the idle one, or a new one.
    async fn upstream(&self) -> Result<SendRequest<Body>, BoxError> {
        if let Some(sender) = lock(&self.upstream).take().filter(|sender| !sender.is_closed()) {
            return Ok(sender);
        }
        let stream = TcpStream::connect(&self.shared.upstream).await?;
        stream.set_nodelay(true)?;
        let (sender, mut connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let mut wire = self.wire.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = wire.wait_for(|&reset| reset) => {}
                _ = &mut connection => {}
            }
            if *wire.borrow() {
                reset(connection.into_parts().io.into_inner());
            }
        });
        Ok(sender)
    }
}

/// Serves one client connection until it closes or is reset.
async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let connection = Arc::new(Connection {
        shared,
        wire: watch::Sender::new(false),
        lose_response: AtomicBool::new(false),
        upstream: std::sync::Mutex::new(None),
    });
    let mut wire = connection.wire.subscribe();
    let service = {
        let connection = Arc::clone(&connection);
        service_fn(move |request| handle(Arc::clone(&connection), request))
    };
    let mut served =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let ended = tokio::select! {
        biased;
        _ = wire.wait_for(|&reset| reset) => None,
        ended = &mut served => Some(ended),
    };
    match ended {
        None => reset(served.into_parts().io.into_inner()),
        Some(Err(error)) => connection
            .shared
            .log(&format!("the client connection failed: {error:?}")),
        Some(Ok(())) => {}
    }
}

/// Closes `stream` with an RST.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Answers one request; once the connection is reset, never.
async fn handle(connection: Arc<Connection>, request: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    let answer = respond(&connection, request).await;
    if answer.is_err() && *connection.wire.borrow() {
        // The task serving the connection resets it now.
        return std::future::pending().await;
    }
    answer
}

async fn respond(
    connection: &Arc<Connection>,
    request: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let shared = &connection.shared;
    shared.stats().requests += 1;
    let line = format!("{} {}", request.method(), request.uri());
    let length = request.body().size_hint().exact();
    let plan = shared.faults().plan(&line, length);
    let (delay, reset) = match plan {
        Plan::Fail(status) => {
            shared.stats().failed += 1;
            shared.log(&format!("answering {status} to {line}"));
            return Ok(refuse(request, status).await);
        }
        Plan::Forward { delay, reset } => (delay, reset),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (parts, body) = request.into_parts();
    if let Some(correction) = shared.resumable_status.get()
        && let Some(answer) = correction.answer(&parts)
    {
        if reset.is_some() {
            connection.reset(&line);
            return Err("reset instead of answering a status query".into());
        }
        return Ok(answer);
    }
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    let policies = shared.bucket_policies.get();
    let record = lock(&shared.recording)
        .needles
        .iter()
        .any(|needle| line.contains(needle));
    let mut body = body.map_err(BoxError::from).boxed_unsync();
    let mut seen = None;
    if record || policies.is_some_and(|policies| policies.reads_body(&method, &uri)) {
        let bytes = body.collect().await?.to_bytes();
        if record {
            lock(&shared.recording).recorded.push(Recorded {
                method: method.clone(),
                path: uri.path().to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or_default(),
            });
        }
        body = full(bytes.clone());
        seen = Some(bytes);
    }
    let body = upload::upstream(Arc::clone(connection), body, length, reset, &line);
    let mut upstream = match connection.upstream().await {
        Ok(upstream) => upstream,
        Err(error) => {
            connection.reset(&format!("the client: cannot connect upstream ({error})"));
            return Err(error);
        }
    };
    upstream.ready().await?;
    let response = upstream
        .send_request(Request::from_parts(parts, body))
        .await?
        .map(|body| body.map_err(BoxError::from).boxed_unsync());
    *lock(&connection.upstream) = Some(upstream);
    let mut response = match shared.resumable_status.get() {
        Some(correction) => correction.observe(&method, &uri, response).await?,
        None => response,
    };
    if let Some(policies) = policies {
        response = policies.observe(&method, &uri, seen.as_ref(), response).await?;
    }
    if connection.lose_response.load(Ordering::SeqCst) {
        connection.reset(&format!("{line} as its response begins (the response is lost)"));
        return Err("the response is lost".into());
    }
    Ok(response)
}

/// An injected error answer to `request`, after reading its body (see [`LINGER`]).
async fn refuse(request: Request<Incoming>, status: StatusCode) -> Response<Body> {
    let mut body = request.into_body();
    let _ = tokio::time::timeout(LINGER, async { while let Some(Ok(_)) = body.frame().await {} }).await;
    // What the product reads of an error is `error.message`; retries go by the status.
    let code = status.as_u16();
    let json =
        format!(r#"{{"error":{{"code":{code},"message":"injected by the fault proxy: HTTP {code}"}}}}"#);
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json; charset=UTF-8")
        .header(CONNECTION, "close")
        .body(full(json))
        .expect("a status and headers that are valid")
}

/// A body of `bytes`.
pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
