//! The configuration file as written: every section and key, with its default.

use super::*;

/// The configuration file as written: every section and key, with defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    /// Pub/Sub: where messages come from and where events go.
    pub pubsub: RawPubsub,
    /// Cloud Storage: the archive bucket and the object layout.
    pub storage: RawStorage,
    /// Where local sources may live.
    pub sources: RawSources,
    /// The worker loop.
    pub worker: RawWorker,
    /// In-process retries of one message.
    pub retry: RawRetry,
    /// The operations HTTP endpoint.
    pub http: RawHttp,
    /// Logging.
    pub log: RawLog,
    /// Trace export.
    pub telemetry: RawTelemetry,
}

/// `[pubsub]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPubsub {
    /// The Google Cloud project that owns the topics and subscriptions.
    pub project: String,
    /// The input subscription (short name or `projects/P/subscriptions/S`).
    pub subscription: String,
    /// The input topic: `setup` attaches the subscription to it, `publish` sends to it.
    pub topic: String,
    /// Where "audio stored" events are published.
    pub stored_topic: String,
    /// Where permanent failures are published; empty means none (they are nacked).
    pub dead_letter_topic: String,
    /// A subscription on the dead-letter topic, created by `setup` so that
    /// dead letters are retained; empty means `<dead_letter_topic>-sub`.
    pub dead_letter_subscription: String,
    /// Deliveries before Pub/Sub itself moves a message to the dead-letter topic (5..=100).
    pub max_delivery_attempts: i64,
    /// Ack deadline of the input subscription created by `setup`.
    pub ack_deadline: String,
    /// Shortest redelivery delay after a nack (subscription retry policy).
    pub redelivery_min_backoff: String,
    /// Longest redelivery delay after a nack (subscription retry policy).
    pub redelivery_max_backoff: String,
    /// API endpoint, e.g. `http://127.0.0.1:8085`; empty means Google's, or `PUBSUB_EMULATOR_HOST`.
    pub endpoint: String,
    /// `ce-source` of the stored event (a URI reference); empty means
    /// `//audio-store/projects/P/subscriptions/S`.
    pub event_source: String,
    /// `ce-type` of the stored event.
    pub event_type: String,
}

impl Default for RawPubsub {
    fn default() -> Self {
        Self {
            project: String::new(),
            subscription: String::new(),
            topic: String::new(),
            stored_topic: String::new(),
            dead_letter_topic: String::new(),
            dead_letter_subscription: String::new(),
            max_delivery_attempts: 5,
            ack_deadline: "60s".into(),
            redelivery_min_backoff: "10s".into(),
            redelivery_max_backoff: "600s".into(),
            endpoint: String::new(),
            event_source: String::new(),
            event_type: crate::event::EVENT_TYPE.into(),
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    /// The archive bucket objects are written to.
    pub bucket: String,
    /// Object name template; must contain `{audio_id}` and `{kind}`.
    pub layout: String,
    /// Buckets that `gs://` sources may come from.
    pub staging_buckets: Vec<String>,
    /// API endpoint, e.g. `http://127.0.0.2`; empty means Google's, or `STORAGE_EMULATOR_HOST`.
    pub endpoint: String,
    /// Storage class of every object written (`STANDARD`, `NEARLINE`, `COLDLINE`, `ARCHIVE`); empty: the bucket's default.
    pub storage_class: String,
    /// Lifecycle rules that `setup` applies to the archive bucket (`[[storage.lifecycle]]`; file only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lifecycle: Vec<RawLifecycleRule>,
}

/// One `[[storage.lifecycle]]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLifecycleRule {
    /// Objects older than this many days are acted on.
    pub age_days: i64,
    /// `set_storage_class` or `delete`.
    pub action: String,
    /// The class `set_storage_class` moves objects to.
    pub storage_class: String,
    /// Only objects whose names start with one of these (empty: all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches_prefix: Vec<String>,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            layout: crate::layout::DEFAULT_LAYOUT.into(),
            staging_buckets: Vec::new(),
            endpoint: String::new(),
            storage_class: String::new(),
            lifecycle: Vec::new(),
        }
    }
}

/// The storage classes an object can be written in.
pub const STORAGE_CLASSES: [&str; 4] = ["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"];

/// `[sources]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSources {
    /// Local sources must resolve (after following symlinks) inside one of these.
    pub local_roots: Vec<String>,
}

impl Default for RawSources {
    fn default() -> Self {
        Self {
            local_roots: vec!["/var/spool/audio".into()],
        }
    }
}

/// `[worker]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWorker {
    /// Messages processed at once (1..=1024).
    pub concurrency: i64,
    /// Time in-flight messages get to finish after SIGTERM.
    pub shutdown_grace: String,
}

impl Default for RawWorker {
    fn default() -> Self {
        Self {
            concurrency: 16,
            shutdown_grace: "25s".into(),
        }
    }
}

/// `[retry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    /// Attempts at one message before it is nacked (1..=100).
    pub max_attempts: i64,
    /// First backoff between attempts.
    pub initial_backoff: String,
    /// Longest backoff between attempts.
    pub max_backoff: String,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: "200ms".into(),
            max_backoff: "30s".into(),
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `json` (one object per line) or `pretty`.
    pub format: String,
    /// A `tracing` filter: `info`, `debug`, `audio_store=debug,info`, ...
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// OTLP/HTTP collector (`http://otel-collector:4318`; spans go to `/v1/traces` under
    /// it); empty: spans are not exported and trace context passes through unchanged.
    pub otlp_endpoint: String,
    /// Share of new traces that are sampled (0.0..=1.0); a traced input keeps its
    /// parent's decision.
    pub sample_ratio: f64,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
        }
    }
}

impl RawSettings {
    /// Reads the file (if any) and applies `AUDIO_STORE__SECTION__KEY` overrides.
    pub fn load(file: Option<&Path>, environment: &Environment) -> Result<RawSettings, ConfigError> {
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => {
                let text = read_file(path).map_err(|problem| {
                    ConfigError::new("--config", format!("{}: {problem}", path.display()))
                })?;
                text.parse::<toml::Table>().map_err(|error| {
                    ConfigError::new(path.display().to_string(), one_line(&error.to_string()))
                })?
            }
        };
        environment::apply_environment(&mut table, environment)?;
        let origin = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration".into());
        serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|error| describe_serde_error(&origin, &error))
    }
}

/// The most a configuration file may hold; it is read whole.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The text of a configuration file: a regular file (not a FIFO or a device,
/// which could block or never end) of at most [`MAX_FILE_BYTES`].
fn read_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let cannot = |error: std::io::Error| format!("cannot read it: {error}");
    // Checked before opening too: opening a FIFO waits for a writer.
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err("not a regular file".into());
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err("not a regular file".into());
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err("larger than 1 MiB, too large for a configuration file".into());
    }
    Ok(text)
}

/// A value of the wrong shape, named by its key (`pubsub.event_type`), or by
/// its table for an unknown key (the message names the key itself), and where
/// it came from (the file, or the file and the environment).
fn describe_serde_error(origin: &str, error: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = error.path().to_string();
    let message = one_line(error.inner().message());
    if path.is_empty() || path == "." {
        ConfigError::new(origin, message)
    } else {
        ConfigError::new(path, format!("{message} (in {origin})"))
    }
}
