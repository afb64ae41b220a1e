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

/// Files no larger than this are read whole by [`open_local`], in the same
/// blocking call that checks and opens them; larger ones are streamed. One
/// read buffer's worth, so memory per file is the same either way.
pub const IN_MEMORY_LIMIT: u64 = 256 * 1024;
/// Read size when hashing a file.
const READ_SIZE: usize = 256 * 1024;

/// A local source checked against the roots and opened: a regular file inside one of them.
#[derive(Debug)]
pub struct LocalFile {
    /// The canonical path (symlinks resolved); the only path that is read or deleted.
    pub path: PathBuf,
    /// Size in bytes: what was read for a file in memory, the size when opened otherwise.
    pub size: u64,
    /// CRC32C of the content, if it was hashed on opening (see [`open_local`]).
    pub crc32c: Option<u32>,
    /// Up to [`content::SNIFF_LEN`](crate::content::SNIFF_LEN) leading bytes, to sniff the content type from.
    pub head: bytes::Bytes,
    /// The bytes, or the open file.
    pub content: LocalContent,
}

/// What [`open_local`] hands on of a file's bytes.
#[derive(Debug)]
pub enum LocalContent {
    /// The whole file (at most [`IN_MEMORY_LIMIT`] bytes).
    Read(bytes::Bytes),
    /// A larger file, open and positioned at its start.
    Open(tokio::fs::File),
}

/// Resolves `path`, checks that it lies inside one of `roots`, opens it as a
/// regular file and reads its head, or all of it if it is small. Files
/// smaller than `hash_below` bytes are hashed (CRC32C) on the way.
///
/// Roots are canonicalised too, so a root that is itself a symlink works.
/// The file is opened without following a symlink in its last component and
/// without blocking (a FIFO swapped in after the check cannot hang the
/// worker), and the opened handle itself must be a regular file. All of it
/// happens in one trip to the blocking pool.
pub async fn open_local(path: &Path, roots: &[PathBuf], hash_below: u64) -> Result<LocalFile, SourceError> {
    let (owned_path, roots) = (path.to_path_buf(), roots.to_vec());
    tokio::task::spawn_blocking(move || open_local_blocking(&owned_path, &roots, hash_below))
        .await
        .unwrap_or_else(|error| {
            Err(SourceError::Unreadable {
                path: path.display().to_string(),
                error: std::io::Error::other(error),
            })
        })
}

fn open_local_blocking(path: &Path, roots: &[PathBuf], hash_below: u64) -> Result<LocalFile, SourceError> {
    use std::io::{Read as _, Seek as _};
    use std::os::unix::fs::OpenOptionsExt as _;

    let display = path.display().to_string();
    let canonical = match std::fs::canonicalize(path) {
        Ok(canonical) => canonical,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symlink or a missing file: only "missing" if it would be allowed.
            return Err(if inside_any(path, roots) {
                SourceError::Missing(display)
            } else {
                SourceError::NotAllowed(format!("{display} is outside sources.local_roots"))
            });
        }
        Err(error) => return Err(SourceError::Unreadable { path: display, error }),
    };
    if !inside_any(&canonical, roots) {
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
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&canonical)
        .map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(SourceError::NotAFile(display));
    }
    let mut size = metadata.len();
    if size <= IN_MEMORY_LIMIT {
        // One byte more than allowed tells a file that grew since the stat.
        let mut bytes = Vec::with_capacity(size as usize + 1);
        (&mut file)
            .take(IN_MEMORY_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        if bytes.len() as u64 <= IN_MEMORY_LIMIT {
            let bytes = bytes::Bytes::from(bytes);
            return Ok(LocalFile {
                path: canonical,
                size: bytes.len() as u64,
                crc32c: (size < hash_below).then(|| crc32c::crc32c(&bytes)),
                head: bytes.slice(..bytes.len().min(crate::content::SNIFF_LEN)),
                content: LocalContent::Read(bytes),
            });
        }
        size = file.metadata().map_err(unreadable)?.len();
        file.rewind().map_err(unreadable)?;
    }
    let mut head = Vec::with_capacity(crate::content::SNIFF_LEN);
    (&mut file)
        .take(crate::content::SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    file.rewind().map_err(unreadable)?;
    let crc32c = if size < hash_below {
        let crc32c = crc32c_of(&mut file).map_err(unreadable)?;
        file.rewind().map_err(unreadable)?;
        Some(crc32c)
    } else {
        None
    };
    Ok(LocalFile {
        path: canonical,
        size,
        crc32c,
        head: head.into(),
        content: LocalContent::Open(tokio::fs::File::from_std(file)),
    })
}

/// CRC32C of a whole open file, hashed on the blocking pool; leaves it rewound to the start.
pub async fn crc32c_of_file(file: &mut tokio::fs::File) -> std::io::Result<u32> {
    use std::io::Seek as _;
    let mut twin = file.try_clone().await?.into_std().await;
    let crc32c = tokio::task::spawn_blocking(move || {
        twin.rewind()?;
        crc32c_of(&mut twin)
    })
    .await
    .map_err(std::io::Error::other)??;
    // Through `file` itself, so that its own idea of the position is reset too.
    tokio::io::AsyncSeekExt::rewind(file).await?;
    Ok(crc32c)
}

/// CRC32C of what is left to read of `reader`.
fn crc32c_of(reader: &mut impl std::io::Read) -> std::io::Result<u32> {
    let mut buffer = vec![0_u8; READ_SIZE];
    let mut crc32c = 0_u32;
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return Ok(crc32c),
            Ok(read) => crc32c = crc32c::crc32c_append(crc32c, &buffer[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
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
fn inside_any(path: &Path, roots: &[PathBuf]) -> bool {
    let path = lexically_normal(path);
    roots.iter().any(|root| {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| lexically_normal(root));
        path.starts_with(&root) && path != root
    })
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
        let resolved = open_local(&file, &[root.path().to_path_buf()], u64::MAX).await?;
        assert_eq!(resolved.path, std::fs::canonicalize(&file)?);
        assert_eq!(resolved.size, 4);
        Ok(())
    }

    #[tokio::test]
    async fn small_files_are_read_whole_and_larger_ones_left_open_with_their_head()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let roots = [root.path().to_path_buf()];
        let at_limit: Vec<u8> = (0..IN_MEMORY_LIMIT).map(|i| (i % 251) as u8).collect();
        let small = root.path().join("small.wav");
        std::fs::write(&small, &at_limit)?;
        let opened = open_local(&small, &roots, u64::MAX).await?;
        assert_eq!(opened.size, IN_MEMORY_LIMIT);
        assert_eq!(opened.crc32c, Some(crc32c::crc32c(&at_limit)));
        assert_eq!(opened.head[..], at_limit[..crate::content::SNIFF_LEN]);
        assert!(matches!(&opened.content, LocalContent::Read(bytes) if bytes[..] == at_limit[..]));

        let larger = root.path().join("larger.wav");
        let mut over = at_limit.clone();
        over.push(7);
        std::fs::write(&larger, &over)?;
        let hashed = open_local(&larger, &roots, IN_MEMORY_LIMIT + 2).await?;
        assert_eq!(
            hashed.crc32c,
            Some(crc32c::crc32c(&over)),
            "hashed below the bound"
        );
        let opened = open_local(&larger, &roots, IN_MEMORY_LIMIT + 1).await?;
        assert_eq!(opened.crc32c, None, "not hashed from the bound up");
        assert_eq!(opened.size, IN_MEMORY_LIMIT + 1);
        assert_eq!(opened.head[..], over[..crate::content::SNIFF_LEN]);
        for opened in [hashed, opened] {
            let LocalContent::Open(mut file) = opened.content else {
                panic!("a file over the limit is streamed");
            };
            let mut read = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut file, &mut read).await?;
            assert_eq!(read, over, "the open file is positioned at its start");
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_file_is_hashed_whole_from_any_position_and_left_at_its_start()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let path = root.path().join("a.wav");
        let bytes: Vec<u8> = (0..3 * READ_SIZE as u32 + 17).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes)?;
        let mut file = tokio::fs::File::open(&path).await?;
        let mut start = [0_u8; 10];
        tokio::io::AsyncReadExt::read_exact(&mut file, &mut start).await?;
        assert_eq!(crc32c_of_file(&mut file).await?, crc32c::crc32c(&bytes));
        let mut read = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut file, &mut read).await?;
        assert_eq!(read, bytes);
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
            let result = open_local(&path, &roots, u64::MAX).await;
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
        let result = open_local(&fifo, &[root.path().to_path_buf()], u64::MAX).await;
        assert!(matches!(result, Err(SourceError::NotAFile(_))), "{result:?}");
        let result = open_local(Path::new("/dev/null"), &[PathBuf::from("/dev")], u64::MAX).await;
        assert!(matches!(result, Err(SourceError::NotAFile(_))), "{result:?}");
        Ok(())
    }

    #[tokio::test]
    async fn missing_files_and_directories_are_told_apart() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join("dir.wav"))?;
        let roots = [root.path().to_path_buf()];
        assert!(matches!(
            open_local(&root.path().join("gone.wav"), &roots, u64::MAX).await,
            Err(SourceError::Missing(_))
        ));
        assert!(matches!(
            open_local(&root.path().join("dir.wav"), &roots, u64::MAX).await,
            Err(SourceError::NotAFile(_))
        ));
        Ok(())
    }
}
