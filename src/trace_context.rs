//! W3C trace context in Pub/Sub attributes: read from the input message,
//! written onto the stored event and the dead-letter copies.
//!
//! The Pub/Sub client libraries (Python, Go, Java, Node) carry it as
//! `googclient_traceparent` / `googclient_tracestate`; a plain `traceparent`
//! (some hand-written producers) is read too. The W3C format itself is the
//! OpenTelemetry SDK's [`TraceContextPropagator`]: malformed values are
//! ignored (the message starts a new trace).
//!
//! What goes out is the message span's context when spans are exported
//! ([`crate::telemetry`]), so the next stage's span is its child. Without
//! export the worker has no spans of its own and passes the input's context
//! on unchanged: the next stage continues the producer's trace, and the
//! sampling decision is the producer's.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The prefix of the Pub/Sub client libraries' OpenTelemetry attributes.
pub const PUBSUB_PREFIX: &str = "googclient_";
/// `googclient_traceparent`: where the worker writes its span context.
pub const TRACEPARENT: &str = "googclient_traceparent";
/// `googclient_tracestate`: the vendor part of the trace context.
pub const TRACESTATE: &str = "googclient_tracestate";

/// The trace context a message arrived with.
///
/// Attributes with the `googclient_` prefix win; the plain W3C names are read
/// only when there is no valid `googclient_traceparent` (a malformed one does
/// not hide a valid `traceparent`), and the two are never mixed.
pub fn incoming(attributes: &HashMap<String, String>) -> opentelemetry::Context {
    let propagator = TraceContextPropagator::new();
    let googclient = propagator.extract(&Attributes {
        attributes,
        prefix: PUBSUB_PREFIX,
    });
    if googclient.span().span_context().is_valid() {
        return googclient;
    }
    propagator.extract(&Attributes {
        attributes,
        prefix: "",
    })
}

/// Makes `span` (not yet entered) a child of `parent` and returns the trace
/// context to send on: the span's own when spans are recorded, otherwise
/// `parent`'s as it came (empty when the message had none).
pub fn continue_in(span: &tracing::Span, parent: opentelemetry::Context) -> Propagated {
    // Fails only when no span layer is installed (no export): then `parent` goes on as it is.
    let _ = span.set_parent(parent.clone());
    let own = span.context();
    let (context, own_span) = if own.span().span_context().is_valid() {
        (own, true)
    } else {
        (parent, false)
    };
    let mut outgoing = Outgoing::default();
    TraceContextPropagator::new().inject_context(&context, &mut outgoing);
    Propagated {
        span_context: context.span().span_context().clone(),
        own_span,
        attributes: outgoing.attributes,
    }
}

/// The trace context a message's work passes on.
#[derive(Debug, Clone)]
pub struct Propagated {
    /// The context sent on (invalid when there is none).
    pub span_context: SpanContext,
    /// Whether it is the worker's own span (spans are recorded) or the input's.
    pub own_span: bool,
    /// `googclient_traceparent` and, when not empty, `googclient_tracestate`.
    pub attributes: Vec<(String, String)>,
}

impl Propagated {
    /// Sets the trace attributes on `attributes`, replacing any that came in.
    /// The worker's own context replaces both: a `googclient_tracestate` it
    /// does not send on (malformed, too long) does not stay beside its span.
    pub fn apply(&self, attributes: &mut HashMap<String, String>) {
        if self.own_span {
            attributes.remove(TRACESTATE);
        }
        for (key, value) in &self.attributes {
            attributes.insert(key.clone(), value.clone());
        }
    }
}

/// The message's attributes as W3C headers, under one prefix.
struct Attributes<'a> {
    attributes: &'a HashMap<String, String>,
    prefix: &'static str,
}

impl Extractor for Attributes<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.attributes
            .get(&format!("{}{key}", self.prefix))
            .map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.attributes
            .keys()
            .filter_map(|key| key.strip_prefix(self.prefix))
            .collect()
    }
}

/// The W3C headers to send, as `googclient_` attributes.
#[derive(Default)]
struct Outgoing {
    attributes: Vec<(String, String)>,
}

impl Injector for Outgoing {
    fn set(&mut self, key: &str, value: String) {
        // A trace state over Pub/Sub's attribute limit is not sent: the trace goes on without it.
        if !value.is_empty() && value.len() <= crate::envelope::MAX_ATTRIBUTE_BYTES {
            self.attributes.push((format!("{PUBSUB_PREFIX}{key}"), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn attributes(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn traceparent(flags: &str) -> String {
        format!("00-{TRACE}-{PARENT}-{flags}")
    }

    fn sent(propagated: &Propagated) -> HashMap<String, String> {
        propagated.attributes.iter().cloned().collect()
    }

    #[test]
    fn without_span_export_the_input_context_passes_through_unchanged() {
        let input = attributes(&[(TRACEPARENT, &traceparent("01")), (TRACESTATE, "vendor=abc")]);
        let propagated = continue_in(&tracing::Span::none(), incoming(&input));
        assert!(!propagated.own_span);
        assert_eq!(sent(&propagated), input);
    }

    #[test]
    fn a_plain_traceparent_is_read_and_sent_on_as_googclient() {
        let input = attributes(&[("traceparent", &traceparent("00"))]);
        let propagated = continue_in(&tracing::Span::none(), incoming(&input));
        assert_eq!(
            sent(&propagated),
            attributes(&[(TRACEPARENT, &traceparent("00"))])
        );
    }

    #[test]
    fn the_googclient_context_wins_and_the_two_are_never_mixed() {
        let other = "00-11111111111111111111111111111111-2222222222222222-01";
        let input = attributes(&[
            (TRACEPARENT, &traceparent("01")),
            ("traceparent", other),
            ("tracestate", "plain=1"),
        ]);
        let propagated = continue_in(&tracing::Span::none(), incoming(&input));
        assert_eq!(
            sent(&propagated),
            attributes(&[(TRACEPARENT, &traceparent("01"))])
        );
    }

    #[test]
    fn an_invalid_googclient_traceparent_does_not_hide_a_valid_plain_one() {
        let plain = "00-11111111111111111111111111111111-2222222222222222-01";
        let input = attributes(&[
            (TRACEPARENT, &traceparent("01").to_uppercase()),
            ("traceparent", plain),
            ("tracestate", "plain=1"),
        ]);
        let propagated = continue_in(&tracing::Span::none(), incoming(&input));
        assert_eq!(
            sent(&propagated),
            attributes(&[(TRACEPARENT, plain), (TRACESTATE, "plain=1")])
        );
    }

    #[test]
    fn the_worker_span_on_a_copy_replaces_a_trace_state_that_it_does_not_send_on() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let input = attributes(&[(TRACEPARENT, &traceparent("01")), (TRACESTATE, "a=b=c")]);
            let span = tracing::info_span!("message");
            let propagated = continue_in(&span, incoming(&input));
            assert!(propagated.own_span);
            let mut copy = input.clone();
            propagated.apply(&mut copy);
            assert_eq!(copy, sent(&propagated), "the worker's context alone");
        });
    }

    #[test]
    fn a_malformed_or_missing_context_sends_nothing() {
        for input in [
            attributes(&[]),
            attributes(&[(TRACEPARENT, "00-zz-yy-01")]),
            attributes(&[(TRACEPARENT, &format!("00-{}-{PARENT}-01", "0".repeat(32)))]),
        ] {
            let propagated = continue_in(&tracing::Span::none(), incoming(&input));
            assert!(propagated.attributes.is_empty(), "{input:?}: {propagated:?}");
            assert!(!propagated.span_context.is_valid());
        }
    }

    #[test]
    fn with_span_export_the_worker_span_is_a_child_that_keeps_the_trace_and_the_decision() {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)))
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            for flags in ["01", "00"] {
                let input = attributes(&[(TRACEPARENT, &traceparent(flags)), (TRACESTATE, "v=1")]);
                let span = tracing::info_span!("message");
                let propagated = continue_in(&span, incoming(&input));
                assert!(propagated.own_span);
                let sent = sent(&propagated);
                let parts: Vec<&str> = sent[TRACEPARENT].split('-').collect();
                assert_eq!(parts[1], TRACE, "the same trace");
                assert_ne!(parts[2], PARENT, "the worker's own span");
                assert_eq!(parts[3], flags, "the parent's sampling decision");
                assert_eq!(sent[TRACESTATE], "v=1");
            }
        });
    }
}
