//! SOCK_SEQPACKET unix sockets on tokio: one message per packet, fds as SCM_RIGHTS.
//!
//! tokio has no seqpacket type, so these wrap a non-blocking socket in `AsyncFd` and use nix's
//! sendmsg/recvmsg, as ztunnel does on its side.
use std::{
    io::{self, IoSlice},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
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

    /// Resolves when a packet (or end of stream) is really there to read. Peeks, so readiness
    /// left over from an earlier read cannot make this return early.
    pub async fn readable(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| {
                let mut byte = [0u8; 1];
                // SAFETY: valid fd and a 1-byte buffer.
                let n = unsafe {
                    libc::recv(
                        inner.as_raw_fd(),
                        byte.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match res {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// One recvmsg. Raw libc rather than nix: when control data is truncated nix reports an error
/// instead of the fds the kernel did install, which would then leak; here every received fd
/// is owned (and closed when dropped). Public for the fuzz target, which checks exactly that.
pub fn recv_once(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<Received>> {
    const MAX_FDS: usize = 8;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut cmsg = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is valid; the pointers below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: valid fd and msghdr.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count =
                    ((*c).cmsg_len as usize - (data as usize - c as usize)) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    if n == 0 && !truncated && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(Received {
        len: n as usize,
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
