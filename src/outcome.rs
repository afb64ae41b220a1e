//! The outcome of one message: how it ended, with the labels metrics and
//! logs use. A leaf module: the pipeline produces it, the worker and the
//! metrics read it.

use crate::error::ErrorKind;

/// How one message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both objects were written by this delivery, the event confirmed, the message acked.
    Stored,
    /// The objects were already there (a redelivery or replay); the event was published again and the message acked.
    AlreadyStored,
    /// A permanent failure, published to the dead-letter topic and acked.
    DeadLettered(ErrorKind),
    /// Not settled: returned to Pub/Sub for redelivery.
    Nacked(ErrorKind),
}

impl Outcome {
    /// Every label, in the order of the variants.
    pub const LABELS: [&'static str; 4] = ["stored", "already_stored", "dead_lettered", "nacked"];

    /// `stored`, `already_stored`, `dead_lettered` or `nacked`, as in metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::AlreadyStored => "already_stored",
            Outcome::DeadLettered(_) => "dead_lettered",
            Outcome::Nacked(_) => "nacked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_one_of_the_labels() {
        let outcomes = [
            Outcome::Stored,
            Outcome::AlreadyStored,
            Outcome::DeadLettered(ErrorKind::BadContent),
            Outcome::Nacked(ErrorKind::PubsubUnavailable),
        ];
        let labels: Vec<&str> = outcomes.iter().map(Outcome::as_str).collect();
        assert_eq!(labels, Outcome::LABELS);
    }
}
