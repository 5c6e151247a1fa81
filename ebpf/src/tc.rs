//! TC ingress programs, attached inside enrolled pods' network namespaces only.
//!
//! `sl_pod_ingress` (pod interfaces other than `lo`): TCP arriving for the pod is handed to
//! ztunnel's 15006 listener with `bpf_sk_assign`, like upstream's TPROXY rule: packets of existing
//! connections keep their socket, everything else goes to ztunnel. HBONE (15008), ztunnel-marked
//! packets and this node's own addresses (kubelet probes) pass untouched.
//!
//! `sl_lo_ingress` (the pod's `lo`): a SYN carrying ztunnel's mark is ztunnel connecting to the
//! app; it gets REPLY_MARK, which `tcp_fwmark_accept` copies onto the app's socket, so that the
//! app's replies to the (spoofed) client address are routed back to ztunnel.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple},
    helpers::generated::{bpf_sk_assign, bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use sluice_common::{
    Addr, Counter, MARK_MASK, PORT_HBONE, PORT_INBOUND, PROBE_SNAT_V4, REPLY_MARK, ZTUNNEL_MARK,
};

use crate::{
    counters::bump,
    maps::HOST_ADDRS,
    packet::{ETH_HLEN, Parsed, TcpPacket, parse},
};

const TCP_TIME_WAIT: u32 = 6;
const TCP_LISTEN: u32 = 10;

/// For interfaces with an Ethernet header (veth, macvlan, ipvlan).
#[classifier]
pub fn sl_pod_ingress(ctx: TcContext) -> i32 {
    pod_ingress(&ctx, ETH_HLEN, Families::Both)
}

/// For interfaces without a link-layer header (tun, wireguard, ipip).
#[classifier]
pub fn sl_pod_ingr_l3(ctx: TcContext) -> i32 {
    pod_ingress(&ctx, 0, Families::Both)
}

/// IPv4 only (the pod's IPv6 is not captured), Ethernet.
#[classifier]
pub fn sl_pod_ingr4(ctx: TcContext) -> i32 {
    pod_ingress(&ctx, ETH_HLEN, Families::V4Only)
}

/// IPv4 only, no link-layer header.
#[classifier]
pub fn sl_pod_ingr4_l3(ctx: TcContext) -> i32 {
    pod_ingress(&ctx, 0, Families::V4Only)
}

/// Which address families inbound redirection covers. A TC program has no per-pod config at
/// hand, so the choice is made by attaching one program or the other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Families {
    Both,
    V4Only,
}

#[classifier]
pub fn sl_lo_ingress(ctx: TcContext) -> i32 {
    let mark = skb_mark(&ctx);
    if mark & MARK_MASK != ZTUNNEL_MARK {
        return TC_ACT_OK;
    }
    if let Ok(Parsed::Tcp(pkt)) = parse(&ctx, ETH_HLEN)
        && pkt.is_syn()
    {
        ctx.set_mark((mark & !MARK_MASK) | REPLY_MARK);
        bump(Counter::ReplyMarked);
    }
    TC_ACT_OK
}

#[inline(always)]
fn pod_ingress(ctx: &TcContext, l3: usize, families: Families) -> i32 {
    let pkt = match parse(ctx, l3) {
        Ok(Parsed::Tcp(pkt)) if pkt.v6 && families == Families::V4Only => return TC_ACT_OK,
        Ok(Parsed::TcpFragment6) if families == Families::V4Only => return TC_ACT_OK,
        Ok(Parsed::Tcp(pkt)) => pkt,
        // A TCP fragment could reassemble into a SYN that reaches the app around ztunnel.
        Ok(Parsed::TcpFragment | Parsed::TcpFragment6) => return TC_ACT_SHOT,
        Ok(Parsed::Other) | Err(_) => return TC_ACT_OK,
    };
    if pkt.dport == PORT_HBONE
        || skb_mark(ctx) & MARK_MASK == ZTUNNEL_MARK
        || from_this_node(&pkt.src)
    {
        return TC_ACT_OK;
    }
    to_ztunnel(ctx, &pkt)
}

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: __sk_buff.mark is readable by TC programs.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn from_this_node(src: &Addr) -> bool {
    if src.is_v4() && src.words[3] == u32::from_ne_bytes(PROBE_SNAT_V4) {
        return true;
    }
    // SAFETY: read-only lookup.
    unsafe { HOST_ADDRS.get(src) }.is_some()
}

#[inline(always)]
fn tuple(pkt: &TcpPacket, dport: u16) -> (bpf_sock_tuple, u32) {
    // SAFETY: an all-zero tuple is valid.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the union member that matches the family.
    unsafe {
        if pkt.v6 {
            let v6 = &mut t.__bindgen_anon_1.ipv6;
            v6.saddr = pkt.src.words;
            v6.daddr = pkt.dst.words;
            v6.sport = pkt.sport.to_be();
            v6.dport = dport.to_be();
            (
                t,
                size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32,
            )
        } else {
            let v4 = &mut t.__bindgen_anon_1.ipv4;
            v4.saddr = pkt.src.words[3];
            v4.daddr = pkt.dst.words[3];
            v4.sport = pkt.sport.to_be();
            v4.dport = dport.to_be();
            (
                t,
                size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
            )
        }
    }
}

/// Like TPROXY: an existing (non-listening) socket for the 4-tuple keeps the packet; otherwise
/// ztunnel's listener gets it. A SYN that meets a TIME_WAIT socket is a new connection: left to
/// the kernel it would go to the app's listener, so it goes to ztunnel too. No listener means ztunnel is not serving this pod yet: drop, so
/// the client retries rather than reaching the app around ztunnel.
#[inline(always)]
fn to_ztunnel(ctx: &TcContext, pkt: &TcpPacket) -> i32 {
    let skb = ctx.as_ptr();
    let netns = BPF_F_CURRENT_NETNS as u64;
    let (mut t, len) = tuple(pkt, pkt.dport);
    // SAFETY: helper contract: tuple of `len` bytes; the returned socket is released.
    unsafe {
        let sk = bpf_skc_lookup_tcp(skb, &mut t, len, netns, 0);
        if !sk.is_null() {
            let state = (*sk).state;
            bpf_sk_release(sk.cast());
            if state != TCP_LISTEN && !(state == TCP_TIME_WAIT && pkt.is_syn()) {
                return TC_ACT_OK;
            }
        }
    }
    let (mut t, len) = tuple(pkt, PORT_INBOUND);
    // SAFETY: as above.
    unsafe {
        let listener = bpf_sk_lookup_tcp(skb, &mut t, len, netns, 0);
        if listener.is_null() {
            bump(Counter::InboundNoListener);
            debug!(
                ctx,
                "inbound to port {} dropped: ztunnel is not listening", pkt.dport
            );
            return TC_ACT_SHOT;
        }
        if (*listener).state != TCP_LISTEN {
            bpf_sk_release(listener.cast());
            bump(Counter::InboundNoListener);
            return TC_ACT_SHOT;
        }
        let assigned = bpf_sk_assign(skb, listener.cast(), 0);
        bpf_sk_release(listener.cast());
        if assigned != 0 {
            bump(Counter::InboundNoListener);
            return TC_ACT_SHOT;
        }
    }
    if pkt.is_syn() {
        bump(Counter::InboundRedirected);
    }
    TC_ACT_OK
}
