//! A local source as it was opened, and its removal after the ack: only that
//! very file, and only while its directory is still where it was.

use super::beneath::open_no_symlinks;
use super::local::FileIdentity;
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a source was not removed after it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptReason {
    /// Its name now refers to another file (renamed over, recreated).
    Replaced,
    /// The same file, but its size, modification or change time differs from when it was read.
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
    pub(super) directory: Arc<OwnedFd>,
    /// The directory's device and inode, to check it is still in its place.
    pub(super) directory_identity: (u64, u64),
    /// The canonical root, and the directory's path relative to it.
    pub(super) root: PathBuf,
    pub(super) relative_directory: PathBuf,
    pub(super) name: OsString,
    pub(super) path: PathBuf,
    pub(super) identity: FileIdentity,
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
    /// same size, modification and change times; otherwise leaves it. Blocking.
    ///
    /// The name is checked first, and another file found there is left alone,
    /// never renamed: while renamed aside it would have no name, and its own
    /// message, opening it then, would find it missing. Only the same file is
    /// renamed aside within its directory (atomically, never over another
    /// name), checked again there, and unlinked only if it still is the same
    /// file; anything else is renamed back. So a file renamed over the source
    /// at any moment is never removed. On a file system without
    /// `RENAME_NOREPLACE` it is checked, then unlinked.
    pub fn remove(&self) -> std::io::Result<Removal> {
        if !self.directory_in_place() {
            return Ok(Removal::Moved);
        }
        if let Some(removal) = self.unless_same_file()? {
            return Ok(removal);
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
        // The rename itself set the change time, which the check before it compared.
        let in_place = self.directory_in_place();
        if found.but_change_time() == self.identity.but_change_time() && in_place {
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

    /// What removal comes to when the name, as it is now, is not the file that
    /// was read (`Gone` or `Kept`, nothing touched); `None` when it is.
    fn unless_same_file(&self) -> std::io::Result<Option<Removal>> {
        let found = match self.identity_of(&self.name) {
            Ok(found) => found,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Removal::Gone)),
            Err(error) => return Err(error),
        };
        Ok((found != self.identity).then(|| Removal::Kept {
            reason: self.identity.difference(&found),
            found,
            left_as: None,
        }))
    }

    fn remove_if_unchanged(&self) -> std::io::Result<Removal> {
        if let Some(removal) = self.unless_same_file()? {
            return Ok(removal);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::open_local;
    use std::io::Write as _;

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

        // A file renamed over the source has a test of its own (below).
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
    async fn a_file_renamed_over_the_source_is_kept_without_ever_being_renamed()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let path = root.path().join("a.wav");
        std::fs::write(&path, b"RIFF read")?;
        let opened = open_local(&path, &[root.path().to_path_buf()], u64::MAX).await?;
        let newer = root.path().join("a.wav.tmp");
        std::fs::write(&newer, b"RIFF newer")?;
        std::fs::rename(&newer, &path)?;
        let before = std::fs::symlink_metadata(&path)?;
        // A rename sets the file's ctime; wait until the file system's clock has
        // moved past it, so that a rename aside and back would show.
        let probe = root.path().join("clock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            std::fs::write(&probe, b"tick")?;
            let now = std::fs::symlink_metadata(&probe)?;
            if (now.ctime(), now.ctime_nsec()) > (before.ctime(), before.ctime_nsec()) {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err("the file system clock did not move in 10 s".into());
            }
            std::thread::yield_now();
        }

        let removal = opened.entry.remove()?;

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
        let after = std::fs::symlink_metadata(&path)?;
        assert_eq!(after.ino(), before.ino(), "the newer file is still at the name");
        assert_eq!(
            (after.ctime(), after.ctime_nsec()),
            (before.ctime(), before.ctime_nsec()),
            "the newer file was never renamed (its ctime is unchanged)"
        );
        assert_eq!(
            std::fs::read(&path)?,
            b"RIFF newer",
            "the file renamed over the source stays"
        );
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
}
