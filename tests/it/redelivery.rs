//! Redeliveries and retries: whatever Pub/Sub or the worker repeats stores nothing twice.

use crate::support::{Worker, audio_id_for, event_json, settings};
use crate::worker::EVENT_TIMEOUT;
use anyhow::{Context as _, ensure};
use audio_store::error::ErrorKind;
use serde_json::json;
use std::time::Duration;
use testkit::media::{sample_png, sample_wav};
use testkit::{TestEnv, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_with_the_sources_still_present_does_not_store_a_second_copy() -> anyhow::Result<()> {
    // A crash after upload and before the ack: the message comes again, its files are still there.
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio_bytes = sample_wav(5_000);
    let audio = env.spool_file("again.wav", &audio_bytes);
    let data = json!({"audio": audio});
    let worker = Worker::start(settings(&env, &[])?);
    env.pubsub
        .publish_json(&env.topic, &data, &[("idempotency_key", "key-42")])
        .await?;
    let first = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    ensure!(first.len() == 1, "first event");
    let first = event_json(&first[0])?;

    env.spool_file("again.wav", &audio_bytes);
    env.pubsub
        .publish_json(&env.topic, &data, &[("idempotency_key", "key-42")])
        .await?;
    let second = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    let summary = worker.stop().await?;
    ensure!(second.len() == 1, "second event");
    let second = event_json(&second[0])?;

    assert_eq!(first["audio_id"], audio_id_for("key-42"));
    assert_eq!(second["audio_id"], first["audio_id"]);
    assert_eq!(
        second["audio"]["generation"], first["audio"]["generation"],
        "not rewritten"
    );
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 1);
    assert_eq!((summary.stored, summary.already_stored), (1, 1), "{summary:?}");
    ensure!(!audio.exists(), "the redelivered message's source is removed too");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_cleanup_is_recognised_as_stored_and_its_event_published_again()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("gone.wav", &sample_wav(3_000));
    let cover = env.spool_file("gone.png", &sample_png());
    let data = json!({"audio": audio, "thumbnail": cover, "id": "after-cleanup"});
    let worker = Worker::start(settings(&env, &[])?);
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let first = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    ensure!(first.len() == 1 && !audio.exists(), "stored and cleaned up");

    // The same message again, its sources gone: not a dead letter, the same event again.
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let second = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, Duration::from_millis(500))
        .await?;
    let summary = worker.stop().await?;
    ensure!(second.len() == 1, "second event");
    ensure!(dead.is_empty(), "dead-lettered: {dead:?}");
    let (first, second) = (event_json(&first[0])?, event_json(&second[0])?);
    assert_eq!(second["audio_id"], first["audio_id"]);
    assert_eq!(second["audio"], first["audio"]);
    assert_eq!(
        second["thumbnail"]["generation"],
        first["thumbnail"]["generation"]
    );
    assert_eq!((summary.stored, summary.already_stored), (1, 1), "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_objects_were_written_does_not_write_them_again() -> anyhow::Result<()> {
    // The stored topic is missing at first: the upload succeeds, the event publish fails,
    // and the retry finds the objects already there.
    let env = TestEnv::new();
    env.create_resources().await?;
    let missing_topic = format!("{}-late", env.stored_topic);
    let audio = env.spool_file("late.wav", &sample_wav(3_000));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": audio, "id": "late-event"}), &[])
        .await?;
    let worker = Worker::start(settings(
        &env,
        &[
            ("AUDIO_STORE__PUBSUB__STORED_TOPIC", &missing_topic),
            ("AUDIO_STORE__RETRY__MAX_ATTEMPTS", "20"),
            // Retries 2 s apart leave the test time to create the topic and its subscription
            // between two attempts, so the event cannot slip out before anyone listens.
            ("AUDIO_STORE__RETRY__INITIAL_BACKOFF", "2s"),
            ("AUDIO_STORE__RETRY__MAX_BACKOFF", "2s"),
        ],
    )?);
    let metrics = worker.health.metrics.clone();
    wait_for("a failed event publish", EVENT_TIMEOUT, || async {
        Ok((metrics.retries(ErrorKind::PubsubUnavailable) >= 1).then_some(()))
    })
    .await?;
    let audio_name = format!("audio/{}/audio.wav", audio_id_for("late-event"));
    let written = env
        .gcs
        .object(&env.bucket, &audio_name)
        .await?
        .context("uploaded before the publish")?;
    ensure!(
        audio.exists(),
        "no source is deleted before its event is confirmed"
    );

    env.pubsub.create_topic(&missing_topic).await?;
    let watch = format!("{}-watch", missing_topic);
    env.pubsub
        .create_subscription(&watch, &missing_topic, Default::default())
        .await?;
    let events = env.pubsub.collect(&watch, 1, EVENT_TIMEOUT).await?;
    let summary = worker.stop().await?;
    ensure!(events.len() == 1, "one event");
    let event = event_json(&events[0])?;
    assert_eq!(
        event["audio"]["generation"], written.generation,
        "the object was not rewritten"
    );
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 1);
    assert_eq!(summary.already_stored, 1, "{summary:?}");
    ensure!(!audio.exists(), "removed after the event");
    Ok(())
}
