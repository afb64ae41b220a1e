//! Opening beneath a directory descriptor with no symlink on the way:
//! `openat2`, or an `O_NOFOLLOW` walk where the kernel has no `openat2`.

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Opens `relative` (no `..`, no symlinks expected) beneath the directory
/// `root`: its parent directory's descriptor, its name, and the file opened
/// for reading. No symlink is followed anywhere, the root's own path included.
pub(super) fn open_beneath(root: &Path, relative: &Path) -> std::io::Result<(OwnedFd, OsString, OwnedFd)> {
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
pub(super) fn open_no_symlinks(directory: impl AsFd, path: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
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
pub(super) fn walk_no_symlinks(directory: impl AsFd, path: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
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
