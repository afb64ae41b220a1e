//! The three scenarios, each a round of ceilings and then the worker on the same files.

use crate::params::Params;
use crate::report::{Kind, Report, Round, Run, Scenario};
use crate::spans;
use crate::system::{CpuWatch, proc_status_kib, sync_files};
use crate::traffic::{Events, Part, event_like, publish_inputs};
use crate::{IDLE_SETTLE, MIB, SMALL_AUDIO, SMALL_THUMBNAIL};
use anyhow::{Context as _, Result, bail, ensure};
use audio_store::config::Settings;
use audio_store::pubsub::{BUSY_BATCHING, Inbox, Outbox};
use audio_store::store::Store;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::media::{sample_png, sample_wav, wav_header_len, write_wav};
use testkit::{FakeGcs, OtlpReceiver, TestEnv, WorkerProcess};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub struct Bench {
    pub params: Params,
    pub binary: PathBuf,
    pub pubsub_endpoint: String,
}

/// One input message: its files and the JSON the worker gets.
pub struct Input {
    pub id: String,
    pub audio: PathBuf,
    pub thumbnail: Option<PathBuf>,
}

impl Input {
    pub fn json(&self) -> Vec<u8> {
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
pub struct Setup {
    pub env: TestEnv,
    pub environment: BTreeMap<String, String>,
    pub settings: Settings,
}

impl Bench {
    pub fn setup(&self, gcs_endpoint: &str, files: &TestEnv) -> Result<Setup> {
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

    pub async fn small(&self, report: &mut Report) -> Result<()> {
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

    pub async fn large(&self, report: &mut Report) -> Result<()> {
        let (n, size) = (self.params.large_messages, self.params.large_size);
        let title = format!("large: {n} × {} MiB", size / MIB);
        let scenario = Scenario::new(Kind::Large, title, n, n as u64 * size);
        report.scenarios.push(self.files_scenario(scenario, size).await?);
        Ok(())
    }

    pub async fn huge(&self, report: &mut Report) -> Result<()> {
        let size = self.params.huge_size;
        let title = format!("huge: one {} MiB file", size / MIB);
        let scenario = Scenario::new(Kind::Huge, title, 1, size);
        report.scenarios.push(self.files_scenario(scenario, size).await?);
        Ok(())
    }

    /// One file of `size` bytes per message, sent to an idle worker; `rounds`
    /// times, each with its own files, resources and fake-gcs.
    pub async fn files_scenario(&self, mut scenario: Scenario, size: u64) -> Result<Scenario> {
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
    pub async fn gcs_ceiling(
        &self,
        label: &str,
        files: &TestEnv,
        inputs: &[Input],
        lookup: bool,
    ) -> Result<Run> {
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
    pub async fn pubsub_ceiling(
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
    pub async fn worker(
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
            environment.insert(spans::ENDPOINT_VARIABLE.into(), receiver.endpoint());
        }
        let mut worker = WorkerProcess::spawn(&self.binary, &environment, &log)?;
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
        let at_done = watch.sample();
        let cpu = at_done.since(&before);
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
        if let Some(receiver) = &receiver {
            run.spans = Some(spans::settle(receiver, &worker, &watch, &at_done).await?);
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
pub enum Start {
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
