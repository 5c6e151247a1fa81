//! cgroup getsockopt: answers `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6) on
//! ztunnel's accepted outbound sockets, as conntrack would after an iptables REDIRECT.
//!
//! Stateless: `sk_lookup` hands the app's SYN to ztunnel's 15001 unchanged, so the accepted
//! socket's local address *is* the original destination. The answer is that address, for a TCP
//! socket of an enrolled pod whose local address is not the pod's own (only such a delivery
//! makes one), and only where the kernel itself had none.
//!
//! This runs after the kernel's own handler for every getsockopt in the cgroup, so everything
//! that is not our question returns at once, untouched.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use aya_log_ebpf::debug;
use sluice_common::{AF_INET, AF_INET6, Addr, Counter};

use crate::{counters::bump, maps::PODS};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number.
const SO_ORIGINAL_DST: i32 = 80;
const IPPROTO_TCP: u32 = 6;

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// Use the kernel's result, possibly as we rewrote it.
const PROCEED: i32 = 1;

#[cgroup_sockopt(getsockopt)]
pub fn sl_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: 4-byte ctx loads.
    let (level, optname) = unsafe {
        (
            read_volatile(addr_of!((*so).level)),
            read_volatile(addr_of!((*so).optname)),
        )
    };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        leave_large_buffers_alone(&ctx);
        return PROCEED;
    }
    answer_original_dst(&ctx, level == SOL_IPV6);
    PROCEED
}

/// Kernels before 6.5 fail a getsockopt with EFAULT when the caller's buffer is larger than a
/// page and a program returns without shrinking `optlen` (the program only sees the first
/// page). `optlen = 0` tells them to keep the kernel's own answer, untouched.
#[inline(always)]
fn leave_large_buffers_alone(ctx: &SockoptContext) {
    const PAGE_SIZE: i32 = 4096;
    let so = ctx.sockopt;
    // SAFETY: 4-byte ctx load and store.
    unsafe {
        if read_volatile(addr_of!((*so).optlen)) > PAGE_SIZE {
            write_volatile(addr_of_mut!((*so).optlen), 0);
        }
    }
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext, want_v6: bool) {
    let so = ctx.sockopt;
    // SAFETY: 4-byte ctx load.
    if unsafe { read_volatile(addr_of!((*so).retval)) } == 0 {
        // The kernel answered (conntrack is in use): that answer stands.
        return;
    }
    // SAFETY: getsockopt programs always have a full socket.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: bpf_sock fields are readable.
    let (protocol, family) = unsafe {
        (
            read_volatile(addr_of!((*sk).protocol)),
            read_volatile(addr_of!((*sk).family)),
        )
    };
    if protocol != IPPROTO_TCP {
        return;
    }
    // Every field is read at a constant offset (the verifier refuses pointer arithmetic on
    // sockets), then the family picks.
    // SAFETY: bpf_sock fields are readable.
    let (src4, src6) = unsafe {
        (
            read_volatile(addr_of!((*sk).src_ip4)),
            [
                read_volatile(addr_of!((*sk).src_ip6[0])),
                read_volatile(addr_of!((*sk).src_ip6[1])),
                read_volatile(addr_of!((*sk).src_ip6[2])),
                read_volatile(addr_of!((*sk).src_ip6[3])),
            ],
        )
    };
    let local = if family == u32::from(AF_INET) {
        Addr::v4(src4)
    } else if family == u32::from(AF_INET6) {
        Addr::v6(src6)
    } else {
        return;
    };
    // Like the kernel: the IPv4 option answers IPv4 destinations, the IPv6 option IPv6 ones.
    if local.is_v4() == want_v6 {
        return;
    }
    // SAFETY: helper valid for sockopt programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only map value.
    let Some(pod) = (unsafe { PODS.get(netns) }) else {
        return;
    };
    if local.is_unspecified() || pod.is_local(&local) {
        return;
    }
    // SAFETY: src_port is host order; dst_port network order (only its zero-ness matters).
    let (port, peer_port) = unsafe {
        (
            read_volatile(addr_of!((*sk).src_port)) as u16,
            read_volatile(addr_of!((*sk).dst_port)),
        )
    };
    // A connection already reset or closed has given its port back: no answer (the kernel's
    // error stands), rather than a destination with port 0.
    if port == 0 || peer_port == 0 {
        return;
    }
    // SAFETY: optval..optval_end is the kernel's copy of the caller's buffer.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let len = if want_v6 {
            SOCKADDR_IN6_LEN
        } else {
            SOCKADDR_IN_LEN
        };
        if start.add(len) > end {
            return;
        }
        let port_be = port.to_be();
        let b = start;
        if want_v6 {
            // struct sockaddr_in6 { family, port, flowinfo, addr[16], scope_id }
            write_volatile(b as *mut u16, AF_INET6);
            write_volatile(b.add(2) as *mut u16, port_be);
            write_volatile(b.add(4) as *mut u32, 0);
            write_volatile(b.add(8) as *mut u32, local.words[0]);
            write_volatile(b.add(12) as *mut u32, local.words[1]);
            write_volatile(b.add(16) as *mut u32, local.words[2]);
            write_volatile(b.add(20) as *mut u32, local.words[3]);
            write_volatile(b.add(24) as *mut u32, 0);
        } else {
            // struct sockaddr_in { family, port, addr, zero[8] }
            write_volatile(b as *mut u16, AF_INET);
            write_volatile(b.add(2) as *mut u16, port_be);
            write_volatile(b.add(4) as *mut u32, local.words[3]);
            write_volatile(b.add(8) as *mut u32, 0);
            write_volatile(b.add(12) as *mut u32, 0);
        }
        // Two separate 32-bit stores: the verifier refuses a merged 8-byte one.
        write_volatile(addr_of_mut!((*so).optlen), len as i32);
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    bump(Counter::OrigDstAnswered);
    debug!(ctx, "SO_ORIGINAL_DST answered: port {}", port);
}
