//! Failure handling: bad input, unsafe sources, and what happens to them.

use crate::support::{Worker, event_json, settings};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use testkit::TestEnv;
use testkit::media::{sample_png, sample_wav};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_message_is_dead_lettered_with_its_kind_and_nothing_is_deleted_or_leaked()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let spool = env.spool.path().to_path_buf();
    let outside = tempfile::tempdir()?;
    let secret = outside.path().join("secret.wav");
    std::fs::write(&secret, sample_wav(1_000))?;
    std::os::unix::fs::symlink(&secret, spool.join("link-out.wav"))?;
    let escape = spool
        .join("..")
        .join(outside.path().file_name().context("name")?)
        .join("secret.wav");
    let empty = env.spool_file("empty.wav", b"");
    let text = env.spool_file(
        "notes.mp3",
        b"these are liner notes, not an mp3\n".repeat(20).as_slice(),
    );
    let good_audio = env.spool_file("fine.wav", &sample_wav(2_000));
    let wav_as_cover = env.spool_file("cover.wav", &sample_wav(500));
    std::fs::create_dir(spool.join("folder.wav"))?;
    let fifo = spool.join("pipe.wav");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )?;
    // Local paths that can never be opened: each is permanent, not retried.
    let socket = spool.join("socket.wav");
    let _listener = std::os::unix::net::UnixListener::bind(&socket)?;
    std::os::unix::fs::symlink(spool.join("loop-b.wav"), spool.join("loop-a.wav"))?;
    std::os::unix::fs::symlink(spool.join("loop-a.wav"), spool.join("loop-b.wav"))?;
    let too_long = spool.join(format!("{}.wav", "n".repeat(300)));
    let under_a_file = good_audio.join("inner.wav");
    let newline_uri = format!("file://{}/fine%0A.wav", spool.display());
    // A long path (source-uri) and large metadata fit alone, but not together in 8 KiB.
    let deep = (0..10).fold(spool.clone(), |path, level| {
        path.join(format!("{level} {}", "a b ".repeat(50)))
    });
    std::fs::create_dir_all(&deep)?;
    let deep_audio = deep.join("deep.wav");
    std::fs::write(&deep_audio, sample_wav(800))?;
    let large_metadata: serde_json::Map<String, serde_json::Value> = (0..10)
        .map(|i| (format!("note-{i}"), json!("x".repeat(590))))
        .collect();
    let huge_metadata: serde_json::Map<String, serde_json::Value> = (0..5_000)
        .map(|i| (format!("key-{i}"), json!("v".repeat(20))))
        .collect();
    let mut garbage = vec![0_u8; 1024 * 1024];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for byte in &mut garbage {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = (state >> 24) as u8;
    }

    let path = |p: &PathBuf| p.display().to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("invalid-json", b"{\"audio\": ".to_vec(), "invalid_json"),
        ("garbage-1mib", garbage, "invalid_json"),
        ("json-array", b"[\"/a.wav\"]".to_vec(), "invalid_message"),
        (
            "missing-audio",
            json!({"thumbnail": path(&good_audio)}).to_string().into_bytes(),
            "invalid_message",
        ),
        (
            "audio-not-string",
            json!({"audio": 42}).to_string().into_bytes(),
            "invalid_message",
        ),
        (
            "huge-metadata",
            json!({"audio": path(&good_audio), "metadata": huge_metadata})
                .to_string()
                .into_bytes(),
            "invalid_message",
        ),
        (
            "relative-path",
            json!({"audio": "relative/track.wav"}).to_string().into_bytes(),
            "unsupported_source",
        ),
        (
            "http-source",
            json!({"audio": "http://example.com/a.wav"})
                .to_string()
                .into_bytes(),
            "unsupported_source",
        ),
        (
            "directory",
            json!({"audio": path(&spool.join("folder.wav"))})
                .to_string()
                .into_bytes(),
            "unsupported_source",
        ),
        (
            "fifo",
            json!({"audio": path(&fifo)}).to_string().into_bytes(),
            "unsupported_source",
        ),
        (
            "dotdot-escape",
            json!({"audio": path(&escape)}).to_string().into_bytes(),
            "source_not_allowed",
        ),
        (
            "symlink-out",
            json!({"audio": path(&spool.join("link-out.wav"))})
                .to_string()
                .into_bytes(),
            "source_not_allowed",
        ),
        (
            "etc-passwd",
            json!({"audio": "/etc/passwd"}).to_string().into_bytes(),
            "source_not_allowed",
        ),
        (
            "foreign-bucket",
            json!({"audio": "gs://someone-elses-bucket/a.wav"})
                .to_string()
                .into_bytes(),
            "source_not_allowed",
        ),
        (
            "missing-file",
            json!({"audio": path(&spool.join("never-written.wav"))})
                .to_string()
                .into_bytes(),
            "source_missing",
        ),
        (
            "name-too-long",
            json!({"audio": path(&too_long)}).to_string().into_bytes(),
            "unsupported_source",
        ),
        (
            "symlink-loop",
            json!({"audio": path(&spool.join("loop-a.wav"))})
                .to_string()
                .into_bytes(),
            "unsupported_source",
        ),
        (
            "file-as-directory",
            json!({"audio": path(&under_a_file)}).to_string().into_bytes(),
            "unsupported_source",
        ),
        (
            "unix-socket",
            json!({"audio": path(&socket)}).to_string().into_bytes(),
            "unsupported_source",
        ),
        (
            "encoded-newline",
            json!({"audio": newline_uri}).to_string().into_bytes(),
            "unsupported_source",
        ),
        (
            "reserved-key-lookalike",
            json!({"audio": path(&good_audio), "metadata": {"Source-URI\u{200B}": "forged"}})
                .to_string()
                .into_bytes(),
            "invalid_message",
        ),
        (
            "metadata-over-8-kib-with-source-uri",
            json!({"audio": path(&deep_audio), "metadata": large_metadata})
                .to_string()
                .into_bytes(),
            "invalid_message",
        ),
        (
            "zero-bytes",
            json!({"audio": path(&empty)}).to_string().into_bytes(),
            "bad_content",
        ),
        (
            "text-as-mp3",
            json!({"audio": path(&text)}).to_string().into_bytes(),
            "bad_content",
        ),
        (
            "thumbnail-not-image",
            json!({"audio": path(&good_audio), "thumbnail": path(&wav_as_cover)})
                .to_string()
                .into_bytes(),
            "bad_content",
        ),
    ];
    let worker = Worker::start(settings(&env, &[])?);
    for (case, data, _) in &cases {
        env.pubsub.publish(&env.topic, data, &[("case", case)]).await?;
    }
    let good_cover = env.spool_file("good-cover.png", &sample_png());
    let good = env.spool_file("good.wav", &sample_wav(3_000));
    env.pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": good, "thumbnail": good_cover}),
            &[("case", "good")],
        )
        .await?;

    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(60))
        .await?;
    let dead = env
        .pubsub
        .collect(
            &env.dead_letter_subscription,
            cases.len(),
            Duration::from_secs(60),
        )
        .await?;
    let summary = worker.stop().await?;
    ensure!(events.len() == 1, "the good message after the bad ones is stored");
    assert_eq!(event_json(&events[0])?["source"]["audio"], path(&good));

    let kinds: BTreeMap<String, String> = dead
        .iter()
        .map(|m| {
            let case = m.attribute("case").context("case attribute kept")?.to_string();
            let kind = m.attribute("error_kind").context("error_kind")?.to_string();
            ensure!(
                m.attribute("error")
                    .is_some_and(|e| !e.is_empty() && !e.contains('\n')),
                "{case}: error line"
            );
            ensure!(
                m.attribute("original_message_id").is_some(),
                "{case}: original_message_id"
            );
            Ok((case, kind))
        })
        .collect::<anyhow::Result<_>>()?;
    let expected: BTreeMap<String, String> = cases
        .iter()
        .map(|(case, _, kind)| (case.to_string(), kind.to_string()))
        .collect();
    assert_eq!(kinds, expected);
    assert_eq!(summary.dead_lettered as usize, cases.len(), "{summary:?}");
    assert_eq!(summary.stored, 1, "{summary:?}");

    for kept in [
        &secret,
        &empty,
        &text,
        &good_audio,
        &wav_as_cover,
        &spool.join("link-out.wav"),
        &deep_audio,
    ] {
        ensure!(kept.exists(), "{} was deleted", kept.display());
    }
    ensure!(
        spool.join("folder.wav").is_dir() && fifo.exists(),
        "directory and fifo untouched"
    );
    let objects = env.gcs.list(&env.bucket, "").await?;
    assert_eq!(objects.len(), 2, "only the good message's objects: {objects:?}");
    ensure!(
        !good.exists() && !good_cover.exists(),
        "the good message's sources are removed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_topic_a_bad_message_is_nacked_not_lost() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources_with(Default::default()).await?;
    let worker = Worker::start(settings(
        &env,
        &[
            ("AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", ""),
            ("AUDIO_STORE__PUBSUB__DEAD_LETTER_SUBSCRIPTION", ""),
        ],
    )?);
    env.pubsub.publish(&env.topic, b"not json", &[]).await?;
    let audio = env.spool_file("ok.wav", &sample_wav(1_000));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": audio}), &[])
        .await?;
    // The bad message keeps coming back (nacked each time) while good ones still flow.
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(60))
        .await?;
    let summary = worker.stop().await?;
    ensure!(events.len() == 1, "the good message is stored");
    ensure!(summary.nacked >= 1 && summary.dead_lettered == 0, "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_longer_than_1024_bytes_is_cut_to_fit_the_dead_letter_attribute() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let worker = Worker::start(settings(&env, &[])?);
    // A missing source under a long path of three-byte characters: its error is
    // under 500 characters but over 1,024 bytes.
    let component = "音".repeat(80);
    let missing = env.spool_path(&format!(
        "{component}/{component}/{component}/{component}/{component}/gone.wav"
    ));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": missing}), &[])
        .await?;
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, 1, Duration::from_secs(60))
        .await?;
    worker.stop().await?;
    let error = dead[0].attribute("error").context("the error attribute")?;
    ensure!(
        (1_000..=1_024).contains(&error.len()),
        "as much of the error as fits 1,024 bytes, got {} bytes",
        error.len()
    );
    ensure!(
        error.ends_with('…') && error.contains(&component),
        "cut at a character boundary: {error}"
    );
    assert_eq!(dead[0].attribute("error_kind"), Some("source_missing"));
    Ok(())
}
