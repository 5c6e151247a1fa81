//! cgroup sockops: records each redirected connection's 4-tuple once its source port exists
//! (for SO_ORIGINAL_DST), and puts app↔ztunnel sockets of enrolled pods into the acceleration
//! sockhash when acceleration is on.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use sluice_common::{
    Counter, GLOBAL_ACCELERATE, MARK_MASK, OrigDst, PORT_DNS, PORT_OUTBOUND, PodConfig, REPLY_MARK,
    SockKey, ZTUNNEL_MARK,
};

use crate::{
    counters::bump,
    maps::{FLOW_ORIG, PODS, SOCK_ORIG, SOCKS, global_flags},
    sock_tuple::sock_key,
};

#[sock_ops]
pub fn sl_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record_flow(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            accelerate(&ctx)
        }
        _ => {}
    }
    1
}

/// The socket's netns and 4-tuple, as seen from the socket.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext) -> Option<SockKey> {
    // SAFETY: helper valid for sockops programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    sock_key!(ctx.ops, netns)
}

#[inline(always)]
fn sk_of(ctx: &SockOpsContext) -> *mut aya_ebpf::bindings::bpf_sock {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: 8-byte load of the ctx's socket pointer (may be null).
    unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) }
}

/// At connect, the source port is assigned and the SYN not yet sent: store the original
/// destination under the full 4-tuple before ztunnel can accept.
#[inline(always)]
fn record_flow(ctx: &SockOpsContext) {
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    // SAFETY: SOCK_ORIG is an sk_storage map; sk is a full socket here.
    let orig = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_ORIG).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    } as *const OrigDst;
    if orig.is_null() {
        return;
    }
    let Some(key) = sock_key(ctx) else { return };
    // SAFETY: non-null storage of this socket.
    let orig = unsafe { *orig };
    if FLOW_ORIG.insert(key, orig, u64::from(BPF_ANY)).is_err() {
        bump(Counter::FlowTableFull);
    }
}

#[inline(always)]
fn accelerate(ctx: &SockOpsContext) {
    if global_flags() & GLOBAL_ACCELERATE == 0 {
        return;
    }
    let Some(mut key) = sock_key(ctx) else { return };
    // SAFETY: read-only map value.
    let Some(pod) = (unsafe { PODS.get(key.netns) }) else {
        return;
    };
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    // SAFETY: bpf_sock field.
    let mark = unsafe { read_volatile(addr_of!((*sk).mark)) } & MARK_MASK;
    if !is_app_ztunnel_pair(pod, &key, mark) {
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
fn is_app_ztunnel_pair(pod: &PodConfig, key: &SockKey, mark: u32) -> bool {
    // app → ztunnel's outbound or DNS listener, and ztunnel's accepted side of it.
    let to_ztunnel = key.remote_port == PORT_OUTBOUND || key.remote_port == PORT_DNS;
    let at_ztunnel = key.local_port == PORT_OUTBOUND || key.local_port == PORT_DNS;
    if (to_ztunnel && pod.is_local(&key.remote)) || (at_ztunnel && pod.is_local(&key.local)) {
        return true;
    }
    // ztunnel → app (inbound delivery, from the client's address), and the app's accepted side,
    // which got REPLY_MARK from the SYN.
    (mark == ZTUNNEL_MARK && pod.is_local(&key.remote)) || mark == REPLY_MARK
}
