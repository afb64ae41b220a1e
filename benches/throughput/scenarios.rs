//! The scenarios: each round runs the ceilings and then the worker on the same files.
//!
//! The ceilings use the same files, concurrency and settings without the
//! worker, through the product's own clients, built from the same
//! configuration as the worker's (so they cannot drift from it): a tight
//! uploader straight to a fresh fake-gcs (`audio_store::store::Store`, no
//! Pub/Sub), and a Pub/Sub relay with no upload (`audio_store::pubsub`'s
//! `Inbox` and `Outbox`: pull the same input messages, publish an event of
//! the same size and wait for its confirmation, ack). Events are received the
//! same way for the relay and the worker (`traffic::Events`).

use crate::report::{CpuWatch, IDLE_SETTLE, Kind, Round, Run, Scenario, Spans, proc_status_kib};
use crate::traffic::{Events, Input, Part, event_like, publish_inputs};
use crate::{MIB, Params};
use anyhow::{Context as _, Result, ensure};
use audio_store::config::Settings;
use audio_store::pubsub::{BUSY_BATCHING, Inbox, Outbox};
use audio_store::store::Store;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::media::{sample_png, sample_wav, wav_header_len, write_wav};
use testkit::{FakeGcs, OtlpReceiver, PubsubEmulator, TestEnv, WorkerProcess};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Sizes of the small scenario's files.
const SMALL_AUDIO: usize = 64 * 1024;
const SMALL_THUMBNAIL: usize = 8 * 1024;

pub struct Bench {
    pub params: Params,
    pub binary: PathBuf,
    pub pubsub: PubsubEmulator,
}

/// Fresh resources on `gcs_endpoint` and the product's configuration for them,
/// reading sources from `files`' spool: what the worker gets, as variables, and
/// what the ceilings build their clients from.
pub struct Setup {
    pub env: TestEnv,
    pub environment: BTreeMap<String, String>,
    pub settings: Settings,
}

/// When the worker starts relative to the messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// All messages are published first; timed from the worker's spawn.
    Backlog,
    /// The worker is started and idle first; timed from the first publish.
    Idle,
}

impl Bench {
    fn setup(&self, gcs_endpoint: &str, files: &TestEnv) -> Result<Setup> {
        let env = TestEnv::with_endpoints(&self.pubsub.endpoint(), gcs_endpoint);
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

    fn watch(&self, worker: Option<u32>, gcs: Option<&FakeGcs>) -> CpuWatch {
        CpuWatch {
            worker,
            gcs: gcs.and_then(FakeGcs::process_group),
            pubsub: self.pubsub.process_group(),
        }
    }

    /// Every round of a scenario: fresh files, the ceilings, then the worker.
    pub async fn scenario(&self, kind: Kind) -> Result<Scenario> {
        let params = &self.params;
        let (messages, size) = match kind {
            Kind::Small => (params.small_messages, (SMALL_AUDIO + SMALL_THUMBNAIL) as u64),
            Kind::Large => (params.large_messages, params.large_size),
            Kind::Huge => (1, params.huge_size),
        };
        let title = match kind {
            Kind::Small => format!("small: {messages} × (64 KiB WAV + 8 KiB PNG)"),
            Kind::Large => format!("large: {messages} × {} MiB", size / MIB),
            Kind::Huge => format!("huge: one {} MiB file", size / MIB),
        };
        let bytes = messages as u64 * size;
        let mut scenario = Scenario {
            kind,
            title,
            messages,
            bytes,
            rounds: Vec::new(),
        };
        // Round 0 warms up the Java emulator's JIT on the paths these runs use, and is not
        // counted: a fresh emulator spends a core compiling during its first busy seconds.
        let first = usize::from(kind != Kind::Small || !params.warmup);
        for round in first..=params.rounds {
            match round {
                0 => println!("\n# {}, warm-up round (not counted)", scenario.title),
                _ => println!("\n# {}, round {round}/{}", scenario.title, params.rounds),
            }
            let files = TestEnv::with_endpoints(&self.pubsub.endpoint(), "http://127.0.0.1");
            let inputs = write_inputs(kind, &files, messages, size).await?;
            // Dirty pages written out now, not during the first measurement.
            ensure!(
                std::process::Command::new("sync").status()?.success(),
                "sync failed"
            );
            let name = kind.name();
            let gcs = self
                .gcs_ceiling(&format!("{name} GCS ceiling"), &files, &inputs)
                .await?;
            println!("{}", gcs.line(&scenario));
            let mut pubsub = None;
            if kind == Kind::Small {
                let run = self
                    .pubsub_ceiling(&format!("{name} Pub/Sub ceiling"), &files, &inputs)
                    .await?;
                println!("{}", run.line(&scenario));
                pubsub = Some(run);
            }
            let start = if kind == Kind::Small {
                Start::Backlog
            } else {
                Start::Idle
            };
            let worker = self
                .worker(&format!("{name} worker"), &files, &inputs, bytes, start)
                .await?;
            println!("{}", worker.line(&scenario));
            if round > 0 {
                scenario.rounds.push(Round { gcs, pubsub, worker });
            }
        }
        Ok(scenario)
    }

    /// Uploads every input's files straight to a fresh fake-gcs with the
    /// product's `Store`, `concurrency` messages at a time, both files of a
    /// message at once (as the worker does).
    async fn gcs_ceiling(&self, label: &str, files: &TestEnv, inputs: &[Input]) -> Result<Run> {
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
        let watch = self.watch(None, Some(&gcs));
        let before = watch.sample();
        let started = Instant::now();
        let permits = Arc::new(Semaphore::new(self.params.concurrency));
        let mut tasks = JoinSet::new();
        for parts in jobs {
            let permit = permits.clone().acquire_owned().await?;
            let store = store.clone();
            tasks.spawn(async move {
                let result =
                    futures::future::try_join_all(parts.into_iter().map(|part| part.upload(&store))).await;
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
        Ok(run(label, elapsed, watch.sample().since(before)))
    }

    /// Pub/Sub alone: the same input messages pulled, an event of the worker's
    /// size published and confirmed for each, then acked; timed from the
    /// relay's start (inputs published before) to the last event pulled.
    async fn pubsub_ceiling(&self, label: &str, files: &TestEnv, inputs: &[Input]) -> Result<Run> {
        let setup = self.setup("http://127.0.0.1", files)?;
        let pubsub = &setup.settings.pubsub;
        let input_options = setup.env.default_input_options();
        setup.env.create_topics_and_subscriptions(input_options).await?;
        publish_inputs(&setup, inputs).await?;
        let events = Events::start(&setup, inputs.len()).await?;
        let watch = self.watch(None, None);
        let before = watch.sample();
        let started = Instant::now();
        let mut inbox = Inbox::open(pubsub, self.params.concurrency).await?;
        let outbox = Outbox::connect(pubsub, &pubsub.stored_topic, BUSY_BATCHING).await?;
        let closer = inbox.closer();
        let permits = Arc::new(Semaphore::new(self.params.concurrency));
        let relay = tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            while let Some(next) = inbox.next().await {
                let (envelope, delivery) = next?;
                let permit = permits.clone().acquire_owned().await?;
                let outbox = outbox.clone();
                tasks.spawn(async move {
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
        let cpu = watch.sample().since(before);
        closer.close().await;
        relay.await.context("the relay task")??;
        Ok(run(label, done? - started, cpu))
    }

    /// The worker as a process on fresh resources and a fresh fake-gcs; checks
    /// its `/metrics` and the bucket afterwards, and that SIGTERM stops it with 0.
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
        let receiver = match self.params.otlp {
            true => Some(OtlpReceiver::start().await?),
            false => None,
        };
        let mut environment = setup.environment.clone();
        if let Some(receiver) = &receiver {
            environment.insert(
                "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT".into(),
                receiver.endpoint(),
            );
        }
        let mut worker = WorkerProcess::spawn(&self.binary, &environment, &log)?;
        let pid = worker.child.id().context("the worker has no pid")?;
        let watch = self.watch(Some(pid), Some(&gcs));
        // Idle: the worker is ready and has sat idle before the clock starts.
        let mut idle = None;
        if start == Start::Idle {
            let ready = worker.wait_ready(Duration::from_secs(30)).await?;
            let before = watch.sample();
            tokio::time::sleep(IDLE_SETTLE).await;
            idle = Some((
                ready,
                (proc_status_kib(pid, "VmRSS")?, watch.sample().since(before)),
            ));
        }
        let before = watch.sample();
        let started = Instant::now();
        let ready = match idle {
            None => worker.wait_ready(Duration::from_secs(30)).await?,
            Some((ready, _)) => {
                publish_inputs(&setup, inputs).await?;
                ready
            }
        };
        let done = events.wait(Some(&mut worker)).await;
        let at_done = watch.sample();
        let done = diagnose(done, env, &worker).await?;
        let mut run = run(label, done - started, at_done.since(before));
        run.ready = Some(ready);
        run.idle = idle.map(|(_, idle)| idle);
        run.peak_rss_kib = Some(proc_status_kib(pid, "VmHWM")?);
        // The event is published before the ack and the cleanup, which the metrics count after.
        let metric = async |name: &str| worker.metric(name).await.map(|value| value.unwrap_or(0.0) as u64);
        let stored = testkit::wait_for(
            "every message counted as stored",
            Duration::from_secs(30),
            || async {
                let stored = metric("audio_store_messages_total{outcome=\"stored\"}").await?;
                Ok((stored == inputs.len() as u64).then_some(()))
            },
        );
        stored.await.with_context(|| format!("{label}: /metrics"))?;
        let uploaded = metric("audio_store_uploaded_bytes_total").await?;
        ensure!(
            uploaded == bytes,
            "{label}: /metrics says {uploaded} bytes uploaded, expected {bytes}"
        );
        let objects = env.gcs.list(&env.bucket, "").await?.len();
        let expected: usize = inputs
            .iter()
            .map(|i| 1 + usize::from(i.thumbnail.is_some()))
            .sum();
        ensure!(
            objects == expected,
            "{label}: {objects} objects in the bucket, expected {expected}"
        );
        if let Some(receiver) = &receiver {
            let received = settle(receiver).await;
            let dropped = worker
                .metric("audio_store_spans_dropped_total")
                .await?
                .unwrap_or(0.0) as u64;
            let tail_cpu = watch.sample().since(at_done).worker;
            run.spans = Some(Spans {
                received,
                dropped,
                tail_cpu,
            });
        }
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

fn run(label: &str, elapsed: Duration, cpu: crate::report::Cpu) -> Run {
    Run {
        label: label.to_string(),
        elapsed,
        cpu,
        ..Run::default()
    }
}

/// The scenario's files in `files`' spool, one message each.
async fn write_inputs(kind: Kind, files: &TestEnv, messages: usize, size: u64) -> Result<Vec<Input>> {
    let name = kind.name();
    let mut inputs = Vec::new();
    if kind == Kind::Small {
        let audio = sample_wav((SMALL_AUDIO - wav_header_len()) / 2);
        let mut png = sample_png();
        png.resize(SMALL_THUMBNAIL, 0);
        for i in 0..messages {
            inputs.push(Input {
                id: format!("{name}-{}-{i}", files.id),
                audio: files.spool_file(&format!("{name}/{i}.wav"), &audio),
                thumbnail: Some(files.spool_file(&format!("{name}/{i}.png"), &png)),
            });
        }
        return Ok(inputs);
    }
    for i in 0..messages {
        let path = files.spool_path(&format!("{name}-{i}.wav"));
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_wav(&target, size, i as u64)).await??;
        inputs.push(Input {
            id: format!("{name}-{}-{i}", files.id),
            audio: path,
            thumbnail: None,
        });
    }
    Ok(inputs)
}

/// Waits until the receiver has had no new span for 2 s (the worker's batch
/// delay is 1 s), at most 30 s; the spans it received.
async fn settle(receiver: &OtlpReceiver) -> usize {
    let started = Instant::now();
    let (mut received, mut changed) = (receiver.spans().len(), Instant::now());
    while changed.elapsed() < Duration::from_secs(2) && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = receiver.spans().len();
        if now != received {
            (received, changed) = (now, Instant::now());
        }
    }
    received
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

async fn start_fake_gcs() -> Result<FakeGcs> {
    tokio::task::spawn_blocking(FakeGcs::start_memory)
        .await
        .context("the thread starting fake-gcs")?
}
