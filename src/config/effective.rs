//! The effective configuration, as `check-config` prints it: TOML that loads back to the same settings.

use super::*;

impl Settings {
    /// The effective configuration as TOML, with credentials in URLs redacted.
    pub fn effective_toml(&self) -> String {
        let short = |name: &str| name.rsplit('/').next().unwrap_or(name).to_string();
        let raw = RawSettings {
            pubsub: RawPubsub {
                project: self.pubsub.project.clone(),
                subscription: self.pubsub.subscription.clone(),
                topic: self.pubsub.topic.clone().unwrap_or_default(),
                stored_topic: self.pubsub.stored_topic.clone(),
                dead_letter_topic: self.pubsub.dead_letter_topic.clone().unwrap_or_default(),
                dead_letter_subscription: self
                    .pubsub
                    .dead_letter_subscription
                    .as_deref()
                    .map(short)
                    .unwrap_or_default(),
                max_delivery_attempts: self.pubsub.max_delivery_attempts.into(),
                ack_deadline: humantime::format_duration(self.pubsub.ack_deadline).to_string(),
                redelivery_min_backoff: humantime::format_duration(self.pubsub.redelivery_min_backoff)
                    .to_string(),
                redelivery_max_backoff: humantime::format_duration(self.pubsub.redelivery_max_backoff)
                    .to_string(),
                endpoint: self.pubsub.endpoint.redacted(),
                event_source: self.pubsub.event_source.clone(),
                event_type: self.pubsub.event_type.clone(),
            },
            storage: RawStorage {
                bucket: self.storage.bucket.clone(),
                layout: self.storage.layout.template().to_string(),
                staging_buckets: self.storage.staging_buckets.clone(),
                endpoint: self.storage.endpoint.redacted(),
                storage_class: self.storage.storage_class.unwrap_or_default().to_string(),
                lifecycle: self
                    .storage
                    .lifecycle
                    .iter()
                    .map(|rule| {
                        let (action, storage_class) = match rule.action {
                            LifecycleAction::Delete => ("delete", ""),
                            LifecycleAction::SetStorageClass(class) => ("set_storage_class", class),
                        };
                        RawLifecycleRule {
                            age_days: i64::from(rule.age_days),
                            action: action.into(),
                            storage_class: storage_class.into(),
                            matches_prefix: rule.matches_prefix.clone(),
                        }
                    })
                    .collect(),
            },
            sources: RawSources {
                local_roots: self
                    .sources
                    .local_roots
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            },
            worker: RawWorker {
                concurrency: self.worker.concurrency as i64,
                shutdown_grace: humantime::format_duration(self.worker.shutdown_grace).to_string(),
            },
            retry: RawRetry {
                max_attempts: self.retry.max_attempts.into(),
                initial_backoff: humantime::format_duration(self.retry.initial_backoff).to_string(),
                max_backoff: humantime::format_duration(self.retry.max_backoff).to_string(),
            },
            http: RawHttp {
                listen: self.http.listen.to_string(),
            },
            log: RawLog {
                format: match self.log.format {
                    LogFormat::Json => "json".into(),
                    LogFormat::Pretty => "pretty".into(),
                },
                level: self.log.level.clone(),
            },
            telemetry: RawTelemetry {
                otlp_endpoint: self
                    .telemetry
                    .otlp_traces
                    .as_ref()
                    .map(|url| checks::redacted_url(url.as_str()))
                    .unwrap_or_default(),
                sample_ratio: self.telemetry.sample_ratio,
            },
        };
        let mut text = toml::to_string(&raw).unwrap_or_else(|error| format!("# cannot render: {error}\n"));
        if self.storage.layout.is_dated() {
            text.push_str(DATED_LAYOUT_NOTE);
        }
        text
    }
}

/// What `check-config` says about a layout with `{yyyy}` `{mm}` `{dd}`.
const DATED_LAYOUT_NOTE: &str = "\
# note: storage.layout is dated. Redeliveries and replays keep the original publish date,
# but a producer that publishes the same id again on another day (a new message, not a
# redelivery) gets a second object set under the new date.
";
