//! Sockets the peer opens towards the application, marked like ztunnel's.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::sockets::ZTUNNEL_MARK;

/// Long enough for a local hop; short enough that a black-holed test cannot hang a thread.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Outbound: a marked socket with the normal (kernel-chosen) source address.
pub fn connect_marked(dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    sock.set_mark(ZTUNNEL_MARK)?;
    sock.connect_timeout(&dst.into(), CONNECT_TIMEOUT)?;
    Ok(sock.into())
}

/// Inbound/HBONE: a marked socket whose source is the client's IP (IP_TRANSPARENT +
/// IP_FREEBIND, bound to `source:0`), so the application sees the real client.
pub fn connect_spoofed(source: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let bind_to = SocketAddr::new(source, 0);
    let sock = Socket::new(Domain::for_address(bind_to), Type::STREAM, None)?;
    match source {
        IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
        IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
    }
    // IP_FREEBIND at SOL_IP applies to both families.
    sock.set_freebind_v4(true)?;
    sock.set_mark(ZTUNNEL_MARK)?;
    sock.bind(&bind_to.into())?;
    sock.connect_timeout(&dst.into(), CONNECT_TIMEOUT)?;
    Ok(sock.into())
}
