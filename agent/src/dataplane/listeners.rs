//! ztunnel's listeners that exist before their pod is enrolled (a ztunnel already serving the
//! netns while its enrollment is re-created: pins lost, a map layout change). sockops learns
//! listeners when they `listen()`; these it never saw, so enrollment finds them and puts them in
//! `SL_LISTENERS` itself: from the netns's TCP table (inode of each listener on a ztunnel port),
//! then the owning process's fd (`pidfd_getfd`), which the map takes.
//!
//! Nothing of this runs in the usual order of things (enroll, then ztunnel listens): the TCP
//! table of a fresh pod has no such listener, and the process scan is skipped.
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

/// The calling thread's netns's listeners on 15001, 15006 and 15008 (both families).
pub fn ztunnel_port_listeners() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => out.extend(parse(&text)),
            // No IPv6 in this kernel or netns.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// `/proc/net/tcp{,6}` lines: `sl local_address rem_address st ... uid timeout inode ...`,
/// with `local_address` as `HEXADDR:HEXPORT` and `st` 0A for LISTEN.
fn parse(text: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != LISTEN {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit_once(':')?.1, 16).ok()?;
            let inode = f[9].parse().ok()?;
            [PORT_OUTBOUND, PORT_INBOUND, PORT_HBONE]
                .contains(&port)
                .then_some(Listener { port, inode })
        })
        .collect()
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
    use super::*;

    #[test]
    fn listeners_on_ztunnel_ports_are_picked_from_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0
   2: 0200000A:3A9E 0100000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            parse(table),
            [Listener {
                port: 15001,
                inode: 4242
            }]
        );
    }
}
