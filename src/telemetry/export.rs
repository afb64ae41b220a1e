//! Span export over OTLP/HTTP (protobuf) that never holds up a message.
//!
//! Ended spans go into a bounded queue without waiting (`on_end` is called
//! inside the message's work); a task on the runtime sends them in batches.
//! A full queue or a failed export drops spans, and every dropped span is
//! counted in `audio_store_spans_dropped_total`. The SDK's own batch
//! processor is not used: it exports from a thread of its own without a
//! runtime, where the async HTTP client cannot run, and it does not count
//! what a failed export loses.

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter as _, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Spans held while the collector is slow; more are dropped.
const QUEUE: usize = 4096;
/// Spans sent in one request.
const BATCH: usize = 512;
/// Longest a span waits in the queue before it is sent.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Longest one export may take, retries included.
pub(super) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Spans ended but never delivered to the collector (queue full, export failed).
pub fn spans_dropped() -> &'static Counter {
    &DROPPED
}

/// The span processor: hands sampled spans to the export task.
#[derive(Debug)]
pub(super) struct Queue {
    spans: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() && self.spans.try_send(span).is_err() {
            DROPPED.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Asks the export task to send what it holds; dropped at exit.
#[derive(Debug)]
pub(super) struct Flush {
    requests: mpsc::Sender<oneshot::Sender<()>>,
}

impl Flush {
    /// Waits until every span ended so far was sent (or dropped), at most `timeout`.
    pub(super) async fn flush(&self, timeout: Duration) {
        let (done, sent) = oneshot::channel();
        if self.requests.send(done).await.is_ok() && tokio::time::timeout(timeout, sent).await.is_err() {
            warn!("spans not exported in time at shutdown");
        }
    }
}

/// Starts the export task on the current runtime.
pub(super) fn start(exporter: opentelemetry_otlp::SpanExporter) -> (Queue, Flush) {
    let (spans, queued) = mpsc::channel(QUEUE);
    let (requests, flushes) = mpsc::channel(1);
    tokio::spawn(export_loop(exporter, queued, flushes));
    (Queue { spans }, Flush { requests })
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queued: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        let flush = tokio::select! {
            received = queued.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return;
                }
                // Wait a little for more, so that a burst goes in one request.
                let deadline = tokio::time::Instant::now() + BATCH_DELAY;
                while batch.len() < BATCH
                    && let Ok(Some(span)) = tokio::time::timeout_at(deadline, queued.recv()).await
                {
                    batch.push(span);
                }
                None
            }
            Some(done) = flushes.recv() => {
                while let Ok(span) = queued.try_recv() {
                    batch.push(span);
                }
                Some(done)
            }
        };
        for chunk in batch.chunks(BATCH) {
            failing = export(&exporter, chunk.to_vec(), failing).await;
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// Sends one batch; returns whether exporting is failing now. A failure is
/// logged when exporting starts to fail and when it works again, not per batch.
async fn export(exporter: &opentelemetry_otlp::SpanExporter, batch: Vec<SpanData>, failing: bool) -> bool {
    let count = batch.len() as u64;
    let result = match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(_) => Err(format!("no answer within {EXPORT_TIMEOUT:?}")),
    };
    match result {
        Ok(()) => {
            if failing {
                warn!("span export works again");
            }
            false
        }
        Err(error) => {
            DROPPED.inc_by(count);
            if !failing {
                warn!(%error, dropped = count, "span export failed; dropping spans until the collector answers");
            }
            true
        }
    }
}
