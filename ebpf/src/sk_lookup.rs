//! `sk_lookup`, one link per enrolled pod netns: which socket gets a new TCP connection.
//!
//! Runs when the kernel looks for a listener (after reassembly, for every interface of the
//! netns, including ones added later). Upstream's TPROXY rules, as a lookup:
//!
//! - arriving on `lo` for an address outside the pod: an app's outbound SYN that its mark routed
//!   here (see `sock_addr.rs`) → ztunnel's 15001. The accepted socket's local address is the
//!   original destination, as with TPROXY.
//! - for an address of the pod, from elsewhere: from the pod itself, or ztunnel's connection to
//!   the app from a client's address (the return path) → the app; opened by a node process →
//!   the app (kubelet probes, upstream's `--socket-exists`); port 15008 → ztunnel's 15008;
//!   bypassed pods and IPv6 with IPv6 capture off → the app; anything else → ztunnel's 15006.
//!
//! (The interface tells `lo` apart only for addresses outside the pod: a connection to one of
//! the pod's own addresses arrives with that address's interface, wherever it comes from.)
//!
//! Only a listener marked 0x539 counts as ztunnel's (it marks its listeners, maybe after
//! `listen`, so the mark is read now). Without one the SYN is dropped, and counted: nobody else
//! may receive captured traffic. Inbound it is dropped silently, like TPROXY does, so that the
//! client retries until ztunnel is there (a pod just enrolled, ztunnel restarting): it is handed
//! to the agent's black hole, a listener whose accept queue is full. Outbound it is `SK_DROP`:
//! the kernel's reset would have the original destination as its source, which the pod does not
//! own, so it is not delivered and the app's TCP resends its SYN until ztunnel listens. Inbound
//! SYNs get a reset from `SK_DROP` only while no agent runs (no black hole).
//! `SK_PASS` without a socket lets the next program, then the normal lookup, decide.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        bpf_sock,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use sluice_common::{
    AF_INET, AF_INET6, Addr, Counter, Decision, Endpoint, LOOPBACK_IFINDEX, ListenerKey, MARK_MASK,
    POD_BYPASS_INBOUND, POD_NO_IPV6, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND, PodAddr, SockKey,
    ZTUNNEL_MARK,
};

use crate::{
    counters::bump,
    maps::{LISTENERS, NODE_CONNS, POD_ADDRS, RETURN_CONNS},
    trace::{Conn, trace},
};

const IPPROTO_TCP: u32 = 6;

/// The lookup, read once.
struct Lookup {
    local: Addr,
    remote: Addr,
    local_port: u16,
    remote_port: u16,
    ifindex: u32,
}

#[sk_lookup]
pub fn sl_sk_lookup(ctx: SkLookupContext) -> u32 {
    let Some(l) = read(&ctx) else {
        return SK_PASS;
    };
    if l.ifindex == LOOPBACK_IFINDEX {
        from_inside(&ctx, &l)
    } else {
        from_outside(&ctx, &l)
    }
}

#[inline(always)]
fn read(ctx: &SkLookupContext) -> Option<Lookup> {
    let c = ctx.lookup;
    // Every field is read with its own constant-offset load, then the family picks: the
    // verifier refuses a context access at a computed offset.
    // SAFETY: loads of readable context fields (remote_port: 2 bytes, network order).
    let (protocol, family, l4, r4, l6, r6, local_port, remote_port, ifindex) = unsafe {
        (
            read_volatile(addr_of!((*c).protocol)),
            read_volatile(addr_of!((*c).family)),
            read_volatile(addr_of!((*c).local_ip4)),
            read_volatile(addr_of!((*c).remote_ip4)),
            [
                read_volatile(addr_of!((*c).local_ip6[0])),
                read_volatile(addr_of!((*c).local_ip6[1])),
                read_volatile(addr_of!((*c).local_ip6[2])),
                read_volatile(addr_of!((*c).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*c).remote_ip6[0])),
                read_volatile(addr_of!((*c).remote_ip6[1])),
                read_volatile(addr_of!((*c).remote_ip6[2])),
                read_volatile(addr_of!((*c).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*c).local_port)),
            read_volatile(addr_of!((*c).remote_port)),
            read_volatile(addr_of!((*c).ingress_ifindex)),
        )
    };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let (local, remote) = if family == u32::from(AF_INET) {
        (Addr::v4(l4), Addr::v4(r4))
    } else if family == u32::from(AF_INET6) {
        (Addr::v6(l6), Addr::v6(r6))
    } else {
        return None;
    };
    Some(Lookup {
        local,
        remote,
        local_port: local_port as u16,
        remote_port: u16::from_be(remote_port),
        ifindex,
    })
}

#[inline(always)]
fn pod_of(addr: &Addr) -> Option<PodAddr> {
    // SAFETY: read-only copy of a map value.
    unsafe { POD_ADDRS.get(addr) }.copied()
}

/// On the pod's `lo`: connections inside the pod pass; the app's marked outbound SYNs (for an
/// address outside the pod, from a pod address) go to 15001.
#[inline(always)]
fn from_inside(ctx: &SkLookupContext, l: &Lookup) -> u32 {
    if l.local.is_loopback() {
        return SK_PASS;
    }
    let Some(pod) = pod_of(&l.remote) else {
        // Not from an address of an enrolled pod (a socket bound to 127.0.0.1, say): nothing
        // may receive it in place of ztunnel, and there is no telling whose ztunnel it is.
        return drop(ctx, l, &l.remote, 0, Decision::DroppedUnknownAddress);
    };
    // Another pod's address is outside this pod like any other.
    if pod_of(&l.local).is_some_and(|p| p.netns == pod.netns) {
        return SK_PASS;
    }
    deliver(ctx, l, &l.remote, &pod, PORT_OUTBOUND, Decision::ToOutbound)
}

/// For an address of the pod: inbound capture, with upstream's exemptions.
#[inline(always)]
fn from_outside(ctx: &SkLookupContext, l: &Lookup) -> u32 {
    let Some(pod) = pod_of(&l.local) else {
        return drop(ctx, l, &l.local, 0, Decision::DroppedUnknownAddress);
    };
    // Connections to the pod's own address made inside the pod arrive with that address's
    // interface too. From one of its own addresses: the app itself (a packet from outside with
    // such a source could never complete the handshake: the answer stays in the pod).
    if pod_of(&l.remote).is_some_and(|p| p.netns == pod.netns) {
        return pass(l, &pod, Decision::ExemptLocal);
    }
    // From a client's address, by ztunnel (its socket is in the pod): the return path.
    let ztunnel_conn = SockKey {
        netns: pod.netns,
        local: l.remote,
        remote: l.local,
        local_port: l.remote_port,
        remote_port: l.local_port,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { RETURN_CONNS.get(ztunnel_conn) }.is_some() {
        return pass(l, &pod, Decision::ExemptZtunnel);
    }
    let from_node = Endpoint {
        addr: l.remote,
        port: l.remote_port,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { NODE_CONNS.get(from_node) }.is_some() {
        bump(Counter::NodeExempt);
        return pass(l, &pod, Decision::ExemptNode);
    }
    if l.local_port == PORT_HBONE {
        return deliver(ctx, l, &l.local, &pod, PORT_HBONE, Decision::ToHbone);
    }
    if pod.flags & POD_BYPASS_INBOUND != 0 {
        return pass(l, &pod, Decision::ExemptBypass);
    }
    if !l.local.is_v4() && pod.flags & POD_NO_IPV6 != 0 {
        return pass(l, &pod, Decision::ExemptIpv6Off);
    }
    deliver(ctx, l, &l.local, &pod, PORT_INBOUND, Decision::ToInbound)
}

/// Hands the connection to ztunnel's listener on `port` in the pod, or drops it if ztunnel has
/// none.
#[inline(always)]
fn deliver(
    ctx: &SkLookupContext,
    l: &Lookup,
    pod_addr: &Addr,
    pod: &PodAddr,
    port: u16,
    decision: Decision,
) -> u32 {
    if !assign_ztunnel_listener(ctx, pod.netns, port) {
        return drop(ctx, l, pod_addr, pod.netns, Decision::DroppedNoListener);
    }
    bump(match port {
        PORT_OUTBOUND => Counter::OutboundRedirected,
        PORT_HBONE => Counter::HboneDelivered,
        _ => Counter::InboundRedirected,
    });
    trace(decision, || conn(l, pod_addr, pod.netns));
    SK_PASS
}

#[inline(always)]
fn assign_ztunnel_listener(ctx: &SkLookupContext, netns: u64, port: u16) -> bool {
    let key = ListenerKey {
        netns,
        port: u32::from(port),
        _pad: 0,
    };
    assign_listener(ctx, &key, true)
}

/// Hands the SYN to a listener of `SL_LISTENERS`, if there is one (and it is ztunnel's, when
/// `ztunnel_only`).
#[inline(always)]
fn assign_listener(ctx: &SkLookupContext, key: &ListenerKey, ztunnel_only: bool) -> bool {
    // SAFETY: a sockhash lookup from sk_lookup returns a referenced socket (or null), which is
    // released below on every path.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::from_ref(&LISTENERS).cast_mut().cast(),
            core::ptr::from_ref(key).cast(),
        )
        .cast::<bpf_sock>();
        if sk.is_null() {
            return false;
        }
        let ok = (!ztunnel_only || read_volatile(addr_of!((*sk).mark)) & MARK_MASK == ZTUNNEL_MARK)
            && bpf_sk_assign(ctx.as_ptr().cast(), sk.cast(), 0) == 0;
        bpf_sk_release(sk.cast());
        ok
    }
}

#[inline(always)]
fn pass(l: &Lookup, pod: &PodAddr, decision: Decision) -> u32 {
    trace(decision, || conn(l, &l.local, pod.netns));
    SK_PASS
}

/// Drops the SYN: silently if it came from outside the pod and the black hole is there,
/// else with a reset.
#[inline(always)]
fn drop(ctx: &SkLookupContext, l: &Lookup, pod_addr: &Addr, netns: u64, why: Decision) -> u32 {
    let outbound = l.ifindex == LOOPBACK_IFINDEX;
    bump(match why {
        Decision::DroppedUnknownAddress => Counter::UnknownAddress,
        _ if outbound => Counter::OutboundNoListener,
        _ => Counter::InboundNoListener,
    });
    trace(why, || conn(l, pod_addr, netns));
    let black_hole = if l.local.is_v4() {
        ListenerKey::BLACK_HOLE_V4
    } else {
        ListenerKey::BLACK_HOLE_V6
    };
    if !outbound && assign_listener(ctx, &black_hole, false) {
        return SK_PASS;
    }
    SK_DROP
}

#[inline(always)]
fn conn(l: &Lookup, pod_addr: &Addr, netns: u64) -> Conn {
    Conn {
        netns,
        pod_addr: *pod_addr,
        src: l.remote,
        dst: l.local,
        sport: l.remote_port,
        dport: l.local_port,
        ifindex: l.ifindex,
    }
}
