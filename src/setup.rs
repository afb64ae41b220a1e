//! `setup`: idempotently creates the configured topics, subscriptions and
//! bucket, for emulators and first deploys.

use crate::config::Settings;
use crate::pubsub::{Admin, PubsubError, SubscriptionSpec};
use crate::store::{Store, StoreError};

/// What `setup` did to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `topic`, `subscription` or `bucket`.
    pub resource: &'static str,
    /// The full name.
    pub name: String,
    /// Whether it was created now (`false`: it existed).
    pub created: bool,
}

/// Why setup failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A Pub/Sub call failed.
    #[error(transparent)]
    Pubsub(#[from] PubsubError),
    /// A storage call failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates, unless they exist: the input topic `input_topic`
/// ([`Settings::input_topic`]), the stored and dead-letter topics; the input
/// subscription (ack deadline, dead-letter and retry policy); a subscription
/// on the dead-letter topic so dead letters are retained; and the archive bucket.
pub async fn run(settings: &Settings, input_topic: &str) -> Result<Vec<Step>, SetupError> {
    let pubsub = &settings.pubsub;
    let input_topic = input_topic.to_string();
    let admin = Admin::connect(pubsub).await?;
    let mut steps = Vec::new();
    let mut topics = vec![input_topic.clone(), pubsub.stored_topic.clone()];
    topics.extend(pubsub.dead_letter_topic.clone());
    for topic in topics {
        let created = admin.ensure_topic(&topic).await?;
        steps.push(Step {
            resource: "topic",
            name: topic,
            created,
        });
    }
    let input = SubscriptionSpec {
        name: pubsub.subscription.clone(),
        topic: input_topic,
        ack_deadline: pubsub.ack_deadline,
        dead_letter: pubsub
            .dead_letter_topic
            .clone()
            .map(|topic| (topic, pubsub.max_delivery_attempts)),
        retry: Some((pubsub.redelivery_min_backoff, pubsub.redelivery_max_backoff)),
    };
    let created = admin.ensure_subscription(&input).await?;
    steps.push(Step {
        resource: "subscription",
        name: input.name,
        created,
    });
    if let (Some(topic), Some(name)) = (&pubsub.dead_letter_topic, &pubsub.dead_letter_subscription) {
        let dead_letters = SubscriptionSpec {
            name: name.clone(),
            topic: topic.clone(),
            ack_deadline: pubsub.ack_deadline,
            dead_letter: None,
            retry: None,
        };
        let created = admin.ensure_subscription(&dead_letters).await?;
        steps.push(Step {
            resource: "subscription",
            name: name.clone(),
            created,
        });
    }
    let store = Store::connect(&settings.storage).await?;
    let created = store.create_bucket(&pubsub.project).await?;
    steps.push(Step {
        resource: "bucket",
        name: format!("gs://{}", settings.storage.bucket),
        created,
    });
    Ok(steps)
}
