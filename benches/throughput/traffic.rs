//! What the ceilings and the worker are sent and what comes back: the input
//! files, and through the product's own clients their uploads (`Store`), the
//! input messages (`Outbox`) and the "audio stored" events (`Inbox`).

use crate::report::Scenario;
use crate::scenarios::Setup;
use anyhow::{Context as _, Result, anyhow, ensure};
use audio_store::envelope::Envelope;
use audio_store::pubsub::{BUSY_BATCHING, Delivery, Inbox, Outbox};
use audio_store::source::LocalContent;
use audio_store::store::{NewObject, RESUMABLE_THRESHOLD, Store, Written};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use testkit::TestEnv;
use testkit::media::{sample_png, write_wav};
use tokio::task::JoinHandle;

/// The size of the small scenario's thumbnail.
pub const THUMBNAIL_SIZE: u64 = 8 * 1024;

/// About the size of the worker's "audio stored" event for a small message (1,035
/// bytes of JSON, and 9 attributes, on 2026-12-01), which the Pub/Sub ceiling publishes.
pub const EVENT_SIZE: usize = 1024;

/// One input message: its id and its files, the audio and (small messages) the thumbnail.
pub struct Input {
    pub id: String,
    pub files: Vec<File>,
}

impl Input {
    fn json(&self) -> Vec<u8> {
        let (audio, thumbnail) = (&self.files[0].path, self.files.get(1).map(|file| &file.path));
        let message = serde_json::json!({ "id": self.id, "audio": audio, "thumbnail": thumbnail });
        message.to_string().into_bytes()
    }
}

/// A file of an input, with what the worker knows of it when it uploads.
#[derive(Clone)]
pub struct File {
    path: PathBuf,
    size: u64,
    /// Known for files that go up in one request; computed here, before the GCS ceiling's clock starts.
    crc32c: Option<u32>,
}

impl File {
    fn new(path: PathBuf) -> Result<File> {
        let size = std::fs::metadata(&path)?.len();
        let crc32c = (size < RESUMABLE_THRESHOLD).then(|| std::fs::read(&path));
        let crc32c = crc32c.transpose()?.map(|bytes| crc32c::crc32c(&bytes));
        Ok(File { path, size, crc32c })
    }

    /// Uploads the file with the product's `Store::upload_local`, named as in the spool.
    pub async fn upload(self, store: Store) -> Result<()> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let png = name.ends_with(".png");
        let content_type = if png { "image/png" } else { "audio/wav" };
        let metadata = BTreeMap::new();
        let object = NewObject {
            name: &name,
            content_type,
            metadata: &metadata,
            storage_class: None,
        };
        let content = LocalContent::Open(tokio::fs::File::open(&self.path).await?);
        let upload = store.upload_local(content, self.size, self.crc32c, &object);
        let written = upload.await?;
        ensure!(matches!(written, Written::Created(_)), "{name} exists already");
        Ok(())
    }
}

/// A round's inputs in `files`' spool: each a WAV of the scenario's size and,
/// for small messages, an 8 KiB PNG (a real one, padded).
pub async fn write_inputs(env: &TestEnv, scenario: &Scenario) -> Result<Vec<Input>> {
    let mut png = sample_png();
    png.resize(THUMBNAIL_SIZE as usize, 0);
    let (mut inputs, size) = (Vec::new(), scenario.audio_size);
    for i in 0..scenario.messages {
        let audio = env.spool_path(&format!("{i}.wav"));
        let path = audio.clone();
        tokio::task::spawn_blocking(move || write_wav(&path, size, i as u64)).await??;
        let mut paths = vec![audio];
        if scenario.small {
            paths.push(env.spool_file(&format!("{i}.png"), &png));
        }
        let files = paths.into_iter().map(File::new).collect::<Result<_>>()?;
        let id = format!("{}-{i}", env.id);
        inputs.push(Input { id, files });
    }
    Ok(inputs)
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

/// What the Pub/Sub ceiling does with an input: publishes an event of the worker's
/// size (the input, padded: JSON still) and waits for its confirmation, then acks.
pub async fn relay(outbox: Outbox, input: Envelope, delivery: Delivery) -> Result<()> {
    let mut event = input.data.to_vec();
    event.resize(event.len().max(EVENT_SIZE), b' ');
    let attributes = [("audio_id".to_string(), input.message_id)];
    let published = outbox.publish(event, attributes).await;
    published.context("publishing an event")?;
    Ok(delivery.ack().await?)
}

/// Receives the "audio stored" events of the stored subscription by streaming
/// pull (the product's `Inbox`); the task ends when the `count`-th distinct one
/// (by `audio_id`) arrived, with that time. Not by polling: every REST pull
/// costs the Java emulator 5–17 ms of CPU, and polling every 20 ms took half a
/// core from the measured processes.
pub async fn events(setup: &Setup, count: usize) -> Result<JoinHandle<Result<Instant>>> {
    const STALL: Duration = Duration::from_secs(60);
    let subscription = setup.env.pubsub.subscription_path(&setup.env.stored_subscription);
    let mut inbox = Inbox::open_subscription(&setup.settings.pubsub, &subscription, 1000).await?;
    let task = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < count {
            let stalled = || anyhow!("{} of {count} events, then none for {STALL:?}", seen.len());
            let next = tokio::time::timeout(STALL, inbox.next()).await;
            let next = next.map_err(|_| stalled())?.context("the event stream ended")?;
            let (envelope, delivery) = next.context("pulling events")?;
            delivery.ack().await?;
            let id = envelope.attributes.get("audio_id");
            seen.insert(id.context("an event without audio_id")?.clone());
        }
        let done = Instant::now();
        inbox.closer().close().await;
        Ok(done)
    });
    // A moment for the stream to connect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(task)
}
