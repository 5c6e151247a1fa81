//! cgroup sock_addr programs: the app's side of redirection.
//!
//! `connect` sends outbound TCP to ztunnel's 15001 and DNS to 15053 and remembers the original
//! destination on the socket; `sendmsg` does the same for unconnected DNS datagrams;
//! `getpeername` and `recvmsg` give the app back the address it asked for.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use sluice_common::{
    Addr, Counter, DNS_PORT, MARK_MASK, OrigDst, POD_DNS_CAPTURE, POD_NO_IPV6, PORT_DNS,
    PORT_OUTBOUND, PodConfig, ZTUNNEL_MARK,
};

use crate::{
    counters::bump,
    maps::{PODS, SOCK_ORIG},
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
    if restore_peer(&ctx, Family::V4) {
        bump(Counter::RecvmsgRewritten);
    }
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sl_recvmsg6(ctx: SockAddrContext) -> i32 {
    if restore_peer(&ctx, Family::V6) {
        bump(Counter::RecvmsgRewritten);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sl_getpeer4(ctx: SockAddrContext) -> i32 {
    if restore_peer(&ctx, Family::V4) {
        bump(Counter::PeernameRewritten);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sl_getpeer6(ctx: SockAddrContext) -> i32 {
    if restore_peer(&ctx, Family::V6) {
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

/// The enrolled pod this socket lives in, unless the socket is ztunnel's own.
#[inline(always)]
fn enrolled_pod(ctx: &SockAddrContext) -> Option<&'static PodConfig> {
    // SAFETY: helper valid for sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use of a map value.
    let pod = unsafe { PODS.get(netns) }?;
    // SAFETY: sock_addr programs always have a socket.
    let mark = unsafe { read_volatile(addr_of!((*(*ctx.sock_addr).__bindgen_anon_1.sk).mark)) };
    if mark & MARK_MASK == ZTUNNEL_MARK {
        return None;
    }
    Some(pod)
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

/// Where a connection or datagram from an enrolled pod goes, if anywhere but its destination.
#[inline(always)]
fn redirect_target(
    pod: &PodConfig,
    transport: Transport,
    dst: &Addr,
    port: u16,
) -> Option<(Addr, u16, Counter)> {
    // Anything that stays on the pod's `lo` is left alone (upstream: `! -d 127.0.0.1 -o lo`).
    if dst.is_unspecified() || pod.is_local(dst) {
        return None;
    }
    if !dst.is_v4() && pod.flags & POD_NO_IPV6 != 0 {
        return None;
    }
    if port == DNS_PORT && pod.flags & POD_DNS_CAPTURE != 0 {
        // ztunnel's DNS proxy listens on 127.0.0.1 and ::1 only.
        let counter = match transport {
            Transport::Tcp => Counter::DnsTcpRedirected,
            Transport::Udp => Counter::DnsUdpRedirected,
        };
        return Some((dst.loopback_like(), PORT_DNS, counter));
    }
    match transport {
        // Redirecting to the pod IP (rather than 127.0.0.1) keeps what iptables REDIRECT showed
        // ztunnel: the pod IP as the peer.
        Transport::Tcp => {
            let to = pod.first_ip_like(dst).unwrap_or(dst.loopback_like());
            Some((to, PORT_OUTBOUND, Counter::OutboundRedirected))
        }
        Transport::Udp => None,
    }
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, family: Family) {
    if let Some(transport) = transport(ctx) {
        redirect(ctx, family, transport);
    }
}

#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, family: Family) {
    // Only UDP reaches this hook; TCP DNS is handled at connect.
    if let Some(Transport::Udp) = transport(ctx) {
        redirect(ctx, family, Transport::Udp);
    }
}

/// Rewrites the destination of a connect or sendmsg of an enrolled pod, if it must go to ztunnel.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, family: Family, transport: Transport) {
    let Some(pod) = enrolled_pod(ctx) else { return };
    let dst = user_addr(ctx, family);
    let port = user_port(ctx);
    if let Some((to, to_port, counter)) = redirect_target(pod, transport, &dst, port) {
        let orig = OrigDst {
            addr: dst,
            port,
            _pad: 0,
        };
        remember_and_rewrite(ctx, family, orig, &to, to_port, counter);
    }
}

#[inline(always)]
fn remember_and_rewrite(
    ctx: &SockAddrContext,
    family: Family,
    mut orig: OrigDst,
    to: &Addr,
    to_port: u16,
    counter: Counter,
) {
    // SAFETY: the helper reads the socket of this context.
    let slot = unsafe { SOCK_ORIG.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
    if slot.is_null() {
        // Out of memory for socket storage: still redirect (never leak traffic past ztunnel);
        // the app would then see ztunnel's address as its peer.
        bump(Counter::FlowTableFull);
    } else {
        // SAFETY: non-null storage of this socket.
        unsafe { *slot = orig };
    }
    set_user_addr(ctx, family, to, to_port);
    bump(counter);
    debug!(
        ctx,
        "redirected to port {} (original port {})", to_port, orig.port
    );
}

/// For getpeername and recvmsg: if the peer is where we sent this socket, show the original.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, family: Family) -> bool {
    let port = user_port(ctx);
    if port != PORT_OUTBOUND && port != PORT_DNS {
        return false;
    }
    // SAFETY: the helper reads the socket of this context.
    let slot = unsafe { SOCK_ORIG.get_ptr_mut(ctx) };
    if slot.is_null() {
        return false;
    }
    // SAFETY: non-null storage of this socket.
    let orig = unsafe { *slot };
    // A v6 socket may have asked for a v4-mapped address; a v4 socket only for v4.
    if family == Family::V4 && !orig.addr.is_v4() {
        return false;
    }
    set_user_addr(ctx, family, &orig.addr, orig.port);
    true
}
