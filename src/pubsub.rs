//! Pub/Sub: the only module that talks to Pub/Sub.
//!
//! It hands the rest of the crate SDK-free types: [`Envelope`]s with a
//! [`Delivery`] to settle, an [`Outbox`] that publishes and confirms, and an
//! [`Admin`] for `setup`.

use crate::config::{Endpoint, PubsubSettings};
use crate::envelope::Envelope;
use google_cloud_auth::credentials::Credentials;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::options::RequestOptionsBuilder as _;
use google_cloud_gax::retry_policy::RetryPolicyExt as _;
use google_cloud_pubsub::client::{Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::{DeadLetterPolicy, Message, RetryPolicy};
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownToken};
use std::time::Duration;

/// A failed Pub/Sub operation.
///
/// Its message is the context (`pull from projects/P/subscriptions/S`); the
/// cause is its source, so print it with [`crate::error::chain`] or `{:#}`.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {resource}")]
pub struct PubsubError {
    /// What was attempted.
    pub operation: &'static str,
    /// The topic or subscription.
    pub resource: String,
    /// The underlying failure.
    #[source]
    pub cause: PubsubCause,
}

/// The underlying failure of a Pub/Sub operation.
#[derive(Debug, thiserror::Error)]
pub enum PubsubCause {
    /// An RPC error.
    #[error(transparent)]
    Rpc(#[from] google_cloud_pubsub::Error),
    /// A confirmed ack or nack that failed (exactly-once subscriptions).
    #[error(transparent)]
    Ack(#[from] google_cloud_pubsub::error::AckError),
    /// A publish that was not confirmed.
    #[error(transparent)]
    Publish(#[from] google_cloud_pubsub::error::PublishError),
    /// A client could not be built.
    #[error("{0}")]
    Build(String),
    /// No answer in time.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl PubsubError {
    /// Whether the topic or subscription does not exist.
    pub fn is_not_found(&self) -> bool {
        self.cause.is_not_found()
    }
}

impl PubsubCause {
    /// Whether the resource does not exist (a configuration problem, not a transient one).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }

    /// Whether the caller may not use the resource (missing IAM role).
    pub fn is_permission_denied(&self) -> bool {
        self.code() == Some(Code::PermissionDenied)
    }

    fn code(&self) -> Option<Code> {
        let error = match self {
            PubsubCause::Rpc(error) => error,
            PubsubCause::Publish(google_cloud_pubsub::error::PublishError::Rpc(error)) => error,
            _ => return None,
        };
        error.status().map(|status| status.code)
    }
}

/// How every client reaches Pub/Sub.
#[derive(Clone, Debug)]
struct Connection {
    endpoint: Option<String>,
    credentials: Credentials,
}

impl Connection {
    fn new(endpoint: &Endpoint) -> Result<Connection, PubsubCause> {
        Ok(match endpoint {
            Endpoint::Google => Connection {
                endpoint: None,
                credentials: default_credentials()?,
            },
            Endpoint::Custom { url, emulator } => Connection {
                endpoint: Some(url.clone()),
                credentials: if *emulator {
                    google_cloud_auth::credentials::anonymous::Builder::new().build()
                } else {
                    default_credentials()?
                },
            },
        })
    }
}

fn default_credentials() -> Result<Credentials, PubsubCause> {
    google_cloud_auth::credentials::Builder::default()
        .build()
        .map_err(|error| PubsubCause::Build(error.to_string()))
}

/// Batching delay of a publisher with many concurrent publishes (the worker's
/// events): fewer, larger publish requests at a few milliseconds of latency.
/// (Against the emulator, 20 ms instead of 5 ms cut its CPU per message by
/// ~40 %; see docs/benchmarks.md.)
pub const BUSY_BATCHING: Duration = Duration::from_millis(20);
/// Batching delay of a publisher whose publishes come one at a time and are
/// awaited (dead letters, replay, `publish`): batching would only add latency.
pub const QUICK_BATCHING: Duration = Duration::from_millis(1);

/// A publisher to one topic whose publishes are awaited until confirmed.
#[derive(Clone, Debug)]
pub struct Outbox {
    topic: String,
    publisher: Publisher,
}

impl Outbox {
    /// Connects a publisher to `topic` (`projects/P/topics/T`) that waits up to
    /// `batching` for more messages to send with the first one of a batch:
    /// [`BUSY_BATCHING`] where many publishes run at once, [`QUICK_BATCHING`]
    /// where they come one at a time.
    pub async fn connect(
        settings: &PubsubSettings,
        topic: &str,
        batching: Duration,
    ) -> Result<Outbox, PubsubError> {
        let failed = |cause: PubsubCause| PubsubError {
            operation: "connect publisher",
            resource: topic.to_string(),
            cause,
        };
        let connection = Connection::new(&settings.endpoint).map_err(failed)?;
        // The SDK retries one publish briefly (its default keeps trying for 10 minutes);
        // the pipeline retries the whole unit of work around it with backoff.
        let mut builder = Publisher::builder(topic)
            .with_credentials(connection.credentials)
            .with_retry_policy(
                google_cloud_pubsub::retry_policy::RetryableErrors
                    .with_attempt_limit(3)
                    .with_time_limit(Duration::from_secs(30)),
            )
            .set_delay_threshold(batching);
        if let Some(endpoint) = connection.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let publisher = builder
            .build()
            .await
            .map_err(|error| failed(PubsubCause::Build(error.to_string())))?;
        Ok(Outbox {
            topic: topic.to_string(),
            publisher,
        })
    }

    /// The topic this outbox publishes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes one message and waits until Pub/Sub confirms it; returns its message id.
    pub async fn publish<I>(&self, data: Vec<u8>, attributes: I) -> Result<String, PubsubError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let message = Message::new().set_data(data).set_attributes(attributes);
        self.publisher
            .publish(message)
            .await
            .map_err(|error| PubsubError {
                operation: "publish to",
                resource: self.topic.clone(),
                cause: error.into(),
            })
    }

    /// Sends whatever is batched and waits for it.
    pub async fn flush(&self) {
        self.publisher.flush().await;
    }
}

/// A pulled message's lease: settle it with [`Delivery::ack`] or [`Delivery::nack`].
///
/// Dropping a delivery nacks the message.
#[derive(Debug)]
pub struct Delivery {
    handler: Handler,
}

impl Delivery {
    /// Acknowledges the message; on exactly-once subscriptions, waits for the confirmation.
    pub async fn ack(self) -> Result<(), PubsubCause> {
        match self.handler {
            Handler::ExactlyOnce(handler) => Ok(handler.confirmed_ack().await?),
            handler => {
                handler.ack();
                Ok(())
            }
        }
    }

    /// Returns the message for redelivery (under the subscription's retry policy).
    pub fn nack(self) {
        self.handler.nack();
    }
}

/// The input subscription as a stream of messages.
pub struct Inbox {
    subscription: String,
    stream: MessageStream,
}

impl Inbox {
    /// Opens a streaming pull on the input subscription with at most `max_outstanding` messages leased.
    pub async fn open(settings: &PubsubSettings, max_outstanding: usize) -> Result<Inbox, PubsubError> {
        Inbox::open_subscription(settings, &settings.subscription, max_outstanding).await
    }

    /// Opens a streaming pull on any `subscription` (`projects/P/subscriptions/S`).
    pub async fn open_subscription(
        settings: &PubsubSettings,
        subscription: &str,
        max_outstanding: usize,
    ) -> Result<Inbox, PubsubError> {
        let failed = |cause: PubsubCause| PubsubError {
            operation: "subscribe to",
            resource: subscription.to_string(),
            cause,
        };
        let connection = Connection::new(&settings.endpoint).map_err(failed)?;
        let mut builder = Subscriber::builder().with_credentials(connection.credentials);
        if let Some(endpoint) = connection.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let subscriber = builder
            .build()
            .await
            .map_err(|error| failed(PubsubCause::Build(error.to_string())))?;
        let stream = subscriber
            .subscribe(subscription.to_string())
            .set_max_outstanding_messages(max_outstanding as i64)
            .build();
        Ok(Inbox {
            subscription: subscription.to_string(),
            stream,
        })
    }

    /// The next message, `None` once the stream has shut down.
    pub async fn next(&mut self) -> Option<Result<(Envelope, Delivery), PubsubError>> {
        let (message, handler) = match self.stream.next().await? {
            Ok(pair) => pair,
            Err(error) => {
                return Some(Err(PubsubError {
                    operation: "pull from",
                    resource: self.subscription.clone(),
                    cause: error.into(),
                }));
            }
        };
        let envelope = Envelope {
            delivery_attempt: handler.delivery_attempt(),
            message_id: message.message_id,
            data: message.data,
            attributes: message.attributes,
            publish_time: message
                .publish_time
                .and_then(|time| jiff::Timestamp::new(time.seconds(), time.nanos()).ok()),
        };
        Some(Ok((envelope, Delivery { handler })))
    }

    /// A handle that stops the stream and waits for pending acks to be sent.
    pub fn closer(&self) -> InboxCloser {
        InboxCloser {
            token: self.stream.shutdown_token(),
        }
    }
}

/// Stops an [`Inbox`]: no more messages are pulled; pending acks and nacks are flushed.
#[derive(Clone, Debug)]
pub struct InboxCloser {
    token: ShutdownToken,
}

impl InboxCloser {
    /// Signals the shutdown and waits until every delivery handed out was settled and sent.
    pub async fn close(&self) {
        self.token.shutdown().await;
    }
}

/// Asks Pub/Sub about the input subscription, cheaply and often, so that
/// readiness can say whether the worker can reach it.
///
/// The streaming pull cannot tell: the SDK retries opening it forever, out of
/// sight, and reports only permanent errors. `GetSubscription` needs
/// `pubsub.subscriptions.get`, which `roles/pubsub.subscriber` does not
/// grant: the worker also needs `roles/pubsub.viewer` on the subscription.
#[derive(Clone, Debug)]
pub struct SubscriptionProbe {
    subscription: String,
    admin: SubscriptionAdmin,
}

/// The longest one probe may take before it counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl SubscriptionProbe {
    /// Connects a probe of the input subscription.
    pub async fn connect(settings: &PubsubSettings) -> Result<SubscriptionProbe, PubsubError> {
        let failed = |cause: PubsubCause| PubsubError {
            operation: "connect probe of",
            resource: settings.subscription.clone(),
            cause,
        };
        let connection = Connection::new(&settings.endpoint).map_err(failed)?;
        let admin = subscription_admin(connection).await.map_err(failed)?;
        Ok(SubscriptionProbe {
            subscription: settings.subscription.clone(),
            admin,
        })
    }

    /// Whether the subscription exists and may be read, in one attempt of at
    /// most [`PROBE_TIMEOUT`].
    pub async fn check(&self) -> Result<(), PubsubError> {
        let request = self
            .admin
            .get_subscription()
            .set_subscription(&self.subscription)
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(PROBE_TIMEOUT)
            .send();
        let result = match tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(1), request).await {
            Ok(result) => result.map(drop).map_err(PubsubCause::from),
            Err(_) => Err(PubsubCause::Timeout(PROBE_TIMEOUT)),
        };
        result.map_err(|cause| PubsubError {
            operation: "probe",
            resource: self.subscription.clone(),
            cause,
        })
    }
}

/// What `setup` asks for of a subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// `projects/P/subscriptions/S`.
    pub name: String,
    /// `projects/P/topics/T`.
    pub topic: String,
    /// The ack deadline.
    pub ack_deadline: Duration,
    /// Dead-letter topic and max delivery attempts, if any.
    pub dead_letter: Option<(String, i32)>,
    /// Redelivery backoff bounds, if any.
    pub retry: Option<(Duration, Duration)>,
}

/// Creates topics and subscriptions.
pub struct Admin {
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
}

impl Admin {
    /// Connects the admin clients.
    pub async fn connect(settings: &PubsubSettings) -> Result<Admin, PubsubError> {
        let failed = |cause: PubsubCause| PubsubError {
            operation: "connect admin",
            resource: settings.project.clone(),
            cause,
        };
        let connection = Connection::new(&settings.endpoint).map_err(failed)?;
        let mut topics = TopicAdmin::builder().with_credentials(connection.credentials.clone());
        if let Some(endpoint) = &connection.endpoint {
            topics = topics.with_endpoint(endpoint.clone());
        }
        Ok(Admin {
            topics: topics
                .build()
                .await
                .map_err(|error| failed(PubsubCause::Build(error.to_string())))?,
            subscriptions: subscription_admin(connection).await.map_err(failed)?,
        })
    }

    /// Creates `topic` unless it exists; `true` if it was created.
    pub async fn ensure_topic(&self, topic: &str) -> Result<bool, PubsubError> {
        let result = self.topics.create_topic().set_name(topic).send().await;
        created(result).map_err(|cause| PubsubError {
            operation: "create topic",
            resource: topic.to_string(),
            cause,
        })
    }

    /// Creates the subscription unless it exists; `true` if it was created.
    ///
    /// An existing subscription is left as it is.
    pub async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<bool, PubsubError> {
        let failed = |cause: PubsubCause| PubsubError {
            operation: "create subscription",
            resource: spec.name.clone(),
            cause,
        };
        let mut request = self
            .subscriptions
            .create_subscription()
            .set_name(&spec.name)
            .set_topic(&spec.topic)
            .set_ack_deadline_seconds(spec.ack_deadline.as_secs() as i32);
        if let Some((topic, attempts)) = &spec.dead_letter {
            request = request.set_dead_letter_policy(
                DeadLetterPolicy::new()
                    .set_dead_letter_topic(topic)
                    .set_max_delivery_attempts(*attempts),
            );
        }
        if let Some((minimum, maximum)) = spec.retry {
            let duration = |value: Duration| {
                google_cloud_wkt::Duration::try_from(value)
                    .map_err(|error| failed(PubsubCause::Build(error.to_string())))
            };
            request = request.set_retry_policy(
                RetryPolicy::new()
                    .set_minimum_backoff(duration(minimum)?)
                    .set_maximum_backoff(duration(maximum)?),
            );
        }
        created(request.send().await).map_err(failed)
    }
}

async fn subscription_admin(connection: Connection) -> Result<SubscriptionAdmin, PubsubCause> {
    let mut builder = SubscriptionAdmin::builder().with_credentials(connection.credentials);
    if let Some(endpoint) = connection.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    builder
        .build()
        .await
        .map_err(|error| PubsubCause::Build(error.to_string()))
}

fn created<T>(result: Result<T, google_cloud_pubsub::Error>) -> Result<bool, PubsubCause> {
    match result {
        Ok(_) => Ok(true),
        Err(error)
            if error
                .status()
                .is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::AlreadyExists) =>
        {
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}
