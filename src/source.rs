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

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Files no larger than this are read whole by [`open_local`], in the same
/// blocking call that checks and opens them; larger ones are streamed. One
/// read buffer's worth, so memory per file is the same either way.
pub const IN_MEMORY_LIMIT: u64 = 256 * 1024;
/// Read size when hashing a file.
const READ_SIZE: usize = 256 * 1024;

/// A local source checked against the roots and opened: a regular file inside one of them.
#[derive(Debug)]
pub struct LocalFile {
    /// The canonical path (symlinks resolved), for messages; never opened again by name.
    pub path: PathBuf,
    /// Size in bytes: what was read for a file in memory, the size when opened otherwise.
    pub size: u64,
    /// CRC32C of the content, if it was hashed on opening (see [`open_local`]).
    pub crc32c: Option<u32>,
    /// The bytes, or the open file.
    pub content: LocalContent,
    /// The directory entry it was opened from: what cleanup may remove, and only if unchanged.
    pub entry: SpoolEntry,
}

/// What [`open_local`] hands on of a file's bytes.
#[derive(Debug)]
pub enum LocalContent {
    /// The whole file (at most [`IN_MEMORY_LIMIT`] bytes).
    Read(bytes::Bytes),
    /// A larger file, open and positioned at its start.
    Open(tokio::fs::File),
}

/// Which file a directory entry named, and in which state: device, inode, size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// The device of the file system.
    pub device: u64,
    /// The inode.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub modified: (i64, i64),
}

impl FileIdentity {
    fn of(metadata: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
        }
    }

    /// Whether `other` is the same file (another state of it) or another file.
    fn difference(&self, other: &FileIdentity) -> KeptReason {
        if (self.device, self.inode) == (other.device, other.inode) {
            KeptReason::Changed
        } else {
            KeptReason::Replaced
        }
    }
}

impl fmt::Display for FileIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "inode {}:{}, {} bytes, modified {}.{:09}",
            self.device, self.inode, self.size, self.modified.0, self.modified.1
        )
    }
}

/// Why a source was not removed after it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptReason {
    /// Its name now refers to another file (renamed over, recreated).
    Replaced,
    /// The same file, but its size or modification time changed since it was read.
    Changed,
}

impl KeptReason {
    /// Every reason, for metrics.
    pub const ALL: [KeptReason; 2] = [KeptReason::Replaced, KeptReason::Changed];

    /// `replaced` or `changed`, as in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KeptReason::Replaced => "replaced",
            KeptReason::Changed => "changed",
        }
    }
}

/// What [`SpoolEntry::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The file that was read is gone from the spool.
    Removed,
    /// The name no longer exists: someone else removed or renamed it.
    Gone,
    /// Its directory is no longer where it was beneath the root (moved away,
    /// or another directory took its place): nothing was removed.
    Moved,
    /// The name refers to something else than what was read: left in place.
    Kept {
        /// Replaced or changed.
        reason: KeptReason,
        /// What the name refers to now.
        found: FileIdentity,
        /// Set when another file took the name while it was checked, so what
        /// was checked could not be put back: where it was left instead.
        left_as: Option<PathBuf>,
    },
}

/// The directory entry a local source was opened from: its directory's
/// descriptor, its name and the identity of the file as it was read.
#[derive(Debug, Clone)]
pub struct SpoolEntry {
    directory: Arc<OwnedFd>,
    /// The directory's device and inode, to check it is still in its place.
    directory_identity: (u64, u64),
    /// The canonical root, and the directory's path relative to it.
    root: PathBuf,
    relative_directory: PathBuf,
    name: OsString,
    path: PathBuf,
    identity: FileIdentity,
}

impl SpoolEntry {
    /// The canonical path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file as it was when it was opened.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Removes the entry if it still is the very file that was read, with the
    /// same size and modification time; otherwise leaves it. Blocking.
    ///
    /// The entry is first renamed aside within its directory (atomically, never
    /// over another name), checked there, and unlinked only if it is the same
    /// file; anything else is renamed back. So a file renamed over the source
    /// at any moment is never removed. On a file system without
    /// `RENAME_NOREPLACE` it is checked, then unlinked.
    pub fn remove(&self) -> std::io::Result<Removal> {
        if !self.directory_in_place() {
            return Ok(Removal::Moved);
        }
        let aside = OsString::from(format!(".audio-store-removing-{}", uuid::Uuid::new_v4().simple()));
        let directory = self.directory.as_fd();
        match rustix::fs::renameat_with(directory, &self.name, directory, &aside, RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(Errno::NOENT) => return Ok(Removal::Gone),
            Err(Errno::INVAL | Errno::NOSYS) => return self.remove_if_unchanged(),
            Err(error) => return Err(error.into()),
        }
        let found = match self.identity_of(&aside) {
            Ok(found) => found,
            Err(error) => {
                let _ = rustix::fs::renameat_with(
                    directory,
                    &aside,
                    directory,
                    &self.name,
                    RenameFlags::NOREPLACE,
                );
                return Err(error);
            }
        };
        // Checked again after the rename: a directory moved out meanwhile keeps its file.
        let in_place = self.directory_in_place();
        if found == self.identity && in_place {
            rustix::fs::unlinkat(directory, &aside, AtFlags::empty())?;
            return Ok(Removal::Removed);
        }
        let put_back =
            rustix::fs::renameat_with(directory, &aside, directory, &self.name, RenameFlags::NOREPLACE);
        if !in_place && put_back.is_ok() {
            return Ok(Removal::Moved);
        }
        Ok(Removal::Kept {
            reason: self.identity.difference(&found),
            found,
            left_as: put_back.is_err().then(|| self.path.with_file_name(&aside)),
        })
    }

    fn remove_if_unchanged(&self) -> std::io::Result<Removal> {
        let found = match self.identity_of(&self.name) {
            Ok(found) => found,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Removal::Gone),
            Err(error) => return Err(error),
        };
        if found != self.identity {
            return Ok(Removal::Kept {
                reason: self.identity.difference(&found),
                found,
                left_as: None,
            });
        }
        match rustix::fs::unlinkat(self.directory.as_fd(), &self.name, AtFlags::empty()) {
            Ok(()) => Ok(Removal::Removed),
            Err(Errno::NOENT) => Ok(Removal::Gone),
            Err(error) => Err(error.into()),
        }
    }

    /// Whether the directory the file was opened from is still at its path
    /// beneath the root (opened again from the root, no symlink on the way).
    fn directory_in_place(&self) -> bool {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let reopened = open_no_symlinks(rustix::fs::CWD, &self.root, flags).and_then(|root| {
            if self.relative_directory.as_os_str().is_empty() {
                Ok(root)
            } else {
                open_no_symlinks(root.as_fd(), &self.relative_directory, flags)
            }
        });
        reopened
            .and_then(|fd| std::fs::File::from(fd).metadata())
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.directory_identity)
    }

    /// The identity of whatever `name` in the directory is, without following a symlink.
    fn identity_of(&self, name: &OsStr) -> std::io::Result<FileIdentity> {
        let handle = rustix::fs::openat(
            self.directory.as_fd(),
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(FileIdentity::of(&std::fs::File::from(handle).metadata()?))
    }
}

/// Resolves `path`, checks that it lies inside one of `roots`, opens it as a
/// regular file and reads its head, or all of it if it is small. Files
/// smaller than `hash_below` bytes are hashed (CRC32C) on the way.
///
/// The canonical path (symlinks resolved, so a source may be a symlink into
/// a root) is opened beneath the root's directory descriptor with no symlink
/// allowed on the way (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`,
/// or an `O_NOFOLLOW` walk where `openat2` is unavailable): anything swapped
/// in after the check is refused with [`SourceError::Changed`]. It is opened
/// without blocking (a FIFO cannot hang the worker), and the opened handle
/// itself must be a regular file. All of it happens in one trip to the
/// blocking pool.
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
    let Some((root, relative)) = beneath_a_root(&canonical, roots) else {
        return Err(SourceError::NotAllowed(format!(
            "{display} resolves outside sources.local_roots"
        )));
    };
    let (directory, name, file) =
        open_beneath(&root, &relative).map_err(|error| match Errno::from_io_error(&error) {
            Some(Errno::NOENT) => SourceError::Missing(display.clone()),
            Some(Errno::LOOP | Errno::XDEV | Errno::NOTDIR) => SourceError::Changed(display.clone()),
            _ => SourceError::Unreadable {
                path: display.clone(),
                error,
            },
        })?;
    let unreadable = |error: std::io::Error| SourceError::Unreadable {
        path: display.clone(),
        error,
    };
    let mut file = std::fs::File::from(file);
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(SourceError::NotAFile(display));
    }
    // The identity before reading: a file that changes while or after it is read no longer matches.
    let directory_metadata = directory
        .try_clone()
        .map(std::fs::File::from)
        .and_then(|handle| handle.metadata())
        .map_err(unreadable)?;
    let entry = SpoolEntry {
        directory: Arc::new(directory),
        directory_identity: (directory_metadata.dev(), directory_metadata.ino()),
        relative_directory: relative.parent().map(Path::to_path_buf).unwrap_or_default(),
        root,
        name,
        path: canonical.clone(),
        identity: FileIdentity::of(&metadata),
    };
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
                content: LocalContent::Read(bytes),
                entry,
            });
        }
        size = file.metadata().map_err(unreadable)?.len();
        file.rewind().map_err(unreadable)?;
    }
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
        content: LocalContent::Open(tokio::fs::File::from_std(file)),
        entry,
    })
}

/// The root (canonicalised) that `canonical` lies strictly inside, and the path relative to it.
fn beneath_a_root(canonical: &Path, roots: &[PathBuf]) -> Option<(PathBuf, PathBuf)> {
    roots.iter().find_map(|root| {
        let root = std::fs::canonicalize(root).ok()?;
        let relative = canonical.strip_prefix(&root).ok()?;
        (!relative.as_os_str().is_empty()).then(|| (root.clone(), relative.to_path_buf()))
    })
}

/// Opens `relative` (no `..`, no symlinks expected) beneath the directory
/// `root`: its parent directory's descriptor, its name, and the file opened
/// for reading. No symlink is followed anywhere, the root's own path included.
fn open_beneath(root: &Path, relative: &Path) -> std::io::Result<(OwnedFd, OsString, OwnedFd)> {
    let directory_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let file_flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let name = relative
        .file_name()
        .ok_or_else(|| std::io::Error::from(Errno::INVAL))?
        .to_os_string();
    let root = open_no_symlinks(rustix::fs::CWD, root, directory_flags)?;
    let directory = match relative.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            open_no_symlinks(root.as_fd(), parent, directory_flags)?
        }
        _ => root,
    };
    let file = open_no_symlinks(directory.as_fd(), Path::new(&name), file_flags)?;
    Ok((directory, name, file))
}

/// Set once `openat2` turned out to be unavailable (old kernel, seccomp filter).
static OPENAT2_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// Opens `path` from `directory` following no symlink (nor `..` out of it):
/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`
/// (an absolute path from the current directory: `RESOLVE_NO_SYMLINKS` only),
/// or, where `openat2` is missing, [`walk_no_symlinks`].
fn open_no_symlinks(directory: impl AsFd, path: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
    if !OPENAT2_UNAVAILABLE.load(Ordering::Relaxed) {
        let mut resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        if !path.is_absolute() {
            resolve |= ResolveFlags::BENEATH;
        }
        match rustix::fs::openat2(
            directory.as_fd(),
            path,
            flags | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve,
        ) {
            Err(Errno::NOSYS | Errno::PERM) => OPENAT2_UNAVAILABLE.store(true, Ordering::Relaxed),
            other => return other.map_err(Into::into),
        }
    }
    walk_no_symlinks(directory, path, flags)
}

/// Opens `path` one component at a time with `O_NOFOLLOW`: a symlink on the
/// way fails (`ENOTDIR` for a directory, `ELOOP` for the last component), and
/// `..` is refused (`EXDEV`), like `openat2`'s `RESOLVE_BENEATH`.
fn walk_no_symlinks(directory: impl AsFd, path: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
    use std::path::Component;
    let components: Vec<Component<'_>> = path.components().collect();
    let mut current: Option<OwnedFd> = None;
    for (index, component) in components.iter().enumerate() {
        let last = index + 1 == components.len();
        let step_flags = if last {
            flags | OFlags::NOFOLLOW
        } else {
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        };
        let name: &OsStr = match component {
            Component::RootDir => OsStr::new("/"),
            Component::Normal(name) => name,
            Component::CurDir => OsStr::new("."),
            Component::ParentDir | Component::Prefix(_) => return Err(Errno::XDEV.into()),
        };
        let base = match &current {
            Some(fd) => fd.as_fd(),
            None => directory.as_fd(),
        };
        let opened = rustix::fs::openat(base, name, step_flags, Mode::empty())?;
        current = Some(opened);
    }
    current.ok_or_else(|| Errno::INVAL.into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

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
    async fn small_files_are_read_whole_and_larger_ones_left_open() -> Result<(), Box<dyn std::error::Error>>
    {
        let root = tempfile::tempdir()?;
        let roots = [root.path().to_path_buf()];
        let at_limit: Vec<u8> = (0..IN_MEMORY_LIMIT).map(|i| (i % 251) as u8).collect();
        let small = root.path().join("small.wav");
        std::fs::write(&small, &at_limit)?;
        let opened = open_local(&small, &roots, u64::MAX).await?;
        assert_eq!(opened.size, IN_MEMORY_LIMIT);
        assert_eq!(opened.crc32c, Some(crc32c::crc32c(&at_limit)));
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
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )?;
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

    #[tokio::test]
    async fn a_directory_swapped_for_a_symlink_after_the_check_is_refused()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let outside = tempfile::tempdir()?;
        std::fs::write(outside.path().join("a.wav"), b"outside")?;
        std::os::unix::fs::symlink(outside.path(), root.path().join("sub"))?;
        let root_path = std::fs::canonicalize(root.path())?;
        // What a check made before the swap would have found: `sub/a.wav` inside the root.
        for open in [open_beneath, open_by_walking] {
            let error = open(&root_path, Path::new("sub/a.wav")).expect_err("a symlink on the way");
            assert!(
                matches!(Errno::from_io_error(&error), Some(Errno::LOOP | Errno::NOTDIR)),
                "{error}"
            );
        }
        std::fs::remove_file(root.path().join("sub"))?;
        std::fs::create_dir(root.path().join("sub"))?;
        std::os::unix::fs::symlink(outside.path().join("a.wav"), root.path().join("sub/a.wav"))?;
        for open in [open_beneath, open_by_walking] {
            let error = open(&root_path, Path::new("sub/a.wav")).expect_err("a symlink as the file");
            assert_eq!(Errno::from_io_error(&error), Some(Errno::LOOP), "{error}");
        }
        std::fs::remove_file(root.path().join("sub/a.wav"))?;
        std::fs::write(root.path().join("sub/a.wav"), b"inside")?;
        for open in [open_beneath, open_by_walking] {
            let (_, name, file) = open(&root_path, Path::new("sub/a.wav"))?;
            assert_eq!(name, "a.wav");
            assert_eq!(
                std::fs::read_to_string(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&file)
                ))?,
                "inside"
            );
        }
        Ok(())
    }

    /// [`open_beneath`] as it runs where `openat2` is missing.
    fn open_by_walking(root: &Path, relative: &Path) -> std::io::Result<(OwnedFd, OsString, OwnedFd)> {
        let directory = walk_no_symlinks(
            rustix::fs::CWD,
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?;
        let name = relative.file_name().map(OsStr::to_os_string).unwrap_or_default();
        let parent = walk_no_symlinks(
            &directory,
            relative.parent().unwrap_or(Path::new(".")),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?;
        let file = walk_no_symlinks(&parent, Path::new(&name), OFlags::RDONLY | OFlags::CLOEXEC)?;
        Ok((parent, name, file))
    }

    #[tokio::test]
    async fn only_the_very_file_that_was_read_is_removed() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let roots = [root.path().to_path_buf()];
        let path = root.path().join("a.wav");
        let opened = |bytes: &'static [u8]| {
            let path = path.clone();
            let roots = roots.clone();
            async move {
                std::fs::write(&path, bytes)?;
                Ok::<_, Box<dyn std::error::Error>>(open_local(&path, &roots, u64::MAX).await?)
            }
        };

        let unchanged = opened(b"RIFF one").await?;
        assert_eq!(unchanged.entry.remove()?, Removal::Removed);
        assert!(!path.exists());
        assert_eq!(unchanged.entry.remove()?, Removal::Gone);

        let replaced = opened(b"RIFF two").await?;
        let newer = root.path().join("a.wav.tmp");
        std::fs::write(&newer, b"RIFF newer")?;
        std::fs::rename(&newer, &path)?;
        let removal = replaced.entry.remove()?;
        assert!(
            matches!(
                removal,
                Removal::Kept {
                    reason: KeptReason::Replaced,
                    left_as: None,
                    ..
                }
            ),
            "{removal:?}"
        );
        assert_eq!(
            std::fs::read(&path)?,
            b"RIFF newer",
            "the file renamed over the source stays"
        );

        let changed = opened(b"RIFF three").await?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)?
            .write_all(b" and more")?;
        let removal = changed.entry.remove()?;
        assert!(
            matches!(
                removal,
                Removal::Kept {
                    reason: KeptReason::Changed,
                    left_as: None,
                    ..
                }
            ),
            "{removal:?}"
        );
        assert_eq!(
            std::fs::read(&path)?,
            b"RIFF three and more",
            "a file written after it was read stays"
        );
        let leftovers: Vec<_> = std::fs::read_dir(root.path())?
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name() != "a.wav")
            .collect();
        assert!(leftovers.is_empty(), "nothing left aside: {leftovers:?}");

        let same = opened(b"RIFF four").await?;
        assert_eq!(same.entry.remove_if_unchanged()?, Removal::Removed);
        Ok(())
    }

    #[tokio::test]
    async fn a_file_whose_directory_left_the_root_is_not_removed() -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let outside = tempfile::tempdir()?;
        let roots = [root.path().to_path_buf()];
        for replace in [false, true] {
            let sub = root.path().join("sub");
            std::fs::create_dir(&sub)?;
            std::fs::write(sub.join("a.wav"), b"RIFF moved")?;
            let opened = open_local(&sub.join("a.wav"), &roots, u64::MAX).await?;
            let moved = outside.path().join(format!("sub-{replace}"));
            std::fs::rename(&sub, &moved)?;
            if replace {
                // Another directory of the same name in its place, with a file of the same name.
                std::fs::create_dir(&sub)?;
                std::fs::write(sub.join("a.wav"), b"RIFF other")?;
            }
            assert_eq!(opened.entry.remove()?, Removal::Moved, "replaced: {replace}");
            assert_eq!(
                std::fs::read(moved.join("a.wav"))?,
                b"RIFF moved",
                "nothing outside the root removed"
            );
            if replace {
                assert_eq!(std::fs::read(sub.join("a.wav"))?, b"RIFF other");
                std::fs::remove_dir_all(&sub)?;
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_path_that_can_never_be_opened_is_unreadable_with_its_cause()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let roots = [root.path().to_path_buf()];
        std::fs::write(root.path().join("file.wav"), b"RIFF")?;
        std::os::unix::fs::symlink(root.path().join("loop-b"), root.path().join("loop-a"))?;
        std::os::unix::fs::symlink(root.path().join("loop-a"), root.path().join("loop-b"))?;
        let too_long = root.path().join(format!("{}.wav", "n".repeat(300)));
        for (path, errno) in [
            (root.path().join("file.wav/x.wav"), Errno::NOTDIR),
            (root.path().join("loop-a"), Errno::LOOP),
            (too_long, Errno::NAMETOOLONG),
        ] {
            match open_local(&path, &roots, u64::MAX).await {
                Err(SourceError::Unreadable { error, .. }) => {
                    assert_eq!(Errno::from_io_error(&error), Some(errno), "{}", path.display());
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        Ok(())
    }
}
