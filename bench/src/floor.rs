//! The floor setup: no redirection anywhere. The client dials the peer's own outbound listener
//! directly, at a loopback address that names the real destination, and the peer, which finds
//! no SO_ORIGINAL_DST (as for any connection nothing redirected) and falls back to the local
//! address like ztunnel, decodes the destination from that address.
//!
//! `10.78.b.c:80pp` is dialled as `127.pp.b.c:15001`. Every destination keeps its own
//! loopback address, so the floor has the same per-destination 4-tuple space as iptables'
//! REDIRECT, and the whole of 127.0.0.0/8 is local in every network namespace.
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::ports::DEST_NET;

pub const OUTBOUND_PORT: u16 = 15001;
const PORT_BASE: u16 = 8000;

/// The address the floor client dials instead of `dst` (a destination app address).
pub fn encode(dst: SocketAddr) -> Option<SocketAddr> {
    let SocketAddr::V4(v4) = dst else { return None };
    let [a, b, c, d] = v4.ip().octets();
    let pp = v4.port().checked_sub(PORT_BASE).filter(|p| *p < 256)?;
    ([a, b] == DEST_NET)
        .then(|| SocketAddrV4::new(Ipv4Addr::new(127, pp as u8, c, d), OUTBOUND_PORT).into())
}

/// The destination named by the local address a floor connection reached the peer at.
pub fn decode(local: SocketAddr) -> Option<SocketAddr> {
    let IpAddr::V4(ip) = local.ip().to_canonical() else {
        return None;
    };
    let [a, pp, c, d] = ip.octets();
    (a == 127 && local.port() == OUTBOUND_PORT && pp != 0).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::new(DEST_NET[0], DEST_NET[1], c, d),
            PORT_BASE + u16::from(pp),
        )
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let dst: SocketAddr = "10.78.0.17:8081".parse().unwrap();
        let floor = encode(dst).unwrap();
        assert_eq!(floor, "127.81.0.17:15001".parse().unwrap());
        assert_eq!(decode(floor), Some(dst));
        let mapped: SocketAddr = "[::ffff:127.81.0.17]:15001".parse().unwrap();
        assert_eq!(decode(mapped), Some(dst));
        assert_eq!(encode("10.1.0.1:8080".parse().unwrap()), None);
        assert_eq!(decode("127.0.0.1:15001".parse().unwrap()), None);
    }
}
