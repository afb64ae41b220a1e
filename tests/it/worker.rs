//! The worker end to end, driven in-process against the real emulators.

use crate::support::{Worker, audio_id_for, event_json, event_strings, settings};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use testkit::media::{PNG_SIZE, WAV_SAMPLE_RATE, sample_png, sample_wav};
use testkit::{TestEnv, crc32c_base64};

pub(crate) const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to watch for an unwanted second event or redelivery.
pub(crate) const QUIET_WINDOW: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_is_stored_with_its_metadata_the_event_is_published_and_the_sources_are_removed()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    // One second of audio.
    let audio_bytes = sample_wav(WAV_SAMPLE_RATE as usize);
    let cover_bytes = sample_png();
    let audio = env.spool_file("night-drive.wav", &audio_bytes);
    let cover = env.spool_file("cover.png", &cover_bytes);
    let message_id = env
        .pubsub
        .publish_json(
            &env.topic,
            &json!({
                "audio": audio, "thumbnail": cover, "id": "track-7f3c",
                "metadata": {"user_id": "u123", "title": "Night Drive"}, "ignored": [1, 2]
            }),
            &[],
        )
        .await?;

    let worker = Worker::start(settings(&env, &[])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    ensure!(events.len() == 1, "expected one event, got {}", events.len());
    let event = event_json(&events[0])?;

    // The input was acked: once the worker has flushed its acks and stopped, releasing
    // every lease on the subscription makes nothing deliverable again.
    let summary = worker.stop().await?;
    env.pubsub.release_leases(&env.subscription).await?;
    let unacked = env.pubsub.drain_for(&env.subscription, QUIET_WINDOW).await?;
    ensure!(unacked.is_empty(), "the input was not acked: {unacked:?}");
    ensure!(
        summary.stored == 1 && summary.already_stored == 0 && summary.nacked == 0,
        "{summary:?}"
    );

    let audio_id = audio_id_for("track-7f3c");
    assert_eq!(event["audio_id"], audio_id);
    let audio_name = format!("audio/{audio_id}/audio.wav");
    let cover_name = format!("audio/{audio_id}/thumbnail.png");
    let objects = env.gcs.list(&env.bucket, "").await?;
    let names: BTreeSet<&str> = objects.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from([audio_name.as_str(), cover_name.as_str()]));

    let audio_media = json!({"container": "wav", "codec": "pcm_s16le", "sample_rate": WAV_SAMPLE_RATE,
        "channels": 1, "bits_per_sample": 16, "duration_ms": 1_000,
        "bitrate": audio_bytes.len() * 8});
    let (width, height) = PNG_SIZE;
    let cover_media = json!({"format": "png", "width": width, "height": height});
    for (field, name, bytes, content_type, source, media, technical) in [
        (
            "audio",
            &audio_name,
            &audio_bytes,
            "audio/wav",
            &audio,
            &audio_media,
            vec![
                ("codec", "pcm_s16le".to_string()),
                ("sample-rate", WAV_SAMPLE_RATE.to_string()),
                ("channels", "1".to_string()),
                ("duration-ms", "1000".to_string()),
            ],
        ),
        (
            "thumbnail",
            &cover_name,
            &cover_bytes,
            "image/png",
            &cover,
            &cover_media,
            vec![("width", width.to_string()), ("height", height.to_string())],
        ),
    ] {
        let stored = env
            .gcs
            .object(&env.bucket, name)
            .await?
            .context("object exists")?;
        assert_eq!(
            &env.gcs.download(&env.bucket, name).await?,
            bytes,
            "{name} holds the source bytes"
        );
        let mut expected_metadata = BTreeMap::from([
            ("audio-id".to_string(), audio_id.clone()),
            ("kind".to_string(), field.to_string()),
            ("source-uri".to_string(), format!("file://{}", source.display())),
            ("source-message-id".to_string(), message_id.clone()),
            ("user_id".to_string(), "u123".to_string()),
            ("title".to_string(), "Night Drive".to_string()),
        ]);
        expected_metadata.extend(technical.into_iter().map(|(key, value)| (key.to_string(), value)));
        assert_eq!(stored.metadata, expected_metadata, "{name} metadata");
        assert_eq!(&event[field]["media"], media, "{name} media");

        let described = &event[field];
        assert_eq!(described["uri"], format!("gs://{}/{name}", env.bucket));
        assert_eq!(described["bucket"], env.bucket);
        assert_eq!(described["name"], name.as_str());
        assert_eq!(described["size"], bytes.len());
        assert_eq!(described["content_type"], content_type, "the probed type");
        assert_eq!(described["crc32c"], crc32c_base64(bytes));
        assert_eq!(described["crc32c"], stored.crc32c);
        assert_eq!(described["generation"], stored.generation);
        if let Some(md5) = &stored.md5 {
            assert_eq!(described["md5"], md5.as_str());
        }
        ensure!(!source.exists(), "{} was not removed", source.display());
    }
    assert_eq!(
        event["source"],
        json!({"message_id": message_id, "audio": audio, "thumbnail": cover})
    );
    assert_eq!(
        event["metadata"],
        json!({"user_id": "u123", "title": "Night Drive"})
    );
    let stored_at = event["stored_at"].as_str().context("stored_at")?;
    ensure!(
        stored_at.ends_with('Z') && stored_at.len() == 24,
        "stored_at {stored_at}"
    );
    stored_at.parse::<jiff::Timestamp>()?;
    let keys: BTreeSet<&str> = event
        .as_object()
        .context("object")?
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "audio_id",
            "audio",
            "thumbnail",
            "source",
            "metadata",
            "stored_at"
        ])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_thumbnail_gives_a_null_thumbnail_and_one_object() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("solo.wav", &sample_wav(4_000));
    let message_id = env
        .pubsub
        .publish_json(&env.topic, &json!({"audio": audio}), &[])
        .await?;

    let worker = Worker::start(settings(&env, &[])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    worker.stop().await?;
    ensure!(events.len() == 1, "expected one event, got {}", events.len());
    let event = event_json(&events[0])?;

    assert_eq!(event["thumbnail"], serde_json::Value::Null);
    assert_eq!(event["source"]["thumbnail"], serde_json::Value::Null);
    assert_eq!(event["metadata"], json!({}));
    // Without an `id`, the Pub/Sub message id is the identity.
    let audio_id =
        audio_store::identity::AudioId::from_key(audio_store::identity::IdentityKey::MessageId(&message_id));
    assert_eq!(event["audio_id"], audio_id.to_string());
    let objects = env.gcs.list(&env.bucket, "").await?;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0].name, format!("audio/{audio_id}/audio.wav"));
    ensure!(!audio.exists(), "the source was not removed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_source_is_copied_into_the_archive_and_removed_from_staging() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio_bytes = sample_wav(6_000);
    let cover_bytes = sample_png();
    env.gcs
        .upload(&env.staging_bucket, "7f3c/take.WAV", &audio_bytes)
        .await?;
    env.gcs
        .upload(&env.staging_bucket, "7f3c/cover", &cover_bytes)
        .await?;
    let audio = format!("gs://{}/7f3c/take.WAV", env.staging_bucket);
    let cover = format!("gs://{}/7f3c/cover", env.staging_bucket);
    env.pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": audio, "thumbnail": cover, "id": "staged-1"}),
            &[],
        )
        .await?;

    let worker = Worker::start(settings(&env, &[])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    worker.stop().await?;
    ensure!(events.len() == 1, "expected one event, got {}", events.len());
    let event = event_json(&events[0])?;

    let audio_id = audio_id_for("staged-1");
    // The extension is the canonical one of the probed content, whatever the source's name.
    let audio_name = format!("audio/{audio_id}/audio.wav");
    let cover_name = format!("audio/{audio_id}/thumbnail.png");
    assert_eq!(env.gcs.download(&env.bucket, &audio_name).await?, audio_bytes);
    assert_eq!(env.gcs.download(&env.bucket, &cover_name).await?, cover_bytes);
    assert_eq!(event["audio"]["name"], audio_name);
    assert_eq!(event["thumbnail"]["content_type"], "image/png");
    let stored = env
        .gcs
        .object(&env.bucket, &audio_name)
        .await?
        .context("stored")?;
    assert_eq!(stored.metadata.get("source-uri"), Some(&audio));
    let staging_left = env.gcs.list(&env.staging_bucket, "").await?;
    ensure!(
        staging_left.is_empty(),
        "staging objects were not removed: {staging_left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_published_twice_yields_one_audio_id_and_one_object_set() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio_bytes = sample_wav(5_000);
    let audio = env.spool_file("twice.wav", &audio_bytes);
    let cover = env.spool_file("twice.png", &sample_png());
    let data = json!({"audio": audio, "thumbnail": cover, "id": "same-id"});
    // Both are waiting when the worker starts, so they are processed concurrently.
    let first = env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let second = env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    ensure!(first != second, "two distinct Pub/Sub messages");

    let worker = Worker::start(settings(&env, &[])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 2, EVENT_TIMEOUT)
        .await?;
    let extra = env
        .pubsub
        .drain_for(&env.stored_subscription, QUIET_WINDOW)
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        events.len() == 2 && extra.is_empty(),
        "{} events, then {} more",
        events.len(),
        extra.len()
    );

    let audio_ids: BTreeSet<String> = event_strings(&events, "/audio_id")?.into_iter().collect();
    assert_eq!(audio_ids, BTreeSet::from([audio_id_for("same-id")]));
    let generations: BTreeSet<String> = event_strings(&events, "/audio/generation")?.into_iter().collect();
    assert_eq!(
        generations.len(),
        1,
        "both events describe the same object generation"
    );
    let objects = env.gcs.list(&env.bucket, "").await?;
    assert_eq!(objects.len(), 2, "one object set: {objects:?}");
    let thumbnails: BTreeSet<String> = event_strings(&events, "/thumbnail/generation")?
        .into_iter()
        .collect();
    assert_eq!(
        thumbnails.len(),
        1,
        "both events describe the same thumbnail generation"
    );
    // Each delivery may have won the race for one of the two objects; neither wrote a second copy.
    assert_eq!(summary.stored + summary.already_stored, 2, "{summary:?}");
    ensure!(!audio.exists() && !cover.exists(), "sources removed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_and_the_worker_keeps_going() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    let bad = env
        .pubsub
        .publish(&env.topic, b"{not json", &[("trace", "t-1")])
        .await?;
    let audio = env.spool_file("after.wav", &sample_wav(2_000));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": audio}), &[])
        .await?;

    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, 1, EVENT_TIMEOUT)
        .await?;
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        dead.len() == 1 && events.len() == 1,
        "{} dead letters, {} events",
        dead.len(),
        events.len()
    );
    assert_eq!(dead[0].data, b"{not json");
    assert_eq!(dead[0].attribute("error_kind"), Some("invalid_json"));
    assert_eq!(dead[0].attribute("original_message_id"), Some(bad.as_str()));
    assert_eq!(
        dead[0].attribute("trace"),
        Some("t-1"),
        "original attributes are kept"
    );
    ensure!(
        dead[0].attribute("error").is_some_and(|e| !e.contains('\n')),
        "one-line error"
    );
    assert_eq!((summary.stored, summary.dead_lettered), (1, 1), "{summary:?}");
    Ok(())
}

/// The stored event as a CloudEvents consumer reads it: its `ce-*` and
/// `content-type` attributes as the binary-mode headers of the HTTP binding,
/// which has the same names, parsed by the CloudEvents SDK.
fn as_cloudevent(event: &testkit::Received) -> anyhow::Result<cloudevents::Event> {
    let mut headers = http::HeaderMap::new();
    for (key, value) in &event.attributes {
        if key.starts_with("ce-") || key == "content-type" {
            headers.insert(
                http::HeaderName::from_bytes(key.as_bytes())?,
                http::HeaderValue::from_str(value)?,
            );
        }
    }
    Ok(cloudevents::binding::http::to_event(
        &headers,
        event.data.clone(),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_event_is_a_cloudevent_with_one_id_for_all_its_repetitions() -> anyhow::Result<()> {
    use cloudevents::AttributesReader as _;
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("ce.wav", &sample_wav(2_000));
    let data = json!({"audio": audio, "id": "ce"});
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let worker = Worker::start(settings(&env, &[])?);
    let mut events = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    // The same logical message again once the source is gone: recognised as
    // stored, and its event published again.
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    events.extend(
        env.pubsub
            .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
            .await?,
    );
    worker.stop().await?;
    ensure!(events.len() == 2, "{} events", events.len());

    let mut ids = BTreeSet::new();
    for event in &events {
        let parsed = as_cloudevent(event).with_context(|| format!("{:?}", event.attributes))?;
        let json = event_json(event)?;
        assert_eq!(parsed.specversion(), cloudevents::event::SpecVersion::V10);
        assert_eq!(
            parsed.source(),
            &format!(
                "//audio-store/projects/{}/subscriptions/{}",
                testkit::PROJECT,
                env.subscription
            )
        );
        assert_eq!(parsed.ty(), "audio.stored");
        assert_eq!(parsed.subject(), Some(audio_id_for("ce").as_str()));
        assert_eq!(parsed.datacontenttype(), Some("application/json"));
        ensure!(parsed.time().is_some(), "ce-time parses as a time");
        assert_eq!(
            event.attributes["ce-time"],
            json["stored_at"].as_str().unwrap_or_default()
        );
        // The HTTP binding hands the body over as bytes; it is the event's JSON.
        let data: serde_json::Value = match parsed.data() {
            Some(cloudevents::Data::Json(data)) => data.clone(),
            Some(cloudevents::Data::Binary(bytes)) => serde_json::from_slice(bytes)?,
            other => anyhow::bail!("the data is not the event's JSON: {other:?}"),
        };
        assert_eq!(data, json);
        // The attributes from before CloudEvents stay.
        assert_eq!(event.attributes["audio_id"], audio_id_for("ce"));
        assert_eq!(event.attributes["event_type"], "audio.stored");
        ids.insert(parsed.id().to_string());
    }
    assert_eq!(ids.len(), 1, "one ce-id for one logical event: {ids:?}");
    Ok(())
}
