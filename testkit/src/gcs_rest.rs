//! A Cloud Storage client over fake-gcs's JSON API (`/storage/v1/...`),
//! independent of the code under test, to set up buckets and check objects.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::env::PROJECT;
use crate::http::{client, encode, parse_json, send};

/// Metadata of one object, as the JSON API reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectInfo {
    /// Object name.
    pub name: String,
    /// Size in bytes (a decimal string in the API).
    #[serde(deserialize_with = "decimal")]
    pub size: u64,
    /// CRC32C, base64 of the big-endian u32 (compare with [`crc32c_base64`]).
    #[serde(default)]
    pub crc32c: String,
    /// MD5, base64 (absent for composite objects on real GCS).
    #[serde(rename = "md5Hash")]
    pub md5: Option<String>,
    /// Generation, a decimal string.
    #[serde(default)]
    pub generation: String,
    /// Custom metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Storage class.
    pub storage_class: Option<String>,
}

/// A number that the JSON API sends as a decimal string (int64 fields).
fn decimal<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectList {
    #[serde(default)]
    items: Vec<ObjectInfo>,
    next_page_token: Option<String>,
}

/// CRC32C in the GCS format: base64 of the big-endian u32.
pub fn crc32c_base64(bytes: &[u8]) -> String {
    gcs_form(crc32c::crc32c(bytes))
}

/// [`crc32c_base64`] of a file's content, read in 1 MiB chunks.
pub fn crc32c_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    loop {
        match file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?
        {
            0 => return Ok(gcs_form(crc)),
            read => crc = crc32c::crc32c_append(crc, &buffer[..read]),
        }
    }
}

fn gcs_form(crc32c: u32) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(crc32c.to_be_bytes())
}

/// A Cloud Storage client of fake-gcs. Create one per test: its HTTP client
/// is bound to the tokio runtime it is first used on.
#[derive(Clone)]
pub struct GcsRest {
    endpoint: String,
    http: reqwest::Client,
}

impl GcsRest {
    /// A client for `endpoint` (`http://127.0.0.X`).
    pub fn new(endpoint: &str) -> GcsRest {
        GcsRest {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            http: client(),
        }
    }

    fn object_url(&self, bucket: &str, name: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.endpoint,
            encode(bucket),
            encode(name)
        )
    }

    /// Creates a bucket in [`PROJECT`]; an existing one is fine (409).
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let url = format!("{}/storage/v1/b?project={}", self.endpoint, encode(PROJECT));
        let request = self.http.post(url).json(&json!({ "name": bucket }));
        send(request, &format!("creating bucket {bucket}"), &[409]).await?;
        Ok(())
    }

    /// Uploads `bytes` as `bucket/name` (single-shot media upload,
    /// `application/octet-stream`), replacing any existing object.
    pub async fn upload(&self, bucket: &str, name: &str, bytes: &[u8]) -> Result<ObjectInfo> {
        let what = format!("uploading gs://{bucket}/{name}");
        let url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=media&name={}",
            self.endpoint,
            encode(bucket),
            encode(name)
        );
        let request = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec());
        let (_, body) = send(request, &what, &[]).await?;
        parse_json(&body, &what)
    }

    /// Metadata of `bucket/name`, or `None` when the object (or the bucket) does
    /// not exist.
    pub async fn object(&self, bucket: &str, name: &str) -> Result<Option<ObjectInfo>> {
        let what = format!("getting gs://{bucket}/{name}");
        let (status, body) = send(self.http.get(self.object_url(bucket, name)), &what, &[404]).await?;
        if status == 404 {
            return Ok(None);
        }
        parse_json(&body, &what).map(Some)
    }

    /// All objects of `bucket` whose names start with `prefix` (`""` for all),
    /// following every page, in name order.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let what = format!("listing gs://{bucket}/{prefix}*");
        let mut objects = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/storage/v1/b/{}/o?prefix={}",
                self.endpoint,
                encode(bucket),
                encode(prefix)
            );
            if let Some(token) = &page_token {
                url.push_str(&format!("&pageToken={}", encode(token)));
            }
            let (_, body) = send(self.http.get(url), &what, &[]).await?;
            let page: ObjectList = parse_json(&body, &what)?;
            objects.extend(page.items);
            match page.next_page_token {
                Some(token) if !token.is_empty() => page_token = Some(token),
                _ => return Ok(objects),
            }
        }
    }

    /// The names of the objects [`list`](GcsRest::list) finds, in name order.
    pub async fn names(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let objects = self.list(bucket, prefix).await?;
        Ok(objects.into_iter().map(|object| object.name).collect())
    }

    /// The content of `bucket/name` (`alt=media`), in memory.
    pub async fn download(&self, bucket: &str, name: &str) -> Result<Vec<u8>> {
        let what = format!("downloading gs://{bucket}/{name}");
        let url = format!("{}?alt=media", self.object_url(bucket, name));
        Ok(send(self.http.get(url), &what, &[]).await?.1)
    }
}
