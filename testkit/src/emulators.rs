//! The local emulators: the Pub/Sub emulator (from the machine image) and
//! fake-gcs-server (installed into `.tools/` by `scripts/install-tools`;
//! nothing here installs anything).
//!
//! [`shared_gcs`] is one fake-gcs per process, started on first use;
//! [`PubsubEmulator`] and [`FakeGcs`] are owned instances, killed on drop.

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{Context, Result, bail};

use crate::process::{StartFailure, Supervised, log_dir, probe_get, require_executable, with_retries};

/// Default location of the Pub/Sub emulator (Debian package
/// google-cloud-cli-pubsub-emulator); `PUBSUB_EMULATOR_BIN` overrides it.
const PUBSUB_EMULATOR_BIN: &str =
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";

/// The repository root (the workspace this crate is a member of).
pub fn repository_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("invariant: the test kit is a directory of the repository")
}

/// The fake-gcs-server that all tests of this process share: started on first
/// use, its endpoint `http://127.0.0.X`.
///
/// Blocks the calling thread while it starts. Panics when it cannot be started
/// (a missing tool says to run `scripts/install-tools`); later calls panic
/// with the same message instead of trying again.
pub fn shared_gcs() -> &'static str {
    // Kept in a static, never dropped: the watchdog ends it when the process exits.
    static GCS: OnceLock<Result<(FakeGcs, String), String>> = OnceLock::new();
    let started = GCS.get_or_init(|| {
        let gcs = FakeGcs::start_memory().map_err(|e| format!("{e:#}"))?;
        let endpoint = gcs.endpoint();
        Ok((gcs, endpoint))
    });
    match started {
        Ok((_, endpoint)) => endpoint,
        Err(message) => panic!("cannot start the shared fake-gcs-server: {message}"),
    }
}

/// An owned Pub/Sub emulator on `127.0.0.1:<free port>`; killed on drop.
pub struct PubsubEmulator {
    port: u16,
    process: Option<Supervised>,
}

/// The emulator's JVM options for tests: only the quick (C1) JIT compiler.
/// With the optimising one as well, compiling the emulator's hot paths anew
/// in every emulator was most of the CPU the integration tests used (429 →
/// 279 CPU-s for the suite, measured 2026-12-01), and tests run a few minutes
/// each at most.
const QUICK_JIT: &str = "-XX:TieredStopAtLevel=1";

/// The JVM's class-data archive of the emulator that `scripts/install-tools`
/// makes (it halves the start: ~1.3 → ~0.6 CPU-s, ~1.1 → ~0.5 s).
const CLASS_ARCHIVE: &str = ".tools/pubsub-emulator.jsa";

impl PubsubEmulator {
    /// Starts an emulator for tests (the JVM with its quick JIT compiler only,
    /// and the class-data archive if `scripts/install-tools` made one)
    /// on a free port and waits until it answers `GET /` with `Ok` (retries on
    /// another port if the chosen one was taken).
    pub fn start() -> Result<PubsubEmulator> {
        let archive = repository_root().join(CLASS_ARCHIVE);
        let options = match archive.is_file() {
            true => format!("{QUICK_JIT} -XX:SharedArchiveFile={}", archive.display()),
            false => QUICK_JIT.to_string(),
        };
        PubsubEmulator::start_with(&[("CLOUD_PUBSUB_EMULATOR_OPTS", &options)])
    }

    /// Like [`start`](PubsubEmulator::start), with the JVM's default JIT
    /// compilers: slower to warm up, faster under sustained load (the benchmark).
    pub fn start_for_throughput() -> Result<PubsubEmulator> {
        PubsubEmulator::start_with(&[])
    }

    fn start_with(envs: &[(&str, &str)]) -> Result<PubsubEmulator> {
        let binary = std::env::var_os("PUBSUB_EMULATOR_BIN")
            .map_or_else(|| PathBuf::from(PUBSUB_EMULATOR_BIN), PathBuf::from);
        require_executable(&binary, "the Pub/Sub emulator")?;
        with_retries(3, || {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|listener| listener.local_addr())
                .context("picking a free port")?
                .port();
            let log = log_dir().join(format!("pubsub-{port}.log"));
            let args = vec!["--host=127.0.0.1".to_string(), format!("--port={port}")];
            // The emulator does not exit when its port is taken (a BindException
            // leaves the JVM running), and another emulator may answer on that
            // port: only its own "Server started" line proves that it listens.
            let started = format!("Server started, listening on {port}");
            let url = format!("http://127.0.0.1:{port}/");
            let process = Supervised::spawn("the pubsub emulator", &binary, &args, envs, &log)?.ready(
                Some("java.net.BindException"),
                |log| {
                    log.contains(&started)
                        && matches!(probe_get(url.clone()), Some((200, body)) if body.contains("Ok"))
                },
            )?;
            Ok(PubsubEmulator {
                port,
                process: Some(process),
            })
        })
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The emulator's log file (stdout and stderr).
    pub fn log(&self) -> PathBuf {
        log_dir().join(format!("pubsub-{}.log", self.port))
    }
}

impl Drop for PubsubEmulator {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            let _ = process.kill();
        }
    }
}

/// Where a [`FakeGcs`] keeps its objects.
#[derive(Debug, Clone)]
enum GcsBackend {
    Memory,
    Filesystem(PathBuf),
}

/// Loopback addresses (last octet) held by [`FakeGcs`] values of this process,
/// running or stopped, so that a stopped instance keeps its address.
static CLAIMED_ADDRESSES: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());

fn claimed_addresses() -> MutexGuard<'static, BTreeSet<u8>> {
    // A panic while holding this lock cannot leave the set inconsistent.
    CLAIMED_ADDRESSES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Picks a random 127.0.0.X (X in 2..=250) not claimed in this process whose
/// port 80 is free right now, and claims it, for a [`FakeGcs`] or a
/// [`FaultProxy`](crate::FaultProxy): a stopped fake-gcs keeps its address,
/// which a proxy of another test must not take in the meantime.
pub(crate) fn claim_loopback_address() -> Result<Ipv4Addr> {
    for _ in 0..200 {
        let octet = 2 + (uuid::Uuid::new_v4().as_bytes()[0] % 249);
        let address = Ipv4Addr::new(127, 0, 0, octet);
        let mut claimed = claimed_addresses();
        if !claimed.contains(&octet) && TcpListener::bind((address, 80)).is_ok() {
            claimed.insert(octet);
            return Ok(address);
        }
    }
    bail!("found no loopback address 127.0.0.X with a free port 80 (binding port 80 needs root)")
}

/// Gives back an address of [`claim_loopback_address`].
pub(crate) fn release_loopback_address(address: Ipv4Addr) {
    claimed_addresses().remove(&address.octets()[3]);
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
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        FakeGcs::start(GcsBackend::Filesystem(root.canonicalize()?))
    }

    fn start(backend: GcsBackend) -> Result<FakeGcs> {
        with_retries(5, || {
            let mut gcs = FakeGcs {
                address: claim_loopback_address()?,
                backend: backend.clone(),
                process: None,
            };
            // On a failure, dropping `gcs` releases the address; another one may work
            // (another process may have taken this one in between).
            gcs.launch().map(|()| gcs)
        })
    }

    fn launch(&mut self) -> Result<(), StartFailure> {
        let binary = repository_root().join(".tools/bin/fake-gcs-server");
        require_executable(&binary, "fake-gcs-server")?;
        TcpListener::bind((self.address, 80))
            .with_context(|| format!("port 80 of {} is not free", self.address))
            .map_err(|error| StartFailure {
                error,
                retryable: true,
            })?;
        let host = self.address.to_string();
        let flags = format!("-scheme http -host {host} -port 80 -log-level warn");
        let mut args: Vec<String> = flags.split_whitespace().map(String::from).collect();
        match &self.backend {
            GcsBackend::Memory => args.extend(["-backend".into(), "memory".into()]),
            GcsBackend::Filesystem(root) => args.extend([
                "-backend".into(),
                "filesystem".into(),
                "-filesystem-root".into(),
                root.display().to_string(),
            ]),
        }
        let log = log_dir().join(format!("fake-gcs-{host}.log"));
        let what = format!("fake-gcs-server on {host}");
        let url = format!("http://{host}/storage/v1/b");
        // fake-gcs exits (status 1) when its address is taken.
        let process = Supervised::spawn(&what, &binary, &args, &[], &log)?
            .ready(None, |_| matches!(probe_get(url.clone()), Some((200, _))))?;
        self.process = Some(process);
        Ok(())
    }

    /// Base URL, `http://127.0.0.X` (port 80, so no port in the URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit.
    /// Does nothing when it is already stopped.
    pub fn stop(&mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process.kill(),
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
        release_loopback_address(self.address);
    }
}
