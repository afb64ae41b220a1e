//! Health: what the worker shares with the outside while it runs, and the
//! operations endpoint that serves it (`/healthz`, `/readyz`, `/metrics`).

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Without a heartbeat for this long the worker is reported as not alive.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Where the worker is in its life, as far as readiness is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    /// Connecting and checking the archive bucket.
    #[default]
    Starting,
    /// Pulling messages.
    Pulling,
    /// Shutdown has begun.
    Stopping,
}

/// A condition readiness depends on, each with its own problem (or none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    /// The archive bucket can be listed with the worker's credentials.
    Archive,
    /// The input subscription answers the periodic probe.
    Subscription,
    /// The streaming pull has not failed since it was last reopened.
    Pull,
}

impl Check {
    fn as_str(self) -> &'static str {
        match self {
            Check::Archive => "archive",
            Check::Subscription => "subscription",
            Check::Pull => "pull",
        }
    }
}

#[derive(Debug, Default)]
struct Readiness {
    stage: Stage,
    problems: BTreeMap<Check, String>,
}

/// The worker's live state: readiness and its reasons, a heartbeat, and its metrics.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The stage and what currently keeps the worker from being ready.
    readiness: Arc<Mutex<Readiness>>,
    /// Milliseconds since the epoch of the last heartbeat; 0 before the first.
    heartbeat: Arc<AtomicU64>,
}

impl Health {
    /// A fresh state: starting (not ready), no heartbeat yet.
    pub fn new() -> Health {
        Health::default()
    }

    fn readiness_state(&self) -> std::sync::MutexGuard<'_, Readiness> {
        // The state is plain data: a panic elsewhere cannot leave it half-written.
        self.readiness.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the worker is pulling with every check passing.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Ok` when ready, otherwise why not (one line).
    pub fn readiness(&self) -> Result<(), String> {
        let state = self.readiness_state();
        let mut reasons = Vec::new();
        match state.stage {
            Stage::Starting => reasons.push("starting".to_string()),
            Stage::Stopping => reasons.push("shutting down".to_string()),
            Stage::Pulling => {}
        }
        for (check, problem) in &state.problems {
            reasons.push(format!("{}: {problem}", check.as_str()));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// Moves the worker to `stage`.
    pub fn set_stage(&self, stage: Stage) {
        self.readiness_state().stage = stage;
    }

    /// Records the problem of `check` (`None`: it passes); returns whether that changed anything.
    pub fn set_problem(&self, check: Check, problem: Option<String>) -> bool {
        let mut state = self.readiness_state();
        match problem {
            Some(problem) => state.problems.insert(check, problem.clone()).as_ref() != Some(&problem),
            None => state.problems.remove(&check).is_some(),
        }
    }

    /// Records the problem of `check` like [`set_problem`](Health::set_problem)
    /// and logs a change: a WARN line with the reason, an INFO line on recovery.
    pub fn report(&self, check: Check, problem: Option<String>) {
        if !self.set_problem(check, problem.clone()) {
            return;
        }
        match problem {
            Some(reason) => tracing::warn!(check = check.as_str(), %reason, "not ready"),
            None => tracing::info!(check = check.as_str(), "check passes"),
        }
    }

    /// The current problem of `check`, if any.
    pub fn problem(&self, check: Check) -> Option<String> {
        self.readiness_state().problems.get(&check).cloned()
    }

    /// Records that the worker is alive now.
    pub fn beat(&self) {
        self.heartbeat.store(now_millis(), Ordering::SeqCst);
    }

    /// Whether the process and its worker are alive: a recent heartbeat, or none yet.
    pub fn is_alive(&self) -> bool {
        let last = self.heartbeat.load(Ordering::SeqCst);
        last == 0 || now_millis().saturating_sub(last) < STALL_LIMIT.as_millis() as u64
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(1)
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    if health.is_alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the worker is stalled\n")
    }
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    match health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_worker_is_alive_but_not_ready() {
        let health = Health::new();
        assert!(health.is_alive());
        assert_eq!(health.readiness(), Err("starting".to_string()));
        health.set_stage(Stage::Pulling);
        health.beat();
        assert!(health.is_alive() && health.is_ready());
    }

    #[test]
    fn readiness_names_every_problem_until_it_clears() {
        let health = Health::new();
        health.set_stage(Stage::Pulling);
        assert!(health.set_problem(Check::Subscription, Some("unreachable".into())));
        assert!(!health.set_problem(Check::Subscription, Some("unreachable".into())));
        assert!(health.set_problem(Check::Pull, Some("not found".into())));
        assert_eq!(
            health.readiness(),
            Err("subscription: unreachable; pull: not found".to_string())
        );
        assert!(health.set_problem(Check::Subscription, None));
        assert!(health.set_problem(Check::Pull, None));
        assert!(health.is_ready());
        health.set_stage(Stage::Stopping);
        assert_eq!(health.readiness(), Err("shutting down".to_string()));
    }

    #[test]
    fn a_stalled_loop_is_not_alive() {
        let health = Health::new();
        health.heartbeat.store(
            now_millis() - STALL_LIMIT.as_millis() as u64 - 1_000,
            Ordering::SeqCst,
        );
        assert!(!health.is_alive());
    }
}
