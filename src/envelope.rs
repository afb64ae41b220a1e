//! The envelope: a message as Pub/Sub delivered it, free of SDK types, and Pub/Sub's limits on one (a leaf:
//! the Pub/Sub module builds it, the message, dead-letter and replay modules read it).

use std::collections::HashMap;

/// Pub/Sub's limit on one attribute value, in bytes (the emulator does not enforce it).
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;
/// Pub/Sub's limit on the number of attributes of one message (the emulator does not enforce it).
pub const MAX_ATTRIBUTES: usize = 100;

/// A message as Pub/Sub delivered it, free of SDK types.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// The Pub/Sub message id.
    pub message_id: String,
    /// The raw data.
    pub data: bytes::Bytes,
    /// The message attributes.
    pub attributes: HashMap<String, String>,
    /// When Pub/Sub accepted the message.
    pub publish_time: Option<jiff::Timestamp>,
    /// How often Pub/Sub has delivered it (only with a dead-letter policy).
    pub delivery_attempt: Option<i32>,
}
