use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::mounts::mount_points;
use super::names::unique;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mount_points("cgroup2")
        .into_iter()
        .next()
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// A fresh cgroup v2 directory for one test's processes, so cgroup BPF programs can be
/// attached where they see nothing else. Drop kills what is left in it and removes it.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    dir: File,
}

const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Cgroup {
    pub fn new(prefix: &str) -> Result<Cgroup> {
        let path = cgroup2_mount()?.join(unique(prefix));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let dir = match File::open(&path) {
            Ok(dir) => dir,
            Err(e) => {
                let _ = fs::remove_dir(&path);
                return Err(e).with_context(|| format!("opening cgroup {}", path.display()));
            }
        };
        Ok(Cgroup { path, dir })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open cgroup directory, as BPF attach/query calls want it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The cgroup id (its inode number), as `bpf_get_current_cgroup_id` reports it.
    pub fn id(&self) -> Result<u64> {
        Ok(self.dir.metadata()?.ino())
    }

    /// Pids of the processes in this cgroup.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let text = fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", self.path.display()))
    }

    /// Kills every process in the cgroup (cgroup.kill where the kernel has it).
    pub fn kill_all(&self) -> io::Result<()> {
        let kill_file = self.path.join("cgroup.kill");
        if kill_file.exists() {
            return fs::write(kill_file, "1");
        }
        for pid in self.procs().unwrap_or_default() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            let _ = self.kill_all();
            // rmdir fails with EBUSY until the killed processes are gone.
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!(
                        "warning: could not remove cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}
