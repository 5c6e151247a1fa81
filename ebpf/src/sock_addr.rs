//! cgroup sock_addr programs: the app's side of redirection.
//!
//! `connect` marks an app's outbound TCP socket with REPLY_MARK and leaves its destination
//! alone: the pod's rule and table 100 route it to the pod's `lo`, where `sk_lookup` hands the
//! SYN to ztunnel's 15001 (TPROXY-like: ztunnel's socket has the original destination as local
//! address, the app keeps its own 4-tuple per destination). It also marks ztunnel's connections
//! to the app made from a client's address, for the return path. DNS (TCP and UDP, port 53) is
//! rewritten to ztunnel's 15053; `getpeername` and `recvmsg` give the app back the server it
//! asked.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock, helpers::generated::bpf_get_netns_cookie,
    macros::cgroup_sock_addr, programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use sluice_common::{
    Addr, Counter, DNS_DESTS as DNS_DESTS_LEN, DNS_PORT, Decision, DnsDests, Endpoint, MARK_MASK,
    POD_DNS_CAPTURE, POD_NO_IPV6, PORT_DNS, PodConfig, ZTUNNEL_MARK,
};

use crate::{
    counters::bump,
    maps::{DNS_DESTS, PODS},
    reply_mark::set_reply_mark,
    trace::{Conn, trace},
};

/// Let the syscall proceed (with whatever we rewrote).
const PROCEED: i32 = 1;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_MPTCP: u32 = 262;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[cgroup_sock_addr(connect4)]
pub fn sl_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::V4);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sl_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, Family::V6);
    PROCEED
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sl_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, Family::V4);
    PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sl_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, Family::V6);
    PROCEED
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sl_recvmsg4(ctx: SockAddrContext) -> i32 {
    if restore_dns_peer(&ctx, Family::V4, Take::NextReply) {
        bump(Counter::RecvmsgRewritten);
    }
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sl_recvmsg6(ctx: SockAddrContext) -> i32 {
    if restore_dns_peer(&ctx, Family::V6, Take::NextReply) {
        bump(Counter::RecvmsgRewritten);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sl_getpeer4(ctx: SockAddrContext) -> i32 {
    if restore_dns_peer(&ctx, Family::V4, Take::Connected) {
        bump(Counter::PeernameRewritten);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sl_getpeer6(ctx: SockAddrContext) -> i32 {
    if restore_dns_peer(&ctx, Family::V6, Take::Connected) {
        bump(Counter::PeernameRewritten);
    }
    PROCEED
}

/// What kind of socket is connecting or sending, as far as redirection cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

#[inline(always)]
fn transport(ctx: &SockAddrContext) -> Option<Transport> {
    let sa = ctx.sock_addr;
    // SAFETY: ctx fields are readable with 4-byte loads.
    let (ty, proto) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).protocol)),
        )
    };
    match (ty, proto) {
        // MPTCP subflows are TCP on the wire: redirect them like upstream's `-p tcp` would.
        (SOCK_STREAM, IPPROTO_TCP | IPPROTO_MPTCP) => Some(Transport::Tcp),
        (SOCK_DGRAM, IPPROTO_UDP) => Some(Transport::Udp),
        _ => None,
    }
}

#[inline(always)]
fn sk(ctx: &SockAddrContext) -> *mut bpf_sock {
    // SAFETY: sock_addr programs always have a socket.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

#[inline(always)]
fn netns(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper valid for sock_addr programs.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The socket's mark.
#[inline(always)]
fn mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the ctx's socket is a full socket with a readable mark.
    unsafe { read_volatile(addr_of!((*sk(ctx)).mark)) }
}

/// The address the socket is bound to (unspecified if none yet), in the family of the hook.
#[inline(always)]
fn bound_addr(ctx: &SockAddrContext, family: Family) -> Addr {
    let sk = sk(ctx);
    // SAFETY: bpf_sock fields, 4-byte loads.
    unsafe {
        match family {
            Family::V4 => Addr::v4(read_volatile(addr_of!((*sk).src_ip4))),
            Family::V6 => Addr::v6([
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ]),
        }
    }
}

#[inline(always)]
fn user_addr(ctx: &SockAddrContext, family: Family) -> Addr {
    let sa = ctx.sock_addr;
    // SAFETY: 4-byte loads of ctx fields.
    unsafe {
        match family {
            Family::V4 => Addr::v4(read_volatile(addr_of!((*sa).user_ip4))),
            Family::V6 => Addr::v6([
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]),
        }
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: 4-byte load; the port sits in the low 16 bits in network order.
    u16::from_be(unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) } as u16)
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, family: Family, addr: &Addr, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier only accepts 4-byte stores into these fields.
    unsafe {
        match family {
            Family::V4 => write_volatile(addr_of_mut!((*sa).user_ip4), addr.words[3]),
            Family::V6 => {
                write_volatile(addr_of_mut!((*sa).user_ip6[0]), addr.words[0]);
                write_volatile(addr_of_mut!((*sa).user_ip6[1]), addr.words[1]);
                write_volatile(addr_of_mut!((*sa).user_ip6[2]), addr.words[2]);
                write_volatile(addr_of_mut!((*sa).user_ip6[3]), addr.words[3]);
            }
        }
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

/// What happens to a connection or datagram from an enrolled pod's app.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Left alone, for this reason.
    Exempt(Decision),
    /// DNS: sent to ztunnel's 15053 on loopback.
    Dns,
    /// Outbound TCP: marked, so that it is routed to ztunnel's 15001.
    Outbound,
    /// UDP other than DNS: not captured at all, like upstream.
    Ignore,
}

#[inline(always)]
fn action(pod: &PodConfig, transport: Transport, dst: &Addr, port: u16) -> Action {
    // Anything that stays in the pod is left alone (upstream: `! -d 127.0.0.1 -o lo`).
    if dst.is_unspecified() || pod.is_local(dst) {
        return Action::Exempt(Decision::ExemptLocal);
    }
    if !dst.is_v4() && pod.flags & POD_NO_IPV6 != 0 {
        return Action::Exempt(Decision::ExemptIpv6Off);
    }
    if port == DNS_PORT && pod.flags & POD_DNS_CAPTURE != 0 {
        return Action::Dns;
    }
    match transport {
        Transport::Tcp => Action::Outbound,
        Transport::Udp => Action::Ignore,
    }
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, family: Family) {
    let Some(transport) = transport(ctx) else {
        return;
    };
    let netns = netns(ctx);
    // SAFETY: read-only use of a map value.
    let Some(pod) = (unsafe { PODS.get(netns) }) else {
        return;
    };
    let dst = user_addr(ctx, family);
    let port = user_port(ctx);
    let mark = mark(ctx);
    let conn = || Conn {
        netns,
        pod_addr: Addr::default(),
        src: bound_addr(ctx, family),
        dst,
        sport: 0,
        dport: port,
        ifindex: 0,
    };
    if mark & MARK_MASK == ZTUNNEL_MARK {
        if transport == Transport::Tcp && is_return_path(ctx, family, pod, &dst) {
            if set_reply_mark(ctx.as_ptr(), mark) {
                bump(Counter::ReplyMarked);
            }
            trace(Decision::ReplyMarked, conn);
        } else {
            trace(Decision::ExemptZtunnel, conn);
        }
        return;
    }
    match action(pod, transport, &dst, port) {
        Action::Exempt(why) => trace(why, conn),
        Action::Ignore => {}
        Action::Dns => {
            remember_connected_dns(ctx, &dst, port);
            set_user_addr(ctx, family, &dst.loopback_like(), PORT_DNS);
            bump(match transport {
                Transport::Tcp => Counter::DnsTcpRedirected,
                Transport::Udp => Counter::DnsUdpRedirected,
            });
            trace(Decision::DnsRedirected, conn);
        }
        Action::Outbound => {
            if set_reply_mark(ctx.as_ptr(), mark) {
                bump(Counter::OutboundRedirected);
                trace(Decision::OutboundMarked, conn);
                debug!(ctx, "outbound to port {} marked for ztunnel", port);
            }
        }
    }
}

/// ztunnel connecting to the app with a client's address as source (bound, IP_TRANSPARENT):
/// the destination is the pod, the source is not.
#[inline(always)]
fn is_return_path(ctx: &SockAddrContext, family: Family, pod: &PodConfig, dst: &Addr) -> bool {
    if !pod.has_ip(dst) {
        return false;
    }
    let src = bound_addr(ctx, family);
    !src.is_unspecified() && !pod.is_local(&src)
}

#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, family: Family) {
    // Only unconnected UDP sends reach this hook; TCP DNS is handled at connect.
    if transport(ctx) != Some(Transport::Udp) {
        return;
    }
    let netns = netns(ctx);
    // SAFETY: read-only use of a map value.
    let Some(pod) = (unsafe { PODS.get(netns) }) else {
        return;
    };
    if mark(ctx) & MARK_MASK == ZTUNNEL_MARK {
        return;
    }
    let dst = user_addr(ctx, family);
    let port = user_port(ctx);
    if action(pod, Transport::Udp, &dst, port) != Action::Dns {
        return;
    }
    remember_sent_dns(ctx, &dst, port);
    set_user_addr(ctx, family, &dst.loopback_like(), PORT_DNS);
    bump(Counter::DnsUdpRedirected);
    trace(Decision::DnsRedirected, || Conn {
        netns,
        pod_addr: Addr::default(),
        src: Addr::default(),
        dst,
        sport: 0,
        dport: port,
        ifindex: 0,
    });
}

#[inline(always)]
fn dns_dests(ctx: &SockAddrContext) -> *mut DnsDests {
    // SAFETY: the helper reads the socket of this context; a new entry starts zeroed.
    unsafe { DNS_DESTS.get_or_insert_ptr_mut(ctx, None) }
}

#[inline(always)]
fn endpoint(addr: &Addr, port: u16) -> Endpoint {
    Endpoint {
        addr: *addr,
        port,
        _pad: 0,
    }
}

#[inline(always)]
fn remember_connected_dns(ctx: &SockAddrContext, dst: &Addr, port: u16) {
    let d = dns_dests(ctx);
    // Without storage the app would see ztunnel's address as the server; DNS still works.
    if !d.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe { (*d).connected = endpoint(dst, port) };
    }
}

/// Appends to the socket's queue of asked servers, forgetting the oldest when it is full.
#[inline(always)]
fn remember_sent_dns(ctx: &SockAddrContext, dst: &Addr, port: u16) {
    const MASK: u32 = DNS_DESTS_LEN as u32 - 1;
    let d = dns_dests(ctx);
    if d.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; indexes are masked into the array.
    unsafe {
        let d = &mut *d;
        if d.len as usize >= DNS_DESTS_LEN {
            d.head = (d.head + 1) & MASK;
            d.len = DNS_DESTS_LEN as u32 - 1;
        }
        let slot = ((d.head + d.len) & MASK) as usize;
        if slot < DNS_DESTS_LEN {
            d.sent[slot] = endpoint(dst, port);
        }
        d.len += 1;
    }
}

/// Which remembered destination a DNS reply or peer name stands for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// getpeername: the connected destination.
    Connected,
    /// recvmsg: the oldest unanswered query's server, else the connected one, else the last.
    NextReply,
}

/// For getpeername and recvmsg: if the peer is ztunnel's DNS port, show the server asked.
#[inline(always)]
fn restore_dns_peer(ctx: &SockAddrContext, family: Family, take: Take) -> bool {
    const MASK: u32 = DNS_DESTS_LEN as u32 - 1;
    if user_port(ctx) != PORT_DNS || !user_addr(ctx, family).is_loopback() {
        return false;
    }
    // SAFETY: the helper reads the socket of this context.
    let d = unsafe { DNS_DESTS.get_ptr_mut(ctx) };
    if d.is_null() {
        return false;
    }
    // SAFETY: non-null storage of this socket; indexes are masked into the array.
    let peer = unsafe {
        let d = &mut *d;
        let head = (d.head & MASK) as usize;
        if take == Take::NextReply && d.len > 0 && head < DNS_DESTS_LEN {
            d.last = d.sent[head];
            d.head = (d.head + 1) & MASK;
            d.len -= 1;
            d.last
        } else if d.connected.port != 0 {
            d.connected
        } else if take == Take::NextReply {
            d.last
        } else {
            return false;
        }
    };
    // A v4 socket can only show a v4 server; a v6 one may have asked a v4-mapped one.
    if peer.port == 0 || (family == Family::V4 && !peer.addr.is_v4()) {
        return false;
    }
    set_user_addr(ctx, family, &peer.addr, peer.port);
    true
}
