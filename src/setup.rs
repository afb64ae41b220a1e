//! `setup`: idempotently creates the configured topics, subscriptions and
//! bucket, for emulators and first deploys.

use crate::config::Settings;
use crate::pubsub::{Admin, PubsubError, SubscriptionSpec};
use crate::store::{Store, StoreError};

/// What `setup` did to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `topic`, `subscription`, `bucket` or `bucket policy`.
    pub resource: &'static str,
    /// The full name.
    pub name: String,
    /// Whether it was created now (`false`: it existed).
    pub created: bool,
    /// For the bucket policy: what was changed (empty: nothing was sent).
    pub changed: Vec<&'static str>,
}

impl Step {
    fn new(resource: &'static str, name: String, created: bool) -> Step {
        Step {
            resource,
            name,
            created,
            changed: Vec::new(),
        }
    }

    /// One line for the operator: `created`/`exists` and the resource, or what changed in the policy.
    pub fn line(&self) -> String {
        let state = match (self.resource, self.created, self.changed.is_empty()) {
            ("bucket policy", _, true) => "same   ",
            ("bucket policy", _, false) => "changed",
            (_, true, _) => "created",
            (_, false, _) => "exists ",
        };
        let mut line = format!("{state} {:<13} {}", self.resource, self.name);
        if !self.changed.is_empty() {
            line.push_str(": ");
            line.push_str(&self.changed.join(", "));
        }
        line
    }
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
/// on the dead-letter topic so dead letters are retained; and the archive
/// bucket. Then reconciles the bucket's policy (uniform bucket-level access,
/// public access prevention enforced, `storage.lifecycle`), patching only what
/// differs.
pub async fn run(settings: &Settings, input_topic: &str) -> Result<Vec<Step>, SetupError> {
    let pubsub = &settings.pubsub;
    let input_topic = input_topic.to_string();
    let admin = Admin::connect(pubsub).await?;
    let mut steps = Vec::new();
    let mut topics = vec![input_topic.clone(), pubsub.stored_topic.clone()];
    topics.extend(pubsub.dead_letter_topic.clone());
    for topic in topics {
        let created = admin.ensure_topic(&topic).await?;
        steps.push(Step::new("topic", topic, created));
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
    steps.push(Step::new("subscription", input.name, created));
    if let (Some(topic), Some(name)) = (&pubsub.dead_letter_topic, &pubsub.dead_letter_subscription) {
        let dead_letters = SubscriptionSpec {
            name: name.clone(),
            topic: topic.clone(),
            ack_deadline: pubsub.ack_deadline,
            dead_letter: None,
            retry: None,
        };
        let created = admin.ensure_subscription(&dead_letters).await?;
        steps.push(Step::new("subscription", name.clone(), created));
    }
    let store = Store::connect(&settings.storage).await?;
    let rules = &settings.storage.lifecycle;
    let bucket = format!("gs://{}", settings.storage.bucket);
    let created = store.create_bucket(&pubsub.project, rules).await?;
    steps.push(Step::new("bucket", bucket.clone(), created));
    let changed = store.reconcile_bucket_policy(rules).await?;
    steps.push(Step {
        changed,
        ..Step::new("bucket policy", bucket, false)
    });
    Ok(steps)
}
