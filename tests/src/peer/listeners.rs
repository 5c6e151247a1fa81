//! The socket set ztunnel opens inside each pod network namespace (inpod mode).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::sockets::ZTUNNEL_MARK;

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;
pub const DNS_PORT: u16 = 15053;

const BACKLOG: i32 = 128;

/// All listeners of one network namespace, bound in the calling thread's netns.
pub struct ListenerSet {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub hbone: TcpListener,
    pub dns_tcp: Vec<TcpListener>,
    pub dns_udp: Vec<UdpSocket>,
}

impl ListenerSet {
    /// Binds everything in the network namespace of the calling thread.
    pub fn bind() -> io::Result<ListenerSet> {
        let mut dns_tcp = vec![dns_tcp_listener(Ipv4Addr::LOCALHOST.into())?];
        let mut dns_udp = vec![dns_udp_socket(Ipv4Addr::LOCALHOST.into())?];
        // ::1 is missing when IPv6 is disabled in the netns; ztunnel carries on then.
        match (
            dns_tcp_listener(Ipv6Addr::LOCALHOST.into()),
            dns_udp_socket(Ipv6Addr::LOCALHOST.into()),
        ) {
            (Ok(t), Ok(u)) => {
                dns_tcp.push(t);
                dns_udp.push(u);
            }
            (Err(e), _) | (_, Err(e)) if ipv6_loopback_unavailable(&e) => {}
            (Err(e), _) | (_, Err(e)) => return Err(e),
        }
        Ok(ListenerSet {
            outbound: transparent_listener(OUTBOUND_PORT)?,
            inbound: transparent_listener(INBOUND_PORT)?,
            hbone: transparent_listener(HBONE_PORT)?,
            dns_tcp,
            dns_udp,
        })
    }
}

fn ipv6_loopback_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
    )
}

/// `[::]:port`, dual-stack, IP_TRANSPARENT at both levels; marked after listen, which
/// is the order ztunnel uses (so a hook keyed on the mark at bind time would not see it).
fn transparent_listener(port: u16) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.set_ip_transparent_v4(true)?;
    sock.set_ip_transparent_v6(true)?;
    sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    sock.listen(BACKLOG)?;
    sock.set_mark(ZTUNNEL_MARK)?;
    Ok(sock.into())
}

fn dns_tcp_listener(ip: std::net::IpAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address((ip, 0).into()), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::new(ip, DNS_PORT).into())?;
    sock.listen(BACKLOG)?;
    sock.set_mark(ZTUNNEL_MARK)?;
    Ok(sock.into())
}

fn dns_udp_socket(ip: std::net::IpAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address((ip, 0).into()), Type::DGRAM, None)?;
    sock.bind(&SocketAddr::new(ip, DNS_PORT).into())?;
    sock.set_mark(ZTUNNEL_MARK)?;
    Ok(sock.into())
}
