//! Driving audio-store from the tests: settings for a [`TestEnv`], a worker
//! running in-process, and the expectations shared by several tests.

use crate::harness::{PROJECT, Received, TestEnv};
use anyhow::{Context as _, ensure};
use audio_store::config::{Environment, Settings};
use audio_store::health::Health;
use audio_store::identity::{AudioId, IdentityKey};
use audio_store::worker::{self, Summary, WorkerError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The environment a deployment for `env` would have: every key as `AUDIO_STORE__…`.
pub fn environment(env: &TestEnv, overrides: &[(&str, &str)]) -> Environment {
    let spool = env.spool.path().display().to_string();
    let pubsub_host = env.pubsub_endpoint.trim_start_matches("http://").to_string();
    let mut environment: Environment = [
        ("AUDIO_STORE__PUBSUB__PROJECT", PROJECT),
        ("AUDIO_STORE__PUBSUB__TOPIC", &env.topic),
        ("AUDIO_STORE__PUBSUB__SUBSCRIPTION", &env.subscription),
        ("AUDIO_STORE__PUBSUB__STORED_TOPIC", &env.stored_topic),
        ("AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", &env.dead_letter_topic),
        (
            "AUDIO_STORE__PUBSUB__DEAD_LETTER_SUBSCRIPTION",
            &env.dead_letter_subscription,
        ),
        ("AUDIO_STORE__PUBSUB__ACK_DEADLINE", "10s"),
        ("AUDIO_STORE__PUBSUB__REDELIVERY_MIN_BACKOFF", "1s"),
        ("AUDIO_STORE__PUBSUB__REDELIVERY_MAX_BACKOFF", "5s"),
        ("AUDIO_STORE__STORAGE__BUCKET", &env.bucket),
        ("AUDIO_STORE__STORAGE__STAGING_BUCKETS", &env.staging_bucket),
        ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", &spool),
        ("AUDIO_STORE__WORKER__CONCURRENCY", "4"),
        ("AUDIO_STORE__WORKER__SHUTDOWN_GRACE", "10s"),
        ("AUDIO_STORE__RETRY__MAX_ATTEMPTS", "3"),
        ("AUDIO_STORE__RETRY__INITIAL_BACKOFF", "50ms"),
        ("AUDIO_STORE__RETRY__MAX_BACKOFF", "500ms"),
        ("AUDIO_STORE__HTTP__LISTEN", "127.0.0.1:0"),
        ("AUDIO_STORE__LOG__LEVEL", "info"),
        ("PUBSUB_EMULATOR_HOST", &pubsub_host),
        ("STORAGE_EMULATOR_HOST", &env.gcs_endpoint),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect();
    for (key, value) in overrides {
        environment.insert(key.to_string(), value.to_string());
    }
    environment
}

/// Validated settings for `env`.
pub fn settings(env: &TestEnv, overrides: &[(&str, &str)]) -> anyhow::Result<Settings> {
    Settings::load(None, &environment(env, overrides)).context("test settings")
}

/// A worker running in this process until [`Worker::stop`].
pub struct Worker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Summary, WorkerError>>,
    /// The worker's live state and metrics, for tests that watch progress.
    pub health: Health,
}

impl Worker {
    /// Starts `worker::run` with a shutdown the test controls.
    pub fn start(settings: Settings) -> Worker {
        init_logs();
        let (stop, stopped) = oneshot::channel::<()>();
        let health = Health::new();
        let task = tokio::spawn(worker::run(Arc::new(settings), health.clone(), async move {
            let _ = stopped.await;
        }));
        Worker { stop, task, health }
    }

    /// Signals shutdown and returns the worker's summary.
    pub async fn stop(self) -> anyhow::Result<Summary> {
        let _ = self.stop.send(());
        Ok(self.task.await.context("the worker task panicked")??)
    }
}

/// The `audio_id` a message with producer key `id` must get.
pub fn audio_id_for(id: &str) -> String {
    AudioId::from_key(IdentityKey::Producer(id)).to_string()
}

/// The JSON data of an event, with its attributes checked.
pub fn event_json(event: &Received) -> anyhow::Result<serde_json::Value> {
    let json = event.json()?;
    anyhow::ensure!(
        event.attribute("event_type") == Some("audio.stored"),
        "event_type attribute: {event:?}"
    );
    anyhow::ensure!(
        event.attribute("audio_id") == json["audio_id"].as_str(),
        "audio_id attribute {:?} differs from the data's {}",
        event.attribute("audio_id"),
        json["audio_id"]
    );
    Ok(json)
}

/// The next "audio stored" event on `env`'s stored subscription, its attributes checked
/// ([`event_json`]); an error when none comes within a minute and a half.
pub async fn next_event(env: &TestEnv) -> anyhow::Result<serde_json::Value> {
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, std::time::Duration::from_secs(90))
        .await?;
    event_json(events.first().context("no \"audio stored\" event within 90 s")?)
}

/// Sends the library's logs to the test's captured output (shown when a test fails).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("audio_store=info")),
        )
        .with_test_writer()
        .try_init();
}

/// GETs `http://127.0.0.1:PORT/PATH`; `None` while nothing listens there.
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<Option<(u16, String)>> {
    let response = match reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
    {
        Ok(response) => response,
        Err(error) if error.is_connect() => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let status = response.status().as_u16();
    Ok(Some((status, response.text().await?)))
}

/// Sends `signal` (e.g. `-TERM`, `-KILL`) to a child process.
pub async fn signal(child: &tokio::process::Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the process is running")?;
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill {signal} {pid}");
    Ok(())
}

/// The string at JSON `pointer` (e.g. `/audio_id`, `/audio/generation`) of every event.
pub fn event_strings(events: &[Received], pointer: &str) -> anyhow::Result<Vec<String>> {
    events
        .iter()
        .map(|event| {
            let json = event_json(event)?;
            Ok(json
                .pointer(pointer)
                .and_then(|value| value.as_str())
                .with_context(|| format!("{pointer} in {json}"))?
                .to_string())
        })
        .collect()
}

/// The `audio-store` binary built for these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_audio-store");

/// A worker process (`audio-store run`) with its own operations port; its
/// stderr (the JSON log) goes to a file that [`Process::log`] reads.
pub struct Process {
    /// The process, for waiting on it.
    pub child: tokio::process::Child,
    /// The port of `/healthz`, `/readyz` and `/metrics`.
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Process {
    /// Starts `audio-store run` with `env`'s environment plus `overrides`.
    pub fn spawn(env: &TestEnv, overrides: &[(&str, &str)]) -> anyhow::Result<Process> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec![("AUDIO_STORE__HTTP__LISTEN", listen.as_str())];
        all.extend_from_slice(overrides);
        let log = tempfile::Builder::new()
            .prefix("audio-store-worker-")
            .suffix(".log")
            .tempfile()?;
        let child = tokio::process::Command::new(BINARY)
            .arg("run")
            .env_clear()
            .envs(environment(env, &all))
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen()?)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Process { child, port, log })
    }

    /// A sample from `/metrics`, `None` until the endpoint answers.
    pub async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        Ok(http_get(self.port, "/metrics").await?.map(|(_, text)| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0.0)
        }))
    }

    /// `GET /readyz`: status and body, `None` until the endpoint answers.
    pub async fn readyz(&self) -> anyhow::Result<Option<(u16, String)>> {
        http_get(self.port, "/readyz").await
    }

    /// Sends `name` (e.g. `-TERM`) to the process.
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        signal(&self.child, name).await
    }

    /// The log so far, one JSON object per line.
    pub fn log(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.log.path())?;
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    }

    /// Waits up to `timeout` for the process to exit; its exit code.
    pub async fn exit_code(&mut self, timeout: std::time::Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("the worker did not exit within {timeout:?}"))??;
        Ok(status.code())
    }
}

/// Collects stored events until every one of `ids` has one, releasing the
/// emulator's leases on the input subscription now and then: it keeps
/// messages leased to a killed process's stream, where production Pub/Sub
/// would redeliver them after the ack deadline.
pub async fn events_for_all(
    env: &TestEnv,
    ids: &BTreeSet<String>,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, Vec<serde_json::Value>>> {
    let mut events: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_release = tokio::time::Instant::now();
    loop {
        for event in env
            .pubsub
            .drain_for(&env.stored_subscription, Duration::from_millis(500))
            .await?
        {
            let json = event_json(&event)?;
            let id = json["audio_id"].as_str().context("audio_id")?.to_string();
            events.entry(id).or_default().push(json);
        }
        if ids.iter().all(|id| events.contains_key(id)) {
            return Ok(events);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} of {} messages stored after {timeout:?}",
            ids.iter().filter(|id| events.contains_key(*id)).count(),
            ids.len()
        );
        if last_release.elapsed() > Duration::from_secs(5) {
            env.pubsub.release_leases(&env.subscription).await?;
            last_release = tokio::time::Instant::now();
        }
    }
}
