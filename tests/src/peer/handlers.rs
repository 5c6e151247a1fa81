//! Per-connection behaviour of each listener, mirroring what ztunnel does with it.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;

use super::Ctx;
use super::event::{Accepted, Connected, EventKind, Failed};
use super::listeners::{INBOUND_PORT, OUTBOUND_PORT};
use super::relay::relay;
use super::upstream::{connect_marked, connect_spoofed};
use crate::dns;
use crate::sockets::{self, OrigDstFrom, canonical, errno_of};

/// Longest `CONNECT <addr>` line accepted on the HBONE port.
const MAX_HBONE_LINE: usize = 1024;

/// 15001: connect to the original destination with a marked, normally sourced socket.
pub fn outbound(ctx: &Ctx, client: TcpStream) {
    let Some(acc) = accepted(ctx, &client) else {
        return;
    };
    ctx.emit(EventKind::Outbound(acc.clone()));
    let upstream =
        refuse_self_loop(&acc, OUTBOUND_PORT).and_then(|()| connect_marked(acc.orig_dst));
    let Ok(rx) = client.try_clone() else { return };
    proxy(ctx, Hop::new(Leg::Outbound, &acc), client, rx, upstream);
}

/// 15006: connect to the original destination using the client's IP as source.
pub fn inbound(ctx: &Ctx, client: TcpStream) {
    let Some(acc) = accepted(ctx, &client) else {
        return;
    };
    ctx.emit(EventKind::Inbound(acc.clone()));
    let upstream = refuse_self_loop(&acc, INBOUND_PORT)
        .and_then(|()| connect_spoofed(acc.peer.ip(), acc.orig_dst));
    let Ok(rx) = client.try_clone() else { return };
    proxy(ctx, Hop::new(Leg::Inbound, &acc), client, rx, upstream);
}

/// 15008: a stand-in for HBONE. `CONNECT <ip:port>\n` proxies to that target with the
/// client's IP as source; anything else is echoed back.
pub fn hbone(ctx: &Ctx, client: TcpStream) {
    let (Ok(peer), Ok(local)) = (client.peer_addr(), client.local_addr()) else {
        return;
    };
    let peer = canonical(peer);
    ctx.emit(EventKind::Hbone {
        peer,
        local: canonical(local),
    });
    let Ok(rx) = client.try_clone() else {
        return;
    };
    let mut rx = BufReader::new(rx);
    let line = match sockets::read_line(&mut rx, MAX_HBONE_LINE) {
        Ok(Some(line)) => line,
        _ => return,
    };
    match line
        .strip_prefix("CONNECT ")
        .map(|t| t.trim().parse::<SocketAddr>())
    {
        Some(Ok(target)) => {
            let target = canonical(target);
            let upstream = connect_spoofed(peer.ip(), target);
            let hop = Hop {
                leg: Leg::Hbone,
                peer,
                orig_dst: target,
            };
            proxy(ctx, hop, client, rx, upstream);
        }
        _ => echo(client, &line, rx),
    }
}

/// 15053/tcp: answer length-prefixed queries with the QR bit set until the client closes.
pub fn dns_tcp(ctx: &Ctx, mut client: TcpStream) {
    let Some(acc) = accepted(ctx, &client) else {
        return;
    };
    ctx.emit(EventKind::DnsTcp(acc));
    let mut len = [0u8; 2];
    while client.read_exact(&mut len).is_ok() {
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        if client.read_exact(&mut msg).is_err() {
            return;
        }
        dns::mark_response(&mut msg);
        if client
            .write_all(&len)
            .and_then(|()| client.write_all(&msg))
            .is_err()
        {
            return;
        }
    }
}

/// 15053/udp: answer every datagram to its sender with the QR bit set.
pub fn dns_udp(ctx: &Ctx, sock: &UdpSocket) {
    let local = sock.local_addr().map(canonical);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !ctx.stopping() {
                    ctx.error("dns_udp recv", &e);
                }
                return;
            }
        };
        if ctx.stopping() {
            return; // woken by stop()
        }
        if let Ok(local) = local {
            ctx.emit(EventKind::DnsUdp {
                peer: canonical(peer),
                local,
                len: n,
            });
        }
        dns::mark_response(&mut buf[..n]);
        if let Err(e) = sock.send_to(&buf[..n], peer) {
            ctx.error("dns_udp reply", &e);
        }
    }
}

/// Which listener a proxied connection came through; picks the event names.
#[derive(Clone, Copy)]
enum Leg {
    Outbound,
    Inbound,
    Hbone,
}

impl Leg {
    fn connected(self, c: Connected) -> EventKind {
        match self {
            Leg::Outbound => EventKind::OutboundConnected(c),
            Leg::Inbound => EventKind::InboundConnected(c),
            Leg::Hbone => EventKind::HboneConnected(c),
        }
    }

    fn failed(self, f: Failed) -> EventKind {
        match self {
            Leg::Outbound => EventKind::OutboundFailed(f),
            Leg::Inbound => EventKind::InboundFailed(f),
            Leg::Hbone => EventKind::HboneFailed(f),
        }
    }
}

/// One proxied connection: where it came in, from whom, and where it is going.
struct Hop {
    leg: Leg,
    peer: SocketAddr,
    orig_dst: SocketAddr,
}

impl Hop {
    fn new(leg: Leg, acc: &Accepted) -> Hop {
        Hop {
            leg,
            peer: acc.peer,
            orig_dst: acc.orig_dst,
        }
    }
}

/// Reports the upstream outcome, then relays (or closes the client on failure).
fn proxy(
    ctx: &Ctx,
    hop: Hop,
    client: TcpStream,
    client_rx: impl Read,
    upstream: io::Result<TcpStream>,
) {
    let Hop {
        leg,
        peer,
        orig_dst,
    } = hop;
    match upstream.and_then(|u| Ok((u.local_addr()?, u))) {
        Ok((upstream_local, upstream)) => {
            ctx.emit(leg.connected(Connected {
                peer,
                orig_dst,
                upstream_local: canonical(upstream_local),
            }));
            relay(client, client_rx, upstream);
        }
        Err(e) => ctx.emit(leg.failed(Failed {
            peer,
            orig_dst,
            errno: errno_of(&e),
            error: e.to_string(),
        })),
    }
}

/// Peer, local address and original destination of an accepted connection.
fn accepted(ctx: &Ctx, client: &TcpStream) -> Option<Accepted> {
    let addrs = (|| {
        let peer = canonical(client.peer_addr()?);
        let local = canonical(client.local_addr()?);
        let (orig_dst, orig_dst_from) = sockets::original_dst(client.as_fd())?;
        io::Result::Ok(Accepted {
            peer,
            local,
            orig_dst,
            orig_dst_from,
        })
    })();
    match addrs {
        Ok(acc) => Some(acc),
        Err(e) => {
            ctx.error("reading connection addresses", &e);
            None
        }
    }
}

/// A connection made straight to 15001/15006 (nothing redirected it) has the listener
/// itself as "original destination"; following it would make the peer loop forever.
fn refuse_self_loop(acc: &Accepted, listener_port: u16) -> io::Result<()> {
    if acc.orig_dst_from == OrigDstFrom::Local && acc.orig_dst.port() == listener_port {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    Ok(())
}

/// Echoes `first_line` and then everything else the client sends, until it closes.
fn echo(mut client: TcpStream, first_line: &str, mut rx: impl Read) {
    if client
        .write_all(format!("{first_line}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let _ = io::copy(&mut rx, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
}
