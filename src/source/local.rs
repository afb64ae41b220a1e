//! Opening a local source: resolved, checked against the roots, and opened
//! beneath its root with no symlink on the way.

use super::SourceError;
use super::beneath::open_beneath;
use super::spool_entry::{KeptReason, SpoolEntry};
use rustix::io::Errno;
use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Which file a directory entry named, and in which state: device, inode, size, and the
/// modification and change times.
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
    /// Status change time, likewise: a writer can set the modification time back
    /// (`touch -d`, `cp -p`, `rsync --inplace`), not this one.
    pub changed: (i64, i64),
}

impl FileIdentity {
    pub(super) fn of(metadata: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// The identity with the change time left out (zero).
    pub(super) fn but_change_time(self) -> FileIdentity {
        FileIdentity {
            changed: (0, 0),
            ..self
        }
    }

    /// Whether `other` is the same file (another state of it) or another file.
    pub(super) fn difference(&self, other: &FileIdentity) -> KeptReason {
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
            "inode {}:{}, {} bytes, modified {}.{:09}, changed {}.{:09}",
            self.device,
            self.inode,
            self.size,
            self.modified.0,
            self.modified.1,
            self.changed.0,
            self.changed.1
        )
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
    use crate::source::beneath::walk_no_symlinks;
    use rustix::fs::{Mode, OFlags};
    use std::ffi::{OsStr, OsString};
    use std::os::fd::OwnedFd;

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
