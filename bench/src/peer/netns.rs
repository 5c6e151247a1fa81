//! Sockets made inside a pod's network namespace by a thread that enters it for the one
//! syscall and comes back, as ztunnel's in-pod socket factory does. A socket belongs to the
//! namespace it was created in, whichever thread uses it later.
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};

#[derive(Debug)]
pub struct PodNetns {
    pod: OwnedFd,
    home: Arc<OwnedFd>,
}

/// The namespace the calling thread is in, to come back to.
pub fn current() -> io::Result<Arc<OwnedFd>> {
    Ok(Arc::new(File::open("/proc/thread-self/ns/net")?.into()))
}

impl PodNetns {
    pub fn new(pod: OwnedFd, home: Arc<OwnedFd>) -> PodNetns {
        PodNetns { pod, home }
    }

    /// The namespace's identity (device, inode), to tell a repeated Add from a new sandbox.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let st = nix::sys::stat::fstat(self.pod.as_fd()).map_err(io::Error::from)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Runs `f` (which should only create sockets) inside the pod's namespace.
    pub fn run<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        setns(self.pod.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let r = f();
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stranded in a pod namespace would make every later socket there.
            eprintln!("sluice-bench peer: cannot return to its own netns: {e}");
            std::process::abort();
        }
        r
    }
}
