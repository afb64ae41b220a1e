//! Cloud Storage misbehaving under the worker: errors, dropped connections,
//! latency, an outage, slow uploads past the ack deadline, random faults.

use crate::support::{Worker, audio_id_for, event_strings, settings};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::FaultProxy;
use testkit::media::{self, sample_png, sample_wav, write_wav};
use testkit::{FakeGcs, TestEnv, crc32c_base64, crc32c_file};

/// Retries generous enough to ride out the injected faults in process.
const PATIENT: [(&str, &str); 3] = [
    ("AUDIO_STORE__RETRY__MAX_ATTEMPTS", "10"),
    ("AUDIO_STORE__RETRY__INITIAL_BACKOFF", "100ms"),
    ("AUDIO_STORE__RETRY__MAX_BACKOFF", "2s"),
];

/// Publishes `count` messages with small audio (every third with a thumbnail); returns
/// each audio_id with the CRC32C of every object it must end up with.
async fn publish_small(
    env: &TestEnv,
    prefix: &str,
    count: usize,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut expected = BTreeMap::new();
    for index in 0..count {
        let id = format!("{prefix}-{index}");
        let audio = sample_wav(300 + index);
        let path = env.spool_file(&format!("{id}.wav"), &audio);
        let audio_id = audio_id_for(&id);
        expected.insert(format!("audio/{audio_id}/audio.wav"), crc32c_base64(&audio));
        let mut data = json!({"audio": path, "id": id});
        if index % 3 == 0 {
            let cover = sample_png();
            data["thumbnail"] = json!(env.spool_file(&format!("{id}.png"), &cover));
            expected.insert(format!("audio/{audio_id}/thumbnail.png"), crc32c_base64(&cover));
        }
        env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    }
    Ok(expected)
}

/// Waits for `messages` events, then checks: one object per expected name with the
/// source's CRC32C and nothing else, no dead letters, no source left in the spool.
async fn all_stored_exactly_once(
    env: &TestEnv,
    messages: usize,
    objects: &BTreeMap<String, String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let events = env
        .pubsub
        .collect(&env.stored_subscription, messages, timeout)
        .await?;
    ensure!(events.len() == messages, "{} of {messages} events", events.len());
    let mut ids: Vec<String> = event_strings(&events, "/audio_id")?;
    ids.sort();
    ids.dedup();
    ensure!(
        ids.len() == messages,
        "events for {} distinct messages",
        ids.len()
    );
    let stored: BTreeMap<String, String> = env
        .gcs
        .list(&env.bucket, "")
        .await?
        .into_iter()
        .map(|o| (o.name, o.crc32c))
        .collect();
    ensure!(
        &stored == objects,
        "stored objects differ: {} vs {} expected",
        stored.len(),
        objects.len()
    );
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, Duration::from_millis(500))
        .await?;
    ensure!(dead.is_empty(), "dead-lettered: {dead:?}");
    let left: Vec<_> = std::fs::read_dir(env.spool.path())?.collect();
    ensure!(left.is_empty(), "sources left behind: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_dropped_connections_and_latency_are_retried_and_nothing_is_stored_twice()
-> anyhow::Result<()> {
    let gcs = FakeGcs::start_memory()?;
    let proxy = FaultProxy::start(&gcs.endpoint())?;
    // The resets interrupt resumable uploads: answer the client's status query as GCS does.
    proxy.correct_resumable_status();
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let mut objects = publish_small(&env, "faulty", 20).await?;
    for index in 0..2 {
        let id = format!("faulty-large-{index}");
        let path = env.spool_path(&format!("{id}.wav"));
        write_wav(&path, 24 * 1024 * 1024, 40 + index)?;
        objects.insert(
            format!("audio/{}/audio.wav", audio_id_for(&id)),
            crc32c_file(&path)?,
        );
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": path, "id": id}), &[])
            .await?;
    }
    proxy.fail_next(6, 503);
    proxy.fail_matching("POST /upload", 3, 429);
    proxy.reset_next(2, 4 * 1024 * 1024);
    proxy.set_latency(Duration::from_millis(100));

    let mut overrides = PATIENT.to_vec();
    let endpoint = proxy.endpoint();
    overrides.push(("STORAGE_EMULATOR_HOST", &endpoint));
    let worker = Worker::start(settings(&env, &overrides)?);
    let outcome = all_stored_exactly_once(&env, 22, &objects, Duration::from_secs(180)).await;
    let summary = worker.stop().await?;
    outcome?;
    let stats = proxy.stats();
    ensure!(
        stats.failed >= 9 && stats.resets >= 2,
        "the faults were injected: {stats:?}"
    );
    ensure!(summary.dead_lettered == 0 && summary.stored == 22, "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_outage_of_several_seconds_mid_run_loses_nothing_and_stores_nothing_twice()
-> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut gcs = FakeGcs::start_filesystem(data.path())?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let objects = publish_small(&env, "outage", 40).await?;
    let mut overrides = PATIENT.to_vec();
    overrides.push(("AUDIO_STORE__WORKER__CONCURRENCY", "2"));
    let worker = Worker::start(settings(&env, &overrides)?);
    // Stop the server once some, not all, messages are stored.
    let first = env
        .pubsub
        .collect(&env.stored_subscription, 5, Duration::from_secs(60))
        .await?;
    ensure!(first.len() == 5, "progress before the outage");
    gcs.stop()?;
    let waiting = std::fs::read_dir(env.spool.path())?.count();
    ensure!(waiting > 0, "the outage came while work remained");
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage itself, not a wait for a condition
    gcs.restart()?;
    // The five events already collected are gone from the subscription; the rest must follow.
    let rest = all_stored_exactly_once(&env, 35, &objects, Duration::from_secs(180)).await;
    let summary = worker.stop().await?;
    rest?;
    ensure!(summary.dead_lettered == 0, "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_the_ack_deadline_keeps_its_lease_and_is_delivered_once() -> anyhow::Result<()>
{
    let gcs = FakeGcs::start_memory()?;
    let proxy = FaultProxy::start(&gcs.endpoint())?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?; // ack deadline 10 s
    let subscription = env.pubsub.get_subscription(&env.subscription).await?;
    assert_eq!(subscription["ackDeadlineSeconds"], 10);
    let path = env.spool_path("slow.wav");
    write_wav(&path, 12 * 1024 * 1024, 77)?;
    let crc = crc32c_file(&path)?;
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": path, "id": "slow"}), &[])
        .await?;
    proxy.set_upload_rate(Some(400 * 1024)); // ~30 s for 12 MiB

    let endpoint = proxy.endpoint();
    let worker = Worker::start(settings(&env, &[("STORAGE_EMULATOR_HOST", &endpoint)])?);
    let started = tokio::time::Instant::now();
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(120))
        .await?;
    let took = started.elapsed();
    let extra = env
        .pubsub
        .drain_for(&env.stored_subscription, Duration::from_secs(3))
        .await?;
    let metrics = worker.health.metrics.clone();
    let summary = worker.stop().await?;
    ensure!(
        events.len() == 1 && extra.is_empty(),
        "one event: {} then {}",
        events.len(),
        extra.len()
    );
    ensure!(
        took > Duration::from_secs(20),
        "the upload outlasted the ack deadline twice over: {took:?}"
    );
    // One delivery, handled once: a redelivery would have shown up as a second outcome.
    assert_eq!(metrics.messages("stored"), 1);
    assert_eq!(metrics.messages("already_stored") + metrics.messages("nacked"), 0);
    assert_eq!(
        (summary.stored, summary.already_stored, summary.nacked),
        (1, 0, 0),
        "{summary:?}"
    );
    let name = format!("audio/{}/audio.wav", audio_id_for("slow"));
    let stored = env.gcs.object(&env.bucket, &name).await?.context("stored")?;
    assert_eq!(stored.crc32c, crc);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_with_random_storage_faults_keeps_every_invariant() -> anyhow::Result<()> {
    const MESSAGES: usize = 200;
    let gcs = FakeGcs::start_memory()?;
    let proxy = FaultProxy::start(&gcs.endpoint())?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let objects = publish_small(&env, "soak", MESSAGES).await?;
    proxy.set_random_faults(0.15, 20261124);
    let endpoint = proxy.endpoint();
    let mut overrides = PATIENT.to_vec();
    overrides.push(("STORAGE_EMULATOR_HOST", &endpoint));
    overrides.push(("AUDIO_STORE__WORKER__CONCURRENCY", "8"));
    let worker = Worker::start(settings(&env, &overrides)?);
    let outcome = all_stored_exactly_once(&env, MESSAGES, &objects, Duration::from_secs(300)).await;
    let summary = worker.stop().await?;
    outcome?;
    let stats = proxy.stats();
    ensure!(
        stats.failed + stats.resets > 10,
        "faults were injected: {stats:?}"
    );
    ensure!(summary.dead_lettered == 0, "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_file_whose_reads_fail_during_the_probe_is_retried_and_stored_not_dead_lettered()
-> anyhow::Result<()> {
    let gcs = FakeGcs::start_memory()?;
    let proxy = FaultProxy::start(&gcs.endpoint())?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let wav = media::fixture("wav-16bit.wav");
    env.gcs.upload(&env.staging_bucket, "incoming/take", &wav).await?;
    let source = format!("gs://{}/incoming/take", env.staging_bucket);
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": source, "id": "flaky-read"}), &[])
        .await?;
    // Twice the storage client's three attempts at one read: the probe's first two tries
    // fail on reads, which say nothing of the content.
    proxy.fail_matching("alt=media", 6, 503);

    let mut overrides = PATIENT.to_vec();
    let endpoint = proxy.endpoint();
    overrides.push(("STORAGE_EMULATOR_HOST", &endpoint));
    let worker = Worker::start(settings(&env, &overrides)?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(120))
        .await?;
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, Duration::from_millis(500))
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        dead.is_empty(),
        "dead-lettered: {:?}",
        dead.iter().map(|m| m.attribute("error")).collect::<Vec<_>>()
    );
    ensure!(events.len() == 1, "{} events, {summary:?}", events.len());
    ensure!(
        proxy.stats().failed >= 6,
        "the faults were injected: {:?}",
        proxy.stats()
    );
    ensure!((summary.stored, summary.dead_lettered) == (1, 0), "{summary:?}");
    let name = format!("audio/{}/audio.wav", audio_id_for("flaky-read"));
    let stored = env.gcs.object(&env.bucket, &name).await?.context("stored")?;
    assert_eq!(stored.crc32c, crc32c_base64(&wav));
    Ok(())
}
