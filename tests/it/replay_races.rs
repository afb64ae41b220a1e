//! Replay under real conditions: paced and killed midway, long after the fact,
//! while the worker runs, and given a dead-letter copy without its data.

use crate::replay::{TIMEOUT, dead_letter_missing_files, json_lines, moved_ids, replay};
use crate::support::{BINARY, Worker, event_json, settings};
use anyhow::{Context as _, ensure};
use audio_store::dead_letter;
use audio_store::identity::{AudioId, IdentityKey};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::media::sample_wav;
use testkit::{TestEnv, environment, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_paced_by_rate_and_killed_midway_loses_nothing_and_a_rerun_moves_the_rest()
-> anyhow::Result<()> {
    const COUNT: usize = 12;
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    let names: Vec<String> = (0..COUNT).map(|i| format!("killed-{i}.wav")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = dead_letter_missing_files(&env, &worker, &name_refs).await?;
    worker.stop().await?;
    for name in &names {
        env.spool_file(name, &sample_wav(1_000));
    }
    // What the replays publish: a tap to count it, and a fresh subscription for the worker
    // (the stopped worker's stream still holds leases on the input subscription in the emulator).
    let tap = format!("{}-tap", env.subscription);
    let fresh = format!("{}-fresh", env.subscription);
    env.pubsub
        .create_subscription(&tap, &env.topic, Default::default())
        .await?;
    env.pubsub
        .create_subscription(&fresh, &env.topic, env.default_input_options())
        .await?;

    // At 4 messages/s; killed (SIGKILL) once three have moved.
    let mut command = tokio::process::Command::new(BINARY);
    command
        .args([
            "replay",
            "--subscription",
            &env.dead_letter_subscription,
            "--topic",
            &env.topic,
        ])
        .args(["--rate", "4", "--output", "json"])
        .env_clear()
        .envs(environment(&env, &[]))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().context("the replay's stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut moved_at = Vec::new();
    let mut first_lines = Vec::new();
    while moved_at.len() < 3 {
        let line = tokio::time::timeout(TIMEOUT, lines.next_line())
            .await
            .context("waiting for the replay's output")??
            .context("the replay ended before it was killed")?;
        if serde_json::from_str::<serde_json::Value>(&line)?["action"] == "moved" {
            moved_at.push(std::time::Instant::now());
        }
        first_lines.push(line);
    }
    child.start_kill()?;
    child.wait().await?;
    // What it printed before the kill landed.
    while let Some(line) = lines.next_line().await? {
        first_lines.push(line);
    }
    // A lower bound only (the pacing's), which no slowness of the machine can break.
    let paced = moved_at[2] - moved_at[0];
    ensure!(
        paced >= Duration::from_millis(400),
        "--rate 4 moves at most 4 a second: the 1st and 3rd moved {paced:?} apart"
    );

    // The killed replay's un-acked messages stay in the dead-letter subscription. Pub/Sub
    // redelivers them after the ack deadline; the emulator keeps them leased to the dead
    // stream and hands them out again only when the leases are released (a seek to a
    // snapshot), so the test keeps releasing them while the rerun runs. Rerun until every
    // message has moved.
    let first_lines = first_lines
        .iter()
        .map(|line| serde_json::from_str(line))
        .collect::<Result<Vec<serde_json::Value>, _>>()?;
    let mut moved = moved_ids(&first_lines);
    let moved_before_kill = moved.len();
    for _ in 0..5 {
        let running = std::sync::atomic::AtomicBool::new(true);
        let release = async {
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                env.pubsub.release_leases(&env.dead_letter_subscription).await?;
            }
            anyhow::Ok(())
        };
        let run = async {
            let output = replay(&env, &["--output", "json", "--idle", "3s"]).await;
            running.store(false, std::sync::atomic::Ordering::Relaxed);
            output
        };
        let (run, released) = tokio::join!(run, release);
        released?;
        let (code, stdout, stderr) = run?;
        assert_eq!(code, Some(0), "{stderr}");
        moved.extend(moved_ids(&json_lines(&stdout)?));
        if moved.len() == COUNT {
            break;
        }
    }
    ensure!(
        (3..COUNT).contains(&moved_before_kill),
        "killed midway: {moved_before_kill} of {COUNT} had moved"
    );
    assert_eq!(
        moved,
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "all moved in the end"
    );
    // Whatever is still in the dead-letter subscription is a copy of a moved message (a
    // lease released by the test just as the rerun acked it), never one that did not move.
    let left = env
        .pubsub
        .recover_unacked(&env.dead_letter_subscription, 0, Duration::ZERO)
        .await?;
    for message in &left {
        let original = message.attribute("original_message_id").unwrap_or_default();
        ensure!(moved.contains(original), "left behind unmoved: {message:?}");
    }

    // Every message reached the input topic at least once (a message moved just before the
    // kill may have gone twice), and each is stored exactly once.
    let republished = env.pubsub.drain_for(&tap, Duration::from_secs(3)).await?;
    let originals: BTreeSet<String> = republished
        .iter()
        .filter_map(|message| message.attribute("original_message_id").map(str::to_string))
        .collect();
    assert_eq!(originals, ids.iter().cloned().collect::<BTreeSet<_>>());
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__PUBSUB__SUBSCRIPTION", &fresh)])?);
    let metrics = worker.health.metrics.clone();
    let settled = republished.len() as u64;
    wait_for("every republished message settled", TIMEOUT, || async {
        let done = metrics.messages("stored") + metrics.messages("already_stored");
        Ok((done >= settled).then_some(()))
    })
    .await?;
    let summary = worker.stop().await?;
    assert_eq!(summary.stored, COUNT as u64, "{summary:?}");
    assert_eq!(
        env.gcs.list(&env.bucket, "").await?.len(),
        COUNT,
        "one object set each"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_pubsub_dead_lettered_long_ago_is_stored_under_its_original_date_when_replayed()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let layout = [(
        "AUDIO_STORE__STORAGE__LAYOUT",
        "{yyyy}/{mm}/{dd}/{audio_id}/{kind}{ext}",
    )];
    // What Pub/Sub's own dead-lettering leaves on a message first published on 2 January 2025
    // (the attribute as the emulator writes it, see the test above), the producer's key absent.
    let audio = env.spool_file("old.wav", &sample_wav(1_500));
    let dead_id = env
        .pubsub
        .publish_json(
            &env.dead_letter_topic,
            &json!({"audio": audio}),
            &[
                ("CloudPubSubDeadLetterSourceDeliveryCount", "5"),
                (
                    "CloudPubSubDeadLetterSourceSubscription",
                    env.subscription.as_str(),
                ),
                (
                    "CloudPubSubDeadLetterSourceTopicPublishTime",
                    "2025-01-02T03:04:05.678Z",
                ),
            ],
        )
        .await?;
    let (code, stdout, stderr) = replay(&env, &[]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    ensure!(stdout.contains("moved 1,"), "{stdout}");
    let worker = Worker::start(settings(&env, &layout)?);
    let events = env.pubsub.collect(&env.stored_subscription, 1, TIMEOUT).await?;
    worker.stop().await?;
    ensure!(events.len() == 1, "stored after the replay");
    let event = event_json(&events[0])?;
    let audio_id = AudioId::from_key(IdentityKey::MessageId(&dead_id)).to_string();
    assert_eq!(event["audio_id"], audio_id);
    assert_eq!(
        event["audio"]["name"],
        format!("2025/01/02/{audio_id}/audio.wav"),
        "the original date, not the replay's"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_while_the_worker_runs_over_permanent_failures_terminates_and_moves_each_once()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    let names = [
        "gone-1.wav",
        "gone-2.wav",
        "gone-3.wav",
        "gone-4.wav",
        "gone-5.wav",
    ];
    let ids: BTreeSet<String> = dead_letter_missing_files(&env, &worker, &names)
        .await?
        .into_iter()
        .collect();

    // The worker keeps running: every moved message fails again and is dead-lettered again.
    let (code, stdout, stderr) = replay(&env, &["--output", "json"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    let lines = json_lines(&stdout)?;
    let moved: Vec<&str> = lines
        .iter()
        .filter(|line| line["action"] == "moved")
        .filter_map(|line| line["original_message_id"].as_str())
        .collect();
    assert_eq!(moved.len(), names.len(), "each moved once: {stdout}");
    assert_eq!(moved_ids(&lines), ids);
    let summary = lines.last().context("a summary")?;
    assert_eq!(summary["summary"]["moved"], names.len());

    let metrics = worker.health.metrics.clone();
    wait_for("the moved messages to fail again", TIMEOUT, || async {
        Ok((metrics.messages("dead_lettered") >= 2 * names.len() as u64).then_some(()))
    })
    .await?;
    worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_without_its_data_is_skipped_and_left() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    // What the worker publishes for a message over the 10 MB limit: no data, its size in an attribute.
    let dropped_bytes = "10485760";
    env.pubsub
        .publish(
            &env.dead_letter_topic,
            b"",
            &[
                (dead_letter::ERROR_KIND, "invalid_json"),
                (dead_letter::ERROR, "data is not valid JSON"),
                (dead_letter::ORIGINAL_MESSAGE_ID, "too-large-1"),
                (dead_letter::DATA_DROPPED_BYTES, dropped_bytes),
            ],
        )
        .await?;

    let (code, stdout, stderr) = replay(&env, &["--output", "json"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    let lines = json_lines(&stdout)?;
    ensure!(lines.len() == 2, "one entry and a summary:\n{stdout}");
    assert_eq!(lines[0]["action"], "skipped", "{}", lines[0]);
    assert_eq!(lines[0]["original_message_id"], "too-large-1");
    ensure!(
        lines[0]["failure"]
            .as_str()
            .is_some_and(|failure| failure.contains(dropped_bytes)),
        "the entry says why: {}",
        lines[0]
    );
    assert_eq!(
        lines[1]["summary"],
        json!({"moved": 0, "skipped": 1, "failed": 0, "dry_run": false})
    );
    let input = env
        .pubsub
        .drain_for(&env.subscription, Duration::from_secs(2))
        .await?;
    ensure!(input.is_empty(), "republished: {input:?}");

    // Still on the dead-letter subscription (released from replay's closed stream).
    let left = env
        .pubsub
        .recover_unacked(&env.dead_letter_subscription, 1, TIMEOUT)
        .await?;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0].attribute(dead_letter::DATA_DROPPED_BYTES),
        Some(dropped_bytes)
    );
    Ok(())
}
