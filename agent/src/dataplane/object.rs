//! The embedded eBPF object and what each of its programs attaches to.
use sluice_common::progs;

use super::bpf_sys::*;

/// Built by build.rs (aya-build) from the `ebpf` crate and embedded, never read from disk.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice"));

/// Identifies this build of the object (FNV-1a of its bytes), so that a restarted agent of the
/// same build adopts pinned links, and an upgraded one replaces them. FNV rather than a crypto
/// hash: this only tells builds apart, it guards nothing.
pub fn object_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The cgroup programs and their attach types. (`sl_sk_lookup` attaches per pod netns,
/// `sl_sk_msg` to the sockhash.)
pub const CGROUP_PROGRAMS: [(&str, u32); 10] = [
    (progs::CONNECT4, BPF_CGROUP_INET4_CONNECT),
    (progs::CONNECT6, BPF_CGROUP_INET6_CONNECT),
    (progs::SENDMSG4, BPF_CGROUP_UDP4_SENDMSG),
    (progs::SENDMSG6, BPF_CGROUP_UDP6_SENDMSG),
    (progs::RECVMSG4, BPF_CGROUP_UDP4_RECVMSG),
    (progs::RECVMSG6, BPF_CGROUP_UDP6_RECVMSG),
    (progs::GETPEERNAME4, BPF_CGROUP_INET4_GETPEERNAME),
    (progs::GETPEERNAME6, BPF_CGROUP_INET6_GETPEERNAME),
    (progs::GETSOCKOPT, BPF_CGROUP_GETSOCKOPT),
    (progs::SOCKOPS, BPF_CGROUP_SOCK_OPS),
];
