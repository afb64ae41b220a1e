//! One file of a message: checked and probed (prepare), written (commit), or
//! recognised as stored already (recover).

use super::Pipeline;
use super::cleanup::Cleanup;
use crate::content::{self, ContentType, MediaClass};
use crate::error::{Failure, Problem, chain};
use crate::event::{EventMedia, StoredObject};
use crate::layout::{Date, Kind};
use crate::media::{self, Media, ProbeError, Probed};
use crate::message::AudioMessage;
use crate::metrics::Metrics;
use crate::source::{self, LocalContent, LocalFile, Source, SourceError};
use crate::store::{self, NewObject, ObjectInfo, Written};
use std::collections::BTreeMap;
use tracing::info;

/// One stored file: the event's description of it, and the source to remove once acked.
#[derive(Debug)]
pub(super) struct Part {
    pub(super) object: StoredObject,
    pub(super) written: bool,
    pub(super) cleanup: Option<Cleanup>,
}

/// One file of a message, checked and ready to store.
pub(super) enum Prepared {
    /// A local file, read or open.
    Local { target: Target, file: LocalFile },
    /// A staging object, looked up (its generation pinned) and probed.
    Staging { target: Target, staging: ObjectInfo },
    /// The source is gone but its object is in the archive (a crash after cleanup).
    Stored(Part),
}

/// The archive object a file goes to, and what the probe found in the file.
pub(super) struct Target {
    name: String,
    content_type: ContentType,
    media: Media,
    metadata: BTreeMap<String, String>,
    storage_class: Option<&'static str>,
}

impl Target {
    fn new_object(&self) -> NewObject<'_> {
        NewObject {
            name: &self.name,
            content_type: self.content_type.mime,
            metadata: &self.metadata,
            storage_class: self.storage_class,
        }
    }
}

impl Prepared {
    /// What storing it does (`upload` or `copy`) and to which object; `None` when it is stored already.
    pub(super) fn operation(&self) -> Option<(&'static str, &str)> {
        match self {
            Prepared::Local { target, .. } => Some(("upload", &target.name)),
            Prepared::Staging { target, .. } => Some(("copy", &target.name)),
            Prepared::Stored(_) => None,
        }
    }
}

impl Pipeline {
    /// Checks one source: allowed, present (or already stored), the right kind of content.
    pub(super) async fn prepare(
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
                Ok(mut file) => {
                    let probed = probe_local(kind, source, &mut file).await?;
                    Ok(Prepared::Local {
                        target: self.target(message, kind, source, probed)?,
                        file,
                    })
                }
                Err(SourceError::Missing(what)) => {
                    self.recover(message, kind, what).await.map(Prepared::Stored)
                }
                Err(error) => Err(error.into()),
            },
            Source::Gcs { bucket, object } => match self.store.object(bucket, object).await? {
                Some(staging) => {
                    let reader = self.store.reader(&staging);
                    let probed =
                        probe(kind, source, ProbeInput::Object(Box::new(reader)), staging.size).await?;
                    Ok(Prepared::Staging {
                        target: self.target(message, kind, source, probed)?,
                        staging,
                    })
                }
                None => self
                    .recover(message, kind, source.to_string())
                    .await
                    .map(Prepared::Stored),
            },
        }
    }

    /// Stores a prepared file, or recognises an identical object as stored.
    pub(super) async fn commit(&self, prepared: Prepared) -> Result<Part, Failure> {
        match prepared {
            Prepared::Stored(part) => Ok(part),
            Prepared::Local { target, file } => {
                let LocalFile {
                    path,
                    size,
                    crc32c,
                    mut content,
                    entry,
                    ..
                } = file;
                let cleanup = Some(Cleanup::Local(entry));
                if let Some(existing) = self.existing_before_upload(&target, size).await? {
                    let crc32c = local_crc32c(&path, crc32c, &mut content).await?;
                    return self.existing_part(existing, crc32c, &target, cleanup);
                }
                // The same open file, for a comparison after the upload consumed `content`:
                // never the path again, which may name another file by then.
                let mut twin = match (&content, crc32c) {
                    (LocalContent::Open(file), None) => Some(LocalContent::Open(
                        file.try_clone().await.map_err(|error| unreadable(&path, error))?,
                    )),
                    _ => None,
                };
                match self
                    .store
                    .upload_local(content, size, crc32c, &target.new_object())
                    .await?
                {
                    Written::Created(info) => Ok(created_part(&self.metrics, info, &target, cleanup)),
                    Written::AlreadyExists => {
                        // Lost a race with another delivery of the same message: compare with what it wrote.
                        let existing = self.archived_after_conflict(&target.name).await?;
                        let crc32c = match (crc32c, &mut twin) {
                            (Some(crc32c), _) => crc32c,
                            (None, Some(twin)) => local_crc32c(&path, None, twin).await?,
                            (None, None) => {
                                unreachable!("a file without a known CRC32C is open and has a twin")
                            }
                        };
                        self.existing_part(existing, crc32c, &target, cleanup)
                    }
                }
            }
            Prepared::Staging { target, staging } => {
                let cleanup = Some(Cleanup::Staging {
                    bucket: staging.bucket.clone(),
                    name: staging.name.clone(),
                    generation: staging.generation,
                });
                let source_crc32c = staging.crc32c;
                // Always looked up first (one small call): a redelivery copies nothing, and fake-gcs
                // does not honour the copy's if-generation-match=0.
                if let Some(existing) = self.store.archived(&target.name).await? {
                    return self.existing_part(existing, source_crc32c, &target, cleanup);
                }
                match self.store.copy_staging(&staging, &target.new_object()).await? {
                    Written::Created(info) => Ok(created_part(&self.metrics, info, &target, cleanup)),
                    Written::AlreadyExists => {
                        let existing = self.archived_after_conflict(&target.name).await?;
                        self.existing_part(existing, source_crc32c, &target, cleanup)
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
        probed: Probed<Media>,
    ) -> Result<Target, Failure> {
        let Probed { content_type, media } = probed;
        Ok(Target {
            name: self.object_name(message, kind, content_type)?,
            content_type,
            metadata: object_metadata(message, kind, source, &media)?,
            media,
            storage_class: self.settings.storage.storage_class,
        })
    }

    /// The source is gone: stored already by an earlier delivery that crashed after cleanup?
    ///
    /// Object names depend on the content, not on the source's name, so the
    /// object is looked for under every name its kind can have (one lookup
    /// per canonical extension, at once); it counts only if its metadata says
    /// it is this message's.
    async fn recover(&self, message: &AudioMessage, kind: Kind, what: String) -> Result<Part, Failure> {
        let lookups = content::of_class(media_class(kind)).map(|content_type| async move {
            let name = self.object_name(message, kind, content_type)?;
            let found = self.store.archived(&name).await?;
            Ok::<_, Failure>(found.map(|existing| (existing, content_type)))
        });
        let found = futures::future::try_join_all(lookups).await?;
        let ours = |existing: &ObjectInfo| {
            existing.metadata.get("audio-id").map(String::as_str)
                == Some(message.audio_id.to_string().as_str())
                && existing.metadata.get("kind").map(String::as_str) == Some(kind.as_str())
        };
        let Some((existing, content_type)) = found.into_iter().flatten().find(|(existing, _)| ours(existing))
        else {
            return Err(Problem::SourceGone(format!("{kind}: {what} does not exist")).into());
        };
        info!(object = %store::uri(&existing.bucket, &existing.name), %kind, "source gone but object stored: a redelivery after cleanup");
        // The event says what the file holds, as the first one did: probe the stored object.
        let object = Source::Gcs {
            bucket: existing.bucket.clone(),
            object: existing.name.clone(),
        };
        let reader = self.store.reader(&existing);
        let probed = probe(kind, &object, ProbeInput::Object(Box::new(reader)), existing.size).await?;
        Ok(Part {
            object: stored_object(
                existing,
                content_type,
                &probed.media,
                self.settings.storage.storage_class,
            ),
            written: false,
            cleanup: None,
        })
    }

    /// An object of this name exists: the same content counts as stored, other content is a conflict.
    fn existing_part(
        &self,
        existing: ObjectInfo,
        source_crc32c: u32,
        target: &Target,
        cleanup: Option<Cleanup>,
    ) -> Result<Part, Failure> {
        if existing.crc32c != source_crc32c {
            return Err(Failure::from(Problem::OtherContent(format!(
                "{} exists with different content (crc32c {} there, {} in the source)",
                store::uri(&existing.bucket, &existing.name),
                store::crc32c_base64(existing.crc32c),
                store::crc32c_base64(source_crc32c)
            ))));
        }
        Ok(Part {
            object: stored_object(existing, target.content_type, &target.media, target.storage_class),
            written: false,
            cleanup,
        })
    }

    async fn archived_after_conflict(&self, name: &str) -> Result<ObjectInfo, Failure> {
        self.store.archived(name).await?.ok_or_else(|| {
            Failure::from(Problem::StorageInconsistent(format!(
                "{} reported as existing but not found",
                store::uri(self.store.bucket(), name)
            )))
        })
    }

    /// The object name: from the identity, the kind, the canonical extension of
    /// the content and the original publish date; never from the source's name.
    fn object_name(
        &self,
        message: &AudioMessage,
        kind: Kind,
        content_type: ContentType,
    ) -> Result<String, Failure> {
        self.settings
            .storage
            .layout
            .render(
                message.audio_id,
                kind,
                &format!(".{}", content_type.extension),
                Date::of(message.published),
                &message.metadata,
            )
            .map_err(|error| Failure::from(Problem::InvalidMetadata(error.to_string())))
    }
}

/// CRC32C of a local source, for comparing with an existing object: the one
/// known since it was opened, or read from `content` (the bytes, or the open
/// file, which is left at its start).
async fn local_crc32c(
    path: &std::path::Path,
    known: Option<u32>,
    content: &mut LocalContent,
) -> Result<u32, Failure> {
    match (known, content) {
        (Some(crc32c), _) => Ok(crc32c),
        (None, LocalContent::Read(bytes)) => Ok(crc32c::crc32c(bytes)),
        (None, LocalContent::Open(file)) => source::crc32c_of_file(file)
            .await
            .map_err(|error| unreadable(path, error)),
    }
}

fn unreadable(path: &std::path::Path, error: std::io::Error) -> Failure {
    Failure::from(SourceError::Unreadable {
        path: path.display().to_string(),
        error,
    })
}

fn media_class(kind: Kind) -> MediaClass {
    match kind {
        Kind::Audio => MediaClass::Audio,
        Kind::Thumbnail => MediaClass::Image,
    }
}

/// Bytes of one file for the probe, which reads them on the blocking pool.
enum ProbeInput {
    /// A small local file, read whole.
    Bytes(bytes::Bytes),
    /// A larger local file: a duplicate of its descriptor.
    File(std::fs::File),
    /// An object in a bucket, read by ranges.
    Object(Box<store::ObjectReader>),
}

/// Probes a file as its kind requires (see [`media::probe`]); what is not
/// playable audio or a usable image is `bad_content` with the reason, a
/// failed read a transient failure.
async fn probe(kind: Kind, source: &Source, input: ProbeInput, size: u64) -> Result<Probed<Media>, Failure> {
    let class = media_class(kind);
    // In the message's span, so that what the demuxers log says which message it is about.
    let span = tracing::Span::current();
    let probed = tokio::task::spawn_blocking(move || {
        span.in_scope(|| match input {
            ProbeInput::Bytes(bytes) => media::probe(class, std::io::Cursor::new(bytes), size),
            ProbeInput::File(file) => media::probe(class, file, size),
            ProbeInput::Object(reader) => media::probe(class, *reader, size),
        })
    })
    .await
    .map_err(|error| {
        Failure::from(Problem::ProbeFailed(format!(
            "{kind}: {source}: the probe failed: {error}"
        )))
    })?;
    probed.map_err(|error| match error {
        ProbeError::NotMedia(reason) => {
            Failure::from(Problem::NotMedia(format!("{kind}: {source} {reason}")))
        }
        // Not the content's fault: the same kinds as any other failed read of a source.
        ProbeError::Unreadable(error) => match source {
            Source::Local(path) => unreadable(path, error),
            Source::Gcs { .. } => Failure::from(Problem::ObjectUnreadable(format!(
                "{kind}: {source} cannot be read for the probe: {}",
                chain(&error)
            ))),
        },
    })
}

/// Probes an opened local file: its bytes in memory, or a duplicate of its
/// descriptor (the file is left at its start for the upload).
async fn probe_local(kind: Kind, source: &Source, file: &mut LocalFile) -> Result<Probed<Media>, Failure> {
    let size = file.size;
    match &mut file.content {
        LocalContent::Read(bytes) => probe(kind, source, ProbeInput::Bytes(bytes.clone()), size).await,
        LocalContent::Open(open) => {
            let twin = open
                .try_clone()
                .await
                .map_err(|error| unreadable(&file.path, error))?
                .into_std()
                .await;
            let probed = probe(kind, source, ProbeInput::File(twin), size).await;
            tokio::io::AsyncSeekExt::rewind(open)
                .await
                .map_err(|error| unreadable(&file.path, error))?;
            probed
        }
    }
}

/// Most bytes of custom metadata (keys and values) GCS accepts on one object.
const MAX_OBJECT_METADATA_BYTES: usize = 8 * 1024;

/// The object's custom metadata: the message's plus the reserved keys; an
/// `invalid_message` if together they exceed GCS's 8 KiB (a long source path
/// with a large metadata map), which no retry could fix.
fn object_metadata(
    message: &AudioMessage,
    kind: Kind,
    source: &Source,
    media: &Media,
) -> Result<BTreeMap<String, String>, Failure> {
    let mut metadata = message.metadata.clone();
    for (key, value) in media.object_metadata() {
        metadata.insert(key.into(), value);
    }
    metadata.insert("audio-id".into(), message.audio_id.to_string());
    metadata.insert("kind".into(), kind.as_str().into());
    metadata.insert("source-uri".into(), source.uri());
    metadata.insert("source-message-id".into(), message.message_id.clone());
    let bytes: usize = metadata.iter().map(|(key, value)| key.len() + value.len()).sum();
    if bytes > MAX_OBJECT_METADATA_BYTES {
        return Err(Failure::from(Problem::InvalidMetadata(format!(
            "{kind}: the object metadata would be {bytes} bytes (the message's metadata plus source-uri and the other reserved keys), more than the {MAX_OBJECT_METADATA_BYTES} Cloud Storage allows"
        ))));
    }
    Ok(metadata)
}

fn created_part(metrics: &Metrics, info: ObjectInfo, target: &Target, cleanup: Option<Cleanup>) -> Part {
    metrics.uploaded(info.size);
    Part {
        object: stored_object(info, target.content_type, &target.media, target.storage_class),
        written: true,
        cleanup,
    }
}

/// The event's description of a stored object; `storage_class` is reported when one is configured.
fn stored_object(
    info: ObjectInfo,
    content_type: ContentType,
    media: &Media,
    storage_class: Option<&str>,
) -> StoredObject {
    let storage_class = storage_class.map(|configured| {
        info.storage_class
            .clone()
            .unwrap_or_else(|| configured.to_string())
    });
    StoredObject {
        uri: store::uri(&info.bucket, &info.name),
        bucket: info.bucket,
        name: info.name,
        size: info.size,
        content_type: content_type.mime.to_string(),
        crc32c: store::crc32c_base64(info.crc32c),
        md5: info.md5,
        generation: info.generation.to_string(),
        media: EventMedia::from(media),
        storage_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[tokio::test]
    async fn content_must_match_the_kind() {
        let source = Source::Local("/spool/a.wav".into());
        let png = bytes::Bytes::from_static(include_bytes!("../../tests/fixtures/media/png.png"));
        let size = png.len() as u64;
        let failure = probe(Kind::Audio, &source, ProbeInput::Bytes(png.clone()), size)
            .await
            .expect_err("a png is not audio");
        assert_eq!(failure.kind(), ErrorKind::BadContent);
        assert!(
            failure.message().starts_with("audio: /spool/a.wav is not"),
            "{failure}"
        );
        let failure = probe(Kind::Audio, &source, ProbeInput::Bytes(bytes::Bytes::new()), 0)
            .await
            .expect_err("empty");
        assert!(failure.message().contains("empty"), "{failure}");
        let probed = probe(Kind::Thumbnail, &source, ProbeInput::Bytes(png), size).await;
        assert!(
            matches!(probed, Ok(Probed { media: Media::Image(image), .. }) if image.width == 40),
            "{probed:?}"
        );
    }
}
