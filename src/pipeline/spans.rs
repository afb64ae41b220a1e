//! The spans of one message's work, named and attributed per the
//! OpenTelemetry messaging conventions: `process <subscription>` (consumer)
//! with a child per source check, upload or copy, the event's `send <topic>`
//! (producer) and the `ack <subscription>`. Attributes that only the trace
//! needs are set on the OpenTelemetry span alone, so log lines keep their
//! fields; without span export they cost nothing.

use crate::envelope::Envelope;
use crate::error::Failure;
use crate::layout::Kind;
use opentelemetry::trace::Status;
use std::future::Future;
use tracing::{Instrument as _, Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const SYSTEM: &str = "gcp_pubsub";

/// The last part of `projects/P/topics/T` or `projects/P/subscriptions/S`.
fn short(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The messaging attributes every Pub/Sub span has.
fn messaging(span: &Span, operation_type: &'static str, operation_name: &'static str) {
    span.set_attribute("messaging.system", SYSTEM);
    span.set_attribute("messaging.operation.type", operation_type);
    span.set_attribute("messaging.operation.name", operation_name);
}

/// The span of one delivered message.
pub(super) fn message(envelope: &Envelope, project: &str, subscription: &str) -> Span {
    let subscription = short(subscription);
    let span = tracing::info_span!(
        "message",
        message_id = %envelope.message_id,
        audio_id = field::Empty,
        delivery_attempt = envelope.delivery_attempt,
        otel.name = format!("process {subscription}"),
        otel.kind = "consumer",
    );
    messaging(&span, "process", "process");
    span.set_attribute("messaging.destination.name", subscription.to_string());
    span.set_attribute(
        "messaging.destination.subscription.name",
        subscription.to_string(),
    );
    span.set_attribute("messaging.message.id", envelope.message_id.clone());
    if let Some(attempt) = envelope.delivery_attempt {
        span.set_attribute(
            "messaging.gcp_pubsub.message.delivery_attempt",
            i64::from(attempt),
        );
    }
    span.set_attribute("gcp.project_id", project.to_string());
    span
}

/// Checking one source: allowed, present, probed.
pub(super) fn check(kind: Kind) -> Span {
    tracing::info_span!(
        "check",
        kind = kind.as_str(),
        otel.name = format!("check {}", kind.as_str())
    )
}

/// Writing one file to the archive: `upload` from the spool, `copy` from staging.
pub(super) fn store(kind: Kind, operation: &'static str, object: &str) -> Span {
    let span = tracing::info_span!(
        "store",
        kind = kind.as_str(),
        otel.name = format!("{operation} {}", kind.as_str()),
        otel.kind = "client",
    );
    span.set_attribute("audio_store.object", object.to_string());
    span
}

/// Publishing to `topic` (the stored event or a dead letter).
pub(super) fn send(topic: &str) -> Span {
    let topic = short(topic);
    let span = tracing::info_span!(
        "send",
        otel.name = format!("send {topic}"),
        otel.kind = "producer"
    );
    messaging(&span, "send", "send");
    span.set_attribute("messaging.destination.name", topic.to_string());
    span
}

/// Acknowledging the message.
pub(super) fn ack(subscription: &str) -> Span {
    let subscription = short(subscription);
    let span = tracing::info_span!(
        "ack",
        otel.name = format!("ack {subscription}"),
        otel.kind = "client"
    );
    messaging(&span, "settle", "ack");
    span.set_attribute(
        "messaging.destination.subscription.name",
        subscription.to_string(),
    );
    span
}

/// Marks `span` failed with the failure's kind as `error.type`.
pub(super) fn failed(span: &Span, failure: &Failure) {
    span.set_attribute("error.type", failure.kind().as_str());
    span.set_status(Status::error(failure.message().to_string()));
}

/// Runs `work` in `span`, marking the span failed if the work fails.
pub(super) async fn traced<T>(
    span: Span,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let result = work.instrument(span.clone()).await;
    if let Err(failure) = &result {
        failed(&span, failure);
    }
    result
}
