//! The operations endpoint of a running `audio-store run` process:
//! `/healthz`, `/readyz` across start and SIGTERM, `/metrics` as work happens.

use crate::support::spawn_worker;
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::http::http_get;
use testkit::media::{sample_png, sample_wav, write_wav};
use testkit::{TestEnv, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);

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
    env.create_topics_and_subscriptions(env.default_input_options())
        .await?;
    let mut worker = spawn_worker(&env, &[("AUDIO_STORE__WORKER__SHUTDOWN_GRACE", "60s")])?;
    let port = worker.port;

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
    worker.signal("-TERM").await?;
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
    assert_eq!(
        worker.exit_code(TIMEOUT).await?,
        Some(0),
        "exit 0 within the grace"
    );
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
