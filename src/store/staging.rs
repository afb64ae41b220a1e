//! Staging objects: read by ranges (for the probe) and copied server-side into the archive.

use super::*;

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

impl Store {
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
            let reply: json_api::Rewrite = checked(response)
                .await
                .map_err(failed)?
                .json()
                .await
                .map_err(|error| failed(error.into()))?;
            match reply {
                json_api::Rewrite {
                    done: true,
                    resource: Some(resource),
                    ..
                } => break object_info(resource).map_err(failed)?,
                json_api::Rewrite {
                    done: false,
                    rewrite_token: Some(next),
                    ..
                } if !next.is_empty() => token = Some(next),
                _ => {
                    return Err(failed(StoreCause::Malformed(
                        "a rewrite neither done with its object nor with a rewriteToken".into(),
                    )));
                }
            }
        };
        self.verified(info, source.size, source.crc32c)
            .await
            .map_err(failed)
    }
}
