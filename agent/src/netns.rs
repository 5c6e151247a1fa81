//! Handles on network namespaces: open and verify one, run code inside it, identify it.
//!
//! Code runs inside a netns on a dedicated scoped thread that `setns`es first: a thread's netns
//! only affects sockets and netlink handles it creates, so the caller's threads (and the tokio
//! runtime's) are never moved.
use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `SO_NETNS_COOKIE` from asm-generic/socket.h (kernel ≥ 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("network namespace {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Read once: asking costs a thread that enters the namespace.
    cookie: std::sync::OnceLock<u64>,
}

impl Netns {
    /// Opens `path` (e.g. `/run/netns/x` or `/proc/<pid>/ns/net`) and checks it is a netns.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns { path });
        }
        let meta = file.metadata().map_err(|source| NetnsError::Io {
            path: path.clone(),
            what: "stat",
            source,
        })?;
        Ok(Netns {
            fd: file.into(),
            path,
            dev: meta.dev(),
            ino: meta.ino(),
            cookie: std::sync::OnceLock::new(),
        })
    }

    /// The network namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number (what `ip netns identify` and `/proc/*/ns/net` compare).
    pub fn inode(&self) -> u64 {
        self.ino
    }

    /// The device of the namespace file (nsfs); with the inode it identifies the namespace.
    pub fn device(&self) -> u64 {
        self.dev
    }

    /// Whether `path` still names this same namespace (it may have been deleted or reused).
    pub fn still_at_path(&self) -> bool {
        std::fs::metadata(&self.path)
            .map(|m| m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false)
    }

    /// Runs `f` on a fresh thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Io {
                    path: self.path.clone(),
                    what: "setns",
                    source: e.into(),
                })?;
                // The cookie costs one socket here, and a thread of its own later.
                if self.cookie.get().is_none()
                    && let Ok(c) = current_cookie()
                {
                    let _ = self.cookie.set(c);
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The kernel's cookie for this namespace: what the eBPF programs see as
    /// `bpf_get_netns_cookie`, unique for the life of the machine.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        if let Some(c) = self.cookie.get() {
            return Ok(*c);
        }
        let c = self.run(current_cookie)?.map_err(|source| NetnsError::Io {
            path: self.path.clone(),
            what: "SO_NETNS_COOKIE",
            source,
        })?;
        Ok(*self.cookie.get_or_init(|| c))
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The netns cookie of the calling thread's namespace.
pub fn current_cookie() -> io::Result<u64> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .or_else(|_| {
        // A namespace without IPv4 still has unix sockets.
        nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
    })?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let err = Netns::open("/proc/self/status").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
    }

    #[test]
    fn a_missing_path_is_an_open_error() {
        let err = Netns::open("/nonexistent/netns").unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
    }

    #[test]
    fn another_namespace_type_is_not_a_netns() {
        let err = Netns::open("/proc/self/ns/uts").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
    }

    #[test]
    fn current_netns_has_a_stable_cookie() {
        let ns = Netns::current().unwrap();
        let a = ns.cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, current_cookie().unwrap());
        assert!(ns.still_at_path());
    }
}
