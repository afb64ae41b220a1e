//! A Pub/Sub client over the emulator's REST API (`/v1/projects/...`),
//! independent of the code under test, to set up resources and check results.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::env::{POLL_INTERVAL, unique};
use crate::http::{client, parse_json, send};

/// Options of a subscription created by [`PubsubRest::create_subscription`].
#[derive(Debug, Default, Clone)]
pub struct SubscriptionOptions {
    /// Ack deadline in seconds (10..=600; the emulator's default is 10).
    pub ack_deadline_seconds: Option<i32>,
    /// Dead-letter topic (short name); enables the dead-letter policy and
    /// `deliveryAttempt` counting.
    pub dead_letter_topic: Option<String>,
    /// Maximum delivery attempts before dead-lettering (5..=100, default 5);
    /// needs `dead_letter_topic`.
    pub max_delivery_attempts: Option<i32>,
    /// Enables exactly-once delivery.
    pub exactly_once: bool,
    /// Retry policy minimum backoff (default 10 s when only the maximum is set).
    pub retry_min_backoff: Option<Duration>,
    /// Retry policy maximum backoff (default 600 s when only the minimum is set).
    pub retry_max_backoff: Option<Duration>,
}

/// One message received by a pull.
#[derive(Debug, Clone)]
pub struct Received {
    /// Ack id of this delivery (invalid after a seek).
    pub ack_id: String,
    /// Server-assigned message id (the emulator counts 1, 2, 3, … per emulator).
    pub message_id: String,
    /// Decoded message payload.
    pub data: Vec<u8>,
    /// Message attributes.
    pub attributes: BTreeMap<String, String>,
    /// RFC 3339 publish time as the API gives it.
    pub publish_time: String,
    /// Delivery attempt (1, 2, …); only set on subscriptions with a dead-letter policy.
    pub delivery_attempt: Option<i32>,
}

impl Received {
    /// The payload parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.data).with_context(|| {
            let data = String::from_utf8_lossy(&self.data);
            format!("message {} is not json: {data}", self.message_id)
        })
    }

    /// The attribute `key`, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PullResponse {
    #[serde(default)]
    received_messages: Vec<RawReceived>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReceived {
    ack_id: String,
    message: RawMessage,
    delivery_attempt: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMessage {
    #[serde(default)]
    data: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    message_id: String,
    #[serde(default)]
    publish_time: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishResponse {
    message_ids: Vec<String>,
}

/// Formats a duration as a protobuf JSON duration, e.g. `1s`, `1.5s`.
fn proto_duration(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

/// A Pub/Sub client of the emulator. All names are short names (`my-topic`,
/// not `projects/p/topics/my-topic`). Create one per test: its HTTP client is
/// bound to the tokio runtime it is first used on.
#[derive(Clone)]
pub struct PubsubRest {
    endpoint: String,
    project: String,
    http: reqwest::Client,
}

impl PubsubRest {
    /// A client for `endpoint` (`http://127.0.0.1:PORT`) and `project`.
    pub fn new(endpoint: &str, project: &str) -> PubsubRest {
        PubsubRest {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            project: project.to_string(),
            http: client(),
        }
    }

    /// Full topic name, `projects/P/topics/T`.
    fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project)
    }

    /// Full subscription name, `projects/P/subscriptions/S`.
    pub fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.endpoint)
    }

    /// POSTs `body` to `{path}:{verb}`.
    async fn call(&self, path: &str, verb: &str, body: &Value, what: &str) -> Result<Vec<u8>> {
        let url = format!("{}:{verb}", self.url(path));
        Ok(send(self.http.post(url).json(body), what, &[]).await?.1)
    }

    /// Creates a topic; an existing one is fine (409).
    pub async fn create_topic(&self, topic: &str) -> Result<()> {
        let request = self.http.put(self.url(&self.topic_path(topic))).json(&json!({}));
        send(request, &format!("creating topic {topic}"), &[409]).await?;
        Ok(())
    }

    /// Creates a subscription of `topic` (which must exist) with `options`; an
    /// existing subscription is fine (409) and is left as it is.
    pub async fn create_subscription(
        &self,
        name: &str,
        topic: &str,
        options: SubscriptionOptions,
    ) -> Result<()> {
        let mut body = json!({ "topic": self.topic_path(topic) });
        if let Some(seconds) = options.ack_deadline_seconds {
            body["ackDeadlineSeconds"] = json!(seconds);
        }
        match (&options.dead_letter_topic, options.max_delivery_attempts) {
            (Some(dead_letter_topic), attempts) => {
                body["deadLetterPolicy"] = json!({
                    "deadLetterTopic": self.topic_path(dead_letter_topic),
                    "maxDeliveryAttempts": attempts.unwrap_or(5),
                });
            }
            (None, Some(_)) => bail!("subscription {name}: max_delivery_attempts needs a dead_letter_topic"),
            (None, None) => {}
        }
        if options.exactly_once {
            body["enableExactlyOnceDelivery"] = json!(true);
        }
        if options.retry_min_backoff.is_some() || options.retry_max_backoff.is_some() {
            body["retryPolicy"] = json!({
                "minimumBackoff": proto_duration(options.retry_min_backoff.unwrap_or(Duration::from_secs(10))),
                "maximumBackoff": proto_duration(options.retry_max_backoff.unwrap_or(Duration::from_secs(600))),
            });
        }
        let request = self.http.put(self.url(&self.subscription_path(name))).json(&body);
        send(
            request,
            &format!("creating subscription {name} of topic {topic}"),
            &[409],
        )
        .await?;
        Ok(())
    }

    /// Deletes a subscription; its un-acked messages go with it.
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        let request = self.http.delete(self.url(&self.subscription_path(name)));
        send(request, &format!("deleting subscription {name}"), &[]).await?;
        Ok(())
    }

    /// The subscription resource as the API returns it (`ackDeadlineSeconds`,
    /// `deadLetterPolicy`, `retryPolicy`, `enableExactlyOnceDelivery`, ...).
    pub async fn get_subscription(&self, name: &str) -> Result<Value> {
        let what = format!("getting subscription {name}");
        let (_, body) = send(self.http.get(self.url(&self.subscription_path(name))), &what, &[]).await?;
        parse_json(&body, &what)
    }

    /// Publishes one message and returns its message id. Pub/Sub rejects a
    /// message with neither data nor attributes.
    pub async fn publish(&self, topic: &str, data: &[u8], attributes: &[(&str, &str)]) -> Result<String> {
        let attributes: BTreeMap<&str, &str> = attributes.iter().copied().collect();
        let mut message = json!({ "data": BASE64.encode(data) });
        if !attributes.is_empty() {
            message["attributes"] = json!(attributes);
        }
        let what = format!("publishing to {topic}");
        let body = json!({ "messages": [message] });
        let body = self
            .call(&self.topic_path(topic), "publish", &body, &what)
            .await?;
        let response: PublishResponse = parse_json(&body, &what)?;
        let id = response.message_ids.into_iter().next();
        id.ok_or_else(|| anyhow!("{what}: the response has no message id"))
    }

    /// Publishes `value` serialised as JSON; returns the message id.
    pub async fn publish_json(
        &self,
        topic: &str,
        value: &Value,
        attributes: &[(&str, &str)],
    ) -> Result<String> {
        self.publish(topic, &serde_json::to_vec(value)?, attributes).await
    }

    /// Pulls up to `max` messages without waiting (`returnImmediately`); does not ack.
    pub async fn pull(&self, subscription: &str, max: usize) -> Result<Vec<Received>> {
        let what = format!("pulling from {subscription}");
        let request = json!({ "maxMessages": max, "returnImmediately": true });
        let path = self.subscription_path(subscription);
        let body = self.call(&path, "pull", &request, &what).await?;
        let response: PullResponse = parse_json(&body, &what)?;
        response
            .received_messages
            .into_iter()
            .map(|raw| {
                let data = BASE64.decode(raw.message.data.as_bytes()).with_context(|| {
                    format!(
                        "{what}: message {} has invalid base64 data",
                        raw.message.message_id
                    )
                })?;
                Ok(Received {
                    ack_id: raw.ack_id,
                    message_id: raw.message.message_id,
                    data,
                    attributes: raw.message.attributes,
                    publish_time: raw.message.publish_time,
                    delivery_attempt: raw.delivery_attempt,
                })
            })
            .collect()
    }

    /// Acknowledges deliveries; an empty list is a no-op.
    async fn ack(&self, subscription: &str, ack_ids: &[String]) -> Result<()> {
        let body = json!({ "ackIds": ack_ids });
        self.on_deliveries(subscription, "acknowledge", body, ack_ids.len())
            .await
    }

    /// Nacks deliveries (ack deadline 0): the emulator redelivers them at once.
    pub async fn nack(&self, subscription: &str, ack_ids: &[String]) -> Result<()> {
        let body = json!({ "ackIds": ack_ids, "ackDeadlineSeconds": 0 });
        self.on_deliveries(subscription, "modifyAckDeadline", body, ack_ids.len())
            .await
    }

    /// POSTs `body` to `subscription:verb` unless it names no delivery (`count` 0).
    async fn on_deliveries(&self, subscription: &str, verb: &str, body: Value, count: usize) -> Result<()> {
        if count > 0 {
            let what = format!("{verb} of {count} message(s) on {subscription}");
            self.call(&self.subscription_path(subscription), verb, &body, &what)
                .await?;
        }
        Ok(())
    }

    /// Pulls up to `max` messages once and acks what arrived.
    async fn pull_and_ack(&self, subscription: &str, max: usize) -> Result<Vec<Received>> {
        let batch = self.pull(subscription, max).await?;
        let ack_ids: Vec<String> = batch.iter().map(|m| m.ack_id.clone()).collect();
        self.ack(subscription, &ack_ids).await?;
        Ok(batch)
    }

    /// Pulls and acks until `count` messages arrived or `timeout` passed;
    /// returns what arrived (possibly fewer, never more than it saw).
    pub async fn collect(
        &self,
        subscription: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut received = Vec::new();
        while received.len() < count {
            let batch = self
                .pull_and_ack(subscription, (count - received.len()).min(100))
                .await?;
            if batch.is_empty() {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            received.extend(batch);
        }
        Ok(received)
    }

    /// Pulls and acks for `window`; returns everything that arrived (to assert
    /// that nothing (more) arrives).
    pub async fn drain_for(&self, subscription: &str, window: Duration) -> Result<Vec<Received>> {
        self.collect(subscription, usize::MAX, window).await
    }

    /// Makes every un-acked message of `subscription` deliverable again, including
    /// those leased to a dead client (the emulator never expires such leases):
    /// a snapshot "now", a seek to it, and the snapshot deleted.
    pub async fn release_leases(&self, subscription: &str) -> Result<()> {
        let snapshot = format!("projects/{}/snapshots/{}", self.project, unique("release"));
        let what = format!("releasing the leases of {subscription}");
        let body = json!({ "subscription": self.subscription_path(subscription) });
        send(self.http.put(self.url(&snapshot)).json(&body), &what, &[]).await?;
        let seek = json!({ "snapshot": snapshot });
        self.call(&self.subscription_path(subscription), "seek", &seek, &what)
            .await?;
        send(self.http.delete(self.url(&snapshot)), &what, &[404]).await?;
        Ok(())
    }

    /// Pulls and acks the un-acked messages of `subscription` that a closed
    /// streaming pull left leased, releasing the leases again until `count`
    /// distinct messages arrived or `timeout` passed (one seek does not always
    /// free them on the emulator); then keeps releasing and pulling for two
    /// seconds so that any more would show. Returns each message once.
    pub async fn recover_unacked(
        &self,
        subscription: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut received: Vec<Received> = Vec::new();
        let mut quiet_until = None;
        loop {
            self.release_leases(subscription).await?;
            for message in self.pull_and_ack(subscription, 100).await? {
                if !received.iter().any(|seen| seen.message_id == message.message_id) {
                    received.push(message);
                }
            }
            let now = tokio::time::Instant::now();
            if received.len() >= count {
                if now >= *quiet_until.get_or_insert(now + Duration::from_secs(2)) {
                    return Ok(received);
                }
            } else if now >= deadline {
                return Ok(received);
            }
            tokio::time::sleep(POLL_INTERVAL * 2).await;
        }
    }
}
