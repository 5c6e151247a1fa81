//! Where the destination app listens, one port per behaviour the figures need, and the
//! addresses the destination pod holds.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Writes one byte, then closes (the server closes first): figure 1.
pub const CLOSE: u16 = 8080;
/// Writes one byte, then waits for the client to close first: figure 2.
pub const WAIT_EOF: u16 = 8081;
/// Echoes everything: figure 3.
pub const ECHO: u16 = 8082;
/// Reads until EOF, then answers the byte count (8 bytes, big endian): figure 4.
pub const SINK: u16 = 8083;

pub const APP_PORTS: [u16; 4] = [CLOSE, WAIT_EOF, ECHO, SINK];

/// The destination pod holds `10.78.0.1` .. `10.78.0.<n>`.
pub const DEST_NET: [u8; 2] = [10, 78];

/// Destination address `i` (0-based, below 254).
pub fn dest_ip(i: usize) -> Ipv4Addr {
    assert!(i < 254, "the destination pod holds at most 254 addresses");
    Ipv4Addr::new(DEST_NET[0], DEST_NET[1], 0, i as u8 + 1)
}

pub fn dest(i: usize, port: u16) -> SocketAddr {
    SocketAddrV4::new(dest_ip(i), port).into()
}

/// The DNS server the pods ask: nobody holds it; only redirection answers (figure 5).
pub const DNS_SERVER: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 78, 1, 53), 53));
