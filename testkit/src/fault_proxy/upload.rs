//! A request body on its way upstream: counted, throttled, and cut where a
//! planned reset says.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use tokio::time::Instant;

use super::connection::{Body, BoxError, Connection};
use super::faults::ResetAt;
use super::lock;

/// The largest piece of body forwarded at a time while throttled.
const MAX_SLICE: usize = 64 * 1024;

/// One request body being forwarded.
struct Upload {
    connection: Arc<Connection>,
    body: Body,
    /// Received from the client, not yet forwarded.
    pending: Bytes,
    /// Body bytes forwarded so far.
    sent: u64,
    /// The length of a `Content-Length` body (hyper stops polling a body
    /// once that much is written); `None` for a chunked one.
    length: Option<u64>,
    reset: Option<ResetAt>,
    /// `METHOD target`, for the log.
    line: String,
}

/// `body` (`length` bytes, `None`: chunked) as it goes upstream: counted,
/// throttled, and reset where `reset` says.
pub(super) fn upstream(
    connection: Arc<Connection>,
    body: Body,
    length: Option<u64>,
    reset: Option<ResetAt>,
    line: &str,
) -> Body {
    let mut upload = Upload {
        connection,
        body,
        pending: Bytes::new(),
        sent: 0,
        length,
        reset,
        line: line.to_string(),
    };
    if length == Some(0) {
        // hyper does not poll an empty body.
        upload.finish();
        return upload.body;
    }
    let frames = futures::stream::unfold(upload, |mut upload| async move {
        let frame = upload.next().await?;
        Some((frame, upload))
    });
    StreamBody::new(frames).boxed_unsync()
}

impl Upload {
    /// The next frame to forward; at a reset point, none ever (the
    /// connections are reset).
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        if let Some(reset) = self.reset
            && self.sent >= reset.after
            && self.length != Some(self.sent)
        {
            self.reset = None;
            if !reset.needs_token || self.connection.shared.faults().take_reset() {
                self.connection
                    .reset(&format!("{} after {} body bytes", self.line, self.sent));
                // The tasks that own the connections reset them now; until
                // then hyper must neither send nor close anything more.
                return std::future::pending().await;
            }
        }
        if self.pending.is_empty() {
            match self.body.frame().await {
                None => {
                    self.finish();
                    return None;
                }
                Some(Err(error)) => return Some(Err(error)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.pending = data,
                    Err(trailers) => return Some(Ok(trailers)),
                },
            }
        }
        let rate = self.connection.shared.faults().upload_rate;
        let mut take = self.pending.len();
        if let Some(rate) = rate {
            take = take.min(
                usize::try_from(rate / 50)
                    .unwrap_or(MAX_SLICE)
                    .clamp(512, MAX_SLICE),
            );
        }
        if let Some(reset) = self.reset {
            // Invariant: the check above ran since the last piece, so sent < after here.
            let room = usize::try_from(reset.after - self.sent).unwrap_or(usize::MAX);
            take = take.min(room.max(1));
        }
        if let Some(rate) = rate {
            tokio::time::sleep_until(self.throttle(rate, take)).await;
        }
        let data = self.pending.split_to(take);
        self.sent += take as u64;
        self.connection.shared.stats().bytes_up += take as u64;
        if self.length == Some(self.sent) {
            self.finish();
        }
        Some(Ok(Frame::data(data)))
    }

    /// The whole body is on its way: a reset still due comes when the
    /// response begins (the request takes effect, its response is lost).
    fn finish(&mut self) {
        if let Some(reset) = self.reset.take()
            && (self.sent >= reset.after || reset.at_end)
            && (!reset.needs_token || self.connection.shared.faults().take_reset())
        {
            self.connection.lose_response.store(true, Ordering::SeqCst);
        }
    }

    /// When the upload throttle (shared by all connections) lets `bytes`
    /// more through at `rate` bytes per second.
    fn throttle(&self, rate: u64, bytes: usize) -> Instant {
        let mut next = lock(&self.connection.shared.throttle);
        let at = (*next).max(Instant::now());
        *next = at + Duration::from_secs_f64(bytes as f64 / rate as f64);
        at
    }
}
