//! The pipeline: everything that happens to one message, from parsing to
//! ack and cleanup, as one function that never panics and never loses data.
//!
//! Order, for one message: parse → store both objects (concurrently,
//! each verified by CRC32C) → publish the "stored" event and wait for the
//! confirmation → ack → delete the sources. Permanent failures go to the
//! dead-letter topic (then ack); transient ones are retried in process and
//! finally nacked.

use crate::config::Settings;
use crate::content::{self, ContentType, MediaClass};
use crate::dead_letter;
use crate::error::{ErrorKind, Failure, chain};
use crate::event::{self, EventSource, StoredEvent, StoredObject};
use crate::layout::{Date, Kind};
use crate::message::{AudioMessage, Envelope};
use crate::metrics::Metrics;
use crate::pubsub::{Delivery, Outbox};
use crate::source::{self, LocalContent, LocalFile, Source, SourceError};
use crate::store::{self, NewObject, ObjectInfo, StagingObject, Store, Written};
use backon::{ExponentialBuilder, Retryable as _};
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::{Instrument as _, info, warn};

/// How one message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both objects were written by this delivery, the event confirmed, the message acked.
    Stored,
    /// The objects were already there (a redelivery or replay); the event was published again and the message acked.
    AlreadyStored,
    /// A permanent failure, published to the dead-letter topic and acked.
    DeadLettered(ErrorKind),
    /// Not settled: returned to Pub/Sub for redelivery.
    Nacked(ErrorKind),
}

impl Outcome {
    /// `stored`, `already_stored`, `dead_lettered` or `nacked`, as in metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::AlreadyStored => "already_stored",
            Outcome::DeadLettered(_) => "dead_lettered",
            Outcome::Nacked(_) => "nacked",
        }
    }
}

/// What processing one message needs: the archive, the event outbox and the dead-letter outbox.
#[derive(Clone)]
pub struct Pipeline {
    settings: Arc<Settings>,
    store: Store,
    events: Outbox,
    dead_letters: Option<Outbox>,
    metrics: Arc<Metrics>,
}

/// One stored file: the event's description of it, and the source to remove once acked.
#[derive(Debug)]
struct Part {
    object: StoredObject,
    written: bool,
    cleanup: Option<Cleanup>,
}

/// One file of a message, checked and ready to store.
enum Prepared {
    /// A local file, read or open.
    Local { target: Target, file: LocalFile },
    /// A staging object, looked up and its head read.
    Staging { target: Target, staging: StagingObject },
    /// The source is gone but its object is in the archive (a crash after cleanup).
    Stored(Part),
}

/// The archive object a file goes to.
struct Target {
    name: String,
    content_type: ContentType,
    metadata: BTreeMap<String, String>,
}

impl Target {
    fn new_object(&self) -> NewObject<'_> {
        NewObject {
            name: &self.name,
            content_type: self.content_type.mime,
            metadata: &self.metadata,
        }
    }
}

/// A source to delete after the ack: exactly what was read, nothing else.
#[derive(Debug, Clone)]
enum Cleanup {
    Local(std::path::PathBuf),
    Staging {
        bucket: String,
        name: String,
        generation: i64,
    },
}

/// The result of storing a message: the event to publish and what to clean up.
#[derive(Debug)]
struct Stored {
    event: StoredEvent,
    written: bool,
    cleanups: Vec<Cleanup>,
}

impl Pipeline {
    /// Assembles a pipeline from connected clients.
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        events: Outbox,
        dead_letters: Option<Outbox>,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        Pipeline {
            settings,
            store,
            events,
            dead_letters,
            metrics,
        }
    }

    /// Checks that the archive bucket can be reached.
    pub async fn check_archive(&self) -> Result<(), Failure> {
        Ok(self.store.check_bucket().await?)
    }

    /// Processes one delivered message to the end: stored and acked, dead-lettered, or nacked.
    pub async fn handle(&self, envelope: Envelope, delivery: Delivery) -> Outcome {
        let span = tracing::info_span!(
            "message",
            message_id = %envelope.message_id,
            audio_id = tracing::field::Empty,
            delivery_attempt = envelope.delivery_attempt,
        );
        let started = std::time::Instant::now();
        let _in_flight = self.metrics.start_message();
        let outcome = Box::pin(self.handle_in_span(envelope, delivery, started))
            .instrument(span)
            .await;
        self.metrics.record(&outcome, started.elapsed());
        outcome
    }

    async fn handle_in_span(
        &self,
        envelope: Envelope,
        delivery: Delivery,
        started: std::time::Instant,
    ) -> Outcome {
        let result = match AudioMessage::parse(&envelope, &self.settings.storage.staging_buckets) {
            Ok(message) => {
                tracing::Span::current().record("audio_id", tracing::field::display(message.audio_id));
                self.store_with_retries(&message).await
            }
            Err(error) => Err(Failure::from(error)),
        };
        match result {
            Ok(stored) => {
                if let Err(error) = delivery.ack().await {
                    // Not acked: the message comes back and identity makes the redelivery harmless.
                    // Keep the sources so that the redelivery finds them.
                    warn!(%error, error_kind = ErrorKind::PubsubUnavailable.as_str(), "ack not confirmed; keeping the sources");
                    return Outcome::Nacked(ErrorKind::PubsubUnavailable);
                }
                self.clean_up(&stored.cleanups).await;
                info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    audio = %stored.event.audio.uri,
                    thumbnail = stored.event.thumbnail.as_ref().map(|t| t.uri.as_str()),
                    written = stored.written,
                    "stored"
                );
                if stored.written {
                    Outcome::Stored
                } else {
                    Outcome::AlreadyStored
                }
            }
            Err(failure) if failure.is_permanent() => self.dead_letter(&envelope, delivery, &failure).await,
            Err(failure) => {
                warn!(
                    error = failure.message(),
                    error_kind = failure.kind().as_str(),
                    "giving up for now; nacking for redelivery"
                );
                delivery.nack();
                Outcome::Nacked(failure.kind())
            }
        }
    }

    fn backoff(&self) -> ExponentialBuilder {
        let retry = &self.settings.retry;
        ExponentialBuilder::default()
            .with_min_delay(retry.initial_backoff)
            .with_max_delay(retry.max_backoff)
            .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
            .with_jitter()
    }

    async fn store_with_retries(&self, message: &AudioMessage) -> Result<Stored, Failure> {
        (|| self.store_once(message))
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(|failure: &Failure| !failure.is_permanent())
            .notify(|failure: &Failure, delay| {
                self.metrics.retried(failure.kind());
                warn!(
                    error = failure.message(),
                    error_kind = failure.kind().as_str(),
                    delay_ms = delay.as_millis() as u64,
                    "retrying"
                );
            })
            .await
    }

    /// One attempt: both parts checked, then both stored, then the confirmed event.
    async fn store_once(&self, message: &AudioMessage) -> Result<Stored, Failure> {
        // Both sources are checked (allowed, present, right content) before anything is
        // uploaded, so a bad thumbnail does not leave an orphaned audio object behind.
        let thumbnail = async {
            match &message.thumbnail {
                Some(source) => self.prepare(message, Kind::Thumbnail, source).await.map(Some),
                None => Ok(None),
            }
        };
        let (audio, thumbnail) =
            tokio::try_join!(self.prepare(message, Kind::Audio, &message.audio), thumbnail)?;
        // Boxed: the SDK futures inside are large, and two of them run side by side.
        let thumbnail = async {
            match thumbnail {
                Some(prepared) => Box::pin(self.commit(prepared)).await.map(Some),
                None => Ok(None),
            }
        };
        let (audio, thumbnail) = tokio::try_join!(Box::pin(self.commit(audio)), thumbnail)?;
        let written = audio.written || thumbnail.as_ref().is_some_and(|t| t.written);
        let cleanups = [
            audio.cleanup.clone(),
            thumbnail.as_ref().and_then(|t| t.cleanup.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let event = StoredEvent {
            audio_id: message.audio_id.to_string(),
            audio: audio.object,
            thumbnail: thumbnail.map(|t| t.object),
            source: EventSource {
                message_id: message.message_id.clone(),
                audio: message.audio.to_string(),
                thumbnail: message.thumbnail.as_ref().map(Source::to_string),
            },
            metadata: message.metadata.clone(),
            stored_at: event::format_timestamp(jiff::Timestamp::now()),
        };
        self.events
            .publish(event.to_json(), StoredEvent::attributes(message.audio_id))
            .await?;
        Ok(Stored {
            event,
            written,
            cleanups,
        })
    }

    /// Checks one source: allowed, present (or already stored), the right kind of content.
    async fn prepare(
        &self,
        message: &AudioMessage,
        kind: Kind,
        source: &Source,
    ) -> Result<Prepared, Failure> {
        match source {
            Source::Local(path) => match source::open_local(
                path,
                &self.settings.sources.local_roots,
                store::RESUMABLE_THRESHOLD,
            )
            .await
            {
                Ok(file) => {
                    let content_type = checked_content(kind, source, &file.head, file.size)?;
                    Ok(Prepared::Local {
                        target: self.target(message, kind, source, content_type),
                        file,
                    })
                }
                Err(SourceError::Missing(what)) => self
                    .recover(message, kind, source, what)
                    .await
                    .map(Prepared::Stored),
                Err(error) => Err(error.into()),
            },
            Source::Gcs { bucket, object } => match self
                .store
                .open_staging(bucket, object, content::SNIFF_LEN)
                .await?
            {
                Some(staging) => {
                    let content_type = checked_content(kind, source, &staging.head, staging.info.size)?;
                    Ok(Prepared::Staging {
                        target: self.target(message, kind, source, content_type),
                        staging,
                    })
                }
                None => self
                    .recover(message, kind, source, source.to_string())
                    .await
                    .map(Prepared::Stored),
            },
        }
    }

    /// Stores a prepared file, or recognises an identical object as stored.
    async fn commit(&self, prepared: Prepared) -> Result<Part, Failure> {
        match prepared {
            Prepared::Stored(part) => Ok(part),
            Prepared::Local { target, file } => {
                let LocalFile {
                    path,
                    size,
                    crc32c,
                    mut content,
                    ..
                } = file;
                let cleanup = Some(Cleanup::Local(path.clone()));
                if let Some(existing) = self.existing_before_upload(&target, size).await? {
                    let crc32c = local_crc32c(&path, crc32c, Some(&mut content)).await?;
                    return self.existing_part(existing, crc32c, target.content_type, cleanup);
                }
                match self
                    .store
                    .upload_local(content, size, crc32c, &target.new_object())
                    .await?
                {
                    Written::Created(info) => {
                        Ok(created_part(&self.metrics, info, target.content_type, cleanup))
                    }
                    Written::AlreadyExists => {
                        // Lost a race with another delivery of the same message: compare with what it wrote.
                        let existing = self.archived_after_conflict(&target.name).await?;
                        let crc32c = local_crc32c(&path, crc32c, None).await?;
                        self.existing_part(existing, crc32c, target.content_type, cleanup)
                    }
                }
            }
            Prepared::Staging { target, staging } => {
                let cleanup = Some(Cleanup::Staging {
                    bucket: staging.info.bucket.clone(),
                    name: staging.info.name.clone(),
                    generation: staging.info.generation,
                });
                let source_crc32c = staging.info.crc32c;
                // Always looked up first (one small call): a redelivery copies nothing, and fake-gcs
                // does not honour the copy's if-generation-match=0.
                if let Some(existing) = self.store.archived(&target.name).await? {
                    return self.existing_part(existing, source_crc32c, target.content_type, cleanup);
                }
                match self.store.copy_staging(&staging, &target.new_object()).await? {
                    Written::Created(info) => {
                        Ok(created_part(&self.metrics, info, target.content_type, cleanup))
                    }
                    Written::AlreadyExists => {
                        let existing = self.archived_after_conflict(&target.name).await?;
                        self.existing_part(existing, source_crc32c, target.content_type, cleanup)
                    }
                }
            }
        }
    }

    /// Looks for an existing object before a large upload, so a redelivery does not send
    /// the whole file again. Small files skip the lookup: their one-request upload is
    /// conditional (if-generation-match=0), and a 412 leads to the same comparison.
    async fn existing_before_upload(
        &self,
        target: &Target,
        size: u64,
    ) -> Result<Option<ObjectInfo>, Failure> {
        if size < store::RESUMABLE_THRESHOLD {
            return Ok(None);
        }
        Ok(self.store.archived(&target.name).await?)
    }

    /// Where and how one file of a message is to be stored.
    fn target(
        &self,
        message: &AudioMessage,
        kind: Kind,
        source: &Source,
        content_type: ContentType,
    ) -> Target {
        Target {
            name: self.object_name(message, kind, source, content_type),
            content_type,
            metadata: object_metadata(message, kind, source),
        }
    }

    /// The source is gone: stored already by an earlier delivery that crashed after cleanup?
    async fn recover(
        &self,
        message: &AudioMessage,
        kind: Kind,
        source: &Source,
        what: String,
    ) -> Result<Part, Failure> {
        let missing = || Failure::new(ErrorKind::SourceMissing, format!("{kind}: {what} does not exist"));
        let Some(extension) = source.extension() else {
            return Err(missing());
        };
        let content_type = content::from_extension(extension.trim_start_matches('.'));
        let name = self.settings.storage.layout.render(
            message.audio_id,
            kind,
            &extension,
            Date::of(message.published),
        );
        let Some(existing) = self.store.archived(&name).await? else {
            return Err(missing());
        };
        let ours = existing.metadata.get("audio-id").map(String::as_str)
            == Some(message.audio_id.to_string().as_str())
            && existing.metadata.get("kind").map(String::as_str) == Some(kind.as_str());
        if !ours {
            return Err(missing());
        }
        info!(object = %store::uri(&existing.bucket, &existing.name), %kind, "source gone but object stored: a redelivery after cleanup");
        let mime = content_type.map(|c| c.mime).unwrap_or("application/octet-stream");
        Ok(Part {
            object: stored_object(existing, mime),
            written: false,
            cleanup: None,
        })
    }

    /// An object of this name exists: the same content counts as stored, other content is a conflict.
    fn existing_part(
        &self,
        existing: ObjectInfo,
        source_crc32c: u32,
        content_type: ContentType,
        cleanup: Option<Cleanup>,
    ) -> Result<Part, Failure> {
        if existing.crc32c != source_crc32c {
            return Err(Failure::new(
                ErrorKind::IdConflict,
                format!(
                    "{} exists with different content (crc32c {} there, {} in the source)",
                    store::uri(&existing.bucket, &existing.name),
                    store::crc32c_base64(existing.crc32c),
                    store::crc32c_base64(source_crc32c)
                ),
            ));
        }
        Ok(Part {
            object: stored_object(existing, content_type.mime),
            written: false,
            cleanup,
        })
    }

    async fn archived_after_conflict(&self, name: &str) -> Result<ObjectInfo, Failure> {
        self.store.archived(name).await?.ok_or_else(|| {
            Failure::new(
                ErrorKind::StorageUnavailable,
                format!(
                    "{} reported as existing but not found",
                    store::uri(self.store.bucket(), name)
                ),
            )
        })
    }

    fn object_name(
        &self,
        message: &AudioMessage,
        kind: Kind,
        source: &Source,
        content_type: ContentType,
    ) -> String {
        let extension = source
            .extension()
            .unwrap_or_else(|| format!(".{}", content_type.extension));
        self.settings
            .storage
            .layout
            .render(message.audio_id, kind, &extension, Date::of(message.published))
    }

    /// Deletes the sources; failures are logged, never fatal (the data is safe in the archive).
    async fn clean_up(&self, cleanups: &[Cleanup]) {
        let local: Vec<std::path::PathBuf> = cleanups
            .iter()
            .filter_map(|cleanup| match cleanup {
                Cleanup::Local(path) => Some(path.clone()),
                Cleanup::Staging { .. } => None,
            })
            .collect();
        // The local files go in one trip to the blocking pool.
        let removed = (!local.is_empty()).then(|| {
            tokio::task::spawn_blocking(move || {
                local
                    .iter()
                    .filter_map(|path| match std::fs::remove_file(path) {
                        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                            Some(format!("{}: {error}", path.display()))
                        }
                        _ => None,
                    })
                    .collect::<Vec<String>>()
            })
        });
        let mut errors = match removed {
            Some(task) => task.await.unwrap_or_else(|error| vec![error.to_string()]),
            None => Vec::new(),
        };
        for cleanup in cleanups {
            if let Cleanup::Staging {
                bucket,
                name,
                generation,
            } = cleanup
                && let Err(error) = self.store.delete(bucket, name, *generation).await
            {
                errors.push(error.to_string());
            }
        }
        for error in errors {
            warn!(%error, "stored and acked, but the source could not be removed");
        }
    }

    async fn dead_letter(&self, envelope: &Envelope, delivery: Delivery, failure: &Failure) -> Outcome {
        let kind = failure.kind();
        let Some(outbox) = &self.dead_letters else {
            warn!(
                error = failure.message(),
                error_kind = kind.as_str(),
                "permanent failure and no dead-letter topic; nacking"
            );
            delivery.nack();
            return Outcome::Nacked(kind);
        };
        let copy = dead_letter::copy(envelope, failure);
        if copy.data.len() < envelope.data.len() {
            warn!(
                bytes = envelope.data.len(),
                "the dead-letter copy goes without its data: the message would exceed Pub/Sub's size limit"
            );
        }
        let publish = || outbox.publish(copy.data.clone(), copy.attributes.clone());
        let published = publish.retry(self.backoff()).sleep(tokio::time::sleep).await;
        if let Err(error) = published {
            warn!(error = %chain(&error), error_kind = kind.as_str(), "dead-letter publish failed; nacking");
            delivery.nack();
            return Outcome::Nacked(ErrorKind::PubsubUnavailable);
        }
        if let Err(error) = delivery.ack().await {
            warn!(%error, "dead-lettered but the ack was not confirmed; it will come back");
        }
        warn!(
            error = failure.message(),
            error_kind = kind.as_str(),
            topic = outbox.topic(),
            "dead-lettered"
        );
        Outcome::DeadLettered(kind)
    }
}

async fn local_crc32c(
    path: &std::path::Path,
    known: Option<u32>,
    content: Option<&mut LocalContent>,
) -> Result<u32, Failure> {
    let mut reopened;
    let file = match (known, content) {
        (Some(crc32c), _) => return Ok(crc32c),
        (None, Some(LocalContent::Read(bytes))) => return Ok(crc32c::crc32c(bytes)),
        (None, Some(LocalContent::Open(file))) => file,
        (None, None) => {
            reopened = source::reopen(path).await?;
            &mut reopened
        }
    };
    source::crc32c_of_file(file).await.map_err(|error| {
        Failure::from(SourceError::Unreadable {
            path: path.display().to_string(),
            error,
        })
    })
}

/// Sniffs and checks the content of one file against what its kind requires.
fn checked_content(kind: Kind, source: &Source, head: &[u8], size: u64) -> Result<ContentType, Failure> {
    if size == 0 {
        return Err(Failure::new(
            ErrorKind::BadContent,
            format!("{kind}: {source} is empty"),
        ));
    }
    let extension = source.extension();
    let sniffed = content::sniff(head, extension.as_deref().map(|e| e.trim_start_matches('.')));
    let wanted = match kind {
        Kind::Audio => MediaClass::Audio,
        Kind::Thumbnail => MediaClass::Image,
    };
    match sniffed {
        Some(content_type) if content_type.class == wanted => Ok(content_type),
        Some(content_type) => Err(Failure::new(
            ErrorKind::BadContent,
            format!(
                "{kind}: {source} is {}, not {}",
                content_type.mime,
                expected(wanted)
            ),
        )),
        None => Err(Failure::new(
            ErrorKind::BadContent,
            format!("{kind}: {source} is not a recognised {} format", expected(wanted)),
        )),
    }
}

fn expected(class: MediaClass) -> &'static str {
    match class {
        MediaClass::Audio => "audio",
        MediaClass::Image => "an image",
    }
}

fn object_metadata(message: &AudioMessage, kind: Kind, source: &Source) -> BTreeMap<String, String> {
    let mut metadata = message.metadata.clone();
    metadata.insert("audio-id".into(), message.audio_id.to_string());
    metadata.insert("kind".into(), kind.as_str().into());
    metadata.insert("source-uri".into(), source.uri());
    metadata.insert("source-message-id".into(), message.message_id.clone());
    metadata
}

fn created_part(
    metrics: &Metrics,
    info: ObjectInfo,
    content_type: ContentType,
    cleanup: Option<Cleanup>,
) -> Part {
    metrics.uploaded(info.size);
    Part {
        object: stored_object(info, content_type.mime),
        written: true,
        cleanup,
    }
}

fn stored_object(info: ObjectInfo, content_type: &str) -> StoredObject {
    StoredObject {
        uri: store::uri(&info.bucket, &info.name),
        bucket: info.bucket,
        name: info.name,
        size: info.size,
        content_type: content_type.to_string(),
        crc32c: store::crc32c_base64(info.crc32c),
        md5: info.md5,
        generation: info.generation.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_must_match_the_kind() {
        let source = Source::Local("/spool/a.wav".into());
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let failure = checked_content(Kind::Audio, &source, png, 100).expect_err("a png is not audio");
        assert_eq!(failure.kind(), ErrorKind::BadContent);
        let failure = checked_content(Kind::Audio, &source, b"", 0).expect_err("empty");
        assert!(failure.message().contains("empty"), "{failure}");
        assert!(checked_content(Kind::Thumbnail, &source, png, 100).is_ok());
    }
}
