//! Metrics: Prometheus counters, gauges and a histogram, labelled only from
//! the fixed outcome and error-kind sets.

use crate::error::ErrorKind;
use crate::outcome::Outcome;
use crate::source::KeptReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    error_kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The values of the `outcome` label.
const OUTCOMES: [&str; 4] = Outcome::LABELS;

/// The worker's metrics, shared by the loop, the pipeline and the HTTP endpoint.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages: Family<OutcomeLabels, Counter>,
    uploaded_bytes: Counter,
    processing: Histogram,
    in_flight: Gauge,
    retries: Family<KindLabels, Counter>,
    dead_lettered: Family<KindLabels, Counter>,
    sources_kept: Family<ReasonLabels, Counter>,
    pull_reconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `audio_store_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("audio_store");
        let messages = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "messages",
            "Messages by how they ended: stored, already_stored, dead_lettered, nacked",
            messages.clone(),
        );
        let uploaded_bytes = Counter::default();
        registry.register_with_unit(
            "uploaded",
            "Bytes written to the archive bucket",
            Unit::Bytes,
            uploaded_bytes.clone(),
        );
        let processing = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register_with_unit(
            "processing",
            "Time from receiving a message to settling it",
            Unit::Seconds,
            processing.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_messages",
            "Messages being processed now",
            in_flight.clone(),
        );
        let retries = Family::<KindLabels, Counter>::default();
        registry.register("retries", "In-process retries by error kind", retries.clone());
        let dead_lettered = Family::<KindLabels, Counter>::default();
        registry.register(
            "dead_lettered",
            "Messages published to the dead-letter topic, by error kind",
            dead_lettered.clone(),
        );
        let sources_kept = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "sources_kept",
            "Local sources stored but not removed because they were replaced or changed after they were read",
            sources_kept.clone(),
        );
        for reason in KeptReason::ALL {
            let _ = sources_kept.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        let pull_reconnects = Counter::default();
        registry.register(
            "pull_reconnects",
            "Streaming pulls reopened after they failed or ended",
            pull_reconnects.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans not delivered to the OTLP collector (export queue full or export failed)",
            crate::telemetry::spans_dropped().clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running version", build_info);
        // Every series exists from the start, at 0, so that rates and alerts work
        // before the first failure of a kind.
        for outcome in OUTCOMES {
            let _ = messages.get_or_create(&OutcomeLabels { outcome });
        }
        for kind in ErrorKind::ALL {
            let labels = KindLabels {
                error_kind: kind.as_str(),
            };
            if kind.is_permanent() {
                let _ = dead_lettered.get_or_create(&labels);
            } else {
                let _ = retries.get_or_create(&labels);
            }
        }
        Metrics {
            registry,
            messages,
            uploaded_bytes,
            processing,
            in_flight,
            retries,
            dead_lettered,
            sources_kept,
            pull_reconnects,
        }
    }

    /// Counts a local source that was stored but kept, and why.
    pub fn source_kept(&self, reason: KeptReason) {
        self.sources_kept
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Records how a message ended and how long it took.
    pub fn record(&self, outcome: &Outcome, elapsed: Duration) {
        self.messages
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        if let Outcome::DeadLettered(kind) = outcome {
            self.dead_lettered
                .get_or_create(&KindLabels {
                    error_kind: kind.as_str(),
                })
                .inc();
        }
        self.processing.observe(elapsed.as_secs_f64());
    }

    /// Counts one in-process retry.
    pub fn retried(&self, kind: ErrorKind) {
        self.retries
            .get_or_create(&KindLabels {
                error_kind: kind.as_str(),
            })
            .inc();
    }

    /// Counts one reopening of the streaming pull.
    pub fn pull_reconnected(&self) {
        self.pull_reconnects.inc();
    }

    /// How often the streaming pull was reopened.
    pub fn pull_reconnects(&self) -> u64 {
        self.pull_reconnects.get()
    }

    /// Counts bytes written to the archive.
    pub fn uploaded(&self, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
    }

    /// Marks a message as started; the guard marks it finished when dropped.
    pub fn start_message(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight { metrics: self }
    }

    /// How many messages ended with `outcome` (`stored`, `already_stored`, `dead_lettered`, `nacked`).
    pub fn messages(&self, outcome: &str) -> u64 {
        OUTCOMES
            .into_iter()
            .find(|known| *known == outcome)
            .map(|outcome| self.messages.get_or_create(&OutcomeLabels { outcome }).get())
            .unwrap_or(0)
    }

    /// How many in-process retries failures of `kind` caused.
    pub fn retries(&self, kind: ErrorKind) -> u64 {
        self.retries
            .get_or_create(&KindLabels {
                error_kind: kind.as_str(),
            })
            .get()
    }

    /// How many stored sources were kept for `reason`.
    pub fn sources_kept(&self, reason: KeptReason) -> u64 {
        self.sources_kept
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Keeps the in-flight gauge up while a message is processed.
#[derive(Debug)]
pub struct InFlight<'a> {
    metrics: &'a Metrics,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_kinds_are_counted_under_the_audio_store_prefix() {
        let metrics = Metrics::new();
        metrics.record(&Outcome::Stored, Duration::from_millis(20));
        metrics.record(
            &Outcome::DeadLettered(ErrorKind::BadContent),
            Duration::from_millis(5),
        );
        metrics.retried(ErrorKind::StorageUnavailable);
        metrics.uploaded(1234);
        let text = metrics.render();
        for line in [
            "audio_store_messages_total{outcome=\"stored\"} 1",
            "audio_store_messages_total{outcome=\"dead_lettered\"} 1",
            "audio_store_dead_lettered_total{error_kind=\"bad_content\"} 1",
            "audio_store_retries_total{error_kind=\"storage_unavailable\"} 1",
            "audio_store_uploaded_bytes_total 1234",
            "audio_store_processing_seconds_count 2",
            "audio_store_in_flight_messages 0",
            "audio_store_pull_reconnects_total 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("audio_store_build_info{version="), "{text}");
        assert!(text.contains("\naudio_store_spans_dropped_total "), "{text}");
        assert_eq!(metrics.messages("stored"), 1);
        assert_eq!(metrics.messages("nacked"), 0);
    }

    #[test]
    fn every_outcome_and_kind_is_exported_at_zero_before_it_happens() {
        let text = Metrics::new().render();
        for outcome in OUTCOMES {
            let line = format!("audio_store_messages_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        for kind in ErrorKind::ALL {
            let family = if kind.is_permanent() {
                "dead_lettered"
            } else {
                "retries"
            };
            let line = format!("audio_store_{family}_total{{error_kind=\"{}\"}} 0", kind.as_str());
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn the_in_flight_gauge_follows_its_guard() {
        let metrics = Metrics::new();
        let guard = metrics.start_message();
        assert!(metrics.render().contains("audio_store_in_flight_messages 1"));
        drop(guard);
        assert!(metrics.render().contains("audio_store_in_flight_messages 0"));
    }
}
