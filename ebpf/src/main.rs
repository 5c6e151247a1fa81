//! Sluice's eBPF programs. Every program filters to enrolled pod network namespaces first.
//!
//! | program            | hook                          | rule                                          |
//! |--------------------|-------------------------------|-----------------------------------------------|
//! | `sl_connect4/6`    | cgroup connect                | outbound TCP marked for 15001; DNS → 15053; ztunnel→app marked for the return path |
//! | `sl_sendmsg4/6`    | cgroup sendmsg (UDP)          | DNS datagrams → 15053                         |
//! | `sl_recvmsg4/6`    | cgroup recvmsg (UDP)          | DNS replies appear to come from the server    |
//! | `sl_getpeer4/6`    | cgroup getpeername            | a DNS socket sees the server it asked         |
//! | `sl_getsockopt`    | cgroup getsockopt             | SO_ORIGINAL_DST for ztunnel                   |
//! | `sl_sockops`       | cgroup sockops                | ztunnel's listeners; node connects; acceleration |
//! | `sl_sk_msg`        | sockhash msg verdict          | same-node acceleration                        |
//! | `sl_sk_lookup`     | sk_lookup, per pod netns      | which listener gets a new connection (15001, 15006, 15008) |
#![no_std]
#![no_main]

mod counters;
mod maps;
mod reply_mark;
mod sk_lookup;
mod sk_msg;
mod sock_addr;
mod sock_tuple;
mod sockops;
mod sockopt;
mod trace;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-compatible: socket lookup and assignment helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
