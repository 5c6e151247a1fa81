//! The VM suite's cache, outside the clone: `${XDG_CACHE_HOME:-~/.cache}/sluice/vm`. Everything
//! in it is keyed by version (apt lists, unpacked packages), so deleting it only costs time.
use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

pub fn dir() -> Result<PathBuf> {
    let dir = crate::cache_dir("vm")?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// An exclusive lock on the cache, held while it is filled, so concurrent runs (other
/// worktrees on the same machine) neither race apt nor publish half-unpacked packages.
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire(cache: &Path) -> Result<Lock> {
        let path = cache.join("lock");
        let file = File::create(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own; the lock goes with the file.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(Lock { _file: file })
    }
}
