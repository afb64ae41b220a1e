//! Failures: the one place that decides whether a failure is transient
//! (retry, then nack) or permanent (dead-letter), and the small fixed set of
//! error kinds used in logs, metrics and dead-letter attributes.

use crate::message::MessageError;
use crate::pubsub::{PubsubCause, PubsubError};
use crate::source::SourceError;
use crate::store::{StoreCause, StoreError};
use std::fmt;

/// Why a message was not stored; a bounded set, safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The data is not JSON.
    InvalidJson,
    /// JSON, but not a valid "audio processed" message.
    InvalidMessage,
    /// A source of a form audio-store does not read (relative path, `http://`, a directory, ...).
    UnsupportedSource,
    /// A source outside `sources.local_roots` or `storage.staging_buckets`.
    SourceNotAllowed,
    /// A source that does not exist, with nothing stored for it.
    SourceMissing,
    /// The audio is not audio, the thumbnail not an image, or a file is empty.
    BadContent,
    /// An object of this identity exists with different content.
    IdConflict,
    /// Cloud Storage did not answer, or answered 408/429/5xx.
    StorageUnavailable,
    /// Cloud Storage refused the request (permissions, missing bucket): fixed by an operator, not by the message.
    StorageRejected,
    /// Pub/Sub did not confirm a publish or an ack.
    PubsubUnavailable,
    /// A local source exists but could not be read.
    SourceUnreadable,
}

impl ErrorKind {
    /// Every kind, for metrics and documentation.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::InvalidJson,
        ErrorKind::InvalidMessage,
        ErrorKind::UnsupportedSource,
        ErrorKind::SourceNotAllowed,
        ErrorKind::SourceMissing,
        ErrorKind::BadContent,
        ErrorKind::IdConflict,
        ErrorKind::StorageUnavailable,
        ErrorKind::StorageRejected,
        ErrorKind::PubsubUnavailable,
        ErrorKind::SourceUnreadable,
    ];

    /// The snake_case name used in logs, metrics and the `error_kind` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::InvalidMessage => "invalid_message",
            ErrorKind::UnsupportedSource => "unsupported_source",
            ErrorKind::SourceNotAllowed => "source_not_allowed",
            ErrorKind::SourceMissing => "source_missing",
            ErrorKind::BadContent => "bad_content",
            ErrorKind::IdConflict => "id_conflict",
            ErrorKind::StorageUnavailable => "storage_unavailable",
            ErrorKind::StorageRejected => "storage_rejected",
            ErrorKind::PubsubUnavailable => "pubsub_unavailable",
            ErrorKind::SourceUnreadable => "source_unreadable",
        }
    }

    /// The kind named `name` (as in [`ErrorKind::as_str`]), if there is one.
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// Whether retrying the same message can never succeed: it is dead-lettered.
    pub fn is_permanent(self) -> bool {
        match self {
            ErrorKind::InvalidJson
            | ErrorKind::InvalidMessage
            | ErrorKind::UnsupportedSource
            | ErrorKind::SourceNotAllowed
            | ErrorKind::SourceMissing
            | ErrorKind::BadContent
            | ErrorKind::IdConflict => true,
            ErrorKind::StorageUnavailable
            | ErrorKind::StorageRejected
            | ErrorKind::PubsubUnavailable
            | ErrorKind::SourceUnreadable => false,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// An error and its sources on one line, `outer: inner: root`, each link once.
///
/// For logs and messages that only show `Display`: errors that add context keep
/// their cause as a source, not in their message. Some errors (the SDKs')
/// repeat their source in their own message as well; a link whose text the
/// line already holds is left out.
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

/// The whole chain of `error` on one line; see [`Chain`].
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(error) = source {
            let text = error.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = error.source();
        }
        formatter.write_str(&line)
    }
}

/// Why one message could not be stored: a kind and a one-line description.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Failure {
    kind: ErrorKind,
    message: String,
}

/// Longest description carried in logs and the `error` attribute.
const MAX_MESSAGE_CHARS: usize = 500;

impl Failure {
    /// A failure of `kind` described by `message` (made one line, bounded).
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Failure {
        let text = message.to_string();
        let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.chars().count() > MAX_MESSAGE_CHARS {
            line = line.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
        }
        Failure { kind, message: line }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The one-line description (without the kind).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the message should be dead-lettered rather than retried.
    pub fn is_permanent(&self) -> bool {
        self.kind.is_permanent()
    }
}

impl From<MessageError> for Failure {
    fn from(error: MessageError) -> Failure {
        match error {
            MessageError::InvalidJson(_) => Failure::new(ErrorKind::InvalidJson, error),
            MessageError::Invalid(_) => Failure::new(ErrorKind::InvalidMessage, error),
            MessageError::Source { field, error } => {
                let kind = source_kind(&error);
                Failure::new(kind, format!("{field}: {error}"))
            }
        }
    }
}

impl From<SourceError> for Failure {
    fn from(error: SourceError) -> Failure {
        Failure::new(source_kind(&error), error)
    }
}

fn source_kind(error: &SourceError) -> ErrorKind {
    match error {
        SourceError::Unsupported(_) | SourceError::NotAFile(_) => ErrorKind::UnsupportedSource,
        SourceError::NotAllowed(_) | SourceError::Changed(_) => ErrorKind::SourceNotAllowed,
        SourceError::Missing(_) => ErrorKind::SourceMissing,
        SourceError::Unreadable { error, .. } if can_never_be_opened(error) => ErrorKind::UnsupportedSource,
        SourceError::Unreadable { .. } => ErrorKind::SourceUnreadable,
    }
}

/// Whether a local path fails for what it is, not for the moment: a name too
/// long, a symlink loop, a file where a directory should be, a socket or a
/// device, a directory. Retrying such a source can never succeed. Permission
/// and I/O errors can pass (an operator fixes them) and stay transient.
fn can_never_be_opened(error: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(error),
        Some(
            Errno::NAMETOOLONG
                | Errno::LOOP
                | Errno::NOTDIR
                | Errno::NXIO
                | Errno::ISDIR
                | Errno::NODEV
                | Errno::INVAL
                | Errno::OPNOTSUPP
        )
    )
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        let kind = match &error.cause {
            StoreCause::Io(_) => ErrorKind::SourceUnreadable,
            cause => match cause.http_status() {
                Some(408 | 429) | Some(500..=599) | None => ErrorKind::StorageUnavailable,
                Some(_) => ErrorKind::StorageRejected,
            },
        };
        Failure::new(kind, chain(&error))
    }
}

impl From<PubsubError> for Failure {
    fn from(error: PubsubError) -> Failure {
        Failure::new(ErrorKind::PubsubUnavailable, chain(&error))
    }
}

impl From<PubsubCause> for Failure {
    fn from(cause: PubsubCause) -> Failure {
        Failure::new(ErrorKind::PubsubUnavailable, chain(&cause))
    }
}

/// What the pipeline found wrong with one message or one of its files, in its
/// own words; the kind, and with it retry or dead-letter, is decided here.
#[derive(Debug)]
pub enum Problem {
    /// The message's metadata breaks the layout's or Cloud Storage's rules: permanent.
    InvalidMetadata(String),
    /// A source is gone and nothing is stored for it: permanent (an operator
    /// restores the file and replays the dead letter).
    SourceGone(String),
    /// An object of this identity holds other content: permanent.
    OtherContent(String),
    /// A file is not what its kind needs (not playable audio, not an image): permanent.
    NotMedia(String),
    /// The probe could not run to its end (its task failed): transient.
    ProbeFailed(String),
    /// An object could not be read while it was probed (Cloud Storage failed
    /// after the client's own retries): transient, like any unanswered request.
    ObjectUnreadable(String),
    /// Cloud Storage said an object exists, then did not find it: transient.
    StorageInconsistent(String),
}

impl From<Problem> for Failure {
    fn from(problem: Problem) -> Failure {
        match problem {
            Problem::InvalidMetadata(what) => Failure::new(ErrorKind::InvalidMessage, what),
            Problem::SourceGone(what) => Failure::new(ErrorKind::SourceMissing, what),
            Problem::OtherContent(what) => Failure::new(ErrorKind::IdConflict, what),
            Problem::NotMedia(what) => Failure::new(ErrorKind::BadContent, what),
            Problem::ProbeFailed(what) => Failure::new(ErrorKind::SourceUnreadable, what),
            Problem::ObjectUnreadable(what) => Failure::new(ErrorKind::StorageUnavailable, what),
            Problem::StorageInconsistent(what) => Failure::new(ErrorKind::StorageUnavailable, what),
        }
    }
}

/// Whether a Pub/Sub failure ends a command instead of being retried: a
/// topic or subscription that does not exist cannot start to exist by
/// retrying (a configuration error, exit 2).
pub fn ends_the_run(error: &PubsubError) -> bool {
    error.is_not_found()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_problems_are_permanent_and_service_problems_are_not() {
        let permanent: Vec<&str> = ErrorKind::ALL
            .iter()
            .filter(|kind| kind.is_permanent())
            .map(|kind| kind.as_str())
            .collect();
        assert_eq!(
            permanent,
            [
                "invalid_json",
                "invalid_message",
                "unsupported_source",
                "source_not_allowed",
                "source_missing",
                "bad_content",
                "id_conflict"
            ]
        );
    }

    #[test]
    fn a_failure_is_one_bounded_line() {
        let failure = Failure::new(ErrorKind::InvalidJson, format!("a\nb\t{}", "x".repeat(2000)));
        assert!(!failure.message().contains('\n'));
        assert!(failure.message().chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert!(failure.message().starts_with("a b x"));
    }

    #[test]
    fn local_errors_that_can_never_pass_are_permanent_and_the_others_transient() {
        use rustix::io::Errno;
        let kind = |errno: Errno| {
            Failure::from(SourceError::Unreadable {
                path: "/spool/x.wav".into(),
                error: errno.into(),
            })
            .kind()
        };
        for errno in [
            Errno::NAMETOOLONG,
            Errno::LOOP,
            Errno::NOTDIR,
            Errno::NXIO,
            Errno::ISDIR,
        ] {
            assert_eq!(kind(errno), ErrorKind::UnsupportedSource, "{errno:?}");
        }
        for errno in [Errno::ACCESS, Errno::IO, Errno::MFILE, Errno::STALE] {
            assert_eq!(kind(errno), ErrorKind::SourceUnreadable, "{errno:?}");
        }
        assert_eq!(
            Failure::from(SourceError::Changed("/spool/x.wav".into())).kind(),
            ErrorKind::SourceNotAllowed
        );
    }

    #[test]
    fn every_kind_is_found_by_its_name() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::from_name("nonsense"), None);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connect audio-archive")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("credentials: no ADC found")]
    struct Middle(#[source] Repeating);

    /// Like the SDKs' errors: the message repeats the source.
    #[derive(Debug, thiserror::Error)]
    #[error("no ADC found")]
    struct Repeating;

    #[test]
    fn a_chain_prints_each_link_once() {
        assert_eq!(
            chain(&Outer(Middle(Repeating))).to_string(),
            "connect audio-archive: credentials: no ADC found"
        );
    }

    #[test]
    fn storage_statuses_are_classified() {
        let with_status = |status| {
            Failure::from(StoreError {
                operation: "upload",
                target: "gs://b/o".into(),
                cause: StoreCause::Status {
                    status,
                    message: "m".into(),
                },
            })
            .kind()
        };
        assert_eq!(with_status(503), ErrorKind::StorageUnavailable);
        assert_eq!(with_status(429), ErrorKind::StorageUnavailable);
        assert_eq!(with_status(403), ErrorKind::StorageRejected);
        assert!(!with_status(403).is_permanent());
    }
}
