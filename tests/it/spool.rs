//! The spool under attack and under concurrent writers: a directory swapped
//! for a symlink in a loop, a file renamed over a source or written to while
//! it is stored, one logical message under other names, and sources whose
//! names say nothing about their content.

use crate::support::{Worker, audio_id_for, next_event, settings};
use anyhow::{Context as _, ensure};
use audio_store::source::KeptReason;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use testkit::FaultProxy;
use testkit::media::{sample_png, sample_wav, write_wav};
use testkit::{FakeGcs, TestEnv, crc32c_base64, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);
/// How long to watch for an unwanted dead letter.
const QUIET_WINDOW: Duration = Duration::from_secs(2);

/// Exchanges two directory entries (`renameat2(RENAME_EXCHANGE)`) as fast as it
/// can until stopped; returns how often it did.
fn swap_in_a_loop(first: &Path, second: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (first, second) = (first.to_path_buf(), second.to_path_buf());
    std::thread::spawn(move || {
        let mut swaps = 0;
        while !stop.load(Ordering::Relaxed) {
            if rustix::fs::renameat_with(
                rustix::fs::CWD,
                &first,
                rustix::fs::CWD,
                &second,
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .is_ok()
            {
                swaps += 1;
            }
        }
        swaps
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_directory_swapped_with_a_symlink_in_a_loop_never_exposes_a_file_outside_the_root()
-> anyhow::Result<()> {
    const MESSAGES: usize = 48;
    let env = TestEnv::new();
    env.create_resources().await?;
    let outside = tempfile::tempdir()?;
    let (inside_dir, link) = (env.spool_path("sub"), env.spool_path("link"));
    std::fs::create_dir(&inside_dir)?;
    std::os::unix::fs::symlink(outside.path(), &link)?;
    // The same names inside and outside; outside, other (valid) audio that must never be read.
    let mut outside_bytes = BTreeMap::new();
    let mut inside_crc = BTreeMap::new();
    for index in 0..MESSAGES {
        let name = format!("track-{index}.wav");
        let decoy = sample_wav(5_000 + index);
        std::fs::write(outside.path().join(&name), &decoy)?;
        outside_bytes.insert(name.clone(), decoy);
        let audio = sample_wav(1_000 + index);
        std::fs::write(inside_dir.join(&name), &audio)?;
        inside_crc.insert(audio_id_for(&format!("swap-{index}")), crc32c_base64(&audio));
    }
    let outside_crcs: Vec<String> = outside_bytes.values().map(|bytes| crc32c_base64(bytes)).collect();

    let worker = Worker::start(settings(&env, &[("AUDIO_STORE__WORKER__CONCURRENCY", "8")])?);
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = swap_in_a_loop(&inside_dir, &link, stop.clone());
    for index in 0..MESSAGES {
        let path = inside_dir.join(format!("track-{index}.wav"));
        env.pubsub
            .publish_json(
                &env.topic,
                &json!({"audio": path, "id": format!("swap-{index}")}),
                &[],
            )
            .await?;
    }
    let metrics = worker.health.metrics.clone();
    let settled = wait_for("every message settled", TIMEOUT, || async {
        let settled = metrics.messages("stored") + metrics.messages("dead_lettered");
        Ok((settled as usize >= MESSAGES).then_some(settled))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper
        .join()
        .map_err(|_| anyhow::anyhow!("the swapper panicked"))?;
    let summary = worker.stop().await?;
    settled?;
    ensure!(swaps > MESSAGES as u64, "the loop swapped only {swaps} times");

    for (name, bytes) in &outside_bytes {
        let now = std::fs::read(outside.path().join(name))
            .with_context(|| format!("{name} outside was deleted"))?;
        ensure!(&now == bytes, "{name} outside was changed");
    }
    let objects = env.gcs.list(&env.bucket, "").await?;
    for object in &objects {
        ensure!(
            !outside_crcs.contains(&object.crc32c),
            "{} holds the bytes of a file outside the root",
            object.name
        );
        let audio_id = object.metadata.get("audio-id").context("audio-id")?;
        assert_eq!(inside_crc.get(audio_id), Some(&object.crc32c), "{}", object.name);
    }
    let dead = env
        .pubsub
        .collect(
            &env.dead_letter_subscription,
            summary.dead_lettered as usize,
            TIMEOUT,
        )
        .await?;
    for message in &dead {
        assert_eq!(
            message.attribute("error_kind"),
            Some("source_not_allowed"),
            "{message:?}"
        );
        let error = message.attribute("error").context("error")?;
        ensure!(
            error.contains("changed while it was being checked")
                || error.contains("outside sources.local_roots"),
            "a dead letter for another reason: {error}"
        );
    }
    // The loop must have caught the worker at least once, or the test proved nothing.
    let kept = metrics.sources_kept(KeptReason::Replaced);
    ensure!(
        dead.len() as u64 + kept > 0,
        "the loop never caught the worker: nothing refused or kept ({summary:?})"
    );
    assert_eq!(objects.len() as u64, summary.stored, "{summary:?}");
    assert_eq!(
        summary.stored + summary.dead_lettered,
        MESSAGES as u64,
        "{summary:?}"
    );
    // What was stored was removed from the real directory (wherever the loop left it), the rest kept.
    let real = if std::fs::symlink_metadata(&inside_dir)?.is_dir() {
        inside_dir
    } else {
        link
    };
    // A stored file is kept too when, at its removal, the loop had its directory away from its place.
    let left = std::fs::read_dir(&real)?.count() as u64;
    assert_eq!(
        left,
        summary.dead_lettered + kept,
        "files left in the spool directory"
    );
    Ok(())
}

/// Fresh resources on a fake-gcs of their own (kept running until the test ends),
/// a fault proxy in front of it, and a worker whose storage requests go through
/// the proxy, ready; the proxy's request count then.
async fn worker_behind_a_proxy() -> anyhow::Result<(TestEnv, FaultProxy, Worker, u64, FakeGcs)> {
    let gcs = FakeGcs::start_memory()?;
    let proxy = FaultProxy::start(&gcs.endpoint())?;
    let env = TestEnv::with_gcs(&gcs.endpoint());
    env.create_resources().await?;
    let endpoint = proxy.endpoint();
    let worker = Worker::start(settings(&env, &[("STORAGE_EMULATOR_HOST", &endpoint)])?);
    let health = worker.health.clone();
    wait_for("the worker ready", TIMEOUT, || async {
        Ok(health.is_ready().then_some(()))
    })
    .await?;
    let requests = proxy.stats().requests;
    Ok((env, proxy, worker, requests, gcs))
}

/// Publishes `path` as message `id` and returns once its upload reached the
/// (slowed) storage: by then the worker has read the file.
async fn publish_and_wait_for_the_upload(
    env: &TestEnv,
    proxy: &FaultProxy,
    requests_before: u64,
    path: &Path,
    id: &str,
) -> anyhow::Result<()> {
    proxy.set_latency(Duration::from_secs(3));
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": path, "id": id}), &[])
        .await?;
    wait_for("the upload request", TIMEOUT, || async {
        Ok((proxy.stats().requests > requests_before).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_over_the_source_during_its_upload_is_kept_and_stored_by_its_own_message()
-> anyhow::Result<()> {
    let (env, proxy, worker, requests, _gcs) = worker_behind_a_proxy().await?;
    let (old, new) = (sample_wav(2_000), sample_wav(3_000));
    let path = env.spool_file("track.wav", &old);
    publish_and_wait_for_the_upload(&env, &proxy, requests, &path, "old-take").await?;
    // Upstream's atomic write of the next take: write aside, rename over.
    let temporary = env.spool_file("track.wav.tmp", &new);
    std::fs::rename(&temporary, &path)?;
    let first = next_event(&env).await?;
    assert_eq!(
        first["audio"]["crc32c"],
        crc32c_base64(&old),
        "the old take stored"
    );
    assert_eq!(std::fs::read(&path)?, new, "the new take is not deleted");
    let metrics = worker.health.metrics.clone();
    assert_eq!(metrics.sources_kept(KeptReason::Replaced), 1);

    proxy.clear_faults();
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": path, "id": "new-take"}), &[])
        .await?;
    let second = next_event(&env).await?;
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, QUIET_WINDOW)
        .await?;
    let summary = worker.stop().await?;
    ensure!(dead.is_empty(), "the new take stored: {dead:?}");
    assert_eq!(second["audio_id"], audio_id_for("new-take"));
    assert_eq!(second["audio"]["crc32c"], crc32c_base64(&new));
    ensure!(!path.exists(), "removed once its own message stored it");
    assert_eq!(summary.stored, 2, "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_to_after_it_was_read_is_stored_as_read_and_not_deleted() -> anyhow::Result<()> {
    let (env, proxy, worker, requests, _gcs) = worker_behind_a_proxy().await?;
    let first_part = sample_wav(2_000);
    let path = env.spool_file("growing.wav", &first_part);
    publish_and_wait_for_the_upload(&env, &proxy, requests, &path, "growing").await?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)?
        .write_all(&[0; 1_000])?;
    let event = next_event(&env).await?;
    let metrics = worker.health.metrics.clone();
    worker.stop().await?;
    assert_eq!(
        event["audio"]["crc32c"],
        crc32c_base64(&first_part),
        "what was read"
    );
    ensure!(path.exists(), "a file that changed after it was read is kept");
    assert_eq!(std::fs::metadata(&path)?.len(), first_part.len() as u64 + 1_000);
    assert_eq!(metrics.sources_kept(KeptReason::Changed), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_place_with_its_modification_time_set_back_is_stored_as_read_and_kept()
-> anyhow::Result<()> {
    let (env, proxy, worker, requests, _gcs) = worker_behind_a_proxy().await?;
    let original = sample_wav(2_000);
    let path = env.spool_file("rewritten.wav", &original);
    let modified = std::fs::metadata(&path)?.modified()?;
    publish_and_wait_for_the_upload(&env, &proxy, requests, &path, "rewritten").await?;
    // Same size, same modification time (as `cp -p` or `rsync --inplace` leave it):
    // only the change time, which no writer can set, tells the new content apart.
    let rewritten = sample_wav(2_001)[..original.len()].to_vec();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.write_all(&rewritten)?;
    file.set_modified(modified)?;
    drop(file);
    let event = next_event(&env).await?;
    let metrics = worker.health.metrics.clone();
    worker.stop().await?;
    assert_eq!(
        event["audio"]["crc32c"],
        crc32c_base64(&original),
        "what was read"
    );
    assert_eq!(
        std::fs::read(&path)?,
        rewritten,
        "the new content is kept, not deleted"
    );
    assert_eq!(metrics.sources_kept(KeptReason::Changed), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_under_other_names_and_a_symlink_gives_one_object_set_and_no_dead_letter() -> anyhow::Result<()>
{
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = sample_wav(2_500);
    let real = env.spool_file("real.wav", &audio);
    let alias = env.spool_path("alias.flac");
    std::os::unix::fs::symlink(&real, &alias)?;
    let spellings = [
        env.spool_file("first.wav", &audio),
        env.spool_file("second.wave", &audio),
        env.spool_file("THIRD.WAV", &audio),
        env.spool_file("fourth", &audio),
        alias.clone(),
    ];
    let worker = Worker::start(settings(&env, &[])?);
    let mut names = Vec::new();
    for path in &spellings {
        // One after the other, so each delivery finds what the one before stored.
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": path, "id": "one-take"}), &[])
            .await?;
        names.push(next_event(&env).await?["audio"]["name"].clone());
    }
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, QUIET_WINDOW)
        .await?;
    let summary = worker.stop().await?;
    ensure!(dead.is_empty(), "dead-lettered: {dead:?}");
    let expected = format!("audio/{}/audio.wav", audio_id_for("one-take"));
    for name in &names {
        assert_eq!(name, &json!(expected));
    }
    let objects = env.gcs.names(&env.bucket, "").await?;
    assert_eq!(objects, [expected]);
    assert_eq!((summary.stored, summary.already_stored), (1, 4), "{summary:?}");
    for path in spellings.iter().take(4).chain([&real]) {
        ensure!(!path.exists(), "{} removed", path.display());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_without_an_extension_redelivered_after_cleanup_are_recognised_as_stored()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("take-0042", &sample_wav(1_800));
    let cover = env.spool_file("cover-0042", &sample_png());
    let data = json!({"audio": audio, "thumbnail": cover, "id": "no-extension"});
    let worker = Worker::start(settings(&env, &[])?);
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let first = next_event(&env).await?;
    ensure!(!audio.exists() && !cover.exists(), "stored and cleaned up");
    env.pubsub.publish_json(&env.topic, &data, &[]).await?;
    let second = next_event(&env).await?;
    let dead = env
        .pubsub
        .drain_for(&env.dead_letter_subscription, QUIET_WINDOW)
        .await?;
    let summary = worker.stop().await?;
    ensure!(dead.is_empty(), "recognised, not dead-lettered: {dead:?}");
    let prefix = format!("audio/{}", audio_id_for("no-extension"));
    assert_eq!(first["audio"]["name"], format!("{prefix}/audio.wav"));
    assert_eq!(first["thumbnail"]["name"], format!("{prefix}/thumbnail.png"));
    assert_eq!(second["audio"], first["audio"]);
    assert_eq!(second["thumbnail"], first["thumbnail"]);
    assert_eq!((summary.stored, summary.already_stored), (1, 1), "{summary:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_uri_metadata_is_an_encoded_file_uri_and_the_event_echoes_the_sources_as_sent()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let name = "take 1 %41#b?c.wav";
    let path = env.spool_file(name, &sample_wav(1_200));
    let spool = env.spool.path().display().to_string();
    ensure!(
        spool
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b)),
        "the test expects a plain spool path: {spool}"
    );
    let as_sent = format!("file://{spool}/take%201%20%2541%23b%3Fc.wav");
    let cover = env.spool_file("cover.png", &sample_png());
    let worker = Worker::start(settings(&env, &[])?);
    env.pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": as_sent, "thumbnail": cover, "id": "uri"}),
            &[],
        )
        .await?;
    let event = next_event(&env).await?;
    worker.stop().await?;
    assert_eq!(event["source"]["audio"], as_sent, "as sent, not normalised");
    assert_eq!(event["source"]["thumbnail"], cover.display().to_string());
    ensure!(!path.exists(), "the decoded path was read and removed");
    let name = event["audio"]["name"].as_str().context("name")?;
    let object = env.gcs.object(&env.bucket, name).await?.context("stored")?;
    assert_eq!(object.metadata["source-uri"], as_sent);
    let cover_object = env
        .gcs
        .object(&env.bucket, event["thumbnail"]["name"].as_str().context("name")?)
        .await?
        .context("stored")?;
    assert_eq!(
        cover_object.metadata["source-uri"],
        format!("file://{spool}/cover.png")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_cut_short_while_it_streams_leaves_no_corrupt_object_and_is_kept() -> anyhow::Result<()> {
    let (env, proxy, worker, _, _gcs) = worker_behind_a_proxy().await?;
    let path = env.spool_path("cut.wav");
    write_wav(&path, 12 * 1024 * 1024, 5)?;
    proxy.set_upload_rate(Some(2 * 1024 * 1024));
    let sent_before = proxy.stats().bytes_up;
    env.pubsub
        .publish_json(&env.topic, &json!({"audio": path, "id": "cut-short"}), &[])
        .await?;
    wait_for("the upload under way", TIMEOUT, || async {
        Ok((proxy.stats().bytes_up > sent_before + 1024 * 1024).then_some(()))
    })
    .await?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)?
        .set_len(10_000)?;
    let dead = env
        .pubsub
        .collect(&env.dead_letter_subscription, 1, TIMEOUT)
        .await?;
    proxy.clear_faults();
    worker.stop().await?;
    ensure!(dead.len() == 1, "dead-lettered");
    assert_eq!(dead[0].attribute("error_kind"), Some("bad_content"), "{dead:?}");
    ensure!(
        dead[0]
            .attribute("error")
            .is_some_and(|error| error.contains("truncated")),
        "{dead:?}"
    );
    let objects = env.gcs.list(&env.bucket, "").await?;
    ensure!(
        objects.is_empty(),
        "no object of other bytes than the file's is left: {objects:?}"
    );
    assert_eq!(std::fs::metadata(&path)?.len(), 10_000, "the source is kept");
    Ok(())
}
