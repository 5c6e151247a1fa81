#![no_main]
//! ZDS messages as ztunnel sends them (hello, Ack/NACK) and as the agent sends them (requests,
//! which the test peer decodes), and one SOCK_SEQPACKET receive of arbitrary bytes with file
//! descriptors: the unsafe control-message walk in `wire::recv_once`.
//!
//! Input: byte 0 picks the receive (fd count, buffer size), the rest is the packet.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice_agent::zds::{
    AckResult,
    connection::{decode_ack, decode_hello, message},
    proto::{WorkloadRequest, WorkloadResponse, ZdsHello},
    wire::recv_once,
};

fuzz_target!(|data: &[u8]| {
    let Some((&how, packet)) = data.split_first() else {
        return;
    };
    match decode_hello(packet) {
        Ok(_) => {}
        Err(e) => assert!(!e.is_empty()),
    }
    match decode_ack(packet) {
        Ok(AckResult::Nacked(e)) => assert!(!e.is_empty(), "a NACK without its reason"),
        Ok(AckResult::Acked) => {}
        Ok(AckResult::NotSent(_)) => panic!("decoding cannot say NotSent"),
        Err(e) => assert!(!e.is_empty()),
    }
    round_trip::<ZdsHello>(packet);
    round_trip::<WorkloadResponse>(packet);
    round_trip::<WorkloadRequest>(packet);
    receive(how, packet);
});

/// encode(decode(x)) decodes to the same message.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(m) = M::decode(bytes) {
        let again = M::decode(m.encode_to_vec().as_slice()).expect("an encoded message decodes");
        assert_eq!(again, m);
    }
}

/// Sends `packet` with `how & 15` file descriptors over a socketpair and receives it into a
/// buffer of a size `how >> 4` picks: whatever arrives, every fd the kernel installed is owned
/// (none leaks), and truncation is reported, not read past.
fn receive(how: u8, packet: &[u8]) {
    const SIZES: [usize; 16] = [
        0, 1, 2, 3, 7, 8, 16, 63, 64, 100, 255, 256, 1024, 4096, 16384, 65536,
    ];
    let nfds = usize::from(how & 15);
    let size = SIZES[usize::from(how >> 4)];
    let fds_before = open_fds();
    let (tx, rx) = socketpair();
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    send(&tx, packet, &vec![null.as_raw_fd(); nfds]);
    let mut buf = vec![0u8; size];
    let got = recv_once(rx.as_raw_fd(), &mut buf).expect("receiving a queued packet");
    match got {
        None => assert!(
            packet.is_empty() && nfds == 0,
            "a packet read as end of stream"
        ),
        Some(r) => {
            assert_eq!(r.len, packet.len().min(size));
            assert_eq!(&buf[..r.len], &packet[..r.len]);
            // recv_once makes room for 8 fds: more are truncated by the kernel, never leaked.
            assert_eq!(r.fds.len(), nfds.min(8));
            assert_eq!(r.truncated, packet.len() > size || nfds > 8);
            let m = message(&r, &buf);
            assert_eq!(m.is_ok(), !r.truncated && nfds == 0);
            if let Ok(m) = m {
                assert_eq!(m, packet);
            }
        }
    }
    drop((tx, rx, null));
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: a valid two-element array for the new fds.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: socketpair returned two new fds we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut cmsg = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is valid; the pointers below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one header and `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
        }
    }
    // SAFETY: valid fd and msghdr.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "sendmsg: {}",
        std::io::Error::last_os_error()
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}
