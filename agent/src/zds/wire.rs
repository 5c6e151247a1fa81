//! SOCK_SEQPACKET unix sockets on tokio: one message per packet, fds as SCM_RIGHTS.
//!
//! tokio has no seqpacket type, so these wrap a non-blocking socket in `AsyncFd` and use nix's
//! sendmsg/recvmsg, as ztunnel does on its side.
use std::{
    io::{self, IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::{Interest, unix::AsyncFd};

/// A message read from the peer.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    /// The packet did not fit the buffer (MSG_TRUNC) or its fds did not fit (MSG_CTRUNC).
    pub truncated: bool,
    /// Any fds that came with it (the agent never expects any; they are closed on drop).
    pub fds: Vec<OwnedFd>,
}

/// A connected SOCK_SEQPACKET socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    fn from_owned(fd: OwnedFd) -> io::Result<Self> {
        Ok(SeqPacket {
            fd: register(fd, Interest::READABLE | Interest::WRITABLE)?,
        })
    }

    /// Connects to a listening seqpacket socket (used by tests and tooling).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = new_socket()?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Self::from_owned(fd)
    }

    /// Sends one packet, with `fd` attached as SCM_RIGHTS if given.
    pub async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|inner| {
                let iov = [IoSlice::new(bytes)];
                let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
                    vec![]
                } else {
                    vec![ControlMessage::ScmRights(&raw)]
                };
                socket::sendmsg::<()>(
                    inner.as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(Ok(n)) if n == bytes.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::other(format!(
                        "short seqpacket send: {n} of {}",
                        bytes.len()
                    )));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf`. `Ok(None)` is end of stream (the peer closed).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| recv_once(inner.as_raw_fd(), buf));
            match res {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Resolves when the socket has something to read (data or end of stream).
    pub async fn readable(&self) -> io::Result<()> {
        self.fd.readable().await.map(|mut g| g.retain_ready())
    }
}

fn recv_once(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Received>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds for us.
            fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    if msg.bytes == 0 && !truncated && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(Received {
        len: msg.bytes,
        truncated,
        fds,
    }))
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps its number until the AsyncFd drops it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// A listening SOCK_SEQPACKET socket at a filesystem path (removed on drop).
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl SeqPacketListener {
    /// Binds `path` with permissions `mode`, replacing a stale socket file; refuses if another
    /// process is listening there.
    pub fn bind(path: &Path, mode: u32) -> io::Result<Self> {
        replace_stale_socket(path, SeqPacket::connect_blocking_probe)?;
        let fd = new_socket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        socket::listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
        Ok(SeqPacketListener {
            fd: register(fd, Interest::READABLE)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| {
                socket::accept4(
                    inner.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match res {
                // SAFETY: accept4 returned a new fd we own.
                Ok(Ok(raw)) => return SeqPacket::from_owned(unsafe { OwnedFd::from_raw_fd(raw) }),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for SeqPacketListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl SeqPacket {
    /// Whether something accepts connections at `path` (blocking, for stale-socket checks).
    fn connect_blocking_probe(path: &Path) -> bool {
        let Ok(fd) = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        ) else {
            return false;
        };
        UnixAddr::new(path).is_ok_and(|addr| socket::connect(fd.as_raw_fd(), &addr).is_ok())
    }
}

/// Prepares `path` for a new listening socket: creates the parent directory, and removes a
/// socket file left by a previous process unless something still listens on it.
pub fn replace_stale_socket(path: &Path, is_live: impl Fn(&Path) -> bool) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(_) if is_live(path) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use by another process (is another agent running?)",
                path.display()
            ),
        )),
        Ok(_) => std::fs::remove_file(path),
    }
}
