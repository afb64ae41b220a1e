//! Sources: where a message's files come from, and which of them may be read.
//!
//! A source is an absolute local path (or `file://` URI) that must resolve,
//! after following symlinks, to a regular file inside one of
//! `sources.local_roots`, or a `gs://bucket/object` in one of
//! `storage.staging_buckets`. Nothing outside those is ever read or deleted.

use std::fmt;
use std::path::{Path, PathBuf};

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
    /// The file does not exist (any more).
    #[error("{0} does not exist")]
    Missing(String),
    /// Exists but is not a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(String),
    /// Could not be inspected or opened.
    #[error("cannot read {path}: {error}")]
    Unreadable {
        /// The path.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
}

impl Source {
    /// Parses a source string; `gs://` sources must name one of `staging_buckets`.
    pub fn parse(text: &str, staging_buckets: &[String]) -> Result<Source, SourceError> {
        if text.chars().any(|c| c.is_control()) {
            return Err(SourceError::Unsupported(text.escape_default().to_string()));
        }
        if let Some(rest) = text.strip_prefix("gs://") {
            let (bucket, object) = rest
                .split_once('/')
                .filter(|(bucket, object)| !bucket.is_empty() && !object.is_empty())
                .ok_or_else(|| SourceError::Unsupported(text.to_string()))?;
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
        let path = match text.strip_prefix("file://") {
            Some(rest) if rest.starts_with('/') => {
                percent_decode(rest).ok_or_else(|| SourceError::Unsupported(text.to_string()))?
            }
            Some(_) => return Err(SourceError::Unsupported(text.to_string())),
            None if text.starts_with('/') => text.to_string(),
            None => return Err(SourceError::Unsupported(text.to_string())),
        };
        Ok(Source::Local(PathBuf::from(path)))
    }

    /// The source as a URI, for metadata and events: `file:///…` or `gs://…`.
    pub fn uri(&self) -> String {
        match self {
            Source::Local(path) => format!("file://{}", path.display()),
            Source::Gcs { bucket, object } => format!("gs://{bucket}/{object}"),
        }
    }

    /// The lowercased extension of the file name, with its dot, if it has a plausible one.
    pub fn extension(&self) -> Option<String> {
        let name = match self {
            Source::Local(path) => path.file_name()?.to_str()?.to_string(),
            Source::Gcs { object, .. } => object.rsplit('/').next()?.to_string(),
        };
        let (stem, extension) = name.rsplit_once('.')?;
        let plausible = !stem.is_empty()
            && (1..=10).contains(&extension.len())
            && extension.chars().all(|c| c.is_ascii_alphanumeric());
        plausible.then(|| format!(".{}", extension.to_ascii_lowercase()))
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

/// A local source checked against the roots and opened: a regular file inside one of them.
#[derive(Debug)]
pub struct LocalFile {
    /// The canonical path (symlinks resolved); the only path that is read or deleted.
    pub path: PathBuf,
    /// Size in bytes when it was opened.
    pub size: u64,
    /// The open file, positioned at its start.
    pub file: tokio::fs::File,
}

/// Resolves `path`, checks that it lies inside one of `roots`, and opens it as a regular file.
///
/// Roots are canonicalised too, so a root that is itself a symlink works.
/// The file is opened without following a symlink in its last component and
/// without blocking (a FIFO swapped in after the check cannot hang the
/// worker), and the opened handle itself must be a regular file.
pub async fn open_local(path: &Path, roots: &[PathBuf]) -> Result<LocalFile, SourceError> {
    let display = path.display().to_string();
    let canonical = match tokio::fs::canonicalize(path).await {
        Ok(canonical) => canonical,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symlink or a missing file: only "missing" if it would be allowed.
            return Err(if inside_any(path, roots).await {
                SourceError::Missing(display)
            } else {
                SourceError::NotAllowed(format!("{display} is outside sources.local_roots"))
            });
        }
        Err(error) => return Err(SourceError::Unreadable { path: display, error }),
    };
    if !inside_any(&canonical, roots).await {
        return Err(SourceError::NotAllowed(format!(
            "{display} resolves outside sources.local_roots"
        )));
    }
    let unreadable = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::NotFound => SourceError::Missing(display.clone()),
        _ if error.raw_os_error() == Some(libc::ELOOP) => {
            SourceError::NotAllowed(format!("{display} was replaced by a symlink"))
        }
        _ => SourceError::Unreadable {
            path: display.clone(),
            error,
        },
    };
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&canonical)
        .await
        .map_err(unreadable)?;
    let metadata = file.metadata().await.map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(SourceError::NotAFile(display));
    }
    Ok(LocalFile {
        path: canonical,
        size: metadata.len(),
        file,
    })
}

/// Opens the canonical `path` of a file `open_local` already checked once more, e.g. to hash it again.
pub async fn reopen(path: &Path) -> Result<tokio::fs::File, SourceError> {
    tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .await
        .map_err(|error| SourceError::Unreadable {
            path: path.display().to_string(),
            error,
        })
}

/// Whether `path` lies inside one of `roots` (both canonicalised where they exist).
async fn inside_any(path: &Path, roots: &[PathBuf]) -> bool {
    let path = lexically_normal(path);
    for root in roots {
        let root = tokio::fs::canonicalize(root)
            .await
            .unwrap_or_else(|_| lexically_normal(root));
        if path.starts_with(&root) && path != root {
            return true;
        }
    }
    false
}

/// Removes `.` and resolves `..` without touching the file system.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other.as_os_str()),
        }
    }
    normal
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    let decoded = String::from_utf8(decoded).ok()?;
    (!decoded.contains('\0')).then_some(decoded)
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
    fn the_extension_is_lowercased_with_its_dot() -> Result<(), SourceError> {
        assert_eq!(
            Source::parse("/x/Track.FLAC", &staging())?.extension().as_deref(),
            Some(".flac")
        );
        assert_eq!(
            Source::parse("gs://audio-staging/a/cover.JPG", &staging())?
                .extension()
                .as_deref(),
            Some(".jpg")
        );
        assert_eq!(Source::parse("/x/noextension", &staging())?.extension(), None);
        assert_eq!(Source::parse("/x/.hidden", &staging())?.extension(), None);
        Ok(())
    }

    #[tokio::test]
    async fn a_file_inside_a_root_resolves() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let file = root.path().join("a.wav");
        std::fs::write(&file, b"RIFF")?;
        let resolved = open_local(&file, &[root.path().to_path_buf()]).await?;
        assert_eq!(resolved.path, std::fs::canonicalize(&file)?);
        assert_eq!(resolved.size, 4);
        Ok(())
    }

    #[tokio::test]
    async fn escapes_from_the_root_are_not_allowed() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let outside = tempfile::tempdir()?;
        let secret = outside.path().join("secret.wav");
        std::fs::write(&secret, b"RIFF")?;
        std::os::unix::fs::symlink(&secret, root.path().join("link.wav"))?;
        let roots = [root.path().to_path_buf()];
        let dotdot = root
            .path()
            .join("..")
            .join(outside.path().file_name().ok_or("name")?)
            .join("secret.wav");
        for path in [
            root.path().join("link.wav"),
            dotdot,
            secret.clone(),
            PathBuf::from("/etc/passwd"),
        ] {
            let result = open_local(&path, &roots).await;
            assert!(
                matches!(result, Err(SourceError::NotAllowed(_))),
                "{}: {result:?}",
                path.display()
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn fifos_and_devices_are_not_files_and_do_not_block() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let fifo = root.path().join("pipe.wav");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
        // SAFETY: a valid NUL-terminated path and a plain mode.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let result = open_local(&fifo, &[root.path().to_path_buf()]).await;
        assert!(matches!(result, Err(SourceError::NotAFile(_))), "{result:?}");
        let result = open_local(Path::new("/dev/null"), &[PathBuf::from("/dev")]).await;
        assert!(matches!(result, Err(SourceError::NotAFile(_))), "{result:?}");
        Ok(())
    }

    #[tokio::test]
    async fn missing_files_and_directories_are_told_apart() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join("dir.wav"))?;
        let roots = [root.path().to_path_buf()];
        assert!(matches!(
            open_local(&root.path().join("gone.wav"), &roots).await,
            Err(SourceError::Missing(_))
        ));
        assert!(matches!(
            open_local(&root.path().join("dir.wav"), &roots).await,
            Err(SourceError::NotAFile(_))
        ));
        Ok(())
    }
}
