//! `audio-store replay`: dead-lettered messages back to the input topic.

use crate::support::{BINARY, Worker, audio_id_for, event_json, settings};
use anyhow::{Context as _, ensure};
use audio_store::identity::{AudioId, IdentityKey};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::media::sample_wav;
use testkit::{SubscriptionOptions, TestEnv, environment, wait_for};

pub(crate) const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `audio-store replay ARGS` against `env`; returns (exit code, stdout, stderr).
pub(crate) async fn replay(env: &TestEnv, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let mut command = tokio::process::Command::new(BINARY);
    command.arg("replay").args(args);
    for (flag, default) in [
        ("--subscription", env.dead_letter_subscription.as_str()),
        ("--topic", env.topic.as_str()),
        ("--idle", "2s"),
    ] {
        if !args.contains(&flag) {
            command.args([flag, default]);
        }
    }
    command.env_clear().envs(environment(env, &[])).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .context("replay did not finish")??;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Publishes one message for each name, whose audio file (in the spool) is missing, and
/// waits until the worker dead-lettered them; returns their message ids.
pub(crate) async fn dead_letter_missing_files(
    env: &TestEnv,
    worker: &Worker,
    names: &[&str],
) -> anyhow::Result<Vec<String>> {
    let messages: Vec<serde_json::Value> = names
        .iter()
        .map(|name| json!({"audio": env.spool_path(name)}))
        .collect();
    dead_letter(env, worker, &messages).await
}

/// Publishes `messages` (whose files are missing) and waits until the worker dead-lettered
/// them all; returns their message ids.
pub(crate) async fn dead_letter(
    env: &TestEnv,
    worker: &Worker,
    messages: &[serde_json::Value],
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for data in messages {
        ids.push(env.pubsub.publish_json(&env.topic, data, &[]).await?);
    }
    let metrics = worker.health.metrics.clone();
    let wanted = messages.len() as u64;
    wait_for("dead letters", TIMEOUT, || async {
        Ok((metrics.messages("dead_lettered") >= wanted).then_some(()))
    })
    .await?;
    Ok(ids)
}

/// The `original_message_id`s of the entries a `--output json` replay reported as moved.
pub(crate) fn moved_ids(lines: &[serde_json::Value]) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|line| line["action"] == "moved")
        .filter_map(|line| line["original_message_id"].as_str().map(str::to_string))
        .collect()
}

pub(crate) fn json_lines(stdout: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dead_lettered_for_a_missing_file_is_stored_once_after_the_file_is_restored_and_replayed()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    let ids = dead_letter_missing_files(&env, &worker, &["restored.wav"]).await?;

    env.spool_file("restored.wav", &sample_wav(2_000));
    let (code, stdout, stderr) = replay(&env, &[]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    ensure!(stdout.contains("moved 1, skipped 0, failed 0"), "{stdout}");

    let events = env.pubsub.collect(&env.stored_subscription, 1, TIMEOUT).await?;
    let extra = env
        .pubsub
        .drain_for(&env.stored_subscription, Duration::from_secs(2))
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        events.len() == 1 && extra.is_empty(),
        "one event: {} then {}",
        events.len(),
        extra.len()
    );
    let event = event_json(&events[0])?;
    // The replay keeps the identity of the original message.
    let original = AudioId::from_key(IdentityKey::MessageId(&ids[0])).to_string();
    assert_eq!(event["audio_id"], original);
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 1);
    assert_eq!((summary.stored, summary.dead_lettered), (1, 1), "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lists_what_would_move_and_moves_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    let ids = dead_letter_missing_files(&env, &worker, &["dry-a.wav", "dry-b.wav"]).await?;
    worker.stop().await?;

    let (code, stdout, stderr) = replay(&env, &["--dry-run", "--output", "json"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    let lines = json_lines(&stdout)?;
    ensure!(lines.len() == 3, "two entries and a summary:\n{stdout}");
    for entry in &lines[..2] {
        assert_eq!(entry["action"], "would_move");
        assert_eq!(entry["error_kind"], "source_missing");
        ensure!(
            entry["error"]
                .as_str()
                .is_some_and(|e| e.contains("does not exist")),
            "{entry}"
        );
        ensure!(
            ids.contains(
                &entry["original_message_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            ),
            "{entry}"
        );
        ensure!(
            entry["sources"][0].as_str().is_some_and(|s| s.ends_with(".wav")),
            "{entry}"
        );
        ensure!(
            entry["age_seconds"].as_i64().is_some_and(|age| age >= 0),
            "{entry}"
        );
    }
    assert_eq!(
        lines[2]["summary"],
        json!({"moved": 2, "skipped": 0, "failed": 0, "dry_run": true})
    );
    let input = env
        .pubsub
        .drain_for(&env.subscription, Duration::from_secs(2))
        .await?;
    ensure!(input.is_empty(), "a dry run republished: {input:?}");

    // They are all still in the dead-letter subscription. (The emulator keeps messages
    // released by a closed streaming pull leased to it; releasing the leases frees them.)
    let left = env
        .pubsub
        .recover_unacked(&env.dead_letter_subscription, 2, TIMEOUT)
        .await?;
    assert_eq!(left.len(), 2, "{left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_kind_filter_and_the_limit_move_only_what_they_select() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    let missing = dead_letter_missing_files(&env, &worker, &["m1.wav", "m2.wav", "m3.wav"]).await?;
    let text = env.spool_file("words.wav", b"just some words, no audio here at all\n");
    let bad = env
        .pubsub
        .publish_json(&env.topic, &json!({"audio": text}), &[])
        .await?;
    let metrics = worker.health.metrics.clone();
    wait_for("the bad_content dead letter", TIMEOUT, || async {
        Ok((metrics.messages("dead_lettered") >= 4).then_some(()))
    })
    .await?;
    worker.stop().await?;

    // A fresh subscription on the input topic sees exactly what the replay publishes.
    let tap = format!("{}-tap", env.subscription);
    env.pubsub
        .create_subscription(&tap, &env.topic, Default::default())
        .await?;
    let (code, stdout, stderr) = replay(&env, &["--error-kind", "source_missing", "--limit", "2"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    ensure!(stdout.contains("moved 2,"), "{stdout}");
    let moved = env.pubsub.collect(&tap, 2, TIMEOUT).await?;
    let more = env.pubsub.drain_for(&tap, Duration::from_secs(2)).await?;
    ensure!(
        moved.len() == 2 && more.is_empty(),
        "exactly 2 moved: {} + {}",
        moved.len(),
        more.len()
    );
    for message in &moved {
        ensure!(
            missing.contains(
                &message
                    .attribute("original_message_id")
                    .unwrap_or_default()
                    .to_string()
            ),
            "only source_missing messages move: {message:?}"
        );
        assert_eq!(message.attribute("replay_count"), Some("1"));
        ensure!(
            message.attribute("error_kind").is_none(),
            "the error annotation is dropped"
        );
    }

    // Left behind, untouched: one source_missing and the bad_content one.
    let remaining = env
        .pubsub
        .recover_unacked(&env.dead_letter_subscription, 2, TIMEOUT)
        .await?;
    let mut left: Vec<(String, String)> = remaining
        .iter()
        .map(|message| {
            (
                message.attribute("error_kind").unwrap_or_default().to_string(),
                message
                    .attribute("original_message_id")
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    left.sort();
    ensure!(left.len() == 2, "{remaining:?}");
    assert_eq!(left[0].0, "bad_content");
    assert_eq!(left[0].1, bad);
    assert_eq!(left[1].0, "source_missing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_message_that_was_in_fact_stored_adds_no_second_object_set() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("kept.wav", &sample_wav(2_000));
    let data = json!({"audio": audio});
    let worker = Worker::start(settings(&env, &[])?);
    let original = env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let first = env.pubsub.collect(&env.stored_subscription, 1, TIMEOUT).await?;
    ensure!(first.len() == 1, "stored");
    // A copy of it lands in the dead-letter topic anyway (say, its ack was lost and a later
    // delivery failed); an operator replays everything.
    env.pubsub
        .publish_json(
            &env.dead_letter_topic,
            &data,
            &[
                ("original_message_id", &original),
                ("error_kind", "pubsub_unavailable"),
            ],
        )
        .await?;
    let (code, stdout, stderr) = replay(&env, &[]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    ensure!(stdout.contains("moved 1,"), "{stdout}");
    let second = env.pubsub.collect(&env.stored_subscription, 1, TIMEOUT).await?;
    let summary = worker.stop().await?;
    ensure!(
        second.len() == 1,
        "the replay is recognised as stored and its event published again"
    );
    let (first, second) = (event_json(&first[0])?, event_json(&second[0])?);
    assert_eq!(second["audio_id"], first["audio_id"]);
    assert_eq!(second["audio"]["generation"], first["audio"]["generation"]);
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 1);
    assert_eq!((summary.stored, summary.already_stored), (1, 1), "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_pubsub_dead_lettered_after_max_attempts_are_replayed_and_stored_once() -> anyhow::Result<()>
{
    let env = TestEnv::new();
    env.create_resources_with(SubscriptionOptions {
        max_delivery_attempts: Some(5),
        retry_min_backoff: Some(Duration::from_millis(100)),
        retry_max_backoff: Some(Duration::from_millis(500)),
        ..env.default_input_options()
    })
    .await?;
    // The stored topic is missing: every delivery uploads (or finds) the objects and then fails
    // to publish its event, until Pub/Sub gives up and dead-letters the message itself.
    let late_topic = format!("{}-late", env.stored_topic);
    let audio = env.spool_file("maxed.wav", &sample_wav(2_000));
    let before = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": audio, "id": "maxed-out"}), &[])
        .await?;
    let after = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1);
    let failing = Worker::start(settings(
        &env,
        &[
            ("AUDIO_STORE__PUBSUB__STORED_TOPIC", &late_topic),
            ("AUDIO_STORE__RETRY__MAX_ATTEMPTS", "1"),
        ],
    )?);
    let metrics = failing.health.metrics.clone();
    wait_for("five nacked deliveries", TIMEOUT, || async {
        Ok((metrics.messages("nacked") >= 5).then_some(()))
    })
    .await?;
    // Pub/Sub moves it once the input subscription is pulled again after the last nack.
    let dead = wait_for("Pub/Sub's dead letter", TIMEOUT, || async {
        let pulled = env.pubsub.pull(&env.dead_letter_subscription, 10).await?;
        let ack_ids: Vec<String> = pulled.iter().map(|m| m.ack_id.clone()).collect();
        env.pubsub.nack(&env.dead_letter_subscription, &ack_ids).await?;
        Ok(pulled.into_iter().next())
    })
    .await?;
    failing.stop().await?;
    ensure!(
        dead.attribute("CloudPubSubDeadLetterSourceDeliveryCount")
            .is_some(),
        "dead-lettered by Pub/Sub: {dead:?}"
    );
    // The source topic's publish time, which dated layouts are rendered from after a replay.
    let original = dead
        .attribute("CloudPubSubDeadLetterSourceTopicPublishTime")
        .context("the original publish time")?;
    let original: jiff::Timestamp = original
        .parse()
        .with_context(|| format!("CloudPubSubDeadLetterSourceTopicPublishTime {original:?}"))?;
    ensure!(
        before <= original && original <= after,
        "{original} is the first publish"
    );
    ensure!(audio.exists(), "no event, no deletion");

    env.pubsub.create_topic(&late_topic).await?;
    let watch = format!("{late_topic}-watch");
    env.pubsub
        .create_subscription(&watch, &late_topic, Default::default())
        .await?;
    // The failed worker's closed stream still holds leases in the emulator; a fresh
    // subscription on the input topic takes the replayed message.
    let fresh = format!("{}-fresh", env.subscription);
    env.pubsub
        .create_subscription(&fresh, &env.topic, env.default_input_options())
        .await?;
    let (code, stdout, stderr) = replay(&env, &["--error-kind", "max_delivery_attempts"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    ensure!(
        stdout.contains("moved 1,") && stdout.contains(&dead.message_id),
        "{stdout}"
    );

    let worker = Worker::start(settings(
        &env,
        &[
            ("AUDIO_STORE__PUBSUB__STORED_TOPIC", &late_topic),
            ("AUDIO_STORE__PUBSUB__SUBSCRIPTION", &fresh),
        ],
    )?);
    let events = env.pubsub.collect(&watch, 1, TIMEOUT).await?;
    let summary = worker.stop().await?;
    ensure!(events.len() == 1, "stored after the replay");
    assert_eq!(event_json(&events[0])?["audio_id"], audio_id_for("maxed-out"));
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 1, "one object set");
    assert_eq!(
        summary.already_stored, 1,
        "the objects from the failed deliveries count: {summary:?}"
    );
    ensure!(!audio.exists(), "source removed");
    Ok(())
}

#[tokio::test]
async fn a_wrong_subscription_or_topic_is_a_one_line_error_with_exit_2() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let (code, _, stderr) = replay(&env, &["--subscription", "no-such-dlq-sub"]).await?;
    assert_eq!(code, Some(2), "{stderr}");
    ensure!(
        stderr.lines().count() == 1 && stderr.contains("no-such-dlq-sub"),
        "{stderr}"
    );

    env.pubsub
        .publish(
            &env.dead_letter_topic,
            b"{}",
            &[("error_kind", "invalid_message")],
        )
        .await?;
    let (code, _, stderr) = replay(&env, &["--topic", "no-such-topic"]).await?;
    assert_eq!(code, Some(2), "{stderr}");
    ensure!(
        stderr.lines().count() == 1 && stderr.contains("no-such-topic"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_bad_rate_or_an_unknown_error_kind_exits_2() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    for rate in ["inf", "1e10", "0", "1e-30", "-1", "NaN"] {
        let (code, _, stderr) = replay(&env, &[&format!("--rate={rate}")]).await?;
        assert_eq!(code, Some(2), "--rate {rate}: {stderr}");
        ensure!(stderr.contains("--rate"), "--rate {rate}: {stderr}");
    }
    let (code, _, stderr) = replay(&env, &["--error-kind", "nonsense"]).await?;
    assert_eq!(code, Some(2), "{stderr}");
    ensure!(
        stderr.contains("source_missing") && stderr.contains("max_delivery_attempts"),
        "the known kinds are listed: {stderr}"
    );
    Ok(())
}
