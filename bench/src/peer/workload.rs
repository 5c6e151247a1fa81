//! One pod's listener set, like ztunnel's in-pod proxy: 15001 outbound, 15006 inbound
//! (dual-stack `[::]`, IP_TRANSPARENT, mark 0x539 set after listen as ztunnel does), 15053/udp
//! DNS on `127.0.0.1` and `[::1]`. Each accepted connection reads SO_ORIGINAL_DST (falling back
//! to the local address), opens its upstream socket inside the pod with mark 0x539, and relays.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use sluice_tests::{
    dns,
    sockets::{OrigDstFrom, ZTUNNEL_MARK, canonical, original_dst},
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{netns::PodNetns, stats::Stats};
use crate::floor;

pub const INBOUND_PORT: u16 = 15006;
pub const DNS_PORT: u16 = 15053;
const BACKLOG: i32 = 4096;
/// Relay buffers per direction (tokio's default is 8 KiB; ztunnel's grow further).
const RELAY_BUF: usize = 64 * 1024;

/// Shared by every workload of the peer process.
#[derive(Debug)]
pub struct Ctx {
    pub stats: Stats,
    /// Floor mode: a connection without an original destination names it in its local address.
    pub floor: bool,
}

/// A running listener set; dropping it closes the listeners (relays in flight carry on).
pub struct Workload {
    tasks: Vec<JoinHandle<()>>,
    pub netns_id: (u64, u64),
}

impl Drop for Workload {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Workload {
    /// Binds the listener set inside `ns` and starts serving it on `rt`.
    pub fn start(rt: &Handle, ns: PodNetns, ctx: &Arc<Ctx>) -> io::Result<Workload> {
        let netns_id = ns.id()?;
        let outbound = ns.run(|| transparent_listener(floor::OUTBOUND_PORT))?;
        let inbound = ns.run(|| transparent_listener(INBOUND_PORT))?;
        let mut dns = vec![ns.run(|| dns_socket(Ipv4Addr::LOCALHOST.into()))?];
        // ::1 is missing when IPv6 is off in the pod; ztunnel carries on then, and so do we.
        if let Ok(s) = ns.run(|| dns_socket(Ipv6Addr::LOCALHOST.into())) {
            dns.push(s);
        }
        let _guard = rt.enter();
        let ns = Arc::new(ns);
        let mut tasks = Vec::new();
        for (sock, inbound) in [(outbound, false), (inbound, true)] {
            let listener = TcpListener::from_std(sock.into())?;
            let (ctx, ns) = (Arc::clone(ctx), Arc::clone(&ns));
            tasks.push(tokio::spawn(accept_loop(listener, inbound, ctx, ns)));
        }
        for sock in dns {
            let sock = UdpSocket::from_std(sock.into())?;
            tasks.push(tokio::spawn(dns_loop(sock, Arc::clone(ctx))));
        }
        ctx.stats.workloads(1);
        Ok(Workload { tasks, netns_id })
    }
}

fn transparent_listener(port: u16) -> io::Result<Socket> {
    let sock = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    sock.set_ip_transparent_v4(true)?;
    sock.set_ip_transparent_v6(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    sock.listen(BACKLOG)?;
    sock.set_mark(ZTUNNEL_MARK)?;
    Ok(sock)
}

fn dns_socket(ip: IpAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address((ip, 0).into()), Type::DGRAM, None)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::new(ip, DNS_PORT).into())?;
    sock.set_mark(ZTUNNEL_MARK)?;
    Ok(sock)
}

async fn accept_loop(listener: TcpListener, inbound: bool, ctx: Arc<Ctx>, ns: Arc<PodNetns>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let (ctx, ns) = (Arc::clone(&ctx), Arc::clone(&ns));
                tokio::spawn(async move {
                    if relay(client, inbound, &ctx, &ns).await.is_err() {
                        ctx.stats.error();
                    }
                });
            }
            Err(_) => {
                ctx.stats.error();
                // EMFILE and friends: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn relay(mut client: TcpStream, inbound: bool, ctx: &Ctx, ns: &PodNetns) -> io::Result<()> {
    client.set_nodelay(true)?;
    let peer = canonical(client.peer_addr()?);
    let (orig, from) = original_dst(client.as_fd())?;
    let dst = if inbound {
        ctx.stats.inbound();
        orig
    } else {
        ctx.stats.outbound(from);
        if from != OrigDstFrom::Local && canonical(client.local_addr()?) == orig {
            ctx.stats.outbound_at_orig();
        }
        match from {
            OrigDstFrom::Local if ctx.floor => floor::decode(orig),
            // Nothing redirected it here: following the local address would loop.
            OrigDstFrom::Local => None,
            _ => Some(orig),
        }
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ELOOP))?
    };
    let mut upstream = match connect_upstream(ns, dst, inbound.then_some(peer.ip())).await {
        Ok(u) => u,
        Err(e) => {
            ctx.stats.upstream_failed();
            return Err(e);
        }
    };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUF, RELAY_BUF)
        .await
        .map(drop)
}

/// A marked socket made in the pod; inbound ones take the client's address as source.
async fn connect_upstream(
    ns: &PodNetns,
    dst: SocketAddr,
    spoof: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let sock = ns.run(|| Socket::new(Domain::for_address(dst), Type::STREAM, None))?;
    sock.set_mark(ZTUNNEL_MARK)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    if let Some(src) = spoof {
        match src {
            IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
        }
        sock.set_freebind_v4(true)?;
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    let std: std::net::TcpStream = sock.into();
    TcpSocket::from_std_stream(std).connect(dst).await
}

async fn dns_loop(sock: UdpSocket, ctx: Arc<Ctx>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            ctx.stats.error();
            continue;
        };
        dns::mark_response(&mut buf[..n]);
        // Counted before it goes out: whoever got the answer may already be asking the count.
        ctx.stats.dns();
        if sock.send_to(&buf[..n], from).await.is_err() {
            ctx.stats.error();
        }
    }
}
