//! The black hole: where `sk_lookup` sends inbound SYNs it must drop, so that they are dropped
//! *silently*, as upstream's TPROXY drops them when ztunnel has no listener. A client then
//! retries its SYN (after 1 s, 3 s, ...) and gets through once ztunnel listens (a pod just
//! enrolled, ztunnel restarting), where `SK_DROP` would make the kernel answer with a reset and
//! the client give up at once.
//!
//! It is a listening socket of the agent (bound to loopback; one per family, as a socket bound
//! to `::1` takes IPv6 only) whose accept queue is full for good: two connections the agent
//! made to it itself and never accepts. The kernel
//! drops a SYN for a listener with a full accept queue without answering it. `sk_lookup` may
//! hand a connection to a socket of another network namespace; this one never answers, so
//! nothing of the pod's traffic goes anywhere. The sockhash entry goes when the agent exits;
//! while no agent runs, those SYNs get the reset instead.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, getsockname, listen,
    socket,
};

pub(super) struct BlackHole {
    listener: OwnedFd,
    _stuck: [TcpStream; 2],
}

impl BlackHole {
    /// Binds `127.0.0.1:0` (or `[::1]:0`) and fills its queue.
    pub fn new(v6: bool) -> io::Result<Self> {
        let listener = if v6 {
            Self::listen_v6()?
        } else {
            Self::listen_v4()?
        };
        let addr = local_addr(&listener)?;
        // Backlog 1: two queued connections fill it (more would be dropped already), and the
        // half-open queue never looks full, so no SYN-flood cookies are sent.
        let stuck = [TcpStream::connect(addr)?, TcpStream::connect(addr)?];
        Ok(BlackHole {
            listener,
            _stuck: stuck,
        })
    }

    fn listen_v6() -> io::Result<OwnedFd> {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0)),
        )?;
        listen(&fd, Backlog::new(1)?)?;
        Ok(fd)
    }

    fn listen_v4() -> io::Result<OwnedFd> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
        )?;
        listen(&fd, Backlog::new(1)?)?;
        Ok(fd)
    }

    /// The listening socket, for the sockhash.
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let ss: nix::sys::socket::SockaddrStorage = getsockname(fd.as_raw_fd())?;
    if let Some(v6) = ss.as_sockaddr_in6() {
        return Ok(SocketAddr::from((v6.ip(), v6.port())));
    }
    if let Some(v4) = ss.as_sockaddr_in() {
        return Ok(SocketAddr::from((v4.ip(), v4.port())));
    }
    Err(io::Error::other("the black hole has no IP address"))
}
