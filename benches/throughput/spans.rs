//! Span export during the worker's runs (`BENCH_OTLP=1`, issue 14): the worker
//! gets `telemetry.otlp_endpoint` = an `OtlpReceiver` in this process, and
//! each run reports what the receiver got, what the worker dropped, and the
//! worker CPU spent after the last event (its last batches go out up to the
//! export task's 1 s batch delay later, outside the timed window).

use crate::report::Scenario;
use crate::system::{Cpu, CpuWatch};
use anyhow::Result;
use std::time::{Duration, Instant};
use testkit::{OtlpReceiver, WorkerProcess};

/// The worker's variable that turns span export on.
pub const ENDPOINT_VARIABLE: &str = "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT";
/// No new span for this long: the worker has sent everything it ended (its batch delay is 1 s).
const QUIET: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(30);

/// What one worker run exported.
#[derive(Clone, Copy, Default)]
pub struct Spans {
    pub received: usize,
    /// `audio_store_spans_dropped_total` at the end.
    pub dropped: u64,
    /// Worker CPU-s from the last event until the receiver went quiet.
    pub tail_cpu: f64,
}

/// Waits until the receiver has had no new span for [`QUIET`] (at most [`TIMEOUT`]),
/// then reads the counts and the worker's CPU since `done` (the sample at the last event).
pub async fn settle(
    receiver: &OtlpReceiver,
    worker: &WorkerProcess,
    watch: &CpuWatch,
    done: &Cpu,
) -> Result<Spans> {
    let started = Instant::now();
    let (mut received, mut changed) = (receiver.spans().len(), Instant::now());
    while changed.elapsed() < QUIET && started.elapsed() < TIMEOUT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = receiver.spans().len();
        if now != received {
            (received, changed) = (now, Instant::now());
        }
    }
    let dropped = worker.metric("audio_store_spans_dropped_total").await?;
    Ok(Spans {
        received,
        dropped: dropped.unwrap_or(0.0) as u64,
        tail_cpu: watch.sample().since(done).worker,
    })
}

/// One line for the report: whether export was on and, if so, what it sent.
pub fn summary(otlp: bool, scenarios: &[Scenario]) -> String {
    if !otlp {
        return "Span export: **off** (no `telemetry.otlp_endpoint`; `BENCH_OTLP=1` turns it on).".into();
    }
    let mut parts = Vec::new();
    for scenario in scenarios {
        let runs: Vec<Spans> = scenario.rounds.iter().filter_map(|r| r.worker.spans).collect();
        let messages = scenario.messages * runs.len();
        let received: usize = runs.iter().map(|s| s.received).sum();
        let dropped: u64 = runs.iter().map(|s| s.dropped).sum();
        let tail: f64 = runs.iter().map(|s| s.tail_cpu).sum();
        parts.push(format!(
            "{} {received} spans received in {} worker runs ({:.2} per message), {dropped} \
             dropped, worker CPU from the last event until no span came for {} s {:.3} ms per message",
            scenario.kind.name(),
            runs.len(),
            received as f64 / messages.max(1) as f64,
            QUIET.as_secs(),
            tail * 1000.0 / messages.max(1) as f64,
        ));
    }
    format!(
        "Span export: **on** (`BENCH_OTLP=1`: the worker sends its spans over OTLP/HTTP to a \
         receiver in the bench process, sample ratio 1.0): {}.",
        parts.join("; ")
    )
}
