//! The worker loop: pulls messages, bounds how many are in flight, and
//! watches for shutdown. What happens to each message is the pipeline's job;
//! liveness and the Pub/Sub probe run beside the loop ([`crate::monitor`]).
//!
//! The loop never cancels a pull of its own accord: no timer races the
//! stream, so an idle worker keeps one StreamingPull open. Only shutdown
//! interrupts a pending pull, and the stream is then closed through its
//! shutdown token (see [`run`]). The one exception: when Pub/Sub answers
//! again after an outage and the stream has delivered nothing since it began,
//! the loop reopens the stream at once ([`crate::monitor`]).

use crate::config::Settings;
use crate::error::chain;
use crate::health::{Check, Health, Stage};
use crate::monitor::Monitor;
use crate::outcome::Outcome;
use crate::pipeline::Pipeline;
use crate::pubsub::{self, Inbox, Outbox, PubsubError, SubscriptionProbe};
use crate::store::{Store, StoreError};
use backon::BackoffBuilder as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Longest wait for pending acks and publishes to be flushed at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness checks of the archive at startup.
const READINESS_RETRY: Duration = Duration::from_secs(2);
/// First pause before reopening a failed streaming pull; it doubles (with jitter) up to
/// [`REOPEN_MAX_DELAY`] while the pull keeps failing.
const REOPEN_MIN_DELAY: Duration = Duration::from_secs(1);
/// Longest pause before reopening a failed streaming pull.
const REOPEN_MAX_DELAY: Duration = Duration::from_secs(30);
/// A reopened streaming pull that has not failed for this long counts as working again.
const REOPEN_SETTLE: Duration = Duration::from_secs(10);

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A Pub/Sub client could not be set up.
    #[error(transparent)]
    Pubsub(#[from] PubsubError),
    /// The storage client could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operations endpoint could not listen.
    #[error("http.listen {address}")]
    Listen {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why binding failed.
        #[source]
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

/// What the loop works with once it has started.
struct Started {
    pipeline: Pipeline,
    events: Outbox,
    dead_letters: Option<Outbox>,
    inbox: Inbox,
    /// Beats and probes while the worker runs; stops when dropped.
    _monitor: Monitor,
}

/// Runs the worker until `shutdown` completes, then drains in-flight messages
/// for up to `worker.shutdown_grace`, nacks the rest and flushes.
///
/// `health` is ready while messages are being pulled and every check passes
/// (archive bucket, subscription probe, streaming pull), and not from the
/// moment shutdown begins. `shutdown` is watched from the first moment: if it
/// completes during start-up, the worker returns at once with nothing done.
///
/// Whatever ends the loop — `shutdown`, or a Pub/Sub client that cannot be
/// rebuilt — goes through the same drain; the error, if any, is returned after it.
pub async fn run(
    settings: Arc<Settings>,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, WorkerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let started = tokio::select! {
        biased;
        () = &mut shutdown => {
            info!("shut down during start-up");
            return Ok(Summary::default());
        }
        started = start(&settings, &health) => started?,
    };
    let Started {
        pipeline,
        events,
        dead_letters,
        mut inbox,
        _monitor,
    } = started;
    let mut recoveries = _monitor.recoveries();
    // Streams replaced after a failure or an outage, closing in the background.
    let mut retired = JoinSet::new();

    let permits = Arc::new(Semaphore::new(settings.worker.concurrency));
    let mut in_flight = JoinSet::new();
    let mut summary = Summary::default();
    health.set_stage(Stage::Pulling);
    let ended = pull(
        &settings,
        &health,
        &pipeline,
        &mut inbox,
        &permits,
        &mut in_flight,
        &mut summary,
        &mut recoveries,
        &mut retired,
        &mut shutdown,
    )
    .await;

    // The one way out: whatever ended the loop, the drain below always runs.
    health.set_stage(Stage::Stopping);
    if let Err(error) = &ended {
        error!(error = %chain(error), "the worker cannot go on; shutting down");
    }
    while let Some(joined) = in_flight.try_join_next() {
        record(&mut summary, joined);
    }
    info!(
        in_flight = in_flight.len(),
        grace_ms = settings.worker.shutdown_grace.as_millis() as u64,
        "shutting down"
    );
    // Cancelling the stream's shutdown token ends a pull still opening and nacks
    // what it holds; its lease loop finishes once every delivery was settled.
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
        while retired.join_next().await.is_some() {}
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
    ended.map(|()| summary)
}

/// Connects everything, starts the monitor and waits until the archive bucket
/// is usable. Dropping it part-way (a shutdown during start-up) leaves nothing
/// behind: the streaming pull is opened only by the first pull.
async fn start(settings: &Arc<Settings>, health: &Health) -> Result<Started, WorkerError> {
    health.set_problem(Check::Archive, Some("not checked yet".into()));
    health.set_problem(Check::Subscription, Some("not probed yet".into()));
    let probe = SubscriptionProbe::connect(&settings.pubsub).await?;
    let monitor = Monitor::start(health.clone(), probe);
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
    let inbox = Inbox::open(&settings.pubsub, settings.worker.concurrency).await?;
    info!(
        subscription = %settings.pubsub.subscription,
        bucket = %settings.storage.bucket,
        concurrency = settings.worker.concurrency,
        "worker started"
    );
    // Not ready until the archive can be reached: a missing bucket or missing permissions
    // keep the pod out of service (503 on /readyz) instead of nacking every message.
    loop {
        match pipeline.check_archive().await {
            Ok(()) => break,
            Err(error) => health.report(Check::Archive, Some(error.to_string())),
        }
        tokio::time::sleep(READINESS_RETRY).await;
    }
    health.report(Check::Archive, None);
    Ok(Started {
        pipeline,
        events,
        dead_letters,
        inbox,
        _monitor: monitor,
    })
}

/// Pulls until `shutdown` completes (`Ok`) or the subscriber cannot be rebuilt (`Err`).
///
/// A pull that fails or ends is reopened after a backoff with jitter, logged
/// at WARN with its cause and counted in `audio_store_pull_reconnects_total`;
/// meanwhile readiness says why ([`Check::Pull`]) until a message arrives or the
/// reopened pull has not failed for [`REOPEN_SETTLE`]. A pull that has
/// delivered nothing since an outage that `recoveries` reports over is
/// reopened at once: the SDK may still be waiting out its own backoff.
#[allow(clippy::too_many_arguments)] // The loop's state, borrowed from `run`, which drains it after.
async fn pull<S: Future<Output = ()>>(
    settings: &Settings,
    health: &Health,
    pipeline: &Pipeline,
    inbox: &mut Inbox,
    permits: &Arc<Semaphore>,
    in_flight: &mut JoinSet<Outcome>,
    summary: &mut Summary,
    recoveries: &mut watch::Receiver<Option<Instant>>,
    retired: &mut JoinSet<()>,
    shutdown: &mut Pin<&mut S>,
) -> Result<(), WorkerError> {
    let backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(REOPEN_MIN_DELAY)
            .with_max_delay(REOPEN_MAX_DELAY)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut reopen_delays = backoff();
    // When the pull was reopened after a failure: it counts as working REOPEN_SETTLE later.
    let mut settling: Option<Instant> = None;
    // When the current stream last delivered a message.
    let mut last_delivery: Option<Instant> = None;
    loop {
        // Settle finished tasks as we go so the sets do not grow.
        while let Some(joined) = in_flight.try_join_next() {
            record(summary, joined);
        }
        while retired.try_join_next().is_some() {}
        // Waiting for a permit or a message is interrupted by shutdown only; dropping a
        // pending `next()` there is what the SDK itself does when its token is cancelled,
        // and `run` then closes the stream through that token.
        let permit = tokio::select! {
            biased;
            () = shutdown.as_mut() => return Ok(()),
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let next = {
            let next = inbox.next();
            tokio::pin!(next);
            loop {
                let settled = async {
                    match settling {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let recovered = async {
                    match recoveries.changed().await {
                        Ok(()) => *recoveries.borrow_and_update(),
                        // The monitor is gone (never while the loop runs): nothing more to hear.
                        Err(_) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = shutdown.as_mut() => return Ok(()),
                    next = &mut next => break Some(next),
                    // Observes the pending pull without touching it.
                    () = settled => {
                        settling = None;
                        reopen_delays = backoff();
                        health.report(Check::Pull, None);
                    }
                    Some(since) = recovered => {
                        if last_delivery.is_none_or(|at| at < since) {
                            break None;
                        }
                    }
                }
            }
        };
        let Some(next) = next else {
            drop(permit);
            warn!(
                error = "the streaming pull delivered nothing since Pub/Sub became unreachable",
                subscription = %settings.pubsub.subscription,
                "Pub/Sub answers again; reopening the streaming pull"
            );
            health.metrics.pull_reconnected();
            let stale = std::mem::replace(
                inbox,
                Inbox::open(&settings.pubsub, settings.worker.concurrency).await?,
            );
            // The old stream's deliveries, if any, are still settled through it; the
            // drain waits for it as for the current one.
            retired.spawn(async move { stale.closer().close().await });
            continue;
        };
        let problem = match next {
            Some(Ok((envelope, delivery))) => {
                last_delivery = Some(Instant::now());
                if settling.take().is_some() || health.problem(Check::Pull).is_some() {
                    reopen_delays = backoff();
                    health.report(Check::Pull, None);
                }
                let pipeline = pipeline.clone();
                in_flight.spawn(async move {
                    let outcome = pipeline.handle(envelope, delivery).await;
                    drop(permit);
                    outcome
                });
                continue;
            }
            Some(Err(error)) => chain(&error).to_string(),
            None => "the streaming pull ended".to_string(),
        };
        drop(permit);
        let delay = reopen_delays.next().unwrap_or(REOPEN_MAX_DELAY);
        warn!(
            error = %problem,
            delay_ms = delay.as_millis() as u64,
            subscription = %settings.pubsub.subscription,
            "streaming pull failed; reopening"
        );
        health.report(Check::Pull, Some(problem));
        tokio::select! {
            biased;
            () = shutdown.as_mut() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        health.metrics.pull_reconnected();
        let failed = std::mem::replace(
            inbox,
            Inbox::open(&settings.pubsub, settings.worker.concurrency).await?,
        );
        // The SDK has cancelled the failed stream already; its lease loop still
        // settles the deliveries it handed out, and the drain waits for it too.
        retired.spawn(async move { failed.closer().close().await });
        // A recovery reported while this loop waited is answered by the fresh stream.
        recoveries.borrow_and_update();
        settling = Some(Instant::now() + REOPEN_SETTLE);
    }
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
