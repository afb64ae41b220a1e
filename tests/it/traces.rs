//! Trace context in and out, and spans exported over OTLP to the kit's
//! receiver: the worker as a process (its span export is process-wide).

use crate::replay::replay;
use crate::support::{Worker, audio_id_for, event_json, settings, spawn_worker};
use crate::worker::EVENT_TIMEOUT;
use anyhow::{Context as _, ensure};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;
use testkit::media::{sample_png, sample_wav};
use testkit::{OtlpReceiver, PROJECT, ReceivedSpan, TestEnv, wait_for};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
/// How long spans may take to reach the receiver (the export batches for a second).
const SPAN_TIMEOUT: Duration = Duration::from_secs(30);

fn traceparent() -> String {
    format!("00-{TRACE}-{PARENT}-01")
}

/// `(trace id, span id, flags)` of a `traceparent`.
fn parts(traceparent: &str) -> anyhow::Result<(String, String, String)> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    ensure!(
        parts.len() == 4 && parts[0] == "00",
        "not a traceparent: {traceparent:?}"
    );
    Ok((parts[1].into(), parts[2].into(), parts[3].into()))
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().find(|span| span.name == name)
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> BTreeSet<&'a str> {
    spans
        .iter()
        .filter(|span| span.parent_span_id == parent.span_id)
        .map(|span| span.name.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_message_gives_one_span_tree_and_its_stored_event_continues_it() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new();
    env.create_resources().await?;
    let audio = env.spool_file("track.wav", &sample_wav(8_000));
    let cover = env.spool_file("cover.png", &sample_png());
    let message_id = env
        .pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": audio, "thumbnail": cover, "id": "traced-1"}),
            &[
                ("googclient_traceparent", &traceparent()),
                ("googclient_tracestate", "upstream=1"),
            ],
        )
        .await?;
    let mut worker = spawn_worker(
        &env,
        &[("AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT", &receiver.endpoint())],
    )?;
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 1, EVENT_TIMEOUT)
        .await?;
    ensure!(events.len() == 1, "one event, got {}", events.len());
    let sent = &events[0].attributes;
    let (trace, span_id, flags) = parts(sent.get("googclient_traceparent").context("a traceparent")?)?;
    assert_eq!(
        (trace.as_str(), flags.as_str()),
        (TRACE, "01"),
        "the input's trace, sampled"
    );
    assert_ne!(span_id, PARENT, "the worker's own span");
    assert_eq!(
        sent.get("googclient_tracestate").map(String::as_str),
        Some("upstream=1")
    );

    let process = format!("process {}", env.subscription);
    let ack = format!("ack {}", env.subscription);
    let spans = receiver
        .wait_for("the message's spans", SPAN_TIMEOUT, |spans| {
            named(spans, &process).is_some() && named(spans, &ack).is_some()
        })
        .await?;
    let root = named(&spans, &process).context("the message span")?;
    assert_eq!(root.trace_id, TRACE);
    assert_eq!(root.parent_span_id, PARENT, "a child of the input's span");
    assert_eq!(root.span_id, span_id, "the span the event names");
    assert_eq!(root.kind, "consumer");
    assert_eq!(root.service, "audio-store");
    assert!(!root.failed, "{root:?}");
    for (key, value) in [
        ("messaging.system", "gcp_pubsub"),
        ("messaging.operation.type", "process"),
        ("messaging.destination.name", env.subscription.as_str()),
        ("messaging.message.id", message_id.as_str()),
        ("audio_store.audio_id", audio_id_for("traced-1").as_str()),
    ] {
        assert_eq!(root.attribute(key), Some(value), "{key} of {root:?}");
    }
    let send = format!("send {}", env.stored_topic);
    let expected = BTreeSet::from([
        "check audio",
        "check thumbnail",
        "upload audio",
        "upload thumbnail",
        send.as_str(),
        ack.as_str(),
    ]);
    assert_eq!(children(&spans, root), expected);
    let publish = named(&spans, &send).context("the publish span")?;
    assert_eq!(publish.kind, "producer");
    assert_eq!(
        publish.attribute("messaging.destination.name"),
        Some(env.stored_topic.as_str())
    );
    ensure!(
        spans.iter().all(|span| span.trace_id == TRACE),
        "one trace: {spans:#?}"
    );

    // The log lines of the message's work name the trace for Cloud Logging.
    let log = worker.log()?;
    let stored = log
        .iter()
        .find(|line| line["message"] == "stored")
        .context("a 'stored' log line")?;
    assert_eq!(stored["trace_id"], TRACE);
    assert_eq!(stored["span_id"], span_id.as_str());
    assert_eq!(
        stored["logging.googleapis.com/trace"],
        format!("projects/{PROJECT}/traces/{TRACE}")
    );
    assert_eq!(stored["logging.googleapis.com/spanId"], span_id.as_str());
    assert_eq!(stored["span"]["message_id"], message_id.as_str());
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(Duration::from_secs(30)).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_carries_the_worker_span_and_replay_keeps_it() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new();
    env.create_resources().await?;
    let missing = env.spool_path("never-written.wav");
    env.pubsub
        .publish_json(
            &env.topic,
            &json!({"audio": missing}),
            &[("googclient_traceparent", &traceparent())],
        )
        .await?;
    let mut worker = spawn_worker(
        &env,
        &[("AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT", &receiver.endpoint())],
    )?;
    // Looked at, not acked: it stays for the replay below.
    let copy = wait_for("the dead letter", EVENT_TIMEOUT, || async {
        Ok(env
            .pubsub
            .pull(&env.dead_letter_subscription, 1)
            .await?
            .into_iter()
            .next())
    })
    .await?;
    env.pubsub
        .nack(&env.dead_letter_subscription, std::slice::from_ref(&copy.ack_id))
        .await?;
    assert_eq!(
        copy.attributes.get("error_kind").map(String::as_str),
        Some("source_missing")
    );
    let copied = copy
        .attributes
        .get("googclient_traceparent")
        .context("a traceparent on the copy")?
        .clone();
    let (trace, span_id, _) = parts(&copied)?;
    assert_eq!(trace, TRACE);

    let process = format!("process {}", env.subscription);
    let ack = format!("ack {}", env.subscription);
    let spans = receiver
        .wait_for("the failed message's spans", SPAN_TIMEOUT, |spans| {
            named(spans, &process).is_some() && named(spans, &ack).is_some()
        })
        .await?;
    let root = named(&spans, &process).context("the message span")?;
    assert_eq!(
        (root.span_id.as_str(), root.parent_span_id.as_str()),
        (span_id.as_str(), PARENT)
    );
    assert!(root.failed, "{root:?}");
    assert_eq!(root.attribute("error.type"), Some("source_missing"));
    let send = format!("send {}", env.dead_letter_topic);
    assert_eq!(
        children(&spans, root),
        BTreeSet::from(["check audio", send.as_str(), ack.as_str()])
    );
    assert!(named(&spans, "check audio").is_some_and(|check| check.failed));
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(Duration::from_secs(30)).await?, Some(0));

    // Replayed, the message still carries the copy's trace context.
    let (code, stdout, stderr) = replay(&env, &[]).await?;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    // The stopped worker's stream may still hold it on the emulator (real Pub/Sub would
    // redeliver after the ack deadline): pulled with its leases released.
    let replayed = env
        .pubsub
        .recover_unacked(&env.subscription, 1, EVENT_TIMEOUT)
        .await?;
    ensure!(
        replayed.len() == 1,
        "one replayed message, got {}: {stdout}",
        replayed.len()
    );
    assert_eq!(
        replayed[0].attributes.get("googclient_traceparent"),
        Some(&copied),
        "{:?}",
        replayed[0].attributes
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_the_worker_keeps_storing_and_counts_the_dropped_spans() -> anyhow::Result<()>
{
    // A port that nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let env = TestEnv::new();
    env.create_resources().await?;
    let mut ids = BTreeSet::new();
    for n in 0..3 {
        let audio = env.spool_file(&format!("down-{n}.wav"), &sample_wav(4_000 + n));
        let id = format!("down-{n}");
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": audio, "id": id}), &[])
            .await?;
        ids.insert(audio_id_for(&id));
    }
    let endpoint = format!("http://{closed}");
    let mut worker = spawn_worker(&env, &[("AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT", &endpoint)])?;
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 3, EVENT_TIMEOUT)
        .await?;
    let stored: BTreeSet<String> = events
        .iter()
        .map(|event| {
            Ok(event_json(event)?["audio_id"]
                .as_str()
                .context("audio_id")?
                .to_string())
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(stored, ids, "every message stored");
    // Every message has at least a process, a check, an upload, a send and an ack span.
    wait_for("every span counted as dropped", SPAN_TIMEOUT, || async {
        let dropped = worker.metric("audio_store_spans_dropped_total").await?;
        Ok(dropped.filter(|count| *count >= 15.0))
    })
    .await?;
    let warnings = worker
        .log()?
        .into_iter()
        .filter(|line| line["message"] == "span export failed; dropping spans until the collector answers")
        .count();
    assert_eq!(warnings, 1, "said once, not per batch");
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(Duration::from_secs(30)).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_ratio_of_zero_starts_no_trace_but_follows_a_sampled_parent() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new();
    env.create_resources().await?;
    for (id, attributes) in [
        ("untraced", vec![]),
        ("traced", vec![("googclient_traceparent", traceparent())]),
    ] {
        let audio = env.spool_file(&format!("{id}.wav"), &sample_wav(4_000));
        let attributes: Vec<(&str, &str)> = attributes.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": audio, "id": id}), &attributes)
            .await?;
    }
    let mut worker = spawn_worker(
        &env,
        &[
            ("AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT", &receiver.endpoint()),
            ("AUDIO_STORE__TELEMETRY__SAMPLE_RATIO", "0"),
        ],
    )?;
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 2, EVENT_TIMEOUT)
        .await?;
    ensure!(events.len() == 2, "two events, got {}", events.len());
    for event in &events {
        let id = event_json(event)?["audio_id"]
            .as_str()
            .context("audio_id")?
            .to_string();
        let (trace, _, flags) = parts(
            event
                .attributes
                .get("googclient_traceparent")
                .context("traceparent")?,
        )?;
        if id == audio_id_for("traced") {
            assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "01"));
        } else {
            assert_ne!(trace, TRACE);
            assert_eq!(flags, "00", "a new trace, not sampled");
        }
    }
    let ack = format!("ack {}", env.subscription);
    receiver
        .wait_for("the traced message's spans", SPAN_TIMEOUT, |spans| {
            named(spans, &ack).is_some()
        })
        .await?;
    worker.signal("-TERM").await?;
    assert_eq!(worker.exit_code(Duration::from_secs(30)).await?, Some(0));
    // Everything exported, the last spans flushed at exit included, is the sampled parent's trace.
    let spans = receiver.spans();
    ensure!(spans.iter().all(|span| span.trace_id == TRACE), "{spans:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_span_export_the_trace_context_reaches_the_event_unchanged() -> anyhow::Result<()> {
    let env = TestEnv::new();
    env.create_resources().await?;
    let plain = "00-11111111111111111111111111111111-2222222222222222-00";
    for (id, attributes) in [
        (
            "googclient",
            vec![
                ("googclient_traceparent", traceparent()),
                ("googclient_tracestate", "upstream=1".to_string()),
            ],
        ),
        ("plain", vec![("traceparent", plain.to_string())]),
        ("none", vec![]),
    ] {
        let audio = env.spool_file(&format!("{id}.wav"), &sample_wav(4_000));
        let attributes: Vec<(&str, &str)> = attributes.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.pubsub
            .publish_json(&env.topic, &json!({"audio": audio, "id": id}), &attributes)
            .await?;
    }
    let worker = Worker::start(settings(&env, &[])?);
    let events = env
        .pubsub
        .collect(&env.stored_subscription, 3, EVENT_TIMEOUT)
        .await?;
    worker.stop().await?;
    ensure!(events.len() == 3, "three events, got {}", events.len());
    for event in &events {
        let id = event_json(event)?["audio_id"]
            .as_str()
            .context("audio_id")?
            .to_string();
        let trace: Vec<(&str, &str)> = event
            .attributes
            .iter()
            .filter(|(key, _)| key.contains("trace"))
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let expected = if id == audio_id_for("googclient") {
            vec![
                ("googclient_traceparent", traceparent()),
                ("googclient_tracestate", "upstream=1".to_string()),
            ]
        } else if id == audio_id_for("plain") {
            vec![("googclient_traceparent", plain.to_string())]
        } else {
            vec![]
        };
        let expected: Vec<(&str, &str)> = expected.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(trace, expected, "{id}");
    }
    Ok(())
}
