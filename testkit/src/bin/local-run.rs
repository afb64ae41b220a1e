//! `scripts/local-run`: audio-store end to end on this machine, against the
//! emulators of the test kit.
//!
//! Starts the Pub/Sub emulator and fake-gcs-server on loopback addresses,
//! runs `audio-store setup` with `config/local.toml` (names, endpoints and
//! the spool directory overridden by `AUDIO_STORE__*` variables), writes a
//! sample track and cover from the test fixtures into a spool directory,
//! starts `audio-store run` and waits for `/readyz` 200, publishes one
//! message with `audio-store publish`, prints the "audio stored" event, the
//! stored objects and the emptied spool, and stops everything, also on
//! Ctrl-C or SIGTERM. Everything lives in a fresh run directory under the
//! temp dir, removed at the end unless `KEEP=1`.
//!
//! Usage: `local-run [AUDIO_STORE_BINARY]` (default `target/debug/audio-store`).

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use testkit::emulators::repository_root;
use testkit::process::{log_tail, use_log_dir};
use testkit::{FakeGcs, GcsRest, PubsubEmulator, PubsubRest, SubscriptionOptions, WorkerProcess, media};
use tokio::signal::unix::{SignalKind, signal};

const PROJECT: &str = "local-project";
const TOPIC: &str = "audio-processed";
const SUBSCRIPTION: &str = "audio-processed-store";
const STORED_TOPIC: &str = "audio-stored";
const DEAD_LETTER_TOPIC: &str = "audio-processed-dlq";
const DEAD_LETTER_SUBSCRIPTION: &str = "audio-processed-dlq-sub";
const BUCKET: &str = "audio-archive";
/// A subscription of this run's own on the stored topic, to read the event back.
const WATCH_SUBSCRIPTION: &str = "audio-stored-watch";
const WAIT: Duration = Duration::from_secs(60);

/// What this run started, for the cleanup.
#[derive(Default)]
struct Started {
    pubsub: Option<PubsubEmulator>,
    gcs: Option<FakeGcs>,
    worker: Option<WorkerProcess>,
}

fn step(text: &str) {
    if std::io::stdout().is_terminal() {
        println!("\x1b[32m==>\x1b[0m \x1b[1m{text}\x1b[0m");
    } else {
        println!("==> {text}");
    }
}

fn info(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let keep = std::env::var("KEEP").is_ok_and(|value| value == "1");
    let binary = std::env::args_os().nth(1).map_or_else(
        || repository_root().join("target/debug/audio-store"),
        PathBuf::from,
    );
    let run_dir = match tempfile::Builder::new().prefix("audio-store-local.").tempdir() {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("error: cannot create the run directory: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut started = Started::default();
    let outcome = tokio::select! {
        outcome = demo(&mut started, &binary, run_dir.path()) => outcome,
        name = interrupted() => Err(anyhow!("interrupted ({name}): stopping everything this run started")),
    };
    if let Err(error) = &outcome {
        eprintln!("error: {error:#}");
    }
    if let Some(mut worker) = started.worker.take() {
        // Ctrl-C reached the worker too (same process group); SIGTERM covers the rest.
        let _ = worker.signal("-TERM").await;
        if worker.exit_code(Duration::from_secs(40)).await.is_err() {
            eprintln!("    the worker did not stop within 40 s; killing it");
        }
    }
    drop(started);
    if keep {
        eprintln!("    kept the run directory: {}", run_dir.keep().display());
    } else if outcome.is_err() {
        eprintln!("    (KEEP=1 scripts/local-run keeps the run directory with all logs)");
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// Resolves with the name of the first SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn demo(started: &mut Started, binary: &Path, run_dir: &Path) -> Result<()> {
    ensure!(
        binary.exists(),
        "{} is missing: build it with `cargo build --bin audio-store`",
        binary.display()
    );
    use_log_dir(run_dir)?;
    info(&format!("run directory: {}", run_dir.display()));
    let spool = run_dir.join("spool");
    std::fs::create_dir(&spool)?;

    step("starting the Pub/Sub emulator and fake-gcs-server on loopback");
    let pubsub = started
        .pubsub
        .insert(tokio::task::spawn_blocking(PubsubEmulator::start).await??);
    let pubsub_endpoint = pubsub.endpoint();
    info(&format!(
        "Pub/Sub emulator: {pubsub_endpoint} (log: {})",
        file_name(&pubsub.log())
    ));
    let gcs = started
        .gcs
        .insert(tokio::task::spawn_blocking(FakeGcs::start_memory).await??);
    let gcs_endpoint = gcs.endpoint();
    info(&format!("fake-gcs-server:  {gcs_endpoint} (port 80)"));

    let config = run_dir.join("config.toml");
    std::fs::copy(repository_root().join("config/local.toml"), &config)?;
    let spool_root = spool.display().to_string();
    let environment: BTreeMap<String, String> = [
        ("AUDIO_STORE_CONFIG", config.display().to_string().as_str()),
        (
            "PUBSUB_EMULATOR_HOST",
            pubsub_endpoint.trim_start_matches("http://"),
        ),
        ("STORAGE_EMULATOR_HOST", &gcs_endpoint),
        // An endpoint in the file would otherwise take precedence over *_EMULATOR_HOST.
        ("AUDIO_STORE__PUBSUB__ENDPOINT", &pubsub_endpoint),
        ("AUDIO_STORE__STORAGE__ENDPOINT", &gcs_endpoint),
        ("AUDIO_STORE__PUBSUB__PROJECT", PROJECT),
        ("AUDIO_STORE__PUBSUB__TOPIC", TOPIC),
        ("AUDIO_STORE__PUBSUB__SUBSCRIPTION", SUBSCRIPTION),
        ("AUDIO_STORE__PUBSUB__STORED_TOPIC", STORED_TOPIC),
        ("AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", DEAD_LETTER_TOPIC),
        (
            "AUDIO_STORE__PUBSUB__DEAD_LETTER_SUBSCRIPTION",
            DEAD_LETTER_SUBSCRIPTION,
        ),
        ("AUDIO_STORE__STORAGE__BUCKET", BUCKET),
        ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", &spool_root),
        ("AUDIO_STORE__LOG__FORMAT", "json"),
        ("AUDIO_STORE__HTTP__LISTEN", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect();
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(binary);
        command
            .args(args)
            .env_clear()
            .envs(&environment)
            .kill_on_drop(true);
        command
    };

    step("configuration: config/local.toml, with AUDIO_STORE__* overrides");
    let checked = command(&["check-config"]).output().await?;
    let effective = run_dir.join("effective-config.toml");
    std::fs::write(&effective, &checked.stdout)?;
    ensure!(
        checked.status.success(),
        "the configuration is not valid: {}",
        text(&checked.stderr)
    );
    info(&format!("effective configuration: {}", effective.display()));

    step("audio-store setup");
    let setup = command(&["setup"]).output().await?;
    std::fs::write(run_dir.join("setup.log"), &setup.stderr)?;
    info(&text(&setup.stdout));
    ensure!(
        setup.status.success(),
        "audio-store setup failed:\n{}",
        text(&setup.stderr)
    );
    let pubsub_rest = PubsubRest::new(&pubsub_endpoint, PROJECT);
    let watch = SubscriptionOptions {
        ack_deadline_seconds: Some(30),
        ..SubscriptionOptions::default()
    };
    pubsub_rest
        .create_subscription(WATCH_SUBSCRIPTION, STORED_TOPIC, watch)
        .await?;
    info(&format!(
        "created subscription {WATCH_SUBSCRIPTION} on {STORED_TOPIC} (to watch for the event)"
    ));

    step("writing a sample track and cover (from tests/fixtures/media) into the spool directory");
    let audio = spool.join("night-drive.wav");
    let cover = spool.join("cover.png");
    for (path, fixture) in [(&audio, media::WAV_FIXTURE), (&cover, media::PNG_FIXTURE)] {
        let bytes = media::fixture(fixture);
        std::fs::write(path, &bytes)?;
        info(&format!(
            "{:<16} {:>7} bytes ({fixture})",
            file_name(path),
            bytes.len()
        ));
    }

    step("starting the worker: audio-store run (log: worker.log)");
    let worker_log = run_dir.join("worker.log");
    let worker = started
        .worker
        .insert(WorkerProcess::spawn(binary, &environment, &worker_log)?);
    info(&format!("pid {}", worker.child.id().unwrap_or_default()));
    step(&format!(
        "waiting for GET /readyz to answer 200 (http://127.0.0.1:{})",
        worker.port
    ));
    let waiting = Instant::now();
    loop {
        if let Some(status) = worker.child.try_wait()? {
            bail!("the worker exited early ({status}):\n{}", log_tail(&worker_log));
        }
        match worker.readyz().await? {
            Some((200, _)) => break,
            answer if waiting.elapsed() > WAIT => {
                bail!(
                    "the worker was not ready within 60 s ({answer:?}):\n{}",
                    log_tail(&worker_log)
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    info(&format!("ready after {:.1} s", waiting.elapsed().as_secs_f64()));

    step("audio-store publish (one \"audio processed\" message)");
    let (audio_arg, cover_arg) = (audio.display().to_string(), cover.display().to_string());
    let published = command(&[
        "publish",
        "--audio",
        &audio_arg,
        "--thumbnail",
        &cover_arg,
        "--id",
        "demo-track-1",
        "--meta",
        "title=Night Drive",
        "--meta",
        "user_id=u123",
    ])
    .output()
    .await?;
    ensure!(
        published.status.success(),
        "audio-store publish failed:\n{}",
        text(&published.stderr)
    );
    info(&format!(
        "published message id {} to {TOPIC}",
        text(&published.stdout).trim()
    ));

    step(&format!(
        "waiting for the \"audio stored\" event on {STORED_TOPIC}"
    ));
    let waiting = Instant::now();
    let events = pubsub_rest.collect(WATCH_SUBSCRIPTION, 1, WAIT).await?;
    let Some(event) = events.first() else {
        bail!(
            "no \"audio stored\" event within 60 s:\n{}",
            log_tail(&worker_log)
        );
    };
    info(&format!(
        "received after {:.1} s",
        waiting.elapsed().as_secs_f64()
    ));
    info(&format!(
        "message id: {}   published: {}",
        event.message_id, event.publish_time
    ));
    info("attributes:");
    for (key, value) in &event.attributes {
        info(&format!("  {key} = {value}"));
    }
    info("data:");
    info(&indent(&serde_json::to_string_pretty(&event.json()?)?));

    step(&format!("objects in gs://{BUCKET} (fake-gcs-server)"));
    let objects = GcsRest::new(&gcs_endpoint).list(BUCKET, "").await?;
    ensure!(!objects.is_empty(), "the bucket is empty");
    let width = objects
        .iter()
        .map(|object| object.name.len())
        .max()
        .unwrap_or_default();
    info(&format!(
        "{:<width$}  {:>7}  {:<8}  METADATA",
        "NAME", "SIZE", "CRC32C"
    ));
    for object in &objects {
        let mut metadata = object
            .metadata
            .iter()
            .map(|(key, value)| format!("{key}={value}"));
        let first = metadata.next().unwrap_or_else(|| "-".into());
        info(&format!(
            "{:<width$}  {:>7}  {:<8}  {first}",
            object.name, object.size, object.crc32c
        ));
        for more in metadata {
            info(&format!("{:<width$}  {:>7}  {:<8}  {more}", "", "", ""));
        }
    }

    step(&format!(
        "the spool directory after the worker ({})",
        spool.display()
    ));
    // The worker deletes the sources right after the ack; give it a moment.
    let left = testkit::wait_for("the sources to be removed", Duration::from_secs(5), || async {
        Ok((std::fs::read_dir(&spool)?.count() == 0).then_some(()))
    })
    .await;
    ensure!(
        left.is_ok(),
        "the worker did not remove the sources from the spool directory"
    );
    info("empty: the worker removed night-drive.wav and cover.png after storing them");

    step(&format!(
        "the worker's operations endpoint (http://127.0.0.1:{})",
        worker.port
    ));
    let ready = worker.readyz().await?.map(|(status, _)| status);
    info(&format!(
        "GET /readyz -> {}",
        ready.map_or("no answer".into(), |status| status.to_string())
    ));
    info("GET /metrics (excerpt):");
    let metrics = testkit::http::http_get(worker.port, "/metrics")
        .await?
        .unwrap_or_default()
        .1;
    let shown = [
        "messages_total",
        "uploaded_bytes_total",
        "dead_lettered_total",
        "in_flight_messages",
        "processing_seconds_count",
    ];
    for line in metrics.lines().filter(|line| {
        shown
            .iter()
            .any(|name| line.starts_with(&format!("audio_store_{name}")))
    }) {
        info(&format!("  {line}"));
    }

    step("stopping the worker (SIGTERM, graceful shutdown)");
    let mut worker = started.worker.take().context("the worker runs")?;
    worker.signal("-TERM").await?;
    let code = worker.exit_code(Duration::from_secs(40)).await?;
    ensure!(
        code == Some(0),
        "the worker exited with {code:?}, expected 0 after a graceful shutdown:\n{}",
        log_tail(&worker_log)
    );
    info("exited with status 0; the last lines of worker.log:");
    let log = worker.log()?;
    for line in &log[log.len().saturating_sub(8)..] {
        info(&format!("  {}", log_line(line)));
    }

    step("stopping the emulators");
    started.gcs.take();
    started.pubsub.take();
    step("done");
    Ok(())
}

/// One JSON log line (flattened events with their span) as `time level message key=value…`.
fn log_line(line: &serde_json::Value) -> String {
    let field = |key: &str| line[key].as_str().unwrap_or_default().to_string();
    let time = field("timestamp").get(11..23).unwrap_or_default().to_string();
    let skip = ["timestamp", "level", "message", "target", "span", "name"];
    let fields: Vec<String> = [line["span"].as_object(), line.as_object()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|(key, _)| !skip.contains(&key.as_str()))
        .map(|(key, value)| {
            format!(
                "{key}={}",
                value.as_str().map_or_else(|| value.to_string(), str::to_string)
            )
        })
        .collect();
    format!(
        "{time} {:<5} {}  {}",
        field("level"),
        field("message"),
        fields.join(" ")
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_string()
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}
