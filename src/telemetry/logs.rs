//! JSON log lines: one object per event, with the fields of every span it
//! happened in, and the trace it belongs to in the fields Cloud Logging links
//! to traces (`logging.googleapis.com/trace`, `…/spanId`, `…/trace_sampled`).

use opentelemetry::trace::SpanContext;
use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::registry::LookupSpan;

/// What the log lines show: the events `directives` (a validated filter),
/// [`super::QUIET_TARGETS`] and [`super::QUIET_UNLESS_NAMED`] let through, inside every span of the worker
/// whatever the level, so that a WARN line of a message still says which
/// message it is and which trace it belongs to (with `log.level = "warn"` the
/// INFO message span would otherwise be gone from it).
pub(super) fn filter<S: Subscriber + for<'a> LookupSpan<'a>>(directives: &str) -> impl Filter<S> + use<S> {
    let mut filter = EnvFilter::new(directives);
    for directive in super::QUIET_TARGETS {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
    for (target, directive) in super::QUIET_UNLESS_NAMED {
        if !directives.contains(target) {
            filter = filter.add_directive(directive.parse().expect("a valid directive"));
        }
    }
    // Decided once per callsite (from static metadata), so it costs nothing per event.
    let worker_spans = filter_fn(|metadata| {
        metadata.is_span()
            && *metadata.level() <= tracing::Level::INFO
            && metadata.target().starts_with("audio_store")
    })
    .with_max_level_hint(tracing::Level::INFO);
    filter.or(worker_spans)
}

/// The trace of a span's logs, kept in the span's extensions.
#[derive(Debug, Clone)]
struct LogTrace {
    trace_id: String,
    /// Absent when the worker records no span of its own (export off).
    span_id: Option<String>,
    sampled: bool,
}

/// Marks the logs of `span` (and of the spans inside it) with `context`'s
/// trace; `own_span` says whether the context's span id is `span`'s own.
pub fn link(span: &tracing::Span, context: &SpanContext, own_span: bool) {
    if !context.is_valid() {
        return;
    }
    let trace = LogTrace {
        trace_id: context.trace_id().to_string(),
        span_id: own_span.then(|| context.span_id().to_string()),
        sampled: context.is_sampled(),
    };
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>();
        if let Some(data) = registry.and_then(|registry| registry.span(id)) {
            data.extensions_mut().replace(trace);
        }
    });
}

/// The JSON line format: `timestamp`, `level`, `target`, the event's fields
/// (its text as `message`), `span` (the fields of every enclosing span, inner
/// ones winning, and the innermost span's `name`), and when the work is traced
/// `trace_id`, `span_id` and the Cloud Logging trace fields for `project`.
pub(super) struct JsonLines {
    pub(super) project: String,
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), jiff::Timestamp::now().to_string().into());
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        event.record(&mut Fields(&mut line));
        if let Some(scope) = context.event_scope() {
            let mut fields = Map::new();
            let mut trace = None;
            let mut name = "";
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(formatted) = extensions.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(own)) = serde_json::from_str::<Value>(formatted)
                {
                    // `otel.*` fields name the exported span; they say nothing new in a log.
                    fields.extend(own.into_iter().filter(|(key, _)| !key.starts_with("otel.")));
                }
                if let Some(found) = extensions.get::<LogTrace>() {
                    trace = Some(found.clone());
                }
                name = span.name();
            }
            fields.insert("name".into(), name.into());
            line.insert("span".into(), Value::Object(fields));
            if let Some(trace) = trace {
                self.insert_trace(&mut line, trace);
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

impl JsonLines {
    fn insert_trace(&self, line: &mut Map<String, Value>, trace: LogTrace) {
        if !self.project.is_empty() {
            let name = format!("projects/{}/traces/{}", self.project, trace.trace_id);
            line.insert("logging.googleapis.com/trace".into(), name.into());
            if let Some(span_id) = &trace.span_id {
                line.insert("logging.googleapis.com/spanId".into(), span_id.clone().into());
            }
            line.insert(
                "logging.googleapis.com/trace_sampled".into(),
                trace.sampled.into(),
            );
        }
        line.insert("trace_id".into(), trace.trace_id.into());
        if let Some(span_id) = trace.span_id {
            line.insert("span_id".into(), span_id.into());
        }
    }
}

/// An event's fields as JSON values.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    use std::sync::{Arc, Mutex};

    /// Collects what the formatter writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(project: &str, body: impl FnOnce()) -> Vec<Value> {
        logged_at("trace", project, body)
    }

    fn logged_at(directives: &str, project: &str, body: impl FnOnce()) -> Vec<Value> {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let lines = Lines::default();
        let writer = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines {
                project: project.into(),
            })
            .with_writer(move || writer.clone())
            .with_filter(filter(directives));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), body);
        let text = String::from_utf8(lines.0.lock().expect("not poisoned").clone()).expect("UTF-8");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }

    fn context() -> SpanContext {
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex"),
            SpanId::from_hex("00f067aa0ba902b7").expect("hex"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn a_line_has_the_event_the_fields_of_every_enclosing_span_and_its_trace() {
        let lines = logged("demo", || {
            let message = tracing::info_span!("message", message_id = "m-1", otel.name = "process s");
            link(&message, &context(), true);
            let _message = message.enter();
            let _upload = tracing::info_span!("upload", kind = "audio").entered();
            tracing::warn!(attempt = 2, "retrying");
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["message"], "retrying");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["span"]["message_id"], "m-1");
        assert_eq!(line["span"]["kind"], "audio");
        assert_eq!(line["span"]["name"], "upload");
        assert!(line["span"].get("otel.name").is_none(), "{line}");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span_id"], "00f067aa0ba902b7");
        assert_eq!(
            line["logging.googleapis.com/trace"],
            "projects/demo/traces/4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(line["logging.googleapis.com/spanId"], "00f067aa0ba902b7");
        assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
    }

    #[test]
    fn at_level_warn_a_warning_still_names_its_message_and_trace() {
        let lines = logged_at("warn", "demo", || {
            let message = tracing::info_span!("message", message_id = "m-2");
            link(&message, &context(), true);
            let _message = message.enter();
            tracing::info!("not shown");
            tracing::warn!("dead-lettered");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["message"], "dead-lettered");
        assert_eq!(lines[0]["span"]["message_id"], "m-2");
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn symphonia_is_quiet_unless_the_level_names_it() {
        let body = || tracing::error!(target: "symphonia_core::formats::probe", "probe reached EOF");
        assert!(logged_at("info", "demo", body).is_empty());
        let named = logged_at("info,symphonia_core=error", "demo", body);
        assert_eq!(named.len(), 1, "{named:?}");
        assert_eq!(named[0]["message"], "probe reached EOF");
    }

    #[test]
    fn a_passed_through_trace_has_no_span_id_and_untraced_work_no_trace_fields() {
        let lines = logged("", || {
            let traced = tracing::info_span!("message");
            link(&traced, &context(), false);
            traced.in_scope(|| tracing::info!("traced"));
            tracing::info_span!("message").in_scope(|| tracing::info!("untraced"));
            tracing::info!("outside");
        });
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(lines[0].get("span_id").is_none(), "{}", lines[0]);
        assert!(
            lines[0].get("logging.googleapis.com/trace").is_none(),
            "no project"
        );
        for line in &lines[1..] {
            assert!(line.get("trace_id").is_none(), "{line}");
        }
        assert!(lines[2].get("span").is_none(), "{}", lines[2]);
    }
}
