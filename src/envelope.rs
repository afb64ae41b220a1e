//! The envelope: a message as Pub/Sub delivered it, free of SDK types (a leaf:
//! the Pub/Sub module builds it, the message, dead-letter and replay modules read it).

use std::collections::HashMap;

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
