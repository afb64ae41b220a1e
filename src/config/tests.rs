//! The configuration as a whole: file, environment, validation and `check-config` output.

use super::environment::KeyKind;
use super::*;

fn minimal() -> Environment {
    [
        ("AUDIO_STORE__PUBSUB__PROJECT", "demo-project"),
        ("AUDIO_STORE__PUBSUB__SUBSCRIPTION", "audio-in-sub"),
        ("AUDIO_STORE__PUBSUB__STORED_TOPIC", "audio-stored"),
        ("AUDIO_STORE__STORAGE__BUCKET", "audio-archive"),
        ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", "/tmp"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn with(mut environment: Environment, key: &str, value: &str) -> Environment {
    environment.insert(key.to_string(), value.to_string());
    environment
}

#[test]
fn environment_alone_is_a_valid_configuration() -> Result<(), ConfigError> {
    let settings = Settings::load(None, &minimal())?;
    assert_eq!(
        settings.pubsub.subscription,
        "projects/demo-project/subscriptions/audio-in-sub"
    );
    assert_eq!(
        settings.pubsub.stored_topic,
        "projects/demo-project/topics/audio-stored"
    );
    assert_eq!(settings.pubsub.dead_letter_topic, None);
    assert_eq!(settings.worker.concurrency, 16);
    assert_eq!(settings.worker.shutdown_grace, Duration::from_secs(25));
    assert_eq!(settings.retry.initial_backoff, Duration::from_millis(200));
    assert_eq!(settings.pubsub.endpoint, Endpoint::Google);
    Ok(())
}

#[test]
fn environment_overrides_the_file() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[storage]\nbucket = \"from-file\"\nstaging_buckets = [\"stage-a\"]\n",
    )?;
    let mut environment = with(
        minimal(),
        "AUDIO_STORE__STORAGE__STAGING_BUCKETS",
        "stage-b, stage-c",
    );
    environment.remove("AUDIO_STORE__STORAGE__BUCKET");
    let settings = Settings::load(Some(&path), &environment)?;
    assert_eq!(settings.storage.bucket, "from-file");
    assert_eq!(settings.storage.staging_buckets, vec!["stage-b", "stage-c"]);
    let settings = Settings::load(
        Some(&path),
        &with(environment, "AUDIO_STORE__STORAGE__BUCKET", "from-env"),
    )?;
    assert_eq!(settings.storage.bucket, "from-env");
    Ok(())
}

#[test]
fn a_bad_value_names_its_key() {
    let cases = [
        ("AUDIO_STORE__WORKER__CONCURRENCY", "0", "worker.concurrency"),
        (
            "AUDIO_STORE__WORKER__CONCURRENCY",
            "many",
            "AUDIO_STORE__WORKER__CONCURRENCY",
        ),
        (
            "AUDIO_STORE__WORKER__SHUTDOWN_GRACE",
            "soon",
            "worker.shutdown_grace",
        ),
        (
            "AUDIO_STORE__STORAGE__LAYOUT",
            "audio/{kind}{ext}",
            "storage.layout",
        ),
        ("AUDIO_STORE__STORAGE__BUCKET", "Bad_Bucket!", "storage.bucket"),
        ("AUDIO_STORE__STORAGE__BUKET", "x", "AUDIO_STORE__STORAGE__BUKET"),
        ("AUDIO_STORE__HTTP__LISTEN", "eighty", "http.listen"),
        ("AUDIO_STORE__LOG__FORMAT", "xml", "log.format"),
        (
            "AUDIO_STORE__RETRY__INITIAL_BACKOFF",
            "1h",
            "retry.initial_backoff",
        ),
        (
            "AUDIO_STORE__PUBSUB__SUBSCRIPTION",
            "projects/p/topics/x",
            "pubsub.subscription",
        ),
        (
            "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
            "relative/dir",
            "sources.local_roots[0]",
        ),
        (
            "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT",
            "collector:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT",
            "grpc://c:4317",
            "telemetry.otlp_endpoint",
        ),
        (
            "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT",
            "http://c/?x=1",
            "telemetry.otlp_endpoint",
        ),
        (
            "AUDIO_STORE__TELEMETRY__SAMPLE_RATIO",
            "1.5",
            "telemetry.sample_ratio",
        ),
        (
            "AUDIO_STORE__TELEMETRY__SAMPLE_RATIO",
            "nan",
            "telemetry.sample_ratio",
        ),
        (
            "AUDIO_STORE__TELEMETRY__SAMPLE_RATIO",
            "half",
            "AUDIO_STORE__TELEMETRY__SAMPLE_RATIO",
        ),
    ];
    for (variable, value, key) in cases {
        let error = Settings::load(None, &with(minimal(), variable, value))
            .expect_err(&format!("{variable}={value} should be rejected"));
        assert_eq!(error.key, key, "{variable}={value}: {error}");
        assert!(!error.to_string().contains('\n'), "one line: {error}");
    }
}

#[test]
fn configuration_that_cannot_work_names_its_key() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("file");
    std::fs::write(&file, "")?;
    let missing = dir.path().join("missing");
    let input = with(minimal(), "AUDIO_STORE__PUBSUB__TOPIC", "audio-in");
    let cases = [
        (
            input.clone(),
            "AUDIO_STORE__PUBSUB__STORED_TOPIC",
            "audio-in",
            "pubsub.stored_topic",
        ),
        (
            input.clone(),
            "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC",
            "projects/demo-project/topics/audio-in",
            "pubsub.dead_letter_topic",
        ),
        (minimal(), "AUDIO_STORE__LOG__LEVEL", "verbose", "log.level"),
        (minimal(), "AUDIO_STORE__LOG__LEVEL", "", "log.level"),
        (
            minimal(),
            "AUDIO_STORE__LOG__LEVEL",
            "audio_store=loud",
            "log.level",
        ),
        (minimal(), "AUDIO_STORE__LOG__LEVEL", "=debug", "log.level"),
        (minimal(), "RUST_LOG", "verbose", "RUST_LOG"),
        (
            minimal(),
            "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
            "/",
            "sources.local_roots[0]",
        ),
        (
            minimal(),
            "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
            &format!("/tmp,{}", missing.display()),
            "sources.local_roots[1]",
        ),
        (
            minimal(),
            "AUDIO_STORE__SOURCES__LOCAL_ROOTS",
            &file.display().to_string(),
            "sources.local_roots[0]",
        ),
        (
            minimal(),
            "AUDIO_STORE__STORAGE__STAGING_BUCKETS",
            "staging-a,audio-archive",
            "storage.staging_buckets",
        ),
    ];
    for (environment, variable, value, key) in cases {
        let error = Settings::load(None, &with(environment, variable, value))
            .expect_err(&format!("{variable}={value} should be rejected"));
        assert_eq!(error.key, key, "{variable}={value}: {error}");
        assert!(!error.to_string().contains('\n'), "one line: {error}");
    }
    Ok(())
}

#[test]
fn log_levels_and_per_target_levels_are_accepted() -> Result<(), ConfigError> {
    for level in [
        "info",
        "DEBUG",
        "audio_store=debug,info",
        "warn, h2=off",
        "audio_store::worker=trace",
    ] {
        Settings::load(None, &with(minimal(), "AUDIO_STORE__LOG__LEVEL", level))?;
    }
    Ok(())
}

#[test]
fn a_missing_required_key_is_named() {
    let mut environment = minimal();
    environment.remove("AUDIO_STORE__STORAGE__BUCKET");
    let error = Settings::load(None, &environment).expect_err("bucket is required");
    assert_eq!(error.key, "storage.bucket");
}

#[test]
fn an_unknown_key_in_the_file_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[storage]\nbukket = \"x\"\n")?;
    let error = Settings::load(Some(&path), &minimal()).expect_err("unknown key");
    assert!(error.to_string().contains("bukket"), "{error}");
    Ok(())
}

#[test]
fn emulator_hosts_are_honoured_when_no_endpoint_is_set() -> Result<(), ConfigError> {
    let environment = with(minimal(), "PUBSUB_EMULATOR_HOST", "127.0.0.1:8085");
    let environment = with(environment, "STORAGE_EMULATOR_HOST", "http://127.0.0.2");
    let settings = Settings::load(None, &environment)?;
    assert_eq!(
        settings.pubsub.endpoint,
        Endpoint::Custom {
            url: "http://127.0.0.1:8085".into(),
            emulator: true
        }
    );
    assert_eq!(
        settings.storage.endpoint,
        Endpoint::Custom {
            url: "http://127.0.0.2".into(),
            emulator: true
        }
    );
    let environment = with(
        environment,
        "AUDIO_STORE__PUBSUB__ENDPOINT",
        "https://europe-west1-pubsub.googleapis.com",
    );
    let settings = Settings::load(None, &environment)?;
    assert_eq!(
        settings.pubsub.endpoint,
        Endpoint::Custom {
            url: "https://europe-west1-pubsub.googleapis.com".into(),
            emulator: false
        }
    );
    Ok(())
}

#[test]
fn the_dead_letter_subscription_defaults_from_its_topic() -> Result<(), ConfigError> {
    let settings = Settings::load(
        None,
        &with(minimal(), "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", "audio-dlq"),
    )?;
    assert_eq!(
        settings.pubsub.dead_letter_topic.as_deref(),
        Some("projects/demo-project/topics/audio-dlq")
    );
    assert_eq!(
        settings.pubsub.dead_letter_subscription.as_deref(),
        Some("projects/demo-project/subscriptions/audio-dlq-sub")
    );
    Ok(())
}

#[test]
fn every_key_can_be_set_from_the_environment() -> Result<(), ConfigError> {
    let mut environment = minimal();
    let keys = environment::keys();
    assert!(keys.len() >= 25, "{keys:?}");
    for (section, key, kind) in &keys {
        let variable = format!("{ENV_PREFIX}{}__{}", section.to_uppercase(), key.to_uppercase());
        if environment.contains_key(&variable) {
            continue;
        }
        let value = match (section.as_str(), key.as_str(), kind) {
            (_, _, KeyKind::Integer) => "7",
            ("storage", _, KeyKind::List) => "stage-a,stage-b",
            (_, _, KeyKind::List) => "/tmp",
            ("pubsub", "endpoint", _) | ("storage", "endpoint", _) => "http://127.0.0.1:1",
            ("storage", "layout", _) => "x/{audio_id}/{kind}{ext}",
            ("storage", "storage_class", _) => "NEARLINE",
            ("http", "listen", _) => "127.0.0.1:9",
            ("log", "format", _) => "pretty",
            ("log", "level", _) => "debug",
            ("telemetry", "otlp_endpoint", _) => "http://127.0.0.1:4318",
            (_, _, KeyKind::Float) => "0.25",
            ("pubsub", "ack_deadline" | "redelivery_min_backoff" | "redelivery_max_backoff", _) => "20s",
            ("worker" | "retry", _, _) => "1s",
            ("pubsub", "topic", _) => "input-name",
            _ => "some-name",
        };
        environment.insert(variable, value.to_string());
    }
    let settings = Settings::load(None, &environment)?;
    assert_eq!(settings.pubsub.max_delivery_attempts, 7);
    assert_eq!(settings.log.format, LogFormat::Pretty);
    assert_eq!(settings.storage.layout.template(), "x/{audio_id}/{kind}{ext}");
    assert_eq!(settings.storage.storage_class, Some("NEARLINE"));
    assert_eq!(settings.telemetry.sample_ratio, 0.25);
    Ok(())
}

#[test]
fn the_otlp_endpoint_is_the_collector_and_spans_go_to_its_traces_path() -> Result<(), ConfigError> {
    let traces = |endpoint: &str| -> Result<Option<String>, ConfigError> {
        let environment = with(minimal(), "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT", endpoint);
        let settings = Settings::load(None, &environment)?;
        Ok(settings.telemetry.otlp_traces.map(|url| url.to_string()))
    };
    assert_eq!(traces("")?, None);
    assert_eq!(
        traces("http://otel:4318")?.as_deref(),
        Some("http://otel:4318/v1/traces")
    );
    assert_eq!(
        traces("https://otel/base/")?.as_deref(),
        Some("https://otel/base/v1/traces")
    );
    assert_eq!(
        traces("http://otel:4318/v1/traces")?.as_deref(),
        Some("http://otel:4318/v1/traces")
    );
    Ok(())
}

#[test]
fn the_effective_configuration_loads_back_to_the_same_values() -> Result<(), Box<dyn std::error::Error>> {
    let mut environment = with(minimal(), "AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", "audio-dlq");
    for (variable, value) in [
        ("AUDIO_STORE__PUBSUB__ENDPOINT", "http://user:secret@pubsub:8085"),
        (
            "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT",
            "http://user:secret@otel:4318",
        ),
        ("AUDIO_STORE__TELEMETRY__SAMPLE_RATIO", "0.25"),
    ] {
        environment = with(environment, variable, value);
    }
    let settings = Settings::load(None, &environment)?;
    let effective = settings.effective_toml();
    assert!(!effective.contains("secret"), "{effective}");
    assert!(
        effective.contains("otlp_endpoint = \"http://REDACTED@otel:4318/v1/traces\""),
        "{effective}"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("effective.toml");
    std::fs::write(&path, &effective)?;
    let reloaded = Settings::load(Some(&path), &Environment::new())?;
    assert_eq!(reloaded.effective_toml(), effective);
    assert_eq!(reloaded.telemetry.sample_ratio, 0.25);
    Ok(())
}

#[test]
fn rust_log_replaces_log_level_and_check_config_shows_the_filter_in_effect() -> Result<(), ConfigError> {
    let file_level = with(minimal(), "AUDIO_STORE__LOG__LEVEL", "warn");
    assert_eq!(Settings::load(None, &file_level)?.log.level, "warn");
    let overridden = Settings::load(None, &with(file_level.clone(), "RUST_LOG", "audio_store=debug"))?;
    assert_eq!(overridden.log.level, "audio_store=debug");
    let effective = overridden.effective_toml();
    assert!(effective.contains("level = \"audio_store=debug\""), "{effective}");
    // An empty RUST_LOG is not set.
    assert_eq!(
        Settings::load(None, &with(file_level, "RUST_LOG", ""))?.log.level,
        "warn"
    );
    Ok(())
}

#[test]
fn a_table_key_set_from_the_environment_says_it_belongs_in_the_file() {
    let error = Settings::load(None, &with(minimal(), "AUDIO_STORE__STORAGE__LIFECYCLE", "x"))
        .expect_err("lifecycle rules are tables");
    assert_eq!(error.key, "AUDIO_STORE__STORAGE__LIFECYCLE");
    assert!(
        error.problem.contains("only be set in the configuration file"),
        "{error}"
    );
}

#[test]
fn the_event_source_defaults_from_the_subscription_and_is_checked() -> Result<(), ConfigError> {
    let settings = Settings::load(None, &minimal())?;
    assert_eq!(
        settings.pubsub.event_source,
        "//audio-store/projects/demo-project/subscriptions/audio-in-sub"
    );
    assert_eq!(settings.pubsub.event_type, "audio.stored");
    let custom = with(
        with(
            minimal(),
            "AUDIO_STORE__PUBSUB__EVENT_SOURCE",
            "https://example.com/audio",
        ),
        "AUDIO_STORE__PUBSUB__EVENT_TYPE",
        "com.example.audio.stored",
    );
    let settings = Settings::load(None, &custom)?;
    assert_eq!(settings.pubsub.event_source, "https://example.com/audio");
    assert_eq!(settings.pubsub.event_type, "com.example.audio.stored");
    for (variable, value, key) in [
        (
            "AUDIO_STORE__PUBSUB__EVENT_SOURCE",
            "a source",
            "pubsub.event_source",
        ),
        ("AUDIO_STORE__PUBSUB__EVENT_TYPE", " ", "pubsub.event_type"),
        (
            "AUDIO_STORE__PUBSUB__EVENT_TYPE",
            "audio.stored ",
            "pubsub.event_type",
        ),
        (
            "AUDIO_STORE__PUBSUB__EVENT_TYPE",
            "audio.stored\u{200b}",
            "pubsub.event_type",
        ),
        ("AUDIO_STORE__PUBSUB__EVENT_TYPE", "", "pubsub.event_type"),
        (
            "AUDIO_STORE__PUBSUB__EVENT_SOURCE",
            " //x/y",
            "pubsub.event_source",
        ),
        (
            "AUDIO_STORE__PUBSUB__EVENT_SOURCE",
            "%zz[:::",
            "pubsub.event_source",
        ),
        (
            "AUDIO_STORE__PUBSUB__EVENT_TYPE",
            &"t".repeat(1025),
            "pubsub.event_type",
        ),
    ] {
        let error = Settings::load(None, &with(minimal(), variable, value)).expect_err(value);
        assert_eq!(error.key, key, "{error}");
    }
    Ok(())
}

#[test]
fn a_value_of_the_wrong_type_in_the_file_is_named_by_its_key() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    for (text, key) in [
        ("[worker]\nconcurrency = \"x\"\n", "worker.concurrency"),
        ("[pubsub]\nevent_type = 5\n", "pubsub.event_type"),
        ("[sources]\nlocal_roots = \"/tmp\"\n", "sources.local_roots"),
    ] {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text)?;
        let error = Settings::load(Some(&path), &Environment::new()).expect_err(text);
        assert_eq!(error.key, key, "{error}");
        assert!(error.problem.contains("config.toml"), "says where: {error}");
    }
    Ok(())
}

mod inputs;
mod storage;
