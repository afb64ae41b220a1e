//! A test OTLP/HTTP collector: takes `POST /v1/traces` (protobuf), decodes
//! the spans with `opentelemetry-proto` and keeps them for assertions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::env::wait_for;

/// One received span, its ids in lower-case hex as in a `traceparent`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The trace it belongs to.
    pub trace_id: String,
    /// Its own id.
    pub span_id: String,
    /// Its parent's id; empty for a root span.
    pub parent_span_id: String,
    /// Its name, e.g. `process audio-in`.
    pub name: String,
    /// `internal`, `server`, `client`, `producer` or `consumer`.
    pub kind: &'static str,
    /// Its attributes, each value rendered as text.
    pub attributes: BTreeMap<String, String>,
    /// Whether its status is an error.
    pub failed: bool,
    /// `service.name` of the resource that sent it.
    pub service: String,
}

impl ReceivedSpan {
    /// The attribute `key`, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

/// The collector, on a free loopback port; stops when dropped.
pub struct OtlpReceiver {
    address: std::net::SocketAddr,
    spans: Received,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Starts the collector on the current runtime.
    pub async fn start() -> Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP receiver")?;
        let address = listener.local_addr()?;
        let spans = Received::default();
        let (stop, mut stopped) = oneshot::channel();
        let received = Arc::clone(&spans);
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let received = Arc::clone(&received);
                let service = service_fn(move |request| receive(Arc::clone(&received), request));
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Ok(OtlpReceiver {
            address,
            spans,
            _stop: stop,
        })
    }

    /// The collector's base URL, as `telemetry.otlp_endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("not poisoned").clone()
    }

    /// Waits until the spans received so far satisfy `done`, and returns them.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>> {
        wait_for(what, timeout, || {
            let spans = self.spans();
            let result = done(&spans).then_some(spans);
            async move { Ok(result) }
        })
        .await
    }
}

async fn receive(
    received: Received,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    if request.uri().path() != "/v1/traces" {
        return Ok(answer(StatusCode::NOT_FOUND, Bytes::new()));
    }
    let body = request.into_body().collect().await?.to_bytes();
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return Ok(answer(StatusCode::BAD_REQUEST, Bytes::new()));
    };
    let mut spans = Vec::new();
    for resource_spans in export.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.name")
            .and_then(|attribute| attribute.value.as_ref().and_then(|value| value.value.as_ref()))
            .map(text)
            .unwrap_or_default();
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            spans.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                kind: match span.kind {
                    1 => "internal",
                    2 => "server",
                    3 => "client",
                    4 => "producer",
                    5 => "consumer",
                    _ => "unspecified",
                },
                name: span.name,
                attributes: span
                    .attributes
                    .into_iter()
                    .filter_map(|attribute| {
                        let value = attribute.value?.value?;
                        Some((attribute.key, text(&value)))
                    })
                    .collect(),
                // Status code 2 is ERROR.
                failed: span.status.is_some_and(|status| status.code == 2),
                service: service.clone(),
            });
        }
    }
    received.lock().expect("not poisoned").extend(spans);
    let response = ExportTraceServiceResponse::default().encode_to_vec();
    Ok(answer(StatusCode::OK, response.into()))
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}

fn text(value: &Value) -> String {
    match value {
        Value::StringValue(text) => text.clone(),
        Value::BoolValue(flag) => flag.to_string(),
        Value::IntValue(number) => number.to_string(),
        Value::DoubleValue(number) => number.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
