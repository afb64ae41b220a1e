//! `scripts/local-run`: audio-store end to end on this machine, against the
//! emulators of the test kit.
//!
//! Starts the Pub/Sub emulator and fake-gcs-server on loopback addresses,
//! runs `audio-store setup` with `config/local.toml` (the emulators, the
//! spool directory and the log format given as variables), writes a sample
//! track and cover from the test fixtures into a spool directory, starts
//! `audio-store run` and waits for `/readyz` 200, publishes one message with
//! `audio-store publish`, prints the "audio stored" event, the stored objects
//! and the emptied spool, and stops everything, also on Ctrl-C or SIGTERM.
//! Everything lives in a fresh run directory under the temp dir, removed at
//! the end unless `KEEP=1`.
//!
//! Usage: `local-run [AUDIO_STORE_BINARY]` (default `target/debug/audio-store`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use testkit::emulators::repository_root;
use testkit::process::{log_tail, use_log_dir};
use testkit::{FakeGcs, GcsRest, PubsubEmulator, PubsubRest, SubscriptionOptions, WorkerProcess, media};
use tokio::signal::unix::{SignalKind, signal};

/// Names from `config/local.toml`.
const PROJECT: &str = "local-project";
const STORED_TOPIC: &str = "audio-stored";
const BUCKET: &str = "audio-archive";
/// A subscription of this run's own on the stored topic, to read the event back.
const WATCH_SUBSCRIPTION: &str = "audio-stored-watch";
const WAIT: Duration = Duration::from_secs(60);

fn step(text: &str) {
    println!("==> {text}");
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
    // The worker outlives `demo` when it fails or is interrupted, to be stopped gracefully
    // here; the emulators are `demo`'s and stop with it.
    let mut worker = None;
    let outcome = tokio::select! {
        outcome = demo(&mut worker, &binary, run_dir.path()) => outcome,
        name = interrupted() => Err(anyhow!("interrupted ({name}): stopping everything this run started")),
    };
    if let Err(error) = &outcome {
        eprintln!("error: {error:#}");
    }
    if let Some(mut worker) = worker.take() {
        // Ctrl-C reached the worker too (same process group); SIGTERM covers the rest.
        let _ = worker.signal("-TERM").await;
        if worker.exit_code(Duration::from_secs(40)).await.is_err() {
            eprintln!("    the worker did not stop within 40 s; killing it");
        }
    }
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

async fn demo(worker: &mut Option<WorkerProcess>, binary: &Path, run_dir: &Path) -> Result<()> {
    ensure!(
        binary.exists(),
        "{} is missing: run `cargo build --bin audio-store`",
        binary.display()
    );
    use_log_dir(run_dir)?;
    info(&format!("run directory: {}", run_dir.display()));
    let spool = run_dir.join("spool");
    std::fs::create_dir(&spool)?;

    step("starting the Pub/Sub emulator and fake-gcs-server on loopback");
    let pubsub = tokio::task::spawn_blocking(PubsubEmulator::start).await??;
    let gcs = tokio::task::spawn_blocking(FakeGcs::start_memory).await??;
    let (pubsub_endpoint, gcs_endpoint) = (pubsub.endpoint(), gcs.endpoint());
    info(&format!(
        "Pub/Sub emulator {pubsub_endpoint}, fake-gcs-server {gcs_endpoint} (port 80)"
    ));

    let config = repository_root().join("config/local.toml");
    let environment: BTreeMap<String, String> = [
        ("AUDIO_STORE_CONFIG", config.display().to_string()),
        (
            "PUBSUB_EMULATOR_HOST",
            pubsub_endpoint.trim_start_matches("http://").to_string(),
        ),
        ("STORAGE_EMULATOR_HOST", gcs_endpoint.clone()),
        ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", spool.display().to_string()),
        ("AUDIO_STORE__LOG__FORMAT", "json".to_string()),
        ("AUDIO_STORE__HTTP__LISTEN", "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    step("configuration: config/local.toml, with the emulators and the spool as AUDIO_STORE__* variables");
    let effective = run_dir.join("effective-config.toml");
    std::fs::write(&effective, run(binary, &environment, &["check-config"]).await?)?;
    info(&format!("effective configuration: {}", effective.display()));

    step("audio-store setup");
    info(&run(binary, &environment, &["setup"]).await?);
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
        info(&format!("{} ({fixture}, {} bytes)", path.display(), bytes.len()));
    }

    step("starting the worker: audio-store run (log: worker.log), waiting for GET /readyz 200");
    let log = run_dir.join("worker.log");
    let running = worker.insert(WorkerProcess::spawn(binary, &environment, &log)?);
    let ready = running.wait_ready(WAIT).await?.as_secs_f64();
    info(&format!(
        "ready after {ready:.1} s (http://127.0.0.1:{})",
        running.port
    ));

    step("audio-store publish (one \"audio processed\" message)");
    let (audio, cover) = (audio.display().to_string(), cover.display().to_string());
    let args = [
        "publish",
        "--audio",
        &audio,
        "--thumbnail",
        &cover,
        "--id",
        "demo-track-1",
    ];
    let meta = ["--meta", "title=Night Drive", "--meta", "user_id=u123"];
    let message_id = run(binary, &environment, &[&args[..], &meta].concat()).await?;
    info(&format!("published message id {message_id}"));

    step(&format!("the \"audio stored\" event on {STORED_TOPIC}"));
    let events = pubsub_rest.collect(WATCH_SUBSCRIPTION, 1, WAIT).await?;
    let event = events
        .first()
        .with_context(|| format!("no event within 60 s:\n{}", log_tail(&log)))?;
    info(&format!(
        "message id {}, published {}, attributes:",
        event.message_id, event.publish_time
    ));
    for (key, value) in &event.attributes {
        info(&format!("  {key} = {value}"));
    }
    info(&serde_json::to_string_pretty(&event.json()?)?);

    step(&format!("objects in gs://{BUCKET} (fake-gcs-server)"));
    let objects = GcsRest::new(&gcs_endpoint).list(BUCKET, "").await?;
    ensure!(!objects.is_empty(), "the bucket is empty");
    for object in &objects {
        info(&format!(
            "{}  {} bytes  crc32c {}",
            object.name, object.size, object.crc32c
        ));
        let metadata: Vec<String> = object
            .metadata
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        info(&format!("  {}", metadata.join(" ")));
    }

    step(&format!(
        "the spool directory after the worker ({})",
        spool.display()
    ));
    // The worker deletes the sources right after the ack; give it a moment.
    testkit::wait_for(
        "the worker to remove the sources",
        Duration::from_secs(5),
        || async { Ok((std::fs::read_dir(&spool)?.count() == 0).then_some(())) },
    )
    .await?;
    info("empty: the worker removed night-drive.wav and cover.png after storing them");

    step("stopping the worker (SIGTERM, graceful shutdown) and the emulators");
    let mut worker = worker.take().context("the worker runs")?;
    worker.signal("-TERM").await?;
    let code = worker.exit_code(Duration::from_secs(40)).await?;
    ensure!(
        code == Some(0),
        "the worker exited with {code:?}, not 0:\n{}",
        log_tail(&log)
    );
    let last = worker.log()?.pop().unwrap_or_default();
    info(&format!(
        "exited with status 0; its last log line: {}",
        last["message"]
    ));
    drop((gcs, pubsub));
    step("done");
    Ok(())
}

/// Runs `audio-store ARGS` to completion; its stdout, or an error with its stderr.
async fn run(binary: &Path, environment: &BTreeMap<String, String>, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .env_clear()
        .envs(environment)
        .kill_on_drop(true)
        .output()
        .await?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
    ensure!(
        output.status.success(),
        "audio-store {} failed:\n{}",
        args[0],
        text(&output.stderr)
    );
    Ok(text(&output.stdout))
}
