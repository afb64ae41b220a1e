//! Sources: where a message's files come from, and which of them may be read.
//!
//! A source is an absolute local path (or `file://` URI) that must resolve,
//! after following symlinks, to a regular file inside one of
//! `sources.local_roots`, or a `gs://bucket/object` in one of
//! `storage.staging_buckets`. Nothing outside those is ever read or deleted.
//!
//! A local file is opened by file descriptor, never by name: its canonical
//! path is checked against the roots, then opened beneath the root's
//! directory descriptor with no symlink allowed on the way, so a directory
//! swapped for a symlink after the check is refused rather than followed.
//! What was opened is remembered as a [`SpoolEntry`] (its directory's
//! descriptor, its name and its identity), and only that very file is ever
//! removed.
//!
//! The files: this one (what a source is: paths, `file://` and `gs://` URIs),
//! `local.rs` (opening a local file beneath its root), `spool_entry.rs`
//! (removing exactly the file that was read).

mod beneath;
mod local;
mod spool_entry;

pub use local::{FileIdentity, IN_MEMORY_LIMIT, LocalContent, LocalFile, crc32c_of_file, open_local};
pub use spool_entry::{KeptReason, Removal, SpoolEntry};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::PathBuf;

/// A file named by a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An absolute local path, as given (not yet resolved).
    Local(PathBuf),
    /// An object in a staging bucket.
    Gcs {
        /// The staging bucket.
        bucket: String,
        /// The object name.
        object: String,
    },
}

/// Why a source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A scheme or form audio-store does not read.
    #[error("unsupported source {0:?} (expected an absolute path, file:///path or gs://bucket/object)")]
    Unsupported(String),
    /// A well-formed source outside what the configuration allows.
    #[error("{0}")]
    NotAllowed(String),
    /// The path changed between its check and its opening: a symlink or another entry was swapped in.
    #[error(
        "{0} changed while it was being checked (a symlink or another entry was swapped in on the way); refused"
    )]
    Changed(String),
    /// The file does not exist (any more).
    #[error("{0} does not exist")]
    Missing(String),
    /// Exists but is not a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(String),
    /// Could not be inspected or opened; `error.rs` decides from the cause whether that can pass.
    #[error("cannot read {path}: {error}")]
    Unreadable {
        /// The path.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// What a `file://` URI's path keeps unencoded: RFC 3986 unreserved characters and `/`.
const FILE_URI_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

impl Source {
    /// Parses a source string; `gs://` sources must name one of `staging_buckets`.
    ///
    /// A `file://` URI (RFC 8089: empty host or `localhost`) is percent-decoded
    /// once and then judged like a path: control characters are refused
    /// either way, and so are a query or fragment (`?`, `#` must be encoded).
    pub fn parse(text: &str, staging_buckets: &[String]) -> Result<Source, SourceError> {
        let unsupported = || SourceError::Unsupported(text.to_string());
        if text.chars().any(char::is_control) {
            return Err(unsupported());
        }
        if let Some(rest) = text.strip_prefix("gs://") {
            let (bucket, object) = rest
                .split_once('/')
                .filter(|(bucket, object)| !bucket.is_empty() && !object.is_empty())
                .ok_or_else(unsupported)?;
            if !staging_buckets.iter().any(|allowed| allowed == bucket) {
                return Err(SourceError::NotAllowed(format!(
                    "bucket {bucket:?} is not one of storage.staging_buckets"
                )));
            }
            return Ok(Source::Gcs {
                bucket: bucket.to_string(),
                object: object.to_string(),
            });
        }
        if let Some(rest) = strip_prefix_ignoring_case(text, "file:") {
            // `file:///p`, `file://localhost/p` or the short `file:/p` (RFC 8089); scheme and host in any case.
            let path = match rest.strip_prefix("//") {
                Some(authority_and_path) => {
                    let slash = authority_and_path.find('/').unwrap_or(authority_and_path.len());
                    let (host, path) = authority_and_path.split_at(slash);
                    if !(host.is_empty() || host.eq_ignore_ascii_case("localhost")) {
                        return Err(unsupported());
                    }
                    path
                }
                None => rest,
            };
            if !path.starts_with('/') || path.contains(['?', '#']) {
                return Err(unsupported());
            }
            let decoded = percent_decode_strict(path).ok_or_else(unsupported)?;
            if has_control_characters(&decoded) {
                return Err(unsupported());
            }
            return Ok(Source::Local(PathBuf::from(OsString::from_vec(decoded))));
        }
        if text.starts_with('/') {
            return Ok(Source::Local(PathBuf::from(text)));
        }
        Err(unsupported())
    }

    /// The source as a URI, for metadata: `gs://…`, or an RFC 8089 `file://` URI
    /// with everything but unreserved characters and `/` percent-encoded.
    pub fn uri(&self) -> String {
        match self {
            Source::Local(path) => format!(
                "file://{}",
                percent_encode(path.as_os_str().as_bytes(), FILE_URI_PATH)
            ),
            Source::Gcs { bucket, object } => format!("gs://{bucket}/{object}"),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Local(path) => write!(formatter, "{}", path.display()),
            Source::Gcs { bucket, object } => write!(formatter, "gs://{bucket}/{object}"),
        }
    }
}

/// `text` without `prefix`, compared without regard to ASCII case.
fn strip_prefix_ignoring_case<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// Decodes `%XX` escapes; `None` if a `%` is not followed by two hex digits.
fn percent_decode_strict(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(index, &byte)| {
        byte != b'%'
            || bytes
                .get(index + 1..index + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    well_formed.then(|| percent_encoding::percent_decode(bytes).collect())
}

/// Whether decoded path bytes hold a control character (C0, DEL, or C1 in UTF-8).
fn has_control_characters(bytes: &[u8]) -> bool {
    bytes.iter().any(|&byte| byte < 0x20 || byte == 0x7f)
        || std::str::from_utf8(bytes).is_ok_and(|text| text.chars().any(char::is_control))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging() -> Vec<String> {
        vec!["audio-staging".into()]
    }

    #[test]
    fn local_paths_and_file_uris_parse() -> Result<(), SourceError> {
        assert_eq!(
            Source::parse("/var/spool/audio/a.flac", &staging())?,
            Source::Local("/var/spool/audio/a.flac".into())
        );
        assert_eq!(
            Source::parse("file:///var/spool/audio/a%20b.flac", &staging())?,
            Source::Local("/var/spool/audio/a b.flac".into())
        );
        Ok(())
    }

    #[test]
    fn relative_paths_and_other_schemes_are_unsupported() {
        for text in [
            "a.flac",
            "./a.flac",
            "http://host/a.flac",
            "file://host/a.flac",
            "gs://",
            "gs://audio-staging/",
            "s3://b/o",
        ] {
            assert!(
                matches!(Source::parse(text, &staging()), Err(SourceError::Unsupported(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn gs_sources_must_come_from_a_staging_bucket() {
        assert!(matches!(
            Source::parse("gs://someone-else/a.flac", &staging()),
            Err(SourceError::NotAllowed(_))
        ));
    }

    #[test]
    fn file_uris_are_decoded_once_and_judged_like_paths() -> Result<(), SourceError> {
        assert_eq!(
            Source::parse("file:///spool/a%2541.wav", &staging())?,
            Source::Local("/spool/a%41.wav".into()),
            "decoded once, not twice"
        );
        assert_eq!(
            Source::parse("file://localhost/spool/a%23b%3F.wav", &staging())?,
            Source::Local("/spool/a#b?.wav".into())
        );
        for spelling in [
            "FILE:///spool/a.wav",
            "file://LocalHost/spool/a.wav",
            "file:/spool/a.wav",
        ] {
            assert_eq!(
                Source::parse(spelling, &staging())?,
                Source::Local("/spool/a.wav".into()),
                "{spelling}"
            );
        }
        for text in [
            "file:///spool/a%0Ab.wav",
            "file:///spool/a%00b.wav",
            "file:///spool/a%7Fb.wav",
            "file:///spool/a%C2%85b.wav",
            "file:///spool/a%zzb.wav",
            "file:///spool/a%4",
            "file:///spool/a.wav?x=1",
            "file:///spool/a.wav#part",
            "file://host/spool/a.wav",
            "file://localhost.example/spool/a.wav",
            "file:spool/a.wav",
            "/spool/a\nb.wav",
            "/spool/a\u{85}b.wav",
        ] {
            assert!(
                matches!(Source::parse(text, &staging()), Err(SourceError::Unsupported(_))),
                "{text:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_local_source_uri_is_percent_encoded_and_reads_back_to_the_same_path() -> Result<(), SourceError> {
        let path = "/spool/a%41 b#c?d.wav";
        let uri = Source::Local(path.into()).uri();
        assert_eq!(uri, "file:///spool/a%2541%20b%23c%3Fd.wav");
        assert_eq!(Source::parse(&uri, &staging())?, Source::Local(path.into()));
        let not_utf8 = PathBuf::from(OsString::from_vec(b"/spool/\xff.wav".to_vec()));
        let uri = Source::Local(not_utf8.clone()).uri();
        assert_eq!(uri, "file:///spool/%FF.wav");
        assert_eq!(Source::parse(&uri, &staging())?, Source::Local(not_utf8));
        Ok(())
    }
}
