//! A recording proxy in front of fake-gcs for the bucket control plane.
//!
//! fake-gcs 1.54 neither stores nor returns a bucket's `iamConfiguration` and
//! `lifecycle`. This proxy forwards every request to fake-gcs unchanged,
//! records the bucket inserts and patches it sees, keeps the policy fields
//! they set, and adds them to fake-gcs's answers to bucket GETs, the way
//! real Cloud Storage would answer. It also records object rewrites (their
//! destination resource, e.g. the storage class, which fake-gcs ignores).
//! Everything else is fake-gcs's own answer.

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The bucket fields fake-gcs drops.
const POLICY_FIELDS: [&str; 2] = ["iamConfiguration", "lifecycle"];

/// A bucket insert or patch, or an object rewrite, that the proxy saw: method, path and JSON body.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `POST` (insert) or `PATCH`.
    pub method: Method,
    /// The request path.
    pub path: String,
    /// The JSON body.
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Memory {
    recorded: Vec<Recorded>,
    /// Policy fields by bucket name.
    policies: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    client: reqwest::Client,
    memory: Arc<Mutex<Memory>>,
}

/// A running proxy; stops when dropped.
pub struct BucketProxy {
    endpoint: String,
    memory: Arc<Mutex<Memory>>,
    task: tokio::task::JoinHandle<()>,
}

impl BucketProxy {
    /// Starts a proxy for `upstream` (`http://127.0.0.X`) on a free port of 127.0.0.1.
    pub async fn start(upstream: &str) -> anyhow::Result<BucketProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let memory = Arc::new(Mutex::new(Memory::default()));
        let shared = Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            memory: memory.clone(),
        };
        let router = axum::Router::new().fallback(forward).with_state(shared);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(BucketProxy {
            endpoint,
            memory,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket inserts and patches and the rewrites seen so far, and forgets them.
    pub fn take_recorded(&self) -> Vec<Recorded> {
        std::mem::take(
            &mut self
                .memory
                .lock()
                .map(|mut memory| std::mem::take(&mut memory.recorded))
                .unwrap_or_default(),
        )
    }
}

impl Drop for BucketProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(shared): State<Shared>, request: Request) -> Response {
    match forward_inner(&shared, request).await {
        Ok(response) => response,
        Err(error) => (StatusCode::BAD_GATEWAY, format!("bucket proxy: {error:#}")).into_response(),
    }
}

async fn forward_inner(shared: &Shared, request: Request) -> anyhow::Result<Response> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .context("reading the request")?;
    let path = parts.uri.path().to_string();
    let target = format!(
        "{}{}",
        shared.upstream,
        parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    );
    let bucket_path = path.strip_prefix("/storage/v1/b");
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let written = match (bucket_path, &json) {
        (Some(rest), Some(json)) => match (&parts.method, rest) {
            (&Method::POST, "") => json["name"].as_str().map(str::to_string),
            (&Method::PATCH, name) => name
                .strip_prefix('/')
                .filter(|n| !n.contains('/'))
                .map(str::to_string),
            _ => None,
        },
        _ => None,
    };
    let rewrite =
        parts.method == Method::POST && bucket_path.is_some_and(|rest| rest.contains("/rewriteTo/"));
    let mut upstream = shared
        .client
        .request(parts.method.clone(), &target)
        .body(body.to_vec());
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            upstream = upstream.header(name, value);
        }
    }
    let answer = upstream.send().await.context("forwarding to fake-gcs")?;
    let status = answer.status();
    if let (true, Some(json)) = (written.is_some() || rewrite, &json) {
        let mut memory = shared.memory.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        memory.recorded.push(Recorded {
            method: parts.method.clone(),
            path: path.clone(),
            body: json.clone(),
        });
        // What the bucket keeps: only what a successful insert or patch set.
        if let (true, Some(name)) = (status.is_success(), written) {
            let policy = memory.policies.entry(name).or_default();
            for field in POLICY_FIELDS {
                if let Some(value) = json.get(field) {
                    policy.insert(field.to_string(), value.clone());
                }
            }
        }
    }
    let headers = answer.headers().clone();
    let mut bytes = answer
        .bytes()
        .await
        .context("reading fake-gcs's answer")?
        .to_vec();
    let bucket_get = parts.method == Method::GET
        && bucket_path.is_some_and(|rest| rest.len() > 1 && !rest[1..].contains('/'));
    if bucket_get && status.is_success() {
        let name = &path["/storage/v1/b/".len()..];
        if let (Ok(mut resource), Ok(memory)) = (
            serde_json::from_slice::<serde_json::Value>(&bytes),
            shared.memory.lock(),
        ) {
            for (field, value) in memory.policies.get(name).into_iter().flatten() {
                resource[field] = value.clone();
            }
            bytes = serde_json::to_vec(&resource)?;
        }
    }
    let mut response = Response::builder().status(status.as_u16());
    for (name, value) in &headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            response = response.header(name, value);
        }
    }
    Ok(response.body(Body::from(bytes))?)
}
