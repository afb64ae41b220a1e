//! A correction of fake-gcs, not a fault: a bucket's policy kept the way Cloud
//! Storage keeps it.
//!
//! fake-gcs 1.54 neither stores nor returns a bucket's `iamConfiguration` and
//! `lifecycle`, so a `setup` that applies a policy and then reads it back
//! would find it missing every time. With the correction on
//! ([`super::FaultProxy::keep_bucket_policies`]), the proxy reads the bodies
//! of bucket inserts (`POST /storage/v1/b`) and patches (`PATCH
//! /storage/v1/b/NAME`), keeps those fields of the ones fake-gcs accepted, and
//! adds them to fake-gcs's answers to bucket GETs (`GET /storage/v1/b/NAME`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Method, Response, Uri};
use serde_json::{Map, Value};

use super::connection::{Body, BoxError, full};
use super::lock;

/// The bucket fields fake-gcs drops.
const POLICY_FIELDS: [&str; 2] = ["iamConfiguration", "lifecycle"];

/// The policy fields of each bucket, by name.
#[derive(Default)]
pub(super) struct BucketPolicies {
    buckets: Mutex<BTreeMap<String, Map<String, Value>>>,
}

/// What a request does to a bucket.
enum Call<'a> {
    Insert,
    Patch(&'a str),
    Get(&'a str),
}

fn call<'a>(method: &Method, uri: &'a Uri) -> Option<Call<'a>> {
    let rest = uri.path().strip_prefix("/storage/v1/b")?;
    let name = rest
        .strip_prefix('/')
        .filter(|name| !name.is_empty() && !name.contains('/'));
    match (method, rest, name) {
        (&Method::POST, "", _) => Some(Call::Insert),
        (&Method::PATCH, _, Some(name)) => Some(Call::Patch(name)),
        (&Method::GET, _, Some(name)) => Some(Call::Get(name)),
        _ => None,
    }
}

impl BucketPolicies {
    /// Whether [`observe`](BucketPolicies::observe) needs the request body.
    pub(super) fn reads_body(&self, method: &Method, uri: &Uri) -> bool {
        matches!(call(method, uri), Some(Call::Insert | Call::Patch(_)))
    }

    /// Keeps the policy of an accepted insert or patch (with `request_body`),
    /// or adds the kept policy to a bucket's metadata.
    pub(super) async fn observe(
        &self,
        method: &Method,
        uri: &Uri,
        request_body: Option<&Bytes>,
        response: Response<Body>,
    ) -> Result<Response<Body>, BoxError> {
        let Some(call) = call(method, uri).filter(|_| response.status().is_success()) else {
            return Ok(response);
        };
        let sent: Value = request_body
            .and_then(|body| serde_json::from_slice(body).ok())
            .unwrap_or_default();
        let name = match call {
            Call::Insert => sent["name"].as_str(),
            Call::Patch(name) => Some(name),
            Call::Get(name) => {
                let (mut parts, body) = response.into_parts();
                let body = body.collect().await?.to_bytes();
                let Ok(mut bucket) = serde_json::from_slice::<Value>(&body) else {
                    return Ok(Response::from_parts(parts, full(body)));
                };
                for (field, value) in lock(&self.buckets).get(name).into_iter().flatten() {
                    bucket[field] = value.clone();
                }
                parts.headers.remove(CONTENT_LENGTH);
                parts.headers.remove(TRANSFER_ENCODING);
                return Ok(Response::from_parts(parts, full(serde_json::to_vec(&bucket)?)));
            }
        };
        let Some(name) = name else {
            return Ok(response);
        };
        let mut buckets = lock(&self.buckets);
        let policy = buckets.entry(name.to_string()).or_default();
        for field in POLICY_FIELDS {
            if let Some(value) = sent.get(field) {
                policy.insert(field.to_string(), value.clone());
            }
        }
        Ok(response)
    }
}
