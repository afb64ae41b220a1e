//! A fault-injecting HTTP/1.1 proxy between the code under test and fake-gcs-server.
//!
//! [`FaultProxy`] listens on port 80 of its own loopback address `127.0.0.Y`
//! and forwards every request to one upstream (`http://127.0.0.X`). It must be
//! port 80: the storage client sends the Host header without a port and
//! fake-gcs builds resumable-upload session URLs from it, so those URLs point
//! back at the proxy (on any other port, at port 80 of the proxy's address,
//! where nothing listens). Host headers are forwarded untouched.
//!
//! Each client connection is served by hyper's HTTP/1.1 server and forwarded
//! over a hyper client connection of its own ([`connection`]). Faults apply
//! per request: error statuses, latency, upload throttling, random faults,
//! and resets part-way through a request body or when the response begins.
//! hyper cannot reset a connection (an aborted exchange ends with a FIN), so
//! resets are done around it, on the sockets hyper gives back: an RST to the
//! client and to fake-gcs, which then drops the unfinished body.
//!
//! Two corrections make fake-gcs answer as Cloud Storage does; they are not
//! faults, so a test turns on the one it needs: [`resumable_status`] and
//! [`bucket_policy`]. [`record`](FaultProxy::record) keeps chosen requests
//! for a test to look at.
//!
//! The proxy runs on its own thread with its own tokio runtime, so it does not
//! depend on the runtime of the test that owns it, and stops on drop. Every
//! injected fault is logged to stderr.

mod bucket_policy;
mod connection;
mod faults;
mod resumable_status;
mod upload;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use bucket_policy::BucketPolicies;
use faults::{Faults, RandomFaults, Rule};
use hyper::{Method, StatusCode};
use resumable_status::ResumableStatus;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::emulators::{claim_loopback_address, release_loopback_address};

/// What the proxy did so far; see [`FaultProxy::stats`].
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    /// Requests received from clients.
    pub requests: u64,
    /// Requests answered with an injected error status.
    pub failed: u64,
    /// Requests whose connections were reset.
    pub resets: u64,
    /// Request body bytes forwarded upstream.
    pub bytes_up: u64,
}

/// A request that [`FaultProxy::record`] asked for.
#[derive(Debug)]
pub struct Recorded {
    /// The request method.
    pub method: Method,
    /// The request path, without the query.
    pub path: String,
    /// The JSON body (`Null` when the body is not JSON).
    pub body: serde_json::Value,
}

/// A fault-injecting HTTP/1.1 proxy in front of one upstream, for one test.
///
/// Runs on its own thread with its own tokio runtime; stops (and frees its
/// address) on drop.
pub struct FaultProxy {
    address: Ipv4Addr,
    shared: Arc<Shared>,
    /// Ends the accept loop, and with it the thread and its runtime.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy for `upstream` (`http://HOST[:PORT]`) on port 80 of a
    /// free loopback address 127.0.0.Y, with no faults.
    pub fn start(upstream: &str) -> Result<FaultProxy> {
        let uri: hyper::Uri = upstream
            .parse()
            .with_context(|| format!("the upstream {upstream:?}"))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "the upstream {upstream:?} is not an http:// URL"
        );
        let host = uri.host().context("an upstream without a host")?;
        let upstream = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        let address = claim_loopback_address()?;
        // The address is given back on drop, or here if the proxy does not start.
        FaultProxy::serve(address, upstream).inspect_err(|_| release_loopback_address(address))
    }

    /// Listens on port 80 of `address` and forwards to `upstream` (`HOST:PORT`).
    fn serve(address: Ipv4Addr, upstream: String) -> Result<FaultProxy> {
        let listener = std::net::TcpListener::bind((address, 80))
            .with_context(|| format!("binding port 80 of {address}"))?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fault proxy's runtime")?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener).context("registering the proxy listener")?
        };
        let shared = Arc::new(Shared {
            name: format!("fault-proxy {address} -> {upstream}"),
            upstream,
            faults: Mutex::default(),
            throttle: Mutex::new(Instant::now()),
            stats: Mutex::default(),
            recording: Mutex::default(),
            resumable_status: OnceLock::new(),
            bucket_policies: OnceLock::new(),
        });
        let (stop, stopped) = oneshot::channel();
        let accepting = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{address}"))
            .spawn(move || runtime.block_on(connection::accept(accepting, listener, stopped)))
            .context("spawning the fault proxy's thread")?;
        Ok(FaultProxy {
            address,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Base URL, `http://127.0.0.Y` (port 80, so no port in the URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The next `count` requests get `status` (e.g. 503) with a small JSON
    /// error body and `Connection: close`, without reaching upstream. Replaces
    /// an earlier `fail_next`; 0 clears it.
    pub fn fail_next(&self, count: usize, status: u16) {
        let mut faults = self.shared.faults();
        (faults.fail_next, faults.fail_status) = (count, status_code(status));
    }

    /// The next `count` requests whose `METHOD target` (e.g.
    /// `PUT /upload/storage/v1/b/B/o?uploadType=resumable&upload_id=..`)
    /// contains `needle` get `status`, as with `fail_next`. Rules add up; the
    /// oldest matching rule applies.
    pub fn fail_matching(&self, needle: &str, count: usize, status: u16) {
        if count > 0 {
            self.shared.faults().matching.push(Rule {
                needle: needle.to_string(),
                remaining: count,
                status: status_code(status),
            });
        }
    }

    /// The next `count` requests with a body of at least `after_bytes` are
    /// forwarded for `after_bytes` bytes of body, then both connections are
    /// reset (a connection drop mid-upload). A chunked body counts once it
    /// reaches `after_bytes`. When `after_bytes` is the whole body, the
    /// request reaches the upstream completely and the reset comes when its
    /// response begins: the request took effect, the client does not learn
    /// of it. Replaces an earlier `reset_next`; 0 clears it.
    pub fn reset_next(&self, count: usize, after_bytes: u64) {
        let mut faults = self.shared.faults();
        (faults.resets, faults.reset_after) = (count, after_bytes);
    }

    /// Adds `delay` before forwarding every request (0 to clear).
    pub fn set_latency(&self, delay: Duration) {
        self.shared.faults().latency = delay;
    }

    /// Throttles client→upstream body bytes (over all connections) to
    /// `bytes_per_second` (`None`: unlimited).
    pub fn set_upload_rate(&self, bytes_per_second: Option<u64>) {
        self.shared.faults().upload_rate = bytes_per_second.filter(|&rate| rate > 0);
    }

    /// Random faults for soak tests: each request that no other fault applies
    /// to gets, with `probability`, one of: a 503, a 429, a reset after a
    /// random part of its body, or 0.2–1 s of latency. The reset point of a
    /// chunked body (the storage client streams single-shot uploads chunked)
    /// is within its first 4 KiB; when a body is shorter (or empty) the reset
    /// comes when the response begins, so the request took effect and its
    /// response is lost. Deterministic for a given `seed` and sequence of
    /// requests. `probability = 0.0` turns it off.
    pub fn set_random_faults(&self, probability: f64, seed: u64) {
        self.shared.faults().random = (probability > 0.0).then(|| RandomFaults {
            probability,
            rng: fastrand::Rng::with_seed(seed),
        });
    }

    /// Clears every pending and standing fault (failures, resets, latency,
    /// throttling, random faults); statistics, recordings and corrections stay.
    pub fn clear_faults(&self) {
        *self.shared.faults() = Faults::default();
    }

    /// From now on, answers the storage client's status queries of resumable
    /// uploads as real Cloud Storage does instead of letting fake-gcs finalize
    /// a truncated object; see [`resumable_status`].
    pub fn correct_resumable_status(&self) {
        self.shared.resumable_status.get_or_init(ResumableStatus::default);
    }

    /// From now on, keeps the `iamConfiguration` and `lifecycle` of bucket
    /// inserts and patches and adds them to fake-gcs's bucket answers, which
    /// leave them out; see [`bucket_policy`].
    pub fn keep_bucket_policies(&self) {
        self.shared.bucket_policies.get_or_init(BucketPolicies::default);
    }

    /// From now on, records the requests whose `METHOD target` contains
    /// `needle` (see [`take_recorded`](FaultProxy::take_recorded)).
    pub fn record(&self, needle: &str) {
        lock(&self.shared.recording).needles.push(needle.to_string());
    }

    /// The requests recorded so far, oldest first; forgets them.
    pub fn take_recorded(&self) -> Vec<Recorded> {
        std::mem::take(&mut lock(&self.shared.recording).recorded)
    }

    /// What happened so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.stats().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            self.shared.log("the proxy thread panicked");
        }
        release_loopback_address(self.address);
    }
}

/// The status `fail_next` and `fail_matching` answer with.
fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or_else(|_| panic!("{status} is not an HTTP status"))
}

/// What the proxy's thread and the test's handle share.
struct Shared {
    /// `fault-proxy 127.0.0.Y -> UPSTREAM`, for the log.
    name: String,
    /// `HOST:PORT` of the upstream.
    upstream: String,
    faults: Mutex<Faults>,
    /// When the upload throttle lets the next byte through.
    throttle: Mutex<Instant>,
    stats: Mutex<ProxyStats>,
    recording: Mutex<Recording>,
    /// Set once a test turned the correction on.
    resumable_status: OnceLock<ResumableStatus>,
    /// Set once a test turned the correction on.
    bucket_policies: OnceLock<BucketPolicies>,
}

/// What [`FaultProxy::record`] asked for and what it saw.
#[derive(Default)]
struct Recording {
    needles: Vec<String>,
    recorded: Vec<Recorded>,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    fn stats(&self) -> MutexGuard<'_, ProxyStats> {
        lock(&self.stats)
    }

    fn log(&self, message: &str) {
        eprintln!("[{}] {message}", self.name);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
