//! Configuration: a TOML file, then `AUDIO_STORE__SECTION__KEY` variables,
//! validated once at start-up into typed [`Settings`].
//!
//! The wire shape ([`RawSettings`]) mirrors the file; everything past
//! [`Settings::load`] works with checked values (durations, full resource
//! names, a parsed [`Layout`]), so a bad value is reported before any network
//! call, as one line naming the key.
//!
//! The files: [`raw`] (the shapes of the file, with defaults), [`environment`]
//! (the `AUDIO_STORE__SECTION__KEY` overlay), `validate.rs` (raw to
//! [`Settings`], every check), `effective.rs` (what `check-config` prints).

mod checks;
mod effective;
mod environment;
mod raw;
mod validate;

pub use raw::*;

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

/// `text` with its whitespace runs, newlines included, made single spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

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
    /// Span export.
    pub telemetry: TelemetrySettings,
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
        let shown = checks::redacted_url(&url);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|error| ConfigError::new(&key, format!("not a URL ({error}): {shown:?}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ConfigError::new(
                &key,
                format!("expected http://host[:port] or https://host[:port], got {shown:?}"),
            ));
        }
        let emulator = parsed.scheme() == "http" || key.ends_with("_EMULATOR_HOST");
        Ok(Endpoint::Custom { url, emulator })
    }

    /// The URL with any user information and query replaced, for printing; empty for Google's.
    pub fn redacted(&self) -> String {
        match self {
            Endpoint::Google => String::new(),
            Endpoint::Custom { url, .. } => checks::redacted_url(url),
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
    /// `ce-source` of the stored event.
    pub event_source: String,
    /// `ce-type` of the stored event.
    pub event_type: String,
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
    /// The log filter in effect, a valid `tracing_subscriber::EnvFilter` directive:
    /// `RUST_LOG` when it is set and not empty, else `log.level`.
    pub level: String,
}

/// Validated `[telemetry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// Where spans are posted (the collector's `/v1/traces`); `None`: not exported.
    pub otlp_traces: Option<reqwest::Url>,
    /// Share of new traces sampled, 0.0..=1.0.
    pub sample_ratio: f64,
}

/// The process environment, passed in so tests can use their own.
pub type Environment = BTreeMap<String, String>;

/// Variables besides `AUDIO_STORE__*` that the configuration reads.
const READ_VARIABLES: [&str; 3] = ["PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "RUST_LOG"];

/// The [`Environment`] of `variables` (the process's: `std::env::vars_os()`).
///
/// A variable that is not UTF-8 is left out, unless the configuration reads it:
/// that is an error naming it. (`std::env::vars` would panic on either.)
pub fn environment_of(
    variables: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Environment, ConfigError> {
    let mut environment = Environment::new();
    for (name, value) in variables {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                environment.insert(name, value);
            }
            (Ok(name), Err(_)) if name.starts_with(ENV_PREFIX) || READ_VARIABLES.contains(&name.as_str()) => {
                return Err(ConfigError::new(name, "the value is not valid UTF-8"));
            }
            _ => {}
        }
    }
    Ok(environment)
}

#[cfg(test)]
mod tests;
