//! The scenarios: each round runs the ceilings and then the worker on the same files.
//!
//! The ceilings do the worker's work without it, on the same files with the same
//! concurrency, through the product's own clients (`Store`; `Inbox` and `Outbox`) built
//! from the worker's configuration, so that they cannot drift from it.

use crate::Params;
use crate::report::{Clock, IDLE_SETTLE, Readings, Round, Run, Scenario, proc_status_kib};
use crate::traffic::{Input, events, publish_inputs, relay, write_inputs};
use anyhow::{Context as _, Result, anyhow, ensure};
use audio_store::config::Settings;
use audio_store::pubsub::{BUSY_BATCHING, Inbox, Outbox};
use audio_store::store::Store;
use futures::TryStreamExt as _;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use testkit::{FakeGcs, OtlpReceiver, PubsubEmulator, TestEnv, WorkerProcess};

/// Where the worker sends its spans with `BENCH_OTLP=1`.
const OTLP_ENDPOINT: &str = "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT";

/// The run's parameters and its Pub/Sub emulator (one for the whole run).
pub struct Bench {
    pub params: Params,
    pub pubsub: PubsubEmulator,
}

/// Fresh resources on a fake-gcs and the product's configuration for them: what
/// the worker gets, as variables, and what the ceilings build their clients from.
pub struct Setup {
    pub env: TestEnv,
    pub environment: BTreeMap<String, String>,
    pub settings: Settings,
}

impl Bench {
    /// A [`Setup`] on `gcs_endpoint` that reads its sources from `files`' spool.
    fn setup(&self, gcs_endpoint: &str, files: &TestEnv) -> Result<Setup> {
        let env = TestEnv::with_endpoints(&self.pubsub.endpoint(), gcs_endpoint);
        let spool = files.spool.path().display().to_string();
        let concurrency = self.params.concurrency.to_string();
        let overrides = [
            ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", spool.as_str()),
            ("AUDIO_STORE__WORKER__CONCURRENCY", &concurrency),
            ("AUDIO_STORE__LOG__LEVEL", "warn"),
        ];
        let environment = testkit::environment(&env, &overrides);
        let settings = Settings::load(None, &environment).context("the benchmark's settings")?;
        Ok(Setup {
            env,
            environment,
            settings,
        })
    }

    /// Every round of a scenario: fresh files, the ceilings, then the worker.
    ///
    /// - small: N messages of a 64 KiB WAV and an 8 KiB PNG, published before
    ///   the worker starts; messages/s from its spawn to the last event.
    /// - large: N WAVs of 64 MiB, published to a worker that is ready and idle;
    ///   MiB/s from the first publish to the last event.
    /// - huge: one 1 GiB WAV, as large; with the worker's peak and idle RSS.
    pub async fn rounds(&self, scenario: &mut Scenario) -> Result<()> {
        let (params, title) = (&self.params, scenario.title());
        // Round 0 warms up the Java emulator's JIT on the paths these runs use, and is not
        // counted: a fresh emulator spends a core compiling during its first busy seconds.
        for round in usize::from(!scenario.small || !params.warmup)..=params.rounds {
            match round {
                0 => println!("\n# {title}, warm-up round (not counted)"),
                _ => println!("\n# {title}, round {round}/{}", params.rounds),
            }
            let files = TestEnv::with_endpoints(&self.pubsub.endpoint(), "http://127.0.0.1");
            let inputs = write_inputs(&files, scenario).await?;
            // Dirty pages written out now, not during the first measurement.
            let synced = std::process::Command::new("sync").status()?;
            ensure!(synced.success(), "sync failed");
            let gcs = self.gcs_ceiling(&files, &inputs).await?;
            scenario.print("GCS ceiling", &gcs, None);
            let mut pubsub = None;
            if scenario.small {
                let run = self.pubsub_ceiling(&files, &inputs).await?;
                scenario.print("Pub/Sub ceiling", &run, None);
                pubsub = Some(run);
            }
            let (worker, readings) = self.worker(scenario.small, &files, &inputs).await?;
            scenario.print("worker", &worker, Some(&readings));
            if round > 0 {
                scenario.rounds.push(Round {
                    gcs,
                    pubsub,
                    worker,
                    readings,
                });
            }
        }
        Ok(())
    }

    /// Uploads every input's files straight to a fresh fake-gcs with the
    /// product's `Store`: both files of a message at once, `concurrency`
    /// messages at a time, each in a task of its own (as the worker does).
    async fn gcs_ceiling(&self, files: &TestEnv, inputs: &[Input]) -> Result<Run> {
        let gcs = tokio::task::spawn_blocking(FakeGcs::start_memory).await??;
        let setup = self.setup(&gcs.endpoint(), files)?;
        setup.env.gcs.create_bucket(&setup.env.bucket).await?;
        let store = Store::connect(&setup.settings.storage).await?;
        let clock = Clock::start(None);
        let messages = futures::stream::iter(inputs.iter().map(anyhow::Ok));
        let uploads = messages.try_for_each_concurrent(self.params.concurrency, |input| {
            let uploads = input.files.iter().map(|file| file.clone().upload(store.clone()));
            let task = tokio::spawn(futures::future::try_join_all(uploads));
            async move { task.await?.map(drop) }
        });
        uploads.await?;
        Ok(clock.run(Instant::now()))
    }

    /// Pub/Sub alone: the same input messages pulled, an event of the worker's
    /// size published and confirmed for each (`traffic::relay`), then acked,
    /// `concurrency` at a time, each in a task of its own; timed from the
    /// relay's start (inputs published before) to the last event pulled.
    async fn pubsub_ceiling(&self, files: &TestEnv, inputs: &[Input]) -> Result<Run> {
        let setup = self.setup("http://127.0.0.1", files)?;
        let (pubsub, concurrency) = (&setup.settings.pubsub, self.params.concurrency);
        let input_options = setup.env.default_input_options();
        setup.env.create_topics_and_subscriptions(input_options).await?;
        publish_inputs(&setup, inputs).await?;
        let events = events(&setup, inputs.len()).await?;
        let clock = Clock::start(None);
        let inbox = Inbox::open(pubsub, concurrency).await?;
        let outbox = Outbox::connect(pubsub, &pubsub.stored_topic, BUSY_BATCHING).await?;
        let closer = inbox.closer();
        let relaying = tokio::spawn(async move {
            // The inbox as a stream, to take `concurrency` messages at a time from it.
            let messages =
                futures::stream::unfold(inbox, async |mut inbox| Some((inbox.next().await?, inbox)));
            let messages = messages.map_err(anyhow::Error::from);
            let relayed = messages.try_for_each_concurrent(concurrency, |(envelope, delivery)| {
                let task = tokio::spawn(relay(outbox.clone(), envelope, delivery));
                async move { task.await? }
            });
            relayed.await
        });
        let run = clock.run(events.await.context("the events task")??);
        closer.close().await;
        relaying.await.context("the relay task")??;
        Ok(run)
    }

    /// The worker as a process on fresh resources and a fresh fake-gcs, given a
    /// `backlog` or started idle (see [`Bench::rounds`]); checks the bucket and a clean exit after.
    async fn worker(&self, backlog: bool, files: &TestEnv, inputs: &[Input]) -> Result<(Run, Readings)> {
        let gcs = tokio::task::spawn_blocking(FakeGcs::start_memory).await??;
        let setup = self.setup(&gcs.endpoint(), files)?;
        let env = &setup.env;
        env.create_resources().await?;
        if backlog {
            publish_inputs(&setup, inputs).await?;
        }
        let events = events(&setup, inputs.len()).await?;
        let receiver = match self.params.otlp {
            true => Some(OtlpReceiver::start().await?),
            false => None,
        };
        let mut environment = setup.environment.clone();
        if let Some(receiver) = &receiver {
            environment.insert(OTLP_ENDPOINT.into(), receiver.endpoint());
        }
        let log = testkit::process::log_dir().join(format!("worker-{}.log", env.id));
        let mut worker = WorkerProcess::spawn(&self.params.binary, &environment, &log)?;
        let pid = worker.child.id().context("the worker has no pid")?;
        let mut readings = Readings::default();
        if !backlog {
            worker.wait_ready(Duration::from_secs(30)).await?;
            tokio::time::sleep(IDLE_SETTLE).await;
            readings.idle_rss_kib = Some(proc_status_kib(pid, "VmRSS")?);
        }
        let clock = Clock::start(Some(pid));
        if !backlog {
            publish_inputs(&setup, inputs).await?;
        }
        let done = tokio::select! {
            done = events => done.context("the events task")?,
            status = worker.child.wait() => Err(anyhow!("the worker exited ({})", status?)),
        };
        let (log_path, tail) = (log.display(), testkit::process::log_tail(&log));
        let run = clock.run(done.with_context(|| format!("worker log {log_path}:\n{tail}"))?);
        readings.peak_rss_kib = proc_status_kib(pid, "VmHWM")?;
        // The worker publishes an event only for verified objects; the bucket must hold them all.
        let objects = env.gcs.list(&env.bucket, "").await?.len();
        let expected: usize = inputs.iter().map(|input| input.files.len()).sum();
        ensure!(objects == expected, "{objects} of {expected} objects stored");
        let dropped = worker.metric("audio_store_spans_dropped_total").await?;
        // SIGTERM: the worker drains, sends its last spans and exits with 0.
        worker.signal("-TERM").await?;
        let code = worker.exit_code(Duration::from_secs(30)).await?;
        ensure!(code == Some(0), "the worker exited with {code:?}; log {log_path}");
        let spans = receiver.map(|receiver| receiver.spans().len() as u64);
        readings.spans = spans.map(|received| (received, dropped.unwrap_or(0.0) as u64));
        Ok((run, readings))
    }
}
