//! Configuration: a TOML file, then `AUDIO_STORE__SECTION__KEY` variables,
//! validated once at start-up into typed [`Settings`].
//!
//! The wire shape ([`RawSettings`]) mirrors the file; everything past
//! [`Settings::load`] works with checked values (durations, full resource
//! names, a parsed [`Layout`]), so a bad value is reported before any network
//! call, as one line naming the key.

use crate::layout::Layout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "AUDIO_STORE__";

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The key as the user wrote it (`storage.bucket`, an environment variable, or the file).
    pub key: String,
    /// What is wrong, one line.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

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
    #[serde(skip_serializing_if = "String::is_empty")]
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
    #[serde(skip_serializing_if = "String::is_empty")]
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

/// The shape of a key's value, for reading it from an environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Text,
    Integer,
    List,
}

/// Every configuration key, so that environment overrides are typed and a
/// misspelt variable is an error rather than silently ignored.
const KEYS: &[(&str, &str, KeyKind)] = &[
    ("pubsub", "project", KeyKind::Text),
    ("pubsub", "subscription", KeyKind::Text),
    ("pubsub", "topic", KeyKind::Text),
    ("pubsub", "stored_topic", KeyKind::Text),
    ("pubsub", "dead_letter_topic", KeyKind::Text),
    ("pubsub", "dead_letter_subscription", KeyKind::Text),
    ("pubsub", "max_delivery_attempts", KeyKind::Integer),
    ("pubsub", "ack_deadline", KeyKind::Text),
    ("pubsub", "redelivery_min_backoff", KeyKind::Text),
    ("pubsub", "redelivery_max_backoff", KeyKind::Text),
    ("pubsub", "endpoint", KeyKind::Text),
    ("storage", "bucket", KeyKind::Text),
    ("storage", "layout", KeyKind::Text),
    ("storage", "staging_buckets", KeyKind::List),
    ("storage", "endpoint", KeyKind::Text),
    ("storage", "storage_class", KeyKind::Text),
    ("sources", "local_roots", KeyKind::List),
    ("worker", "concurrency", KeyKind::Integer),
    ("worker", "shutdown_grace", KeyKind::Text),
    ("retry", "max_attempts", KeyKind::Integer),
    ("retry", "initial_backoff", KeyKind::Text),
    ("retry", "max_backoff", KeyKind::Text),
    ("http", "listen", KeyKind::Text),
    ("log", "format", KeyKind::Text),
    ("log", "level", KeyKind::Text),
];

/// Validated configuration; every field holds a checked value.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Pub/Sub resources and endpoint.
    pub pubsub: PubsubSettings,
    /// Cloud Storage bucket, layout and endpoint.
    pub storage: StorageSettings,
    /// Local source roots.
    pub sources: SourceSettings,
    /// Worker loop limits.
    pub worker: WorkerSettings,
    /// In-process retry policy.
    pub retry: RetrySettings,
    /// Operations endpoint address.
    pub http: HttpSettings,
    /// Log format and filter.
    pub log: LogSettings,
}

/// Where a service endpoint came from, which decides the credentials used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Google's production endpoint with application default credentials.
    Google,
    /// An explicit endpoint; `emulator` means plain HTTP with anonymous credentials.
    Custom {
        /// The base URL, e.g. `http://127.0.0.1:8085`.
        url: String,
        /// Whether to use anonymous credentials (plain-HTTP endpoints and `*_EMULATOR_HOST`).
        emulator: bool,
    },
}

impl Endpoint {
    fn parse(key: &str, configured: &str, emulator_host: Option<String>) -> Result<Self, ConfigError> {
        let (key, value) = match (configured.trim(), emulator_host) {
            ("", None) => return Ok(Endpoint::Google),
            ("", Some(host)) => (emulator_key(key), host),
            (url, _) => (key.to_string(), url.to_string()),
        };
        let url = if value.contains("://") {
            value
        } else {
            format!("http://{value}")
        };
        let url = url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&url)
            .map_err(|error| ConfigError::new(&key, format!("not a URL ({error}): {url:?}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ConfigError::new(
                &key,
                format!("expected http://host[:port] or https://host[:port], got {url:?}"),
            ));
        }
        let emulator = parsed.scheme() == "http" || key.ends_with("_EMULATOR_HOST");
        Ok(Endpoint::Custom { url, emulator })
    }

    /// The URL with any user information replaced, for printing; empty for Google's.
    pub fn redacted(&self) -> String {
        match self {
            Endpoint::Google => String::new(),
            Endpoint::Custom { url, .. } => match reqwest::Url::parse(url) {
                Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
                    let _ = parsed.set_username("REDACTED");
                    let _ = parsed.set_password(None);
                    parsed.to_string()
                }
                _ => url.clone(),
            },
        }
    }
}

fn emulator_key(key: &str) -> String {
    if key.starts_with("pubsub") {
        "PUBSUB_EMULATOR_HOST".into()
    } else {
        "STORAGE_EMULATOR_HOST".into()
    }
}

/// Validated `[pubsub]`.
#[derive(Debug, Clone)]
pub struct PubsubSettings {
    /// The project id.
    pub project: String,
    /// `projects/P/subscriptions/S`.
    pub subscription: String,
    /// `projects/P/topics/T`, if configured (needed by `setup` and `publish`).
    pub topic: Option<String>,
    /// `projects/P/topics/T`.
    pub stored_topic: String,
    /// `projects/P/topics/T`, if configured.
    pub dead_letter_topic: Option<String>,
    /// `projects/P/subscriptions/S` on the dead-letter topic, if there is one.
    pub dead_letter_subscription: Option<String>,
    /// Pub/Sub's own dead-lettering threshold for the input subscription.
    pub max_delivery_attempts: i32,
    /// Ack deadline for the input subscription `setup` creates.
    pub ack_deadline: Duration,
    /// Subscription retry policy, lower bound.
    pub redelivery_min_backoff: Duration,
    /// Subscription retry policy, upper bound.
    pub redelivery_max_backoff: Duration,
    /// Where to reach Pub/Sub.
    pub endpoint: Endpoint,
}

/// Validated `[storage]`.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// Archive bucket name (without `projects/_/buckets/`).
    pub bucket: String,
    /// Parsed object name template.
    pub layout: Layout,
    /// Buckets `gs://` sources may come from.
    pub staging_buckets: Vec<String>,
    /// Where to reach Cloud Storage.
    pub endpoint: Endpoint,
    /// The storage class of every object written; `None`: the bucket's default.
    pub storage_class: Option<&'static str>,
    /// Lifecycle rules `setup` applies to the archive bucket.
    pub lifecycle: Vec<LifecycleRule>,
}

/// A validated lifecycle rule of the archive bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleRule {
    /// Age in days at which the rule applies.
    pub age_days: u32,
    /// What happens then.
    pub action: LifecycleAction,
    /// Name prefixes the rule is limited to (empty: every object).
    pub matches_prefix: Vec<String>,
}

/// What a lifecycle rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    /// Deletes the object.
    Delete,
    /// Moves the object to this storage class.
    SetStorageClass(&'static str),
}

/// Validated `[sources]`.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// Absolute directories local sources must resolve into.
    pub local_roots: Vec<PathBuf>,
}

/// Validated `[worker]`.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Messages in flight at once.
    pub concurrency: usize,
    /// Time in-flight messages get after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// Validated `[retry]`.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts at one message before it is nacked.
    pub max_attempts: u32,
    /// First backoff.
    pub initial_backoff: Duration,
    /// Backoff ceiling.
    pub max_backoff: Duration,
}

/// Validated `[http]`.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Listen address.
    pub listen: SocketAddr,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable, multi-line.
    Pretty,
}

/// Validated `[log]`.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// A valid `tracing_subscriber::EnvFilter` directive.
    pub level: String,
}

/// The process environment, passed in so tests can use their own.
pub type Environment = BTreeMap<String, String>;

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
        let pubsub = PubsubSettings {
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
        let log = LogSettings {
            format,
            level: raw.log.level.clone(),
        };

        Ok(Settings {
            pubsub,
            storage,
            sources,
            worker,
            retry,
            http,
            log,
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

impl RawSettings {
    /// Reads the file (if any) and applies `AUDIO_STORE__SECTION__KEY` overrides.
    pub fn load(file: Option<&Path>, environment: &Environment) -> Result<RawSettings, ConfigError> {
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    ConfigError::new("--config", format!("cannot read {}: {error}", path.display()))
                })?;
                text.parse::<toml::Table>().map_err(|error| {
                    ConfigError::new(path.display().to_string(), one_line(&error.to_string()))
                })?
            }
        };
        apply_environment(&mut table, environment)?;
        let origin = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration".into());
        RawSettings::deserialize(toml::Value::Table(table))
            .map_err(|error| describe_serde_error(&origin, &error))
    }
}

fn apply_environment(table: &mut toml::Table, environment: &Environment) -> Result<(), ConfigError> {
    for (variable, value) in environment {
        let Some(rest) = variable.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let lowered = rest.to_ascii_lowercase();
        let Some((section, key)) = lowered.split_once("__") else {
            return Err(ConfigError::new(
                variable,
                "expected AUDIO_STORE__SECTION__KEY, e.g. AUDIO_STORE__STORAGE__BUCKET",
            ));
        };
        let Some((_, _, kind)) = KEYS.iter().find(|(s, k, _)| *s == section && *k == key) else {
            return Err(ConfigError::new(variable, format!("unknown key {section}.{key}")));
        };
        let converted =
            match kind {
                KeyKind::Text => toml::Value::String(value.clone()),
                KeyKind::Integer => toml::Value::Integer(value.trim().parse().map_err(|_| {
                    ConfigError::new(variable, format!("expected an integer, got {value:?}"))
                })?),
                KeyKind::List => toml::Value::Array(parse_list(variable, value)?),
            };
        let section_table = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = section_table else {
            return Err(ConfigError::new(section, "expected a table"));
        };
        section_table.insert(key.to_string(), converted);
    }
    Ok(())
}

/// A list from an environment variable: a TOML array (`["a", "b"]`) or comma-separated (`a,b`).
fn parse_list(variable: &str, value: &str) -> Result<Vec<toml::Value>, ConfigError> {
    let trimmed = value.trim();
    if trimmed.starts_with('[') {
        let parsed = format!("list = {trimmed}")
            .parse::<toml::Table>()
            .map_err(|error| {
                ConfigError::new(
                    variable,
                    format!("not a TOML array ({})", one_line(&error.to_string())),
                )
            })?;
        return match parsed.get("list") {
            Some(toml::Value::Array(items)) => Ok(items.clone()),
            _ => Err(ConfigError::new(variable, "not a TOML array")),
        };
    }
    Ok(trimmed
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| toml::Value::String(item.to_string()))
        .collect())
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

fn describe_serde_error(origin: &str, error: &toml::de::Error) -> ConfigError {
    // The error names the key in its message ("unknown field `x`", "invalid type ... for key `a.b`").
    ConfigError::new(origin, one_line(error.message()))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Environment {
        [
            ("AUDIO_STORE__PUBSUB__PROJECT", "demo-project"),
            ("AUDIO_STORE__PUBSUB__SUBSCRIPTION", "audio-in-sub"),
            ("AUDIO_STORE__PUBSUB__STORED_TOPIC", "audio-stored"),
            ("AUDIO_STORE__STORAGE__BUCKET", "audio-archive"),
            ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", "/tmp"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn with(mut environment: Environment, key: &str, value: &str) -> Environment {
        environment.insert(key.to_string(), value.to_string());
        environment
    }

    #[test]
    fn environment_alone_is_a_valid_configuration() -> Result<(), ConfigError> {
        let settings = Settings::load(None, &minimal())?;
        assert_eq!(
            settings.pubsub.subscription,
            "projects/demo-project/subscriptions/audio-in-sub"
        );
        assert_eq!(
            settings.pubsub.stored_topic,
            "projects/demo-project/topics/audio-stored"
        );
        assert_eq!(settings.pubsub.dead_letter_topic, None);
        assert_eq!(settings.worker.concurrency, 16);
        assert_eq!(settings.worker.shutdown_grace, Duration::from_secs(25));
        assert_eq!(settings.retry.initial_backoff, Duration::from_millis(200));
        assert_eq!(settings.pubsub.endpoint, Endpoint::Google);
        Ok(())
    }

    #[test]
    fn environment_overrides_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[storage]\nbucket = \"from-file\"\nstaging_buckets = [\"stage-a\"]\n",
        )?;
        let mut environment = with(
            minimal(),
            "AUDIO_STORE__STORAGE__STAGING_BUCKETS",
            "stage-b, stage-c",
        );
        environment.remove("AUDIO_STORE__STORAGE__BUCKET");
        let settings = Settings::load(Some(&path), &environment)?;
        assert_eq!(settings.storage.bucket, "from-file");
        assert_eq!(settings.storage.staging_buckets, vec!["stage-b", "stage-c"]);
        let settings = Settings::load(
            Some(&path),
            &with(environment, "AUDIO_STORE__STORAGE__BUCKET", "from-env"),
        )?;
        assert_eq!(settings.storage.bucket, "from-env");
        Ok(())
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let cases = [
            ("AUDIO_STORE__WORKER__CONCURRENCY", "0", "worker.concurrency"),
            (
                "AUDIO_STORE__WORKER__CONCURRENCY",
                "many",
                "AUDIO_STORE__WORKER__CONCURRENCY",
            ),
            (
                "AUDIO_STORE__WORKER__SHUTDOWN_GRACE",
                "soon",
                "worker.shutdown_grace",
            ),
            (
                "AUDIO_STORE__STORAGE__LAYOUT",
                "audio/{kind}{ext}",
                "storage.layout",
            ),
            ("AUDIO_STORE__STORAGE__BUCKET", "Bad_Bucket!", "storage.bucket"),
            ("AUDIO_STORE__STORAGE__BUKET", "x", "AUDIO_STORE__STORAGE__BUKET"),
            ("AUDIO_STORE__HTTP__LISTEN", "eighty", "http.listen"),
            ("AUDIO_STORE__LOG__FORMAT", "xml", "log.format"),
            (
                "AUDIO_STORE__RETRY__INITIAL_BACKOFF",
                "1h",
                "retry.initial_backoff",
            ),
            (
                "AUDIO_STORE__PUBSUB__SUBSCRIPTION",
                "projects/p/topics/x",
                "pubsub.subscription",
            ),
            (
                "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
                "relative/dir",
                "sources.local_roots[0]",
            ),
        ];
        for (variable, value, key) in cases {
            let error = Settings::load(None, &with(minimal(), variable, value))
                .expect_err(&format!("{variable}={value} should be rejected"));
            assert_eq!(error.key, key, "{variable}={value}: {error}");
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    #[test]
    fn configuration_that_cannot_work_names_its_key() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("file");
        std::fs::write(&file, "")?;
        let missing = dir.path().join("missing");
        let input = with(minimal(), "AUDIO_STORE__PUBSUB__TOPIC", "audio-in");
        let cases = [
            (
                input.clone(),
                "AUDIO_STORE__PUBSUB__STORED_TOPIC",
                "audio-in",
                "pubsub.stored_topic",
            ),
            (
                input.clone(),
                "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC",
                "projects/demo-project/topics/audio-in",
                "pubsub.dead_letter_topic",
            ),
            (minimal(), "AUDIO_STORE__LOG__LEVEL", "verbose", "log.level"),
            (minimal(), "AUDIO_STORE__LOG__LEVEL", "", "log.level"),
            (
                minimal(),
                "AUDIO_STORE__LOG__LEVEL",
                "audio_store=loud",
                "log.level",
            ),
            (minimal(), "AUDIO_STORE__LOG__LEVEL", "=debug", "log.level"),
            (
                minimal(),
                "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
                "/",
                "sources.local_roots[0]",
            ),
            (
                minimal(),
                "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
                &format!("/tmp,{}", missing.display()),
                "sources.local_roots[1]",
            ),
            (
                minimal(),
                "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
                &file.display().to_string(),
                "sources.local_roots[0]",
            ),
            (
                minimal(),
                "AUDIO_STORE__STORAGE__STAGING_BUCKETS",
                "staging-a,audio-archive",
                "storage.staging_buckets",
            ),
        ];
        for (environment, variable, value, key) in cases {
            let error = Settings::load(None, &with(environment, variable, value))
                .expect_err(&format!("{variable}={value} should be rejected"));
            assert_eq!(error.key, key, "{variable}={value}: {error}");
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
        Ok(())
    }

    #[test]
    fn log_levels_and_per_target_levels_are_accepted() -> Result<(), ConfigError> {
        for level in [
            "info",
            "DEBUG",
            "audio_store=debug,info",
            "warn, h2=off",
            "audio_store::worker=trace",
        ] {
            Settings::load(None, &with(minimal(), "AUDIO_STORE__LOG__LEVEL", level))?;
        }
        Ok(())
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let mut environment = minimal();
        environment.remove("AUDIO_STORE__STORAGE__BUCKET");
        let error = Settings::load(None, &environment).expect_err("bucket is required");
        assert_eq!(error.key, "storage.bucket");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[storage]\nbukket = \"x\"\n")?;
        let error = Settings::load(Some(&path), &minimal()).expect_err("unknown key");
        assert!(error.to_string().contains("bukket"), "{error}");
        Ok(())
    }

    #[test]
    fn emulator_hosts_are_honoured_when_no_endpoint_is_set() -> Result<(), ConfigError> {
        let environment = with(minimal(), "PUBSUB_EMULATOR_HOST", "127.0.0.1:8085");
        let environment = with(environment, "STORAGE_EMULATOR_HOST", "http://127.0.0.2");
        let settings = Settings::load(None, &environment)?;
        assert_eq!(
            settings.pubsub.endpoint,
            Endpoint::Custom {
                url: "http://127.0.0.1:8085".into(),
                emulator: true
            }
        );
        assert_eq!(
            settings.storage.endpoint,
            Endpoint::Custom {
                url: "http://127.0.0.2".into(),
                emulator: true
            }
        );
        let environment = with(
            environment,
            "AUDIO_STORE__PUBSUB__ENDPOINT",
            "https://europe-west1-pubsub.googleapis.com",
        );
        let settings = Settings::load(None, &environment)?;
        assert_eq!(
            settings.pubsub.endpoint,
            Endpoint::Custom {
                url: "https://europe-west1-pubsub.googleapis.com".into(),
                emulator: false
            }
        );
        Ok(())
    }

    #[test]
    fn the_dead_letter_subscription_defaults_from_its_topic() -> Result<(), ConfigError> {
        let settings = Settings::load(
            None,
            &with(minimal(), "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", "audio-dlq"),
        )?;
        assert_eq!(
            settings.pubsub.dead_letter_topic.as_deref(),
            Some("projects/demo-project/topics/audio-dlq")
        );
        assert_eq!(
            settings.pubsub.dead_letter_subscription.as_deref(),
            Some("projects/demo-project/subscriptions/audio-dlq-sub")
        );
        Ok(())
    }

    #[test]
    fn every_key_can_be_set_from_the_environment() -> Result<(), ConfigError> {
        let mut environment = minimal();
        for (section, key, kind) in KEYS {
            let variable = format!("{ENV_PREFIX}{}__{}", section.to_uppercase(), key.to_uppercase());
            if environment.contains_key(&variable) {
                continue;
            }
            let value = match (*section, *key, kind) {
                (_, _, KeyKind::Integer) => "7",
                ("storage", _, KeyKind::List) => "stage-a,stage-b",
                (_, _, KeyKind::List) => "/tmp",
                ("pubsub", "endpoint", _) | ("storage", "endpoint", _) => "http://127.0.0.1:1",
                ("storage", "layout", _) => "x/{audio_id}/{kind}{ext}",
                ("storage", "storage_class", _) => "NEARLINE",
                ("http", "listen", _) => "127.0.0.1:9",
                ("log", "format", _) => "pretty",
                ("log", "level", _) => "debug",
                ("pubsub", "ack_deadline" | "redelivery_min_backoff" | "redelivery_max_backoff", _) => "20s",
                ("worker" | "retry", _, _) => "1s",
                ("pubsub", "topic", _) => "input-name",
                _ => "some-name",
            };
            environment.insert(variable, value.to_string());
        }
        let settings = Settings::load(None, &environment)?;
        assert_eq!(settings.pubsub.max_delivery_attempts, 7);
        assert_eq!(settings.log.format, LogFormat::Pretty);
        assert_eq!(settings.storage.layout.template(), "x/{audio_id}/{kind}{ext}");
        assert_eq!(settings.storage.storage_class, Some("NEARLINE"));
        Ok(())
    }

    #[test]
    fn lifecycle_rules_are_checked_naming_the_entry_and_load_back() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("lifecycle.toml");
        let load = |rules: &str| {
            std::fs::write(&path, format!("[storage]\nbucket = \"audio-x\"\n{rules}"))?;
            Settings::load(Some(&path), &minimal()).map_err(Box::<dyn std::error::Error>::from)
        };
        let settings = load(
            "[[storage.lifecycle]]\nage_days = 90\naction = \"set_storage_class\"\nstorage_class = \"COLDLINE\"\n\
             [[storage.lifecycle]]\nage_days = 3650\naction = \"delete\"\nmatches_prefix = [\"audio/\"]\n",
        )?;
        assert_eq!(
            settings.storage.lifecycle,
            [
                LifecycleRule {
                    age_days: 90,
                    action: LifecycleAction::SetStorageClass("COLDLINE"),
                    matches_prefix: vec![],
                },
                LifecycleRule {
                    age_days: 3650,
                    action: LifecycleAction::Delete,
                    matches_prefix: vec!["audio/".into()],
                },
            ]
        );
        std::fs::write(&path, settings.effective_toml())?;
        assert_eq!(
            Settings::load(Some(&path), &Environment::new())?
                .storage
                .lifecycle,
            settings.storage.lifecycle
        );
        for (rules, key) in [
            (
                "age_days = -1\naction = \"delete\"",
                "storage.lifecycle[0].age_days",
            ),
            (
                "age_days = 1\naction = \"archive\"",
                "storage.lifecycle[0].action",
            ),
            (
                "age_days = 1\naction = \"set_storage_class\"",
                "storage.lifecycle[0].storage_class",
            ),
            (
                "age_days = 1\naction = \"set_storage_class\"\nstorage_class = \"COLD\"",
                "storage.lifecycle[0].storage_class",
            ),
            (
                "age_days = 1\naction = \"delete\"\nstorage_class = \"COLDLINE\"",
                "storage.lifecycle[0].storage_class",
            ),
            (
                "age_days = 1\naction = \"delete\"\nmatches_prefix = [\"\"]",
                "storage.lifecycle[0].matches_prefix[0]",
            ),
        ] {
            let error = load(&format!("[[storage.lifecycle]]\n{rules}\n")).expect_err(key);
            assert!(
                error.to_string().starts_with(&format!("{key}: ")),
                "{key}: {error}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_storage_class_must_be_one_gcs_knows() {
        let error = Settings::load(
            None,
            &with(minimal(), "AUDIO_STORE__STORAGE__STORAGE_CLASS", "nearline"),
        )
        .expect_err("lowercase is not a storage class");
        assert!(
            error
                .to_string()
                .starts_with("storage.storage_class: expected one of STANDARD"),
            "{error}"
        );
        let error = Settings::load(
            None,
            &with(
                minimal(),
                "AUDIO_STORE__STORAGE__LAYOUT",
                "{audio_id}/{kind}/{meta.a b}",
            ),
        )
        .expect_err("a meta key with a space");
        assert!(
            error.to_string().starts_with("storage.layout: {meta.a b}"),
            "{error}"
        );
    }

    #[test]
    fn the_effective_configuration_loads_back_to_the_same_values() -> Result<(), Box<dyn std::error::Error>> {
        let settings = Settings::load(
            None,
            &with(minimal(), "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", "audio-dlq"),
        )?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("effective.toml");
        std::fs::write(&path, settings.effective_toml())?;
        let reloaded = Settings::load(Some(&path), &Environment::new())?;
        assert_eq!(reloaded.effective_toml(), settings.effective_toml());
        Ok(())
    }

    #[test]
    fn a_dated_layout_gets_a_note_that_still_loads_back() -> Result<(), Box<dyn std::error::Error>> {
        let plain = Settings::load(None, &minimal())?;
        assert!(!plain.effective_toml().contains("# note:"));
        let dated = Settings::load(
            None,
            &with(
                minimal(),
                "AUDIO_STORE__STORAGE__LAYOUT",
                "{yyyy}/{mm}/{audio_id}/{kind}{ext}",
            ),
        )?;
        let text = dated.effective_toml();
        assert!(text.contains("# note: storage.layout is dated"), "{text}");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("effective.toml");
        std::fs::write(&path, &text)?;
        assert_eq!(
            Settings::load(Some(&path), &Environment::new())?.effective_toml(),
            text
        );
        Ok(())
    }
}
