//! The `audio-store` binary as a process: exit codes, commands, signals.

use crate::support::{BINARY, audio_id_for, event_json};
use anyhow::{Context as _, ensure};
use std::process::{Output, Stdio};
use std::time::Duration;
use testkit::media::{sample_png, sample_wav};
use testkit::worker::signal;
use testkit::{PROJECT, TestEnv, environment};

/// Runs the binary to completion with exactly `environment` (plus PATH).
async fn run(environment: &audio_store::config::Environment, args: &[&str]) -> anyhow::Result<Output> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BINARY)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(environment)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the command did not finish in 60 s")??;
    Ok(output)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn check_config_exits_2_with_one_line_naming_the_bad_key() -> anyhow::Result<()> {
    let env = TestEnv::new();
    let file_root = env
        .spool_file("a-file-not-a-directory", b"x")
        .display()
        .to_string();
    let cases = [
        (
            "AUDIO_STORE__WORKER__CONCURRENCY",
            "zero",
            "AUDIO_STORE__WORKER__CONCURRENCY",
        ),
        ("AUDIO_STORE__WORKER__CONCURRENCY", "0", "worker.concurrency"),
        (
            "AUDIO_STORE__STORAGE__LAYOUT",
            "flat/{kind}{ext}",
            "storage.layout",
        ),
        ("AUDIO_STORE__STORAGE__BUCKET", "", "storage.bucket"),
        ("AUDIO_STORE__RETRY__MAX_BACKOFF", "forever", "retry.max_backoff"),
        ("AUDIO_STORE__SURPRISE__KEY", "1", "AUDIO_STORE__SURPRISE__KEY"),
        (
            "AUDIO_STORE__PUBSUB__STORED_TOPIC",
            env.topic.as_str(),
            "pubsub.stored_topic",
        ),
        (
            "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC",
            env.topic.as_str(),
            "pubsub.dead_letter_topic",
        ),
        ("AUDIO_STORE__LOG__LEVEL", "verbose", "log.level"),
        ("AUDIO_STORE__LOG__LEVEL", "", "log.level"),
        ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", "/", "sources.local_roots[0]"),
        (
            "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
            "/no/such/audio-store/spool",
            "sources.local_roots[0]",
        ),
        (
            "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
            file_root.as_str(),
            "sources.local_roots[0]",
        ),
        (
            "AUDIO_STORE__STORAGE__STAGING_BUCKETS",
            env.bucket.as_str(),
            "storage.staging_buckets",
        ),
    ];
    for (variable, value, key) in cases {
        let mut environment = environment(&env, &[]);
        environment.insert(variable.into(), value.into());
        for command in ["check-config", "run"] {
            let output = run(&environment, &[command]).await?;
            let stderr = text(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{variable}={value} {command}: {stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            ensure!(
                stderr.contains(key),
                "{variable}={value}: {stderr:?} should name {key}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_non_utf8_variable_is_ignored_unless_read_and_a_config_that_is_not_a_file_exits_2()
-> anyhow::Result<()> {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt as _;
    let env = TestEnv::new();
    let check = |extra: (&str, OsString)| {
        std::process::Command::new(BINARY)
            .arg("check-config")
            .env_clear()
            .envs(environment(&env, &[]))
            .env(extra.0, extra.1)
            .output()
    };
    let bad = || OsString::from_vec(vec![b'x', 0xff]);
    let ignored = check(("SOME_OTHER_TOOL", bad()))?;
    assert_eq!(ignored.status.code(), Some(0), "{}", text(&ignored.stderr));
    for (name, value, key) in [
        (
            "AUDIO_STORE__WORKER__CONCURRENCY",
            bad(),
            "AUDIO_STORE__WORKER__CONCURRENCY",
        ),
        ("AUDIO_STORE_CONFIG", OsString::from("/dev/zero"), "--config"),
    ] {
        let refused = check((name, value))?;
        let stderr = text(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn setup_and_publish_without_pubsub_topic_exit_2_naming_it_once() -> anyhow::Result<()> {
    let env = TestEnv::new();
    let mut environment = environment(&env, &[]);
    environment.remove("AUDIO_STORE__PUBSUB__TOPIC");
    for args in [&["setup"][..], &["publish", "--audio", "/spool/a.wav"][..]] {
        let output = run(&environment, args).await?;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert_eq!(stderr.matches("pubsub.topic").count(), 1, "named once: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn check_config_prints_the_effective_values_from_file_and_environment() -> anyhow::Result<()> {
    let env = TestEnv::new();
    let file = env.spool.path().join("config.toml");
    std::fs::write(
        &file,
        "[storage]\nbucket = \"from-the-file\"\n[worker]\nconcurrency = 3\n",
    )?;
    let mut environment = environment(&env, &[]);
    environment.remove("AUDIO_STORE__STORAGE__BUCKET");
    environment.remove("AUDIO_STORE__WORKER__CONCURRENCY");
    environment.insert("AUDIO_STORE_CONFIG".into(), file.display().to_string());
    environment.insert("AUDIO_STORE__WORKER__SHUTDOWN_GRACE".into(), "7s".into());
    let output = run(&environment, &["check-config"]).await?;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let effective: toml::Table = text(&output.stdout).parse()?;
    assert_eq!(effective["storage"]["bucket"].as_str(), Some("from-the-file"));
    assert_eq!(effective["worker"]["concurrency"].as_integer(), Some(3));
    assert_eq!(effective["worker"]["shutdown_grace"].as_str(), Some("7s"));
    assert_eq!(
        effective["pubsub"]["subscription"].as_str(),
        Some(format!("projects/{PROJECT}/subscriptions/{}", env.subscription).as_str())
    );
    Ok(())
}

#[tokio::test]
async fn setup_creates_topics_subscriptions_and_bucket_and_is_idempotent() -> anyhow::Result<()> {
    let env = TestEnv::new();
    let environment = environment(&env, &[("AUDIO_STORE__PUBSUB__MAX_DELIVERY_ATTEMPTS", "7")]);
    let first = run(&environment, &["setup"]).await?;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let first_out = text(&first.stdout);
    assert_eq!(
        first_out.lines().filter(|l| l.starts_with("created")).count(),
        6,
        "{first_out}"
    );

    let input = env.pubsub.get_subscription(&env.subscription).await?;
    assert_eq!(input["topic"], format!("projects/{PROJECT}/topics/{}", env.topic));
    assert_eq!(input["ackDeadlineSeconds"], 10);
    assert_eq!(
        input["deadLetterPolicy"]["deadLetterTopic"],
        format!("projects/{PROJECT}/topics/{}", env.dead_letter_topic)
    );
    assert_eq!(input["deadLetterPolicy"]["maxDeliveryAttempts"], 7);
    assert_eq!(input["retryPolicy"]["minimumBackoff"], "1s");
    assert_eq!(input["retryPolicy"]["maximumBackoff"], "5s");
    let dead_letters = env.pubsub.get_subscription(&env.dead_letter_subscription).await?;
    assert_eq!(
        dead_letters["topic"],
        format!("projects/{PROJECT}/topics/{}", env.dead_letter_topic)
    );
    env.gcs.list(&env.bucket, "").await.context("the bucket exists")?;

    let second = run(&environment, &["setup"]).await?;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let second_out = text(&second.stdout);
    assert_eq!(
        second_out.lines().filter(|l| l.starts_with("exists")).count(),
        6,
        "{second_out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_run_as_processes_store_a_message_and_ctrl_c_exits_0() -> anyhow::Result<()> {
    let env = TestEnv::new();
    let environment = environment(&env, &[]);
    let setup = run(&environment, &["setup"]).await?;
    assert_eq!(setup.status.code(), Some(0), "{}", text(&setup.stderr));
    env.pubsub
        .create_subscription(&env.stored_subscription, &env.stored_topic, Default::default())
        .await?;

    let audio = env.spool_file("process.wav", &sample_wav(4_000));
    let cover = env.spool_file("process.png", &sample_png());
    let audio_arg = audio.display().to_string();
    let cover_arg = format!("file://{}", cover.display());
    let args = [
        "publish",
        "--audio",
        &audio_arg,
        "--thumbnail",
        &cover_arg,
        "--id",
        "proc-1",
        "--meta",
        "title=Night Drive",
        "--meta",
        "user_id=u123",
    ];
    let published = run(&environment, &args).await?;
    assert_eq!(published.status.code(), Some(0), "{}", text(&published.stderr));
    let message_id = text(&published.stdout).trim().to_string();
    ensure!(!message_id.is_empty(), "publish prints the message id");

    let mut worker = tokio::process::Command::new(BINARY)
        .arg("run")
        .env_clear()
        .envs(&environment)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, Duration::from_secs(60))
        .await?;

    signal(&worker, "-INT").await?;
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .context("the worker did not exit within 30 s of SIGINT (Ctrl-C)")??;
    let mut log = String::new();
    if let Some(mut stderr) = worker.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log).await?;
    }
    assert_eq!(status.code(), Some(0), "{log}");
    ensure!(events.len() == 1, "one event; worker log:\n{log}");

    let event = event_json(&events[0])?;
    assert_eq!(event["audio_id"], audio_id_for("proc-1"));
    assert_eq!(event["source"]["message_id"], message_id);
    assert_eq!(event["source"]["thumbnail"], cover_arg, "as sent");
    assert_eq!(event["metadata"]["title"], "Night Drive");
    assert_eq!(env.gcs.list(&env.bucket, "").await?.len(), 2);
    ensure!(!audio.exists() && !cover.exists(), "sources removed");
    // Logs are JSON lines with the message's span.
    let stored_line = log
        .lines()
        .find(|line| line.contains("\"stored\""))
        .context("a 'stored' log line")?;
    let stored: serde_json::Value = serde_json::from_str(stored_line)?;
    assert_eq!(stored["span"]["message_id"], message_id);
    assert_eq!(stored["span"]["audio_id"], audio_id_for("proc-1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_applies_the_bucket_policy_then_sends_nothing_and_patches_only_a_changed_rule()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    // fake-gcs drops these fields; the proxy records what setup sends and answers with it.
    let proxy = testkit::FaultProxy::start(&env.gcs_endpoint)?;
    proxy.keep_bucket_policies();
    proxy.record("POST /storage/v1/b?");
    proxy.record("PATCH /storage/v1/b/");
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("lifecycle.toml");
    let rules = |age: u32| {
        format!(
            "[[storage.lifecycle]]\nage_days = {age}\naction = \"set_storage_class\"\nstorage_class = \"COLDLINE\"\n\n\
             [[storage.lifecycle]]\nage_days = 3650\naction = \"delete\"\nmatches_prefix = [\"audio/\"]\n"
        )
    };
    std::fs::write(&config, rules(90))?;
    let config_path = config.display().to_string();
    let environment = environment(
        &env,
        &[
            ("STORAGE_EMULATOR_HOST", &proxy.endpoint()),
            ("AUDIO_STORE_CONFIG", &config_path),
        ],
    );
    let setup = || run(&environment, &["setup"]);

    let first = setup().await?;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let recorded = proxy.take_recorded();
    ensure!(
        recorded.len() == 1 && recorded[0].method == "POST",
        "only the insert: {recorded:?}"
    );
    assert_eq!(recorded[0].path, "/storage/v1/b");
    let sent = &recorded[0].body;
    assert_eq!(
        sent["iamConfiguration"]["uniformBucketLevelAccess"]["enabled"],
        true
    );
    assert_eq!(sent["iamConfiguration"]["publicAccessPrevention"], "enforced");
    assert_eq!(
        sent["lifecycle"]["rule"],
        serde_json::json!([
            {"action": {"type": "SetStorageClass", "storageClass": "COLDLINE"}, "condition": {"age": 90}},
            {"action": {"type": "Delete"}, "condition": {"age": 3650, "matchesPrefix": ["audio/"]}},
        ])
    );
    let out = text(&first.stdout);
    ensure!(
        out.lines()
            .any(|l| l.starts_with("same") && l.contains("bucket policy")),
        "{out}"
    );

    let second = setup().await?;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let recorded = proxy.take_recorded();
    ensure!(
        recorded.iter().all(|r| r.method != "PATCH"),
        "a second setup changes nothing: {recorded:?}"
    );
    let out = text(&second.stdout);
    ensure!(
        out.lines()
            .any(|l| l.starts_with("same") && l.contains("bucket policy")),
        "{out}"
    );

    std::fs::write(&config, rules(120))?;
    let third = setup().await?;
    assert_eq!(third.status.code(), Some(0), "{}", text(&third.stderr));
    let recorded: Vec<_> = proxy
        .take_recorded()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    ensure!(
        recorded.len() == 1,
        "one patch: {recorded:?} {}",
        text(&third.stdout)
    );
    assert_eq!(recorded[0].path, format!("/storage/v1/b/{}", env.bucket));
    ensure!(
        recorded[0].body.get("iamConfiguration").is_none(),
        "only what differs: {:?}",
        recorded[0].body
    );
    assert_eq!(recorded[0].body["lifecycle"]["rule"][0]["condition"]["age"], 120);
    let out = text(&third.stdout);
    ensure!(
        out.lines()
            .any(|l| l.starts_with("changed") && l.ends_with(": lifecycle rules")),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_on_an_existing_bucket_without_a_policy_patches_uniform_access_and_prevention_once()
-> anyhow::Result<()> {
    let env = TestEnv::new();
    // A bucket made before setup applied a policy: created directly, not through the proxy.
    env.gcs.create_bucket(&env.bucket).await?;
    let proxy = testkit::FaultProxy::start(&env.gcs_endpoint)?;
    proxy.keep_bucket_policies();
    proxy.record("PATCH /storage/v1/b/");
    let environment = environment(&env, &[("STORAGE_EMULATOR_HOST", &proxy.endpoint())]);

    let setup = run(&environment, &["setup"]).await?;
    assert_eq!(setup.status.code(), Some(0), "{}", text(&setup.stderr));
    let recorded = proxy.take_recorded();
    ensure!(recorded.len() == 1, "one patch: {recorded:?}");
    assert_eq!(recorded[0].path, format!("/storage/v1/b/{}", env.bucket));
    let sent = &recorded[0].body;
    assert_eq!(
        sent["iamConfiguration"]["uniformBucketLevelAccess"]["enabled"], true,
        "{sent}"
    );
    assert_eq!(
        sent["iamConfiguration"]["publicAccessPrevention"], "enforced",
        "{sent}"
    );
    ensure!(sent.get("lifecycle").is_none(), "no rules, none sent: {sent}");
    let out = text(&setup.stdout);
    ensure!(
        out.lines().any(|line| line.starts_with("changed")
            && line.contains(&env.bucket)
            && line.ends_with(": uniform bucket-level access, public access prevention")),
        "{out}"
    );

    // Applied: the next setup finds the policy in place and sends nothing.
    let again = run(&environment, &["setup"]).await?;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let recorded = proxy.take_recorded();
    ensure!(recorded.is_empty(), "nothing more to patch: {recorded:?}");
    Ok(())
}
