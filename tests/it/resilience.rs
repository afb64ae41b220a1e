//! Processes that die or stop mid-work: SIGKILL with uploads in flight,
//! SIGTERM with uploads that cannot finish in the grace, and two replicas
//! sharing one subscription while one of them is killed.

use crate::support::{audio_id_for, event_json, events_for_all, spawn_worker};
use anyhow::ensure;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use testkit::media::{sample_wav, write_wav};
use testkit::{FakeGcs, TestEnv, crc32c_base64, crc32c_file, wait_for};

/// Every message has exactly one object, holding its source's bytes.
async fn one_object_set_each(env: &TestEnv, expected: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let objects = env.gcs.list(&env.bucket, "").await?;
    let stored: BTreeMap<String, String> = objects
        .iter()
        .map(|o| (o.name.clone(), o.crc32c.clone()))
        .collect();
    let wanted: BTreeMap<String, String> = expected
        .iter()
        .map(|(id, crc)| (format!("audio/{id}/audio.wav"), crc.clone()))
        .collect();
    ensure!(
        stored == wanted,
        "objects differ from one per message: {} stored, {} expected",
        stored.len(),
        wanted.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_upload_loses_nothing_and_stores_nothing_twice_after_a_restart()
-> anyhow::Result<()> {
    const FILES: u64 = 6;
    let gcs = FakeGcs::start_memory()?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let mut sources: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
    for index in 0..FILES {
        let id = format!("crash-{index}");
        let path = env.spool_path(&format!("{id}.wav"));
        write_wav(&path, 48 * 1024 * 1024, index)?;
        let crc = crc32c_file(&path)?;
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": path, "id": id}), &[])
            .await?;
        sources.insert(audio_id_for(&id), (path, crc));
    }

    let first = spawn_worker(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "3")])?;
    wait_for("uploads in flight", Duration::from_secs(60), || async {
        let in_flight = first.metric("audio_store_in_flight_messages").await?;
        Ok(in_flight.filter(|n| *n >= 2.0))
    })
    .await?;
    first.signal("-KILL").await?;
    let mut first = first;
    first.child.wait().await?;

    // At the moment of the crash: no source is gone whose object and event do not exist.
    let before: Vec<serde_json::Value> = env
        .pubsub
        .drain_for(&env.stored_subscription, Duration::from_secs(1))
        .await?
        .iter()
        .map(event_json)
        .collect::<anyhow::Result<_>>()?;
    let announced: BTreeSet<String> = before
        .iter()
        .filter_map(|e| e["audio_id"].as_str().map(str::to_string))
        .collect();
    for (audio_id, (path, _)) in &sources {
        if !path.exists() {
            ensure!(
                announced.contains(audio_id),
                "{} deleted without an event",
                path.display()
            );
            let name = format!("audio/{audio_id}/audio.wav");
            ensure!(
                env.gcs.object(&env.bucket, &name).await?.is_some(),
                "{name} missing"
            );
        }
    }
    ensure!(
        announced.len() < FILES as usize,
        "the kill came too late to test anything"
    );

    let second = spawn_worker(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "3")])?;
    let pending: BTreeSet<String> = sources
        .keys()
        .filter(|id| !announced.contains(*id))
        .cloned()
        .collect();
    events_for_all(&env, &pending, Duration::from_secs(240)).await?;
    second.signal("-TERM").await?;
    let mut second = second;
    let status = tokio::time::timeout(Duration::from_secs(60), second.child.wait()).await??;
    ensure!(status.success(), "graceful exit: {status}");

    let expected: BTreeMap<String, String> = sources
        .iter()
        .map(|(id, (_, crc))| (id.clone(), crc.clone()))
        .collect();
    one_object_set_each(&env, &expected).await?;
    for (path, _) in sources.values() {
        ensure!(!path.exists(), "{} left behind", path.display());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_within_the_grace_and_unfinished_messages_are_stored_later() -> anyhow::Result<()> {
    let gcs = FakeGcs::start_memory()?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let small = env.spool_file("quick.wav", &sample_wav(2_000));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": small, "id": "quick"}), &[])
        .await?;
    let mut large = BTreeMap::new();
    for index in 0..3 {
        let id = format!("slow-{index}");
        let path = env.spool_path(&format!("{id}.wav"));
        write_wav(&path, 400 * 1024 * 1024, 10 + index)?;
        large.insert(audio_id_for(&id), (path.clone(), crc32c_file(&path)?));
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": path, "id": id}), &[])
            .await?;
    }

    let worker = spawn_worker(
        &env,
        &[
            ("AUDIO_STORE__WORKER__CONCURRENCY", "4"),
            ("AUDIO_STORE__WORKER__SHUTDOWN_GRACE", "1s"),
        ],
    )?;
    let quick = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(60))
        .await?;
    ensure!(quick.len() == 1, "the small message is stored first");
    wait_for("the large uploads in flight", Duration::from_secs(60), || async {
        Ok(worker
            .metric("audio_store_in_flight_messages")
            .await?
            .filter(|n| *n >= 3.0))
    })
    .await?;
    let signalled = tokio::time::Instant::now();
    worker.signal("-TERM").await?;
    let mut worker = worker;
    let status = tokio::time::timeout(Duration::from_secs(30), worker.child.wait()).await??;
    ensure!(status.success(), "exit 0: {status}");
    ensure!(
        signalled.elapsed() < Duration::from_secs(15),
        "exited {:?} after SIGTERM: grace 1 s plus flushing",
        signalled.elapsed()
    );
    ensure!(!small.exists(), "the finished message was acked and cleaned up");
    let unfinished: BTreeSet<String> = large
        .iter()
        .filter(|(_, (path, _))| path.exists())
        .map(|(id, _)| id.clone())
        .collect();
    ensure!(!unfinished.is_empty(), "some uploads were cut short by the grace");

    // The nacked messages come back to the next worker and are stored once.
    let next = spawn_worker(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "4")])?;
    let events = events_for_all(&env, &unfinished, Duration::from_secs(240)).await?;
    ensure!(
        !events.contains_key(&audio_id_for("quick")),
        "the acked message did not come back"
    );
    next.signal("-TERM").await?;
    let mut next = next;
    tokio::time::timeout(Duration::from_secs(60), next.child.wait()).await??;
    let mut expected: BTreeMap<String, String> = large
        .iter()
        .map(|(id, (_, crc))| (id.clone(), crc.clone()))
        .collect();
    expected.insert(audio_id_for("quick"), crc32c_base64(&sample_wav(2_000)));
    one_object_set_each(&env, &expected).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_subscription_and_killing_one_loses_nothing() -> anyhow::Result<()> {
    const MESSAGES: usize = 300;
    let env = TestEnv::new();
    env.create_resources().await?;
    // Both pull before the messages come: the emulator hands a backlog to the
    // first stream that opens, all of it.
    let options = [("AUDIO_STORE__WORKER__CONCURRENCY", "4")];
    let mut a = spawn_worker(&env, &options)?;
    let mut b = spawn_worker(&env, &options)?;
    a.wait_ready(Duration::from_secs(60)).await?;
    b.wait_ready(Duration::from_secs(60)).await?;
    let mut expected = BTreeMap::new();
    let mut paths = Vec::new();
    for index in 0..MESSAGES {
        let id = format!("replica-{index}");
        let bytes = sample_wav(200 + index);
        let path = env.spool_file(&format!("{id}.wav"), &bytes);
        expected.insert(audio_id_for(&id), crc32c_base64(&bytes));
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": path, "id": id}), &[])
            .await?;
        paths.push(path);
    }
    let by_a = wait_for("both replicas working", Duration::from_secs(60), || async {
        let stored_a = a.metric("audio_store_messages_total{outcome=\"stored\"}").await?;
        let stored_b = b.metric("audio_store_messages_total{outcome=\"stored\"}").await?;
        Ok(match (stored_a, stored_b) {
            (Some(x), Some(y)) if x >= 20.0 && y >= 1.0 => Some(x),
            _ => None,
        })
    })
    .await?;
    a.signal("-KILL").await?;
    a.child.wait().await?;

    let ids: BTreeSet<String> = expected.keys().cloned().collect();
    let events = events_for_all(&env, &ids, Duration::from_secs(240)).await?;
    ensure!(events.len() == MESSAGES, "every message has an event");
    let by_b = b
        .metric("audio_store_messages_total{outcome=\"stored\"}")
        .await?
        .unwrap_or(0.0);
    b.signal("-TERM").await?;
    tokio::time::timeout(Duration::from_secs(60), b.child.wait()).await??;
    ensure!(
        by_a > 0.0 && by_b > 0.0,
        "both replicas stored messages: {by_a} and {by_b}"
    );
    one_object_set_each(&env, &expected).await?;
    ensure!(paths.iter().all(|p| !p.exists()), "all sources removed");
    Ok(())
}
