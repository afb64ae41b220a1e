//! Telemetry: structured logs through `tracing` (JSON lines by default) and,
//! with `[telemetry] otlp_endpoint`, the worker's spans exported over OTLP.
//!
//! The files: this one (installing both), `logs.rs` (the JSON line format
//! with the trace fields), `export.rs` (the span queue and its export task).

mod export;
mod logs;

pub use export::spans_dropped;
pub use logs::link as link_logs;

use crate::config::{ConfigError, LogFormat, Settings};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanExporter as _};
use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Targets kept quiet whatever `log.level` says: the SDKs' request logging can
/// carry request bodies (file contents, credentials), and the transport
/// crates' debug output is noise.
pub(crate) const QUIET_TARGETS: [&str; 10] = [
    "experimental.client.request=off",
    "experimental.transport.request=off",
    "google_cloud_gax_internal=info",
    "google_cloud_storage=info",
    "google_cloud_pubsub=info",
    "hyper=info",
    "h2=info",
    "tonic=info",
    // The OpenTelemetry SDK's own diagnostics: export failures are logged (once) by `export`.
    "opentelemetry_sdk=error",
    "opentelemetry_otlp=error",
];

/// Targets kept quiet unless `log.level` names them: symphonia logs each file it
/// cannot read as an ERROR of its own, which the worker already reports (the
/// message is `bad_content`, with the reason) at the level it deserves.
pub(crate) const QUIET_UNLESS_NAMED: [(&str, &str); 1] = [("symphonia", "symphonia=off")];

/// Longest wait for the last spans at exit.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What runs while telemetry is on; [`Telemetry::shutdown`] sends the last spans.
#[derive(Debug)]
pub struct Telemetry {
    export: Option<(SdkTracerProvider, export::Flush)>,
}

impl Telemetry {
    /// Sends the spans still queued (at most a few seconds); call before exit.
    pub async fn shutdown(self) {
        if let Some((_provider, flush)) = self.export {
            flush.flush(FLUSH_TIMEOUT).await;
        }
    }
}

/// Installs the global subscriber: `log.format` and the filter in effect (`log.level`, or
/// `RUST_LOG` when it is set, see [`LogSettings`](crate::config::LogSettings)) to stderr,
/// and the span export when `telemetry.otlp_endpoint` is set. Must be called inside the runtime.
pub fn init(settings: &Settings) -> Result<Telemetry, ConfigError> {
    let log = &settings.log;
    let lines = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(logs::JsonLines {
                project: settings.pubsub.project.clone(),
            })
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .pretty()
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(logs::filter(&log.level));
    let (spans, export) = match &settings.telemetry.otlp_traces {
        None => (None, None),
        Some(url) => {
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(env!("CARGO_PKG_NAME"))
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build();
            let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url.as_str())
                .with_timeout(export::EXPORT_TIMEOUT)
                .build()
                .map_err(|error| ConfigError::new("telemetry.otlp_endpoint", error.to_string()))?;
            // The export task sends the spans; the resource goes with them, not through the queue.
            exporter.set_resource(&resource);
            let (queue, flush) = export::start(exporter);
            let provider = SdkTracerProvider::builder()
                .with_span_processor(queue)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    settings.telemetry.sample_ratio,
                ))))
                .with_resource(resource)
                .build();
            // Only the worker's own spans: the SDKs' request spans stay out of the trace.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
                .with_location(false)
                .with_threads(false)
                .with_filter(Targets::new().with_target("audio_store", Level::INFO));
            (Some(layer), Some((provider, flush)))
        }
    };
    let _ = tracing_subscriber::registry().with(lines).with(spans).try_init();
    Ok(Telemetry { export })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quiet_target_is_a_valid_directive() {
        let unless_named = QUIET_UNLESS_NAMED.map(|(_, directive)| directive);
        for directive in QUIET_TARGETS.iter().chain(&unless_named) {
            assert!(
                directive.parse::<tracing_subscriber::filter::Directive>().is_ok(),
                "{directive}"
            );
        }
    }
}
