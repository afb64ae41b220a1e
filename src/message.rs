//! The input: an "audio processed" Pub/Sub message, parsed once into a
//! [`AudioMessage`] that cannot hold an invalid value.

use crate::dead_letter;
use crate::envelope::Envelope;
use crate::identity::{AudioId, IdentityKey};
use crate::source::{Source, SourceError};
use std::collections::BTreeMap;

/// Most entries a message's `metadata` may have.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Most bytes of keys and values together (GCS allows 8 KiB of custom metadata, we add our own).
pub const MAX_METADATA_BYTES: usize = 6 * 1024;
/// Metadata keys the worker writes itself; a message may not set them, nor
/// anything that differs from one of them only by case, whitespace or
/// invisible characters (see [`is_reserved`]).
pub const RESERVED_METADATA_KEYS: [&str; 10] = [
    "audio-id",
    "kind",
    "source-uri",
    "source-message-id",
    "codec",
    "sample-rate",
    "channels",
    "duration-ms",
    "width",
    "height",
];

/// Why a message's data is not a valid "audio processed" message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Not UTF-8 JSON at all.
    #[error("data is not valid JSON: {0}")]
    InvalidJson(String),
    /// JSON, but not the schema.
    #[error("{0}")]
    Invalid(String),
    /// A source field that cannot be used.
    #[error("{field}: {error}")]
    Source {
        /// `audio` or `thumbnail`.
        field: &'static str,
        /// What is wrong with it.
        error: SourceError,
    },
}

/// A valid "audio processed" message.
#[derive(Debug, Clone)]
pub struct AudioMessage {
    /// The Pub/Sub message id of this delivery.
    pub message_id: String,
    /// The deterministic identity.
    pub audio_id: AudioId,
    /// The audio file.
    pub audio: Source,
    /// The cover image, if any.
    pub thumbnail: Option<Source>,
    /// `audio` exactly as the message sent it, echoed in the stored event.
    pub audio_as_sent: String,
    /// `thumbnail` exactly as the message sent it.
    pub thumbnail_as_sent: Option<String>,
    /// Producer metadata, copied to objects and the event.
    pub metadata: BTreeMap<String, String>,
    /// The publish time of the original message (kept across dead-letter replays), for `{yyyy}` `{mm}` `{dd}`.
    pub published: jiff::Timestamp,
}

impl AudioMessage {
    /// Parses and validates `envelope`; `staging_buckets` are the buckets `gs://` sources may name.
    pub fn parse(envelope: &Envelope, staging_buckets: &[String]) -> Result<AudioMessage, MessageError> {
        let value: serde_json::Value = serde_json::from_slice(&envelope.data)
            .map_err(|error| MessageError::InvalidJson(error.to_string()))?;
        let serde_json::Value::Object(fields) = value else {
            return Err(MessageError::Invalid(format!(
                "data must be a JSON object, got {}",
                json_type(&value)
            )));
        };
        let (audio, audio_as_sent) = match fields.get("audio") {
            None | Some(serde_json::Value::Null) => {
                return Err(MessageError::Invalid("audio is required".into()));
            }
            Some(serde_json::Value::String(text)) => (
                Source::parse(text, staging_buckets).map_err(|error| MessageError::Source {
                    field: "audio",
                    error,
                })?,
                text.clone(),
            ),
            Some(other) => {
                return Err(MessageError::Invalid(format!(
                    "audio must be a string, got {}",
                    json_type(other)
                )));
            }
        };
        let thumbnail = match fields.get("thumbnail") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(text)) if text.is_empty() => None,
            Some(serde_json::Value::String(text)) => Some((
                Source::parse(text, staging_buckets).map_err(|error| MessageError::Source {
                    field: "thumbnail",
                    error,
                })?,
                text.clone(),
            )),
            Some(other) => {
                return Err(MessageError::Invalid(format!(
                    "thumbnail must be a string or null, got {}",
                    json_type(other)
                )));
            }
        };
        let id = match fields.get("id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(text)) => Some(text.as_str()),
            Some(other) => {
                return Err(MessageError::Invalid(format!(
                    "id must be a string, got {}",
                    json_type(other)
                )));
            }
        };
        let metadata = parse_metadata(fields.get("metadata"))?;

        let attribute = |name: &str| envelope.attributes.get(name).map(String::as_str);
        let key = IdentityKey::choose(
            id,
            attribute(dead_letter::IDEMPOTENCY_KEY),
            attribute(dead_letter::ORIGINAL_MESSAGE_ID),
            &envelope.message_id,
        );
        Ok(AudioMessage {
            message_id: envelope.message_id.clone(),
            audio_id: AudioId::from_key(key),
            audio,
            audio_as_sent,
            thumbnail_as_sent: thumbnail.as_ref().map(|(_, text)| text.clone()),
            thumbnail: thumbnail.map(|(source, _)| source),
            metadata,
            published: original_publish_time(envelope),
        })
    }
}

/// The original publish time: kept by our dead-lettering and replay
/// (`original_publish_time`) and by Pub/Sub's
/// (`CloudPubSubDeadLetterSourceTopicPublishTime`), so a replay lands under
/// the same date-based names as the first attempt would have.
fn original_publish_time(envelope: &Envelope) -> jiff::Timestamp {
    [
        dead_letter::ORIGINAL_PUBLISH_TIME,
        dead_letter::PUBSUB_PUBLISH_TIME,
    ]
    .iter()
    .filter_map(|name| envelope.attributes.get(*name))
    .find_map(|text| parse_publish_time(text))
    .or(envelope.publish_time)
    .unwrap_or_else(jiff::Timestamp::now)
}

/// A publish time as an attribute carries it: RFC 3339 (what we write, and what
/// the emulator's dead-lettering writes), or the other spellings a service may
/// use (`2025-01-02 03:04:05.678 +0000 UTC`, seconds or milliseconds since the
/// epoch), so that a replay never silently falls back to today's date.
pub fn parse_publish_time(text: &str) -> Option<jiff::Timestamp> {
    let text = text.trim();
    if let Ok(timestamp) = text.parse::<jiff::Timestamp>() {
        return Some(timestamp);
    }
    let civil = text
        .trim_end_matches(" UTC")
        .trim_end_matches(" +0000")
        .trim_end_matches(" +00:00")
        .replacen(' ', "T", 1);
    if let Ok(datetime) = civil.parse::<jiff::civil::DateTime>() {
        return datetime
            .to_zoned(jiff::tz::TimeZone::UTC)
            .ok()
            .map(|zoned| zoned.timestamp());
    }
    let number: f64 = text.parse().ok().filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    let seconds = if number < 1e11 { number } else { number / 1_000.0 };
    jiff::Timestamp::from_microsecond((seconds * 1e6).round() as i64).ok()
}

fn parse_metadata(value: Option<&serde_json::Value>) -> Result<BTreeMap<String, String>, MessageError> {
    let entries = match value {
        None | Some(serde_json::Value::Null) => return Ok(BTreeMap::new()),
        Some(serde_json::Value::Object(entries)) => entries,
        Some(other) => {
            return Err(MessageError::Invalid(format!(
                "metadata must be an object of strings, got {}",
                json_type(other)
            )));
        }
    };
    if entries.len() > MAX_METADATA_ENTRIES {
        return Err(MessageError::Invalid(format!(
            "metadata has {} entries, at most {MAX_METADATA_ENTRIES} are allowed",
            entries.len()
        )));
    }
    let mut metadata = BTreeMap::new();
    let mut bytes = 0;
    for (key, value) in entries {
        let serde_json::Value::String(text) = value else {
            return Err(MessageError::Invalid(format!(
                "metadata.{key} must be a string, got {}",
                json_type(value)
            )));
        };
        if key.is_empty() || key.len() > 128 || key.chars().any(|c| c.is_control()) {
            return Err(MessageError::Invalid(format!(
                "metadata key {key:?} must be 1-128 characters without control characters"
            )));
        }
        if is_reserved(key) {
            return Err(MessageError::Invalid(format!(
                "metadata key {key:?} is reserved for audio-store"
            )));
        }
        bytes += key.len() + text.len();
        metadata.insert(key.clone(), text.clone());
    }
    if bytes > MAX_METADATA_BYTES {
        return Err(MessageError::Invalid(format!(
            "metadata is {bytes} bytes, at most {MAX_METADATA_BYTES} are allowed"
        )));
    }
    Ok(metadata)
}

/// Whether `key` is one of [`RESERVED_METADATA_KEYS`] once case, whitespace and
/// invisible characters (format characters such as zero-width spaces, soft
/// hyphens and byte-order marks, and variation selectors) are ignored.
pub fn is_reserved(key: &str) -> bool {
    let visible: String = key
        .chars()
        .filter(|c| !c.is_whitespace() && !is_invisible(*c))
        .map(compatibility_form)
        .flat_map(char::to_lowercase)
        .collect();
    RESERVED_METADATA_KEYS.contains(&visible.as_str())
}

/// The plain character that a compatibility form stands for: fullwidth ASCII,
/// the long s, and the dashes and minus signs that look like a hyphen.
fn compatibility_form(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        '\u{017F}' => 's',
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' => '-',
        other => other,
    }
}

/// Characters that render as nothing: Unicode format characters (Cf) and variation selectors.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{2800}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
}

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn envelope(data: &str) -> Envelope {
        Envelope {
            message_id: "1001".into(),
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
            attributes: HashMap::new(),
            publish_time: Some(jiff::Timestamp::UNIX_EPOCH),
            delivery_attempt: None,
        }
    }

    fn staging() -> Vec<String> {
        vec!["audio-staging".to_string()]
    }

    #[test]
    fn a_full_message_parses() -> Result<(), MessageError> {
        let message = AudioMessage::parse(
            &envelope(
                r#"{"audio": "/var/spool/audio/7f3c.flac", "thumbnail": "gs://audio-staging/7f3c/cover.jpg",
                    "id": "track-7f3c", "metadata": {"user_id": "u123"}, "extra": true}"#,
            ),
            &staging(),
        )?;
        assert_eq!(message.audio, Source::Local("/var/spool/audio/7f3c.flac".into()));
        assert_eq!(
            message.thumbnail,
            Some(Source::Gcs {
                bucket: "audio-staging".into(),
                object: "7f3c/cover.jpg".into()
            })
        );
        assert_eq!(
            message.audio_id,
            AudioId::from_key(IdentityKey::Producer("track-7f3c"))
        );
        assert_eq!(message.metadata.get("user_id").map(String::as_str), Some("u123"));
        Ok(())
    }

    #[test]
    fn without_keys_the_message_id_is_the_identity() -> Result<(), MessageError> {
        let message = AudioMessage::parse(&envelope(r#"{"audio": "/a/b.wav"}"#), &staging())?;
        assert_eq!(
            message.audio_id,
            AudioId::from_key(IdentityKey::MessageId("1001"))
        );
        assert_eq!(message.thumbnail, None);
        Ok(())
    }

    #[test]
    fn the_idempotency_key_attribute_is_the_identity_when_id_is_absent() -> Result<(), MessageError> {
        let mut envelope = envelope(r#"{"audio": "/a/b.wav"}"#);
        envelope.attributes.insert("idempotency_key".into(), "k-1".into());
        let message = AudioMessage::parse(&envelope, &staging())?;
        assert_eq!(message.audio_id, AudioId::from_key(IdentityKey::Producer("k-1")));
        Ok(())
    }

    #[test]
    fn a_replayed_message_keeps_its_original_date() -> Result<(), Box<dyn std::error::Error>> {
        let mut envelope = envelope(r#"{"audio": "/a/b.wav"}"#);
        envelope
            .attributes
            .insert("original_publish_time".into(), "2025-01-02T03:04:05Z".into());
        let message = AudioMessage::parse(&envelope, &staging())?;
        assert_eq!(
            message.published,
            "2025-01-02T03:04:05Z".parse::<jiff::Timestamp>()?
        );
        Ok(())
    }

    #[test]
    fn publish_times_parse_in_every_spelling_a_dead_letter_may_carry() -> Result<(), jiff::Error> {
        let expected: jiff::Timestamp = "2025-01-02T03:04:05.678Z".parse()?;
        for text in [
            "2025-01-02T03:04:05.678Z",
            "2025-01-02T03:04:05.678+00:00",
            "2025-01-02 03:04:05.678 +0000 UTC",
            "2025-01-02 03:04:05.678 UTC",
            "1735787045.678",
            "1735787045678",
        ] {
            assert_eq!(parse_publish_time(text), Some(expected), "{text}");
        }
        assert_eq!(parse_publish_time("yesterday"), None);
        assert_eq!(parse_publish_time("-5"), None);
        Ok(())
    }

    #[test]
    fn malformed_messages_are_rejected_with_a_reason() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1, 2]", "must be a JSON object, got an array"),
            ("{}", "audio is required"),
            (r#"{"audio": 7}"#, "audio must be a string"),
            (
                r#"{"audio": "/a.wav", "thumbnail": 1}"#,
                "thumbnail must be a string",
            ),
            (r#"{"audio": "/a.wav", "id": {}}"#, "id must be a string"),
            (
                r#"{"audio": "/a.wav", "metadata": []}"#,
                "metadata must be an object",
            ),
            (
                r#"{"audio": "/a.wav", "metadata": {"n": 1}}"#,
                "metadata.n must be a string",
            ),
            (
                r#"{"audio": "/a.wav", "metadata": {"audio-id": "x"}}"#,
                "reserved",
            ),
            (r#"{"audio": "relative.wav"}"#, "audio:"),
        ];
        for (data, expected) in cases {
            let error = AudioMessage::parse(&envelope(data), &staging()).expect_err(data);
            assert!(error.to_string().contains(expected), "{data}: {error}");
        }
    }

    #[test]
    fn keys_that_only_look_different_from_a_reserved_key_are_rejected() {
        for key in [
            "Audio-ID",
            " audio-id",
            "audio-id\t",
            "audio\u{200B}-id",
            "\u{FEFF}source-uri",
            "SOURCE-URI\u{00A0}",
            "kind\u{FE0F}",
            "Duration-Ms",
            "kind\u{1BCA0}",
            "kind\u{1D173}",
            "kind\u{FFF9}",
            "kind\u{13430}",
            "kind\u{2800}",
            "\u{017F}ource-uri",
            "ｋｉｎｄ",
            "source\u{2010}uri",
        ] {
            let data = serde_json::json!({"audio": "/a.wav", "metadata": {key: "x"}}).to_string();
            let error = AudioMessage::parse(&envelope(&data), &staging()).expect_err(key);
            assert!(
                error.to_string().contains("reserved") || error.to_string().contains("control"),
                "{key:?}: {error}"
            );
        }
        assert!(!is_reserved("audio-ids"));
        assert!(!is_reserved("user_id"));
    }

    #[test]
    fn the_sources_are_kept_as_sent() -> Result<(), MessageError> {
        let message = AudioMessage::parse(
            &envelope(r#"{"audio": "file:///a/b%20c.wav", "thumbnail": "gs://audio-staging/x.png"}"#),
            &staging(),
        )?;
        assert_eq!(message.audio, Source::Local("/a/b c.wav".into()));
        assert_eq!(message.audio_as_sent, "file:///a/b%20c.wav");
        assert_eq!(
            message.thumbnail_as_sent.as_deref(),
            Some("gs://audio-staging/x.png")
        );
        Ok(())
    }

    #[test]
    fn a_huge_metadata_map_is_rejected() {
        let entries: Vec<String> = (0..1000).map(|i| format!("\"k{i}\": \"v\"")).collect();
        let data = format!(r#"{{"audio": "/a.wav", "metadata": {{{}}}}}"#, entries.join(","));
        let error = AudioMessage::parse(&envelope(&data), &staging()).expect_err("too many entries");
        assert!(error.to_string().contains("at most 64"), "{error}");
    }
}
