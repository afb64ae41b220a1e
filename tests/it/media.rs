//! Media through the worker: real encodings (tests/fixtures/media, made by
//! scripts/make-media-fixtures with ffmpeg) are stored with what ffprobe
//! says of them in the event's `media` and in the objects' metadata; what is
//! not playable audio or a usable image is dead-lettered `bad_content` with a
//! reason, nothing uploaded and nothing deleted. Names never matter: every
//! file goes into the spool under a name that says nothing of its content.

use crate::support::{Worker, event_json, settings};
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use testkit::media::{self, Fixture, fixtures_dir, manifest};
use testkit::{TestEnv, crc32c_base64};

const TIMEOUT: Duration = Duration::from_secs(120);

/// What a good fixture must be stored as, by its own extension: the canonical
/// extension, the content type, and the container (audio) or format (image)
/// that the event's `media` reports.
fn stored_as(name: &str) -> (&'static str, &'static str, &'static str) {
    match name.rsplit('.').next().unwrap_or_default() {
        "wav" => (".wav", "audio/wav", "wav"),
        "aiff" => (".aiff", "audio/aiff", "aiff"),
        "flac" => (".flac", "audio/flac", "flac"),
        "mp3" => (".mp3", "audio/mpeg", "mp3"),
        "ogg" => (".ogg", "audio/ogg", "ogg"),
        "opus" => (".opus", "audio/opus", "ogg"),
        "m4a" => (".m4a", "audio/mp4", "mp4"),
        "aac" => (".aac", "audio/aac", "aac"),
        "jpg" => (".jpg", "image/jpeg", "jpeg"),
        "png" => (".png", "image/png", "png"),
        "webp" => (".webp", "image/webp", "webp"),
        other => panic!("no canonical extension for {other}"),
    }
}

fn check_media(expected: &Fixture, described: &serde_json::Value) -> anyhow::Result<()> {
    let media = &described["media"];
    let name = &expected.name;
    let (extension, content_type, container) = stored_as(name);
    ensure!(
        described["name"].as_str().is_some_and(|n| n.ends_with(extension)),
        "{name}: stored as {}",
        described["name"]
    );
    assert_eq!(described["content_type"], content_type, "{name}: {described}");
    let field = if expected.kind == "image" {
        "format"
    } else {
        "container"
    };
    assert_eq!(media[field], container, "{name}: {media}");
    if expected.kind == "image" {
        assert_eq!(media["width"].to_string(), expected.width, "{name}: {media}");
        assert_eq!(media["height"].to_string(), expected.height, "{name}: {media}");
        return Ok(());
    }
    assert_eq!(
        media["sample_rate"].to_string(),
        expected.sample_rate,
        "{name}: {media}"
    );
    assert_eq!(
        media["channels"].to_string(),
        expected.channels,
        "{name}: {media}"
    );
    assert_eq!(media["codec"], expected.codec.as_str(), "{name}: {media}");
    let want = expected.duration_ms.context("ffprobe's duration")?;
    let got = media["duration_ms"]
        .as_f64()
        .with_context(|| format!("{name}: no duration_ms in {media}"))?;
    ensure!(
        (got - want).abs() <= (want * 0.02).max(80.0),
        "{name}: duration {got} ms, ffprobe says {want} ms"
    );
    let estimated = ["mp3-cbr-bare.mp3", "mp3-leading-junk.mp3", "adts.aac"].contains(&name.as_str());
    assert_eq!(
        media["duration_estimated"].as_bool().unwrap_or(false),
        estimated,
        "{name}: {media}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_real_encoding_is_stored_with_what_ffprobe_says_of_it_local_or_staged() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let expected = manifest()?;
    let audio_fill = media::fixture("wav-16bit.wav");
    let image_fill = media::fixture("png.png");
    let staged = [
        "m4a-moov-last.m4a",
        "flac-24bit.flac",
        "mp3-id3v2.mp3",
        "opus.opus",
        "adts.aac",
        "webp-lossy.webp",
    ];
    let mut published = BTreeMap::new();
    for (index, fixture) in expected.iter().enumerate() {
        let bytes = media::fixture(&fixture.name);
        let source = if staged.contains(&fixture.name.as_str()) {
            let object = format!("incoming/{index}");
            env.gcs.upload(&env.staging_bucket, &object, &bytes).await?;
            format!("gs://{}/{object}", env.staging_bucket)
        } else {
            env.spool_file(&format!("file-{index}"), &bytes)
                .display()
                .to_string()
        };
        let (audio, thumbnail) = if fixture.kind == "image" {
            let audio = env.spool_file(&format!("fill-{index}"), &audio_fill);
            (audio.display().to_string(), source)
        } else {
            let cover = env.spool_file(&format!("fill-{index}"), &image_fill);
            (source, cover.display().to_string())
        };
        let id = format!("media-{index}");
        env.pubsub
            .publish_json(
                &env.topic,
                &json!({"audio": audio, "thumbnail": thumbnail, "id": id}),
                &[],
            )
            .await?;
        published.insert(crate::support::audio_id_for(&id), fixture);
    }
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "8")])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, expected.len(), TIMEOUT)
        .await?;
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, Duration::from_secs(1))
        .await?;
    worker.stop().await?;
    ensure!(
        dead.is_empty(),
        "dead-lettered: {:?}",
        dead.iter().map(|m| m.attribute("error")).collect::<Vec<_>>()
    );
    ensure!(
        events.len() == expected.len(),
        "{} of {} stored",
        events.len(),
        expected.len()
    );
    for event in &events {
        let event = event_json(event)?;
        let audio_id = event["audio_id"].as_str().context("audio_id")?;
        let fixture = published.get(audio_id).context("an event of ours")?;
        let field = if fixture.kind == "image" {
            "thumbnail"
        } else {
            "audio"
        };
        check_media(fixture, &event[field])?;
        let name = event[field]["name"].as_str().context("name")?;
        let object = env.gcs.object(&env.bucket, name).await?.context("stored")?;
        let bytes = media::fixture(&fixture.name);
        assert_eq!(object.crc32c, crc32c_base64(&bytes), "{}", fixture.name);
        let technical = if fixture.kind == "image" {
            vec!["width", "height"]
        } else {
            vec!["codec", "sample-rate", "channels", "duration-ms"]
        };
        for key in technical {
            let stored = object
                .metadata
                .get(key)
                .with_context(|| format!("{}: {key}", fixture.name))?;
            let told = event[field]["media"][key.replace('-', "_")].to_string();
            assert_eq!(
                stored.trim_matches('"'),
                told.trim_matches('"'),
                "{}: {key}",
                fixture.name
            );
        }
    }
    Ok(())
}

/// What the reason of each bad fixture says (after `audio: SOURCE ` or `thumbnail: SOURCE `).
fn expected_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "random.jpg" | "random.png" | "random.webp" => "is not a recognised image (JPEG, PNG or WebP)",
        name if name.starts_with("random.") => "is not a recognised audio container",
        "text.mp3" | "mp3-one-frame-header.mp3" => "is not a recognised audio container",
        "wav-half.wav" => {
            "is truncated: its header promises 44100 bytes of audio (0.500 s) from byte 78, the file holds 22089 bytes"
        }
        "aiff-half.aiff" => {
            "is truncated: its header promises 22050 bytes of audio from byte 54, the file holds 11052 bytes"
        }
        "flac-half.flac" => {
            "is truncated: its header promises 0.500 s of audio (22050 samples), the file holds 7136 bytes"
        }
        "wav-adpcm.wav" => "uses adpcm_ima_wav, which cannot be decoded here",
        "video-only.mp4" => "has no audio track (mp4 container)",
        "wav-empty.wav" => "has no audio frames (wav, pcm_s16le)",
        "png-zero-size.png" => "is a png image of 0x0 pixels",
        "jpeg-before-sof.jpg" => "is a jpeg image whose size cannot be read",
        _ => return None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_playable_audio_or_a_usable_image_is_dead_lettered_with_a_reason_and_nothing_moves()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let good_audio = media::fixture("wav-16bit.wav");
    let good_image = media::fixture("png.png");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir().join("bad"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("name")?
            .to_string();
        let bytes = std::fs::read(&path)?;
        let image = name.ends_with(".png") || name.ends_with(".jpg") || name.ends_with(".webp");
        // Under its own name (the extension promises the format), locally and staged.
        let local = env.spool_file(&format!("bad/{name}"), &bytes);
        let staged = format!("bad/{name}");
        env.gcs.upload(&env.staging_bucket, &staged, &bytes).await?;
        for source in [
            local.display().to_string(),
            format!("gs://{}/{staged}", env.staging_bucket),
        ] {
            let fill = env.spool_file(
                &format!("fill-{}", cases.len()),
                if image { &good_audio } else { &good_image },
            );
            let fill = fill.display().to_string();
            let (audio, thumbnail) = if image {
                (fill.clone(), source.clone())
            } else {
                (source.clone(), fill.clone())
            };
            let case = format!(
                "{name} as {}",
                if source.starts_with("gs://") {
                    "staged"
                } else {
                    "local"
                }
            );
            env.pubsub
                .publish_json(
                    &env.topic,
                    &json!({"audio": audio, "thumbnail": thumbnail}),
                    &[("case", &case)],
                )
                .await?;
            cases.push((case, source, fill));
        }
    }
    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "8")])?);
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, cases.len(), TIMEOUT)
        .await?;
    let stored = env
        .pubsub
        .drain_for(&env.stored_subscription, Duration::from_secs(1))
        .await?;
    worker.stop().await?;
    ensure!(
        stored.is_empty(),
        "stored: {:?}",
        stored.iter().map(|e| e.json().ok()).collect::<Vec<_>>()
    );
    let mut reasons = BTreeMap::new();
    for message in &dead {
        let case = message.attribute("case").context("case")?.to_string();
        assert_eq!(
            message.attribute("error_kind"),
            Some("bad_content"),
            "{case}: {message:?}"
        );
        reasons.insert(case, message.attribute("error").unwrap_or_default().to_string());
    }
    assert_eq!(reasons.len(), cases.len(), "{reasons:#?}");
    for (case, reason) in &reasons {
        let name = case.split(' ').next().unwrap_or_default();
        let expected = expected_reason(name).with_context(|| format!("no expected reason for {name}"))?;
        ensure!(reason.contains(expected), "{case}: {reason:?} lacks {expected:?}");
    }
    assert!(
        env.gcs.list(&env.bucket, "").await?.is_empty(),
        "nothing uploaded"
    );
    for (case, source, fill) in &cases {
        if let Some(object) = source.strip_prefix(&format!("gs://{}/", env.staging_bucket)) {
            ensure!(
                env.gcs.object(&env.staging_bucket, object).await?.is_some(),
                "{case}: staging source kept"
            );
        } else {
            ensure!(Path::new(source).exists(), "{case}: source kept");
        }
        ensure!(Path::new(fill).exists(), "{case}: the other file kept");
    }
    Ok(())
}
