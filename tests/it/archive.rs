//! How the archive is organised: names from producer metadata (`{meta.KEY}`)
//! and the storage class of what is written.

use crate::replay::{dead_letter, replay};
use crate::support::{Worker, audio_id_for, next_event, settings};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::TestEnv;
use testkit::media::{sample_png, sample_wav};

const TIMEOUT: Duration = Duration::from_secs(60);
const BY_USER: &str = "users/{meta.user_id}/{yyyy}/{audio_id}/{kind}{ext}";

/// The `{yyyy}` of a message published now.
fn this_year() -> i16 {
    jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).year()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_by_user_stores_under_the_users_prefix_and_recognises_a_redelivery_there()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__STORAGE__LAYOUT", BY_USER)])?);
    let audio = env.spool_file("take", &sample_wav(1_200));
    let cover = env.spool_file("cover", &sample_png());
    let data = json!({"audio": audio, "thumbnail": cover, "id": "by-user", "metadata": {"user_id": "u123"}});
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let first = next_event(&env).await?;
    ensure!(!audio.exists(), "stored and cleaned up");
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let second = next_event(&env).await?;
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, Duration::from_secs(1))
        .await?;
    let summary = worker.stop().await?;
    ensure!(dead.is_empty(), "recognised after cleanup: {dead:?}");
    let year = this_year();
    let prefix = format!("users/u123/{year}/{}", audio_id_for("by-user"));
    let names = env.gcs.names(&env.bucket, "").await?;
    assert_eq!(
        names,
        [format!("{prefix}/audio.wav"), format!("{prefix}/thumbnail.png")]
    );
    assert_eq!(second["audio"], first["audio"]);
    assert_eq!(second["thumbnail"], first["thumbnail"]);
    assert_eq!((summary.stored, summary.already_stored), (1, 1), "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_value_that_cannot_be_a_name_segment_is_an_invalid_message_and_nothing_moves()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let long = "u".repeat(129);
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("missing", None),
        ("empty", Some("")),
        ("too-long", Some(long.as_str())),
        ("slash", Some("u1/../u2")),
        ("control", Some("u1\nu2")),
        ("dot", Some(".")),
        ("dotdot", Some("..")),
    ];
    let mut sources = Vec::new();
    for (case, value) in &cases {
        let audio = env.spool_file(&format!("{case}.wav"), &sample_wav(900));
        let metadata: BTreeMap<&str, &str> = value.map(|v| ("user_id", v)).into_iter().collect();
        env.pubsub
            .publish_json(
                &env.topic,
                &json!({"audio": audio, "id": case, "metadata": metadata}),
                &[("case", case)],
            )
            .await?;
        sources.push(audio);
    }
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__STORAGE__LAYOUT", BY_USER)])?);
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, cases.len(), TIMEOUT)
        .await?;
    worker.stop().await?;
    ensure!(
        dead.len() == cases.len(),
        "{} of {} dead-lettered",
        dead.len(),
        cases.len()
    );
    for message in &dead {
        let case = message.attribute("case").context("case")?;
        assert_eq!(message.attribute("error_kind"), Some("invalid_message"), "{case}");
        let error = message.attribute("error").context("error")?;
        ensure!(
            error.contains("metadata.user_id") && error.contains("{meta.user_id}"),
            "{case}: {error}"
        );
    }
    assert!(
        env.gcs.list(&env.bucket, "").await?.is_empty(),
        "nothing uploaded"
    );
    for source in &sources {
        ensure!(source.exists(), "{} kept", source.display());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_would_make_a_name_over_1024_bytes_is_an_invalid_message_and_nothing_moves()
-> anyhow::Result<()> {
    // fake-gcs takes any name; Cloud Storage refuses one over 1,024 bytes.
    let env = TestEnv::new();
    env.create_resources().await?;
    let layout = format!("{}/{{audio_id}}/{{kind}}{{ext}}", "{meta.part}".repeat(8));
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__STORAGE__LAYOUT", &layout)])?);
    let audio = env.spool_file("long-name.wav", &sample_wav(900));
    let metadata = json!({"part": "p".repeat(128)});
    let data = json!({"audio": audio, "id": "long-name", "metadata": metadata});
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, 1, TIMEOUT)
        .await?;
    worker.stop().await?;
    let message = dead.first().context("dead-lettered")?;
    assert_eq!(message.attribute("error_kind"), Some("invalid_message"));
    let error = message.attribute("error").context("error")?;
    ensure!(
        error.contains("metadata.part makes object names longer than 1,024 bytes"),
        "{error}"
    );
    assert!(
        env.gcs.list(&env.bucket, "").await?.is_empty(),
        "nothing uploaded"
    );
    ensure!(audio.exists(), "the source is kept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_storage_class_is_the_class_of_uploads_is_asked_of_copies_and_the_event_reports_the_servers()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("cold.wav", &sample_wav(1_000));
    env.gcs
        .upload(&env.staging_bucket, "incoming/cover.png", &sample_png())
        .await?;
    let cover = format!("gs://{}/incoming/cover.png", env.staging_bucket);
    // Through the recording proxy, to see what the server-side copy asks for.
    let proxy = testkit::FaultProxy::start(&env.gcs_endpoint)?;
    proxy.record("/rewriteTo/");
    let worker = Worker::start(settings(
        &env,
        &[
            ("AUDIO_STORE__STORAGE__STORAGE_CLASS", "NEARLINE"),
            ("STORAGE_EMULATOR_HOST", &proxy.endpoint()),
        ],
    )?);
    env.pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": audio, "thumbnail": cover, "id": "cold"}),
            &[],
        )
        .await?;
    let event = next_event(&env).await?;
    worker.stop().await?;
    let env = &env;
    let class_of = |field: &str| {
        let name = event[field]["name"].as_str().map(str::to_string);
        async move {
            let name = name.context("name")?;
            let object = env.gcs.object(&env.bucket, &name).await?.context("stored")?;
            anyhow::Ok(object.storage_class)
        }
    };
    assert_eq!(
        class_of("audio").await?.as_deref(),
        Some("NEARLINE"),
        "the uploaded object"
    );
    assert_eq!(event["audio"]["storage_class"], "NEARLINE", "as the event says");
    // fake-gcs 1.54 ignores the storage class of a rewrite's destination (real GCS applies
    // it), so for the server-side copy only the event's honesty can be checked here: it
    // reports the class the server gave the object.
    let rewrites = proxy.take_recorded();
    ensure!(
        rewrites.len() == 1 && rewrites[0].body["storageClass"] == "NEARLINE",
        "the copy asks for the class: {rewrites:?}"
    );
    let copied = class_of("thumbnail").await?.context("a storage class")?;
    assert_eq!(
        event["thumbnail"]["storage_class"],
        copied.as_str(),
        "the copy's class as the server reports it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_replayed_after_its_file_is_restored_is_stored_under_the_users_prefix() -> anyhow::Result<()>
{
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__STORAGE__LAYOUT", BY_USER)])?);
    let data = json!({
        "audio": env.spool_path("late.wav"),
        "id": "replayed-by-user",
        "metadata": {"user_id": "u123"},
    });
    dead_letter(&env, &worker, &[data]).await?;

    env.spool_file("late.wav", &sample_wav(1_500));
    let (code, stdout, stderr) = replay(&env, &[]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    ensure!(stdout.contains("moved 1, skipped 0, failed 0"), "{stdout}");
    let event = next_event(&env).await?;
    let summary = worker.stop().await?;
    // The metadata travelled with the dead letter and back: the same name as a first delivery.
    let year = this_year();
    let name = format!("users/u123/{year}/{}/audio.wav", audio_id_for("replayed-by-user"));
    let names = env.gcs.names(&env.bucket, "").await?;
    assert_eq!(event["audio"]["name"], name.as_str());
    assert_eq!(names, [name]);
    assert_eq!(event["metadata"]["user_id"], "u123");
    assert_eq!((summary.stored, summary.dead_lettered), (1, 1), "{summary:?}");
    Ok(())
}
