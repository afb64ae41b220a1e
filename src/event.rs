//! The output: the "audio stored" event, in the wire shape SPEC.md fixes.

use crate::identity::AudioId;
use crate::media::Media;
use serde::Serialize;
use std::collections::BTreeMap;

/// `event_type` attribute value of every stored event.
pub const EVENT_TYPE: &str = "audio.stored";

/// One object in the archive, as the event describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredObject {
    /// `gs://bucket/name`.
    pub uri: String,
    /// The archive bucket.
    pub bucket: String,
    /// The object name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The probed content type.
    pub content_type: String,
    /// CRC32C, base64 of the big-endian value (the GCS convention).
    pub crc32c: String,
    /// MD5, base64, where the server reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    /// The object generation, as a decimal string.
    pub generation: String,
    /// What the probe found in the file.
    pub media: EventMedia,
    /// The object's storage class, reported when `storage.storage_class` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

/// The `media` object of a stored object: audio or image fields, each absent
/// when the file does not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EventMedia {
    /// An audio file.
    Audio {
        /// `wav`, `flac`, `mp3`, `ogg`, `mp4`, `aiff`, `aac`.
        container: &'static str,
        /// `pcm_s16le`, `flac`, `mp3`, `vorbis`, `opus`, `aac`, `alac`, ...
        codec: &'static str,
        /// Samples per second.
        sample_rate: u32,
        /// Channel count.
        channels: u16,
        /// Bits per sample.
        #[serde(skip_serializing_if = "Option::is_none")]
        bits_per_sample: Option<u32>,
        /// Duration in milliseconds.
        #[serde(skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        /// Set when the duration was estimated from size and bitrate.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duration_estimated: bool,
        /// Average bits per second.
        #[serde(skip_serializing_if = "Option::is_none")]
        bitrate: Option<u64>,
    },
    /// An image.
    Image {
        /// `jpeg`, `png` or `webp`.
        format: &'static str,
        /// Pixels.
        width: u32,
        /// Pixels.
        height: u32,
    },
}

impl From<&Media> for EventMedia {
    fn from(media: &Media) -> EventMedia {
        match media {
            Media::Audio(audio) => EventMedia::Audio {
                container: audio.container,
                codec: audio.codec,
                sample_rate: audio.sample_rate,
                channels: audio.channels,
                bits_per_sample: audio.bits_per_sample,
                duration_ms: audio.duration_ms,
                duration_estimated: audio.duration_estimated,
                bitrate: audio.bitrate,
            },
            Media::Image(image) => EventMedia::Image {
                format: image.format,
                width: image.width,
                height: image.height,
            },
        }
    }
}

/// Where the stored files came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventSource {
    /// The input message id.
    pub message_id: String,
    /// The audio source, exactly as the message sent it.
    pub audio: String,
    /// The thumbnail source, exactly as the message sent it.
    pub thumbnail: Option<String>,
}

/// The "audio stored" event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    /// The deterministic identity.
    pub audio_id: String,
    /// The audio object.
    pub audio: StoredObject,
    /// The thumbnail object; `null` when the message had none.
    pub thumbnail: Option<StoredObject>,
    /// Provenance.
    pub source: EventSource,
    /// The message's metadata.
    pub metadata: BTreeMap<String, String>,
    /// When the event was built, RFC 3339 UTC with milliseconds.
    pub stored_at: String,
}

impl StoredEvent {
    /// The event's JSON data.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event of strings and numbers always serialises")
    }

    /// The event's attributes: `audio_id` and `event_type` (always
    /// [`EVENT_TYPE`], for subscriptions that filter on it), and the
    /// CloudEvents 1.0 Pub/Sub binding in binary mode: `ce-specversion`,
    /// `ce-id` (the same for every repetition of this logical event),
    /// `ce-source`, `ce-type`, `ce-subject` (the audio id), `ce-time`
    /// (`stored_at`) and `content-type`.
    pub fn attributes(&self, audio_id: AudioId, source: &str, event_type: &str) -> Vec<(String, String)> {
        let id = uuid::Uuid::new_v5(&audio_id.uuid(), event_type.as_bytes());
        [
            ("audio_id", audio_id.to_string()),
            ("event_type", EVENT_TYPE.to_string()),
            ("ce-specversion", "1.0".to_string()),
            ("ce-id", id.to_string()),
            ("ce-source", source.to_string()),
            ("ce-type", event_type.to_string()),
            ("ce-subject", audio_id.to_string()),
            ("ce-time", self.stored_at.clone()),
            ("content-type", "application/json".to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }
}

/// Formats a timestamp as SPEC.md shows it: `2026-11-24T01:02:03.456Z`.
pub fn format_timestamp(timestamp: jiff::Timestamp) -> String {
    timestamp.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_milliseconds_and_a_z() -> Result<(), jiff::Error> {
        let timestamp: jiff::Timestamp = "2026-11-24T01:02:03.456789Z".parse()?;
        assert_eq!(format_timestamp(timestamp), "2026-11-24T01:02:03.456Z");
        let whole: jiff::Timestamp = "2026-11-24T01:02:03Z".parse()?;
        assert_eq!(format_timestamp(whole), "2026-11-24T01:02:03.000Z");
        Ok(())
    }

    fn sample_event() -> StoredEvent {
        let object = StoredObject {
            uri: "gs://b/n".into(),
            bucket: "b".into(),
            name: "n".into(),
            size: 1,
            content_type: "audio/wav".into(),
            crc32c: "AAAAAA==".into(),
            md5: None,
            generation: "1".into(),
            media: EventMedia::Image {
                format: "png",
                width: 1,
                height: 2,
            },
            storage_class: None,
        };
        StoredEvent {
            audio_id: "id".into(),
            audio: object,
            thumbnail: None,
            source: EventSource {
                message_id: "m".into(),
                audio: "/a.wav".into(),
                thumbnail: None,
            },
            metadata: BTreeMap::new(),
            stored_at: "2026-11-24T01:02:03.456Z".into(),
        }
    }

    #[test]
    fn a_missing_thumbnail_is_null_and_a_missing_md5_is_absent() -> Result<(), serde_json::Error> {
        let event = sample_event();
        let json: serde_json::Value = serde_json::from_slice(&event.to_json())?;
        assert_eq!(json["thumbnail"], serde_json::Value::Null);
        assert!(json["audio"].get("md5").is_none());
        assert!(json["audio"].get("storage_class").is_none());
        assert_eq!(json["audio"]["generation"], "1");
        assert_eq!(
            json["audio"]["media"],
            serde_json::json!({"format": "png", "width": 1, "height": 2})
        );
        Ok(())
    }

    #[test]
    fn the_cloudevents_attributes_are_stable_for_one_logical_event() {
        let audio_id = AudioId::from_key(crate::identity::IdentityKey::choose(Some("x"), None, None, "m"));
        let attributes = |stored_at: &str| -> BTreeMap<String, String> {
            let event = StoredEvent {
                stored_at: stored_at.into(),
                ..sample_event()
            };
            event
                .attributes(audio_id, "//src", "audio.stored")
                .into_iter()
                .collect()
        };
        let first = attributes("2026-11-24T01:02:03.456Z");
        let again = attributes("2026-11-25T00:00:00.000Z");
        assert_eq!(first["ce-specversion"], "1.0");
        assert_eq!(first["ce-id"], again["ce-id"]);
        assert_eq!(first["ce-subject"], audio_id.to_string());
        assert_eq!(first["ce-time"], "2026-11-24T01:02:03.456Z");
        assert_eq!(first["ce-source"], "//src");
        assert_eq!(first["content-type"], "application/json");
        assert_eq!(first["event_type"], EVENT_TYPE);
    }
}
