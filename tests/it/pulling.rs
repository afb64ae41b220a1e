//! The pull loop and readiness under real conditions: a worker left idle,
//! Pub/Sub unreachable at start and mid-run, and signals during start-up.

use crate::support::{Worker, audio_id_for, event_strings, events_for_all, settings, spawn_worker};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use testkit::media::sample_wav;
use testkit::{TcpProxy, TestEnv, WorkerProcess, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);

/// How often the emulator logged a client's RST_STREAM.
fn stream_resets(log: &Path) -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string(log)?.matches("onRstStreamRead").count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_idle_for_15_s_keeps_its_stream_and_stores_a_message_published_then() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let emulator_log = env
        .pubsub_log()
        .context("the environment has an emulator of its own")?;
    let worker = Worker::start(settings(&env, &[])?);
    wait_for("the worker to be ready", TIMEOUT, || async {
        Ok(worker.health.is_ready().then_some(()))
    })
    .await?;
    let resets = stream_resets(&emulator_log)?;
    // The scenario itself, not a wait for a condition: 15 s without a message.
    tokio::time::sleep(Duration::from_secs(15)).await;
    ensure!(
        stream_resets(&emulator_log)? == resets,
        "the emulator saw the worker reset its stream while idle ({})",
        emulator_log.display()
    );

    let audio = env.spool_file("late.wav", &sample_wav(2_000));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": audio, "id": "late"}), &[])
        .await?;
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(20))
        .await?;
    assert_eq!(event_strings(&events, "/audio_id")?, [audio_id_for("late")]);
    assert_eq!(worker.health.metrics.pull_reconnects(), 0);
    worker.stop().await?;
    Ok(())
}

/// Waits until `/readyz` answers `status`; returns the body.
async fn readyz(worker: &WorkerProcess, status: u16, within: Duration) -> anyhow::Result<String> {
    wait_for(&format!("/readyz {status}"), within, || async {
        Ok(worker
            .readyz()
            .await?
            .filter(|(answered, _)| *answered == status)
            .map(|(_, body)| body))
    })
    .await
}

/// The reasons of the WARN lines that say the subscription check fails.
fn subscription_warnings(worker: &WorkerProcess) -> anyhow::Result<Vec<String>> {
    not_ready_warnings(worker, &["subscription"])
}

/// The reasons of the WARN lines that say one of `checks` fails.
fn not_ready_warnings(worker: &WorkerProcess, checks: &[&str]) -> anyhow::Result<Vec<String>> {
    Ok(worker
        .log()?
        .into_iter()
        .filter(|line| line["level"] == "WARN" && checks.iter().any(|check| line["check"] == *check))
        .filter_map(|line| line["reason"].as_str().map(str::to_string))
        .collect())
}

/// Whether a reason says that the subscription does not exist.
fn says_not_found(reason: &str) -> bool {
    let reason = reason.to_lowercase();
    reason.contains("not_found") || reason.contains("not found")
}

/// Waits until every message of `names` has a stored event; repeats are fine
/// (at least once). The emulator keeps messages leased to a stream whose
/// connection was cut, where Pub/Sub would redeliver them after the ack
/// deadline; [`events_for_all`] releases those leases now and then.
async fn wait_stored(env: &TestEnv, names: &[&str], within: Duration) -> anyhow::Result<()> {
    let expected: BTreeSet<String> = names.iter().map(|name| audio_id_for(name)).collect();
    events_for_all(env, &expected, within).await.map(drop)
}

/// Ends an outage on `proxy` in two steps: REST first, until the worker logs
/// that it reopens its pull (its probe saw Pub/Sub again) or `within` passed,
/// then gRPC; whether it reopened. Were the SDK's own stream through before
/// that reopen, the worker would cancel it, and the emulator, which fails on a
/// client's RST_STREAM, would then go on handing that subscription's messages
/// to the cancelled stream (Pub/Sub drops it): they would never arrive. (Not
/// for an outage too short for the worker to reopen: the SDK's HTTP/2 attempts
/// refused meanwhile can put it in a backoff of over a minute.)
async fn end_outage(proxy: &TcpProxy, worker: &WorkerProcess, within: Duration) -> anyhow::Result<bool> {
    let reopens = || -> anyhow::Result<usize> {
        let lines = worker.log()?.into_iter().filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.contains("reopening the streaming pull"))
        });
        Ok(lines.count())
    };
    let before = reopens()?;
    proxy.restore_http1();
    let deadline = tokio::time::Instant::now() + within;
    let reopened = loop {
        if reopens()? > before {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    proxy.restore();
    Ok(reopened)
}

/// The last lines of the worker's log and of the emulator's, for a failure message.
fn log_tail(env: &TestEnv, worker: &WorkerProcess) -> String {
    let last = |lines: Vec<String>, count: usize| {
        let skip = lines.len().saturating_sub(count);
        lines[skip..].join("\n")
    };
    let worker_lines = worker.log().unwrap_or_default();
    let emulator_lines = env
        .pubsub_log()
        .and_then(|log| std::fs::read_to_string(log).ok())
        .unwrap_or_default();
    format!(
        "the worker's log ends with:\n{}\nthe emulator's log ends with:\n{}",
        last(worker_lines.iter().map(|line| line.to_string()).collect(), 30),
        last(emulator_news(&emulator_lines), 40),
    )
}

/// The emulator's log without its per-request header lines and timestamps.
fn emulator_news(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| !line.contains("orwarding key") && !line.contains(" AM ") && !line.contains(" PM "))
        .map(str::to_string)
        .collect()
}

async fn publish_tracks(env: &TestEnv, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let audio = env.spool_file(&format!("{name}.wav"), &sample_wav(2_000));
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": audio, "id": name}), &[])
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pubsub_unreachable_at_start_and_for_30_s_mid_run_readiness_says_why_and_nothing_is_lost()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let proxy = TcpProxy::start(&env.pubsub_endpoint, false)?;
    let host = proxy.host();
    let mut worker = spawn_worker(&env, &[("PUBSUB_EMULATOR_HOST", &host)])?;

    // Unreachable from the start: never ready, and the log says why.
    let body = readyz(&worker, 503, TIMEOUT).await?;
    let body = wait_for("/readyz to name the subscription", TIMEOUT, || async {
        Ok(worker
            .readyz()
            .await?
            .map(|(_, body)| body)
            .filter(|body| body.contains("subscription: probe")))
    })
    .await
    .with_context(|| format!("last body: {body}"))?;
    ensure!(body.contains(&env.subscription), "{body}");
    ensure!(
        !subscription_warnings(&worker)?.is_empty(),
        "a WARN line with the reason"
    );
    publish_tracks(&env, &["early-1", "early-2"]).await?;

    proxy.restore();
    readyz(&worker, 200, TIMEOUT).await?;
    // The SDK reopens the pull itself, after up to a minute of its own backoff.
    wait_stored(&env, &["early-1", "early-2"], Duration::from_secs(90))
        .await
        .with_context(|| log_tail(&env, &worker))?;

    // Mid-run: a 30 s outage.
    let warned = subscription_warnings(&worker)?.len();
    let cut_at = tokio::time::Instant::now();
    proxy.cut();
    let body = readyz(&worker, 503, Duration::from_secs(15)).await?;
    ensure!(body.contains("subscription:"), "{body}");
    ensure!(
        subscription_warnings(&worker)?.len() > warned,
        "a new WARN line with the reason"
    );
    publish_tracks(&env, &["late-1", "late-2"]).await?;
    // The scenario's outage lasts 30 s.
    tokio::time::sleep_until(cut_at + Duration::from_secs(30)).await;
    proxy.restore();
    readyz(&worker, 200, TIMEOUT).await?;
    wait_stored(&env, &["late-1", "late-2"], Duration::from_secs(90))
        .await
        .with_context(|| log_tail(&env, &worker))?;

    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(TIMEOUT).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_got_nothing_through_an_outage_is_reopened_as_soon_as_pubsub_answers()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let proxy = TcpProxy::start(&env.pubsub_endpoint, true)?;
    let host = proxy.host();
    let mut worker = spawn_worker(&env, &[("PUBSUB_EMULATOR_HOST", &host)])?;
    readyz(&worker, 200, TIMEOUT).await?;
    ensure!(worker.metric("audio_store_pull_reconnects_total").await? == Some(0.0));

    proxy.cut();
    readyz(&worker, 503, Duration::from_secs(15)).await?;
    // The scenario: an outage is two failed probes in a row (monitor::OUTAGE_PROBES),
    // 5 s apart; one has failed.
    tokio::time::sleep(audio_store::monitor::PROBE_INTERVAL + Duration::from_secs(1)).await;
    // The next probe after the restore (5 s apart, up to 5 s each) reports it;
    // the SDK alone may wait up to a minute.
    let reopened = end_outage(&proxy, &worker, Duration::from_secs(15)).await?;
    ensure!(
        reopened,
        "no reopened pull within 15 s of the restore\n{}",
        log_tail(&env, &worker)
    );
    ensure!(worker.metric("audio_store_pull_reconnects_total").await? == Some(1.0));

    publish_tracks(&env, &["after"]).await?;
    wait_stored(&env, &["after"], Duration::from_secs(90))
        .await
        .with_context(|| log_tail(&env, &worker))?;
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(TIMEOUT).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_subscription_makes_readyz_503_with_the_reason_and_recreating_it_recovers()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let mut worker = spawn_worker(&env, &[])?;
    readyz(&worker, 200, TIMEOUT).await?;
    // Whichever notices first: the probe (`subscription`) or the stream (`pull`).
    let checks = ["subscription", "pull"];
    let warned = not_ready_warnings(&worker, &checks)?.len();

    env.pubsub.delete_subscription(&env.subscription).await?;
    let body = readyz(&worker, 503, Duration::from_secs(15)).await?;
    ensure!(
        body.contains(&env.subscription) && says_not_found(&body),
        "{body}"
    );
    // The line is written just after readiness changes.
    wait_for(
        "a new WARN line saying the subscription is not found",
        TIMEOUT,
        || async {
            let warnings = not_ready_warnings(&worker, &checks)?;
            Ok(warnings[warned..]
                .iter()
                .any(|reason| says_not_found(reason))
                .then_some(()))
        },
    )
    .await?;

    env.pubsub
        .create_subscription(&env.subscription, &env.topic, env.default_input_options())
        .await?;
    readyz(&worker, 200, TIMEOUT)
        .await
        .with_context(|| log_tail(&env, &worker))?;
    publish_tracks(&env, &["recreated"]).await?;
    wait_stored(&env, &["recreated"], TIMEOUT)
        .await
        .with_context(|| log_tail(&env, &worker))?;
    let reconnects = worker.metric("audio_store_pull_reconnects_total").await?;
    ensure!(reconnects >= Some(1.0), "reconnects: {reconnects:?}");
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(TIMEOUT).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_before_the_first_bucket_check_finishes_exits_0() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    // Storage that accepts connections and never answers: the bucket check hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let storage = format!("http://{}", silent.local_addr()?);
    let mut worker = spawn_worker(
        &env,
        &[
            ("STORAGE_EMULATOR_HOST", &storage),
            ("AUDIO_STORE__STORAGE__ENDPOINT", &storage),
        ],
    )?;
    wait_for(
        "/readyz to say the archive is not checked yet",
        TIMEOUT,
        || async {
            Ok(worker
                .readyz()
                .await?
                .filter(|(status, body)| *status == 503 && body.contains("archive: not checked yet")))
        },
    )
    .await?;
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(TIMEOUT).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_shuts_the_worker_down_gracefully_with_exit_0() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let mut worker = spawn_worker(&env, &[])?;
    readyz(&worker, 200, TIMEOUT).await?;
    worker.signal("-HUP").await?;
    assert_eq!(worker.exit_code(TIMEOUT).await?, Some(0));
    let log = worker.log()?;
    ensure!(
        log.iter()
            .any(|line| line["message"] == "shutdown requested" && line["signal"] == "SIGHUP"),
        "the log names the signal"
    );
    ensure!(
        log.iter().any(|line| line["message"] == "worker stopped"),
        "the worker drained and stopped"
    );
    Ok(())
}
