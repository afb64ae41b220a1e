//! The monitor: a task beside the worker loop that keeps liveness and the
//! Pub/Sub side of readiness current, so that the loop never interrupts a
//! pull to do it.
//!
//! Every [`PROBE_INTERVAL`] it records a heartbeat (`/healthz` turns 503 when
//! the runtime stops scheduling it for [`crate::health::STALL_LIMIT`]) and asks
//! Pub/Sub for the input subscription ([`SubscriptionProbe`]); a failed probe
//! makes `/readyz` 503 with the reason until a probe succeeds again.
//!
//! When Pub/Sub answers again after an outage (at least
//! [`OUTAGE_PROBES`] failed probes in a row), the monitor says since when it
//! was unreachable ([`Monitor::recoveries`]): the worker loop then reopens a
//! streaming pull that has delivered nothing since, instead of leaving it to
//! the SDK's own reconnection, which backs off out of sight for up to a minute.

use crate::error::chain;
use crate::health::{Check, Health};
use crate::pubsub::SubscriptionProbe;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the monitor beats and probes. With the probe's own timeout
/// ([`crate::pubsub::PROBE_TIMEOUT`]), readiness turns false within 10 s of
/// Pub/Sub becoming unreachable.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Failed probes in a row that make an outage, so that one slow answer does
/// not count as one.
pub const OUTAGE_PROBES: u32 = 2;

/// The running monitor; it stops when dropped.
#[derive(Debug)]
pub struct Monitor {
    task: JoinHandle<()>,
    recoveries: watch::Receiver<Option<Instant>>,
}

impl Monitor {
    /// Starts beating and probing `probe`'s subscription into `health`.
    pub fn start(health: Health, probe: SubscriptionProbe) -> Monitor {
        let (recovered, recoveries) = watch::channel(None);
        Monitor {
            task: tokio::spawn(watch(health, probe, recovered)),
            recoveries,
        }
    }

    /// Changes each time Pub/Sub answers again after an outage, to the moment
    /// the outage began (its first failed probe).
    pub fn recoveries(&self) -> watch::Receiver<Option<Instant>> {
        self.recoveries.clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch(health: Health, probe: SubscriptionProbe, recovered: watch::Sender<Option<Instant>>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first failed probe of the current run of failures, and how many there were.
    let mut failing: Option<(Instant, u32)> = None;
    loop {
        tick.tick().await;
        health.beat();
        let started = Instant::now();
        let problem = probe.check().await.err().map(|error| chain(&error).to_string());
        failing = match (&problem, failing) {
            (Some(_), None) => Some((started, 1)),
            (Some(_), Some((since, failures))) => Some((since, failures + 1)),
            (None, Some((since, failures))) => {
                if failures >= OUTAGE_PROBES {
                    recovered.send_replace(Some(since));
                }
                None
            }
            (None, None) => None,
        };
        health.report(Check::Subscription, problem);
    }
}
