//! Fresh resources for one test ([`TestEnv`]), unique names, and waits.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::emulators::{PubsubEmulator, shared_gcs};
use crate::gcs_rest::GcsRest;
use crate::pubsub_rest::{PubsubRest, SubscriptionOptions};

/// The Google Cloud project id used for every emulated resource.
pub const PROJECT: &str = "audio-store-test";

/// Interval between polls ([`wait_for`], pulls).
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A fresh, isolated set of names and a spool dir for one test, usually with
/// a Pub/Sub emulator of its own.
///
/// Why not one emulator for all tests: the emulator fails to handle a
/// client's RST_STREAM (a `NoSuchMethodError` in its gRPC server, see its
/// log), so every streaming pull a client closes stays open inside it and
/// keeps being handed messages; with tests sharing an emulator, those dead
/// streams made other tests' messages go missing now and then.
pub struct TestEnv {
    /// The 8-hex-digit id shared by all names of this environment.
    pub id: String,
    /// Pub/Sub emulator base URL, `http://127.0.0.1:PORT`.
    pub pubsub_endpoint: String,
    /// fake-gcs base URL, `http://127.0.0.X`.
    pub gcs_endpoint: String,
    /// REST client of the Pub/Sub emulator.
    pub pubsub: PubsubRest,
    /// REST client of fake-gcs.
    pub gcs: GcsRest,
    /// Input topic ("audio processed" messages), `in-<id>`.
    pub topic: String,
    /// Input subscription (the service under test pulls it), `in-sub-<id>`.
    pub subscription: String,
    /// Output topic ("audio stored" events), `stored-<id>`.
    pub stored_topic: String,
    /// Subscription of the output topic that the test reads, `stored-sub-<id>`.
    pub stored_subscription: String,
    /// Dead-letter topic of the input subscription, `dlq-<id>`.
    pub dead_letter_topic: String,
    /// Subscription of the dead-letter topic, `dlq-sub-<id>`.
    pub dead_letter_subscription: String,
    /// Destination bucket, `audio-<id>`.
    pub bucket: String,
    /// Staging bucket, `staging-<id>`.
    pub staging_bucket: String,
    /// A local root for source files; removed on drop.
    pub spool: tempfile::TempDir,
    /// The Pub/Sub emulator of this environment alone, if it has one; stopped on drop.
    own_pubsub: Option<PubsubEmulator>,
}

impl Default for TestEnv {
    fn default() -> TestEnv {
        TestEnv::new()
    }
}

impl TestEnv {
    /// A Pub/Sub emulator of its own (started here, stopped on drop) and
    /// unique names on the process's shared fake-gcs (starting it if needed);
    /// creates the spool dir but no cloud resources. Panics when an emulator
    /// cannot be started.
    pub fn new() -> TestEnv {
        TestEnv::with_gcs(shared_gcs())
    }

    /// Like [`new`](TestEnv::new), but with buckets on another fake-gcs (e.g. a
    /// [`FakeGcs`](crate::FakeGcs) that the test stops and restarts).
    pub fn with_gcs(gcs_endpoint: &str) -> TestEnv {
        let pubsub =
            PubsubEmulator::start().unwrap_or_else(|e| panic!("cannot start a pubsub emulator: {e:#}"));
        let env = TestEnv::with_endpoints(&pubsub.endpoint(), gcs_endpoint);
        TestEnv {
            own_pubsub: Some(pubsub),
            ..env
        }
    }

    /// Like [`new`](TestEnv::new), on the given emulators.
    pub fn with_endpoints(pubsub_endpoint: &str, gcs_endpoint: &str) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let spool = tempfile::Builder::new()
            .prefix("audio-store-spool-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create the spool dir: {e}"));
        TestEnv {
            pubsub_endpoint: pubsub_endpoint.trim_end_matches('/').to_string(),
            gcs_endpoint: gcs_endpoint.trim_end_matches('/').to_string(),
            pubsub: PubsubRest::new(pubsub_endpoint, PROJECT),
            gcs: GcsRest::new(gcs_endpoint),
            topic: format!("in-{id}"),
            subscription: format!("in-sub-{id}"),
            stored_topic: format!("stored-{id}"),
            stored_subscription: format!("stored-sub-{id}"),
            dead_letter_topic: format!("dlq-{id}"),
            dead_letter_subscription: format!("dlq-sub-{id}"),
            bucket: format!("audio-{id}"),
            staging_bucket: format!("staging-{id}"),
            spool,
            id,
            own_pubsub: None,
        }
    }

    /// The default input subscription options: ack deadline 10 s, dead-letter
    /// policy to `dead_letter_topic` after 5 attempts, retry backoff 1 s..5 s.
    pub fn default_input_options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            ack_deadline_seconds: Some(10),
            dead_letter_topic: Some(self.dead_letter_topic.clone()),
            max_delivery_attempts: Some(5),
            exactly_once: false,
            retry_min_backoff: Some(Duration::from_secs(1)),
            retry_max_backoff: Some(Duration::from_secs(5)),
        }
    }

    /// Creates all topics, the subscriptions (input with
    /// [`default_input_options`](TestEnv::default_input_options)) and both buckets.
    pub async fn create_resources(&self) -> Result<()> {
        self.create_resources_with(self.default_input_options()).await
    }

    /// Like [`create_resources`](TestEnv::create_resources), with `input` as the
    /// options of the input subscription.
    pub async fn create_resources_with(&self, input: SubscriptionOptions) -> Result<()> {
        self.create_topics_and_subscriptions(input).await?;
        self.gcs.create_bucket(&self.bucket).await?;
        self.gcs.create_bucket(&self.staging_bucket).await
    }

    /// The Pub/Sub part of [`create_resources_with`](TestEnv::create_resources_with).
    pub async fn create_topics_and_subscriptions(&self, input: SubscriptionOptions) -> Result<()> {
        for topic in [&self.topic, &self.stored_topic, &self.dead_letter_topic] {
            self.pubsub.create_topic(topic).await?;
        }
        self.pubsub
            .create_subscription(&self.subscription, &self.topic, input)
            .await?;
        for (subscription, topic) in [
            (&self.stored_subscription, &self.stored_topic),
            (&self.dead_letter_subscription, &self.dead_letter_topic),
        ] {
            self.pubsub
                .create_subscription(subscription, topic, SubscriptionOptions::default())
                .await?;
        }
        Ok(())
    }

    /// The log file of this environment's own Pub/Sub emulator, if it has one.
    pub fn pubsub_log(&self) -> Option<PathBuf> {
        self.own_pubsub.as_ref().map(PubsubEmulator::log)
    }

    /// The absolute path of `name` (may contain `/`) in the spool dir; creates nothing.
    pub fn spool_path(&self, name: &str) -> PathBuf {
        self.spool.path().join(name)
    }

    /// Writes `bytes` to `name` (may contain `/`; parents are created) in the
    /// spool dir and returns its absolute path. Panics when it cannot.
    pub fn spool_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.spool_path(name);
        let write = || -> Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
            Ok(())
        };
        if let Err(e) = write() {
            panic!("cannot write the spool file {}: {e:#}", path.display());
        }
        path
    }
}

/// A unique resource name `<prefix>-<8 hex digits>`, e.g. `in-3f9c2a1b`, valid
/// both as a Pub/Sub topic or subscription name and as a GCS bucket name when
/// `prefix` is lowercase `[a-z0-9-]`, starting with a letter.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Calls `condition` every 100 ms until it returns `Ok(Some(value))`, and returns
/// that value; fails with `what` when `timeout` passes first. An `Err` from
/// `condition` ends the wait at once (map transient errors to `Ok(None)`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition()
            .await
            .with_context(|| format!("while waiting for {what}"))?
        {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
