//! Integration-test harness: local Google Cloud emulators and REST helpers.
//!
//! - [`services`] starts one fake-gcs-server per test process (lazily, on
//!   first use) and hands out its endpoint.
//! - [`PubsubEmulator`] and [`FakeGcs`] are owned instances: every [`TestEnv`]
//!   runs its own Pub/Sub emulator (see [`TestEnv::new`] for why), and fault
//!   tests stop and restart a fake-gcs of their own.
//! - [`PubsubRest`] and [`GcsRest`] talk to the emulators over their JSON/HTTP
//!   APIs, independently of the code under test, to set up resources and to
//!   check results.
//! - [`TestEnv`] is a fresh, isolated Pub/Sub emulator, set of names (topics,
//!   subscriptions, buckets) and spool directory for one test.
//! - [`sample_wav`], [`sample_png`] and [`write_large_wav`] make test media.
//!
//! Lifetime: the shared services live in statics, which Rust never drops.
//! Every service therefore runs in its own process group next to a small
//! `sh` watchdog (in a process group of its own as well) that kills the group
//! once the test process is gone, whether it exited, panicked or was killed.
//! Service output goes to `$TMPDIR/audio-store-it-<pid>/`; log directories of
//! test processes that no longer run are removed when the next one starts.
//!
//! Nothing in the shared state is bound to a tokio runtime (each
//! `#[tokio::test]` has its own): processes are spawned with `std::process`,
//! readiness is probed with `std::net`, and HTTP clients are created per
//! [`PubsubRest`] / [`GcsRest`] value, which a test creates for itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

/// The Google Cloud project id used for every emulated resource.
pub const PROJECT: &str = "audio-store-test";

/// How long a service may take to answer its readiness probe.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between polls (readiness probes, pulls, [`wait_for`]).
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Timeout of one HTTP request made by [`PubsubRest`] / [`GcsRest`].
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default location of the Pub/Sub emulator (Debian package
/// google-cloud-cli-pubsub-emulator); `PUBSUB_EMULATOR_BIN` overrides it.
const PUBSUB_EMULATOR_BIN: &str =
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";
/// Prefix of the per-process log directories under the temp dir.
const LOG_DIR_PREFIX: &str = "audio-store-it-";

// ---------------------------------------------------------------------------
// Shared services
// ---------------------------------------------------------------------------

/// The service shared by all tests of this process; see [`services`].
pub struct Services {
    /// fake-gcs-server base URL, `http://127.0.0.X` (port 80, no port in the URL).
    pub gcs_endpoint: String,
    /// Directory holding the service logs of this test process.
    pub log_dir: PathBuf,
    // Kept so the process is owned somewhere; statics are never dropped,
    // the watchdog ends it when the test process exits.
    _gcs: FakeGcs,
}

/// Starts the shared fake-gcs-server on first use and returns its endpoint.
/// (Each [`TestEnv`] starts a Pub/Sub emulator of its own; see [`TestEnv::new`].)
///
/// Blocks the calling thread while it starts (about a second). Panics, with the
/// tail of the service log, when it cannot be started; later calls panic with
/// the same message instead of trying again.
pub fn services() -> &'static Services {
    static SERVICES: OnceLock<Result<Services, String>> = OnceLock::new();
    match SERVICES.get_or_init(|| start_services().map_err(|e| format!("{e:#}"))) {
        Ok(services) => services,
        Err(message) => panic!("cannot start the test services: {message}"),
    }
}

fn start_services() -> Result<Services> {
    let gcs = FakeGcs::start_memory().context("starting the shared fake-gcs-server")?;
    Ok(Services {
        gcs_endpoint: gcs.endpoint(),
        log_dir: log_dir().to_path_buf(),
        _gcs: gcs,
    })
}

/// The log directory of this test process, `$TMPDIR/audio-store-it-<pid>/`.
///
/// Created on first use; log directories of processes that no longer run are
/// removed at that moment.
pub fn log_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        remove_stale_log_dirs();
        let dir = std::env::temp_dir().join(format!("{LOG_DIR_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create the log dir {}: {e}", dir.display()));
        dir
    })
}

fn remove_stale_log_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(LOG_DIR_PREFIX)) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // Best effort: another process may be removing it at the same time.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

// ---------------------------------------------------------------------------
// Supervised processes
// ---------------------------------------------------------------------------

/// A service process in its own process group plus the watchdog that kills
/// that group once the test process is gone.
struct Supervised {
    what: String,
    child: Child,
    watchdog: Child,
    log: PathBuf,
}

impl Supervised {
    fn spawn(what: &str, program: &Path, args: &[String], log: &Path) -> Result<Supervised> {
        let mut log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the log file {}", log.display()))?;
        writeln!(log_file, "--- starting {} {}", program.display(), args.join(" "))
            .with_context(|| format!("writing to {}", log.display()))?;
        let stderr = log_file
            .try_clone()
            .with_context(|| format!("duplicating the handle of {}", log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .current_dir(log_dir())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {what} ({})", program.display()))?;
        // The child leads its own process group, so its pid is the group id.
        let pgid = child.id();
        let test_pid = std::process::id();
        let script = format!(
            "while kill -0 {test_pid} 2>/dev/null; do sleep 1; done; \
             kill -TERM -{pgid} 2>/dev/null || exit 0; \
             i=0; while kill -0 -{pgid} 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done; \
             kill -KILL -{pgid} 2>/dev/null; exit 0"
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match watchdog {
            Ok(watchdog) => Ok(Supervised {
                what: what.to_string(),
                child,
                watchdog,
                log: log.to_path_buf(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e).with_context(|| format!("spawning the watchdog of {what}"))
            }
        }
    }

    /// Polls `ready` every 100 ms until it returns true. Fails, with the log
    /// tail, when the process exits first, when its log shows `failure_marker`
    /// (both retryable: most likely the address was taken), or after
    /// [`READY_TIMEOUT`] (not retryable).
    fn wait_ready(
        &mut self,
        failure_marker: Option<&str>,
        ready: impl Fn() -> bool,
    ) -> Result<(), StartFailure> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self
                .child
                .try_wait()
                .with_context(|| format!("checking whether {} still runs", self.what))
                .map_err(|error| StartFailure {
                    error,
                    retryable: false,
                })?;
            if let Some(status) = exited {
                return Err(self.failure(&format!("exited ({status}) before it became ready"), true));
            }
            if let Some(marker) = failure_marker
                && fs::read_to_string(&self.log).is_ok_and(|log| log.contains(marker))
            {
                return Err(self.failure(&format!("failed to start ({marker})"), true));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("did not become ready within {READY_TIMEOUT:?}"), false));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn failure(&self, problem: &str, retryable: bool) -> StartFailure {
        let error = anyhow!(
            "{} {problem}; log {}:\n{}",
            self.what,
            self.log.display(),
            log_tail(&self.log)
        );
        StartFailure { error, retryable }
    }

    /// Whether the service process still runs.
    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the service and its watchdog and reaps both.
    fn kill(mut self) -> Result<()> {
        // kill() fails only when the child had already exited, which is fine.
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("waiting for {} to exit", self.what))?;
        let _ = self.watchdog.kill();
        self.watchdog
            .wait()
            .with_context(|| format!("waiting for the watchdog of {} to exit", self.what))?;
        Ok(())
    }
}

/// Why a service did not become ready.
struct StartFailure {
    error: anyhow::Error,
    /// Whether starting it again elsewhere (another port or address) may work.
    retryable: bool,
}

/// The last ~40 lines (at most 8 KiB) of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    const MAX: u64 = 8 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// A minimal blocking HTTP GET over std::net (runtime-independent), for
/// readiness probes. Returns the status code and the body (as far as it was
/// read: the Pub/Sub emulator ignores `Connection: close`, so reading stops
/// after `content-length` bytes, at EOF, or at the read timeout).
fn probe_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(read) => read,
            Err(e) if response.is_empty() => return Err(e),
            Err(_) => 0,
        };
        response.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&response);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if read == 0 || length.is_some_and(|length| body.len() >= length) {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|code| code.parse::<u16>().ok())
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "no http status line")
                    })?;
                return Ok((status, body.to_string()));
            }
        }
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "incomplete http response",
            ));
        }
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn random_u64() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut half = [0u8; 8];
    half.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(half)
}

// ---------------------------------------------------------------------------
// Pub/Sub emulator
// ---------------------------------------------------------------------------

/// An owned Pub/Sub emulator on `127.0.0.1:<free port>`; killed on drop.
///
/// Every [`TestEnv`] has one of its own: the emulator never redelivers
/// messages leased to a streaming pull that a client closed or lost.
pub struct PubsubEmulator {
    port: u16,
    process: Option<Supervised>,
}

impl PubsubEmulator {
    /// Starts an emulator on a free port and waits until it answers `GET /`
    /// with `Ok` (retries on another port if the chosen one was taken).
    pub fn start() -> Result<PubsubEmulator> {
        let binary = std::env::var_os("PUBSUB_EMULATOR_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PUBSUB_EMULATOR_BIN));
        ensure!(
            is_executable(&binary),
            "the pubsub emulator is missing at {} (install the debian package \
             google-cloud-cli-pubsub-emulator, or set PUBSUB_EMULATOR_BIN)",
            binary.display()
        );
        let mut last_error = None;
        for _attempt in 0..3 {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|listener| listener.local_addr())
                .context("finding a free port for the pubsub emulator")?
                .port();
            let log = log_dir().join(format!("pubsub-{port}.log"));
            let args = vec!["--host=127.0.0.1".to_string(), format!("--port={port}")];
            let mut process = Supervised::spawn("the pubsub emulator", &binary, &args, &log)?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let host = format!("127.0.0.1:{port}");
            // The emulator does not exit when its port is taken (a BindException
            // leaves the JVM running), and another emulator may answer on that
            // port: only its own "Server started" line proves that it listens.
            let started = format!("Server started, listening on {port}");
            let ready = process.wait_ready(Some("java.net.BindException"), || {
                fs::read_to_string(&log).is_ok_and(|text| text.contains(&started))
                    && matches!(probe_get(addr, &host, "/"), Ok((200, body)) if body.contains("Ok"))
            });
            match ready {
                Ok(()) => {
                    return Ok(PubsubEmulator {
                        port,
                        process: Some(process),
                    });
                }
                Err(failure) => {
                    let _ = process.kill();
                    if !failure.retryable {
                        return Err(failure.error);
                    }
                    last_error = Some(failure.error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("the pubsub emulator did not start")))
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Address for `PUBSUB_EMULATOR_HOST`, `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The emulator's log file (stdout and stderr).
    pub fn log(&self) -> PathBuf {
        log_dir().join(format!("pubsub-{}.log", self.port))
    }

    /// Kills the emulator (SIGKILL) and waits for it; all its state is lost.
    pub fn stop(&mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process.kill().context("stopping the pubsub emulator"),
            None => Ok(()),
        }
    }
}

impl Drop for PubsubEmulator {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------
// fake-gcs-server
// ---------------------------------------------------------------------------

/// Where a [`FakeGcs`] keeps its objects.
#[derive(Debug, Clone)]
enum GcsBackend {
    Memory,
    Filesystem(PathBuf),
}

/// Loopback addresses (last octet) held by [`FakeGcs`] values of this process,
/// running or stopped, so that a stopped instance keeps its address.
static CLAIMED_ADDRESSES: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());

fn claimed_addresses() -> std::sync::MutexGuard<'static, BTreeSet<u8>> {
    // A panic while holding this lock cannot leave the set inconsistent.
    CLAIMED_ADDRESSES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Picks a random 127.0.0.X (X in 2..=250) not claimed in this process whose
/// port 80 is free right now, and claims it.
fn claim_loopback_address() -> Result<Ipv4Addr> {
    for _ in 0..200 {
        let octet = 2 + (random_u64() % 249) as u8;
        let address = Ipv4Addr::new(127, 0, 0, octet);
        let mut claimed = claimed_addresses();
        if claimed.contains(&octet) {
            continue;
        }
        if TcpListener::bind((address, 80)).is_ok() {
            claimed.insert(octet);
            return Ok(address);
        }
    }
    bail!("found no loopback address 127.0.0.X with a free port 80 (binding port 80 needs root)")
}

/// The fake-gcs-server binary, installed by `scripts/install-tools` when missing
/// (once per process, serialised across processes with flock when available).
fn fake_gcs_binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| install_fake_gcs().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|message| anyhow!(message))
}

fn install_fake_gcs() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = root.join(".tools/bin/fake-gcs-server");
    if is_executable(&binary) {
        return Ok(binary);
    }
    let script = root.join("scripts/install-tools");
    let lock = std::env::temp_dir().join("audio-store-install-tools.lock");
    let output = match Command::new("flock")
        .arg(&lock)
        .arg(&script)
        .stdin(Stdio::null())
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Command::new(&script).stdin(Stdio::null()).output()
        }
        other => other,
    }
    .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        is_executable(&binary),
        "{} succeeded but {} is still missing",
        script.display(),
        binary.display()
    );
    Ok(binary)
}

/// An owned fake-gcs-server on its own loopback address `127.0.0.X:80`.
///
/// It must listen on port 80: the Rust storage client drops the port from the
/// Host header and fake-gcs builds resumable-upload URLs from it. Fault tests
/// [`stop`](FakeGcs::stop) it and [`restart`](FakeGcs::restart) it on the same
/// address; use [`start_filesystem`](FakeGcs::start_filesystem) for objects to
/// survive that. Killed (and its address released) on drop.
pub struct FakeGcs {
    address: Ipv4Addr,
    backend: GcsBackend,
    process: Option<Supervised>,
}

impl FakeGcs {
    /// Starts an instance keeping objects in memory, on a fresh loopback address.
    pub fn start_memory() -> Result<FakeGcs> {
        FakeGcs::start(GcsBackend::Memory)
    }

    /// Starts an instance keeping objects under `root` (created if missing), on
    /// a fresh loopback address; objects survive [`restart`](FakeGcs::restart).
    pub fn start_filesystem(root: &Path) -> Result<FakeGcs> {
        fs::create_dir_all(root).with_context(|| format!("creating the fake-gcs root {}", root.display()))?;
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving the fake-gcs root {}", root.display()))?;
        FakeGcs::start(GcsBackend::Filesystem(root))
    }

    fn start(backend: GcsBackend) -> Result<FakeGcs> {
        let mut last_error = None;
        for _attempt in 0..5 {
            let address = claim_loopback_address()?;
            let mut gcs = FakeGcs {
                address,
                backend: backend.clone(),
                process: None,
            };
            match gcs.launch() {
                Ok(()) => return Ok(gcs),
                // Dropping `gcs` releases the address; another one may work
                // (another process may have taken this one in between).
                Err(failure) if failure.retryable => last_error = Some(failure.error),
                Err(failure) => return Err(failure.error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("fake-gcs-server did not start")))
    }

    fn launch(&mut self) -> Result<(), StartFailure> {
        let fatal = |error: anyhow::Error| StartFailure {
            error,
            retryable: false,
        };
        let binary = fake_gcs_binary().map_err(fatal)?;
        TcpListener::bind((self.address, 80))
            .with_context(|| format!("port 80 of {} is not free", self.address))
            .map_err(|error| StartFailure {
                error,
                retryable: true,
            })?;
        let mut args: Vec<String> = [
            "-scheme",
            "http",
            "-host",
            &self.address.to_string(),
            "-port",
            "80",
            "-log-level",
            "warn",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        match &self.backend {
            GcsBackend::Memory => args.extend(["-backend".to_string(), "memory".to_string()]),
            GcsBackend::Filesystem(root) => args.extend([
                "-backend".to_string(),
                "filesystem".to_string(),
                "-filesystem-root".to_string(),
                root.display().to_string(),
            ]),
        }
        let log = log_dir().join(format!("fake-gcs-{}.log", self.address));
        let what = format!("fake-gcs-server on {}", self.address);
        let mut process = Supervised::spawn(&what, &binary, &args, &log).map_err(fatal)?;
        let addr = SocketAddr::from((self.address, 80));
        let host = self.address.to_string();
        // fake-gcs exits (status 1) when its address is taken.
        let ready = process.wait_ready(None, || {
            matches!(probe_get(addr, &host, "/storage/v1/b"), Ok((200, _)))
        });
        match ready {
            Ok(()) => {
                self.process = Some(process);
                Ok(())
            }
            Err(failure) => {
                let _ = process.kill();
                Err(failure)
            }
        }
    }

    /// Base URL, `http://127.0.0.X` (port 80, so no port in the URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Whether the server process is running (false after [`stop`](FakeGcs::stop)
    /// or when it died).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Supervised::is_running)
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit.
    /// Does nothing when it is already stopped.
    pub fn stop(&mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process
                .kill()
                .with_context(|| format!("stopping fake-gcs on {}", self.address)),
            None => Ok(()),
        }
    }

    /// Starts the server again on the same address with the same backend (stops
    /// it first if it runs) and waits until it is ready. Only the filesystem
    /// backend keeps objects across this.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
            .map_err(|failure| failure.error)
            .with_context(|| format!("restarting fake-gcs on {}", self.address))
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.stop();
        claimed_addresses().remove(&self.address.octets()[3]);
    }
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

/// A unique resource name `<prefix>-<8 hex digits>`, e.g. `in-3f9c2a1b`: lowercase
/// `[a-z0-9-]`, starting with a letter, 10..=63 characters, so valid both as a
/// Pub/Sub topic/subscription name and as a GCS bucket name. Characters outside
/// that set are replaced by `-`.
pub fn unique(prefix: &str) -> String {
    let mut clean: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    clean = clean.trim_matches('-').to_string();
    if !clean.starts_with(|c: char| c.is_ascii_lowercase()) || clean.starts_with("goog") {
        clean.insert(0, 'x');
    }
    clean.truncate(54);
    let clean = clean.trim_end_matches('-');
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{clean}-{}", &id[..8])
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for URL path
/// segments (object names contain `/`) and query values.
fn encode(value: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, UNRESERVED).to_string()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(HTTP_TIMEOUT)
        .build()
        // Invariant: a plain-http client (no TLS backend) always builds.
        .expect("building a plain http client")
}

/// Sends a request; returns status and body when the status is a success or
/// one of `accept`, otherwise an error with the response body.
async fn send(request: reqwest::RequestBuilder, what: &str, accept: &[u16]) -> Result<(u16, bytes::Bytes)> {
    let response = request
        .send()
        .await
        .with_context(|| format!("{what}: request failed"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("{what}: reading the response body"))?;
    if status.is_success() || accept.contains(&status.as_u16()) {
        Ok((status.as_u16(), body))
    } else {
        bail!("{what}: http {status}: {}", String::from_utf8_lossy(&body))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body)
        .with_context(|| format!("{what}: unexpected response {}", String::from_utf8_lossy(body)))
}

// ---------------------------------------------------------------------------
// Pub/Sub REST client
// ---------------------------------------------------------------------------

/// Options of a subscription created by [`PubsubRest::create_subscription`].
#[derive(Debug, Default, Clone)]
pub struct SubscriptionOptions {
    /// Ack deadline in seconds (10..=600; the emulator's default is 10).
    pub ack_deadline_seconds: Option<i32>,
    /// Dead-letter topic (short name); enables the dead-letter policy and
    /// `deliveryAttempt` counting.
    pub dead_letter_topic: Option<String>,
    /// Maximum delivery attempts before dead-lettering (5..=100, default 5);
    /// needs `dead_letter_topic`.
    pub max_delivery_attempts: Option<i32>,
    /// Enables exactly-once delivery.
    pub exactly_once: bool,
    /// Retry policy minimum backoff (default 10 s when only the maximum is set).
    pub retry_min_backoff: Option<Duration>,
    /// Retry policy maximum backoff (default 600 s when only the minimum is set).
    pub retry_max_backoff: Option<Duration>,
}

/// One message received by a pull.
#[derive(Debug, Clone)]
pub struct Received {
    /// Ack id of this delivery (invalid after a seek).
    pub ack_id: String,
    /// Server-assigned message id (the emulator counts 1, 2, 3, … per emulator).
    pub message_id: String,
    /// Decoded message payload.
    pub data: Vec<u8>,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
    /// RFC 3339 publish time as the API gives it.
    pub publish_time: String,
    /// Delivery attempt (1, 2, …); only set on subscriptions with a dead-letter policy.
    pub delivery_attempt: Option<i32>,
}

impl Received {
    /// The payload parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.data).with_context(|| {
            format!(
                "message {} is not json: {}",
                self.message_id,
                String::from_utf8_lossy(&self.data)
            )
        })
    }

    /// The attribute `key`, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PullResponse {
    #[serde(default)]
    received_messages: Vec<RawReceived>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReceived {
    ack_id: String,
    message: RawMessage,
    delivery_attempt: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMessage {
    #[serde(default)]
    data: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    message_id: String,
    #[serde(default)]
    publish_time: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishResponse {
    message_ids: Vec<String>,
}

/// Formats a duration as a protobuf JSON duration, e.g. `1s`, `1.500s`.
fn proto_duration(duration: Duration) -> String {
    let nanos = duration.subsec_nanos();
    if nanos == 0 {
        format!("{}s", duration.as_secs())
    } else {
        let fraction = format!("{nanos:09}");
        format!("{}.{}s", duration.as_secs(), fraction.trim_end_matches('0'))
    }
}

/// A Pub/Sub client over the REST API (`/v1/projects/...`), independent of the
/// code under test. All names are short names (`my-topic`, not
/// `projects/p/topics/my-topic`). Create one per test: it holds a
/// `reqwest::Client`, which is bound to the runtime it is first used on.
#[derive(Clone)]
pub struct PubsubRest {
    endpoint: String,
    project: String,
    http: reqwest::Client,
}

impl PubsubRest {
    /// A client for `endpoint` (`http://127.0.0.1:PORT`) and `project`.
    pub fn new(endpoint: &str, project: &str) -> PubsubRest {
        PubsubRest {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            project: project.to_string(),
            http: http_client(),
        }
    }

    /// The emulator base URL this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Full topic name, `projects/P/topics/T`.
    pub fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project)
    }

    /// Full subscription name, `projects/P/subscriptions/S`.
    pub fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.endpoint)
    }

    /// Creates a topic; an existing one is fine (409).
    pub async fn create_topic(&self, topic: &str) -> Result<()> {
        let what = format!("creating topic {topic}");
        send(
            self.http.put(self.url(&self.topic_path(topic))).json(&json!({})),
            &what,
            &[409],
        )
        .await?;
        Ok(())
    }

    /// Deletes a topic (its subscriptions remain, detached); a missing one is fine (404).
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        let what = format!("deleting topic {topic}");
        send(self.http.delete(self.url(&self.topic_path(topic))), &what, &[404]).await?;
        Ok(())
    }

    /// Creates a subscription of `topic` (which must exist) with `options`; an
    /// existing subscription is fine (409) and is left as it is.
    pub async fn create_subscription(
        &self,
        name: &str,
        topic: &str,
        options: SubscriptionOptions,
    ) -> Result<()> {
        let mut body = json!({ "topic": self.topic_path(topic) });
        if let Some(seconds) = options.ack_deadline_seconds {
            body["ackDeadlineSeconds"] = json!(seconds);
        }
        match (&options.dead_letter_topic, options.max_delivery_attempts) {
            (Some(dead_letter_topic), attempts) => {
                body["deadLetterPolicy"] = json!({
                    "deadLetterTopic": self.topic_path(dead_letter_topic),
                    "maxDeliveryAttempts": attempts.unwrap_or(5),
                });
            }
            (None, Some(_)) => {
                bail!("subscription {name}: max_delivery_attempts needs a dead_letter_topic")
            }
            (None, None) => {}
        }
        if options.exactly_once {
            body["enableExactlyOnceDelivery"] = json!(true);
        }
        if options.retry_min_backoff.is_some() || options.retry_max_backoff.is_some() {
            body["retryPolicy"] = json!({
                "minimumBackoff": proto_duration(options.retry_min_backoff.unwrap_or(Duration::from_secs(10))),
                "maximumBackoff": proto_duration(options.retry_max_backoff.unwrap_or(Duration::from_secs(600))),
            });
        }
        let what = format!("creating subscription {name} of topic {topic}");
        send(
            self.http.put(self.url(&self.subscription_path(name))).json(&body),
            &what,
            &[409],
        )
        .await?;
        Ok(())
    }

    /// The subscription resource as the API returns it (`ackDeadlineSeconds`,
    /// `deadLetterPolicy`, `retryPolicy`, `enableExactlyOnceDelivery`, ...).
    pub async fn get_subscription(&self, name: &str) -> Result<Value> {
        let what = format!("getting subscription {name}");
        let (_, body) = send(self.http.get(self.url(&self.subscription_path(name))), &what, &[]).await?;
        parse_json(&body, &what)
    }

    /// Deletes a subscription; a missing one is fine (404).
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        let what = format!("deleting subscription {name}");
        send(
            self.http.delete(self.url(&self.subscription_path(name))),
            &what,
            &[404],
        )
        .await?;
        Ok(())
    }

    /// Publishes one message and returns its message id. Pub/Sub rejects a
    /// message with neither data nor attributes.
    pub async fn publish(&self, topic: &str, data: &[u8], attributes: &[(&str, &str)]) -> Result<String> {
        let attributes: BTreeMap<&str, &str> = attributes.iter().copied().collect();
        let mut message = json!({ "data": BASE64.encode(data) });
        if !attributes.is_empty() {
            message["attributes"] = json!(attributes);
        }
        let what = format!("publishing to {topic}");
        let url = format!("{}:publish", self.url(&self.topic_path(topic)));
        let (_, body) = send(
            self.http.post(url).json(&json!({ "messages": [message] })),
            &what,
            &[],
        )
        .await?;
        let response: PublishResponse = parse_json(&body, &what)?;
        response
            .message_ids
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("{what}: the response has no message id"))
    }

    /// Publishes `value` serialised as JSON; returns the message id.
    pub async fn publish_json(
        &self,
        topic: &str,
        value: &Value,
        attributes: &[(&str, &str)],
    ) -> Result<String> {
        let data = serde_json::to_vec(value).context("serialising the message")?;
        self.publish(topic, &data, attributes).await
    }

    /// Pulls up to `max` messages without waiting (`returnImmediately`); does not ack.
    pub async fn pull(&self, subscription: &str, max: usize) -> Result<Vec<Received>> {
        let what = format!("pulling from {subscription}");
        let url = format!("{}:pull", self.url(&self.subscription_path(subscription)));
        let request = json!({ "maxMessages": max, "returnImmediately": true });
        let (_, body) = send(self.http.post(url).json(&request), &what, &[]).await?;
        let response: PullResponse = parse_json(&body, &what)?;
        response
            .received_messages
            .into_iter()
            .map(|raw| {
                let data = BASE64.decode(raw.message.data.as_bytes()).with_context(|| {
                    format!(
                        "{what}: message {} has invalid base64 data",
                        raw.message.message_id
                    )
                })?;
                Ok(Received {
                    ack_id: raw.ack_id,
                    message_id: raw.message.message_id,
                    data,
                    attributes: raw.message.attributes,
                    publish_time: raw.message.publish_time,
                    delivery_attempt: raw.delivery_attempt,
                })
            })
            .collect()
    }

    /// Acknowledges deliveries; an empty list is a no-op.
    pub async fn ack(&self, subscription: &str, ack_ids: &[String]) -> Result<()> {
        if ack_ids.is_empty() {
            return Ok(());
        }
        let what = format!("acking {} message(s) on {subscription}", ack_ids.len());
        let url = format!("{}:acknowledge", self.url(&self.subscription_path(subscription)));
        send(
            self.http.post(url).json(&json!({ "ackIds": ack_ids })),
            &what,
            &[],
        )
        .await?;
        Ok(())
    }

    /// Nacks deliveries (ack deadline 0): the emulator redelivers them at once.
    pub async fn nack(&self, subscription: &str, ack_ids: &[String]) -> Result<()> {
        if ack_ids.is_empty() {
            return Ok(());
        }
        let what = format!("nacking {} message(s) on {subscription}", ack_ids.len());
        let url = format!(
            "{}:modifyAckDeadline",
            self.url(&self.subscription_path(subscription))
        );
        let request = json!({ "ackIds": ack_ids, "ackDeadlineSeconds": 0 });
        send(self.http.post(url).json(&request), &what, &[]).await?;
        Ok(())
    }

    /// Pulls up to `max` messages once and acks what arrived.
    pub async fn pull_and_ack(&self, subscription: &str, max: usize) -> Result<Vec<Received>> {
        let batch = self.pull(subscription, max).await?;
        if !batch.is_empty() {
            let ack_ids: Vec<String> = batch.iter().map(|m| m.ack_id.clone()).collect();
            self.ack(subscription, &ack_ids).await?;
        }
        Ok(batch)
    }

    /// Pulls and acks until `count` messages arrived or `timeout` passed;
    /// returns what arrived (possibly fewer, never more than it saw). Polls
    /// every 100 ms.
    pub async fn collect(
        &self,
        subscription: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut received = Vec::new();
        while received.len() < count {
            let batch = self.pull_and_ack(subscription, count - received.len()).await?;
            if batch.is_empty() {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            received.extend(batch);
        }
        Ok(received)
    }

    /// Like [`collect`](PubsubRest::collect), but fails (listing what did
    /// arrive) unless exactly `count` messages arrived within `timeout`.
    pub async fn collect_exactly(
        &self,
        subscription: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        let received = self.collect(subscription, count, timeout).await?;
        ensure!(
            received.len() == count,
            "expected {count} message(s) on {subscription} within {timeout:?}, got {}: {:?}",
            received.len(),
            received
                .iter()
                .map(|m| String::from_utf8_lossy(&m.data).into_owned())
                .collect::<Vec<_>>()
        );
        Ok(received)
    }

    /// Pulls and acks for `window`; returns everything that arrived (to assert
    /// that nothing (more) arrives).
    pub async fn drain_for(&self, subscription: &str, window: Duration) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + window;
        let mut received = Vec::new();
        loop {
            let batch = self.pull_and_ack(subscription, 100).await?;
            if batch.is_empty() {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(received);
                }
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            received.extend(batch);
        }
    }

    /// Creates a snapshot of `subscription` (its un-acked messages right now).
    pub async fn create_snapshot(&self, snapshot: &str, subscription: &str) -> Result<()> {
        let what = format!("creating snapshot {snapshot} of {subscription}");
        let url = self.url(&format!("projects/{}/snapshots/{snapshot}", self.project));
        let body = json!({ "subscription": self.subscription_path(subscription) });
        send(self.http.put(url).json(&body), &what, &[]).await?;
        Ok(())
    }

    /// Deletes a snapshot; a missing one is fine (404).
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        let what = format!("deleting snapshot {snapshot}");
        let url = self.url(&format!("projects/{}/snapshots/{snapshot}", self.project));
        send(self.http.delete(url), &what, &[404]).await?;
        Ok(())
    }

    /// Seeks `subscription` to `snapshot`: its un-acked messages become
    /// deliverable again (outstanding ack ids become invalid).
    pub async fn seek_to_snapshot(&self, subscription: &str, snapshot: &str) -> Result<()> {
        let what = format!("seeking {subscription} to snapshot {snapshot}");
        let url = format!("{}:seek", self.url(&self.subscription_path(subscription)));
        let body = json!({ "snapshot": format!("projects/{}/snapshots/{snapshot}", self.project) });
        send(self.http.post(url).json(&body), &what, &[]).await?;
        Ok(())
    }

    /// Makes every un-acked message of `subscription` deliverable again, including
    /// those leased to a dead client (the emulator never expires such leases):
    /// snapshot "now", seek to it, delete the snapshot.
    pub async fn release_leases(&self, subscription: &str) -> Result<()> {
        let snapshot = unique("release");
        self.create_snapshot(&snapshot, subscription).await?;
        self.seek_to_snapshot(subscription, &snapshot).await?;
        self.delete_snapshot(&snapshot).await
    }

    /// Pulls and acks the un-acked messages of `subscription` that a closed
    /// streaming pull left leased, releasing the leases again until `count`
    /// distinct messages arrived or `timeout` passed (one seek does not always
    /// free them on the emulator); then keeps releasing and pulling for two
    /// seconds so that any more would show. Returns each message once.
    pub async fn recover_unacked(
        &self,
        subscription: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut received: Vec<Received> = Vec::new();
        let mut quiet_until = None;
        loop {
            self.release_leases(subscription).await?;
            for message in self.pull_and_ack(subscription, 100).await? {
                if !received.iter().any(|seen| seen.message_id == message.message_id) {
                    received.push(message);
                }
            }
            let now = tokio::time::Instant::now();
            if received.len() >= count {
                let until = *quiet_until.get_or_insert(now + Duration::from_secs(2));
                if now >= until {
                    return Ok(received);
                }
            } else if now >= deadline {
                return Ok(received);
            }
            tokio::time::sleep(POLL_INTERVAL * 2).await;
        }
    }
}

// ---------------------------------------------------------------------------
// GCS REST client
// ---------------------------------------------------------------------------

/// Metadata of one object, as the JSON API reports it.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Bucket name.
    pub bucket: String,
    /// Object name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC32C, base64 of the big-endian u32 (compare with [`crc32c_base64`]).
    pub crc32c: String,
    /// MD5, base64 (absent for composite objects on real GCS).
    pub md5: Option<String>,
    /// Generation, a decimal string.
    pub generation: String,
    /// Content type (fake-gcs 1.54 drops the one the Rust storage crate sends).
    pub content_type: Option<String>,
    /// Custom metadata.
    pub metadata: BTreeMap<String, String>,
    /// Storage class.
    pub storage_class: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    bucket: String,
    name: String,
    size: String,
    #[serde(default)]
    crc32c: String,
    md5_hash: Option<String>,
    #[serde(default)]
    generation: String,
    content_type: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    storage_class: Option<String>,
}

impl TryFrom<RawObject> for ObjectInfo {
    type Error = anyhow::Error;

    fn try_from(raw: RawObject) -> Result<ObjectInfo> {
        let size = raw
            .size
            .parse()
            .with_context(|| format!("object {}/{}: invalid size {:?}", raw.bucket, raw.name, raw.size))?;
        Ok(ObjectInfo {
            bucket: raw.bucket,
            name: raw.name,
            size,
            crc32c: raw.crc32c,
            md5: raw.md5_hash,
            generation: raw.generation,
            content_type: raw.content_type,
            metadata: raw.metadata,
            storage_class: raw.storage_class,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectList {
    #[serde(default)]
    items: Vec<RawObject>,
    next_page_token: Option<String>,
}

/// A Cloud Storage client over the JSON API (`/storage/v1/...`), independent of
/// the code under test. Create one per test (see [`PubsubRest`]).
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
            http: http_client(),
        }
    }

    /// The base URL this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
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
        let what = format!("creating bucket {bucket}");
        let url = format!("{}/storage/v1/b?project={}", self.endpoint, encode(PROJECT));
        send(
            self.http.post(url).json(&json!({ "name": bucket })),
            &what,
            &[409],
        )
        .await?;
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
        parse_json::<RawObject>(&body, &what)?.try_into()
    }

    /// Uploads `bytes` as `bucket/name` with a content type and custom metadata
    /// (multipart upload), replacing any existing object.
    pub async fn upload_with(
        &self,
        bucket: &str,
        name: &str,
        bytes: &[u8],
        content_type: &str,
        metadata: &[(&str, &str)],
    ) -> Result<ObjectInfo> {
        let what = format!("uploading gs://{bucket}/{name}");
        let url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=multipart",
            self.endpoint,
            encode(bucket)
        );
        let metadata: BTreeMap<&str, &str> = metadata.iter().copied().collect();
        let resource = json!({ "name": name, "contentType": content_type, "metadata": metadata });
        let boundary = format!("harness-{}", uuid::Uuid::new_v4().simple());
        let mut body = Vec::with_capacity(bytes.len() + 512);
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: {content_type}\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let request = self
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/related; boundary={boundary}"),
            )
            .body(body);
        let (_, body) = send(request, &what, &[]).await?;
        parse_json::<RawObject>(&body, &what)?.try_into()
    }

    /// Metadata of `bucket/name`, or `None` when the object (or the bucket) does
    /// not exist.
    pub async fn object(&self, bucket: &str, name: &str) -> Result<Option<ObjectInfo>> {
        let what = format!("getting gs://{bucket}/{name}");
        let (status, body) = send(self.http.get(self.object_url(bucket, name)), &what, &[404]).await?;
        if status == 404 {
            return Ok(None);
        }
        Ok(Some(parse_json::<RawObject>(&body, &what)?.try_into()?))
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
            for raw in page.items {
                objects.push(ObjectInfo::try_from(raw)?);
            }
            match page.next_page_token {
                Some(token) if !token.is_empty() => page_token = Some(token),
                _ => return Ok(objects),
            }
        }
    }

    /// The content of `bucket/name` (`alt=media`), in memory.
    pub async fn download(&self, bucket: &str, name: &str) -> Result<Vec<u8>> {
        let what = format!("downloading gs://{bucket}/{name}");
        let url = format!("{}?alt=media", self.object_url(bucket, name));
        let (_, body) = send(self.http.get(url), &what, &[]).await?;
        Ok(body.to_vec())
    }

    /// Streams the content of `bucket/name` into the file `path` (never all in
    /// memory); returns the number of bytes written.
    pub async fn download_to(&self, bucket: &str, name: &str, path: &Path) -> Result<u64> {
        let what = format!("downloading gs://{bucket}/{name} to {}", path.display());
        let url = format!("{}?alt=media", self.object_url(bucket, name));
        let response = self
            .http
            .get(url)
            .send()
            .await
            .with_context(|| format!("{what}: request failed"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{what}: http {status}: {body}");
        }
        let mut file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("{what}: creating the file"))?;
        let mut stream = response.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("{what}: reading the body"))?;
            file.write_all(&chunk)
                .await
                .with_context(|| format!("{what}: writing the file"))?;
            written += chunk.len() as u64;
        }
        file.flush()
            .await
            .with_context(|| format!("{what}: flushing the file"))?;
        Ok(written)
    }

    /// Deletes `bucket/name`; returns false when it did not exist.
    pub async fn delete_object(&self, bucket: &str, name: &str) -> Result<bool> {
        let what = format!("deleting gs://{bucket}/{name}");
        let (status, _) = send(self.http.delete(self.object_url(bucket, name)), &what, &[404]).await?;
        Ok(status != 404)
    }
}

/// CRC32C in the GCS format: base64 of the big-endian u32.
pub fn crc32c_base64(bytes: &[u8]) -> String {
    BASE64.encode(crc32c::crc32c(bytes).to_be_bytes())
}

/// [`crc32c_base64`] of a file's content, read in 1 MiB chunks.
pub fn crc32c_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            return Ok(BASE64.encode(crc.to_be_bytes()));
        }
        crc = crc32c::crc32c_append(crc, &buffer[..read]);
    }
}

// ---------------------------------------------------------------------------
// Per-test environment
// ---------------------------------------------------------------------------

/// A fresh, isolated set of names and a spool dir for one test.
pub struct TestEnv {
    /// The 8-hex-digit id shared by all names of this environment.
    pub id: String,
    /// Pub/Sub emulator base URL, `http://127.0.0.1:PORT`.
    pub pubsub_endpoint: String,
    /// fake-gcs base URL, `http://127.0.0.X`.
    pub gcs_endpoint: String,
    /// REST client of the Pub/Sub emulator.
    pub pubsub: PubsubRest,
    /// REST client of fake-gcs.
    pub gcs: GcsRest,
    /// Input topic ("audio processed" messages), `in-<id>`.
    pub topic: String,
    /// Input subscription (the service under test pulls it), `in-sub-<id>`.
    pub subscription: String,
    /// Output topic ("audio stored" events), `stored-<id>`.
    pub stored_topic: String,
    /// Subscription of the output topic that the test reads, `stored-sub-<id>`.
    pub stored_subscription: String,
    /// Dead-letter topic of the input subscription, `dlq-<id>`.
    pub dead_letter_topic: String,
    /// Subscription of the dead-letter topic, `dlq-sub-<id>`.
    pub dead_letter_subscription: String,
    /// Destination bucket, `audio-<id>`.
    pub bucket: String,
    /// Staging bucket, `staging-<id>`.
    pub staging_bucket: String,
    /// A local root for source files; removed on drop.
    pub spool: tempfile::TempDir,
    /// The Pub/Sub emulator of this environment alone, if it has one; stopped on drop.
    _own_pubsub: Option<PubsubEmulator>,
}

impl Default for TestEnv {
    fn default() -> TestEnv {
        TestEnv::new()
    }
}

impl TestEnv {
    /// A Pub/Sub emulator of its own (started here, stopped on drop) and
    /// unique names on the shared fake-gcs (starting it if needed); creates the
    /// spool dir but no cloud resources.
    ///
    /// Why not one emulator for all tests: the emulator fails to handle a
    /// client's RST_STREAM (a `NoSuchMethodError` in its gRPC server, see its
    /// log), so every streaming pull a client closes stays open inside it and
    /// keeps being handed messages; with tests sharing an emulator, those
    /// dead streams made other tests' messages go missing now and then.
    pub fn new() -> TestEnv {
        TestEnv::with_gcs(&services().gcs_endpoint)
    }

    /// Like [`new`](TestEnv::new), but with buckets on another fake-gcs (e.g. a
    /// [`FakeGcs`] that the test stops and restarts).
    pub fn with_gcs(gcs_endpoint: &str) -> TestEnv {
        let pubsub =
            PubsubEmulator::start().unwrap_or_else(|e| panic!("cannot start a pubsub emulator: {e:#}"));
        let env = TestEnv::with_endpoints(&pubsub.endpoint(), gcs_endpoint);
        TestEnv {
            _own_pubsub: Some(pubsub),
            ..env
        }
    }

    /// Like [`new`](TestEnv::new), on the given emulators.
    pub fn with_endpoints(pubsub_endpoint: &str, gcs_endpoint: &str) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let spool = tempfile::Builder::new()
            .prefix("audio-store-spool-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create the spool dir: {e}"));
        TestEnv {
            pubsub_endpoint: pubsub_endpoint.trim_end_matches('/').to_string(),
            gcs_endpoint: gcs_endpoint.trim_end_matches('/').to_string(),
            pubsub: PubsubRest::new(pubsub_endpoint, PROJECT),
            gcs: GcsRest::new(gcs_endpoint),
            topic: format!("in-{id}"),
            subscription: format!("in-sub-{id}"),
            stored_topic: format!("stored-{id}"),
            stored_subscription: format!("stored-sub-{id}"),
            dead_letter_topic: format!("dlq-{id}"),
            dead_letter_subscription: format!("dlq-sub-{id}"),
            bucket: format!("audio-{id}"),
            staging_bucket: format!("staging-{id}"),
            spool,
            id,
            _own_pubsub: None,
        }
    }

    /// The default input subscription options: ack deadline 10 s, dead-letter
    /// policy to `dead_letter_topic` after 5 attempts, retry backoff 1 s..5 s.
    pub fn default_input_options(&self) -> SubscriptionOptions {
        SubscriptionOptions {
            ack_deadline_seconds: Some(10),
            dead_letter_topic: Some(self.dead_letter_topic.clone()),
            max_delivery_attempts: Some(5),
            exactly_once: false,
            retry_min_backoff: Some(Duration::from_secs(1)),
            retry_max_backoff: Some(Duration::from_secs(5)),
        }
    }

    /// Creates all topics, the subscriptions (input with
    /// [`default_input_options`](TestEnv::default_input_options)) and both buckets.
    pub async fn create_resources(&self) -> Result<()> {
        self.create_resources_with(self.default_input_options()).await
    }

    /// Like [`create_resources`](TestEnv::create_resources), with `input` as the
    /// options of the input subscription.
    pub async fn create_resources_with(&self, input: SubscriptionOptions) -> Result<()> {
        for topic in [&self.topic, &self.stored_topic, &self.dead_letter_topic] {
            self.pubsub.create_topic(topic).await?;
        }
        self.pubsub
            .create_subscription(&self.subscription, &self.topic, input)
            .await?;
        self.pubsub
            .create_subscription(
                &self.stored_subscription,
                &self.stored_topic,
                SubscriptionOptions::default(),
            )
            .await?;
        self.pubsub
            .create_subscription(
                &self.dead_letter_subscription,
                &self.dead_letter_topic,
                SubscriptionOptions::default(),
            )
            .await?;
        self.gcs.create_bucket(&self.bucket).await?;
        self.gcs.create_bucket(&self.staging_bucket).await?;
        Ok(())
    }

    /// The log file of this environment's own Pub/Sub emulator, if it has one.
    pub fn pubsub_log(&self) -> Option<PathBuf> {
        self._own_pubsub.as_ref().map(PubsubEmulator::log)
    }

    /// The absolute path of `name` (may contain `/`) in the spool dir; creates nothing.
    pub fn spool_path(&self, name: &str) -> PathBuf {
        self.spool.path().join(name)
    }

    /// Writes `bytes` to `name` (may contain `/`; parents are created) in the
    /// spool dir and returns its absolute path. Panics when it cannot.
    pub fn spool_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.spool_path(name);
        let write = || -> Result<()> {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
        };
        if let Err(e) = write() {
            panic!("cannot write the spool file: {e:#}");
        }
        path
    }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Calls `condition` every 100 ms until it returns `Ok(Some(value))`, and returns
/// that value; fails with `what` when `timeout` passes first. An `Err` from
/// `condition` ends the wait at once (map transient errors to `Ok(None)`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition()
            .await
            .with_context(|| format!("while waiting for {what}"))?
        {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------
// Sample media
// ---------------------------------------------------------------------------

/// Sample rate of the sample WAVs.
pub const WAV_SAMPLE_RATE: u32 = 8_000;

/// The 44-byte header of a 16-bit PCM mono WAV at [`WAV_SAMPLE_RATE`] with
/// `data_len` data bytes (sizes saturate at u32::MAX, as streaming writers do).
fn wav_header(data_len: u64) -> [u8; 44] {
    let channels: u16 = 1;
    let bits: u16 = 16;
    let block_align = channels * bits / 8;
    let byte_rate = WAV_SAMPLE_RATE * u32::from(block_align);
    let data_size = u32::try_from(data_len).unwrap_or(u32::MAX);
    let riff_size = u32::try_from(data_len + 36).unwrap_or(u32::MAX);
    let mut header = [0u8; 44];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        header[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(b"RIFF");
    put(&riff_size.to_le_bytes());
    put(b"WAVE");
    put(b"fmt ");
    put(&16u32.to_le_bytes());
    put(&1u16.to_le_bytes()); // PCM
    put(&channels.to_le_bytes());
    put(&WAV_SAMPLE_RATE.to_le_bytes());
    put(&byte_rate.to_le_bytes());
    put(&block_align.to_le_bytes());
    put(&bits.to_le_bytes());
    put(b"data");
    put(&data_size.to_le_bytes());
    header
}

/// A valid WAV: 16-bit PCM, 8 kHz mono, `samples` samples of a 440 Hz sine at
/// half scale (44 + 2 × samples bytes).
pub fn sample_wav(samples: usize) -> Vec<u8> {
    let mut wav = Vec::with_capacity(44 + samples * 2);
    wav.extend_from_slice(&wav_header(samples as u64 * 2));
    for i in 0..samples {
        let t = i as f64 / f64::from(WAV_SAMPLE_RATE);
        let value = (t * 440.0 * std::f64::consts::TAU).sin() * f64::from(i16::MAX) * 0.5;
        wav.extend_from_slice(&(value.round() as i16).to_le_bytes());
    }
    wav
}

/// CRC-32 (IEEE 802.3, as used by PNG and zip), bitwise.
fn crc32_ieee(chunks: &[&[u8]]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for chunk in chunks {
        for &byte in *chunk {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
    }
    !crc
}

/// Adler-32, as used by zlib.
fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in bytes {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// A valid 4×4 8-bit RGB PNG (a colour gradient), with correct chunk CRCs and
/// a zlib stream made of one stored (uncompressed) deflate block.
pub fn sample_png() -> Vec<u8> {
    const SIDE: u32 = 4;
    let mut raw = Vec::new();
    for y in 0..SIDE {
        raw.push(0); // filter type: none
        for x in 0..SIDE {
            raw.extend_from_slice(&[(x * 85) as u8, (y * 85) as u8, 128]);
        }
    }
    // Invariant: 4 × (1 + 4 × 3) = 52 bytes fits one stored block (max 65535).
    let len = raw.len() as u16;
    let mut zlib = vec![0x78, 0x01, 0x01];
    zlib.extend_from_slice(&len.to_le_bytes());
    zlib.extend_from_slice(&(!len).to_le_bytes());
    zlib.extend_from_slice(&raw);
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());

    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&SIDE.to_be_bytes());
    ihdr.extend_from_slice(&SIDE.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // depth 8, RGB, deflate, no filter, no interlace

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (b"IHDR", ihdr.as_slice()),
        (b"IDAT", zlib.as_slice()),
        (b"IEND", &[][..]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        png.extend_from_slice(&crc32_ieee(&[kind, data]).to_be_bytes());
    }
    png
}

/// SplitMix64, a tiny deterministic PRNG.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Writes a large WAV to `path`: a 44-byte 16-bit PCM 8 kHz mono header
/// followed by `len` pseudo-random bytes (deterministic from `seed`), in 1 MiB
/// chunks, never all in memory. The file is 44 + `len` bytes.
pub fn write_large_wav(path: &Path, len: u64, seed: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(&wav_header(len))
        .with_context(|| format!("writing {}", path.display()))?;
    let mut rng = SplitMix64(seed);
    let mut buffer = vec![0u8; CHUNK];
    let mut remaining = len;
    while remaining > 0 {
        for word in buffer.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        let n = remaining.min(CHUNK as u64) as usize;
        file.write_all(&buffer[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        remaining -= n as u64;
    }
    file.flush()
        .with_context(|| format!("flushing {}", path.display()))?;
    Ok(())
}
