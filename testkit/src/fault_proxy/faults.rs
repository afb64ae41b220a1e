//! The faults a test asked for, and what they make of one request.

use std::time::Duration;

use hyper::StatusCode;

/// A chunked body (the storage client streams single-shot uploads so) that a
/// random reset applies to is reset within this many bytes, or when the
/// response begins if it is shorter.
const RANDOM_RESET_CHUNKED: u64 = 4096;

/// Pending and standing faults; see the methods of [`super::FaultProxy`].
#[derive(Default)]
pub(super) struct Faults {
    pub(super) fail_next: usize,
    pub(super) fail_status: StatusCode,
    pub(super) matching: Vec<Rule>,
    /// Pending `reset_next` uses.
    pub(super) resets: usize,
    pub(super) reset_after: u64,
    pub(super) latency: Duration,
    pub(super) upload_rate: Option<u64>,
    pub(super) random: Option<RandomFaults>,
}

/// The next `remaining` requests containing `needle` get `status`.
pub(super) struct Rule {
    pub(super) needle: String,
    pub(super) remaining: usize,
    pub(super) status: StatusCode,
}

pub(super) struct RandomFaults {
    pub(super) probability: f64,
    pub(super) rng: fastrand::Rng,
}

/// What to do with one request.
pub(super) enum Plan {
    /// Answer it with this status, without forwarding it.
    Fail(StatusCode),
    /// Forward it after `delay`; reset the connections as `reset` says.
    Forward { delay: Duration, reset: Option<ResetAt> },
}

/// Where in a request to reset the connections.
#[derive(Clone, Copy)]
pub(super) struct ResetAt {
    /// Once this many body bytes are forwarded; when that is the whole body,
    /// once the response begins.
    pub(super) after: u64,
    /// Whether a pending `reset_next` must still be taken when the point is
    /// reached (chunked bodies, whose length is not known up front).
    pub(super) needs_token: bool,
    /// Whether to reset when the response begins if the body ends before `after`.
    pub(super) at_end: bool,
}

impl Faults {
    /// The fault for the request `line` (`METHOD target`) with a body of
    /// `length` bytes (`None`: chunked). Injected errors come first, then
    /// `reset_next`, then random faults; latency adds to all but errors.
    pub(super) fn plan(&mut self, line: &str, length: Option<u64>) -> Plan {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Plan::Fail(self.fail_status);
        }
        if let Some(index) = self.matching.iter().position(|rule| line.contains(&rule.needle)) {
            let rule = &mut self.matching[index];
            rule.remaining -= 1;
            let status = rule.status;
            if rule.remaining == 0 {
                self.matching.remove(index);
            }
            return Plan::Fail(status);
        }
        let mut delay = self.latency;
        if self.resets > 0 && length.is_none_or(|length| length >= self.reset_after) {
            // A chunked body takes its `reset_next` only once it reaches the point.
            let needs_token = length.is_none();
            self.resets -= usize::from(!needs_token);
            let reset = ResetAt {
                after: self.reset_after,
                needs_token,
                at_end: false,
            };
            return Plan::Forward {
                delay,
                reset: Some(reset),
            };
        }
        let mut reset = None;
        if let Some(random) = &mut self.random
            && random.rng.f64() < random.probability
        {
            match random.rng.u8(0..4) {
                0 => return Plan::Fail(StatusCode::SERVICE_UNAVAILABLE),
                1 => return Plan::Fail(StatusCode::TOO_MANY_REQUESTS),
                2 => {
                    let after = match length {
                        Some(0) => 0,
                        Some(length) => random.rng.u64(0..length),
                        None => random.rng.u64(0..RANDOM_RESET_CHUNKED),
                    };
                    reset = Some(ResetAt {
                        after,
                        needs_token: false,
                        at_end: true,
                    });
                }
                _ => delay += Duration::from_millis(random.rng.u64(200..=1000)),
            }
        }
        Plan::Forward { delay, reset }
    }

    /// Takes one pending `reset_next` for a chunked body that reached its point.
    pub(super) fn take_reset(&mut self) -> bool {
        let pending = self.resets > 0;
        self.resets -= usize::from(pending);
        pending
    }
}
