//! A correction of fake-gcs, not a fault: status queries of resumable uploads
//! answered the way Cloud Storage answers them.
//!
//! When a chunk of a resumable upload fails (a connection reset part-way, an
//! error status), the storage client asks the session what it holds: `PUT
//! <session URL>` with `Content-Range: bytes */*` and no body. Cloud Storage
//! answers `308` with `Range: bytes=0-N` for the bytes it persisted (no
//! `Range` when none), or, once the upload is finalized, with the object's
//! metadata. fake-gcs 1.54 instead takes the query for the last chunk: it
//! finalizes the object with the bytes it has and answers with its metadata,
//! and the client takes that for the upload's success. Behind a fault that
//! interrupts uploads, fake-gcs would so store truncated objects that no real
//! server would, and a test would check fake-gcs rather than the product.
//!
//! With the correction on ([`super::FaultProxy::correct_resumable_status`]),
//! the proxy answers status queries itself (they never reach fake-gcs), from
//! what fake-gcs answered to the session's chunks: the `Range` of its last
//! `308`, or the response that finalized the upload.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::header::{CONTENT_RANGE, HeaderValue, RANGE};
use hyper::http::request;
use hyper::{Method, Response, StatusCode, Uri};

use super::connection::{Body, BoxError, full};
use super::lock;

/// The answer to a status query of each upload session seen, by `upload_id`.
#[derive(Default)]
pub(super) struct ResumableStatus {
    answers: Mutex<HashMap<String, Response<Bytes>>>,
}

impl ResumableStatus {
    /// The answer to `request` if it is a status query of an upload session.
    pub(super) fn answer(&self, request: &request::Parts) -> Option<Response<Body>> {
        let query = request.method == Method::PUT
            && request
                .headers
                .get(CONTENT_RANGE)
                .is_some_and(|range| range == "bytes */*");
        let id = upload_id(&request.uri).filter(|_| query)?;
        let answer = lock(&self.answers).get(id).cloned();
        Some(answer.unwrap_or_else(|| incomplete(None)).map(full))
    }

    /// Notes what fake-gcs answered to a chunk of an upload session: a `308`
    /// with the `Range` it persisted, or the response that finalized it.
    pub(super) async fn observe(
        &self,
        method: &Method,
        uri: &Uri,
        response: Response<Body>,
    ) -> Result<Response<Body>, BoxError> {
        let Some(id) = upload_id(uri).filter(|_| method == Method::PUT) else {
            return Ok(response);
        };
        if response.status() == StatusCode::PERMANENT_REDIRECT {
            let answer = incomplete(response.headers().get(RANGE).cloned());
            lock(&self.answers).insert(id.to_string(), answer);
            return Ok(response);
        }
        if !response.status().is_success() {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let finalized = Response::from_parts(parts, body.collect().await?.to_bytes());
        lock(&self.answers).insert(id.to_string(), finalized.clone());
        Ok(finalized.map(full))
    }
}

/// Cloud Storage's answer about an unfinished upload: `308`, with the
/// `Range` persisted if any was.
fn incomplete(range: Option<HeaderValue>) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Some(range) = range {
        response.headers_mut().insert(RANGE, range);
    }
    response
}

/// The `upload_id` of a session URL.
fn upload_id(uri: &Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("upload_id="))
        .filter(|id| !id.is_empty())
}
