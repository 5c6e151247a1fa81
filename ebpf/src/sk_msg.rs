//! sk_msg on the acceleration sockhash: bytes an app socket sends to its ztunnel peer (or back)
//! go straight into the peer's receive queue, skipping TCP/IP on `lo`.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use aya_log_ebpf::debug;
use sluice_common::{AF_INET, AF_INET6, Addr, Counter, SockKey};

use crate::{
    counters::bump,
    maps::{NO_ACCEL, SOCKS},
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

/// The sending socket's netns and 4-tuple; constant-offset loads only (see sockops.rs).
#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    let m = ctx.msg;
    // SAFETY: 4-byte loads of readable sk_msg_md fields.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            read_volatile(addr_of!((*m).family)),
            read_volatile(addr_of!((*m).local_ip4)),
            read_volatile(addr_of!((*m).remote_ip4)),
            [
                read_volatile(addr_of!((*m).local_ip6[0])),
                read_volatile(addr_of!((*m).local_ip6[1])),
                read_volatile(addr_of!((*m).local_ip6[2])),
                read_volatile(addr_of!((*m).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*m).remote_ip6[0])),
                read_volatile(addr_of!((*m).remote_ip6[1])),
                read_volatile(addr_of!((*m).remote_ip6[2])),
                read_volatile(addr_of!((*m).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*m).local_port)),
            read_volatile(addr_of!((*m).remote_port)),
        )
    };
    let (local, remote) = if family == u32::from(AF_INET) {
        (Addr::v4(l4), Addr::v4(r4))
    } else if family == u32::from(AF_INET6) {
        (Addr::v6(l6), Addr::v6(r6))
    } else {
        return None;
    };
    Some(SockKey {
        // SAFETY: helper valid for sk_msg programs.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local,
        remote,
        local_port: lport as u16,
        remote_port: u32::from_be(rport) as u16,
        _pad: 0,
    })
}
