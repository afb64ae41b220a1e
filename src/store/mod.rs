//! The store: the only module that talks to Cloud Storage.
//!
//! Data moves through the official `google-cloud-storage` client
//! (`write_object`, and `read_object` for the head of a staging object),
//! streamed and CRC32C-checked. The calls the crate's control client would
//! make (object metadata, the server-side copy of a staging object, delete,
//! create bucket) go through the JSON API with the same credentials: that
//! client is gRPC-only, which no local emulator speaks, and real GCS serves
//! the JSON API as well.
//!
//! The files: `upload.rs` (local files up, streamed and checked),
//! `staging.rs` (staging objects: ranged reads and the server-side copy),
//! `bucket.rs` (the archive bucket's creation and policy, for `setup`),
//! `json_api.rs` (the JSON API's answers and bodies, typed).

mod bucket;
mod json_api;
mod staging;
mod upload;

pub use staging::{ObjectReader, RANGE_WINDOW};
pub use upload::{RESUMABLE_THRESHOLD, crc32c_base64};

use crate::config::{Endpoint, LifecycleRule, StorageSettings};
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
    /// The probed content type.
    pub content_type: &'a str,
    /// Custom metadata.
    pub metadata: &'a BTreeMap<String, String>,
    /// The storage class to write it in; `None`: the bucket's default.
    pub storage_class: Option<&'a str>,
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
        let body: json_api::Object = checked(response)
            .await
            .map_err(failed)?
            .json()
            .await
            .map_err(|e| failed(e.into()))?;
        object_info(body).map(Some).map_err(failed)
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

    /// The JSON API URL of `bucket/name`.
    fn object_url(&self, bucket: &str, name: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.json_base,
            encode(bucket),
            encode(name)
        )
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
    let message = serde_json::from_str::<json_api::ErrorAnswer>(&body)
        .map(|answer| answer.error.message)
        .unwrap_or(body);
    Err(StoreCause::Status {
        status,
        message: message.chars().take(300).collect(),
    })
}

/// The store's view of an object resource; fails without the fields every object has.
fn object_info(object: json_api::Object) -> Result<ObjectInfo, StoreCause> {
    let missing = |field: &str| StoreCause::Malformed(format!("object without {field}"));
    let crc32c = object
        .crc32c
        .and_then(|encoded| BASE64.decode(encoded).ok())
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| missing("crc32c"))?;
    Ok(ObjectInfo {
        bucket: object.bucket,
        name: object.name,
        size: u64::try_from(object.size.ok_or_else(|| missing("size"))?.get()).unwrap_or_default(),
        crc32c,
        md5: object.md5_hash.filter(|md5| !md5.is_empty()),
        generation: object.generation.ok_or_else(|| missing("generation"))?.get(),
        metadata: object
            .metadata
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?)))
            .collect(),
        storage_class: object.storage_class.filter(|class| !class.is_empty()),
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
        let object =
            serde_json::from_value(json).map_err(|error| StoreCause::Malformed(error.to_string()))?;
        let info = object_info(object)?;
        assert_eq!(info.size, 11);
        assert_eq!(info.crc32c, crc32c::crc32c(b"hello world"));
        assert_eq!(info.generation, 1_700_000_000_000_001);
        assert_eq!(info.metadata.get("audio-id").map(String::as_str), Some("x"));
        Ok(())
    }
}
