//! One ZDS connection, ztunnel's end: SOCK_SEQPACKET, one protobuf message per packet.

use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, sendmsg,
    socket, socketpair,
};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::error::ZdsError;
use super::proto::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload,
    workload_response,
};

/// ztunnel reads every request into a buffer of this size; a longer one is truncated,
/// which ztunnel treats as fatal.
pub const RECV_BUFFER_LEN: usize = 1024;

/// Ancillary space for this many fds, more than the one ztunnel expects, so that an agent
/// sending several is caught and counted rather than silently cut off.
pub const MAX_FDS: usize = 8;

/// What a request is, independent of its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Add,
    Keep,
    Del,
    SnapshotSent,
    /// A WorkloadRequest without a known payload (ztunnel: "no payload", fatal).
    Empty,
}

impl Kind {
    pub fn of(request: &WorkloadRequest) -> Kind {
        match &request.payload {
            Some(Payload::Add(_)) => Kind::Add,
            Some(Payload::Keep(_)) => Kind::Keep,
            Some(Payload::Del(_)) => Kind::Del,
            Some(Payload::SnapshotSent(_)) => Kind::SnapshotSent,
            None => Kind::Empty,
        }
    }

    /// The name used in JSON events: `add`, `keep`, `del`, `snapshot_sent`, `empty`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::Keep => "keep",
            Kind::Del => "del",
            Kind::SnapshotSent => "snapshot_sent",
            Kind::Empty => "empty",
        }
    }
}

/// One decoded request and the fds that came with it (already owned: dropping closes them).
#[derive(Debug)]
pub struct Received {
    pub request: WorkloadRequest,
    pub fds: Vec<OwnedFd>,
    /// Packet size in bytes.
    pub len: usize,
    pub raw: Vec<u8>,
}

impl Received {
    pub fn kind(&self) -> Kind {
        Kind::of(&self.request)
    }

    /// The uid an Add, Keep or Del names.
    pub fn uid(&self) -> Option<&str> {
        match self.request.payload.as_ref()? {
            Payload::Add(a) => Some(&a.uid),
            Payload::Keep(k) => Some(&k.uid),
            Payload::Del(d) => Some(&d.uid),
            Payload::SnapshotSent(_) => None,
        }
    }
}

/// ztunnel's end of a ZDS connection. Blocking; methods take `&self` so that another
/// thread holding a [`ZdsConn::try_clone`] can [`ZdsConn::shutdown`] a blocked receive.
#[derive(Debug)]
pub struct ZdsConn {
    fd: OwnedFd,
}

impl ZdsConn {
    /// Connects to the agent's socket at `path` (no retry; see the testkit peer for that).
    pub fn connect(path: impl AsRef<Path>) -> io::Result<ZdsConn> {
        let fd = seqpacket_socket()?;
        let addr = UnixAddr::new(path.as_ref())?;
        connect(fd.as_raw_fd(), &addr)?;
        Ok(ZdsConn { fd })
    }

    /// Wraps an already connected SOCK_SEQPACKET socket.
    pub fn from_fd(fd: OwnedFd) -> ZdsConn {
        ZdsConn { fd }
    }

    /// A connected pair: this end and the agent's end, for tests without a listener.
    pub fn pair() -> io::Result<(ZdsConn, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((ZdsConn { fd: ours }, theirs))
    }

    pub fn try_clone(&self) -> io::Result<ZdsConn> {
        Ok(ZdsConn {
            fd: self.fd.try_clone()?,
        })
    }

    /// Timeout for receives called without one (`SO_RCVTIMEO`); `None` blocks forever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        socket2::SockRef::from(&self.fd).set_read_timeout(timeout)
    }

    /// Ends the connection for both sides and wakes any thread blocked on it.
    pub fn shutdown(&self) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `ZdsHello { version: V1 }`, which ztunnel sends first on every connection.
    pub fn send_hello(&self) -> io::Result<()> {
        self.send_raw(
            &ZdsHello {
                version: Version::V1 as i32,
            }
            .encode_to_vec(),
        )
    }

    pub fn send_ack(&self) -> io::Result<()> {
        self.send_response(String::new())
    }

    /// A NACK: an `Ack` with a non-empty error text.
    pub fn send_nack(&self, error: &str) -> io::Result<()> {
        self.send_response(error.to_string())
    }

    fn send_response(&self, error: String) -> io::Result<()> {
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        };
        self.send_raw(&response.encode_to_vec())
    }

    /// Sends `bytes` as one packet, e.g. garbage the agent must survive.
    pub fn send_raw(&self, bytes: &[u8]) -> io::Result<()> {
        self.send_raw_with_fds(bytes, &[])
    }

    /// Sends `bytes` as one packet with `fds` attached as SCM_RIGHTS.
    pub fn send_raw_with_fds(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        send_packet(self.fd.as_fd(), bytes, fds)
    }

    /// Receives one request the way ztunnel does. `timeout: None` waits as long as the
    /// read timeout allows (forever by default).
    pub fn recv_request(&self, timeout: Option<Duration>) -> Result<Received, ZdsError> {
        if let Some(t) = timeout
            && !self.readable_within(t)?
        {
            return Err(ZdsError::Timeout);
        }
        let packet = recv_packet(self.fd.as_fd())?;
        if packet.len == 0 && packet.fds.is_empty() {
            return Err(ZdsError::Closed);
        }
        let fds = packet.fds.len();
        // Checked after the fds are owned, so they are closed whatever goes wrong.
        if packet.control_truncated {
            return Err(ZdsError::ControlTruncated { fds });
        }
        if packet.truncated {
            return Err(ZdsError::Truncated {
                len: packet.len,
                fds,
            });
        }
        let request =
            WorkloadRequest::decode(&packet.data[..]).map_err(|source| ZdsError::Decode {
                raw: packet.data.clone(),
                fds,
                source,
            })?;
        Ok(Received {
            request,
            fds: packet.fds,
            len: packet.len,
            raw: packet.data,
        })
    }

    /// Waits `quiet` without consuming anything and fails if a request arrives: used
    /// while holding back a response, since the agent must wait for it. A connection the
    /// agent closed meanwhile is not a request (the next receive reports it).
    pub fn expect_no_request_within(&self, quiet: Duration) -> Result<(), ZdsError> {
        if !self.readable_within(quiet)? {
            return Ok(());
        }
        let mut probe = [0u8; 1];
        // MSG_TRUNC makes recv report the queued packet's full length.
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
        match retry_eintr(|| recv(self.fd.as_raw_fd(), &mut probe, flags)) {
            Ok(0) | Err(Errno::EAGAIN) => Ok(()),
            Ok(len) => Err(ZdsError::RequestBeforeResponse { len }),
            Err(e) => Err(e.into()),
        }
    }

    /// True if a packet (or EOF) is ready within `timeout`.
    fn readable_within(&self, timeout: Duration) -> Result<bool, ZdsError> {
        // PollTimeout tops out at i32::MAX ms (~24 days).
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let n = retry_eintr(|| {
            poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            )
        })?;
        Ok(n > 0)
    }
}

impl AsFd for ZdsConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A new close-on-exec SOCK_SEQPACKET unix socket.
pub(crate) fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Sends one packet with optional SCM_RIGHTS. MSG_NOSIGNAL: a gone peer is an error,
/// not a SIGPIPE.
pub(crate) fn send_packet(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(bytes)];
    let sent =
        retry_eintr(|| sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None))?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", bytes.len()),
        ));
    }
    Ok(())
}

/// One packet as received into the 1 KiB buffer.
pub(crate) struct Packet {
    /// At most [`RECV_BUFFER_LEN`] bytes.
    pub data: Vec<u8>,
    /// The packet's real length (larger than `data` when truncated).
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    pub truncated: bool,
    pub control_truncated: bool,
}

/// recvmsg into [`RECV_BUFFER_LEN`] bytes with MSG_CMSG_CLOEXEC, as ztunnel does, plus
/// MSG_TRUNC so that the real length of an oversized packet can be reported.
///
/// Raw libc rather than nix: nix refuses to parse the control data of a MSG_CTRUNC
/// packet, which would leak the fds the kernel did install.
pub(crate) fn recv_packet(fd: BorrowedFd<'_>) -> Result<Packet, ZdsError> {
    let mut buf = [0u8; RECV_BUFFER_LEN];
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    let flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC;
    let len = loop {
        // SAFETY: hdr points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut hdr, flags) };
        if let Ok(n) = usize::try_from(n) {
            break n;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // SO_RCVTIMEO expired.
            Some(libc::EAGAIN) => return Err(ZdsError::Timeout),
            _ => return Err(ZdsError::Io(err)),
        }
    };
    let mut fds = Vec::new();
    let mut foreign_cmsg = false;
    // SAFETY: the kernel filled `control` and set msg_controllen to what it used; the CMSG
    // macros stay within it. Each SCM_RIGHTS entry holds fds just installed for us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
                let payload = (c.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            } else {
                foreign_cmsg = true;
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    Ok(Packet {
        data: buf[..len.min(RECV_BUFFER_LEN)].to_vec(),
        len,
        fds,
        truncated: hdr.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: hdr.msg_flags & libc::MSG_CTRUNC != 0 || foreign_cmsg,
    })
}

fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::super::proto::{AddWorkload, DelWorkload, WorkloadInfo};
    use super::*;

    fn request(p: Payload) -> Vec<u8> {
        WorkloadRequest { payload: Some(p) }.encode_to_vec()
    }

    #[test]
    fn receives_add_with_netns_fd_then_del() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let add = request(Payload::Add(AddWorkload {
            uid: "u1".into(),
            workload_info: Some(WorkloadInfo {
                name: "pod".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        }));
        send_packet(agent.as_fd(), &add, &[netns.as_fd()]).unwrap();
        let r = conn.recv_request(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(r.kind(), Kind::Add);
        assert_eq!(r.uid(), Some("u1"));
        assert_eq!(r.fds.len(), 1);
        assert!(super::super::is_netns(r.fds[0].as_fd()));
        assert_eq!(r.len, add.len());
        assert_eq!(r.raw, add);

        send_packet(
            agent.as_fd(),
            &request(Payload::Del(DelWorkload { uid: "u1".into() })),
            &[],
        )
        .unwrap();
        let r = conn.recv_request(None).unwrap();
        assert_eq!((r.kind(), r.uid(), r.fds.len()), (Kind::Del, Some("u1"), 0));
    }

    #[test]
    fn oversized_garbage_and_eof_are_errors() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        send_packet(agent.as_fd(), &[0u8; 1100], &[]).unwrap();
        assert!(matches!(
            conn.recv_request(None),
            Err(ZdsError::Truncated { len: 1100, fds: 0 })
        ));
        // Field 1, wire type 2, length 100 but nothing follows.
        send_packet(agent.as_fd(), &[0x0a, 100], &[]).unwrap();
        assert!(matches!(
            conn.recv_request(None),
            Err(ZdsError::Decode { fds: 0, .. })
        ));
        drop(agent);
        assert!(matches!(conn.recv_request(None), Err(ZdsError::Closed)));
    }

    #[test]
    fn too_many_fds_are_reported_and_closed() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        let files: Vec<File> = (0..MAX_FDS + 2)
            .map(|_| File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        send_packet(agent.as_fd(), &[0x1a, 0], &fds).unwrap();
        // The kernel installs as many as fit; they are owned (and closed) by the error path.
        let r = conn.recv_request(None);
        assert!(
            matches!(r, Err(ZdsError::ControlTruncated { fds: MAX_FDS })),
            "{r:?}"
        );
    }

    #[test]
    fn timeouts_and_early_requests() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        assert!(matches!(
            conn.recv_request(Some(Duration::from_millis(10))),
            Err(ZdsError::Timeout)
        ));
        conn.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        assert!(matches!(conn.recv_request(None), Err(ZdsError::Timeout)));
        conn.expect_no_request_within(Duration::from_millis(10))
            .unwrap();
        send_packet(agent.as_fd(), &[0x1a, 0], &[]).unwrap();
        assert!(matches!(
            conn.expect_no_request_within(Duration::from_millis(10)),
            Err(ZdsError::RequestBeforeResponse { len: 2 })
        ));
        // Peeking left the request in place.
        assert_eq!(conn.recv_request(None).unwrap().kind(), Kind::SnapshotSent);
        drop(agent);
        conn.expect_no_request_within(Duration::from_millis(10))
            .unwrap();
    }

    #[test]
    fn responses_are_single_packets() {
        let (conn, agent) = ZdsConn::pair().unwrap();
        conn.send_hello().unwrap();
        conn.send_ack().unwrap();
        conn.send_nack("boom").unwrap();
        let agent = ZdsConn::from_fd(agent);
        let read = || recv_packet(agent.as_fd()).unwrap().data;
        assert_eq!(read(), [0x08, 0x01]);
        assert_eq!(read(), [0x0a, 0x00]);
        assert_eq!(read(), [0x0a, 6, 0x0a, 4, b'b', b'o', b'o', b'm']);
    }
}
