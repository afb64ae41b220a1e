//! What the ceilings and the worker are sent and what comes back, through the
//! product's own clients: uploads (`Store`), input messages (`Outbox`) and
//! "audio stored" events (`Inbox`).

use crate::scenarios::Setup;
use anyhow::{Context as _, Result, anyhow, bail, ensure};
use audio_store::pubsub::{BUSY_BATCHING, Inbox, Outbox};
use audio_store::source::LocalContent;
use audio_store::store::{NewObject, RESUMABLE_THRESHOLD, Store, Written};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::WorkerProcess;

/// One input message: its files and the JSON the worker gets.
pub struct Input {
    pub id: String,
    pub audio: PathBuf,
    pub thumbnail: Option<PathBuf>,
}

impl Input {
    fn json(&self) -> Vec<u8> {
        let mut message = serde_json::json!({ "audio": self.audio, "id": self.id });
        if let Some(thumbnail) = &self.thumbnail {
            message["thumbnail"] = serde_json::json!(thumbnail);
        }
        message.to_string().into_bytes()
    }
}

/// A file the GCS ceiling uploads.
pub struct Part {
    pub path: PathBuf,
    pub name: String,
    pub content_type: &'static str,
    pub size: u64,
    /// Known for files that go up in one request, as the worker knows it.
    crc32c: Option<u32>,
}

impl Part {
    pub fn new(path: &Path, name: String, content_type: &'static str) -> Result<Part> {
        let size = std::fs::metadata(path)?.len();
        let crc32c = (size < RESUMABLE_THRESHOLD)
            .then(|| std::fs::read(path).map(|bytes| crc32c::crc32c(&bytes)))
            .transpose()?;
        Ok(Part {
            path: path.to_path_buf(),
            name,
            content_type,
            size,
            crc32c,
        })
    }

    /// Uploads the file with the product's `Store::upload_local`.
    pub async fn upload(self, store: &Store) -> Result<()> {
        let file = tokio::fs::File::open(&self.path).await?;
        let metadata = BTreeMap::new();
        let object = NewObject {
            name: &self.name,
            content_type: self.content_type,
            metadata: &metadata,
            storage_class: None,
        };
        let written = store
            .upload_local(LocalContent::Open(file), self.size, self.crc32c, &object)
            .await?;
        ensure!(
            matches!(written, Written::Created(_)),
            "{} exists already",
            self.name
        );
        Ok(())
    }
}

/// Publishes every input with the product's `Outbox` and waits for all confirmations.
pub async fn publish_inputs(setup: &Setup, inputs: &[Input]) -> Result<()> {
    let pubsub = &setup.settings.pubsub;
    let topic = pubsub.topic.as_deref().context("the input topic")?;
    let outbox = Outbox::connect(pubsub, topic, BUSY_BATCHING).await?;
    let pending = inputs.iter().map(|input| outbox.publish(input.json(), []));
    for published in futures::future::join_all(pending).await {
        published.context("publishing an input message")?;
    }
    Ok(())
}

/// An "audio stored" event of the worker's size for an input message.
pub fn event_like(input: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
    let message: serde_json::Value = serde_json::from_slice(input).unwrap_or_default();
    let id = message["id"].as_str().unwrap_or("unknown").to_string();
    let object = |kind: &str, ext: &str| {
        serde_json::json!({
            "uri": format!("gs://audio-bucket/audio/{id}/{kind}{ext}"),
            "bucket": "audio-bucket",
            "name": format!("audio/{id}/{kind}{ext}"),
            "size": 65536, "content_type": "audio/wav", "crc32c": "AAAAAA==",
            "md5": "Bn3hdjPQWlF51hYKPDlO/Q==", "generation": "1795493329535433",
        })
    };
    let event = serde_json::json!({
        "audio_id": id,
        "audio": object("audio", ".wav"),
        "thumbnail": object("thumbnail", ".png"),
        "source": {"message_id": "1", "audio": message["audio"], "thumbnail": message["thumbnail"]},
        "metadata": {},
        "stored_at": "2026-11-24T04:08:49.536Z",
    });
    let attributes = vec![
        ("audio_id".to_string(), id),
        ("event_type".to_string(), "audio.stored".to_string()),
    ];
    (event.to_string().into_bytes(), attributes)
}

/// Receives the "audio stored" events of the stored subscription by streaming
/// pull (the product's `Inbox`) and notes when the `count`-th distinct one (by
/// `audio_id`) arrived. Not by polling: every REST pull costs the Java
/// emulator 5–17 ms of CPU, and polling every 20 ms took half a core from the
/// measured processes.
pub struct Events {
    pub task: tokio::task::JoinHandle<Result<Instant>>,
}

impl Events {
    /// Opens the stream and gives it a moment to connect.
    pub async fn start(setup: &Setup, count: usize) -> Result<Events> {
        const STALL: Duration = Duration::from_secs(60);
        let subscription = setup.env.pubsub.subscription_path(&setup.env.stored_subscription);
        let mut inbox = Inbox::open_subscription(&setup.settings.pubsub, &subscription, 1000).await?;
        let task = tokio::spawn(async move {
            let mut seen = HashSet::new();
            while seen.len() < count {
                let next = tokio::time::timeout(STALL, inbox.next())
                    .await
                    .map_err(|_| anyhow!("{} of {count} events, then none for {STALL:?}", seen.len()))?;
                let Some(next) = next else {
                    bail!("the event stream ended after {} of {count} events", seen.len());
                };
                let (envelope, delivery) = next.context("pulling events")?;
                delivery.ack().await?;
                let id = envelope.attributes.get("audio_id");
                seen.insert(
                    id.with_context(|| format!("an event without audio_id: {envelope:?}"))?
                        .clone(),
                );
            }
            let done = Instant::now();
            inbox.closer().close().await;
            Ok(done)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Events { task })
    }

    /// The time the last event arrived; fails early when the worker (if given) exits.
    pub async fn wait(mut self, mut worker: Option<&mut WorkerProcess>) -> Result<Instant> {
        loop {
            tokio::select! {
                joined = &mut self.task => return joined.context("the events task")?,
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    if let Some(worker) = worker.as_deref_mut()
                        && let Some(status) = worker.child.try_wait()?
                    {
                        self.task.abort();
                        bail!("the worker exited ({status})");
                    }
                }
            }
        }
    }
}
