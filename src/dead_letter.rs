//! Dead-letter copies: what the worker publishes for a permanent failure,
//! kept within Pub/Sub's limits so that the publish cannot be refused.
//!
//! Pub/Sub refuses an attribute value over 1,024 bytes and a message over
//! 10 MB (data plus attributes). The emulator enforces neither, so the limits
//! are applied here: the `error` attribute is cut at a character boundary to
//! fit, and a copy that would still be too large is published without its
//! data, with `data_dropped_bytes` saying how large the data was. A refused
//! dead-letter publish would be nacked and the message would come back, fail
//! and be refused again until Pub/Sub dead-lettered it itself; a copy without
//! data keeps the error, the attributes and the message id, and `replay`
//! leaves it alone (there is nothing to republish).
//!
//! Pub/Sub also refuses a message with more than 100 attributes. A copy, and a
//! replayed message, that would have more loses producer attributes until it
//! fits: never one that the worker or replay sets, nor `idempotency_key`,
//! `googclient_traceparent` and `googclient_tracestate` (the trace context)
//! or one of Pub/Sub's own dead-letter ones.
//! The others go in reverse order of their names (the last by byte order
//! first), so every delivery of one message loses the same ones, and
//! `attributes_dropped` says how many were lost in all.

use crate::envelope::Envelope;
use crate::event;
use std::collections::{BTreeMap, HashMap};

/// Set on a copy: the failure's kind (`ErrorKind::as_str`).
pub const ERROR_KIND: &str = "error_kind";
/// Set on a copy: the failure, one line, cut to fit [`MAX_ATTRIBUTE_BYTES`].
pub const ERROR: &str = "error";
/// The message id of the first delivery, kept through dead-lettering and
/// replays so that the message's identity never changes.
pub const ORIGINAL_MESSAGE_ID: &str = "original_message_id";
/// The publish time of the first delivery, kept likewise (dated layouts).
pub const ORIGINAL_PUBLISH_TIME: &str = "original_publish_time";
/// How often the message was replayed.
pub const REPLAY_COUNT: &str = "replay_count";
/// Prefix of the attributes Pub/Sub's own dead-lettering adds.
pub const PUBSUB_PREFIX: &str = "CloudPubSubDeadLetterSource";
/// Pub/Sub's own dead-lettering: the original publish time.
pub const PUBSUB_PUBLISH_TIME: &str = "CloudPubSubDeadLetterSourceTopicPublishTime";
/// Every attribute Pub/Sub's own dead-lettering adds (its documented names: a
/// prefix would let a producer's `CloudPubSubDeadLetterSource…` attributes
/// push a copy over the attribute limit).
const PUBSUB_OWN: [&str; 5] = [
    "CloudPubSubDeadLetterSourceDeliveryCount",
    "CloudPubSubDeadLetterSourceDeliveryErrorMessage",
    "CloudPubSubDeadLetterSourceSubscription",
    "CloudPubSubDeadLetterSourceSubscriptionProject",
    PUBSUB_PUBLISH_TIME,
];
/// The producer's idempotency key (identity when the data has no `id`).
pub const IDEMPOTENCY_KEY: &str = "idempotency_key";
/// The trace-context attributes of the Pub/Sub client libraries. Only these
/// two: any other `googclient_` name is the producer's, and a prefix would let
/// a producer's attributes push a copy over Pub/Sub's limit.
pub const TRACE_ATTRIBUTES: [&str; 2] = [
    crate::trace_context::TRACEPARENT,
    crate::trace_context::TRACESTATE,
];

/// Whether Pub/Sub itself dead-lettered the message (after too many deliveries).
pub fn by_pubsub(attributes: &HashMap<String, String>) -> bool {
    attributes.keys().any(|key| key.starts_with(PUBSUB_PREFIX))
}

pub use crate::envelope::MAX_ATTRIBUTE_BYTES;
/// The largest copy published with its data: Pub/Sub's 10 MB (10,000,000
/// bytes) message limit, less 64 KiB of headroom for the publish request's
/// own framing.
pub const MAX_COPY_BYTES: usize = 10_000_000 - 64 * 1024;
/// Set on a copy published without its data: the data's size in bytes.
pub const DATA_DROPPED_BYTES: &str = "data_dropped_bytes";
pub use crate::envelope::MAX_ATTRIBUTES;
/// Set on a copy or a replayed message that lost producer attributes to fit
/// [`MAX_ATTRIBUTES`]: how many it lost, counting earlier copies and replays.
pub const ATTRIBUTES_DROPPED: &str = "attributes_dropped";

/// A dead-letter copy, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The original data, or nothing when the copy would be too large.
    pub data: Vec<u8>,
    /// The original attributes plus `error_kind`, `error`, `original_message_id`
    /// and `original_publish_time` (and `data_dropped_bytes` without the data),
    /// at most [`MAX_ATTRIBUTES`] (with `attributes_dropped` when some had to go).
    pub attributes: Vec<(String, String)>,
}

/// The copy of `envelope` that records a failure: its kind (as in
/// `ErrorKind::as_str`) and its one-line description.
///
/// A message that was already replayed keeps its first `original_message_id`
/// and `original_publish_time`, so its identity never changes.
pub fn copy(envelope: &Envelope, error_kind: &str, error: &str) -> Copy {
    let mut attributes: BTreeMap<String, String> = envelope
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    attributes.insert(ERROR_KIND.into(), error_kind.into());
    attributes.insert(ERROR.into(), truncate(error, MAX_ATTRIBUTE_BYTES));
    attributes
        .entry(ORIGINAL_MESSAGE_ID.into())
        .or_insert_with(|| envelope.message_id.clone());
    if let Some(published) = envelope.publish_time {
        attributes
            .entry(ORIGINAL_PUBLISH_TIME.into())
            .or_insert_with(|| event::format_timestamp(published));
    }
    // Measured before attributes are dropped to fit their number: an upper bound.
    let attribute_bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    let data = if envelope.data.len() + attribute_bytes > MAX_COPY_BYTES {
        attributes.insert(DATA_DROPPED_BYTES.into(), envelope.data.len().to_string());
        Vec::new()
    } else {
        envelope.data.to_vec()
    };
    fit_attribute_count(&mut attributes);
    Copy {
        data,
        attributes: attributes.into_iter().collect(),
    }
}

/// Whether `key` is kept however many attributes there are: set by the worker
/// or replay, the producer's identity, trace context, or Pub/Sub's own.
fn is_never_dropped(key: &str) -> bool {
    [
        ERROR_KIND,
        ERROR,
        ORIGINAL_MESSAGE_ID,
        ORIGINAL_PUBLISH_TIME,
        REPLAY_COUNT,
        DATA_DROPPED_BYTES,
        ATTRIBUTES_DROPPED,
        IDEMPOTENCY_KEY,
    ]
    .contains(&key)
        || TRACE_ATTRIBUTES.contains(&key)
        || PUBSUB_OWN.contains(&key)
}

/// Drops producer attributes, the last by name first, until `attributes` fits
/// [`MAX_ATTRIBUTES`] with `attributes_dropped` (which adds the number dropped
/// to what an earlier copy or replay recorded). Unchanged when it fits.
fn fit_attribute_count(attributes: &mut BTreeMap<String, String>) {
    if attributes.len() <= MAX_ATTRIBUTES {
        return;
    }
    let earlier: u64 = attributes
        .get(ATTRIBUTES_DROPPED)
        .and_then(|count| count.parse().ok())
        .unwrap_or(0);
    let room = MAX_ATTRIBUTES - usize::from(!attributes.contains_key(ATTRIBUTES_DROPPED));
    let excess = attributes.len() - room;
    let dropped: Vec<String> = attributes
        .keys()
        .rev()
        .filter(|key| !is_never_dropped(key))
        .take(excess)
        .cloned()
        .collect();
    for key in &dropped {
        attributes.remove(key);
    }
    attributes.insert(
        ATTRIBUTES_DROPPED.into(),
        (earlier + dropped.len() as u64).to_string(),
    );
}

/// `text` if it fits `max_bytes`, otherwise its longest prefix that ends at a
/// character boundary and fits with a trailing `…`.
pub fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    const ELLIPSIS: &str = "…";
    let mut end = max_bytes.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..end])
}

/// The other direction, for `replay`: the attributes a replayed message carries.
/// How often the message was replayed before (`replay_count`, 0 when absent).
pub fn replay_count(attributes: &HashMap<String, String>) -> u64 {
    attributes
        .get(REPLAY_COUNT)
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}

/// The attributes a replayed message carries: the original ones, without the
/// dead-letter annotations, with `original_message_id` and
/// `original_publish_time` kept (or set from this copy) and `replay_count` + 1;
/// at most [`MAX_ATTRIBUTES`], as a copy.
///
/// A message Pub/Sub dead-lettered itself arrives under a new message id and
/// without the original one; unless the producer set `id` or
/// `idempotency_key`, its identity after replay is derived from this copy.
pub fn republished_attributes(envelope: &Envelope) -> BTreeMap<String, String> {
    let mut attributes: BTreeMap<String, String> = envelope
        .attributes
        .iter()
        .filter(|(key, _)| ![ERROR_KIND, ERROR].contains(&key.as_str()) && !key.starts_with(PUBSUB_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    attributes
        .entry(ORIGINAL_MESSAGE_ID.into())
        .or_insert_with(|| envelope.message_id.clone());
    let original_publish_time = envelope
        .attributes
        .get(ORIGINAL_PUBLISH_TIME)
        .or_else(|| envelope.attributes.get(PUBSUB_PUBLISH_TIME))
        .cloned()
        .or_else(|| envelope.publish_time.map(crate::event::format_timestamp));
    if let Some(time) = original_publish_time {
        attributes.insert(ORIGINAL_PUBLISH_TIME.into(), time);
    }
    attributes.insert(
        REPLAY_COUNT.into(),
        (replay_count(&envelope.attributes) + 1).to_string(),
    );
    fit_attribute_count(&mut attributes);
    attributes
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::error::Failure;

    fn attributes(copy: &Copy) -> BTreeMap<String, String> {
        copy.attributes.iter().cloned().collect()
    }

    #[test]
    fn a_copy_keeps_the_original_and_adds_the_error() {
        let mut envelope = Envelope {
            message_id: "42".into(),
            publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
            data: bytes::Bytes::from_static(b"{}"),
            ..Envelope::default()
        };
        envelope.attributes.insert("idempotency_key".into(), "k".into());
        let failure = Failure::new(
            ErrorKind::BadContent,
            "audio: /x.mp3 is not a recognised audio format",
        );
        let first = copy(&envelope, failure.kind().as_str(), failure.message());
        assert_eq!(first.data, b"{}");
        let attributes = attributes(&first);
        assert_eq!(attributes["idempotency_key"], "k");
        assert_eq!(attributes["error_kind"], "bad_content");
        assert_eq!(attributes["original_message_id"], "42");
        assert_eq!(attributes["original_publish_time"], "1970-01-01T00:00:00.000Z");
        assert!(!attributes.contains_key(DATA_DROPPED_BYTES));

        envelope.message_id = "43".into();
        envelope.attributes = attributes.into_iter().collect();
        let again = copy(&envelope, failure.kind().as_str(), failure.message());
        assert_eq!(
            super::tests::attributes(&again)["original_message_id"],
            "42",
            "a replayed message keeps its first id"
        );
    }

    #[test]
    fn a_long_error_is_cut_at_a_character_boundary_to_fit_an_attribute() {
        // 500 characters of three bytes each: 1,500 bytes.
        let failure = Failure::new(ErrorKind::SourceMissing, "音".repeat(500));
        assert!(failure.message().len() > MAX_ATTRIBUTE_BYTES);
        let error = attributes(&copy(
            &Envelope::default(),
            failure.kind().as_str(),
            failure.message(),
        ))["error"]
            .clone();
        assert!(error.len() <= MAX_ATTRIBUTE_BYTES, "{} bytes", error.len());
        assert!(error.len() > MAX_ATTRIBUTE_BYTES - 4, "as much as fits");
        assert!(error.ends_with('…') && error.trim_end_matches('…').chars().all(|c| c == '音'));
        assert_eq!(truncate("short", MAX_ATTRIBUTE_BYTES), "short");
    }

    #[test]
    fn every_added_attribute_fits() {
        let envelope = Envelope {
            message_id: "1".repeat(64),
            publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
            ..Envelope::default()
        };
        let failure = Failure::new(ErrorKind::InvalidJson, "é".repeat(5_000));
        for (key, value) in copy(&envelope, failure.kind().as_str(), failure.message()).attributes {
            assert!(value.len() <= MAX_ATTRIBUTE_BYTES, "{key}: {} bytes", value.len());
        }
    }

    #[test]
    fn a_copy_over_the_message_limit_goes_without_its_data() {
        let envelope = Envelope {
            message_id: "7".into(),
            data: bytes::Bytes::from(vec![b'x'; MAX_COPY_BYTES]),
            ..Envelope::default()
        };
        let failure = Failure::new(ErrorKind::InvalidJson, "data is not valid JSON");
        let copy = copy(&envelope, failure.kind().as_str(), failure.message());
        assert!(copy.data.is_empty());
        let attributes = attributes(&copy);
        assert_eq!(attributes[DATA_DROPPED_BYTES], MAX_COPY_BYTES.to_string());
        assert_eq!(attributes["error_kind"], "invalid_json");
    }

    /// `count` producer attributes `attr-000`, `attr-001`, …, and an
    /// `idempotency_key` and two trace attributes among them.
    fn many_attributes(count: usize) -> HashMap<String, String> {
        let mut attributes: HashMap<String, String> = (0..count - 3)
            .map(|index| (format!("attr-{index:03}"), "v".to_string()))
            .collect();
        for key in [IDEMPOTENCY_KEY, "googclient_traceparent", "googclient_tracestate"] {
            attributes.insert(key.into(), "kept".into());
        }
        attributes
    }

    #[test]
    fn a_copy_of_a_message_with_100_attributes_drops_the_last_producer_attributes_by_name() {
        for (data_bytes, dropped) in [(2, 5), (MAX_COPY_BYTES, 6)] {
            let envelope = Envelope {
                message_id: "7".into(),
                publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
                data: bytes::Bytes::from(vec![b'x'; data_bytes]),
                attributes: many_attributes(MAX_ATTRIBUTES),
                delivery_attempt: None,
            };
            let copy = copy(&envelope, "invalid_json", "data is not valid JSON");
            let attributes = attributes(&copy);
            assert_eq!(attributes.len(), MAX_ATTRIBUTES, "{attributes:?}");
            assert_eq!(attributes[ATTRIBUTES_DROPPED], dropped.to_string());
            for key in [
                ERROR_KIND,
                ERROR,
                ORIGINAL_MESSAGE_ID,
                ORIGINAL_PUBLISH_TIME,
                IDEMPOTENCY_KEY,
                "googclient_traceparent",
                "googclient_tracestate",
            ] {
                assert!(attributes.contains_key(key), "{key} kept");
            }
            // 97 producer attributes attr-000..=attr-096: the last ones by name go.
            let kept = 97 - dropped;
            assert!(attributes.contains_key(&format!("attr-{:03}", kept - 1)));
            assert!(!attributes.contains_key(&format!("attr-{kept:03}")));
            assert_eq!(copy.data.is_empty(), data_bytes == MAX_COPY_BYTES);
            assert_eq!(
                super::copy(&envelope, "invalid_json", "data is not valid JSON"),
                copy
            );
        }
    }

    #[test]
    fn a_copy_of_a_message_whose_100_attributes_all_start_with_googclient_still_fits() {
        // Only the two trace-context attributes are the client libraries'; other
        // `googclient_` names are the producer's and may go like any other.
        let mut producer: HashMap<String, String> = (0..98)
            .map(|index| (format!("googclient_x{index:03}"), "v".to_string()))
            .collect();
        producer.insert("googclient_traceparent".into(), "kept".into());
        producer.insert("googclient_tracestate".into(), "kept".into());
        let envelope = Envelope {
            message_id: "7".into(),
            publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
            attributes: producer,
            ..Envelope::default()
        };
        let attributes = attributes(&copy(&envelope, "invalid_json", "not JSON"));
        assert_eq!(attributes.len(), MAX_ATTRIBUTES, "{attributes:?}");
        assert_eq!(attributes[ATTRIBUTES_DROPPED], "5");
        assert!(attributes.contains_key("googclient_traceparent"));
        assert!(attributes.contains_key("googclient_tracestate"));
        assert!(attributes.contains_key("googclient_x092") && !attributes.contains_key("googclient_x093"));
    }

    #[test]
    fn producer_attributes_named_like_pubsubs_own_cannot_push_a_copy_over_100() {
        let mut producer: HashMap<String, String> = (0..99)
            .map(|index| (format!("{PUBSUB_PREFIX}X{index:03}"), "v".to_string()))
            .collect();
        producer.insert(PUBSUB_PUBLISH_TIME.into(), "2025-01-02T03:04:05Z".into());
        let envelope = Envelope {
            message_id: "7".into(),
            attributes: producer,
            ..Envelope::default()
        };
        let attributes = attributes(&copy(&envelope, "invalid_json", "not JSON"));
        assert_eq!(attributes.len(), MAX_ATTRIBUTES, "{attributes:?}");
        assert_eq!(attributes[PUBSUB_PUBLISH_TIME], "2025-01-02T03:04:05Z");
    }

    #[test]
    fn a_copy_that_fits_100_attributes_loses_none() {
        let envelope = Envelope {
            message_id: "7".into(),
            publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
            attributes: many_attributes(MAX_ATTRIBUTES - 4),
            ..Envelope::default()
        };
        let attributes = attributes(&copy(&envelope, "invalid_json", "not JSON"));
        assert_eq!(attributes.len(), MAX_ATTRIBUTES);
        assert!(!attributes.contains_key(ATTRIBUTES_DROPPED));
    }

    #[test]
    fn a_replayed_message_with_100_attributes_drops_producer_attributes_to_fit() {
        let mut dead_letter = envelope(&[]);
        dead_letter.attributes = many_attributes(MAX_ATTRIBUTES);
        let attributes = republished_attributes(&dead_letter);
        assert_eq!(attributes.len(), MAX_ATTRIBUTES, "{attributes:?}");
        // original_message_id, original_publish_time and replay_count added, and the count itself.
        assert_eq!(attributes[ATTRIBUTES_DROPPED], "4");
        for key in [
            ORIGINAL_MESSAGE_ID,
            ORIGINAL_PUBLISH_TIME,
            REPLAY_COUNT,
            IDEMPOTENCY_KEY,
        ] {
            assert!(attributes.contains_key(key), "{key} kept");
        }
        assert!(attributes.contains_key("attr-092") && !attributes.contains_key("attr-093"));

        // Three more producer attributes on the next round: three more dropped, and the count adds up.
        dead_letter.attributes = attributes.into_iter().collect();
        for index in 0..3 {
            dead_letter.attributes.insert(format!("more-{index}"), "v".into());
        }
        let again = republished_attributes(&dead_letter);
        assert_eq!(again.len(), MAX_ATTRIBUTES, "{again:?}");
        assert_eq!(again[ATTRIBUTES_DROPPED], "7");
    }

    /// A dead-letter copy as `replay` pulls it, with `attributes`.
    pub(crate) fn envelope(attributes: &[(&str, &str)]) -> Envelope {
        Envelope {
            message_id: "dlq-7".into(),
            data: bytes::Bytes::from_static(br#"{"audio": "/spool/a.wav", "thumbnail": "gs://s/c.png"}"#),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
            delivery_attempt: None,
        }
    }

    #[test]
    fn our_dead_letters_keep_their_original_id_and_lose_the_error() {
        let attributes = republished_attributes(&envelope(&[
            ("error_kind", "source_missing"),
            ("error", "audio: /spool/a.wav does not exist"),
            ("original_message_id", "42"),
            ("original_publish_time", "2026-01-01T00:00:00.000Z"),
            ("idempotency_key", "k"),
        ]));
        assert_eq!(
            attributes.get("original_message_id").map(String::as_str),
            Some("42")
        );
        assert_eq!(attributes.get("replay_count").map(String::as_str), Some("1"));
        assert_eq!(attributes.get("idempotency_key").map(String::as_str), Some("k"));
        assert_eq!(
            attributes.get("original_publish_time").map(String::as_str),
            Some("2026-01-01T00:00:00.000Z")
        );
        assert!(!attributes.contains_key("error_kind") && !attributes.contains_key("error"));
    }

    #[test]
    fn the_replay_count_goes_up_each_time() {
        let attributes =
            republished_attributes(&envelope(&[("original_message_id", "42"), ("replay_count", "2")]));
        assert_eq!(attributes.get("replay_count").map(String::as_str), Some("3"));
    }
}
