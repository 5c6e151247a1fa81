//! sk_msg on the acceleration sockhash: bytes an app socket sends to its ztunnel peer (or back)
//! go straight into the peer's receive queue, skipping TCP/IP on `lo`.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use aya_log_ebpf::debug;
use sluice_common::{Counter, SockKey};

use crate::{
    counters::bump,
    maps::{NO_ACCEL, SOCKS},
    sock_tuple::sock_key,
};

#[sk_msg]
pub fn sl_sk_msg(ctx: SkMsgContext) -> u32 {
    let Some(key) = msg_key(&ctx) else {
        return SK_PASS;
    };
    // SAFETY: read-only lookup.
    if unsafe { NO_ACCEL.get(key) }.is_some() {
        return SK_PASS;
    }
    let mut peer = key.reversed();
    // A failed redirect (peer not in the map, e.g. not established yet) leaves no redirect
    // target, and SK_PASS then means "the normal way". That socket keeps the normal way for
    // good, so that none of its later bytes can overtake earlier ones.
    if SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) as u32 != SK_PASS {
        let _ = NO_ACCEL.insert(key, 1, u64::from(BPF_ANY));
        bump(Counter::AccelFallback);
        debug!(
            &ctx,
            "acceleration: peer socket not in the map; normal path for good"
        );
        return SK_PASS;
    }
    bump(Counter::MessagesAccelerated);
    SK_PASS
}

/// The sending socket's netns and 4-tuple.
#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    // SAFETY: helper valid for sk_msg programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    sock_key!(ctx.msg, netns)
}
