//! Health: what the worker shares with the outside while it runs, and the
//! operations endpoint that serves it (`/healthz`, `/readyz`, `/metrics`).

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A loop that has not ticked for this long is reported as not alive.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// The worker's live state: readiness, a loop heartbeat, and its metrics.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// True while the worker is pulling; false during startup and from the moment shutdown begins.
    ready: Arc<AtomicBool>,
    /// Milliseconds since the epoch of the loop's last tick; 0 before the loop started.
    heartbeat: Arc<AtomicU64>,
}

impl Health {
    /// A fresh state: not ready, no heartbeat yet.
    pub fn new() -> Health {
        Health::default()
    }

    /// Whether the worker is pulling messages.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Marks the worker as pulling (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Records that the loop is alive now.
    pub fn beat(&self) {
        self.heartbeat.store(now_millis(), Ordering::SeqCst);
    }

    /// Whether the process and its loop are alive: the loop ticked recently, or has not started yet.
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
        (StatusCode::SERVICE_UNAVAILABLE, "the worker loop is stalled\n")
    }
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not pulling\n")
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
        assert!(!health.is_ready());
        health.set_ready(true);
        health.beat();
        assert!(health.is_alive() && health.is_ready());
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
