//! Identity: the deterministic `audio_id` of a logical message.
//!
//! The same logical message always maps to the same UUIDv5, whether it is
//! redelivered, retried after a crash or replayed from the dead-letter topic,
//! so its objects can never be stored twice under different prefixes.

use std::fmt;
use uuid::Uuid;

/// The UUIDv5 namespace of audio-store identities. Never change it: every
/// stored object's name depends on it.
const NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_27b4_93c5_4d0e_8f61_2b7c_5e9a_d304);

/// What identifies a logical message, in the order SPEC.md gives.
///
/// The producer's key (`id` or the `idempotency_key` attribute) and the
/// Pub/Sub message id (`original_message_id` or the message's own id) are
/// separate name spaces: a producer key `"17"` and message id `"17"` are
/// different messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKey<'a> {
    /// The producer's idempotency key: the `id` field or `idempotency_key` attribute.
    Producer(&'a str),
    /// A Pub/Sub message id: `original_message_id` (set on replay) or the message's own.
    MessageId(&'a str),
}

impl<'a> IdentityKey<'a> {
    /// Picks the key by SPEC.md's precedence: `id`, `idempotency_key`, `original_message_id`, message id.
    pub fn choose(
        id: Option<&'a str>,
        idempotency_key: Option<&'a str>,
        original_message_id: Option<&'a str>,
        message_id: &'a str,
    ) -> IdentityKey<'a> {
        let present = |value: Option<&'a str>| value.filter(|v| !v.is_empty());
        if let Some(key) = present(id).or(present(idempotency_key)) {
            IdentityKey::Producer(key)
        } else {
            IdentityKey::MessageId(present(original_message_id).unwrap_or(message_id))
        }
    }
}

/// The UUID prefix all of one message's objects live under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AudioId(Uuid);

impl AudioId {
    /// The length of its text form (a hyphenated UUID), in bytes.
    pub const TEXT_LEN: usize = uuid::fmt::Hyphenated::LENGTH;

    /// The identity of the message that `key` names.
    pub fn from_key(key: IdentityKey<'_>) -> AudioId {
        let name = match key {
            IdentityKey::Producer(key) => format!("producer-key:{key}"),
            IdentityKey::MessageId(id) => format!("pubsub-message-id:{id}"),
        };
        AudioId(Uuid::new_v5(&NAMESPACE, name.as_bytes()))
    }

    /// The UUID itself.
    pub fn uuid(self) -> Uuid {
        self.0
    }
}

impl fmt::Display for AudioId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(formatter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_always_gives_the_same_audio_id() {
        let first = AudioId::from_key(IdentityKey::Producer("track-7f3c"));
        let second = AudioId::from_key(IdentityKey::Producer("track-7f3c"));
        assert_eq!(first, second);
        assert_eq!(first.uuid().get_version_num(), 5);
    }

    #[test]
    fn the_audio_id_is_pinned_across_releases() {
        // Changing this breaks every deployment's deduplication.
        assert_eq!(
            AudioId::from_key(IdentityKey::Producer("track-7f3c")).to_string(),
            Uuid::new_v5(&NAMESPACE, b"producer-key:track-7f3c").to_string()
        );
        assert_eq!(NAMESPACE.to_string(), "6a1f27b4-93c5-4d0e-8f61-2b7c5e9ad304");
    }

    #[test]
    fn the_id_field_wins_over_every_attribute() {
        let key = IdentityKey::choose(Some("a"), Some("b"), Some("c"), "d");
        assert_eq!(key, IdentityKey::Producer("a"));
    }

    #[test]
    fn the_idempotency_attribute_is_used_when_there_is_no_id() {
        assert_eq!(
            IdentityKey::choose(None, Some("b"), Some("c"), "d"),
            IdentityKey::Producer("b")
        );
        assert_eq!(
            IdentityKey::choose(Some(""), Some("b"), None, "d"),
            IdentityKey::Producer("b")
        );
    }

    #[test]
    fn a_replay_keeps_the_identity_of_the_original_message() {
        let original = AudioId::from_key(IdentityKey::choose(None, None, None, "1234"));
        let replayed = AudioId::from_key(IdentityKey::choose(None, None, Some("1234"), "9999"));
        assert_eq!(original, replayed);
    }

    #[test]
    fn producer_keys_and_message_ids_do_not_collide() {
        assert_ne!(
            AudioId::from_key(IdentityKey::Producer("17")),
            AudioId::from_key(IdentityKey::MessageId("17"))
        );
    }
}
