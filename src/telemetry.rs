//! Telemetry: structured logs through `tracing`, JSON lines by default.

use crate::config::{LogFormat, LogSettings};
use tracing_subscriber::EnvFilter;

/// Targets kept quiet whatever `log.level` says: the SDKs' request logging can
/// carry request bodies (file contents, credentials), and the transport
/// crates' debug output is noise.
const QUIET_TARGETS: [&str; 8] = [
    "experimental.client.request=off",
    "experimental.transport.request=off",
    "google_cloud_gax_internal=info",
    "google_cloud_storage=info",
    "google_cloud_pubsub=info",
    "hyper=info",
    "h2=info",
    "tonic=info",
];

/// Installs the global subscriber: `log.format` and `log.level`, to stderr.
///
/// `RUST_LOG`, when set, replaces `log.level`.
pub fn init(settings: &LogSettings) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.level.clone());
    let mut filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new(&settings.level));
    for directive in QUIET_TARGETS {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quiet_target_is_a_valid_directive() {
        for directive in QUIET_TARGETS {
            assert!(
                directive.parse::<tracing_subscriber::filter::Directive>().is_ok(),
                "{directive}"
            );
        }
    }
}
