//! Throughput and memory benchmark of the `audio-store` worker (issue 6, "Fast and small").
//!
//! Run it with `scripts/bench`, which builds the release worker and then runs
//! `cargo bench --bench throughput`. It is not part of the test suite (run
//! without `--bench`, as `cargo test --all-targets` does, it does nothing).
//!
//! Everything runs on this machine, started by the test kit (`testkit/`):
//! one Pub/Sub emulator for the whole run, a fresh fake-gcs-server (memory
//! backend) for every measurement, and the worker as a process
//! (`target/release/audio-store run`). Three scenarios, each run for several
//! rounds (a round runs the ceilings and then the worker on the same files,
//! back to back):
//!
//! - **small**: N messages of a 64 KiB WAV plus an 8 KiB PNG, all published
//!   before the worker starts; messages/s from the worker's spawn to the last
//!   "audio stored" event.
//! - **large**: 8 messages of a 64 MiB WAV, published to an idle worker;
//!   MiB/s from the first publish to the last event.
//! - **huge**: one 1 GiB WAV, as above, plus the worker's peak RSS (VmHWM) and
//!   its idle RSS (VmRSS 2 s after it became ready, before any message).
//!
//! The ceilings use the same files, concurrency and settings without the
//! worker, through the product's own clients, built from the same
//! configuration as the worker's (so they cannot drift from it): a tight
//! uploader straight to a fresh fake-gcs (`audio_store::store::Store`, no
//! Pub/Sub), and a Pub/Sub relay with no upload (`audio_store::pubsub`'s
//! `Inbox` and `Outbox`: pull the same input messages, publish an event of
//! the same size and wait for its confirmation, ack). Events are received the
//! same way for the relay and the worker: a streaming pull of the stored
//! subscription. The CPU time of every process (worker, fake-gcs, Pub/Sub
//! emulator, this bench, everything else) is read from /proc around each
//! measurement.
//!
//! Arguments (after `--`): `small`, `large`, `huge` pick scenarios (default:
//! all). Environment: `BENCH_CONCURRENCY` (32), `BENCH_SMALL_MESSAGES` (500),
//! `BENCH_LARGE_MESSAGES` (8), `BENCH_LARGE_MIB` (64), `BENCH_HUGE_MIB`
//! (1024), `BENCH_ROUNDS` (5; medians are reported), `BENCH_WARMUP` (1; 0
//! skips the uncounted first round of the small scenario), `AUDIO_STORE_BIN` (the
//! worker binary; default `target/release/audio-store`, which must not be older
//! than `src/`).

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use audio_store::config::Settings;
use audio_store::pubsub::{BUSY_BATCHING, Inbox, Outbox};
use audio_store::source::LocalContent;
use audio_store::store::{NewObject, RESUMABLE_THRESHOLD, Store, Written};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::media::{sample_png, sample_wav, wav_header_len, write_wav};
use testkit::{FakeGcs, PubsubEmulator, TestEnv, WorkerProcess};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Sizes of the small scenario's files.
const SMALL_AUDIO: usize = 64 * 1024;
const SMALL_THUMBNAIL: usize = 8 * 1024;
/// How long the worker sits idle before its idle RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// Issue 6's targets.
const TARGET_SMALL: f64 = 0.80;
const TARGET_LARGE: f64 = 0.85;
const TARGET_PEAK_RSS_MIB: f64 = 64.0;
const TARGET_IDLE_RSS_MIB: f64 = 30.0;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, and the suite must not run a 10-minute benchmark.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("throughput: a benchmark, not a test; run it with scripts/bench (skipped)");
        return Ok(());
    }
    let params = Params::from_env()?;
    let selected: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    for name in &selected {
        ensure!(
            ["small", "large", "huge"].contains(&name.as_str()),
            "unknown scenario {name:?}: expected small, large or huge"
        );
    }
    let wanted = |name: &str| selected.is_empty() || selected.iter().any(|s| s == name);
    let binary = worker_binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async {
        let started = Instant::now();
        println!("{}", Machine::describe().markdown());
        println!("worker binary: {}", binary.display());
        println!("services' logs: {}", testkit::process::log_dir().display());
        let pubsub = tokio::task::spawn_blocking(PubsubEmulator::start).await??;
        let bench = Bench {
            params,
            binary,
            pubsub_endpoint: pubsub.endpoint(),
        };
        let mut report = Report::default();
        if wanted("small") {
            bench.small(&mut report).await.context("small messages")?;
        }
        if wanted("large") {
            bench.large(&mut report).await.context("large files")?;
        }
        if wanted("huge") {
            bench.huge(&mut report).await.context("1 GiB file")?;
        }
        println!();
        println!(
            "## Results ({:.0} s, load average at the end: {})",
            started.elapsed().as_secs_f64(),
            loadavg()
        );
        println!();
        println!("{}", report.results_table(&bench.params));
        println!("{}", report.rounds_table());
        println!("{}", report.cpu_table());
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Parameters and the worker binary
// ---------------------------------------------------------------------------

struct Params {
    concurrency: usize,
    small_messages: usize,
    large_messages: usize,
    large_size: u64,
    huge_size: u64,
    rounds: usize,
    /// Whether the small scenario runs one uncounted round first (`BENCH_WARMUP=0` skips it).
    warmup: bool,
}

impl Params {
    fn from_env() -> Result<Params> {
        fn number(name: &str, default: u64) -> Result<u64> {
            match std::env::var(name) {
                Ok(value) => value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("{name}={value:?}: expected a positive integer")),
                Err(_) => Ok(default),
            }
        }
        Ok(Params {
            concurrency: number("BENCH_CONCURRENCY", 32)? as usize,
            small_messages: number("BENCH_SMALL_MESSAGES", 500)? as usize,
            large_messages: number("BENCH_LARGE_MESSAGES", 8)? as usize,
            large_size: number("BENCH_LARGE_MIB", 64)? * MIB,
            huge_size: number("BENCH_HUGE_MIB", 1024)? * MIB,
            rounds: number("BENCH_ROUNDS", 5)? as usize,
            warmup: std::env::var("BENCH_WARMUP").map_or(true, |value| value != "0"),
        })
    }
}

/// The release worker (or `AUDIO_STORE_BIN`), refusing a default one older
/// than a file of `src/`: cargo would have rebuilt it.
fn worker_binary() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rebuild = "run scripts/bench, or `cargo build --release --bin audio-store` first";
    if let Some(path) = std::env::var_os("AUDIO_STORE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let binary = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("release/audio-store");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("the release worker {} is missing: {rebuild}", binary.display()))?;
    let mut visit = vec![root.join("src")];
    while let Some(path) = visit.pop() {
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            visit.extend(std::fs::read_dir(&path)?.flatten().map(|entry| entry.path()));
        } else if meta.modified()? > built {
            bail!(
                "the release worker {} is older than {}: {rebuild}",
                binary.display(),
                path.display()
            );
        }
    }
    Ok(binary)
}

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

struct Bench {
    params: Params,
    binary: PathBuf,
    pubsub_endpoint: String,
}

/// One input message: its files and the JSON the worker gets.
struct Input {
    id: String,
    audio: PathBuf,
    thumbnail: Option<PathBuf>,
}

impl Input {
    fn json(&self) -> Vec<u8> {
        let mut message = serde_json::json!({ "audio": self.audio, "id": self.id });
        if let Some(thumbnail) = &self.thumbnail {
            message["thumbnail"] = serde_json::json!(thumbnail);
        }
        message.to_string().into_bytes()
    }
}

/// Fresh resources on `gcs_endpoint` and the product's configuration for them,
/// reading sources from `files`' spool: what the worker gets, as variables, and
/// what the ceilings build their clients from.
struct Setup {
    env: TestEnv,
    environment: BTreeMap<String, String>,
    settings: Settings,
}

impl Bench {
    fn setup(&self, gcs_endpoint: &str, files: &TestEnv) -> Result<Setup> {
        let env = TestEnv::with_endpoints(&self.pubsub_endpoint, gcs_endpoint);
        let spool = files.spool.path().display().to_string();
        let concurrency = self.params.concurrency.to_string();
        let environment = testkit::environment(
            &env,
            &[
                ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", &spool),
                ("AUDIO_STORE__WORKER__CONCURRENCY", &concurrency),
                ("AUDIO_STORE__LOG__LEVEL", "warn"),
            ],
        );
        let settings = Settings::load(None, &environment).context("the benchmark's settings")?;
        Ok(Setup {
            env,
            environment,
            settings,
        })
    }

    async fn small(&self, report: &mut Report) -> Result<()> {
        let n = self.params.small_messages;
        let bytes = n as u64 * (SMALL_AUDIO + SMALL_THUMBNAIL) as u64;
        let title = format!("small: {n} × (64 KiB WAV + 8 KiB PNG)");
        let mut scenario = Scenario::new(Kind::Small, title, n, bytes);
        // Round 0 warms up the Java emulator's JIT on the paths these runs use, and is not
        // counted: a fresh emulator spends a core compiling during its first busy seconds.
        let first = if self.params.warmup { 0 } else { 1 };
        for round in first..=self.params.rounds {
            if round == 0 {
                println!("\n# {}, warm-up round (not counted)", scenario.title);
            } else {
                println!("\n# {}, round {round}/{}", scenario.title, self.params.rounds);
            }
            let files = TestEnv::with_endpoints(&self.pubsub_endpoint, "http://127.0.0.1");
            let audio = sample_wav((SMALL_AUDIO - wav_header_len()) / 2);
            let mut png = sample_png();
            png.resize(SMALL_THUMBNAIL, 0);
            let inputs: Vec<Input> = (0..n)
                .map(|i| Input {
                    id: format!("small-{}-{i}", files.id),
                    audio: files.spool_file(&format!("small/{i}.wav"), &audio),
                    thumbnail: Some(files.spool_file(&format!("small/{i}.png"), &png)),
                })
                .collect();
            sync_files()?;

            let gcs = self
                .gcs_ceiling("small GCS ceiling", &files, &inputs, false)
                .await?;
            println!("{}", gcs.line(n, bytes));
            let lookup = self
                .gcs_ceiling("small GCS lookup+upload", &files, &inputs, true)
                .await?;
            println!("{}", lookup.line(n, bytes));
            let pubsub = self
                .pubsub_ceiling("small Pub/Sub ceiling", &files, &inputs, Duration::ZERO)
                .await?;
            println!("{}", pubsub.line(n, bytes));
            // Held as long as a message's uploads took in the upload-only run above.
            let hold = gcs.elapsed.mul_f64(self.params.concurrency as f64 / n as f64);
            let paced = self
                .pubsub_ceiling("small Pub/Sub paced", &files, &inputs, hold)
                .await?;
            println!(
                "{} (each message held {} ms)",
                paced.line(n, bytes),
                hold.as_millis()
            );
            let worker = self
                .worker("small worker", &files, &inputs, bytes, Start::Backlog)
                .await?;
            println!("{}", worker.line(n, bytes));
            if round > 0 {
                scenario.rounds.push(Round {
                    gcs,
                    gcs_lookup: Some(lookup),
                    pubsub: Some(pubsub),
                    pubsub_paced: Some(paced),
                    worker,
                });
            }
        }
        report.scenarios.push(scenario);
        Ok(())
    }

    async fn large(&self, report: &mut Report) -> Result<()> {
        let (n, size) = (self.params.large_messages, self.params.large_size);
        let title = format!("large: {n} × {} MiB", size / MIB);
        let scenario = Scenario::new(Kind::Large, title, n, n as u64 * size);
        report.scenarios.push(self.files_scenario(scenario, size).await?);
        Ok(())
    }

    async fn huge(&self, report: &mut Report) -> Result<()> {
        let size = self.params.huge_size;
        let title = format!("huge: one {} MiB file", size / MIB);
        let scenario = Scenario::new(Kind::Huge, title, 1, size);
        report.scenarios.push(self.files_scenario(scenario, size).await?);
        Ok(())
    }

    /// One file of `size` bytes per message, sent to an idle worker; `rounds`
    /// times, each with its own files, resources and fake-gcs.
    async fn files_scenario(&self, mut scenario: Scenario, size: u64) -> Result<Scenario> {
        let (n, bytes) = (scenario.messages, scenario.bytes);
        let name = scenario.kind.name();
        for round in 1..=self.params.rounds {
            println!("\n# {}, round {round}/{}", scenario.title, self.params.rounds);
            let files = TestEnv::with_endpoints(&self.pubsub_endpoint, "http://127.0.0.1");
            let mut inputs = Vec::new();
            for i in 0..n {
                let path = files.spool_path(&format!("{name}-{i}.wav"));
                let target = path.clone();
                tokio::task::spawn_blocking(move || write_wav(&target, size, i as u64)).await??;
                let id = format!("{name}-{}-{i}", files.id);
                inputs.push(Input {
                    id,
                    audio: path,
                    thumbnail: None,
                });
            }
            sync_files()?;
            let label = format!("{name} GCS ceiling");
            let gcs = self.gcs_ceiling(&label, &files, &inputs, false).await?;
            println!("{}", gcs.line(n, bytes));
            let label = format!("{name} worker");
            let worker = self.worker(&label, &files, &inputs, bytes, Start::Idle).await?;
            println!("{}", worker.line(n, bytes));
            scenario.rounds.push(Round {
                gcs,
                gcs_lookup: None,
                pubsub: None,
                pubsub_paced: None,
                worker,
            });
        }
        Ok(scenario)
    }

    /// Uploads every input's files straight to a fresh fake-gcs with the
    /// product's `Store`, `concurrency` messages at a time, both files of a
    /// message at once (as the worker does).
    ///
    /// With `lookup`, each upload is preceded by the archive lookup the worker
    /// makes before uploads of 8 MiB or more (a metadata GET, 404); that run
    /// is a diagnostic (what a lookup costs), not a ceiling.
    async fn gcs_ceiling(&self, label: &str, files: &TestEnv, inputs: &[Input], lookup: bool) -> Result<Run> {
        let gcs = start_fake_gcs().await?;
        let setup = self.setup(&gcs.endpoint(), files)?;
        setup.env.gcs.create_bucket(&setup.env.bucket).await?;
        let store = Store::connect(&setup.settings.storage).await?;
        // A tight uploader: checksums of files sent in one request are known before the clock starts.
        let mut jobs = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let mut parts = vec![Part::new(&input.audio, format!("{i}/audio.wav"), "audio/wav")?];
            if let Some(thumbnail) = &input.thumbnail {
                parts.push(Part::new(thumbnail, format!("{i}/thumbnail.png"), "image/png")?);
            }
            jobs.push(parts);
        }
        let watch = CpuWatch::new(None, Some(&gcs.endpoint()), &self.pubsub_endpoint);
        let before = watch.sample();
        let started = Instant::now();
        let permits = Arc::new(Semaphore::new(self.params.concurrency));
        let mut tasks = JoinSet::new();
        for parts in jobs {
            let permit = permits.clone().acquire_owned().await?;
            let store = store.clone();
            tasks.spawn(async move {
                let uploads = parts.into_iter().map(|part| part.upload(&store, lookup));
                let result = futures::future::try_join_all(uploads).await;
                drop(permit);
                result.map(drop)
            });
            while let Some(joined) = tasks.try_join_next() {
                joined??;
            }
        }
        while let Some(joined) = tasks.join_next().await {
            joined??;
        }
        let elapsed = started.elapsed();
        Ok(Run::new(label, elapsed, watch.sample().since(&before)))
    }

    /// Pub/Sub alone: the same input messages pulled, an event of the worker's
    /// size published and confirmed for each, then acked; timed from the
    /// relay's start (inputs published before) to the last event pulled.
    ///
    /// With a `hold`, each message is held that long before its event is
    /// published (as if it were being uploaded): a diagnostic of what the
    /// emulator costs at a slower pace, not a ceiling.
    async fn pubsub_ceiling(
        &self,
        label: &str,
        files: &TestEnv,
        inputs: &[Input],
        hold: Duration,
    ) -> Result<Run> {
        let setup = self.setup("http://127.0.0.1", files)?;
        let pubsub = &setup.settings.pubsub;
        setup
            .env
            .create_topics_and_subscriptions(setup.env.default_input_options())
            .await?;
        publish_inputs(&setup, inputs).await?;
        let events = Events::start(&setup, inputs.len()).await?;
        let watch = CpuWatch::new(None, None, &self.pubsub_endpoint);
        let before = watch.sample();
        let started = Instant::now();
        let mut inbox = Inbox::open(pubsub, self.params.concurrency).await?;
        let outbox = Outbox::connect(pubsub, &pubsub.stored_topic, BUSY_BATCHING).await?;
        let closer = inbox.closer();
        let concurrency = self.params.concurrency;
        let relay = tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(concurrency));
            let mut tasks = JoinSet::new();
            while let Some(next) = inbox.next().await {
                let (envelope, delivery) = next?;
                let permit = permits.clone().acquire_owned().await?;
                let outbox = outbox.clone();
                tasks.spawn(async move {
                    tokio::time::sleep(hold).await;
                    let (data, attributes) = event_like(&envelope.data);
                    let published = outbox.publish(data, attributes).await;
                    match published {
                        Ok(_) => delivery.ack().await?,
                        Err(_) => delivery.nack(),
                    }
                    drop(permit);
                    published.map(drop).context("publishing an event")
                });
                while let Some(joined) = tasks.try_join_next() {
                    joined??;
                }
            }
            while let Some(joined) = tasks.join_next().await {
                joined??;
            }
            outbox.flush().await;
            anyhow::Ok(())
        });
        let done = events.wait(None).await;
        let cpu = watch.sample().since(&before);
        closer.close().await;
        relay.await.context("the relay task")??;
        Ok(Run::new(label, done? - started, cpu))
    }

    /// The worker as a process on fresh resources and a fresh fake-gcs.
    async fn worker(
        &self,
        label: &str,
        files: &TestEnv,
        inputs: &[Input],
        bytes: u64,
        start: Start,
    ) -> Result<Run> {
        let gcs = start_fake_gcs().await?;
        let setup = self.setup(&gcs.endpoint(), files)?;
        let env = &setup.env;
        env.create_resources().await?;
        if start == Start::Backlog {
            publish_inputs(&setup, inputs).await?;
        }
        let events = Events::start(&setup, inputs.len()).await?;
        let log =
            testkit::process::log_dir().join(format!("worker-{}-{}.log", label.replace(' ', "-"), env.id));
        let mut worker = WorkerProcess::spawn(&self.binary, &setup.environment, &log)?;
        let pid = worker.child.id().context("the worker has no pid")?;
        let watch = CpuWatch::new(Some(pid), Some(&gcs.endpoint()), &self.pubsub_endpoint);
        let mut run = match start {
            Start::Backlog => {
                let before = watch.sample();
                let started = Instant::now();
                let ready = wait_ready(&mut worker).await?;
                let done = events.wait(Some(&mut worker)).await;
                let cpu = watch.sample().since(&before);
                let done = diagnose(done, env, &worker).await?;
                let mut run = Run::new(label, done - started, cpu);
                run.ready = Some(ready);
                run
            }
            Start::Idle => {
                let ready = wait_ready(&mut worker).await?;
                let idle_before = watch.sample();
                tokio::time::sleep(IDLE_SETTLE).await;
                let idle_cpu = watch.sample().since(&idle_before);
                let idle = proc_status_kib(pid, "VmRSS")?;
                let before = watch.sample();
                let started = Instant::now();
                publish_inputs(&setup, inputs).await?;
                let done = events.wait(Some(&mut worker)).await;
                let cpu = watch.sample().since(&before);
                let done = diagnose(done, env, &worker).await?;
                let mut run = Run::new(label, done - started, cpu);
                run.ready = Some(ready);
                run.idle_rss_kib = Some(idle);
                run.idle_cpu = Some(idle_cpu);
                run
            }
        };
        run.peak_rss_kib = Some(proc_status_kib(pid, "VmHWM")?);
        // The event is published before the ack and the cleanup, which the metrics count after.
        let deadline = Instant::now() + Duration::from_secs(30);
        let metric = async |name: &str| worker.metric(name).await.map(|value| value.unwrap_or(0.0) as u64);
        let stored = loop {
            let stored = metric("audio_store_messages_total{outcome=\"stored\"}").await?;
            if stored >= inputs.len() as u64 || Instant::now() > deadline {
                break stored;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let uploaded = metric("audio_store_uploaded_bytes_total").await?;
        ensure!(
            stored == inputs.len() as u64,
            "{label}: /metrics says {stored} stored, expected {}",
            inputs.len()
        );
        ensure!(
            uploaded == bytes,
            "{label}: /metrics says {uploaded} bytes uploaded, expected {bytes}"
        );
        let objects = env.gcs.list(&env.bucket, "").await?;
        let expected: usize = inputs
            .iter()
            .map(|i| 1 + usize::from(i.thumbnail.is_some()))
            .sum();
        ensure!(
            objects.len() == expected,
            "{label}: {} objects in the bucket, expected {expected}",
            objects.len()
        );
        // SIGTERM and exit 0; the log lines (warnings and errors) are counted.
        worker.signal("-TERM").await?;
        let code = worker.exit_code(Duration::from_secs(30)).await?;
        ensure!(
            code == Some(0),
            "{label}: the worker exited with {code:?}; log {}",
            log.display()
        );
        run.warnings = std::fs::read_to_string(&log)?.lines().count();
        Ok(run)
    }
}

/// Polls `/readyz` every 5 ms; returns the time until it answered 200.
async fn wait_ready(worker: &mut WorkerProcess) -> Result<Duration> {
    let started = Instant::now();
    let log = worker.log_path().display().to_string();
    loop {
        if let Some(status) = worker.child.try_wait()? {
            bail!("the worker exited ({status}) before it was ready; log {log}");
        }
        if matches!(worker.readyz().await, Ok(Some((200, _)))) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the worker was not ready within 30 s; log {log}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Adds what went wrong (dead letters, the worker's log) to a failed wait for events.
async fn diagnose<T>(waited: Result<T>, env: &TestEnv, worker: &WorkerProcess) -> Result<T> {
    let error = match waited {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    let dead_letters = match env.pubsub.pull(&env.dead_letter_subscription, 5).await {
        Ok(messages) => messages.iter().map(|m| format!("{:?}\n", m.attributes)).collect(),
        Err(e) => format!("(cannot pull the dead letters: {e:#})"),
    };
    let log = worker.log_path();
    let tail = testkit::process::log_tail(log);
    Err(error.context(format!(
        "dead letters (first 5):\n{dead_letters}worker log ({}), last lines:\n{tail}",
        log.display()
    )))
}

/// When the worker starts relative to the messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// All messages are published first; timed from the worker's spawn.
    Backlog,
    /// The worker is started and idle first; timed from the first publish.
    Idle,
}

/// Writes dirty pages out now, so that the kernel's writeback of the files
/// just written does not run during the first measurement.
fn sync_files() -> Result<()> {
    ensure!(
        std::process::Command::new("sync").status()?.success(),
        "sync failed"
    );
    Ok(())
}

async fn start_fake_gcs() -> Result<FakeGcs> {
    tokio::task::spawn_blocking(FakeGcs::start_memory)
        .await
        .context("the thread starting fake-gcs")?
}

/// One file to upload for the GCS ceiling.
struct Part {
    path: PathBuf,
    name: String,
    content_type: &'static str,
    size: u64,
    /// Known for files that go up in one request, as the worker knows it.
    crc32c: Option<u32>,
}

impl Part {
    fn new(path: &Path, name: String, content_type: &'static str) -> Result<Part> {
        let size = std::fs::metadata(path)?.len();
        let crc32c = (size < RESUMABLE_THRESHOLD)
            .then(|| std::fs::read(path).map(|bytes| crc32c::crc32c(&bytes)))
            .transpose()?;
        Ok(Part {
            path: path.to_path_buf(),
            name,
            content_type,
            size,
            crc32c,
        })
    }

    /// Uploads the file with the product's `Store::upload_local` (after its
    /// archive lookup, with `lookup`).
    async fn upload(self, store: &Store, lookup: bool) -> Result<()> {
        if lookup {
            let found = store.archived(&self.name).await?;
            ensure!(found.is_none(), "{} exists already", self.name);
        }
        let file = tokio::fs::File::open(&self.path).await?;
        let metadata = BTreeMap::new();
        let object = NewObject {
            name: &self.name,
            content_type: self.content_type,
            metadata: &metadata,
            storage_class: None,
        };
        let written = store
            .upload_local(LocalContent::Open(file), self.size, self.crc32c, &object)
            .await?;
        ensure!(
            matches!(written, Written::Created(_)),
            "{} exists already",
            self.name
        );
        Ok(())
    }
}

/// Publishes every input with the product's `Outbox` and waits for all confirmations.
async fn publish_inputs(setup: &Setup, inputs: &[Input]) -> Result<()> {
    let pubsub = &setup.settings.pubsub;
    let topic = pubsub.topic.as_deref().context("the input topic")?;
    let outbox = Outbox::connect(pubsub, topic, BUSY_BATCHING).await?;
    let pending = inputs.iter().map(|input| outbox.publish(input.json(), []));
    for published in futures::future::join_all(pending).await {
        published.context("publishing an input message")?;
    }
    Ok(())
}

/// An "audio stored" event of the worker's size for an input message.
fn event_like(input: &[u8]) -> (Vec<u8>, Vec<(String, String)>) {
    let message: serde_json::Value = serde_json::from_slice(input).unwrap_or_default();
    let id = message["id"].as_str().unwrap_or("unknown").to_string();
    let object = |kind: &str, ext: &str| {
        serde_json::json!({
            "uri": format!("gs://audio-bucket/audio/{id}/{kind}{ext}"),
            "bucket": "audio-bucket",
            "name": format!("audio/{id}/{kind}{ext}"),
            "size": 65536, "content_type": "audio/wav", "crc32c": "AAAAAA==",
            "md5": "Bn3hdjPQWlF51hYKPDlO/Q==", "generation": "1795493329535433",
        })
    };
    let event = serde_json::json!({
        "audio_id": id,
        "audio": object("audio", ".wav"),
        "thumbnail": object("thumbnail", ".png"),
        "source": {"message_id": "1", "audio": message["audio"], "thumbnail": message["thumbnail"]},
        "metadata": {},
        "stored_at": "2026-11-24T04:08:49.536Z",
    });
    let attributes = vec![
        ("audio_id".to_string(), id),
        ("event_type".to_string(), "audio.stored".to_string()),
    ];
    (event.to_string().into_bytes(), attributes)
}

/// Receives the "audio stored" events of the stored subscription by streaming
/// pull (the product's `Inbox`) and notes when the `count`-th distinct one (by
/// `audio_id`) arrived. Not by polling: every REST pull costs the Java
/// emulator 5–17 ms of CPU, and polling every 20 ms took half a core from the
/// measured processes.
struct Events {
    task: tokio::task::JoinHandle<Result<Instant>>,
}

impl Events {
    /// Opens the stream and gives it a moment to connect.
    async fn start(setup: &Setup, count: usize) -> Result<Events> {
        const STALL: Duration = Duration::from_secs(60);
        let subscription = setup.env.pubsub.subscription_path(&setup.env.stored_subscription);
        let mut inbox = Inbox::open_subscription(&setup.settings.pubsub, &subscription, 1000).await?;
        let task = tokio::spawn(async move {
            let mut seen = HashSet::new();
            while seen.len() < count {
                let next = tokio::time::timeout(STALL, inbox.next())
                    .await
                    .map_err(|_| anyhow!("{} of {count} events, then none for {STALL:?}", seen.len()))?;
                let Some(next) = next else {
                    bail!("the event stream ended after {} of {count} events", seen.len());
                };
                let (envelope, delivery) = next.context("pulling events")?;
                delivery.ack().await?;
                let id = envelope.attributes.get("audio_id");
                seen.insert(
                    id.with_context(|| format!("an event without audio_id: {envelope:?}"))?
                        .clone(),
                );
            }
            let done = Instant::now();
            inbox.closer().close().await;
            Ok(done)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Events { task })
    }

    /// The time the last event arrived; fails early when the worker (if given) exits.
    async fn wait(mut self, mut worker: Option<&mut WorkerProcess>) -> Result<Instant> {
        loop {
            tokio::select! {
                joined = &mut self.task => return joined.context("the events task")?,
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    if let Some(worker) = worker.as_deref_mut()
                        && let Some(status) = worker.child.try_wait()?
                    {
                        self.task.abort();
                        bail!("the worker exited ({status})");
                    }
                }
            }
        }
    }
}

/// A field of /proc/PID/status, in KiB (VmRSS, VmHWM).
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------

/// CPU seconds of the processes involved, and of the whole machine.
struct CpuWatch {
    worker: Option<u32>,
    gcs: Vec<u32>,
    pubsub: Vec<u32>,
}

#[derive(Default, Clone, Copy)]
struct Cpu {
    worker: f64,
    gcs: f64,
    pubsub: f64,
    bench: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl CpuWatch {
    /// `gcs_endpoint` `http://127.0.0.X` names the fake-gcs; `pubsub_endpoint` the emulator.
    fn new(worker: Option<u32>, gcs_endpoint: Option<&str>, pubsub_endpoint: &str) -> CpuWatch {
        let host = gcs_endpoint.map(|e| e.trim_start_matches("http://").to_string());
        let port = format!(
            "--port={}",
            pubsub_endpoint.rsplit(':').next().unwrap_or_default()
        );
        let mut gcs = Vec::new();
        let mut pubsub = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if let Some(host) = &host
                && args.iter().any(|a| a.contains("fake-gcs-server"))
                && args.windows(2).any(|w| w[0] == "-host" && w[1] == *host)
            {
                gcs.push(pid);
            }
            if args.iter().any(|a| a == &port) {
                pubsub.push(pid);
            }
        }
        CpuWatch { worker, gcs, pubsub }
    }

    fn sample(&self) -> Cpu {
        let seconds = |pids: &[u32]| pids.iter().map(|pid| process_cpu(*pid)).sum::<f64>();
        let (machine_busy, machine_total) = machine_cpu();
        Cpu {
            worker: self.worker.map(process_cpu).unwrap_or_default(),
            gcs: seconds(&self.gcs),
            pubsub: seconds(&self.pubsub),
            bench: process_cpu(std::process::id()),
            machine_busy,
            machine_total,
        }
    }
}

impl Cpu {
    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            worker: self.worker - before.worker,
            gcs: self.gcs - before.gcs,
            pubsub: self.pubsub - before.pubsub,
            bench: self.bench - before.bench,
            machine_busy: self.machine_busy - before.machine_busy,
            machine_total: self.machine_total - before.machine_total,
        }
    }

    fn add(&mut self, other: &Cpu) {
        self.worker += other.worker;
        self.gcs += other.gcs;
        self.pubsub += other.pubsub;
        self.bench += other.bench;
        self.machine_busy += other.machine_busy;
        self.machine_total += other.machine_total;
    }

    fn other(&self) -> f64 {
        (self.machine_busy - self.worker - self.gcs - self.pubsub - self.bench).max(0.0)
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// User + system CPU seconds of a process (all its threads); 0 when it is gone.
fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Busy and total CPU seconds of the whole machine (all cores), from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clock_ticks(), total / clock_ticks())
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Run {
    label: String,
    elapsed: Duration,
    cpu: Cpu,
    ready: Option<Duration>,
    idle_rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    /// CPU while the worker sat idle for [`IDLE_SETTLE`] before the messages.
    idle_cpu: Option<Cpu>,
    warnings: usize,
}

impl Run {
    fn new(label: &str, elapsed: Duration, cpu: Cpu) -> Run {
        Run {
            label: label.to_string(),
            elapsed,
            cpu,
            ready: None,
            idle_rss_kib: None,
            peak_rss_kib: None,
            idle_cpu: None,
            warnings: 0,
        }
    }

    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    fn line(&self, messages: usize, bytes: u64) -> String {
        let mut line = format!(
            "{:<24} {:>8.2} s  {:>8.1} msg/s  {:>8.1} MiB/s",
            self.label,
            self.secs(),
            messages as f64 / self.secs(),
            bytes as f64 / MIB as f64 / self.secs()
        );
        if let Some(ready) = self.ready {
            let _ = write!(line, "  ready after {:.0} ms", ready.as_secs_f64() * 1000.0);
        }
        if let Some(idle) = self.idle_rss_kib {
            let _ = write!(line, "  idle RSS {:.1} MiB", idle as f64 / KIB as f64);
        }
        if let Some(peak) = self.peak_rss_kib {
            let _ = write!(line, "  peak RSS {:.1} MiB", peak as f64 / KIB as f64);
        }
        if self.warnings > 0 {
            let _ = write!(line, "  {} log line(s) at warn or above", self.warnings);
        }
        line
    }
}

/// The median (the mean of the middle two of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Small,
    Large,
    Huge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Small => "small",
            Kind::Large => "large",
            Kind::Huge => "huge",
        }
    }
}

/// One round: the ceilings and the worker on the same files, back to back.
struct Round {
    gcs: Run,
    /// Diagnostic (small): the uploads each preceded by a lookup.
    gcs_lookup: Option<Run>,
    pubsub: Option<Run>,
    /// Diagnostic (small): the Pub/Sub relay with each message held as long as its uploads took.
    pubsub_paced: Option<Run>,
    worker: Run,
}

impl Round {
    /// Seconds of this round's ceiling: the slower of the GCS and the Pub/Sub ceiling.
    fn ceiling_secs(&self) -> f64 {
        let pubsub = self.pubsub.as_ref().map(Run::secs).unwrap_or(0.0);
        self.gcs.secs().max(pubsub)
    }

    /// Worker throughput / ceiling throughput (the same work, so the inverse ratio of times).
    fn ratio(&self) -> f64 {
        self.ceiling_secs() / self.worker.secs()
    }

    fn runs(&self) -> impl Iterator<Item = &Run> {
        [
            Some(&self.gcs),
            self.gcs_lookup.as_ref(),
            self.pubsub.as_ref(),
            self.pubsub_paced.as_ref(),
            Some(&self.worker),
        ]
        .into_iter()
        .flatten()
    }
}

struct Scenario {
    kind: Kind,
    title: String,
    messages: usize,
    bytes: u64,
    rounds: Vec<Round>,
}

impl Scenario {
    fn new(kind: Kind, title: String, messages: usize, bytes: u64) -> Scenario {
        Scenario {
            kind,
            title,
            messages,
            bytes,
            rounds: Vec::new(),
        }
    }

    /// The scenario's unit: messages/s for small messages, MiB/s for files.
    fn rate(&self, secs: f64) -> f64 {
        match self.kind {
            Kind::Small => self.messages as f64 / secs,
            Kind::Large | Kind::Huge => self.bytes as f64 / MIB as f64 / secs,
        }
    }

    fn unit(&self) -> &'static str {
        match self.kind {
            Kind::Small => "msg/s",
            Kind::Large | Kind::Huge => "MiB/s",
        }
    }

    fn target(&self) -> f64 {
        match self.kind {
            Kind::Small => TARGET_SMALL,
            Kind::Large | Kind::Huge => TARGET_LARGE,
        }
    }

    /// The median over rounds of a run's rate.
    fn median_rate(&self, run: impl Fn(&Round) -> Option<&Run>) -> f64 {
        median(
            self.rounds
                .iter()
                .filter_map(|round| run(round).map(|r| self.rate(r.secs())))
                .collect(),
        )
    }

    fn ratio(&self) -> f64 {
        median(self.rounds.iter().map(Round::ratio).collect())
    }

    /// The worst round's value of a worker memory reading.
    fn worst(&self, reading: impl Fn(&Run) -> Option<u64>) -> Option<f64> {
        self.rounds
            .iter()
            .filter_map(|round| reading(&round.worker))
            .max()
            .map(|kib| kib as f64 / KIB as f64)
    }
}

#[derive(Default)]
struct Report {
    scenarios: Vec<Scenario>,
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

impl Report {
    fn results_table(&self, params: &Params) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Concurrency {} (worker.concurrency, and the ceilings' messages in flight). Rates are \
             medians over {} rounds; worker / ceiling is the median of the rounds' ratios (each \
             round runs its ceilings and the worker back to back on the same files).\n",
            params.concurrency, params.rounds
        );
        let _ = writeln!(
            out,
            "| measurement | worker | ceiling | worker / ceiling | target | |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
        for scenario in &self.scenarios {
            let worker = scenario.median_rate(|r| Some(&r.worker));
            let gcs = scenario.median_rate(|r| Some(&r.gcs));
            let ratio = scenario.ratio();
            let target = scenario.target();
            let (what, ceiling) = match scenario.kind {
                Kind::Small => {
                    let pubsub = scenario.median_rate(|r| r.pubsub.as_ref());
                    (
                        "messages/s, worker timed from its spawn (backlog published before) to the last event",
                        format!("GCS {gcs:.1} ({:.1} objects/s); Pub/Sub {pubsub:.1}", gcs * 2.0),
                    )
                }
                Kind::Large | Kind::Huge => (
                    "MiB/s, worker timed from the first publish (worker idle) to the last event",
                    format!("{gcs:.1}"),
                ),
            };
            let target_text = match scenario.kind {
                Kind::Small => format!("≥ {target:.2} of the lower ceiling"),
                Kind::Large => format!("≥ {target:.2}"),
                Kind::Huge => format!("(≥ {target:.2}, as large)"),
            };
            let _ = writeln!(
                out,
                "| {}, {what} | {worker:.1} | {ceiling} | {ratio:.2} | {target_text} | {} |",
                scenario.title,
                verdict(ratio >= target)
            );
        }
        let huge = self.scenarios.iter().find(|s| s.kind == Kind::Huge);
        if let Some(huge) = huge
            && let Some(peak) = huge.worst(|run| run.peak_rss_kib)
        {
            let _ = writeln!(
                out,
                "| worker peak RSS (VmHWM) with the {} MiB file, worst round | {peak:.1} MiB | | | < {TARGET_PEAK_RSS_MIB:.0} MiB | {} |",
                huge.bytes / MIB,
                verdict(peak < TARGET_PEAK_RSS_MIB)
            );
        }
        let idle = self
            .scenarios
            .iter()
            .filter_map(|s| s.worst(|run| run.idle_rss_kib))
            .reduce(f64::max);
        if let Some(idle) = idle {
            let _ = writeln!(
                out,
                "| worker idle RSS (VmRSS {} s after ready), worst round | {idle:.1} MiB | | | < {TARGET_IDLE_RSS_MIB:.0} MiB | {} |",
                IDLE_SETTLE.as_secs(),
                verdict(idle < TARGET_IDLE_RSS_MIB)
            );
        }
        let peaks: Vec<String> = self
            .scenarios
            .iter()
            .filter(|s| s.kind != Kind::Huge)
            .filter_map(|s| {
                s.worst(|run| run.peak_rss_kib)
                    .map(|peak| format!("{} {peak:.1} MiB", s.kind.name()))
            })
            .collect();
        if !peaks.is_empty() {
            let _ = writeln!(
                out,
                "\nWorker peak RSS in the other scenarios (worst round): {}.",
                peaks.join(", ")
            );
        }
        if let Some(small) = self.scenarios.iter().find(|s| s.kind == Kind::Small) {
            let lookup = small.median_rate(|r| r.gcs_lookup.as_ref());
            let gcs = small.median_rate(|r| Some(&r.gcs));
            let paced = small.median_rate(|r| r.pubsub_paced.as_ref());
            let cpu = |run: fn(&Round) -> Option<&Run>| {
                median(
                    small
                        .rounds
                        .iter()
                        .filter_map(|r| run(r).map(|r| r.cpu.pubsub))
                        .collect(),
                )
            };
            let _ = writeln!(
                out,
                "\nDiagnostics, small (medians): the GCS uploads each preceded by a lookup (metadata \
                 GET, 404; the worker makes one before uploads of 8 MiB or more): {lookup:.1} msg/s, \
                 {:.2} of the upload-only ceiling. The Pub/Sub relay with each message held as long \
                 as its uploads took: {paced:.1} msg/s, the emulator using {:.2} CPU-s (unpaced: {:.2}).",
                lookup / gcs,
                cpu(|r| r.pubsub_paced.as_ref()),
                cpu(|r| r.pubsub.as_ref()),
            );
        }
        out
    }

    /// Every round: the worker, the ceilings, the ratio and the CPU that others used.
    fn rounds_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Every round (\"others\": CPU-s used by processes outside the benchmark during the \
             worker's run, e.g. concurrent builds):\n"
        );
        let _ = writeln!(
            out,
            "| scenario | round | worker | GCS ceiling | Pub/Sub ceiling | worker / ceiling | others |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for scenario in &self.scenarios {
            let unit = scenario.unit();
            for (i, round) in scenario.rounds.iter().enumerate() {
                let pubsub = round
                    .pubsub
                    .as_ref()
                    .map(|r| format!("{:.1} {unit}", scenario.rate(r.secs())))
                    .unwrap_or_else(|| "–".into());
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} {unit} | {:.1} {unit} | {pubsub} | {:.2} | {:.2} |",
                    scenario.kind.name(),
                    i + 1,
                    scenario.rate(round.worker.secs()),
                    scenario.rate(round.gcs.secs()),
                    round.ratio(),
                    round.worker.cpu.other()
                );
            }
        }
        out
    }

    /// CPU per process, summed over the rounds of each measurement.
    fn cpu_table(&self) -> String {
        let mut totals: Vec<(String, f64, Cpu)> = Vec::new();
        let mut add =
            |label: String, secs: f64, cpu: &Cpu| match totals.iter_mut().find(|(l, _, _)| *l == label) {
                Some((_, total_secs, total)) => {
                    *total_secs += secs;
                    total.add(cpu);
                }
                None => totals.push((label, secs, *cpu)),
            };
        for scenario in &self.scenarios {
            for round in &scenario.rounds {
                for run in round.runs() {
                    if let Some(idle) = &run.idle_cpu {
                        let label = format!(
                            "{} (idle {} s, before the messages)",
                            run.label,
                            IDLE_SETTLE.as_secs()
                        );
                        add(label, IDLE_SETTLE.as_secs_f64(), idle);
                    }
                    add(run.label.clone(), run.secs(), &run.cpu);
                }
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "CPU seconds per process, summed over the rounds (2 cores = 2 CPU-s per wall second; \
             \"others\" is the rest of the machine):\n"
        );
        let _ = writeln!(
            out,
            "| measurement | wall s | worker | fake-gcs | Pub/Sub emulator | bench process | others | machine busy |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for (label, secs, cpu) in totals {
            let busy = if cpu.machine_total > 0.0 {
                cpu.machine_busy / cpu.machine_total * 100.0
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "| {label} | {secs:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {busy:.0} % |",
                cpu.worker,
                cpu.gcs,
                cpu.pubsub,
                cpu.bench,
                cpu.other()
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------

struct Machine {
    cpus: usize,
    model: String,
    memory: String,
    kernel: String,
    date: String,
}

impl Machine {
    fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            model,
            memory,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            date: jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC").to_string(),
        }
    }

    fn markdown(&self) -> String {
        format!(
            "# audio-store throughput benchmark\n\n\
             - date: {}\n- machine: {} CPUs ({}), {} RAM, Linux {}\n- load average at the start: {}\n\
             - the Pub/Sub emulator, fake-gcs-server, the worker and this bench all run on this machine",
            self.date,
            self.cpus,
            self.model,
            self.memory,
            self.kernel,
            loadavg()
        )
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
