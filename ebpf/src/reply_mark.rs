//! Setting the reply mark on a socket, from any program type that may call `bpf_setsockopt`.
use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::helpers::generated::bpf_setsockopt;
use sluice_common::{MARK_MASK, REPLY_MARK};

const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// Sets the socket's mark to REPLY_MARK in our bits, keeping the others (`old` is its mark
/// now). `ctx` is the program's context (cgroup sock_addr, or sockops of a full socket).
#[inline(always)]
pub fn set_reply_mark(ctx: *mut c_void, old: u32) -> bool {
    let mut mark = (old & !MARK_MASK) | REPLY_MARK;
    // SAFETY: helper contract: a context that allows bpf_setsockopt, a 4-byte option value
    // on the stack.
    let rc = unsafe {
        bpf_setsockopt(
            ctx,
            SOL_SOCKET,
            SO_MARK,
            addr_of_mut!(mark).cast::<c_void>(),
            4,
        )
    };
    rc == 0
}
