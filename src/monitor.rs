//! The monitor: a task beside the worker loop that keeps liveness and the
//! Pub/Sub side of readiness current, so that the loop never interrupts a
//! pull to do it.
//!
//! Every [`PROBE_INTERVAL`] it records a heartbeat (`/healthz` turns 503 when
//! the runtime stops scheduling it for [`crate::health::STALL_LIMIT`]) and asks
//! Pub/Sub for the input subscription ([`SubscriptionProbe`]); a failed probe
//! makes `/readyz` 503 with the reason until a probe succeeds again.

use crate::error::chain;
use crate::health::{Check, Health};
use crate::pubsub::SubscriptionProbe;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the monitor beats and probes. With the probe's own timeout
/// ([`crate::pubsub::PROBE_TIMEOUT`]), readiness turns false within 10 s of
/// Pub/Sub becoming unreachable.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The running monitor; it stops when dropped.
#[derive(Debug)]
pub struct Monitor {
    task: JoinHandle<()>,
}

impl Monitor {
    /// Starts beating and probing `probe`'s subscription into `health`.
    pub fn start(health: Health, probe: SubscriptionProbe) -> Monitor {
        Monitor {
            task: tokio::spawn(watch(health, probe)),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch(health: Health, probe: SubscriptionProbe) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        health.beat();
        let problem = probe.check().await.err().map(|error| chain(&error).to_string());
        health.report(Check::Subscription, problem);
    }
}
