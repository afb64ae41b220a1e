//! Replay: moves dead-lettered messages back to the input topic.
//!
//! Each message's data and attributes are republished with
//! `original_message_id` kept (so the worker's identity makes the replay
//! idempotent) and `replay_count` incremented; the dead-letter copy is acked
//! only after the republish is confirmed, so a crash mid-replay loses nothing
//! (at worst a message is moved twice, which identity makes harmless).
//! Messages that are not moved (filtered out, or a dry run) are held until
//! the end and then released, untouched, back to the dead-letter subscription.
//!
//! A run terminates while the worker runs and moves each dead letter at most
//! once: a message that reached the dead-letter subscription after the run
//! started (by its publish time), or whose `original_message_id` this run
//! already moved, is deferred — held and released at the end, for the next
//! run. Without that, a message that fails again would come back under a new
//! message id and be moved again and again.

use crate::config::Settings;
use crate::dead_letter;
use crate::envelope::Envelope;
use crate::error::{self, ErrorKind, chain};
use crate::pubsub::{self, Delivery, Inbox, Outbox, PubsubError};
use serde::Serialize;
use std::collections::HashSet;
use std::time::Duration;

/// The error kind shown for messages Pub/Sub itself dead-lettered after too many deliveries.
pub const MAX_DELIVERY_ATTEMPTS: &str = "max_delivery_attempts";

/// The names `--error-kind` accepts: every [`ErrorKind`] and [`MAX_DELIVERY_ATTEMPTS`].
pub fn error_kind_names() -> Vec<&'static str> {
    ErrorKind::ALL
        .iter()
        .map(|kind| kind.as_str())
        .chain([MAX_DELIVERY_ATTEMPTS])
        .collect()
}

/// A pace of at most so many moves per second, checked when it is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    period: Duration,
}

impl Rate {
    /// The slowest pace accepted, in messages per second (one every 1,000 s).
    pub const MIN: f64 = 0.001;
    /// The fastest pace accepted, in messages per second.
    pub const MAX: f64 = 10_000.0;

    /// At most `per_second` moves per second: a finite number from [`Rate::MIN`] to [`Rate::MAX`].
    pub fn per_second(per_second: f64) -> Result<Rate, String> {
        if !(per_second.is_finite() && (Rate::MIN..=Rate::MAX).contains(&per_second)) {
            return Err(format!(
                "expected messages per second from {} to {}, got {per_second}",
                Rate::MIN,
                Rate::MAX
            ));
        }
        Ok(Rate {
            period: Duration::from_secs_f64(1.0 / per_second),
        })
    }

    /// The time between two moves.
    pub fn period(self) -> Duration {
        self.period
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let per_second: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("expected a number of messages per second, got {text:?}"))?;
        Rate::per_second(per_second)
    }
}

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The dead-letter subscription, `projects/P/subscriptions/S`.
    pub subscription: String,
    /// The input topic, `projects/P/topics/T`.
    pub topic: String,
    /// Stop after moving this many.
    pub limit: Option<u64>,
    /// At most this many moves per second.
    pub rate: Option<Rate>,
    /// Move only messages of this error kind (`max_delivery_attempts` for Pub/Sub's own).
    pub error_kind: Option<String>,
    /// List what would move, move nothing.
    pub dry_run: bool,
    /// How long an empty subscription must stay empty to count as drained.
    pub idle: Duration,
}

/// What happened to one dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Republished and acked.
    Moved,
    /// Would be moved (dry run).
    WouldMove,
    /// Left in the dead-letter subscription (filtered out, or its data was not kept).
    Skipped,
    /// Left for the next run: it reached the dead-letter subscription after this
    /// run started, or this run already moved its `original_message_id`.
    Deferred,
    /// The republish failed; left in the dead-letter subscription.
    Failed,
}

/// One dead-lettered message as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The dead-letter copy's message id.
    pub message_id: String,
    /// The id the identity is derived from (`original_message_id`).
    pub original_message_id: String,
    /// Why it was dead-lettered.
    pub error_kind: String,
    /// The one-line error, where the worker recorded one.
    pub error: Option<String>,
    /// Seconds since it was dead-lettered.
    pub age_seconds: Option<i64>,
    /// The `audio` and `thumbnail` sources, where the data names them.
    pub sources: Vec<String>,
    /// How often it was replayed before.
    pub replay_count: u64,
    /// What this run did with it.
    pub action: Action,
    /// Why a move failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Republished and acked (or, in a dry run, would be).
    pub moved: u64,
    /// Left alone: by the filter, deferred to the next run, or without data.
    pub skipped: u64,
    /// Republish failed.
    pub failed: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The dead-letter subscription does not exist.
    #[error("dead-letter subscription {0} does not exist")]
    NoSubscription(String),
    /// The input topic does not exist.
    #[error("input topic {0} does not exist")]
    NoTopic(String),
    /// Pub/Sub failed otherwise.
    #[error(transparent)]
    Pubsub(#[from] PubsubError),
}

/// Receives each entry as it is decided, for progress output.
pub trait Reporter {
    /// One message was handled.
    fn entry(&mut self, entry: &Entry);

    /// The run is over.
    fn finish(&self, summary: &Summary);
}

/// Runs a replay until the subscription is drained (idle) or the limit is reached.
pub async fn run(
    settings: &Settings,
    options: &ReplayOptions,
    reporter: &mut dyn Reporter,
) -> Result<Summary, ReplayError> {
    let mut inbox = Inbox::open_subscription(&settings.pubsub, &options.subscription, 1_000).await?;
    let outbox = Outbox::connect(&settings.pubsub, &options.topic, pubsub::QUICK_BATCHING).await?;
    let mut summary = Summary {
        dry_run: options.dry_run,
        ..Summary::default()
    };
    let mut held: Vec<Delivery> = Vec::new();
    let mut seen = HashSet::new();
    let started = jiff::Timestamp::now();
    let mut moved_originals = HashSet::new();
    let mut pacing = options.rate.map(|rate| {
        let mut interval = tokio::time::interval(rate.period());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let result = loop {
        if options.limit.is_some_and(|limit| summary.moved >= limit) {
            break Ok(());
        }
        let next = match tokio::time::timeout(options.idle, inbox.next()).await {
            Err(_) | Ok(None) => break Ok(()), // idle for `options.idle`: drained
            Ok(Some(Err(error))) if error::ends_the_run(&error) => {
                break Err(ReplayError::NoSubscription(options.subscription.clone()));
            }
            Ok(Some(Err(error))) => break Err(error.into()),
            Ok(Some(Ok(next))) => next,
        };
        let (envelope, delivery) = next;
        if !seen.insert(envelope.message_id.clone()) {
            // Delivered again within this run (a lease ran out): already counted.
            held.push(delivery);
            continue;
        }
        let mut entry = describe(&envelope);
        let wanted = options
            .error_kind
            .as_ref()
            .is_none_or(|kind| *kind == entry.error_kind);
        let came_back = envelope.publish_time.is_some_and(|published| published > started)
            || moved_originals.contains(&entry.original_message_id);
        let dropped = envelope.attributes.get(dead_letter::DATA_DROPPED_BYTES);
        if !wanted {
            entry.action = Action::Skipped;
            summary.skipped += 1;
            held.push(delivery);
        } else if came_back {
            entry.action = Action::Deferred;
            summary.skipped += 1;
            held.push(delivery);
        } else if let Some(bytes) = dropped {
            entry.action = Action::Skipped;
            entry.failure = Some(format!(
                "the dead-letter copy does not hold the data ({bytes} bytes, over the message size limit)"
            ));
            summary.skipped += 1;
            held.push(delivery);
        } else if options.dry_run {
            moved_originals.insert(entry.original_message_id.clone());
            entry.action = Action::WouldMove;
            summary.moved += 1;
            held.push(delivery);
        } else {
            if let Some(pacing) = &mut pacing {
                pacing.tick().await;
            }
            match outbox
                .publish(
                    envelope.data.to_vec(),
                    dead_letter::republished_attributes(&envelope),
                )
                .await
            {
                Ok(_) => match delivery.ack().await {
                    Ok(()) => {
                        entry.action = Action::Moved;
                        summary.moved += 1;
                        moved_originals.insert(entry.original_message_id.clone());
                    }
                    Err(error) => {
                        // Republished but still in the dead-letter subscription: it may move twice.
                        entry.action = Action::Failed;
                        entry.failure = Some(format!("republished, but the ack failed: {}", chain(&error)));
                        moved_originals.insert(entry.original_message_id.clone());
                        summary.failed += 1;
                    }
                },
                Err(error) if error::ends_the_run(&error) => {
                    held.push(delivery);
                    break Err(ReplayError::NoTopic(options.topic.clone()));
                }
                Err(error) => {
                    entry.action = Action::Failed;
                    entry.failure = Some(chain(&error).to_string());
                    summary.failed += 1;
                    held.push(delivery);
                }
            }
        }
        reporter.entry(&entry);
    };
    // Everything not moved goes back to the dead-letter subscription untouched.
    for delivery in held {
        delivery.nack();
    }
    outbox.flush().await;
    let closer = inbox.closer();
    if tokio::time::timeout(Duration::from_secs(10), closer.close())
        .await
        .is_err()
    {
        tracing::warn!("pending acks were not flushed in time");
    }
    result.map(|()| summary)
}

/// What the operator needs to know about one dead-lettered message.
fn describe(envelope: &Envelope) -> Entry {
    let attribute = |name: &str| envelope.attributes.get(name).cloned();
    let error_kind = attribute(dead_letter::ERROR_KIND).unwrap_or_else(|| {
        if dead_letter::by_pubsub(&envelope.attributes) {
            MAX_DELIVERY_ATTEMPTS.to_string()
        } else {
            "unknown".to_string()
        }
    });
    let sources = serde_json::from_slice::<serde_json::Value>(&envelope.data)
        .ok()
        .map(|data| {
            ["audio", "thumbnail"]
                .iter()
                .filter_map(|field| data.get(field).and_then(|v| v.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Entry {
        message_id: envelope.message_id.clone(),
        original_message_id: attribute(dead_letter::ORIGINAL_MESSAGE_ID)
            .unwrap_or_else(|| envelope.message_id.clone()),
        error_kind,
        error: attribute(dead_letter::ERROR),
        age_seconds: envelope
            .publish_time
            .map(|published| (jiff::Timestamp::now() - published).get_seconds()),
        sources,
        replay_count: dead_letter::replay_count(&envelope.attributes),
        action: Action::Skipped,
        failure: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::tests::envelope;

    #[test]
    fn a_rate_is_a_finite_positive_pace_within_bounds() {
        for accepted in ["1", "0.5", "50", "10000", "0.001"] {
            assert!(accepted.parse::<Rate>().is_ok(), "{accepted}");
        }
        for rejected in ["inf", "1e10", "0", "1e-30", "-1", "NaN", "fast", ""] {
            assert!(rejected.parse::<Rate>().is_err(), "{rejected}");
        }
        assert_eq!(
            Rate::per_second(4.0).map(Rate::period),
            Ok(Duration::from_millis(250))
        );
    }

    #[test]
    fn every_error_kind_and_max_delivery_attempts_can_be_selected() {
        let names = error_kind_names();
        assert!(names.contains(&"source_missing") && names.contains(&MAX_DELIVERY_ATTEMPTS));
        assert_eq!(names.len(), ErrorKind::ALL.len() + 1);
    }

    #[test]
    fn pubsub_dead_letters_are_recognised_and_their_annotations_dropped() {
        let envelope = envelope(&[
            ("CloudPubSubDeadLetterSourceDeliveryCount", "5"),
            ("CloudPubSubDeadLetterSourceSubscription", "in-sub"),
            (
                "CloudPubSubDeadLetterSourceTopicPublishTime",
                "2026-02-03T04:05:06.789Z",
            ),
        ]);
        let entry = describe(&envelope);
        assert_eq!(entry.error_kind, MAX_DELIVERY_ATTEMPTS);
        assert_eq!(entry.sources, vec!["/spool/a.wav", "gs://s/c.png"]);
        let attributes = dead_letter::republished_attributes(&envelope);
        assert!(
            attributes
                .keys()
                .all(|k| !k.starts_with(dead_letter::PUBSUB_PREFIX)),
            "{attributes:?}"
        );
        assert_eq!(
            attributes.get("original_message_id").map(String::as_str),
            Some("dlq-7")
        );
        assert_eq!(
            attributes.get("original_publish_time").map(String::as_str),
            Some("2026-02-03T04:05:06.789Z")
        );
    }
}

/// Output for people: a progress line per message, or a progress bar on a terminal.
pub struct TextReporter {
    bar: Option<indicatif::ProgressBar>,
}

impl TextReporter {
    /// A progress bar when stderr is a terminal, plain lines on stdout otherwise.
    pub fn new() -> TextReporter {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed} {pos} messages {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        TextReporter { bar }
    }
}

impl Default for TextReporter {
    fn default() -> Self {
        TextReporter::new()
    }
}

impl Reporter for TextReporter {
    fn finish(&self, summary: &Summary) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let verb = if summary.dry_run { "would move" } else { "moved" };
        println!(
            "{verb} {}, skipped {}, failed {}",
            summary.moved, summary.skipped, summary.failed
        );
    }

    fn entry(&mut self, entry: &Entry) {
        let action = match entry.action {
            Action::Moved => "moved",
            Action::WouldMove => "would move",
            Action::Skipped => "skipped",
            Action::Deferred => "deferred",
            Action::Failed => "FAILED",
        };
        let age = entry
            .age_seconds
            .map(|seconds| humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string())
            .unwrap_or_else(|| "?".into());
        let mut line = format!(
            "{action:<10} {} kind={} age={age} sources=[{}]",
            entry.message_id,
            entry.error_kind,
            entry.sources.join(", ")
        );
        if let Some(error) = &entry.error {
            line.push_str(&format!(" error={error:?}"));
        }
        if let Some(failure) = &entry.failure {
            line.push_str(&format!(" failure={failure:?}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.println(line);
            }
            None => println!("{line}"),
        }
    }
}

/// Output for scripts: one JSON object per message, then the summary as `{"summary": …}`.
#[derive(Debug, Default)]
pub struct JsonReporter;

impl Reporter for JsonReporter {
    fn finish(&self, summary: &Summary) {
        println!("{}", serde_json::json!({ "summary": summary }));
    }

    fn entry(&mut self, entry: &Entry) {
        println!(
            "{}",
            serde_json::to_string(entry).expect("an entry of strings and numbers always serialises")
        );
    }
}
