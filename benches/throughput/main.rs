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

mod params;
mod report;
mod system;
mod traffic;

use anyhow::{Context as _, Result, bail, ensure};
use audio_store::config::Settings;
use audio_store::pubsub::{BUSY_BATCHING, Inbox, Outbox};
use audio_store::store::Store;
use params::{Params, worker_binary};
use report::{Kind, Report, Round, Run, Scenario};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use system::{CpuWatch, Machine, loadavg, proc_status_kib, sync_files};
use testkit::media::{sample_png, sample_wav, wav_header_len, write_wav};
use testkit::{FakeGcs, PubsubEmulator, TestEnv, WorkerProcess};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use traffic::{Events, Part, event_like, publish_inputs};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// Sizes of the small scenario's files.
const SMALL_AUDIO: usize = 64 * 1024;
const SMALL_THUMBNAIL: usize = 8 * 1024;
/// How long the worker sits idle before its idle RSS is read.
pub const IDLE_SETTLE: Duration = Duration::from_secs(2);

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
                worker,
                ..Round::default()
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
        // Idle: the worker is ready and has sat idle before the clock starts.
        let mut idle = None;
        if start == Start::Idle {
            let ready = wait_ready(&mut worker).await?;
            let before = watch.sample();
            tokio::time::sleep(IDLE_SETTLE).await;
            idle = Some((
                ready,
                watch.sample().since(&before),
                proc_status_kib(pid, "VmRSS")?,
            ));
        }
        let before = watch.sample();
        let started = Instant::now();
        let ready = match idle {
            None => wait_ready(&mut worker).await?,
            Some((ready, ..)) => {
                publish_inputs(&setup, inputs).await?;
                ready
            }
        };
        let done = events.wait(Some(&mut worker)).await;
        let cpu = watch.sample().since(&before);
        let done = diagnose(done, env, &worker).await?;
        let mut run = Run::new(label, done - started, cpu);
        run.ready = Some(ready);
        run.idle_cpu = idle.map(|(_, cpu, _)| cpu);
        run.idle_rss_kib = idle.map(|(.., rss)| rss);
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

async fn start_fake_gcs() -> Result<FakeGcs> {
    tokio::task::spawn_blocking(FakeGcs::start_memory)
        .await
        .context("the thread starting fake-gcs")?
}
