//! The operations endpoint of a running `audio-store run` process:
//! `/healthz`, `/readyz` across start and SIGTERM, `/metrics` as work happens.

use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use testkit::http::http_get;
use testkit::media::{sample_png, sample_wav, write_wav};
use testkit::worker::signal;
use testkit::{TestEnv, environment, wait_for};

const BINARY: &str = env!("CARGO_BIN_EXE_audio-store");
const TIMEOUT: Duration = Duration::from_secs(60);

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The samples of a Prometheus text exposition, by their full name with labels.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(port: u16) -> anyhow::Result<BTreeMap<String, f64>> {
    let (status, text) = http_get(port, "/metrics").await?.context("/metrics answers")?;
    ensure!(status == 200, "/metrics {status}");
    Ok(samples(&text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_follow_the_worker_through_work_and_sigterm() -> anyhow::Result<()> {
    let env = TestEnv::new();
    // Everything but the archive bucket: the worker must not become ready without it.
    for topic in [&env.topic, &env.stored_topic, &env.dead_letter_topic] {
        env.pubsub.create_topic(topic).await?;
    }
    env.pubsub
        .create_subscription(&env.subscription, &env.topic, env.default_input_options())
        .await?;
    env.pubsub
        .create_subscription(&env.stored_subscription, &env.stored_topic, Default::default())
        .await?;
    env.pubsub
        .create_subscription(
            &env.dead_letter_subscription,
            &env.dead_letter_topic,
            Default::default(),
        )
        .await?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut worker = tokio::process::Command::new(BINARY)
        .arg("run")
        .env_clear()
        .envs(environment(
            &env,
            &[
                ("AUDIO_STORE__HTTP__LISTEN", &listen),
                ("AUDIO_STORE__WORKER__SHUTDOWN_GRACE", "60s"),
            ],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;

    let (status, body) = wait_for("/healthz", TIMEOUT, || http_get(port, "/healthz")).await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http_get(port, "/readyz").await?.context("/readyz answers")?;
    assert_eq!(status, 503, "not ready while the archive bucket is missing");
    env.gcs.create_bucket(&env.bucket).await?;
    wait_for("/readyz 200", TIMEOUT, || async {
        Ok(http_get(port, "/readyz")
            .await?
            .filter(|(status, _)| *status == 200))
    })
    .await?;

    let audio_bytes = sample_wav(4_000);
    let cover_bytes = sample_png();
    let audio = env.spool_file("metered.wav", &audio_bytes);
    let cover = env.spool_file("metered.png", &cover_bytes);
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": audio, "thumbnail": cover}), &[])
        .await?;
    env.pubsub.publish(&env.topic, b"{broken", &[]).await?;
    let events = env.pubsub.collect(&env.stored_subscription, 1, TIMEOUT).await?;
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, 1, TIMEOUT)
        .await?;
    ensure!(
        events.len() == 1 && dead.len() == 1,
        "one stored, one dead-lettered"
    );

    let metrics = wait_for("both outcomes counted", TIMEOUT, || async {
        let metrics = scrape(port).await?;
        let counted = metrics.get("audio_store_messages_total{outcome=\"dead_lettered\"}") == Some(&1.0)
            && metrics.get("audio_store_messages_total{outcome=\"stored\"}") == Some(&1.0);
        Ok(counted.then_some(metrics))
    })
    .await?;
    assert_eq!(
        metrics.get("audio_store_dead_lettered_total{error_kind=\"invalid_json\"}"),
        Some(&1.0)
    );
    assert_eq!(
        metrics.get("audio_store_uploaded_bytes_total"),
        Some(&((audio_bytes.len() + cover_bytes.len()) as f64))
    );
    assert_eq!(metrics.get("audio_store_processing_seconds_count"), Some(&2.0));
    assert_eq!(metrics.get("audio_store_in_flight_messages"), Some(&0.0));
    ensure!(
        metrics
            .keys()
            .any(|name| name.starts_with("audio_store_build_info{version=")),
        "build info: {metrics:?}"
    );

    // A large upload in flight when SIGTERM arrives: readiness drops at once, the upload
    // finishes within the grace, the message is acked, and the process exits 0.
    let big = env.spool_path("long.wav");
    write_wav(&big, 160 * 1024 * 1024, 3)?;
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": big}), &[])
        .await?;
    wait_for("the large upload in flight", TIMEOUT, || async {
        let metrics = scrape(port).await?;
        Ok((metrics.get("audio_store_in_flight_messages") == Some(&1.0)).then_some(()))
    })
    .await?;
    signal(&worker, "-TERM").await?;
    let (status, _) = wait_for("/readyz 503 after SIGTERM", TIMEOUT, || async {
        Ok(http_get(port, "/readyz")
            .await?
            .filter(|(status, _)| *status == 503))
    })
    .await?;
    assert_eq!(status, 503);
    let (health, _) = http_get(port, "/healthz")
        .await?
        .context("still serving while draining")?;
    assert_eq!(health, 200, "alive while draining");
    let exit = tokio::time::timeout(TIMEOUT, worker.wait())
        .await
        .context("exit within the grace")??;
    assert_eq!(exit.code(), Some(0));
    let finished = env.pubsub.collect(&env.stored_subscription, 1, TIMEOUT).await?;
    ensure!(
        finished.len() == 1,
        "the in-flight message finished and its event was published"
    );
    ensure!(!big.exists(), "and its source was removed after the ack");
    ensure!(
        http_get(port, "/healthz").await?.is_none(),
        "the endpoint is gone after exit"
    );
    Ok(())
}
