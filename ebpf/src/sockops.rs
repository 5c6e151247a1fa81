//! cgroup sockops:
//! - listeners on 15001/15006/15008 in enrolled pods go into `SL_LISTENERS`, where `sk_lookup`
//!   finds ztunnel's;
//! - TCP connects by sockets in the node's netns are remembered (`SL_NODE_CONNS`) by their
//!   source until established or closed: those SYNs are exempt from inbound capture, exactly
//!   like upstream's `-m owner --socket-exists`;
//! - likewise ztunnel's connects to an app from a client's address (`SL_RETURN_CONNS`, by
//!   4-tuple): to `sk_lookup` their SYN looks like any inbound one;
//! - ztunnel's side of an app's captured outbound connection gets the reply mark, so that
//!   the kernel's own answers to it (the app's TIME_WAIT ACKs, resets) go back over `lo`;
//! - with acceleration on, app↔ztunnel sockets of enrolled pods go into the sockhash.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use sluice_common::{
    Counter, Endpoint, GLOBAL_ACCELERATE, ListenerKey, MARK_MASK, PORT_DNS, PORT_HBONE,
    PORT_INBOUND, PORT_OUTBOUND, REPLY_MARK, SockKey, ZTUNNEL_MARK,
};

use crate::{
    counters::bump,
    maps::{LISTENERS, NODE_CONNS, PODS, RETURN_CONNS, SOCKS, global_config},
    reply_mark::set_reply_mark,
    sock_tuple::sock_key,
};

#[sock_ops]
pub fn sl_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => register_listener(&ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => connect_started(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            connect_done(&ctx);
            accelerate(&ctx);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            mark_outbound_accept(&ctx);
            accelerate(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if new_state(&ctx) == BPF_TCP_CLOSE => connect_done(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn netns(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper valid for sockops programs.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The socket's netns and 4-tuple, as seen from the socket.
#[inline(always)]
fn key(ctx: &SockOpsContext, netns: u64) -> Option<SockKey> {
    sock_key!(ctx.ops, netns)
}

/// For STATE_CB: the new state.
#[inline(always)]
fn new_state(ctx: &SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: 4-byte load of the ctx's args (old state, new state).
    unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_1.args[1])) }
}

/// A listener on one of ztunnel's ports in an enrolled pod. Its mark is not looked at here:
/// ztunnel may set it after `listen`, so `sk_lookup` checks it when a connection arrives.
#[inline(always)]
fn register_listener(ctx: &SockOpsContext) {
    let netns = netns(ctx);
    // SAFETY: read-only lookup.
    if unsafe { PODS.get(netns) }.is_none() {
        return;
    }
    // SAFETY: 4-byte ctx load; host byte order.
    let port = unsafe { read_volatile(addr_of!((*ctx.ops).local_port)) };
    if port != u32::from(PORT_OUTBOUND)
        && port != u32::from(PORT_INBOUND)
        && port != u32::from(PORT_HBONE)
    {
        return;
    }
    let mut key = ListenerKey {
        netns,
        port,
        _pad: 0,
    };
    // The newest listener on a port wins (a restarted ztunnel's replaces the old one's entry;
    // the kernel removes a closed socket's own entry only).
    // SAFETY: the ctx is a sock_ops of a full, listening socket.
    let _ = LISTENERS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
}

/// A connect whose SYN `sk_lookup` must let through to the app.
enum Exempt {
    /// By a socket in the node's netns: keyed by its source.
    Node(Endpoint),
    /// ztunnel's, to the app from a client's address: keyed by its 4-tuple.
    Return(SockKey),
}

/// Classifies a connecting (or connected) socket; its source port is known by now.
#[inline(always)]
fn exempt_connect(ctx: &SockOpsContext) -> Option<Exempt> {
    let node = global_config().node_netns;
    let netns = netns(ctx);
    if node != 0 && netns == node {
        let k = key(ctx, netns)?;
        return Some(Exempt::Node(Endpoint {
            addr: k.local,
            port: k.local_port,
            _pad: 0,
        }));
    }
    // SAFETY: read-only lookup.
    let pod = unsafe { PODS.get(netns) }?;
    if sk_mark(ctx)? != REPLY_MARK {
        return None;
    }
    let k = key(ctx, netns)?;
    // The app's own outbound sockets carry the mark too, from a pod address.
    (!pod.is_local(&k.local)).then_some(Exempt::Return(k))
}

/// The socket's mark, our bits only.
#[inline(always)]
fn sk_mark(ctx: &SockOpsContext) -> Option<u32> {
    full_mark(ctx).map(|m| m & MARK_MASK)
}

#[inline(always)]
fn full_mark(ctx: &SockOpsContext) -> Option<u32> {
    // SAFETY: 8-byte load of the ctx's socket pointer (may be null).
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: bpf_sock field of a non-null socket.
    Some(unsafe { read_volatile(addr_of!((*sk).mark)) })
}

/// ztunnel's side of an app's captured outbound connection (accepted on 15001: its local
/// address is the original destination, its peer the pod) inherits its listener's 0x539, not
/// the SYN's 0x111 (`inet_request_mark` prefers the listener's mark). Its own packets reach
/// the app all the same, but the kernel's stateless answers to them (the app's TIME_WAIT
/// ACK, a reset) reflect that mark (`fwmark_reflect`) and would be routed towards the real
/// destination instead of back over `lo`: ztunnel's socket then never gets its last ACK and
/// retransmits its FIN from LAST_ACK, the real destination's reset kills the app's TIME_WAIT,
/// and the app's next connect from that port to that destination meets the stale socket and
/// loses its SYNs. With 0x111 those answers take the pod's rule back to `lo`, as upstream's
/// connmark restore sends them.
#[inline(always)]
fn mark_outbound_accept(ctx: &SockOpsContext) {
    let netns = netns(ctx);
    // SAFETY: read-only lookup.
    let Some(pod) = (unsafe { PODS.get(netns) }) else {
        return;
    };
    let Some(mark) = full_mark(ctx) else {
        return;
    };
    if mark & MARK_MASK != ZTUNNEL_MARK {
        return;
    }
    let Some(k) = key(ctx, netns) else {
        return;
    };
    if pod.is_local(&k.local) || !pod.is_local(&k.remote) {
        return;
    }
    // It cannot fail for a full TCP socket and SO_MARK.
    let _ = set_reply_mark(ctx.ops.cast(), mark);
}

#[inline(always)]
fn connect_started(ctx: &SockOpsContext) {
    let recorded = match exempt_connect(ctx) {
        Some(Exempt::Node(src)) => NODE_CONNS.insert(src, 1, u64::from(BPF_ANY)).is_ok(),
        Some(Exempt::Return(k)) => RETURN_CONNS.insert(k, 1, u64::from(BPF_ANY)).is_ok(),
        None => false,
    };
    if recorded {
        // Tells us when a connect that never establishes is closed.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// The SYN went through (or never will): the exemption ends, and so do state callbacks.
#[inline(always)]
fn connect_done(ctx: &SockOpsContext) {
    match exempt_connect(ctx) {
        Some(Exempt::Node(src)) => {
            let _ = NODE_CONNS.remove(src);
        }
        Some(Exempt::Return(k)) => {
            let _ = RETURN_CONNS.remove(k);
        }
        None => return,
    }
    let flags = ctx.cb_flags();
    if flags & BPF_SOCK_OPS_STATE_CB_FLAG != 0 {
        let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn accelerate(ctx: &SockOpsContext) {
    if global_config().flags & GLOBAL_ACCELERATE == 0 {
        return;
    }
    let netns = netns(ctx);
    // SAFETY: read-only lookup.
    if unsafe { PODS.get(netns) }.is_none() {
        return;
    }
    let Some(mut key) = key(ctx, netns) else {
        return;
    };
    let Some(mark) = sk_mark(ctx) else {
        return;
    };
    if !is_app_ztunnel_pair(&key, mark) {
        return;
    }
    // SAFETY: the ctx is a sock_ops of a full, established socket.
    if SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))
        .is_ok()
    {
        bump(Counter::SocketsAccelerated);
    }
}

/// Both ends of these connections are sockets in this netns: the app and ztunnel.
#[inline(always)]
fn is_app_ztunnel_pair(key: &SockKey, mark: u32) -> bool {
    // REPLY_MARK is on exactly the four sockets of app↔ztunnel connections: the app's outbound
    // socket (set at connect) and ztunnel's accepted side of it (set at accept, above),
    // ztunnel's connection to the app from a client's address (set at connect) and the app's
    // accepted side of it (tcp_fwmark_accept copies the SYN's mark).
    if mark == REPLY_MARK {
        return true;
    }
    // DNS over TCP, rewritten to ztunnel's 15053 on loopback.
    (key.remote_port == PORT_DNS && key.remote.is_loopback())
        || (key.local_port == PORT_DNS && key.local.is_loopback())
}
