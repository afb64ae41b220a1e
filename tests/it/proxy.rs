//! A fault-injecting HTTP/1.1 proxy between the code under test and fake-gcs-server.
//!
//! [`FaultProxy`] listens on port 80 of its own loopback address `127.0.0.Y`
//! and forwards every connection to one upstream (`127.0.0.X:80`). It must be
//! port 80: the storage client sends the Host header without a port and
//! fake-gcs builds resumable-upload session URLs from it, so those URLs point
//! back at the proxy. Host headers are forwarded untouched.
//!
//! The client→upstream direction is parsed as HTTP/1.1 requests (head, then
//! the body by `Content-Length` or `Transfer-Encoding: chunked`) and forwarded
//! as raw bytes, so that faults apply per request on keep-alive connections;
//! the upstream→client direction is copied raw. Faults: answering requests
//! with an error status ([`fail_next`](FaultProxy::fail_next),
//! [`fail_matching`](FaultProxy::fail_matching)), resetting both connections
//! part-way through a request body ([`reset_next`](FaultProxy::reset_next)) or
//! when the response begins
//! ([`lose_response_matching`](FaultProxy::lose_response_matching)), latency,
//! upload throttling, random faults for soak tests, and refusing connections
//! altogether ([`pause`](FaultProxy::pause)). When the upstream is down, an
//! accepted connection is reset.
//!
//! One thing is not a fault: the proxy answers the storage client's status
//! queries of interrupted resumable uploads the way real Cloud Storage does,
//! because fake-gcs 1.54 finalizes the object with what it has instead (see
//! [`set_emulate_status_queries`](FaultProxy::set_emulate_status_queries)).
//!
//! The proxy runs on its own thread with its own tokio runtime, so it does not
//! depend on the runtime of the test that owns it, and stops on drop. Anything
//! it does not understand closes the connections (the client retries) and is
//! logged to stderr, as is every injected fault.

// A toolkit: each test uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The largest request head accepted (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// The largest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE: usize = 8 * 1024;
/// How much is read from the client at a time.
const READ_SIZE: usize = 64 * 1024;
/// Timeout of connecting to the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After answering a request itself, the proxy reads and discards what the
/// client still sends for this long before it closes (a lingering close, so
/// the close does not reset the connection before the client read the answer).
const LINGER: Duration = Duration::from_secs(2);
/// A chunked body (the storage client streams single-shot uploads so) that a
/// random reset applies to is reset within this many bytes, or when the
/// response begins if it is shorter.
const RANDOM_RESET_CHUNKED: u64 = 4096;

/// What the proxy did so far; see [`FaultProxy::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Request heads received from clients.
    pub requests: u64,
    /// Requests forwarded upstream (including those reset part-way).
    pub forwarded: u64,
    /// Requests answered with an injected error status.
    pub failed: u64,
    /// Requests whose connections were reset.
    pub resets: u64,
    /// Requests forwarded after an added delay.
    pub delayed: u64,
    /// Request body bytes forwarded upstream.
    pub bytes_up: u64,
}

/// A fault-injecting HTTP/1.1 proxy in front of one upstream, for one test.
///
/// Runs on its own thread with its own tokio runtime; stops (and frees its
/// address) on drop.
pub struct FaultProxy {
    address: Ipv4Addr,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy for `upstream_endpoint` (`http://127.0.0.X`, optionally
    /// with a port) on port 80 of a random free loopback address 127.0.0.Y.
    pub fn start(upstream_endpoint: &str) -> Result<FaultProxy> {
        let mut rng = XorShift::new(entropy());
        for _ in 0..200 {
            let address = Ipv4Addr::new(127, 0, 0, 2 + rng.below(249) as u8);
            if let Ok(listener) = std::net::TcpListener::bind((address, 80)) {
                return FaultProxy::launch(upstream_endpoint, address, listener);
            }
        }
        bail!("found no loopback address 127.0.0.Y with a free port 80 (binding port 80 needs root)")
    }

    /// Starts a proxy for `upstream_endpoint` on port 80 of `address`.
    pub fn start_on(upstream_endpoint: &str, address: Ipv4Addr) -> Result<FaultProxy> {
        let listener = std::net::TcpListener::bind((address, 80))
            .with_context(|| format!("binding the fault proxy to {address}:80"))?;
        FaultProxy::launch(upstream_endpoint, address, listener)
    }

    fn launch(
        upstream_endpoint: &str,
        address: Ipv4Addr,
        listener: std::net::TcpListener,
    ) -> Result<FaultProxy> {
        let upstream = upstream_address(upstream_endpoint)?;
        listener
            .set_nonblocking(true)
            .context("making the proxy listener non-blocking")?;
        let shared = Arc::new(Shared {
            address,
            upstream,
            faults: Mutex::new(Faults::default()),
            throttle: Mutex::new(Instant::now()),
            stats: Counters::default(),
            emulate_queries: AtomicBool::new(true),
            uploads: Mutex::new(HashMap::new()),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fault proxy's runtime")?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let (started, ready) = std::sync::mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{address}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let _ = started.send(Ok(()));
                            run(thread_shared, listener, receiver).await;
                        }
                        Err(error) => {
                            let _ = started.send(Err(error));
                        }
                    }
                });
            })
            .context("spawning the fault proxy's thread")?;
        let proxy = FaultProxy {
            address,
            shared,
            commands,
            thread: Some(thread),
        };
        match ready.recv() {
            Ok(Ok(())) => Ok(proxy),
            Ok(Err(error)) => Err(error).context("registering the proxy listener"),
            Err(_) => Err(anyhow!("the fault proxy's thread ended while starting")),
        }
    }

    /// Base URL, `http://127.0.0.Y` (port 80, so no port in the URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The proxy's loopback address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The next `count` requests get `status` (e.g. 503) with a small JSON
    /// error body and `Connection: close`, without reaching upstream. Replaces
    /// an earlier `fail_next`; 0 clears it.
    pub fn fail_next(&self, count: usize, status: u16) {
        let mut faults = self.shared.faults();
        faults.fail_next = count;
        faults.fail_status = status;
    }

    /// The next `count` requests whose `METHOD target` (e.g.
    /// `PUT /upload/storage/v1/b/B/o?uploadType=resumable&upload_id=..`)
    /// contains `needle` get `status`. Rules add up; the oldest matching rule
    /// applies. A count of 0 removes the rules for `needle`.
    pub fn fail_matching(&self, needle: &str, count: usize, status: u16) {
        let mut faults = self.shared.faults();
        if count == 0 {
            faults.matching.retain(|rule| rule.needle != needle);
        } else {
            faults.matching.push(MatchRule {
                needle: needle.to_string(),
                remaining: count,
                status,
            });
        }
    }

    /// The next `count` requests with a body of at least `after_bytes` are
    /// forwarded for `after_bytes` bytes of body, then both connections are
    /// reset (a connection drop mid-upload). A chunked body counts once it
    /// reaches `after_bytes`. When `after_bytes` is the whole body, the
    /// request reaches the upstream completely and the reset comes when its
    /// response begins (the response is lost, as with
    /// [`lose_response_matching`](FaultProxy::lose_response_matching)).
    /// Replaces an earlier `reset_next`; 0 clears it.
    pub fn reset_next(&self, count: usize, after_bytes: u64) {
        let mut faults = self.shared.faults();
        faults.resets = count;
        faults.reset_after = after_bytes;
    }

    /// The next `count` requests whose `METHOD target` contains `needle` are
    /// forwarded completely, and when the upstream's response begins both
    /// connections are reset instead: the request took effect, the client
    /// does not learn of it. Rules add up like those of `fail_matching`.
    pub fn lose_response_matching(&self, needle: &str, count: usize) {
        let mut faults = self.shared.faults();
        if count == 0 {
            faults.lose_response.retain(|rule| rule.needle != needle);
        } else {
            faults.lose_response.push(MatchRule {
                needle: needle.to_string(),
                remaining: count,
                status: 0,
            });
        }
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
            rng: XorShift::new(seed),
        });
    }

    /// Clears every pending and standing fault (failures, resets, latency,
    /// throttling, random faults); the statistics stay.
    pub fn clear_faults(&self) {
        *self.shared.faults() = Faults::default();
    }

    /// Whether the proxy answers the storage client's status queries of
    /// resumable uploads (`PUT <session>`, `Content-Range: bytes */*`, no body)
    /// the way real Cloud Storage does (on by default): 308 with the range
    /// that reached fake-gcs in complete `PUT`s, or the object's metadata once
    /// the upload was finalized. fake-gcs 1.54 itself finalizes the object
    /// with what it has on such a query, and the client accepts that as
    /// success, so an upload interrupted by a fault would end as a truncated
    /// object. Off: queries are forwarded as they are.
    pub fn set_emulate_status_queries(&self, emulate: bool) {
        self.shared.emulate_queries.store(emulate, Ordering::Relaxed);
    }

    /// How many status queries the proxy answered or rewrote (see
    /// [`set_emulate_status_queries`](FaultProxy::set_emulate_status_queries)).
    /// A query answered by the proxy counts in `requests` only.
    pub fn status_queries(&self) -> u64 {
        self.shared.stats.status_queries.load(Ordering::Relaxed)
    }

    /// Stops accepting and drops all connections: the listener is closed, so
    /// connects are refused. Returns once that is so.
    pub fn pause(&self) {
        let (ack, done) = std::sync::mpsc::channel();
        if self.commands.send(Command::Pause(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Starts accepting again on the same address. Panics when the address
    /// cannot be bound again (another process took it while paused).
    pub fn resume(&self) {
        let (ack, done) = std::sync::mpsc::channel();
        let result = match self.commands.send(Command::Resume(ack)) {
            Ok(()) => done
                .recv()
                .unwrap_or_else(|_| Err("the proxy thread has ended".to_string())),
            Err(_) => Err("the proxy thread has ended".to_string()),
        };
        if let Err(message) = result {
            panic!("cannot resume the fault proxy on {}:80: {message}", self.address);
        }
    }

    /// What happened so far.
    pub fn stats(&self) -> ProxyStats {
        let counters = &self.shared.stats;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyStats {
            requests: get(&counters.requests),
            forwarded: get(&counters.forwarded),
            failed: get(&counters.failed),
            resets: get(&counters.resets),
            delayed: get(&counters.delayed),
            bytes_up: get(&counters.bytes_up),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("address", &self.address)
            .field("upstream", &self.shared.upstream)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The upstream socket address of `http://HOST[:PORT][/]`.
fn upstream_address(endpoint: &str) -> Result<SocketAddr> {
    let authority = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("the upstream endpoint {endpoint:?} is not an http:// URL"))?
        .trim_end_matches('/');
    if let Ok(address) = authority.parse::<SocketAddr>() {
        return Ok(address);
    }
    if let Ok(ip) = authority.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 80));
    }
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving the upstream {endpoint:?}"))?
        .next()
        .ok_or_else(|| anyhow!("the upstream {endpoint:?} resolves to no address"))
}

/// Some entropy for picking an address (no `rand` here).
fn entropy() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or_default();
    nanos ^ (u64::from(std::process::id()) << 32) ^ CALLS.fetch_add(1, Ordering::Relaxed).rotate_left(17)
}

/// xorshift64*, seeded through SplitMix64 (never zero).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// A number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

struct Shared {
    address: Ipv4Addr,
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    /// When the upload throttle lets the next byte through.
    throttle: Mutex<Instant>,
    stats: Counters,
    /// See [`FaultProxy::set_emulate_status_queries`].
    emulate_queries: AtomicBool,
    /// Resumable uploads seen, by `upload_id`.
    uploads: Mutex<HashMap<String, Upload>>,
}

/// What fake-gcs holds of one resumable upload, as far as the proxy saw.
#[derive(Clone, Copy, Default)]
struct Upload {
    /// Bytes of complete `PUT` bodies (fake-gcs appends a body once it read all of it).
    persisted: u64,
    /// Whether a complete `PUT` finalized the upload.
    complete: bool,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    resets: AtomicU64,
    delayed: AtomicU64,
    bytes_up: AtomicU64,
    status_queries: AtomicU64,
}

#[derive(Default)]
struct Faults {
    fail_next: usize,
    fail_status: u16,
    matching: Vec<MatchRule>,
    lose_response: Vec<MatchRule>,
    resets: usize,
    reset_after: u64,
    latency: Duration,
    upload_rate: Option<u64>,
    random: Option<RandomFaults>,
}

struct MatchRule {
    needle: String,
    remaining: usize,
    status: u16,
}

struct RandomFaults {
    probability: f64,
    rng: XorShift,
}

/// What to do with one request.
enum Plan {
    /// Answer it with this status.
    Fail(u16),
    /// Forward it after `delay`; reset the connections as `reset` says.
    Forward { delay: Duration, reset: Option<ResetAt> },
    /// Forward it after `delay`, and reset the connections when its response begins.
    LoseResponse { delay: Duration },
}

/// Reset the connections once this many body bytes are forwarded.
#[derive(Clone, Copy)]
struct ResetAt {
    after: u64,
    /// Whether a pending `reset_next` must still be taken when the point is
    /// reached (chunked bodies, whose length is not known up front).
    needs_token: bool,
    /// Whether to reset when the response begins if the body ends before `after`.
    at_end: bool,
}

/// Takes one use of the oldest rule whose needle `line` contains; its status.
fn take_rule(rules: &mut Vec<MatchRule>, line: &str) -> Option<u16> {
    let index = rules.iter().position(|rule| line.contains(&rule.needle))?;
    let rule = &mut rules[index];
    rule.remaining -= 1;
    let status = rule.status;
    if rule.remaining == 0 {
        rules.remove(index);
    }
    Some(status)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    fn count(&self, counter: impl Fn(&Counters) -> &AtomicU64, by: u64) {
        counter(&self.stats).fetch_add(by, Ordering::Relaxed);
    }

    fn log(&self, message: &str) {
        eprintln!("[fault-proxy {} -> {}] {message}", self.address, self.upstream);
    }

    fn plan(&self, head: &Head) -> Plan {
        let mut faults = self.faults();
        if faults.fail_next > 0 {
            faults.fail_next -= 1;
            return Plan::Fail(faults.fail_status);
        }
        let line = format!("{} {}", head.method, head.target);
        if let Some(status) = take_rule(&mut faults.matching, &line) {
            return Plan::Fail(status);
        }
        let mut delay = faults.latency;
        if take_rule(&mut faults.lose_response, &line).is_some() {
            return Plan::LoseResponse { delay };
        }
        if faults.resets > 0 {
            let after = faults.reset_after;
            match head.body {
                BodyKind::Length(length) if length >= after => {
                    faults.resets -= 1;
                    return Plan::Forward {
                        delay,
                        reset: Some(ResetAt {
                            after,
                            needs_token: false,
                            at_end: false,
                        }),
                    };
                }
                BodyKind::Chunked => {
                    return Plan::Forward {
                        delay,
                        reset: Some(ResetAt {
                            after,
                            needs_token: true,
                            at_end: false,
                        }),
                    };
                }
                BodyKind::Length(_) => {}
            }
        }
        let mut reset = None;
        if let Some(random) = &mut faults.random
            && random.rng.unit() < random.probability
        {
            match random.rng.below(4) {
                0 => return Plan::Fail(503),
                1 => return Plan::Fail(429),
                2 => {
                    let after = match head.body {
                        BodyKind::Length(0) => 0,
                        BodyKind::Length(length) => random.rng.below(length),
                        BodyKind::Chunked => random.rng.below(RANDOM_RESET_CHUNKED),
                    };
                    reset = Some(ResetAt {
                        after,
                        needs_token: false,
                        at_end: true,
                    });
                }
                _ => delay += Duration::from_millis(200 + random.rng.below(801)),
            }
        }
        Plan::Forward { delay, reset }
    }

    /// What fake-gcs holds of upload `id`.
    fn upload(&self, id: &str) -> Upload {
        lock(&self.uploads).get(id).copied().unwrap_or_default()
    }

    /// Records that a `PUT` with `content_range` and a body of `bytes` reached
    /// fake-gcs completely. Its rule (1.54): the body is appended; the upload
    /// is finalized unless the range is `A-B/*` or `A-B/T` with B + 1 < T.
    fn uploaded(&self, id: &str, bytes: u64, content_range: Option<&str>) {
        let finalizes = match content_range.map(|range| range.strip_prefix("bytes ")) {
            None => Some(true),
            Some(None) => None,
            Some(Some(range)) => {
                range
                    .split_once('/')
                    .and_then(|(span, total)| match (span.split_once('-'), total) {
                        (Some((_, "*")), _) | (None, _) => Some(true),
                        (Some(_), "*") => Some(false),
                        (Some((_, end)), total) => {
                            Some(end.parse::<u64>().ok()? + 1 >= total.parse::<u64>().ok()?)
                        }
                    })
            }
        };
        // fake-gcs rejects a malformed range (400) without keeping the body.
        if let Some(finalizes) = finalizes {
            let mut uploads = lock(&self.uploads);
            let upload = uploads.entry(id.to_string()).or_default();
            upload.persisted += bytes;
            upload.complete |= finalizes;
        }
    }

    /// Takes one pending `reset_next` for a chunked body that reached its point.
    fn take_reset(&self) -> bool {
        let mut faults = self.faults();
        if faults.resets > 0 {
            faults.resets -= 1;
            true
        } else {
            false
        }
    }

    /// Waits until the upload throttle lets `bytes` more through.
    async fn throttle(&self, bytes: usize) {
        let Some(rate) = self.faults().upload_rate else {
            return;
        };
        let at = {
            let mut next = lock(&self.throttle);
            let at = (*next).max(Instant::now());
            *next = at + Duration::from_secs_f64(bytes as f64 / rate as f64);
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// How many body bytes to forward at a time.
    fn slice(&self) -> usize {
        match self.faults().upload_rate {
            Some(rate) => usize::try_from(rate / 50)
                .unwrap_or(READ_SIZE)
                .clamp(512, READ_SIZE),
            None => READ_SIZE,
        }
    }
}

// ---------------------------------------------------------------------------
// Accepting
// ---------------------------------------------------------------------------

enum Command {
    Pause(std::sync::mpsc::Sender<()>),
    Resume(std::sync::mpsc::Sender<Result<(), String>>),
    Stop,
}

async fn run(shared: Arc<Shared>, listener: TcpListener, mut commands: mpsc::UnboundedReceiver<Command>) {
    let address = SocketAddr::from((shared.address, 80));
    let mut listener = Some(listener);
    // While paused: the address, bound without SO_REUSEADDR and not listening
    // (so connects are refused), to keep others from taking it. Best effort:
    // binding fails while connections of the proxy linger in TIME_WAIT.
    let mut placeholder: Option<TcpSocket> = None;
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Stop) => break,
                Some(Command::Pause(ack)) => {
                    listener = None;
                    connections.shutdown().await;
                    if placeholder.is_none() {
                        placeholder = TcpSocket::new_v4()
                            .and_then(|socket| socket.bind(address).map(|()| socket))
                            .ok();
                    }
                    let _ = ack.send(());
                }
                Some(Command::Resume(ack)) => {
                    let mut result = Ok(());
                    if listener.is_none() {
                        match listen_again(address, placeholder.take()).await {
                            Ok(resumed) => listener = Some(resumed),
                            Err(error) => result = Err(error.to_string()),
                        }
                    }
                    let _ = ack.send(result);
                }
            },
            accepted = accept(listener.as_ref()) => match accepted {
                Ok(client) => {
                    connections.spawn(serve(Arc::clone(&shared), client));
                }
                Err(error) => {
                    shared.log(&format!("accept failed: {error}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined
                    && error.is_panic()
                {
                    shared.log(&format!("a connection task panicked: {error}"));
                }
            }
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

async fn listen_again(address: SocketAddr, placeholder: Option<TcpSocket>) -> std::io::Result<TcpListener> {
    // Sockets accepted from a listener without SO_REUSEADDR would keep others
    // from binding the address while they linger (FIN_WAIT2, TIME_WAIT).
    if let Some(socket) = placeholder
        && socket.set_reuseaddr(true).is_ok()
        && let Ok(listener) = socket.listen(1024)
    {
        return Ok(listener);
    }
    let mut attempts = 0;
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return Ok(listener),
            Err(error) if attempts >= 40 => return Err(error),
            Err(_) => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

/// How the request side of a connection ended.
enum End {
    /// The client closed the connection between requests.
    ClientClosed,
    /// The proxy answers the last request itself with this response (which
    /// says `Connection: close`) and closes.
    Answer(String),
    /// The connections are to be reset.
    Reset,
}

/// How the response side of a connection ended.
enum Downstream {
    /// The upstream closed the connection.
    Closed,
    /// A response began while a reset was armed: reset without passing it on.
    Reset,
}

/// Which side of a connection ended first.
enum Side {
    Requests(Result<End>),
    Responses(std::io::Result<Downstream>),
}

async fn serve(shared: Arc<Shared>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.upstream)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            shared.log(&format!(
                "cannot connect upstream ({error}); resetting the client"
            ));
            let _ = client.set_zero_linger();
            return;
        }
        Err(_) => {
            shared.log("connecting upstream timed out; resetting the client");
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let mut client = ClientReader {
        stream: client_read,
        buffer: BytesMut::with_capacity(READ_SIZE),
    };
    // Set by the request side to drop the next response and reset instead.
    let armed = AtomicBool::new(false);
    let side = tokio::select! {
        end = requests(&shared, &mut client, &mut upstream_write, &armed) => Side::Requests(end),
        copied = responses(&mut upstream_read, &mut client_write, &armed) => Side::Responses(copied),
    };
    let reset = match side {
        // The upstream closed: pass that on, lingering like the upstream would.
        Side::Responses(Ok(Downstream::Closed)) => {
            if client_write.shutdown().await.is_ok() {
                client.drain().await;
            }
            false
        }
        Side::Responses(Ok(Downstream::Reset)) => true,
        Side::Responses(Err(error)) => {
            shared.log(&format!("passing a response on failed: {error}"));
            false
        }
        Side::Requests(Ok(End::ClientClosed)) => false,
        Side::Requests(Ok(End::Answer(response))) => {
            answer(&mut client, &mut client_write, &response).await;
            false
        }
        Side::Requests(Ok(End::Reset)) => true,
        Side::Requests(Err(error)) => {
            shared.log(&format!("closing the connections: {error:#}"));
            false
        }
    };
    if reset {
        shared.count(|c| &c.resets, 1);
        let _ = client.stream.as_ref().set_zero_linger();
        let _ = upstream_read.as_ref().set_zero_linger();
    }
}

/// Copies responses from the upstream to the client until the upstream
/// closes, or until a response begins while `armed` is set.
async fn responses(
    upstream: &mut OwnedReadHalf,
    client: &mut OwnedWriteHalf,
    armed: &AtomicBool,
) -> std::io::Result<Downstream> {
    let mut buffer = vec![0u8; READ_SIZE];
    loop {
        let read = upstream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(Downstream::Closed);
        }
        if armed.load(Ordering::SeqCst) {
            return Ok(Downstream::Reset);
        }
        client.write_all(&buffer[..read]).await?;
    }
}

/// Sends `response` and closes, lingering: what the client still sends is
/// read and discarded for up to [`LINGER`].
async fn answer(client: &mut ClientReader, client_write: &mut OwnedWriteHalf, response: &str) {
    if client_write.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    if client_write.shutdown().await.is_ok() {
        client.drain().await;
    }
}

/// An error response in the style of the JSON API.
fn error_response(status: u16) -> String {
    let body = serde_json::json!({
        "error": {
            "code": status,
            "message": format!("injected by the fault proxy: HTTP {status}"),
            "errors": [{ "message": "injected by the fault proxy", "reason": reason_code(status) }],
        }
    })
    .to_string();
    format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json; charset=UTF-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
}

/// The answer of real Cloud Storage to a status query of an unfinished
/// resumable upload that holds `persisted` bytes.
fn incomplete_response(persisted: u64) -> String {
    let range = if persisted == 0 {
        String::new()
    } else {
        format!("range: bytes=0-{}\r\n", persisted - 1)
    };
    format!("HTTP/1.1 308 Permanent Redirect\r\n{range}content-length: 0\r\nconnection: close\r\n\r\n")
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected Fault",
    }
}

fn reason_code(status: u16) -> &'static str {
    match status {
        429 => "rateLimitExceeded",
        500 => "internalError",
        503 => "backendError",
        _ => "injectedFault",
    }
}

/// Forwards requests from the client upstream until the connection ends or a
/// fault ends it.
async fn requests(
    shared: &Shared,
    client: &mut ClientReader,
    upstream: &mut OwnedWriteHalf,
    armed: &AtomicBool,
) -> Result<End> {
    loop {
        let Some(mut raw_head) = client.read_head().await? else {
            return Ok(End::ClientClosed);
        };
        let head = parse_head(&raw_head)?;
        shared.count(|c| &c.requests, 1);
        let (delay, reset, lose_response) = match shared.plan(&head) {
            Plan::Fail(status) => {
                shared.count(|c| &c.failed, 1);
                shared.log(&format!("answering {status} to {} {}", head.method, head.target));
                return Ok(End::Answer(error_response(status)));
            }
            Plan::Forward { delay, reset } => (delay, reset, false),
            Plan::LoseResponse { delay } => (delay, None, true),
        };
        if !delay.is_zero() {
            shared.count(|c| &c.delayed, 1);
            tokio::time::sleep(delay).await;
        }
        let upload = head.upload_id();
        if let Some(id) = upload
            && head.is_status_query()
            && shared.emulate_queries.load(Ordering::Relaxed)
        {
            match shared.upload(id) {
                Upload {
                    complete: false,
                    persisted,
                } => {
                    shared.count(|c| &c.status_queries, 1);
                    if reset.is_some() || lose_response {
                        return Ok(End::Reset);
                    }
                    return Ok(End::Answer(incomplete_response(persisted)));
                }
                // Finalized: fake-gcs forgot the session; its object is the answer.
                Upload { complete: true, .. } => {
                    if let Some(rewritten) = object_request(&head, &raw_head) {
                        shared.count(|c| &c.status_queries, 1);
                        raw_head = rewritten;
                    }
                }
            }
        }
        upstream
            .write_all(&raw_head)
            .await
            .context("forwarding a request head")?;
        shared.count(|c| &c.forwarded, 1);
        let mut body = Body {
            shared,
            sent: 0,
            length: match head.body {
                BodyKind::Length(length) => Some(length),
                BodyKind::Chunked => None,
            },
            reset,
        };
        let reset_now = body.reset_mid_body()
            || match head.body {
                BodyKind::Length(length) => body.forward(client, upstream, length).await?,
                BodyKind::Chunked => body.forward_chunked(client, upstream).await?,
            };
        if reset_now {
            shared.log(&format!(
                "resetting {} {} after {} body bytes",
                head.method, head.target, body.sent
            ));
            return Ok(End::Reset);
        }
        // The whole body went upstream, so fake-gcs appended it to the upload.
        if let Some(id) = upload
            && head.method == "PUT"
        {
            shared.uploaded(id, body.sent, head.content_range.as_deref());
        }
        if body.reset_at_end() || lose_response {
            shared.log(&format!(
                "resetting {} {} once its response arrives (the response is lost)",
                head.method, head.target
            ));
            armed.store(true, Ordering::SeqCst);
        }
    }
}

/// The read side of the client connection, with what was read but not yet used.
struct ClientReader {
    stream: OwnedReadHalf,
    buffer: BytesMut,
}

impl ClientReader {
    /// Reads more from the client; 0 at EOF.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buffer.reserve(READ_SIZE);
        self.stream.read_buf(&mut self.buffer).await
    }

    /// Reads and discards what the client sends until it closes, for up to [`LINGER`].
    async fn drain(&mut self) {
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                self.buffer.clear();
                if !matches!(self.fill().await, Ok(read) if read > 0) {
                    break;
                }
            }
        })
        .await;
    }

    /// The next request head (through the blank line); `None` when the client
    /// closed the connection before sending one.
    async fn read_head(&mut self) -> Result<Option<BytesMut>> {
        let mut searched = 0;
        loop {
            if let Some(at) = find(&self.buffer[searched..], b"\r\n\r\n") {
                return Ok(Some(self.buffer.split_to(searched + at + 4)));
            }
            searched = self.buffer.len().saturating_sub(3);
            if self.buffer.len() > MAX_HEAD {
                bail!("a request head longer than {MAX_HEAD} bytes");
            }
            if self.fill().await.context("reading a request head")? == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                bail!("the client closed the connection within a request head");
            }
        }
    }

    /// The next line, with its CRLF.
    async fn read_line(&mut self) -> Result<BytesMut> {
        let mut searched = 0;
        loop {
            if let Some(at) = find(&self.buffer[searched..], b"\r\n") {
                return Ok(self.buffer.split_to(searched + at + 2));
            }
            searched = self.buffer.len().saturating_sub(1);
            if self.buffer.len() > MAX_LINE {
                bail!("a chunked-body line longer than {MAX_LINE} bytes");
            }
            if self.fill().await.context("reading a chunked body")? == 0 {
                bail!("the client closed the connection within a chunked body");
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// The parts of a request head the proxy needs.
struct Head {
    method: String,
    target: String,
    body: BodyKind,
    content_range: Option<String>,
}

#[derive(Clone, Copy)]
enum BodyKind {
    /// `Content-Length` bytes (0 without the header).
    Length(u64),
    Chunked,
}

impl Head {
    /// The `upload_id` of a resumable-upload session URL.
    fn upload_id(&self) -> Option<&str> {
        query_param(&self.target, "upload_id").filter(|id| !id.is_empty())
    }

    /// Whether this is the client's status query of a resumable upload
    /// (`PUT`, `Content-Range: bytes */*`, no body): real Cloud Storage
    /// answers 308 with the persisted range, fake-gcs 1.54 finalizes the
    /// object with what it has.
    fn is_status_query(&self) -> bool {
        self.method == "PUT"
            && matches!(self.body, BodyKind::Length(0))
            && self.content_range.as_deref() == Some("bytes */*")
    }
}

/// The raw value of `name` in the query of `target`.
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// A request head asking for the metadata of the object that the upload
/// session `head` targets (with `head`'s headers): real Cloud Storage answers
/// a status query of a finalized upload with that.
fn object_request(head: &Head, raw: &[u8]) -> Option<BytesMut> {
    let bucket = head
        .target
        .strip_prefix("/upload/storage/v1/b/")?
        .split_once("/o?")?
        .0;
    let name = query_param(&head.target, "name")?.replace('+', " ");
    let name: Vec<u8> = percent_encoding::percent_decode_str(&name).collect();
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let path = format!(
        "/storage/v1/b/{bucket}/o/{}",
        percent_encoding::percent_encode(&name, UNRESERVED)
    );
    let headers = &raw[find(raw, b"\r\n")?..];
    let mut rewritten = BytesMut::from(format!("GET {path} HTTP/1.1").as_bytes());
    rewritten.extend_from_slice(headers);
    Some(rewritten)
}

fn parse_head(raw: &[u8]) -> Result<Head> {
    let text = std::str::from_utf8(raw).context("a request head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("a malformed request line {request_line:?}");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        bail!("an unsupported request line {request_line:?}");
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut content_range = None;
    for line in lines.take_while(|line| !line.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            bail!("a malformed header line {line:?}");
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let parsed: u64 = value
                .parse()
                .with_context(|| format!("a bad content-length {value:?}"))?;
            if length.is_some_and(|earlier| earlier != parsed) {
                bail!("conflicting content-length headers");
            }
            length = Some(parsed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                bail!("an unsupported transfer-encoding {value:?}");
            }
        } else if name.eq_ignore_ascii_case("content-range") {
            content_range = Some(value.to_string());
        }
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        body: if chunked {
            BodyKind::Chunked
        } else {
            BodyKind::Length(length.unwrap_or(0))
        },
        content_range,
    })
}

/// Forwarding one request body.
struct Body<'a> {
    shared: &'a Shared,
    /// Body bytes forwarded so far (chunk data only, for chunked bodies).
    sent: u64,
    /// The body length, `None` when chunked.
    length: Option<u64>,
    reset: Option<ResetAt>,
}

impl Body<'_> {
    /// Whether the connections are to be reset now, part-way through the body
    /// (decided once per request).
    fn reset_mid_body(&mut self) -> bool {
        match self.reset {
            Some(reset) if self.sent >= reset.after && self.length != Some(self.sent) => {
                self.reset = None;
                !reset.needs_token || self.shared.take_reset()
            }
            _ => false,
        }
    }

    /// Whether the connections are to be reset once the response to the
    /// complete body begins.
    fn reset_at_end(&mut self) -> bool {
        match self.reset.take() {
            Some(reset) if self.sent >= reset.after || reset.at_end => {
                !reset.needs_token || self.shared.take_reset()
            }
            _ => false,
        }
    }

    /// Forwards `length` body bytes; true when the connections are to be reset.
    async fn forward(
        &mut self,
        client: &mut ClientReader,
        upstream: &mut OwnedWriteHalf,
        length: u64,
    ) -> Result<bool> {
        let mut left = length;
        while left > 0 {
            if client.buffer.is_empty() && client.fill().await.context("reading a request body")? == 0 {
                bail!("the client closed the connection {left} bytes before the end of a request body");
            }
            let mut take = client.buffer.len().min(self.shared.slice());
            take = usize::try_from(left).map_or(take, |left| take.min(left));
            if let Some(reset) = self.reset {
                // Invariant: reset_mid_body() ran after the last write, so
                // sent < reset.after here (or the body is complete).
                take = usize::try_from(reset.after.saturating_sub(self.sent))
                    .map_or(take, |room| take.min(room.max(1)));
            }
            self.shared.throttle(take).await;
            upstream
                .write_all(&client.buffer[..take])
                .await
                .context("forwarding a request body")?;
            client.buffer.advance(take);
            left -= take as u64;
            self.sent += take as u64;
            self.shared.count(|c| &c.bytes_up, take as u64);
            if self.reset_mid_body() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forwards a chunked body; true when the connections are to be reset.
    async fn forward_chunked(
        &mut self,
        client: &mut ClientReader,
        upstream: &mut OwnedWriteHalf,
    ) -> Result<bool> {
        loop {
            let line = client.read_line().await?;
            upstream
                .write_all(&line)
                .await
                .context("forwarding a chunk header")?;
            let text = std::str::from_utf8(&line).unwrap_or_default();
            let digits = text.split(';').next().unwrap_or_default().trim();
            let size =
                u64::from_str_radix(digits, 16).with_context(|| format!("a bad chunk size line {text:?}"))?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let trailer = client.read_line().await?;
                    upstream
                        .write_all(&trailer)
                        .await
                        .context("forwarding a chunked-body trailer")?;
                    if trailer.as_ref() == b"\r\n" {
                        return Ok(false);
                    }
                }
            }
            if self.forward(client, upstream, size).await? {
                return Ok(true);
            }
            let end = client.read_line().await?;
            if end.as_ref() != b"\r\n" {
                bail!("a chunk not followed by CRLF");
            }
            upstream.write_all(&end).await.context("forwarding a chunk end")?;
        }
    }
}
