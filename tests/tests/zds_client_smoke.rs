//! Smoke tests of the ZDS client side: the `sluice_tests::zds` library and the
//! `sluice-testkit peer --zds` process, driven by a tiny fake agent defined here (a
//! SOCK_SEQPACKET listener in a fresh temp dir). Tests that need network namespaces
//! skip without root (fail under CI=true).

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr, accept4, bind, listen, recv,
    socket,
};
use prost::Message;
use serde_json::Value;
use sluice_tests::harness::{Netns, require_root, unique};
use sluice_tests::zds::proto::workload_request::Payload;
use sluice_tests::zds::proto::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_response,
};
use sluice_tests::zds::{
    End, Kind, Policy, Response, TEST_NACK, Transcript, ZdsClient, ZdsConn, ZdsError, ZdsPeer,
    ZdsPeerOptions, is_netns,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);

// ---- the fake agent -------------------------------------------------------------------

/// A ZDS listening socket in its own temp dir; both are removed on drop.
struct FakeAgent {
    dir: PathBuf,
    path: PathBuf,
    listener: OwnedFd,
}

impl FakeAgent {
    fn new() -> FakeAgent {
        let (path, dir) = FakeAgent::unbound();
        FakeAgent::bind_at(path, dir)
    }

    /// A path for a socket nobody listens on yet, and the dir to clean up.
    fn unbound() -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(unique("sluice-zds-"));
        fs::create_dir(&dir).unwrap();
        (dir.join("ztunnel.sock"), dir)
    }

    fn bind_at(path: PathBuf, dir: PathBuf) -> FakeAgent {
        FakeAgent {
            listener: FakeAgent::listen(&path),
            path,
            dir,
        }
    }

    fn listen(path: &Path) -> OwnedFd {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        listen(&fd, Backlog::new(8).unwrap()).unwrap();
        fd
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn accept(&self) -> AgentConn {
        assert!(readable(self.listener.as_fd(), WAIT), "nobody connected");
        let fd = accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).unwrap();
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        AgentConn {
            // Sending a packet with fds is the same on both ends.
            conn: ZdsConn::from_fd(fd),
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The agent's end of one connection.
struct AgentConn {
    conn: ZdsConn,
}

impl AgentConn {
    fn send(&self, payload: Payload, fds: &[BorrowedFd<'_>]) {
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        self.conn.send_raw_with_fds(&bytes, fds).unwrap();
    }

    /// Reads one packet with a large buffer (a NACK may exceed 1 KiB).
    fn recv_packet(&self) -> Vec<u8> {
        assert!(
            readable(self.conn.as_fd(), WAIT),
            "no packet from ztunnel's side"
        );
        let mut buf = vec![0u8; 64 * 1024];
        let n = recv(self.conn.as_fd().as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        buf.truncate(n);
        buf
    }

    fn recv_hello(&self) -> ZdsHello {
        ZdsHello::decode(&self.recv_packet()[..]).unwrap()
    }

    /// The error text of the next response ("" for an ack).
    fn recv_response(&self) -> String {
        let packet = self.recv_packet();
        match WorkloadResponse::decode(&packet[..]).unwrap().payload {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("response without payload: {packet:?}"),
        }
    }

    /// True once the other side hung up.
    fn sees_eof(&self) -> bool {
        self.recv_packet().is_empty()
    }
}

fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let ms = PollTimeout::try_from(timeout).unwrap();
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, ms).unwrap() > 0
}

fn add(uid: &str, name: &str) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: Some(WorkloadInfo {
            name: name.into(),
            namespace: "smoke".into(),
            service_account: "default".into(),
        }),
    })
}

fn snapshot() -> Payload {
    Payload::SnapshotSent(SnapshotSent {})
}

fn del(uid: &str) -> Payload {
    Payload::Del(DelWorkload { uid: uid.into() })
}

fn keep(uid: &str) -> Payload {
    Payload::Keep(KeepWorkload { uid: uid.into() })
}

/// Our own netns: any netns fd will do where no listener is started in it.
fn own_netns() -> fs::File {
    fs::File::open("/proc/self/ns/net").unwrap()
}

// ---- (a) the client library -----------------------------------------------------------

#[test]
fn client_library_decodes_what_a_fake_agent_sends() {
    if !require_root() {
        return;
    }
    let agent = FakeAgent::new();
    let ns = Netns::new("zc").unwrap();
    let client = ZdsConn::connect(agent.path()).unwrap();
    let conn = agent.accept();
    client.send_hello().unwrap();
    assert_eq!(conn.recv_hello().version, Version::V1 as i32);

    let mut transcript = Transcript::new();
    let netns = ns.open().unwrap();
    conn.send(add("uid-a", "pod-a"), &[netns.as_fd()]);
    let r = client.recv_request(Some(WAIT)).unwrap();
    assert_eq!(
        (r.kind(), r.uid(), r.fds.len()),
        (Kind::Add, Some("uid-a"), 1)
    );
    assert!(is_netns(r.fds[0].as_fd()));
    let Some(Payload::Add(a)) = &r.request.payload else {
        unreachable!()
    };
    let info = a.workload_info.as_ref().unwrap();
    assert_eq!(
        (info.name.as_str(), info.namespace.as_str()),
        ("pod-a", "smoke")
    );
    assert_eq!(transcript.record(&r), vec![]);
    client.send_ack().unwrap();
    transcript.record_response(Response::Ack);
    assert_eq!(conn.recv_response(), "");

    for (payload, kind, uid) in [
        (snapshot(), Kind::SnapshotSent, None),
        (del("uid-a"), Kind::Del, Some("uid-a")),
    ] {
        conn.send(payload, &[]);
        let r = client.recv_request(Some(WAIT)).unwrap();
        assert_eq!((r.kind(), r.uid(), r.fds.len()), (kind, uid, 0));
        transcript.record(&r);
        client.send_nack("no thanks").unwrap();
        transcript.record_response(Response::Nack("no thanks".into()));
        assert_eq!(conn.recv_response(), "no thanks");
    }
    transcript.check_invariants().unwrap();
    assert_eq!(
        transcript.kinds(),
        [Kind::Add, Kind::SnapshotSent, Kind::Del]
    );

    drop(conn);
    assert!(matches!(
        client.recv_request(Some(WAIT)),
        Err(ZdsError::Closed)
    ));
}

/// Runs a [`ZdsClient`] against one fake-agent connection fed by `feed`; returns the
/// transcript once the client hung up (as ztunnel does on a fatal mistake).
fn client_transcript(feed: impl FnOnce(&AgentConn)) -> Transcript {
    let agent = FakeAgent::new();
    let client =
        ZdsClient::spawn(ZdsConn::connect(agent.path()).unwrap(), Policy::ack_all()).unwrap();
    let conn = agent.accept();
    conn.recv_hello();
    feed(&conn);
    assert!(conn.sees_eof(), "the client should hang up");
    client.join()
}

fn assert_fatal(t: &Transcript, needle: &str) {
    let err = t.check_invariants().unwrap_err().to_string();
    assert!(err.contains(needle), "{err}");
    assert!(
        matches!(t.end(), Some(End::ProtocolError(m)) if m.contains(needle)),
        "{:?}",
        t.end()
    );
}

#[test]
fn checker_rejects_bad_sequences() {
    let t = client_transcript(|c| c.send(add("a", "p"), &[]));
    assert_fatal(&t, "must carry exactly one fd, carries 0");

    let netns = own_netns();
    let t = client_transcript(|c| {
        c.send(add("a", "p"), &[netns.as_fd()]);
        assert_eq!(c.recv_response(), "");
        c.send(snapshot(), &[]);
        assert_eq!(c.recv_response(), "");
        c.send(keep("a"), &[]);
    });
    assert_fatal(&t, "Keep after SnapshotSent (#1)");

    let t = client_transcript(|c| {
        c.send(snapshot(), &[]);
        assert_eq!(c.recv_response(), "");
        c.send(snapshot(), &[]);
    });
    assert_fatal(&t, "second SnapshotSent");

    let t = client_transcript(|c| c.send(del("a"), &[netns.as_fd()]));
    assert_fatal(&t, "must carry no fd");

    let t = client_transcript(|c| {
        c.send(
            Payload::Add(AddWorkload {
                uid: "a".into(),
                workload_info: None,
            }),
            &[netns.as_fd()],
        )
    });
    assert_fatal(&t, "no workload_info");

    let t = client_transcript(|c| c.conn.send_raw(&[0u8; 1100]).unwrap());
    assert_fatal(&t, "request of 1100 bytes does not fit");
    assert!(t.entries().is_empty());
}

#[test]
fn client_policy_nacks_and_goes_silent() {
    let agent = FakeAgent::new();
    let policy = Policy::ack_all().nack_uid("b", 1).stop_responding_after(3);
    let client = ZdsClient::spawn(ZdsConn::connect(agent.path()).unwrap(), policy).unwrap();
    let conn = agent.accept();
    conn.recv_hello();
    let netns = own_netns();
    conn.send(add("b", "p"), &[netns.as_fd()]);
    assert_eq!(conn.recv_response(), TEST_NACK);
    conn.send(add("b", "p"), &[netns.as_fd()]);
    assert_eq!(conn.recv_response(), "");
    conn.send(snapshot(), &[]);
    assert_eq!(conn.recv_response(), "");
    // A fourth request is recorded but never answered (an ack-timeout test).
    conn.send(del("b"), &[]);
    let e = client.wait_for(|e| e.kind == Kind::Del, WAIT).unwrap();
    assert_eq!(e.response, None);
    assert!(!readable(conn.conn.as_fd(), Duration::from_millis(100)));
    let t = client.finish();
    t.check_invariants().unwrap();
    assert_eq!(t.end(), Some(&End::Stopped));
}

// ---- (b) sluice-testkit peer --zds ----------------------------------------------------

/// Connects to `addr` from inside `ns`.
fn connect_in(ns: &Netns, addr: &str) -> io::Result<()> {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop))
        .unwrap()
}

fn assert_listening(ns: &Netns) {
    for addr in [
        "[::1]:15001",
        "127.0.0.1:15006",
        "[::1]:15008",
        "127.0.0.1:15053",
    ] {
        connect_in(ns, addr).unwrap_or_else(|e| panic!("{addr} in {}: {e}", ns.name()));
    }
}

fn assert_not_listening(ns: &Netns) {
    let err = connect_in(ns, "[::1]:15001").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
}

fn zds_event(peer: &ZdsPeer, kind: &str, uid: Option<&str>) -> Value {
    peer.wait_zds(kind, uid, WAIT).unwrap()
}

#[test]
fn testkit_peer_follows_add_nack_snapshot_and_del() {
    if !require_root() {
        return;
    }
    let agent = FakeAgent::new();
    let (ns_a, ns_b) = (Netns::new("za").unwrap(), Netns::new("zb").unwrap());
    let opts = ZdsPeerOptions {
        tag: Some("smoke".into()),
        nack_uids: vec!["uid-b".into()],
        retry_connect: false,
    };
    let peer = ZdsPeer::start(Path::new(TESTKIT), agent.path(), &opts, None, WAIT).unwrap();
    let conn = agent.accept();
    assert_eq!(conn.recv_hello().version, Version::V1 as i32);

    let fd_a = ns_a.open().unwrap();
    conn.send(add("uid-a", "pod-a"), &[fd_a.as_fd()]);
    assert_eq!(conn.recv_response(), "");
    let ev = zds_event(&peer, "add", Some("uid-a"));
    assert_eq!(ev["name"], "pod-a");
    assert_eq!(ev["namespace"], "smoke");
    assert_eq!(ev["fds"], 1);
    let ready = peer
        .wait_event(|v| v["event"] == "ready" && v["uid"] == "uid-a", WAIT)
        .unwrap();
    assert_eq!(ready["netns"], "smoke");
    assert_listening(&ns_a);
    assert_not_listening(&ns_b);

    // The first Add of a --nack-uid is refused, the second served.
    let fd_b = ns_b.open().unwrap();
    conn.send(add("uid-b", "pod-b"), &[fd_b.as_fd()]);
    assert_eq!(conn.recv_response(), TEST_NACK);
    assert_not_listening(&ns_b);
    conn.send(add("uid-b", "pod-b"), &[fd_b.as_fd()]);
    assert_eq!(conn.recv_response(), "");
    assert_listening(&ns_b);

    conn.send(snapshot(), &[]);
    assert_eq!(conn.recv_response(), "");
    let done = peer
        .wait_event(|v| v["event"] == "snapshot_done", WAIT)
        .unwrap();
    assert_eq!(done["uids"], serde_json::json!(["uid-a", "uid-b"]));

    // A repeated Add for the same netns keeps the running listener set (as ztunnel keeps
    // its proxy): its listeners never close, so there is no window of refused connections.
    conn.send(add("uid-a", "pod-a"), &[fd_a.as_fd()]);
    assert_eq!(conn.recv_response(), "");
    let started = peer
        .wait_event(
            |v| v["event"] == "workload_started" && v["uid"] == "uid-a" && v["started"] != "new",
            WAIT,
        )
        .unwrap();
    assert_eq!(started["started"], "kept");
    assert_listening(&ns_a);

    conn.send(del("uid-a"), &[]);
    assert_eq!(conn.recv_response(), "");
    zds_event(&peer, "del", Some("uid-a"));
    assert_not_listening(&ns_a);
    assert_listening(&ns_b);

    // Every request got exactly one response, in order, and the agent side broke no rule.
    let errors: Vec<Value> = (0..6)
        .map(|_| {
            peer.wait_event(|v| v["event"] == "zds_response", WAIT)
                .unwrap()["error"]
                .clone()
        })
        .collect();
    assert_eq!(errors, ["", TEST_NACK, "", "", "", ""]);
    assert_eq!(peer.violations(), Vec::<Value>::new());

    // Proxy events are tagged with the workload whose listeners saw them (the
    // assert_listening connects above).
    for uid in ["uid-a", "uid-b"] {
        let outbound = peer
            .wait_event(|v| v["event"] == "outbound" && v["uid"] == uid, WAIT)
            .unwrap();
        assert_eq!(outbound["netns"], "smoke");
    }
    peer.stop(WAIT).unwrap();
}

#[test]
fn testkit_peer_reconnects_and_obeys_the_new_snapshot() {
    if !require_root() {
        return;
    }
    // Start before the agent exists: the peer must retry until the socket appears.
    let (path, dir) = FakeAgent::unbound();
    let opts = ZdsPeerOptions {
        retry_connect: true,
        ..Default::default()
    };
    let peer = ZdsPeer::spawn(Path::new(TESTKIT), &path, &opts, None).unwrap();
    let failed = peer
        .wait_event(|v| v["event"] == "zds_connect", WAIT)
        .unwrap();
    assert!(failed["retry_in_ms"].is_u64(), "{failed}");
    let agent = FakeAgent::bind_at(path, dir);
    let conn = agent.accept();
    conn.recv_hello();
    peer.wait_event(|v| v["event"] == "zds_connected", WAIT)
        .unwrap();

    let (ns_a, ns_b) = (Netns::new("za").unwrap(), Netns::new("zb").unwrap());
    let (fd_a, fd_b) = (ns_a.open().unwrap(), ns_b.open().unwrap());
    conn.send(add("uid-a", "pod-a"), &[fd_a.as_fd()]);
    assert_eq!(conn.recv_response(), "");
    conn.send(add("uid-b", "pod-b"), &[fd_b.as_fd()]);
    assert_eq!(conn.recv_response(), "");
    conn.send(snapshot(), &[]);
    assert_eq!(conn.recv_response(), "");

    // The agent restarts: the listeners keep serving while the peer reconnects.
    drop(conn);
    peer.wait_event(|v| v["event"] == "zds_disconnected", WAIT)
        .unwrap();
    let conn = agent.accept();
    conn.recv_hello();
    let connected = peer
        .wait_event(|v| v["event"] == "zds_connected", WAIT)
        .unwrap();
    assert_eq!(connected["connection"], 2);
    assert_listening(&ns_a);

    // The new snapshot names only uid-b (kept): uid-a goes.
    conn.send(keep("uid-b"), &[]);
    assert_eq!(conn.recv_response(), "");
    let kept = zds_event(&peer, "keep", Some("uid-b"));
    assert_eq!(kept["running"], true);
    conn.send(snapshot(), &[]);
    assert_eq!(conn.recv_response(), "");
    let done = peer
        .wait_event(
            |v| v["event"] == "snapshot_done" && v["connection"] == 2,
            WAIT,
        )
        .unwrap();
    assert_eq!(done["uids"], serde_json::json!(["uid-b"]));
    assert_eq!(done["stopped"], serde_json::json!(["uid-a"]));
    assert_not_listening(&ns_a);
    assert_listening(&ns_b);

    // A Keep after the snapshot is fatal to ztunnel: no answer, hang up, reconnect.
    conn.send(keep("uid-b"), &[]);
    assert!(conn.sees_eof());
    let v = peer
        .wait_event(|v| v["event"] == "zds_violation", WAIT)
        .unwrap();
    assert_eq!(v["fatal"], true);
    let conn = agent.accept();
    conn.recv_hello();
    assert_listening(&ns_b);
    peer.stop(WAIT).unwrap();
}

#[test]
fn testkit_peer_without_retry_gives_up_on_a_missing_socket() {
    let (path, dir) = FakeAgent::unbound();
    let peer = ZdsPeer::spawn(Path::new(TESTKIT), &path, &ZdsPeerOptions::default(), None).unwrap();
    let failed = peer
        .wait_event(|v| v["event"] == "zds_connect", WAIT)
        .unwrap();
    assert!(failed["retry_in_ms"].is_null(), "{failed}");
    let err = peer.stop(WAIT).unwrap_err().to_string();
    assert!(err.contains("exited with"), "{err}");
    fs::remove_dir(dir).unwrap();
}
