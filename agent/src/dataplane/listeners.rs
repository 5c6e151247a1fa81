//! ztunnel's listeners that exist before their pod is enrolled (a ztunnel already serving the
//! netns while its enrollment is re-created: pins lost, a map layout change). sockops learns
//! listeners when they `listen()`; these it never saw, so enrollment finds them and puts them in
//! `SL_LISTENERS` itself: the listener that would take a connection to the pod's address on
//! each of ztunnel's ports (sock_diag: its inode), then the owning process's fd
//! (`pidfd_getfd`), which the map takes.
//!
//! Nothing of this costs much in the usual order of things (enroll, then ztunnel listens): a
//! fresh pod has no such listener, and the process scan is skipped.
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd, OwnedFd},
};

use sluice_common::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

/// A listening TCP socket on one of ztunnel's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub inode: u64,
}

/// The calling thread's netns's listeners on 15001, 15006 and 15008: for each port, the one a
/// connection to the pod's IPv4 address would reach, else its IPv6 address (`SL_LISTENERS`
/// keeps one per port). Asked with sock_diag's exact lookup, the kernel's own listener lookup:
/// a dump would walk every listener of every netns on the node (the listening hash is
/// node-wide), which grows with the pods' ztunnel listeners.
pub fn ztunnel_port_listeners(addrs: &[IpAddr]) -> io::Result<Vec<Listener>> {
    let v4 = addrs
        .iter()
        .find(|a| matches!(a, IpAddr::V4(v4) if !v4.is_loopback()));
    let v6 = addrs
        .iter()
        .find(|a| matches!(a, IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unicast_link_local()));
    let sock = DiagSocket::new()?;
    let mut out = Vec::new();
    for port in [PORT_OUTBOUND, PORT_INBOUND, PORT_HBONE] {
        for addr in [v4, v6].into_iter().flatten() {
            if let Some(inode) = sock.listener(*addr, port)? {
                out.push(Listener { port, inode });
                break;
            }
        }
    }
    Ok(out)
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const TCP_LISTEN: u8 = 10;
const NLMSG_HDRLEN: usize = 16;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`: sport (at
/// 8), dport, src (at 12), dst (at 28), if (at 44), cookie (at 48).
const DIAG_REQ_LEN: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, then `inet_diag_sockid` (sport at 4),
/// expires, rqueue, wqueue, uid, inode (at 68).
const DIAG_MSG_LEN: usize = 72;

/// A sock_diag netlink socket of the calling thread's netns.
struct DiagSocket(OwnedFd);

impl DiagSocket {
    fn new() -> io::Result<DiagSocket> {
        // SAFETY: a new netlink socket, owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned to us.
        Ok(DiagSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The inode of the TCP listener that a connection to `addr:port` would reach, if any.
    fn listener(&self, addr: IpAddr, port: u16) -> io::Result<Option<u64>> {
        let mut req = [0u8; NLMSG_HDRLEN + DIAG_REQ_LEN];
        let len = req.len() as u32;
        req[0..4].copy_from_slice(&len.to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        let r = &mut req[NLMSG_HDRLEN..];
        r[0] = match addr {
            IpAddr::V4(_) => libc::AF_INET as u8,
            IpAddr::V6(_) => libc::AF_INET6 as u8,
        };
        r[1] = libc::IPPROTO_TCP as u8;
        r[4..8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        r[8..10].copy_from_slice(&port.to_be_bytes());
        match addr {
            IpAddr::V4(v4) => r[12..16].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => r[12..28].copy_from_slice(&v6.octets()),
        }
        // INET_DIAG_NOCOOKIE: any socket.
        r[48..56].fill(0xff);
        let raw = self.0.as_raw_fd();
        // SAFETY: sending a fully initialised buffer on our socket (to the kernel: no address).
        if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let msg = &buf[..n as usize];
        if msg.len() < NLMSG_HDRLEN + 4 {
            return Err(io::Error::other("short sock_diag answer"));
        }
        let ty = u16::from_ne_bytes([msg[4], msg[5]]);
        if ty == NLMSG_ERROR {
            let errno = -i32::from_ne_bytes(msg[16..20].try_into().expect("4 bytes"));
            return match errno {
                // Nothing listens there; or no IPv6 in this kernel or netns.
                libc::ENOENT | libc::EAFNOSUPPORT => Ok(None),
                _ => Err(io::Error::from_raw_os_error(errno)),
            };
        }
        if ty != SOCK_DIAG_BY_FAMILY || msg.len() < NLMSG_HDRLEN + DIAG_MSG_LEN {
            return Err(io::Error::other("malformed sock_diag answer"));
        }
        let m = &msg[NLMSG_HDRLEN..];
        let inode = u32::from_ne_bytes(m[68..72].try_into().expect("4 bytes"));
        Ok((m[1] == TCP_LISTEN).then_some(u64::from(inode)))
    }
}

/// A duplicate of the socket with this inode, taken from whichever process holds it.
pub fn socket_by_inode(inode: u64) -> io::Result<Option<OwnedFd>> {
    let want = format!("socket:[{inode}]");
    for proc in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                let Some(num) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                return take_fd(pid, num).map(Some);
            }
        }
    }
    Ok(None)
}

/// `pidfd_getfd(pidfd_open(pid), fd)`: the agent is privileged (CAP_SYS_PTRACE).
fn take_fd(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned fd is owned from here on.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let dup = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup as i32))
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn listeners_on_ztunnel_ports_are_found_and_others_not() {
        // In a netns of our own (unshare on a scratch thread), where nobody else listens.
        std::thread::spawn(|| {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                eprintln!("skipped: cannot create a network namespace (not root)");
                return;
            }
            let up = |args: &[&str]| {
                let s = std::process::Command::new("ip").args(args).status();
                assert!(s.is_ok_and(|s| s.success()), "ip {args:?}");
            };
            up(&["link", "set", "lo", "up"]);
            up(&["addr", "add", "10.9.0.2/32", "dev", "lo"]);
            up(&["addr", "add", "fd09::2/128", "dev", "lo"]);
            let pod: [IpAddr; 2] = ["10.9.0.2".parse().unwrap(), "fd09::2".parse().unwrap()];
            // What ztunnel binds: the wildcard, dual-stack (net.ipv6.bindv6only is 0 in a new
            // netns); and a listener on the pod's IPv6 address only.
            let a = TcpListener::bind("[::]:15001").unwrap();
            let _b = TcpListener::bind("[fd09::2]:15008").unwrap();
            // Not reachable at the pod's address, or not a ztunnel port.
            let _c = TcpListener::bind("127.0.0.1:15006").unwrap();
            let _other = TcpListener::bind("0.0.0.0:8080").unwrap();
            let found = ztunnel_port_listeners(&pod).unwrap();
            let ports: Vec<u16> = found.iter().map(|l| l.port).collect();
            assert_eq!(ports, [15001, 15008]);
            let inode = |fd: i32| {
                let link = std::fs::read_link(format!("/proc/thread-self/fd/{fd}")).unwrap();
                link.to_string_lossy().to_string()
            };
            assert_eq!(inode(a.as_raw_fd()), format!("socket:[{}]", found[0].inode));
            // No address, no lookup.
            assert_eq!(ztunnel_port_listeners(&[]).unwrap(), []);
        })
        .join()
        .unwrap();
    }
}
