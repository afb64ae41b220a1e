//! From the raw shapes to [`Settings`]: every check, each error naming its key.

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
        // `RUST_LOG` replaces `log.level` (see `telemetry::init`): a bad one would silence every log line.
        if let Some(directives) = environment.get("RUST_LOG").filter(|text| !text.is_empty()) {
            check_log_filter("RUST_LOG", directives)?;
        }
        let log = LogSettings {
            format,
            level: raw.log.level.clone(),
        };

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

/// The collector's traces URL: `http(s)://host[:port][/path]`, with
/// `/v1/traces` appended unless the path already ends with it (the
/// `OTEL_EXPORTER_OTLP_ENDPOINT` convention); empty means no export.
fn otlp_traces(key: &str, endpoint: &str) -> Result<Option<reqwest::Url>, ConfigError> {
    if endpoint.is_empty() {
        return Ok(None);
    }
    let shown = without_credentials(endpoint);
    let mut url = reqwest::Url::parse(endpoint)
        .map_err(|error| ConfigError::new(key, format!("not a URL ({error}): {shown:?}")))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(ConfigError::new(
            key,
            format!("expected http(s)://host[:port][/path] of an OTLP/HTTP collector, got {shown:?}"),
        ));
    }
    let path = url.path().trim_end_matches('/').to_string();
    if path.ends_with("/v1/traces") {
        url.set_path(&path);
    } else {
        url.set_path(&format!("{path}/v1/traces"));
    }
    Ok(Some(url))
}

/// `url` as an error may show it: anything before an `@` in its authority
/// (a user name and password) replaced by `REDACTED`, even when it does not parse.
pub(super) fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://REDACTED{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// A probability: finite, from 0.0 to 1.0.
fn sample_ratio(key: &str, ratio: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(ConfigError::new(key, format!("expected 0.0 to 1.0, got {ratio}")))
    }
}

/// A local root: an absolute path to an existing directory (symlinks followed), not `/`.
fn local_root(key: &str, root: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(root);
    if !path.is_absolute() {
        return Err(ConfigError::new(
            key,
            format!("must be an absolute path, got {root:?}"),
        ));
    }
    let canonical = std::fs::canonicalize(&path)
        .map_err(|error| ConfigError::new(key, format!("{root:?} cannot be used ({error})")))?;
    if !canonical.is_dir() {
        return Err(ConfigError::new(key, format!("{root:?} is not a directory")));
    }
    if canonical == Path::new("/") {
        return Err(ConfigError::new(
            key,
            format!("{root:?} is the root of the file system: every file would be readable and deletable"),
        ));
    }
    Ok(path)
}

/// The levels a `log.level` directive may set.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A `log.level` filter: comma-separated directives, each a level (`info`) or
/// `TARGET=LEVEL` (`audio_store=debug`, `h2[span]=off`), at least one.
///
/// Stricter than `EnvFilter`, which reads a bare word such as `verbose` as a
/// target and then logs nothing at all, not even errors.
fn check_log_filter(key: &str, filter: &str) -> Result<(), ConfigError> {
    let invalid = |problem: String| {
        ConfigError::new(
            key,
            format!(
                "{problem}; expected LEVEL or TARGET=LEVEL, comma-separated, with LEVEL one of {}",
                LOG_LEVELS.join(" ")
            ),
        )
    };
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(invalid("no directive".into()));
    }
    for directive in directives {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!("{directive:?} sets no known level")));
        }
        if target.is_some_and(str::is_empty) {
            return Err(invalid(format!("{directive:?} has no target")));
        }
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|error| invalid(format!("{directive:?} is not a directive ({error})")))?;
    }
    Ok(())
}

/// Checks one `[[storage.lifecycle]]` entry; errors name `key.field`.
fn lifecycle_rule(key: &str, raw: &RawLifecycleRule) -> Result<LifecycleRule, ConfigError> {
    let age_days = in_range(&format!("{key}.age_days"), raw.age_days, 0, 36_500)? as u32;
    let class = || {
        STORAGE_CLASSES
            .into_iter()
            .find(|known| *known == raw.storage_class)
            .ok_or_else(|| {
                ConfigError::new(
                    format!("{key}.storage_class"),
                    format!(
                        "set_storage_class needs one of {}, got {:?}",
                        STORAGE_CLASSES.join(", "),
                        raw.storage_class
                    ),
                )
            })
    };
    let action = match raw.action.as_str() {
        "delete" if raw.storage_class.is_empty() => LifecycleAction::Delete,
        "delete" => {
            return Err(ConfigError::new(
                format!("{key}.storage_class"),
                "only set_storage_class takes a storage class",
            ));
        }
        "set_storage_class" => LifecycleAction::SetStorageClass(class()?),
        other => {
            return Err(ConfigError::new(
                format!("{key}.action"),
                format!("expected \"set_storage_class\" or \"delete\", got {other:?}"),
            ));
        }
    };
    if let Some(index) = raw.matches_prefix.iter().position(String::is_empty) {
        return Err(ConfigError::new(
            format!("{key}.matches_prefix[{index}]"),
            "an empty prefix would match every object; leave matches_prefix out instead",
        ));
    }
    Ok(LifecycleRule {
        age_days,
        action,
        matches_prefix: raw.matches_prefix.clone(),
    })
}

fn required(key: &str, value: &str) -> Result<String, ConfigError> {
    optional(value).ok_or_else(|| ConfigError::new(key, "is required"))
}

fn optional(value: &str) -> Option<String> {
    let trimmed = value.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

fn in_range(key: &str, value: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ))
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|error| {
        ConfigError::new(
            key,
            format!("expected a duration like \"25s\" or \"200ms\", got {value:?} ({error})"),
        )
    })
}

/// Expands a short name to `projects/P/<collection>/NAME`, or checks a full one.
fn full_name(key: &str, project: &str, collection: &str, name: &str) -> Result<String, ConfigError> {
    let short = match name.strip_prefix("projects/") {
        None => name,
        Some(rest) => {
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                [owner, kind, short] if *kind == collection => {
                    check_resource_id(key, owner)?;
                    *short
                }
                _ => {
                    return Err(ConfigError::new(
                        key,
                        format!("expected a short name or projects/PROJECT/{collection}/NAME, got {name:?}"),
                    ));
                }
            }
        }
    };
    check_resource_id(key, short)?;
    if name.starts_with("projects/") {
        Ok(name.to_string())
    } else {
        Ok(format!("projects/{project}/{collection}/{short}"))
    }
}

/// Pub/Sub resource ids: 3..=255 characters, a letter first, then `[A-Za-z0-9-_.~+%]`.
fn check_resource_id(key: &str, id: &str) -> Result<(), ConfigError> {
    let valid_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~+%:".contains(c));
    if !(3..=255).contains(&id.len()) || !id.starts_with(|c: char| c.is_ascii_alphabetic()) || !valid_chars {
        return Err(ConfigError::new(
            key,
            format!(
                "{id:?} is not a valid name (3-255 characters, starting with a letter; letters, digits, - _ . ~ + %)"
            ),
        ));
    }
    Ok(())
}

/// Bucket names: 3..=63 characters of `[a-z0-9-_.]`, starting and ending alphanumeric.
fn check_bucket(key: &str, bucket: &str) -> Result<(), ConfigError> {
    let valid_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !valid_chars
        || !alnum(bucket.chars().next())
        || !alnum(bucket.chars().last())
    {
        return Err(ConfigError::new(
            key,
            format!(
                "{bucket:?} is not a valid bucket name (3-63 of a-z 0-9 - _ ., starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// A CloudEvents attribute value the worker sends on every event: printable
/// ASCII without spaces (a URI reference, a reverse-DNS type name; nothing
/// invisible that would make a consumer's filter miss it), not empty, and
/// within Pub/Sub's 1,024 bytes per attribute value, which the emulator does
/// not enforce but Pub/Sub does.
fn check_event_attribute(key: &str, value: &str) -> Result<(), ConfigError> {
    let shown: String = value.chars().take(60).collect();
    if value.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ConfigError::new(
            key,
            format!("must be printable ASCII without spaces, got {bad:?} in {shown:?}"),
        ));
    }
    if value.len() > crate::dead_letter::MAX_ATTRIBUTE_BYTES {
        return Err(ConfigError::new(
            key,
            format!(
                "is {} bytes; Pub/Sub allows {} in an attribute value",
                value.len(),
                crate::dead_letter::MAX_ATTRIBUTE_BYTES
            ),
        ));
    }
    Ok(())
}

/// Every `%` of a URI reference starts a two-digit hex escape.
fn check_percent_escapes(key: &str, value: &str) -> Result<(), ConfigError> {
    let bytes = value.as_bytes();
    for (at, _) in value.match_indices('%') {
        let escape = bytes.get(at + 1..at + 3);
        if !escape.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
            return Err(ConfigError::new(
                key,
                format!("is not a URI reference: '%' at byte {at} does not start a %XX escape"),
            ));
        }
    }
    Ok(())
}
