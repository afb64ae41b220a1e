//! From the raw shapes to [`Settings`], each error naming its key (the checks of single values are in `checks.rs`).

use super::checks::*;
use super::*;

impl Settings {
    /// Loads the file (if any), applies environment overrides and validates.
    pub fn load(file: Option<&Path>, environment: &Environment) -> Result<Settings, ConfigError> {
        let raw = RawSettings::load(file, environment)?;
        Settings::validate(&raw, environment)
    }

    /// Checks every value of `raw` and converts it.
    pub fn validate(raw: &RawSettings, environment: &Environment) -> Result<Settings, ConfigError> {
        let project = required("pubsub.project", &raw.pubsub.project)?;
        check_resource_id("pubsub.project", &project)?;
        let subscription = full_name(
            "pubsub.subscription",
            &project,
            "subscriptions",
            &required("pubsub.subscription", &raw.pubsub.subscription)?,
        )?;
        let topic = optional(&raw.pubsub.topic)
            .map(|topic| full_name("pubsub.topic", &project, "topics", &topic))
            .transpose()?;
        let stored_topic = full_name(
            "pubsub.stored_topic",
            &project,
            "topics",
            &required("pubsub.stored_topic", &raw.pubsub.stored_topic)?,
        )?;
        let dead_letter_topic = optional(&raw.pubsub.dead_letter_topic)
            .map(|topic| full_name("pubsub.dead_letter_topic", &project, "topics", &topic))
            .transpose()?;
        // The subscription's own topic is unknown without a call; `pubsub.topic` is the input.
        if let Some(input) = &topic {
            for (key, output) in [
                ("pubsub.stored_topic", Some(&stored_topic)),
                ("pubsub.dead_letter_topic", dead_letter_topic.as_ref()),
            ] {
                if output == Some(input) {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "must not be the input topic pubsub.topic ({input}): the worker would read what it writes"
                        ),
                    ));
                }
            }
        }
        let dead_letter_subscription =
            match (&dead_letter_topic, optional(&raw.pubsub.dead_letter_subscription)) {
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        "pubsub.dead_letter_subscription",
                        "set, but pubsub.dead_letter_topic is empty",
                    ));
                }
                (None, None) => None,
                (Some(_), Some(name)) => Some(full_name(
                    "pubsub.dead_letter_subscription",
                    &project,
                    "subscriptions",
                    &name,
                )?),
                (Some(topic), None) => {
                    let short = topic.rsplit('/').next().unwrap_or(topic);
                    Some(full_name(
                        "pubsub.dead_letter_subscription",
                        &project,
                        "subscriptions",
                        &format!("{short}-sub"),
                    )?)
                }
            };
        let max_delivery_attempts = in_range(
            "pubsub.max_delivery_attempts",
            raw.pubsub.max_delivery_attempts,
            5,
            100,
        )? as i32;
        let ack_deadline = duration("pubsub.ack_deadline", &raw.pubsub.ack_deadline)?;
        if !(10..=600).contains(&ack_deadline.as_secs()) || ack_deadline.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "pubsub.ack_deadline",
                "must be whole seconds between 10s and 600s",
            ));
        }
        let redelivery_min_backoff = duration(
            "pubsub.redelivery_min_backoff",
            &raw.pubsub.redelivery_min_backoff,
        )?;
        let redelivery_max_backoff = duration(
            "pubsub.redelivery_max_backoff",
            &raw.pubsub.redelivery_max_backoff,
        )?;
        if redelivery_max_backoff > Duration::from_secs(600) {
            return Err(ConfigError::new(
                "pubsub.redelivery_max_backoff",
                "must be at most 600s",
            ));
        }
        if redelivery_min_backoff > redelivery_max_backoff {
            return Err(ConfigError::new(
                "pubsub.redelivery_min_backoff",
                "must not exceed pubsub.redelivery_max_backoff",
            ));
        }
        let event_source = match raw.pubsub.event_source.as_str() {
            "" => format!("//audio-store/{subscription}"),
            source => source.to_string(),
        };
        check_event_attribute("pubsub.event_source", &event_source)?;
        check_percent_escapes("pubsub.event_source", &event_source)?;
        let event_type = raw.pubsub.event_type.clone();
        check_event_attribute("pubsub.event_type", &event_type)?;
        let pubsub = PubsubSettings {
            event_source,
            event_type,
            endpoint: Endpoint::parse(
                "pubsub.endpoint",
                &raw.pubsub.endpoint,
                environment
                    .get("PUBSUB_EMULATOR_HOST")
                    .filter(|v| !v.is_empty())
                    .cloned(),
            )?,
            project,
            subscription,
            topic,
            stored_topic,
            dead_letter_topic,
            dead_letter_subscription,
            max_delivery_attempts,
            ack_deadline,
            redelivery_min_backoff,
            redelivery_max_backoff,
        };

        let bucket = required("storage.bucket", &raw.storage.bucket)?;
        check_bucket("storage.bucket", &bucket)?;
        for (index, staging) in raw.storage.staging_buckets.iter().enumerate() {
            check_bucket(&format!("storage.staging_buckets[{index}]"), staging)?;
        }
        if raw.storage.staging_buckets.contains(&bucket) {
            return Err(ConfigError::new(
                "storage.staging_buckets",
                format!(
                    "must not contain the archive bucket storage.bucket ({bucket}): staging sources are deleted once stored"
                ),
            ));
        }
        let layout = Layout::parse(&raw.storage.layout)
            .map_err(|error| ConfigError::new("storage.layout", error.to_string()))?;
        let storage_class = match optional(&raw.storage.storage_class) {
            None => None,
            Some(class) => Some(
                STORAGE_CLASSES
                    .into_iter()
                    .find(|known| *known == class)
                    .ok_or_else(|| {
                        ConfigError::new(
                            "storage.storage_class",
                            format!("expected one of {}, got {class:?}", STORAGE_CLASSES.join(", ")),
                        )
                    })?,
            ),
        };
        let lifecycle = raw
            .storage
            .lifecycle
            .iter()
            .enumerate()
            .map(|(index, rule)| lifecycle_rule(&format!("storage.lifecycle[{index}]"), rule))
            .collect::<Result<Vec<_>, _>>()?;
        let storage = StorageSettings {
            bucket,
            layout,
            storage_class,
            lifecycle,
            staging_buckets: raw.storage.staging_buckets.clone(),
            endpoint: Endpoint::parse(
                "storage.endpoint",
                &raw.storage.endpoint,
                environment
                    .get("STORAGE_EMULATOR_HOST")
                    .filter(|v| !v.is_empty())
                    .cloned(),
            )?,
        };

        let mut local_roots = Vec::new();
        for (index, root) in raw.sources.local_roots.iter().enumerate() {
            local_roots.push(local_root(&format!("sources.local_roots[{index}]"), root)?);
        }
        let sources = SourceSettings { local_roots };

        let worker = WorkerSettings {
            concurrency: in_range("worker.concurrency", raw.worker.concurrency, 1, 1024)? as usize,
            shutdown_grace: duration("worker.shutdown_grace", &raw.worker.shutdown_grace)?,
        };

        let retry = RetrySettings {
            max_attempts: in_range("retry.max_attempts", raw.retry.max_attempts, 1, 100)? as u32,
            initial_backoff: duration("retry.initial_backoff", &raw.retry.initial_backoff)?,
            max_backoff: duration("retry.max_backoff", &raw.retry.max_backoff)?,
        };
        if retry.initial_backoff > retry.max_backoff {
            return Err(ConfigError::new(
                "retry.initial_backoff",
                "must not exceed retry.max_backoff",
            ));
        }

        let http = HttpSettings {
            listen: raw.http.listen.parse().map_err(|_| {
                ConfigError::new(
                    "http.listen",
                    format!("expected an address like 0.0.0.0:8080, got {:?}", raw.http.listen),
                )
            })?,
        };

        let format = match raw.log.format.as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                return Err(ConfigError::new(
                    "log.format",
                    format!("expected \"json\" or \"pretty\", got {other:?}"),
                ));
            }
        };
        check_log_filter("log.level", &raw.log.level)?;
        // `RUST_LOG`, when set and not empty, replaces `log.level`: the settings (and so
        // check-config) hold the filter in effect. A bad one would silence every log line.
        let level = match environment.get("RUST_LOG").filter(|text| !text.is_empty()) {
            Some(directives) => {
                check_log_filter("RUST_LOG", directives)?;
                directives.clone()
            }
            None => raw.log.level.clone(),
        };
        let log = LogSettings { format, level };

        let telemetry = TelemetrySettings {
            otlp_traces: otlp_traces("telemetry.otlp_endpoint", &raw.telemetry.otlp_endpoint)?,
            sample_ratio: sample_ratio("telemetry.sample_ratio", raw.telemetry.sample_ratio)?,
        };

        Ok(Settings {
            pubsub,
            storage,
            sources,
            worker,
            retry,
            http,
            log,
            telemetry,
        })
    }

    /// Expands a short topic or subscription name given on the command line as `key`.
    pub fn full_name(&self, key: &str, collection: &str, name: &str) -> Result<String, ConfigError> {
        full_name(key, &self.pubsub.project, collection, name)
    }

    /// The input topic, or an error naming the key when it is not configured.
    pub fn input_topic(&self) -> Result<&str, ConfigError> {
        self.pubsub
            .topic
            .as_deref()
            .ok_or_else(|| ConfigError::new("pubsub.topic", "required by this command"))
    }
}
