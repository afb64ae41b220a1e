//! Driving audio-store from the tests: settings for a [`TestEnv`], a worker
//! running in-process or as a process, and the expectations shared by
//! several tests. Everything that is not about the product is in the test
//! kit (`testkit/`).

use anyhow::{Context as _, ensure};
use audio_store::config::Settings;
use audio_store::health::Health;
use audio_store::identity::{AudioId, IdentityKey};
use audio_store::worker::{self, Summary, WorkerError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use testkit::{Received, TestEnv, WorkerProcess, environment};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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

/// A worker process (`audio-store run`) of this test binary's build with
/// `env`'s environment plus `overrides`; its log goes to the kit's log directory.
pub fn spawn_worker(env: &TestEnv, overrides: &[(&str, &str)]) -> anyhow::Result<WorkerProcess> {
    let log = testkit::process::log_dir().join(format!("worker-{}.log", testkit::unique(&env.id)));
    WorkerProcess::spawn(BINARY.as_ref(), &environment(env, overrides), &log)
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
