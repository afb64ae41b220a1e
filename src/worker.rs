//! The worker loop: pulls messages, bounds how many are in flight, and
//! watches for shutdown. What happens to each message is the pipeline's job.

use crate::config::Settings;
use crate::health::Health;
use crate::pipeline::{Outcome, Pipeline};
use crate::pubsub::{self, Inbox, Outbox, PubsubError};
use crate::store::{Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Longest wait for pending acks and publishes to be flushed at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before reopening a failed streaming pull.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// Pause between readiness checks of the archive at startup.
const READINESS_RETRY: Duration = Duration::from_secs(2);
/// How often an idle loop still records that it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A Pub/Sub client could not be set up, or the subscription does not exist.
    #[error("{0}")]
    Pubsub(#[from] PubsubError),
    /// The storage client could not be set up.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The operations endpoint could not listen.
    #[error("http.listen {address}: {error}")]
    Listen {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why binding failed.
        error: std::io::Error,
    },
}

/// Counts of how messages ended, returned when the worker stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Stored by this worker.
    pub stored: u64,
    /// Recognised as stored already.
    pub already_stored: u64,
    /// Sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Returned for redelivery.
    pub nacked: u64,
}

impl Summary {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Stored => self.stored += 1,
            Outcome::AlreadyStored => self.already_stored += 1,
            Outcome::DeadLettered(_) => self.dead_lettered += 1,
            Outcome::Nacked(_) => self.nacked += 1,
        }
    }
}

/// Runs the whole service: the operations endpoint on `http.listen` and the
/// worker, until `shutdown` completes and the worker has drained.
pub async fn run_service(
    settings: Arc<Settings>,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, WorkerError> {
    let address = settings.http.listen;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| WorkerError::Listen { address, error })?;
    if let Ok(bound) = listener.local_addr() {
        info!(address = %bound, "serving /healthz /readyz /metrics");
    }
    let health = Health::new();
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::health::serve(listener, health.clone(), async move {
        let _ = http_stopped.await;
    }));
    let result = run(settings, health, shutdown).await;
    let _ = stop_http.send(());
    match server.await {
        Ok(Err(error)) => warn!(%error, "the operations endpoint failed"),
        Err(error) => warn!(%error, "the operations endpoint panicked"),
        Ok(Ok(())) => {}
    }
    result
}

/// Runs the worker until `shutdown` completes, then drains in-flight messages
/// for up to `worker.shutdown_grace`, nacks the rest and flushes.
///
/// `health` is ready while messages are being pulled, and not from the
/// moment shutdown begins.
pub async fn run(
    settings: Arc<Settings>,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, WorkerError> {
    let store = Store::connect(&settings.storage).await?;
    let events = Outbox::connect(
        &settings.pubsub,
        &settings.pubsub.stored_topic,
        pubsub::BUSY_BATCHING,
    )
    .await?;
    let dead_letters = match &settings.pubsub.dead_letter_topic {
        Some(topic) => Some(Outbox::connect(&settings.pubsub, topic, pubsub::QUICK_BATCHING).await?),
        None => None,
    };
    let pipeline = Pipeline::new(
        settings.clone(),
        store,
        events.clone(),
        dead_letters.clone(),
        health.metrics.clone(),
    );
    let concurrency = settings.worker.concurrency;
    let mut inbox = Inbox::open(&settings.pubsub, concurrency).await?;
    info!(
        subscription = %settings.pubsub.subscription,
        bucket = %settings.storage.bucket,
        concurrency,
        "worker started"
    );

    // Not ready until the archive can be reached: a missing bucket or missing permissions
    // keep the pod out of service (503 on /readyz) instead of nacking every message.
    tokio::pin!(shutdown);
    loop {
        health.beat();
        match pipeline.check_archive().await {
            Ok(()) => break,
            Err(error) => warn!(%error, "the archive bucket is not reachable; not ready"),
        }
        tokio::select! {
            biased;
            () = &mut shutdown => {
                info!("shut down before becoming ready");
                return Ok(Summary::default());
            }
            () = tokio::time::sleep(READINESS_RETRY) => {}
        }
    }

    let permits = Arc::new(Semaphore::new(concurrency));
    let mut in_flight = JoinSet::new();
    let mut summary = Summary::default();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    health.set_ready(true);
    loop {
        health.beat();
        // Settle finished tasks as we go so the set does not grow.
        while let Some(joined) = in_flight.try_join_next() {
            record(&mut summary, joined);
        }
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = heartbeat.tick() => continue,
        };
        let next = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break None,
                next = inbox.next() => break Some(next),
                _ = heartbeat.tick() => health.beat(),
            }
        };
        let Some(next) = next else { break };
        match next {
            Some(Ok((envelope, delivery))) => {
                let pipeline = pipeline.clone();
                in_flight.spawn(async move {
                    let outcome = pipeline.handle(envelope, delivery).await;
                    drop(permit);
                    outcome
                });
            }
            Some(Err(error)) if error.cause.is_not_found() => {
                health.set_ready(false);
                error!(%error, "the input subscription does not exist");
                return Err(error.into());
            }
            Some(Err(error)) => {
                warn!(%error, "streaming pull failed; reopening");
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(REOPEN_DELAY) => {}
                }
                inbox = Inbox::open(&settings.pubsub, concurrency).await?;
            }
            None => {
                warn!("streaming pull ended; reopening");
                inbox = Inbox::open(&settings.pubsub, concurrency).await?;
            }
        }
    }

    health.set_ready(false);
    while let Some(joined) = in_flight.try_join_next() {
        record(&mut summary, joined);
    }
    info!(
        in_flight = in_flight.len(),
        grace_ms = settings.worker.shutdown_grace.as_millis() as u64,
        "shutting down"
    );
    let closer = inbox.closer();
    let closing = tokio::spawn(async move { closer.close().await });
    let drained = tokio::time::timeout(settings.worker.shutdown_grace, async {
        while let Some(joined) = in_flight.join_next().await {
            record(&mut summary, joined);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            unfinished = in_flight.len(),
            "shutdown grace over; nacking unfinished messages"
        );
        // Aborting drops their deliveries, which nacks them; nothing of theirs was acked or deleted.
        in_flight.abort_all();
        while let Some(joined) = in_flight.join_next().await {
            record(&mut summary, joined);
        }
    }
    if tokio::time::timeout(FLUSH_TIMEOUT, async {
        let _ = closing.await;
        events.flush().await;
        if let Some(dead_letters) = &dead_letters {
            dead_letters.flush().await;
        }
    })
    .await
    .is_err()
    {
        warn!("pending acks and publishes not flushed in time");
    }
    info!(
        stored = summary.stored,
        already_stored = summary.already_stored,
        dead_lettered = summary.dead_lettered,
        nacked = summary.nacked,
        "worker stopped"
    );
    Ok(summary)
}

fn record(summary: &mut Summary, joined: Result<Outcome, tokio::task::JoinError>) {
    match joined {
        Ok(outcome) => summary.count(&outcome),
        Err(error) if error.is_cancelled() => summary.nacked += 1,
        Err(error) => {
            // A panic in one message's task: its delivery was dropped (nacked); the worker goes on.
            error!(%error, "message task panicked; the message was nacked");
            summary.nacked += 1;
        }
    }
}
