//! Telemetry: structured logs through `tracing`, JSON lines by default.

use crate::config::{LogFormat, LogSettings};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: `log.format` and `log.level`, to stderr.
///
/// `RUST_LOG`, when set, replaces `log.level`.
pub fn init(settings: &LogSettings) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.level.clone());
    let filter = EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| EnvFilter::new(&settings.level))
        // The SDKs log whole request bodies at debug; never let file contents reach the logs.
        .add_directive(
            "google_cloud_gax_internal=info"
                .parse()
                .expect("a valid directive"),
        )
        .add_directive("google_cloud_storage=info".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
    };
}
