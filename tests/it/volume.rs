//! Volume: many messages at once, and files large enough to be streamed.

use crate::support::{Worker, audio_id_for, event_json, settings};
use crate::worker::{EVENT_TIMEOUT, QUIET_WINDOW};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::media::{sample_png, sample_wav, write_wav};
use testkit::{TestEnv, crc32c_base64, crc32c_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_processed_concurrently_are_all_stored_exactly_once() -> anyhow::Result<()> {
    const MESSAGES: usize = 200;
    let env = TestEnv::new();
    env.create_resources().await?;
    let mut expected = BTreeMap::new();
    let mut sources = Vec::new();
    for index in 0..MESSAGES {
        let id = format!("bulk-{index}");
        let audio = env.spool_file(&format!("bulk-{index}.wav"), &sample_wav(500 + index));
        let mut data = json!({"audio": audio, "id": id});
        if index % 4 == 0 {
            data["thumbnail"] = json!(env.spool_file(&format!("bulk-{index}.png"), &sample_png()));
        }
        sources.push(audio);
        expected.insert(audio_id_for(&id), index % 4 == 0);
        env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    }

    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "8")])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, MESSAGES, Duration::from_secs(180))
        .await?;
    let extra = env
        .pubsub
        .drain_for(&env.stored_subscription, QUIET_WINDOW)
        .await?;
    let summary = worker.stop().await?;
    ensure!(events.len() == MESSAGES, "{} of {MESSAGES} events", events.len());
    ensure!(extra.is_empty(), "{} extra events", extra.len());

    let mut seen = BTreeMap::new();
    for event in &events {
        let json = event_json(event)?;
        let audio_id = json["audio_id"].as_str().context("audio_id")?.to_string();
        ensure!(
            seen.insert(audio_id, !json["thumbnail"].is_null()).is_none(),
            "duplicate event"
        );
    }
    assert_eq!(
        seen, expected,
        "every message once, with its thumbnail where it had one"
    );
    let objects = env.gcs.list(&env.bucket, "").await?;
    assert_eq!(objects.len(), MESSAGES + MESSAGES / 4);
    assert_eq!(summary.stored as usize, MESSAGES, "{summary:?}");
    ensure!(sources.iter().all(|s| !s.exists()), "all sources removed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_are_streamed_through_resumable_uploads_intact() -> anyhow::Result<()> {
    // Both above the single-shot threshold: a local file (one streamed, hashed-as-sent upload)
    // and a staging object (copied as it streams, with the source's CRC32C sent along).
    const LOCAL_LEN: u64 = 24 * 1024 * 1024;
    const STAGED_LEN: u64 = 20 * 1024 * 1024;
    let env = TestEnv::new();
    env.create_resources().await?;
    let local = env.spool_path("big.wav");
    write_wav(&local, LOCAL_LEN, 7)?;
    let local_crc32c = crc32c_file(&local)?;
    let staged_path = env.spool_path("staged-source.bin");
    write_wav(&staged_path, STAGED_LEN, 8)?;
    let staged_bytes = std::fs::read(&staged_path)?;
    std::fs::remove_file(&staged_path)?;
    env.gcs
        .upload(&env.staging_bucket, "big/staged.wav", &staged_bytes)
        .await?;
    let staged = format!("gs://{}/big/staged.wav", env.staging_bucket);

    env.pubsub
        .publish_json(&env.topic, &json!({"audio": local, "id": "big-local"}), &[])
        .await?;
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": staged, "id": "big-staged"}), &[])
        .await?;
    let worker = Worker::start(settings(&env, &[])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 2, Duration::from_secs(180))
        .await?;
    worker.stop().await?;
    ensure!(events.len() == 2, "{} of 2 events", events.len());

    for (id, size, crc32c) in [
        ("big-local", LOCAL_LEN, local_crc32c),
        ("big-staged", STAGED_LEN, crc32c_base64(&staged_bytes)),
    ] {
        let name = format!("audio/{}/audio.wav", audio_id_for(id));
        let stored = env.gcs.object(&env.bucket, &name).await?.context("stored")?;
        assert_eq!(stored.size, size, "{id}");
        assert_eq!(stored.crc32c, crc32c, "{id}: the stored bytes are the source's");
        let event = events
            .iter()
            .map(event_json)
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .find(|e| e["audio_id"] == audio_id_for(id))
            .context("its event")?;
        assert_eq!(event["audio"]["size"], size);
        assert_eq!(event["audio"]["crc32c"], crc32c);
    }
    ensure!(!local.exists(), "local source removed");
    ensure!(
        env.gcs.list(&env.staging_bucket, "").await?.is_empty(),
        "staging source removed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_read_whole_or_streamed_are_stored_intact_and_recognised_when_redelivered() -> anyhow::Result<()>
{
    // Around the size up to which a file is read whole (256 KiB), and one streamed in a
    // single request; each message is delivered twice with its file still in the spool, so
    // the second delivery meets the first one's object (412) and compares checksums.
    const LIMIT: u64 = audio_store::source::IN_MEMORY_LIMIT;
    let env = TestEnv::new();
    env.create_resources().await?;
    let sizes = [LIMIT, LIMIT + 1, 3 * 1024 * 1024];
    let mut sources = Vec::new();
    for (index, len) in sizes.iter().enumerate() {
        let path = env.spool_path(&format!("size-{index}.wav"));
        write_wav(&path, *len, index as u64 + 11)?;
        sources.push((format!("size-{index}"), path.clone(), std::fs::read(&path)?));
    }
    let worker = Worker::start(settings(&env, &[])?);
    let mut generations = BTreeMap::new();
    for round in 0..2 {
        for (id, path, bytes) in &sources {
            std::fs::write(path, bytes)?;
            env.pubsub
                .publish_json(&env.topic, &json!({"audio": path, "id": id}), &[])
                .await?;
        }
        let events = env
            .pubsub
            .collect(&env.stored_subscription, sources.len(), EVENT_TIMEOUT)
            .await?;
        ensure!(
            events.len() == sources.len(),
            "round {round}: {} of {} events",
            events.len(),
            sources.len()
        );
        for event in events.iter().map(event_json) {
            let event = event?;
            let previous = generations.insert(
                event["audio_id"].to_string(),
                event["audio"]["generation"].clone(),
            );
            ensure!(
                round == 0 || previous.as_ref() == Some(&event["audio"]["generation"]),
                "rewritten on redelivery: {event}"
            );
        }
    }
    let summary = worker.stop().await?;
    assert_eq!((summary.stored, summary.already_stored), (3, 3), "{summary:?}");
    for (id, path, bytes) in &sources {
        let name = format!("audio/{}/audio.wav", audio_id_for(id));
        let stored = env.gcs.object(&env.bucket, &name).await?.context("stored")?;
        assert_eq!(stored.size, bytes.len() as u64, "{id}");
        assert_eq!(stored.crc32c, crc32c_base64(bytes), "{id}");
        ensure!(!path.exists(), "{id}: source removed");
    }
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 3);
    Ok(())
}
