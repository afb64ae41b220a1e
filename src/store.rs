//! The store: the only module that talks to Cloud Storage.
//!
//! Data moves through the official `google-cloud-storage` client
//! (`write_object`, and `read_object` for the head of a staging object),
//! streamed and CRC32C-checked. The calls the crate's control client would
//! make (object metadata, the server-side copy of a staging object, delete,
//! create bucket) go through the JSON API with the same credentials: that
//! client is gRPC-only, which no local emulator speaks, and real GCS serves
//! the JSON API as well.

use crate::config::{Endpoint, LifecycleAction, LifecycleRule, StorageSettings};
use crate::source::{self, LocalContent};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use google_cloud_auth::credentials::{CacheableResource, Credentials};
use google_cloud_gax::retry_policy::RetryPolicyExt as _;
use google_cloud_storage::builder::storage::WriteObject;
use google_cloud_storage::client::Storage;
use google_cloud_storage::retry_policy::RetryableErrors;
use google_cloud_storage::streaming_source::{Payload, Seek, SizeHint, StreamingSource};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::io::AsyncReadExt as _;

/// Files at least this large go up as a resumable upload hashed as it is
/// read (which survives a dropped connection without sending everything
/// again); smaller ones are hashed first and go up in one request with the
/// checksum the server verifies. (The crate can also send a checksum after
/// a one-request stream, as a trailing multipart part; fake-gcs stores such
/// uploads with the wrong bytes, so that is not used.)
pub const RESUMABLE_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Read size of a streamed (resumable) upload of a local file.
const READ_SIZE: usize = 256 * 1024;
/// Timeout of one control-plane request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed storage operation: what was attempted on which object, and why.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {target}: {cause}")]
pub struct StoreError {
    /// What was attempted (`upload`, `read`, `delete`, ...).
    pub operation: &'static str,
    /// `gs://bucket/name` or the bucket.
    pub target: String,
    /// The underlying failure.
    pub cause: StoreCause,
}

/// The underlying failure of a storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreCause {
    /// An error from the official client.
    #[error(transparent)]
    Client(#[from] google_cloud_storage::Error),
    /// The JSON API answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The error message from the body (truncated).
        message: String,
    },
    /// The JSON API request did not complete.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// Credentials could not produce request headers.
    #[error("credentials: {0}")]
    Credentials(String),
    /// Reading the local file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server kept different bytes than were sent.
    #[error("{0}")]
    Corrupted(String),
    /// A response without a field that must be there.
    #[error("unexpected response: {0}")]
    Malformed(String),
}

impl StoreCause {
    /// The HTTP status code, where the failure had one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            StoreCause::Client(error) => error.http_status_code(),
            StoreCause::Status { status, .. } => Some(*status),
            StoreCause::Transport(error) => error.status().map(|s| s.as_u16()),
            _ => None,
        }
    }
}

/// What the archive knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The bucket.
    pub bucket: String,
    /// The object name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC32C of the content.
    pub crc32c: u32,
    /// MD5, base64, where the server reported one.
    pub md5: Option<String>,
    /// The generation.
    pub generation: i64,
    /// Custom metadata.
    pub metadata: HashMap<String, String>,
    /// The storage class, where the server reported one.
    pub storage_class: Option<String>,
}

/// The result of a conditional (if-generation-match=0) write.
#[derive(Debug)]
pub enum Written {
    /// The object was created by this write.
    Created(ObjectInfo),
    /// An object of that name already existed; nothing was written.
    AlreadyExists,
}

/// The properties of an object about to be written.
#[derive(Debug, Clone)]
pub struct NewObject<'a> {
    /// The object name in the archive bucket.
    pub name: &'a str,
    /// The sniffed content type.
    pub content_type: &'a str,
    /// Custom metadata.
    pub metadata: &'a BTreeMap<String, String>,
    /// The storage class to write it in; `None`: the bucket's default.
    pub storage_class: Option<&'a str>,
}

/// How many bytes [`ObjectReader`] reads at a time.
pub const RANGE_WINDOW: u64 = 256 * 1024;

/// An object read by ranges as a blocking `Read + Seek` (see [`Store::reader`]).
pub struct ObjectReader {
    store: Store,
    object: ObjectInfo,
    runtime: tokio::runtime::Handle,
    position: u64,
    /// The last range read: its offset and bytes.
    window: (u64, Bytes),
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.position >= self.object.size || buffer.is_empty() {
            return Ok(0);
        }
        let (start, bytes) = &self.window;
        let inside = self.position >= *start && self.position < start + bytes.len() as u64;
        if !inside {
            let read = self
                .runtime
                .block_on(self.store.read_range(&self.object, self.position, RANGE_WINDOW))
                .map_err(std::io::Error::other)?;
            if read.is_empty() {
                return Ok(0);
            }
            self.window = (self.position, read);
        }
        let (start, bytes) = &self.window;
        let from = (self.position - start) as usize;
        let count = buffer.len().min(bytes.len() - from);
        buffer[..count].copy_from_slice(&bytes[from..from + count]);
        self.position += count as u64;
        Ok(count)
    }
}

impl std::io::Seek for ObjectReader {
    fn seek(&mut self, position: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match position {
            std::io::SeekFrom::Start(offset) => Some(offset),
            std::io::SeekFrom::End(delta) => self.object.size.checked_add_signed(delta),
            std::io::SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
        };
        self.position = target.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.position)
    }
}

/// The archive: a Cloud Storage client bound to one bucket.
#[derive(Clone, Debug)]
pub struct Store {
    client: Storage,
    http: reqwest::Client,
    json_base: String,
    credentials: Credentials,
    bucket: String,
}

impl Store {
    /// Builds the clients for `settings` (no network call yet).
    pub async fn connect(settings: &StorageSettings) -> Result<Store, StoreError> {
        let failed = |cause: StoreCause| StoreError {
            operation: "connect",
            target: settings.bucket.clone(),
            cause,
        };
        let (credentials, json_base) = match &settings.endpoint {
            Endpoint::Custom { url, emulator: true } => (
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
                url.clone(),
            ),
            Endpoint::Custom { url, emulator: false } => {
                (default_credentials().map_err(failed)?, url.clone())
            }
            Endpoint::Google => (
                default_credentials().map_err(failed)?,
                "https://storage.googleapis.com".to_string(),
            ),
        };
        let mut builder = Storage::builder()
            .with_credentials(credentials.clone())
            .with_retry_policy(
                RetryableErrors
                    .with_attempt_limit(3)
                    .with_time_limit(Duration::from_secs(60)),
            )
            .with_resumable_upload_threshold(RESUMABLE_THRESHOLD as usize);
        if !matches!(settings.endpoint, Endpoint::Google) {
            builder = builder.with_endpoint(json_base.clone());
        }
        let client = builder.build().await.map_err(|error| {
            failed(StoreCause::Malformed(format!(
                "cannot build the storage client: {error}"
            )))
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| failed(error.into()))?;
        Ok(Store {
            client,
            http,
            json_base,
            credentials,
            bucket: settings.bucket.clone(),
        })
    }

    /// The archive bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Checks that the archive bucket exists and can be listed with these credentials.
    ///
    /// Listing needs only `storage.objects.list` (object viewer), unlike
    /// reading the bucket's own metadata.
    pub async fn check_bucket(&self) -> Result<(), StoreError> {
        let url = format!("{}/storage/v1/b/{}/o", self.json_base, encode(&self.bucket));
        let request = self
            .http
            .get(url)
            .query(&[("maxResults", "1"), ("fields", "kind")]);
        let failed = |cause: StoreCause| StoreError {
            operation: "list",
            target: format!("gs://{}", self.bucket),
            cause,
        };
        checked(self.send(request).await.map_err(failed)?)
            .await
            .map_err(failed)?;
        Ok(())
    }

    /// The archive object `name`, if it exists.
    pub async fn archived(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.object(&self.bucket, name).await
    }

    /// Any object's properties, if it exists.
    pub async fn object(&self, bucket: &str, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let url = self.object_url(bucket, name);
        let failed = |cause: StoreCause| StoreError {
            operation: "stat",
            target: uri(bucket, name),
            cause,
        };
        let response = self.send(self.http.get(url)).await.map_err(failed)?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: serde_json::Value = checked(response)
            .await
            .map_err(failed)?
            .json()
            .await
            .map_err(|e| failed(e.into()))?;
        object_from_json(&body).map(Some).map_err(failed)
    }

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

    /// Reads `len` bytes of an object's generation from `offset` (fewer at its end).
    pub async fn read_range(&self, object: &ObjectInfo, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let failed = |cause: StoreCause| StoreError {
            operation: "read",
            target: uri(&object.bucket, &object.name),
            cause,
        };
        if len == 0 || offset >= object.size {
            return Ok(Bytes::new());
        }
        let read = Box::pin(
            self.client
                .read_object(format!("projects/_/buckets/{}", object.bucket), &object.name)
                .set_generation(object.generation)
                .set_read_range(google_cloud_storage::model_ext::ReadRange::segment(offset, len))
                .send(),
        )
        .await;
        let mut response = read.map_err(|error| failed(error.into()))?;
        let mut bytes = Vec::with_capacity(len.min(object.size - offset) as usize);
        while (bytes.len() as u64) < len {
            match response.next().await {
                None => break,
                Some(Err(error)) => return Err(failed(error.into())),
                Some(Ok(chunk)) => bytes.extend_from_slice(&chunk),
            }
        }
        bytes.truncate(len as usize);
        Ok(bytes.into())
    }

    /// A blocking reader of one object's generation by ranged reads, for the
    /// media probe (which seeks): it reads [`RANGE_WINDOW`] bytes at a time.
    /// Use it only off the runtime (on the blocking pool).
    pub fn reader(&self, object: &ObjectInfo) -> ObjectReader {
        ObjectReader {
            store: self.clone(),
            object: object.clone(),
            runtime: tokio::runtime::Handle::current(),
            position: 0,
            window: (0, Bytes::new()),
        }
    }

    /// Copies a staging object into the archive as `object`, server-side
    /// (the JSON API's rewrite: the bytes do not pass through the worker),
    /// unless an object of that name exists. The copy is pinned to the
    /// generation that was looked up, and the new object's size and CRC32C
    /// are compared with the source's before this returns `Created`.
    pub async fn copy_staging(
        &self,
        source: &ObjectInfo,
        object: &NewObject<'_>,
    ) -> Result<Written, StoreError> {
        let failed = |cause: StoreCause| StoreError {
            operation: "copy",
            target: uri(&self.bucket, object.name),
            cause,
        };
        let url = format!(
            "{}/rewriteTo/b/{}/o/{}",
            self.object_url(&source.bucket, &source.name),
            encode(&self.bucket),
            encode(object.name)
        );
        let mut body = serde_json::json!({
            "contentType": object.content_type,
            "metadata": object.metadata,
        });
        if let Some(class) = object.storage_class {
            body["storageClass"] = class.into();
        }
        // Large copies between locations or storage classes take several calls.
        let mut token: Option<String> = None;
        let info = loop {
            let mut query = vec![
                ("ifGenerationMatch", "0".to_string()),
                ("sourceGeneration", source.generation.to_string()),
            ];
            if let Some(token) = &token {
                query.push(("rewriteToken", token.clone()));
            }
            let request = self.http.post(&url).query(&query).json(&body);
            let response = self.send(request).await.map_err(failed)?;
            if response.status() == reqwest::StatusCode::PRECONDITION_FAILED {
                return Ok(Written::AlreadyExists);
            }
            let reply: serde_json::Value = checked(response)
                .await
                .map_err(failed)?
                .json()
                .await
                .map_err(|error| failed(error.into()))?;
            if reply["done"].as_bool() == Some(true) {
                break object_from_json(&reply["resource"]).map_err(failed)?;
            }
            token = Some(
                reply["rewriteToken"]
                    .as_str()
                    .filter(|token| !token.is_empty())
                    .ok_or_else(|| {
                        failed(StoreCause::Malformed(
                            "an unfinished rewrite without a rewriteToken".into(),
                        ))
                    })?
                    .to_string(),
            );
        };
        self.verified(info, source.size, source.crc32c)
            .await
            .map_err(failed)
    }

    /// Deletes `bucket/name` if it is still at `generation`; an already-deleted object is fine.
    pub async fn delete(&self, bucket: &str, name: &str, generation: i64) -> Result<(), StoreError> {
        let url = self.object_url(bucket, name);
        let failed = |cause: StoreCause| StoreError {
            operation: "delete",
            target: uri(bucket, name),
            cause,
        };
        let request = self
            .http
            .delete(url)
            .query(&[("ifGenerationMatch", generation.to_string())]);
        let response = self.send(request).await.map_err(failed)?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        checked(response).await.map_err(failed)?;
        Ok(())
    }

    /// Creates the archive bucket, with uniform bucket-level access, public
    /// access prevention and `rules`, unless it exists; `true` if it was created.
    pub async fn create_bucket(&self, project: &str, rules: &[LifecycleRule]) -> Result<bool, StoreError> {
        let failed = |cause: StoreCause| StoreError {
            operation: "create bucket",
            target: format!("gs://{}", self.bucket),
            cause,
        };
        let mut body = bucket_policy(rules);
        body["name"] = self.bucket.clone().into();
        let request = self
            .http
            .post(format!("{}/storage/v1/b", self.json_base))
            .query(&[("project", project)])
            .json(&body);
        let response = self.send(request).await.map_err(failed)?;
        if response.status() == reqwest::StatusCode::CONFLICT {
            return Ok(false);
        }
        checked(response).await.map_err(failed)?;
        Ok(true)
    }

    /// Makes the archive bucket's policy what `setup` wants (uniform
    /// bucket-level access, public access prevention enforced, `rules` as its
    /// lifecycle), patching only what differs; returns what was changed
    /// (empty: nothing was sent).
    pub async fn reconcile_bucket_policy(
        &self,
        rules: &[LifecycleRule],
    ) -> Result<Vec<&'static str>, StoreError> {
        let failed = |operation: &'static str| {
            move |cause: StoreCause| StoreError {
                operation,
                target: format!("gs://{}", self.bucket),
                cause,
            }
        };
        let url = format!("{}/storage/v1/b/{}", self.json_base, encode(&self.bucket));
        let request = self
            .http
            .get(&url)
            .query(&[("fields", "iamConfiguration,lifecycle")]);
        let current: serde_json::Value = checked(self.send(request).await.map_err(failed("get bucket"))?)
            .await
            .map_err(failed("get bucket"))?
            .json()
            .await
            .map_err(|error| failed("get bucket")(error.into()))?;
        let wanted = bucket_policy(rules);
        let mut patch = serde_json::Map::new();
        let mut changed = Vec::new();
        let iam = &current["iamConfiguration"];
        if iam["uniformBucketLevelAccess"]["enabled"] != true {
            changed.push("uniform bucket-level access");
        }
        if iam["publicAccessPrevention"] != "enforced" {
            changed.push("public access prevention");
        }
        if !changed.is_empty() {
            patch.insert("iamConfiguration".into(), wanted["iamConfiguration"].clone());
        }
        if lifecycle_rules(&current) != lifecycle_rules(&wanted) {
            changed.push("lifecycle rules");
            patch.insert("lifecycle".into(), wanted["lifecycle"].clone());
        }
        if patch.is_empty() {
            return Ok(changed);
        }
        let request = self.http.patch(&url).json(&serde_json::Value::Object(patch));
        checked(self.send(request).await.map_err(failed("patch bucket"))?)
            .await
            .map_err(failed("patch bucket"))?;
        Ok(changed)
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

    /// The JSON API URL of `bucket/name`.
    fn object_url(&self, bucket: &str, name: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.json_base,
            encode(bucket),
            encode(name)
        )
    }

    /// Checks a freshly written object against the source's size and CRC32C;
    /// deletes it and fails (transiently) if they differ.
    async fn verified(&self, info: ObjectInfo, size: u64, crc32c: u32) -> Result<Written, StoreCause> {
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

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, StoreCause> {
        let headers = match self
            .credentials
            .headers(http::Extensions::new())
            .await
            .map_err(|error| StoreCause::Credentials(error.to_string()))?
        {
            CacheableResource::New { data, .. } => data,
            CacheableResource::NotModified => http::HeaderMap::new(),
        };
        Ok(request.headers(headers).timeout(CONTROL_TIMEOUT).send().await?)
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

/// The bucket fields `setup` sets: uniform bucket-level access, public access
/// prevention and the lifecycle rules, in the JSON API's shape.
fn bucket_policy(rules: &[LifecycleRule]) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .map(|rule| {
            let action = match rule.action {
                LifecycleAction::Delete => serde_json::json!({"type": "Delete"}),
                LifecycleAction::SetStorageClass(class) => {
                    serde_json::json!({"type": "SetStorageClass", "storageClass": class})
                }
            };
            let mut condition = serde_json::json!({"age": rule.age_days});
            if !rule.matches_prefix.is_empty() {
                condition["matchesPrefix"] = rule.matches_prefix.clone().into();
            }
            serde_json::json!({"action": action, "condition": condition})
        })
        .collect();
    serde_json::json!({
        "iamConfiguration": {
            "uniformBucketLevelAccess": {"enabled": true},
            "publicAccessPrevention": "enforced",
        },
        "lifecycle": {"rule": rules},
    })
}

/// A bucket resource's lifecycle rules reduced to what `setup` sets, for comparing.
fn lifecycle_rules(bucket: &serde_json::Value) -> Vec<(String, String, i64, Vec<String>)> {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_string();
    bucket["lifecycle"]["rule"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|rule| {
                    let prefixes = rule["condition"]["matchesPrefix"]
                        .as_array()
                        .map(|prefixes| prefixes.iter().map(text).collect())
                        .unwrap_or_default();
                    (
                        text(&rule["action"]["type"]),
                        text(&rule["action"]["storageClass"]),
                        rule["condition"]["age"].as_i64().unwrap_or(-1),
                        prefixes,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `gs://bucket/name`.
pub fn uri(bucket: &str, name: &str) -> String {
    format!("gs://{bucket}/{name}")
}

fn default_credentials() -> Result<Credentials, StoreCause> {
    google_cloud_auth::credentials::Builder::default()
        .build()
        .map_err(|error| StoreCause::Credentials(error.to_string()))
}

async fn checked(response: reqwest::Response) -> Result<reqwest::Response, StoreCause> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    Err(StoreCause::Status {
        status,
        message: message.chars().take(300).collect(),
    })
}

fn object_from_json(body: &serde_json::Value) -> Result<ObjectInfo, StoreCause> {
    let text = |field: &str| body[field].as_str().map(str::to_string);
    let number = |field: &str| -> Result<i64, StoreCause> {
        match &body[field] {
            serde_json::Value::String(text) => text.parse().ok(),
            serde_json::Value::Number(number) => number.as_i64(),
            _ => None,
        }
        .ok_or_else(|| StoreCause::Malformed(format!("object without {field}")))
    };
    let crc32c = text("crc32c")
        .and_then(|encoded| BASE64.decode(encoded).ok())
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreCause::Malformed("object without crc32c".into()))?;
    let metadata = body["metadata"]
        .as_object()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|(key, value)| value.as_str().map(|v| (key.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(ObjectInfo {
        bucket: text("bucket").unwrap_or_default(),
        name: text("name").unwrap_or_default(),
        size: u64::try_from(number("size")?).unwrap_or_default(),
        crc32c,
        md5: text("md5Hash").filter(|md5| !md5.is_empty()),
        generation: number("generation")?,
        metadata,
        storage_class: text("storageClass").filter(|class| !class.is_empty()),
    })
}

/// What a JSON API path segment keeps unencoded: RFC 3986 unreserved characters.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one URL path segment (object names contain `/`).
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_encoded_the_way_gcs_does() {
        // The well-known CRC32C of "hello world" is 0xc99465aa ("yZRlqg==" in GCS listings).
        assert_eq!(crc32c_base64(crc32c::crc32c(b"hello world")), "yZRlqg==");
    }

    #[test]
    fn object_names_are_encoded_as_one_path_segment() {
        assert_eq!(encode("audio/a b/x.flac"), "audio%2Fa%20b%2Fx.flac");
    }

    #[test]
    fn object_json_is_read_with_string_numbers() -> Result<(), StoreCause> {
        let json = serde_json::json!({
            "bucket": "b", "name": "n", "size": "11", "generation": "1700000000000001",
            "crc32c": "yZRlqg==", "md5Hash": "XrY7u+Ae7tCTyyK7j1rNww==", "metadata": {"audio-id": "x"}
        });
        let info = object_from_json(&json)?;
        assert_eq!(info.size, 11);
        assert_eq!(info.crc32c, crc32c::crc32c(b"hello world"));
        assert_eq!(info.generation, 1_700_000_000_000_001);
        assert_eq!(info.metadata.get("audio-id").map(String::as_str), Some("x"));
        Ok(())
    }
}
