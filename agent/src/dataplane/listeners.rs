//! ztunnel's listeners that exist before their pod is enrolled (a ztunnel already serving the
//! netns while its enrollment is re-created: pins lost, a map layout change). sockops learns
//! listeners when they `listen()`; these it never saw, so enrollment finds them and puts them in
//! `SL_LISTENERS` itself: from the netns's listeners (sock_diag: inode of each listener on a
//! ztunnel port), then the owning process's fd (`pidfd_getfd`), which the map takes.
//!
//! Nothing of this costs much in the usual order of things (enroll, then ztunnel listens): a
//! fresh pod has no such listener, and the process scan is skipped.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

use sluice_common::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

/// A listening TCP socket on one of ztunnel's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub inode: u64,
}

/// The calling thread's netns's listeners on 15001, 15006 and 15008 (both families). Asked
/// with sock_diag for listeners only: `/proc/net/tcp` would walk the node's whole connection
/// table (milliseconds on a busy node) for every enrollment.
pub fn ztunnel_port_listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        match dump_listeners(family as u8) {
            Ok(found) => out.extend(found),
            // No IPv6 in this kernel or netns.
            Err(e) if family == libc::AF_INET6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_msg`: family, state, timer, retrans, then `inet_diag_sockid` (sport at 4),
/// expires, rqueue, wqueue, uid, inode (at 68).
const DIAG_MSG_LEN: usize = 72;

/// One `SOCK_DIAG_BY_FAMILY` dump of TCP listeners of `family`.
fn dump_listeners(family: u8) -> io::Result<Vec<Listener>> {
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + inet_diag_req_v2 (56): family, protocol, ext, pad, states, sockid.
    let mut req = [0u8; NLMSG_HDRLEN + 56];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[16] = family;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: sending a fully initialised buffer on our socket (to the kernel: no address).
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(io::Error::other("malformed sock_diag answer"));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(msgs[16..20].try_into().expect("4 bytes"));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ if len >= NLMSG_HDRLEN + DIAG_MSG_LEN => {
                    let m = &msgs[NLMSG_HDRLEN..];
                    let port = u16::from_be_bytes([m[4], m[5]]);
                    let inode = u32::from_ne_bytes(m[68..72].try_into().expect("4 bytes"));
                    if [PORT_OUTBOUND, PORT_INBOUND, PORT_HBONE].contains(&port) {
                        out.push(Listener {
                            port,
                            inode: u64::from(inode),
                        });
                    }
                }
                _ => {}
            }
            msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
        }
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
            let lo_up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(lo_up.is_ok_and(|s| s.success()));
            let _a = TcpListener::bind("127.0.0.1:15001").unwrap();
            let _b = TcpListener::bind("[::1]:15008").unwrap();
            let _other = TcpListener::bind("127.0.0.1:8080").unwrap();
            let mut ports: Vec<u16> = ztunnel_port_listeners()
                .unwrap()
                .iter()
                .map(|l| l.port)
                .collect();
            ports.sort();
            assert_eq!(ports, [15001, 15008]);
        })
        .join()
        .unwrap();
    }
}
