//! Local files up into the archive: streamed, checksummed and checked after.

use super::*;

/// Files at least this large go up as a resumable upload hashed as it is
/// read (which survives a dropped connection without sending everything
/// again); smaller ones are hashed first and go up in one request with the
/// checksum the server verifies. (The crate can also send a checksum after
/// a one-request stream, as a trailing multipart part; fake-gcs stores such
/// uploads with the wrong bytes, so that is not used.)
pub const RESUMABLE_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Read size of a streamed (resumable) upload of a local file.
const READ_SIZE: usize = 256 * 1024;

impl Store {
    /// Writes a local file as `object` unless one of that name exists.
    ///
    /// `content` is the whole file in memory or the open file positioned at
    /// its start; `size` is its length. With the file's CRC32C known
    /// (`crc32c`), it goes up in one request that carries the checksum, which
    /// the server verifies before it creates the object. Without it (large
    /// files), it goes up in one resumable pass that hashes what it reads.
    /// Either way the written object's size and CRC32C are compared with the
    /// file's before this returns `Created`: a server that finalised a
    /// truncated upload (as fake-gcs does when a resumed upload's status is
    /// queried) is caught here, the bad object deleted and the failure
    /// reported as transient.
    pub async fn upload_local(
        &self,
        content: LocalContent,
        size: u64,
        crc32c: Option<u32>,
        object: &NewObject<'_>,
    ) -> Result<Written, StoreError> {
        let failed = |cause: StoreCause| StoreError {
            operation: "upload",
            target: uri(&self.bucket, object.name),
            cause,
        };
        let (result, expected) = match content {
            LocalContent::Read(bytes) => {
                let crc32c = crc32c.unwrap_or_else(|| crc32c::crc32c(&bytes));
                let upload = self
                    .conditional_write(object, bytes)
                    .with_known_crc32c(crc32c)
                    .send_unbuffered();
                (Box::pin(upload).await, crc32c)
            }
            LocalContent::Open(mut file) => {
                let crc32c = match crc32c {
                    None if size < RESUMABLE_THRESHOLD => Some(
                        source::crc32c_of_file(&mut file)
                            .await
                            .map_err(|error| failed(error.into()))?,
                    ),
                    known => known,
                };
                match crc32c {
                    Some(crc32c) => {
                        let upload = self
                            .conditional_write(object, file)
                            .with_known_crc32c(crc32c)
                            .send_unbuffered();
                        (Box::pin(upload).await, crc32c)
                    }
                    None => self.upload_hashing(file, size, object).await.map_err(failed)?,
                }
            }
        };
        let result = match result {
            Err(error) => Err(self.discard_mismatched(error).await),
            ok => ok,
        };
        let written = self.written(result).map_err(failed)?;
        let Written::Created(info) = written else {
            return Ok(written);
        };
        self.verified(info, size, expected).await.map_err(failed)
    }

    /// An upload the server finalised with other bytes than were sent (the
    /// SDK's checksum mismatch, e.g. a source cut short while it streamed)
    /// leaves a corrupt object behind: delete that generation, so that a
    /// retry can write the right one, and report the error as it was.
    async fn discard_mismatched(&self, error: google_cloud_storage::Error) -> google_cloud_storage::Error {
        use google_cloud_storage::error::WriteError;
        let mismatched = std::error::Error::source(&error)
            .and_then(|source| source.downcast_ref::<WriteError>())
            .and_then(|write| match write {
                WriteError::ChecksumMismatch { object, .. } => Some((object.name.clone(), object.generation)),
                _ => None,
            });
        if let Some((name, generation)) = mismatched {
            match self.delete(&self.bucket, &name, generation).await {
                Ok(()) => {
                    tracing::warn!(object = %uri(&self.bucket, &name), generation, "deleted an upload the server stored with other bytes than were sent")
                }
                Err(delete) => {
                    tracing::warn!(error = %delete, "could not delete an upload stored with other bytes than were sent")
                }
            }
        }
        error
    }

    /// Streams `file` up in one resumable pass that hashes what it reads;
    /// returns the result and the file's CRC32C.
    async fn upload_hashing(
        &self,
        file: tokio::fs::File,
        size: u64,
        object: &NewObject<'_>,
    ) -> Result<
        (
            Result<google_cloud_storage::model::Object, google_cloud_storage::Error>,
            u32,
        ),
        StoreCause,
    > {
        let mut verify_with = file.try_clone().await?;
        let (source, hash) = HashingFile::new(file);
        let upload = self
            .conditional_write(object, source)
            .with_checksum_precomputation(false)
            .send_unbuffered();
        let result = Box::pin(upload).await;
        let complete = hash.lock().ok().and_then(|state| state.complete(size));
        let crc32c = match (complete, &result) {
            (Some(crc32c), _) => crc32c,
            // Nothing was written: the checksum is not needed.
            (None, Err(_)) => 0,
            // The upload was resumed mid-file, so the running hash is incomplete: read it again.
            (None, Ok(_)) => source::crc32c_of_file(&mut verify_with).await?,
        };
        Ok((result, crc32c))
    }

    /// A write of `object` into the archive that fails with 412 if the name is taken.
    fn conditional_write<T, P>(&self, object: &NewObject<'_>, payload: T) -> WriteObject<P>
    where
        T: Into<Payload<P>>,
    {
        let write = self
            .client
            .write_object(
                format!("projects/_/buckets/{}", self.bucket),
                object.name,
                payload,
            )
            .set_if_generation_match(0)
            .set_content_type(object.content_type)
            .set_metadata(object.metadata.clone());
        match object.storage_class {
            Some(class) => write.set_storage_class(class),
            None => write,
        }
    }

    /// Checks a freshly written object against the source's size and CRC32C;
    /// deletes it and fails (transiently) if they differ.
    pub(super) async fn verified(
        &self,
        info: ObjectInfo,
        size: u64,
        crc32c: u32,
    ) -> Result<Written, StoreCause> {
        if info.size == size && info.crc32c == crc32c {
            return Ok(Written::Created(info));
        }
        let problem = format!(
            "the stored object does not match its source (size {} vs {size}, crc32c {} vs {}); deleted it to retry",
            info.size,
            crc32c_base64(info.crc32c),
            crc32c_base64(crc32c)
        );
        if let Err(error) = self.delete(&info.bucket, &info.name, info.generation).await {
            tracing::warn!(%error, "could not delete a corrupted upload");
        }
        Err(StoreCause::Corrupted(problem))
    }

    fn written(
        &self,
        result: Result<google_cloud_storage::model::Object, google_cloud_storage::Error>,
    ) -> Result<Written, StoreCause> {
        match result {
            Ok(object) => Ok(Written::Created(ObjectInfo {
                bucket: self.bucket.clone(),
                name: object.name,
                size: u64::try_from(object.size).unwrap_or_default(),
                crc32c: object
                    .checksums
                    .as_ref()
                    .and_then(|c| c.crc32c)
                    .ok_or_else(|| StoreCause::Malformed("the written object has no crc32c".into()))?,
                md5: object
                    .checksums
                    .as_ref()
                    .filter(|c| !c.md5_hash.is_empty())
                    .map(|c| BASE64.encode(&c.md5_hash)),
                generation: object.generation,
                metadata: object.metadata,
                storage_class: Some(object.storage_class).filter(|class| !class.is_empty()),
            })),
            Err(error) if error.http_status_code() == Some(412) => Ok(Written::AlreadyExists),
            Err(error) => Err(error.into()),
        }
    }
}

/// The running CRC32C of a file as the upload reads it.
#[derive(Debug, Default)]
struct HashState {
    crc32c: u32,
    hashed: u64,
    /// False once the upload resumed somewhere other than where the hash stands.
    valid: bool,
}

impl HashState {
    /// The CRC32C of the whole file, if every byte went through the hash exactly once.
    fn complete(&self, size: u64) -> Option<u32> {
        (self.valid && self.hashed == size).then_some(self.crc32c)
    }
}

/// A local file as an upload source that hashes what it reads, so large
/// files are read once and still verified end to end.
struct HashingFile {
    file: tokio::fs::File,
    state: std::sync::Arc<std::sync::Mutex<HashState>>,
}

impl HashingFile {
    fn new(file: tokio::fs::File) -> (HashingFile, std::sync::Arc<std::sync::Mutex<HashState>>) {
        let state = std::sync::Arc::new(std::sync::Mutex::new(HashState {
            valid: true,
            ..HashState::default()
        }));
        (
            HashingFile {
                file,
                state: state.clone(),
            },
            state,
        )
    }
}

impl StreamingSource for HashingFile {
    type Error = std::io::Error;

    async fn next(&mut self) -> Option<Result<Bytes, Self::Error>> {
        let mut buffer = vec![0_u8; READ_SIZE];
        match self.file.read(&mut buffer).await {
            Err(error) => Some(Err(error)),
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                if let Ok(mut state) = self.state.lock() {
                    state.crc32c = crc32c::crc32c_append(state.crc32c, &buffer);
                    state.hashed += read as u64;
                }
                Some(Ok(Bytes::from(buffer)))
            }
        }
    }

    async fn size_hint(&self) -> Result<SizeHint, Self::Error> {
        Ok(SizeHint::with_exact(self.file.metadata().await?.len()))
    }
}

impl Seek for HashingFile {
    type Error = std::io::Error;

    async fn seek(&mut self, offset: u64) -> Result<(), Self::Error> {
        use tokio::io::AsyncSeekExt as _;
        self.file.seek(std::io::SeekFrom::Start(offset)).await?;
        if let Ok(mut state) = self.state.lock() {
            if offset == 0 {
                *state = HashState {
                    valid: true,
                    ..HashState::default()
                };
            } else if offset != state.hashed {
                state.valid = false;
            }
        }
        Ok(())
    }
}

/// The GCS form of a CRC32C: base64 of the big-endian value.
pub fn crc32c_base64(crc32c: u32) -> String {
    BASE64.encode(crc32c.to_be_bytes())
}
