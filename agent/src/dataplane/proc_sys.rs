//! Per-netns sysctls through a procfs instance of the agent's own.
//!
//! `/proc/sys/net/ipv4` (and `ipv6`) is a directory per network namespace under one shared
//! `net` dentry. The dcache keeps one `ipv4` dentry for every namespace that has looked it up,
//! all with the same parent and name, so all in one hash chain; the first lookup from a new
//! namespace compares against each of them (`proc_sys_compare`, under a global lock). On a node
//! with 1,000 pod namespaces, reading three sysctls in a fresh one took ~0.7 ms instead of
//! ~50 µs, and every enrollment paid it.
//!
//! The dcache is per superblock: the agent looks its sysctls up through a procfs instance of
//! its own (the new mount API: `fsopen`, `fsmount`; the mount is detached, never attached to a
//! path, and gone when its fd closes), and replaces that instance every [`USES_PER_INSTANCE`]
//! pods, so its chains stay short whatever the node holds. What a sysctl file shows depends on
//! the netns of the thread that opens it, not on the instance. Retiring an instance tears a
//! superblock down (~0.1 ms, sometimes a few ms waiting for RCU): that happens on a thread of
//! its own, off the enrollment's path. Where no instance can be made (no `fsopen`: kernels
//! before 5.2), `/proc` is used.
use std::{
    fs::File,
    io,
    os::fd::OwnedFd,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use rustix::{
    fs::{Mode, OFlags, openat},
    mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsmount, fsopen},
};
use tracing::warn;

/// Pods whose sysctls one instance serves before it is replaced: its longest dcache chain.
const USES_PER_INSTANCE: usize = 64;

/// Where sysctl files are opened from, shared by concurrent enrollments.
#[derive(Debug)]
pub struct ProcSys {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `None` once making an instance has failed: `/proc` from then on.
    current: Option<Arc<OwnedFd>>,
    uses: usize,
    failed: bool,
}

/// The root of a procfs to open sysctls under (`sys/net/...`), for one pod's work.
#[derive(Debug, Clone)]
pub enum SysctlRoot {
    /// A private instance: the mount's root directory.
    Private(Arc<OwnedFd>),
    /// The node's `/proc`.
    Global,
}

impl Default for ProcSys {
    fn default() -> Self {
        ProcSys {
            state: Mutex::new(State {
                current: None,
                uses: 0,
                failed: false,
            }),
        }
    }
}

impl ProcSys {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The root to use for one pod's sysctls (counted towards the instance's uses).
    pub fn root(&self) -> SysctlRoot {
        let mut s = self.lock();
        if s.failed {
            return SysctlRoot::Global;
        }
        if s.current.is_none() || s.uses >= USES_PER_INSTANCE {
            match new_instance() {
                Ok(fd) => {
                    if let Some(old) = s.current.replace(Arc::new(fd)) {
                        retire(old);
                    }
                    s.uses = 0;
                }
                Err(e) if s.current.is_none() => {
                    warn!(error = %e, "no private procfs instance: sysctls go through /proc, whose lookups slow down as pod namespaces accumulate");
                    s.failed = true;
                    return SysctlRoot::Global;
                }
                // Keep using the old one a while longer.
                Err(_) => {}
            }
        }
        s.uses += 1;
        s.current
            .as_ref()
            .map_or(SysctlRoot::Global, |fd| SysctlRoot::Private(Arc::clone(fd)))
    }
}

/// A detached procfs mount: the fd of its root.
fn new_instance() -> io::Result<OwnedFd> {
    let fs = fsopen("proc", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_create(&fs)?;
    let mount = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )?;
    Ok(mount)
}

/// Drops a replaced instance away from the caller: its teardown may wait for RCU.
fn retire(old: Arc<OwnedFd>) {
    let spawned = std::thread::Builder::new()
        .name("procfs-retire".into())
        .spawn(move || drop(old));
    if let Err(e) = spawned {
        warn!(error = %e, "retiring a procfs instance inline");
    }
}

impl SysctlRoot {
    /// Opens `sys/<rel>` (e.g. `net/ipv4/tcp_fwmark_accept`) for reading or writing, as seen
    /// from the calling thread's network namespace.
    pub fn open(&self, rel: &str, write: bool) -> io::Result<File> {
        let path = Path::new("sys").join(rel);
        match self {
            SysctlRoot::Private(root) => {
                let access = if write {
                    OFlags::WRONLY
                } else {
                    OFlags::RDONLY
                };
                let fd = openat(&**root, &path, access | OFlags::CLOEXEC, Mode::empty())?;
                Ok(File::from(fd))
            }
            SysctlRoot::Global => {
                let path = Path::new("/proc").join(path);
                std::fs::OpenOptions::new()
                    .read(!write)
                    .write(write)
                    .open(path)
            }
        }
    }

    pub fn read(&self, rel: &str) -> io::Result<String> {
        io::read_to_string(self.open(rel, false)?)
    }

    pub fn write(&self, rel: &str, value: &str) -> io::Result<()> {
        io::Write::write_all(&mut self.open(rel, true)?, value.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a netns of our own (unshare on a scratch thread): a write through a private instance
    /// is what `/proc` shows in that netns, and the caller's netns is untouched.
    #[test]
    fn a_private_instance_reads_and_writes_the_callers_netns() {
        let outside = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept");
        let procs = ProcSys::default();
        let seen = std::thread::scope(|s| {
            s.spawn(|| {
                if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                    return None;
                }
                let root = procs.root();
                assert!(matches!(root, SysctlRoot::Private(_)), "{root:?}");
                let rel = "net/ipv4/tcp_fwmark_accept";
                assert_eq!(root.read(rel).unwrap().trim(), "0");
                root.write(rel, "1").unwrap();
                assert_eq!(root.read(rel).unwrap().trim(), "1");
                Some(std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").unwrap())
            })
            .join()
            .unwrap()
        });
        let Some(seen) = seen else {
            eprintln!("skipped: cannot create a network namespace (not root)");
            return;
        };
        assert_eq!(seen.trim(), "1", "/proc in the same netns shows the write");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").ok(),
            outside.ok(),
            "the caller's netns is untouched"
        );
    }

    #[test]
    fn an_instance_is_replaced_after_its_uses() {
        let procs = ProcSys::default();
        let SysctlRoot::Private(first) = procs.root() else {
            eprintln!("skipped: no private procfs instance here (not root?)");
            return;
        };
        for _ in 1..USES_PER_INSTANCE {
            let SysctlRoot::Private(same) = procs.root() else {
                panic!("fell back to /proc")
            };
            assert!(Arc::ptr_eq(&first, &same));
        }
        let SysctlRoot::Private(next) = procs.root() else {
            panic!("fell back to /proc")
        };
        assert!(!Arc::ptr_eq(&first, &next));
    }
}
