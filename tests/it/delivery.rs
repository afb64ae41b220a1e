//! Delivery semantics: nacks and redeliveries, exactly-once subscriptions.

use crate::support::{Worker, audio_id_for, event_json, settings};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::time::Duration;
use testkit::media::{sample_png, sample_wav};
use testkit::{SubscriptionOptions, TestEnv, wait_for};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The first delivery uploads the objects but cannot publish its event (the stored topic
/// does not exist yet), so it is nacked; Pub/Sub redelivers it, and the redelivery finds
/// the objects stored, publishes the event and acks.
async fn a_failed_delivery_is_redelivered_and_stored_once(exactly_once: bool) -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources_with(SubscriptionOptions {
        exactly_once,
        ..env.default_input_options()
    })
    .await?;
    let late_topic = format!("{}-late", env.stored_topic);
    let audio = env.spool_file("retry.wav", &sample_wav(3_000));
    let cover = env.spool_file("retry.png", &sample_png());
    env.pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": audio, "thumbnail": cover, "id": "fail-once"}),
            &[],
        )
        .await?;
    let worker = Worker::start(settings(
        &env,
        &[
            ("AUDIO_STORE__PUBSUB__STORED_TOPIC", &late_topic),
            ("AUDIO_STORE__RETRY__MAX_ATTEMPTS", "1"),
        ],
    )?);
    let metrics = worker.health.metrics.clone();
    // After the second nack the subscription's retry policy spaces redeliveries out (the
    // emulator redelivers the first nack at once), leaving time to create the topic and its
    // subscription before the next attempt publishes.
    wait_for("two nacked deliveries", TIMEOUT, || async {
        Ok((metrics.messages("nacked") >= 2).then_some(()))
    })
    .await?;
    let before = env.gcs.list(&env.bucket, "").await?;
    ensure!(
        before.len() == 2,
        "the first delivery stored both objects: {before:?}"
    );
    ensure!(
        audio.exists() && cover.exists(),
        "nothing is deleted before the event is confirmed"
    );

    env.pubsub.create_topic(&late_topic).await?;
    let watch = format!("{late_topic}-watch");
    env.pubsub
        .create_subscription(&watch, &late_topic, Default::default())
        .await?;
    let events = env.pubsub.collect(&watch, 1, TIMEOUT).await?;
    let extra = env.pubsub.drain_for(&watch, Duration::from_secs(2)).await?;
    let summary = worker.stop().await?;
    ensure!(
        events.len() == 1 && extra.is_empty(),
        "{} events, then {} more",
        events.len(),
        extra.len()
    );
    let event = event_json(&events[0])?;
    assert_eq!(event["audio_id"], audio_id_for("fail-once"));

    let after = env.gcs.list(&env.bucket, "").await?;
    let generations = |objects: &[testkit::ObjectInfo]| {
        let mut pairs: Vec<(String, String)> = objects
            .iter()
            .map(|o| (o.name.clone(), o.generation.clone()))
            .collect();
        pairs.sort();
        pairs
    };
    assert_eq!(
        generations(&after),
        generations(&before),
        "the redelivery wrote nothing again"
    );
    assert_eq!(summary.already_stored, 1, "{summary:?}");
    ensure!(summary.nacked >= 2 && summary.stored == 0, "{summary:?}");
    ensure!(
        !audio.exists() && !cover.exists(),
        "sources removed after the redelivery's event"
    );

    // Acked for good: with leases released, nothing comes back.
    env.pubsub.release_leases(&env.subscription).await?;
    let unacked = env
        .pubsub
        .drain_for(&env.subscription, Duration::from_secs(2))
        .await?;
    ensure!(unacked.is_empty(), "the message was not acked: {unacked:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_message_is_redelivered_and_stored_exactly_once() -> anyhow::Result<()> {
    a_failed_delivery_is_redelivered_and_stored_once(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_exactly_once_subscription_a_failed_message_is_redelivered_and_stored_once()
-> anyhow::Result<()> {
    a_failed_delivery_is_redelivered_and_stored_once(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_exactly_once_subscription_messages_are_stored_and_acked_with_confirmation()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources_with(SubscriptionOptions {
        exactly_once: true,
        ..env.default_input_options()
    })
    .await?;
    let subscription = env.pubsub.get_subscription(&env.subscription).await?;
    ensure!(
        subscription["enableExactlyOnceDelivery"] == true,
        "{subscription}"
    );
    let mut sources = Vec::new();
    for index in 0..5 {
        let audio = env.spool_file(&format!("eo-{index}.wav"), &sample_wav(1_000 + index));
        env.pubsub
            .publish_json(
                &env.topic,
                &json!({"audio": audio, "id": format!("eo-{index}")}),
                &[],
            )
            .await?;
        sources.push(audio);
    }
    let bad = env.pubsub.publish(&env.topic, b"[]", &[]).await?;
    let worker = Worker::start(settings(&env, &[])?);
    let events = env.pubsub.collect(&env.stored_subscription, 5, TIMEOUT).await?;
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, 1, TIMEOUT)
        .await?;
    let summary = worker.stop().await?;
    ensure!(events.len() == 5, "{} of 5 events", events.len());
    ensure!(dead.len() == 1, "the bad message is dead-lettered");
    assert_eq!(dead[0].attribute("original_message_id"), Some(bad.as_str()));
    assert_eq!(
        (summary.stored, summary.dead_lettered, summary.nacked),
        (5, 1, 0),
        "{summary:?}"
    );
    ensure!(
        sources.iter().all(|s| !s.exists()),
        "sources removed after confirmed acks"
    );

    env.pubsub.release_leases(&env.subscription).await?;
    let unacked = env
        .pubsub
        .drain_for(&env.subscription, Duration::from_secs(2))
        .await?;
    ensure!(unacked.is_empty(), "confirmed acks hold: {unacked:?}");
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 5);
    let _ = events
        .iter()
        .map(event_json)
        .collect::<anyhow::Result<Vec<_>>>()
        .context("events")?;
    Ok(())
}
