//! Socket helpers shared by the testkit peer, the app command server and the harness.

use std::io::{self, BufRead};
use std::mem::{MaybeUninit, size_of};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::{Deserialize, Serialize};
use socket2::SockAddr;

/// The mark ztunnel puts on every socket it creates; Sluice must leave these alone.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`: same number at the IPv4 and IPv6 levels.
pub const SO_ORIGINAL_DST: libc::c_int = 80;

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`, as dual-stack sockets report IPv4 peers mapped.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Converts a kernel socket address to a canonical std address (None for non-IP families).
pub fn from_sockaddr(addr: &SockAddr) -> Option<SocketAddr> {
    addr.as_socket().map(canonical)
}

/// Which source answered [`original_dst`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrigDstFrom {
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`
    SolIp,
    /// `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`
    SolIpv6,
    /// Neither answered: the accepted socket's local address.
    Local,
}

/// The original destination of an accepted connection, determined the way ztunnel does:
/// `SOL_IP` first (even on an AF_INET6 socket), then `SOL_IPV6`, then the local address.
pub fn original_dst(fd: BorrowedFd<'_>) -> io::Result<(SocketAddr, OrigDstFrom)> {
    for (level, from) in [
        (libc::SOL_IP, OrigDstFrom::SolIp),
        (libc::SOL_IPV6, OrigDstFrom::SolIpv6),
    ] {
        if let Ok(addr) = getsockopt_sockaddr(fd, level, SO_ORIGINAL_DST) {
            return Ok((canonical(addr), from));
        }
    }
    let local = socket2::SockRef::from(&fd).local_addr()?;
    let local = from_sockaddr(&local)
        .ok_or_else(|| io::Error::other("local address is not an IP address"))?;
    Ok((local, OrigDstFrom::Local))
}

/// `getsockopt` returning a socket address, read into a `sockaddr_storage` like ztunnel does.
fn getsockopt_sockaddr(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe valid writable memory of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            storage.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and (partly) filled by the kernel.
    let storage = unsafe { storage.assume_init() };
    sockaddr_storage_to_std(&storage, len)
        .ok_or_else(|| io::Error::other("getsockopt returned a non-IP address"))
}

fn sockaddr_storage_to_std(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say this is a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length say this is a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(canonical(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ))))
        }
        _ => None,
    }
}

/// The errno to report for an I/O error; timeouts are reported as ETIMEDOUT whether they
/// came from a connect timeout (no errno) or from a socket read timeout (EAGAIN).
pub fn errno_of(err: &io::Error) -> Option<i32> {
    match err.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Some(libc::ETIMEDOUT),
        _ => err.raw_os_error(),
    }
}

/// Reads one `\n`-terminated line (without the terminator), refusing lines over `max` bytes.
/// Returns None on EOF before any byte.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..pos]);
            reader.consume(pos + 1);
            break;
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        reader.consume(n);
        if line.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_unmaps_v4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[fd77::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn read_line_handles_eof_and_limits() {
        let mut r = io::Cursor::new(b"one\r\ntwo".to_vec());
        assert_eq!(read_line(&mut r, 10).unwrap().as_deref(), Some("one"));
        assert_eq!(read_line(&mut r, 10).unwrap().as_deref(), Some("two"));
        assert_eq!(read_line(&mut r, 10).unwrap(), None);
        let mut long = io::BufReader::with_capacity(4, io::Cursor::new(vec![b'x'; 64]));
        assert!(read_line(&mut long, 10).is_err());
    }
}
