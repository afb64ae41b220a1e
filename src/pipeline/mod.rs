//! The pipeline: everything that happens to one message, from parsing to
//! ack and cleanup, as one function that never panics and never loses data.
//!
//! Order, for one message: parse → store both objects (concurrently,
//! each verified by CRC32C) → publish the "stored" event and wait for the
//! confirmation → ack → delete the sources. Permanent failures go to the
//! dead-letter topic (then ack); transient ones are retried in process and
//! finally nacked.

//!
//! The files: this one (one message: settle, retry, dead-letter), `part.rs`
//! (one file of a message: prepare, commit, recover), `cleanup.rs` (removing
//! the sources after the ack), `spans.rs` (the spans of that work).

mod cleanup;
mod part;
mod spans;

use cleanup::Cleanup;

use crate::config::Settings;
use crate::dead_letter;
use crate::envelope::Envelope;
use crate::error::{Failure, Problem};
use crate::event::{self, EventSource, StoredEvent};
use crate::layout::Kind;
use crate::message::AudioMessage;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::pubsub::{Delivery, Outbox};
use crate::store::Store;
use crate::trace_context::{self, Propagated};
use backon::{ExponentialBuilder, Retryable as _};
use part::Prepared;
use spans::traced;
use std::sync::Arc;
use tracing::{Instrument as _, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// What processing one message needs: the archive, the event outbox and the dead-letter outbox.
#[derive(Clone)]
pub struct Pipeline {
    settings: Arc<Settings>,
    store: Store,
    events: Outbox,
    dead_letters: Option<Outbox>,
    metrics: Arc<Metrics>,
}

/// The result of storing a message: the event to publish and what to clean up.
#[derive(Debug)]
struct Stored {
    event: StoredEvent,
    written: bool,
    cleanups: Vec<Cleanup>,
}

impl Pipeline {
    /// Assembles a pipeline from connected clients.
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        events: Outbox,
        dead_letters: Option<Outbox>,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        Pipeline {
            settings,
            store,
            events,
            dead_letters,
            metrics,
        }
    }

    /// Checks that the archive bucket can be reached.
    pub async fn check_archive(&self) -> Result<(), Failure> {
        Ok(self.store.check_bucket().await?)
    }

    /// Processes one delivered message to the end: stored and acked, dead-lettered, or nacked.
    ///
    /// Its span continues the trace the message arrived with ([`trace_context`]),
    /// and the event and any dead-letter copy carry the trace on.
    pub async fn handle(&self, envelope: Envelope, delivery: Delivery) -> Outcome {
        let pubsub = &self.settings.pubsub;
        let span = spans::message(&envelope, &pubsub.project, &pubsub.subscription);
        let trace = trace_context::continue_in(&span, trace_context::incoming(&envelope.attributes));
        crate::telemetry::link_logs(&span, &trace.span_context, trace.own_span);
        let started = std::time::Instant::now();
        let _in_flight = self.metrics.start_message();
        let outcome = Box::pin(self.handle_in_span(envelope, delivery, &trace, started))
            .instrument(span)
            .await;
        self.metrics.record(&outcome, started.elapsed());
        outcome
    }

    async fn handle_in_span(
        &self,
        envelope: Envelope,
        delivery: Delivery,
        trace: &Propagated,
        started: std::time::Instant,
    ) -> Outcome {
        let span = tracing::Span::current();
        let result = match AudioMessage::parse(&envelope, &self.settings.storage.staging_buckets) {
            Ok(message) => {
                span.record("audio_id", tracing::field::display(message.audio_id));
                span.set_attribute("audio_store.audio_id", message.audio_id.to_string());
                self.store_with_retries(&message, trace).await
            }
            Err(error) => Err(Failure::from(error)),
        };
        if let Err(failure) = &result {
            spans::failed(&span, failure);
        }
        match result {
            Ok(stored) => {
                let acked = delivery
                    .ack()
                    .instrument(spans::ack(&self.settings.pubsub.subscription));
                if let Err(error) = acked.await {
                    // Not acked: the message comes back and identity makes the redelivery harmless.
                    // Keep the sources so that the redelivery finds them.
                    let failure = Failure::from(error);
                    spans::failed(&span, &failure);
                    warn!(
                        error = failure.message(),
                        error_kind = failure.kind().as_str(),
                        "ack not confirmed; keeping the sources"
                    );
                    return Outcome::Nacked(failure.kind());
                }
                self.clean_up(&stored.cleanups).await;
                info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    audio = %stored.event.audio.uri,
                    thumbnail = stored.event.thumbnail.as_ref().map(|t| t.uri.as_str()),
                    written = stored.written,
                    "stored"
                );
                if stored.written {
                    Outcome::Stored
                } else {
                    Outcome::AlreadyStored
                }
            }
            Err(failure) if failure.is_permanent() => {
                self.dead_letter(&envelope, delivery, &failure, trace).await
            }
            Err(failure) => {
                warn!(
                    error = failure.message(),
                    error_kind = failure.kind().as_str(),
                    "giving up for now; nacking for redelivery"
                );
                delivery.nack();
                Outcome::Nacked(failure.kind())
            }
        }
    }

    fn backoff(&self) -> ExponentialBuilder {
        let retry = &self.settings.retry;
        ExponentialBuilder::default()
            .with_min_delay(retry.initial_backoff)
            .with_max_delay(retry.max_backoff)
            .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
            .with_jitter()
    }

    async fn store_with_retries(
        &self,
        message: &AudioMessage,
        trace: &Propagated,
    ) -> Result<Stored, Failure> {
        (|| self.store_once(message, trace))
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(|failure: &Failure| !failure.is_permanent())
            .notify(|failure: &Failure, delay| {
                self.metrics.retried(failure.kind());
                warn!(
                    error = failure.message(),
                    error_kind = failure.kind().as_str(),
                    delay_ms = delay.as_millis() as u64,
                    "retrying"
                );
            })
            .await
    }

    /// One attempt: both parts checked, then both stored, then the confirmed event.
    async fn store_once(&self, message: &AudioMessage, trace: &Propagated) -> Result<Stored, Failure> {
        // Names from `{meta.KEY}` need usable values: refused before anything is read or uploaded.
        self.settings
            .storage
            .layout
            .check_metadata(&message.metadata)
            .map_err(|error| Failure::from(Problem::InvalidMetadata(error.to_string())))?;
        // Both sources are checked (allowed, present, right content) before anything is
        // uploaded, so a bad thumbnail does not leave an orphaned audio object behind.
        let check = |kind, source| traced(spans::check(kind), self.prepare(message, kind, source));
        let thumbnail = async {
            match &message.thumbnail {
                Some(source) => check(Kind::Thumbnail, source).await.map(Some),
                None => Ok(None),
            }
        };
        let (audio, thumbnail) = tokio::try_join!(check(Kind::Audio, &message.audio), thumbnail)?;
        let thumbnail = async {
            match thumbnail {
                Some(prepared) => self.commit_traced(Kind::Thumbnail, prepared).await.map(Some),
                None => Ok(None),
            }
        };
        let (audio, thumbnail) = tokio::try_join!(self.commit_traced(Kind::Audio, audio), thumbnail)?;
        let written = audio.written || thumbnail.as_ref().is_some_and(|t| t.written);
        let cleanups = [
            audio.cleanup.clone(),
            thumbnail.as_ref().and_then(|t| t.cleanup.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let event = StoredEvent {
            audio_id: message.audio_id.to_string(),
            audio: audio.object,
            thumbnail: thumbnail.map(|t| t.object),
            source: EventSource {
                message_id: message.message_id.clone(),
                audio: message.audio_as_sent.clone(),
                thumbnail: message.thumbnail_as_sent.clone(),
            },
            metadata: message.metadata.clone(),
            stored_at: event::format_timestamp(jiff::Timestamp::now()),
        };
        let mut attributes = event.attributes(
            message.audio_id,
            &self.settings.pubsub.event_source,
            &self.settings.pubsub.event_type,
        );
        attributes.extend(trace.attributes.iter().cloned());
        let publish = async {
            let published = self.events.publish(event.to_json(), attributes).await;
            published.map_err(Failure::from)
        };
        traced(spans::send(self.events.topic()), publish).await?;
        Ok(Stored {
            event,
            written,
            cleanups,
        })
    }

    /// Stores a prepared file in its span (none when it was stored already).
    async fn commit_traced(&self, kind: Kind, prepared: Prepared) -> Result<part::Part, Failure> {
        // Boxed: the SDK futures inside are large, and two of them run side by side.
        match prepared.operation() {
            Some((operation, object)) => {
                let span = spans::store(kind, operation, object);
                traced(span, Box::pin(self.commit(prepared))).await
            }
            None => Box::pin(self.commit(prepared)).await,
        }
    }

    async fn dead_letter(
        &self,
        envelope: &Envelope,
        delivery: Delivery,
        failure: &Failure,
        trace: &Propagated,
    ) -> Outcome {
        let kind = failure.kind();
        let Some(outbox) = &self.dead_letters else {
            warn!(
                error = failure.message(),
                error_kind = kind.as_str(),
                "permanent failure and no dead-letter topic; nacking"
            );
            delivery.nack();
            return Outcome::Nacked(kind);
        };
        // The copy carries the worker's trace context in place of the one that came in.
        let mut traced_envelope = envelope.clone();
        trace.apply(&mut traced_envelope.attributes);
        let copy = dead_letter::copy(&traced_envelope, failure.kind().as_str(), failure.message());
        if copy.data.len() < envelope.data.len() {
            warn!(
                bytes = envelope.data.len(),
                "the dead-letter copy goes without its data: the message would exceed Pub/Sub's size limit"
            );
        }
        let publish = || outbox.publish(copy.data.clone(), copy.attributes.clone());
        let published = publish
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .instrument(spans::send(outbox.topic()))
            .await;
        if let Err(error) = published {
            let failure = Failure::from(error);
            warn!(
                error = failure.message(),
                error_kind = kind.as_str(),
                "dead-letter publish failed; nacking"
            );
            delivery.nack();
            return Outcome::Nacked(failure.kind());
        }
        let acked = delivery
            .ack()
            .instrument(spans::ack(&self.settings.pubsub.subscription));
        if let Err(error) = acked.await {
            warn!(%error, "dead-lettered but the ack was not confirmed; it will come back");
        }
        warn!(
            error = failure.message(),
            error_kind = kind.as_str(),
            topic = outbox.topic(),
            "dead-lettered"
        );
        Outcome::DeadLettered(kind)
    }
}
