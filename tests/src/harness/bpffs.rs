use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use nix::mount::{MsFlags, mount};

use super::mounts::mount_points;
use super::names::unique;

pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Serialises the check-then-mount, within this process and across test processes
/// (a second mount would stack on the first and hide its pins).
static MOUNT_LOCK: Mutex<()> = Mutex::new(());
const MOUNT_LOCK_FILE: &str = "/run/sluice-tests-bpffs.lock";

/// Mounts bpffs at /sys/fs/bpf unless something already is.
pub fn ensure_bpffs_mounted() -> Result<()> {
    let _guard = MOUNT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(MOUNT_LOCK_FILE)
        .with_context(|| format!("opening {MOUNT_LOCK_FILE}"))?;
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error()).context("locking bpffs mount");
    }
    if mount_points("bpf")
        .iter()
        .any(|p| p == Path::new(BPFFS_ROOT))
    {
        return Ok(());
    }
    mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .context("mounting bpffs at /sys/fs/bpf")
}

/// A unique pin directory `/sys/fs/bpf/sluice-test-<unique>` for the code under test to
/// create; removed (unpinning everything in it) on drop.
#[derive(Debug)]
pub struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Bpffs> {
        ensure_bpffs_mounted()?;
        Ok(Bpffs {
            dir: Path::new(BPFFS_ROOT).join(unique("sluice-test-")),
        })
    }

    /// The directory path; it does not exist until something creates it.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: could not remove {}: {e}", self.dir.display()),
        }
    }
}
