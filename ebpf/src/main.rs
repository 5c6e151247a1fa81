//! Sluice's eBPF programs. Every program filters to enrolled pod network namespaces first.
//!
//! | program            | hook                          | rule                                        |
//! |--------------------|-------------------------------|---------------------------------------------|
//! | `sl_connect4/6`    | cgroup connect                | outbound TCP → 15001, DNS TCP/UDP → 15053   |
//! | `sl_sendmsg4/6`    | cgroup sendmsg (UDP)          | DNS datagrams → 15053                       |
//! | `sl_recvmsg4/6`    | cgroup recvmsg (UDP)          | DNS replies appear to come from the server  |
//! | `sl_getpeer4/6`    | cgroup getpeername            | the app sees its original peer              |
//! | `sl_getsockopt`    | cgroup getsockopt             | SO_ORIGINAL_DST for ztunnel                 |
//! | `sl_sockops`       | cgroup sockops                | remember flows; feed the acceleration map   |
//! | `sl_sk_msg`        | sockhash msg verdict          | same-node acceleration                      |
//! | `sl_pod_ingress`   | TC ingress, pod interfaces    | inbound TCP → 15006 (`bpf_sk_assign`)        |
//! | `sl_lo_ingress`    | TC ingress, pod `lo`          | mark ztunnel→app SYNs for the return route  |
#![no_std]
#![no_main]

mod counters;
mod maps;
mod packet;
mod sk_msg;
mod sock_addr;
mod sock_tuple;
mod sockops;
mod sockopt;
mod tc;

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
