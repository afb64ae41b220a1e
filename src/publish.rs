//! `publish`: sends one "audio processed" message, for operators and demos.

use crate::config::Settings;
use crate::pubsub::{self, Outbox, PubsubError};
use serde::Serialize;
use std::collections::BTreeMap;

/// The wire form of an "audio processed" message, as upstream stages send it.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessedMessage {
    /// The audio source.
    pub audio: String,
    /// The thumbnail source, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
    /// The producer's idempotency key, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Producer metadata.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Publishes `message` to `topic` (the input topic, [`Settings::input_topic`])
/// and returns its message id once confirmed.
pub async fn run(
    settings: &Settings,
    topic: &str,
    message: &ProcessedMessage,
) -> Result<String, PubsubError> {
    let outbox = Outbox::connect(&settings.pubsub, topic, pubsub::QUICK_BATCHING).await?;
    let data = serde_json::to_vec(message).expect("a message of strings always serialises");
    outbox.publish(data, std::iter::empty()).await
}
