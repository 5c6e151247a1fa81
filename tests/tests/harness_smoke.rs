//! Privileged smoke tests of the test harness itself: real namespaces, veths, helper
//! processes and raw BPF calls. Each test skips without root (fails under CI=true).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::harness::{
    App, BPF_CGROUP_INET4_CONNECT, Bpffs, Cgroup, ConnectOptions, ForeignCgroupProg, Netns, Peer,
    Topology, cgroup_attached_prog_ids, list_netns, prog_name, require_root,
};
use sluice_tests::peer::EventKind;

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(5);

fn testkit() -> &'static Path {
    Path::new(TESTKIT)
}

#[test]
fn pods_reach_each_other_over_both_families_and_nothing_else() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(2).unwrap();
    let (pod0, pod1) = (topo.pod(0), topo.pod(1));
    let server = App::spawn(testkit(), Some(pod1.path()), None).unwrap();
    server.listen(8080).unwrap();
    let client = App::spawn(testkit(), Some(pod0.path()), None).unwrap();

    for (dst, src) in [
        (IpAddr::from(pod1.ipv4), IpAddr::from(pod0.ipv4)),
        (pod1.ipv6.into(), pod0.ipv6.into()),
    ] {
        let r = client
            .connect(SocketAddr::new(dst, 8080), Some("ping"))
            .unwrap();
        r.ensure_ok().unwrap();
        assert_eq!(r.peername, Some(SocketAddr::new(dst, 8080)));
        assert_eq!(r.banner_peer().map(|a| a.ip()), Some(src), "{r:?}");
        assert_eq!(r.banner_peer(), r.sockname);
        assert_eq!(r.echo.as_deref(), Some("ping"));
        let accepted = server
            .wait_event(
                |e| e["event"] == "accepted" && e["peer"] == r.sockname.unwrap().to_string(),
                WAIT,
            )
            .unwrap();
        assert_eq!(accepted["port"], 8080);
    }

    // No default route: anything outside the topology fails locally.
    let off_machine = client
        .connect("198.51.100.1:80".parse().unwrap(), None)
        .unwrap();
    assert!(!off_machine.ok);
    assert_eq!(
        off_machine.errno,
        Some(libc::ENETUNREACH),
        "{off_machine:?}"
    );
    let off_machine6 = client
        .connect("[2001:db8::1]:80".parse().unwrap(), None)
        .unwrap();
    assert_eq!(
        off_machine6.errno,
        Some(libc::ENETUNREACH),
        "{off_machine6:?}"
    );

    // A held connection stays usable until closed.
    let held = client
        .hold("c1", SocketAddr::new(pod1.ipv4.into(), 8080))
        .unwrap();
    held.ensure_ok().unwrap();
    assert_eq!(
        client.ping("c1", "again").unwrap().echo.as_deref(),
        Some("again")
    );
    client.close("c1").unwrap();
    assert!(!client.ping("c1", "gone").unwrap().ok);

    client
        .loop_start(
            "l1",
            SocketAddr::new(pod1.ipv6.into(), 8080),
            Duration::from_millis(5),
        )
        .unwrap();
    server
        .wait_event(
            |e| {
                e["event"] == "accepted"
                    && e["local"].as_str().is_some_and(|l| l.starts_with("[fd77"))
            },
            WAIT,
        )
        .unwrap();
    let stats = client.loop_stop("l1").unwrap();
    assert!(stats.attempts >= 1 && stats.failures == 0, "{stats:?}");
}

#[test]
fn peer_listens_and_answers_dns_and_hbone_connect() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(2).unwrap();
    let (pod0, pod1) = (topo.pod(0), topo.pod(1));
    let cgroup = Cgroup::new("sluice-smoke-").unwrap();
    let peer =
        Peer::start_tagged(testkit(), Some(pod0.path()), Some(&cgroup), Some("pod0")).unwrap();
    assert_eq!(cgroup.procs().unwrap(), vec![peer.pid() as i32]);

    let app = App::spawn(testkit(), Some(pod0.path()), Some(&cgroup)).unwrap();
    for server in ["127.0.0.1:15053", "[::1]:15053"] {
        let server: SocketAddr = server.parse().unwrap();
        let udp = app.dns_udp(server, false).unwrap();
        assert!(udp.ok && udp.valid, "{udp:?}");
        assert_eq!(udp.reply_from, Some(server));
        let ev = peer.wait_event(|e| e["event"] == "dns_udp", WAIT).unwrap();
        assert_eq!(ev["local"], server.to_string());
        assert_eq!(ev["netns"], "pod0");

        let tcp = app.dns_tcp(server).unwrap();
        assert!(tcp.ok && tcp.valid, "{tcp:?}");
        let ev = peer.wait_event(|e| e["event"] == "dns_tcp", WAIT).unwrap();
        assert_eq!(ev["orig_dst_from"], "local");
    }

    // HBONE CONNECT: the peer reaches pod1 with the client's (pod0's) IP as source.
    let server = App::spawn(testkit(), Some(pod1.path()), None).unwrap();
    server.listen(8080).unwrap();
    let target = SocketAddr::new(pod1.ipv4.into(), 8080);
    let opts = ConnectOptions {
        preface: Some(format!("CONNECT {target}")),
        send: Some("through".into()),
        ..Default::default()
    };
    let r = app
        .connect_with(SocketAddr::new(pod0.ipv4.into(), 15008), &opts)
        .unwrap();
    r.ensure_ok().unwrap();
    assert_eq!(r.echo.as_deref(), Some("through"));
    assert_eq!(
        r.banner_peer().map(|a| a.ip()),
        Some(IpAddr::from(pod0.ipv4))
    );
    let connected = peer
        .wait_event(|e| e["event"] == "hbone_connected", WAIT)
        .unwrap();
    assert_eq!(connected["orig_dst"], target.to_string());

    // Nothing redirected this connection, so its original destination is 15001 itself;
    // the peer refuses to proxy to itself instead of looping.
    let direct = app
        .connect("127.0.0.1:15001".parse().unwrap(), None)
        .unwrap();
    assert!(!direct.ok);
    let failed = peer
        .wait_event(|e| e["event"] == "outbound_failed", WAIT)
        .unwrap();
    assert_eq!(failed["errno"], libc::ELOOP);
}

#[test]
fn foreign_cgroup_prog_is_listed_while_attached() {
    if !require_root() {
        return;
    }
    let cgroup = Cgroup::new("sluice-smoke-").unwrap();
    let prog = ForeignCgroupProg::attach(&cgroup).unwrap();
    let ids = cgroup_attached_prog_ids(&cgroup, BPF_CGROUP_INET4_CONNECT).unwrap();
    assert_eq!(ids, vec![prog.id()]);
    assert_eq!(prog_name(prog.id()).unwrap(), "foreign_test");
    drop(prog);
    let deadline = Instant::now() + WAIT;
    while !cgroup_attached_prog_ids(&cgroup, BPF_CGROUP_INET4_CONNECT)
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "program still attached after drop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guards_clean_up() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(2).unwrap();
    let names: Vec<String> = std::iter::once(topo.node().name().to_string())
        .chain(topo.pods().iter().map(|p| p.netns.name().to_string()))
        .collect();
    let listed = list_netns().unwrap();
    assert!(
        names.iter().all(|n| listed.contains(n)),
        "{names:?} not in {listed:?}"
    );
    // The node forwards between pods; pods have no default route.
    assert_eq!(topo.node().read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    let routes = topo.pod(0).netns.ip(&["route", "show", "default"]).unwrap();
    assert!(routes.trim().is_empty(), "{routes}");
    drop(topo);
    let listed = list_netns().unwrap();
    assert!(
        names.iter().all(|n| !listed.contains(n)),
        "{names:?} left in {listed:?}"
    );

    let cgroup = Cgroup::new("sluice-smoke-").unwrap();
    let ns = Netns::new("slsmoke").unwrap();
    let app = App::spawn(testkit(), Some(ns.path()), Some(&cgroup)).unwrap();
    let pid = app.pid();
    let cg_path = cgroup.path().to_path_buf();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        {
            let ns_file = std::fs::metadata(ns.path()).unwrap();
            use std::os::unix::fs::MetadataExt;
            std::path::PathBuf::from(format!("net:[{}]", ns_file.ino()))
        }
    );
    // Dropping the cgroup first kills the process still in it.
    drop(cgroup);
    assert!(!cg_path.exists());
    assert!(app.listen(1).is_err(), "app survived its cgroup");
    drop(app);
    drop(ns);

    let bpffs = Bpffs::new().unwrap();
    let dir = bpffs.path().to_path_buf();
    std::fs::create_dir(&dir).unwrap();
    drop(bpffs);
    assert!(!dir.exists());
}

/// The library form of the peer, as a ZDS client would use it: listeners created in a
/// netns given by fd, from a process that itself stays in its own netns.
#[test]
fn library_peer_serves_inside_a_netns_fd() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(2).unwrap();
    let (pod0, pod1) = (topo.pod(0), topo.pod(1));
    let (tx, rx) = std::sync::mpsc::channel();
    let netns = pod0.netns.open().unwrap();
    let peer = sluice_tests::peer::Peer::start_in_netns(
        std::os::fd::AsFd::as_fd(&netns),
        tx,
        Some("uid-0".into()),
    )
    .unwrap();
    let first = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(first.kind, EventKind::Ready);
    assert_eq!(first.netns.as_deref(), Some("uid-0"));

    let server = App::spawn(testkit(), Some(pod1.path()), None).unwrap();
    server.listen(8080).unwrap();
    let app = App::spawn(testkit(), Some(pod0.path()), None).unwrap();
    // Upstream sockets must be made in pod0's netns too, or pod1 would be unreachable.
    let target = SocketAddr::new(pod1.ipv6.into(), 8080);
    let opts = ConnectOptions {
        preface: Some(format!("CONNECT {target}")),
        ..Default::default()
    };
    let r = app
        .connect_with(SocketAddr::new(pod0.ipv6.into(), 15008), &opts)
        .unwrap();
    r.ensure_ok().unwrap();
    assert_eq!(
        r.banner_peer().map(|a| a.ip()),
        Some(IpAddr::from(pod0.ipv6))
    );
    let connected = std::iter::from_fn(|| rx.recv_timeout(WAIT).ok())
        .find(|e| matches!(e.kind, EventKind::HboneConnected(_)))
        .unwrap();
    let EventKind::HboneConnected(c) = connected.kind else {
        unreachable!()
    };
    assert_eq!(c.orig_dst, target);
    assert_eq!(c.upstream_local.ip(), IpAddr::from(pod0.ipv6));

    peer.stop();
    let after = app.dns_tcp("127.0.0.1:15053".parse().unwrap()).unwrap();
    assert_eq!(after.errno, Some(libc::ECONNREFUSED), "{after:?}");
}
