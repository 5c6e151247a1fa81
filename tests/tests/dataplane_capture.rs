//! Capture exactly as tight as upstream's, and its edges: one test per numbered point of the
//! dataplane issue that is not a traffic-table row (those are in `dataplane_rules.rs`; point 1
//! is there too, points 3, 5 and 6 are in `dataplane_lifecycle.rs`). Real namespaces, veths
//! and eBPF on the running kernel; "ztunnel" is the testkit peer.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_agent::dataplane::EnrollOptions;
use sluice_common::Counter;
use sluice_tests::{
    fixture::DataplaneFixture,
    harness::{ConnectOptions, require_root},
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(5);

fn fixture(pods: usize) -> Option<DataplaneFixture> {
    if !require_root() {
        return None;
    }
    Some(DataplaneFixture::new(Path::new(TESTKIT), pods, false).expect("fixture"))
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

fn is(event: &'static str, field: &'static str, want: SocketAddr) -> impl Fn(&Value) -> bool {
    move |e| {
        e["event"] == event
            && e[field].as_str().and_then(|s| s.parse::<SocketAddr>().ok()) == Some(want)
    }
}

fn count(fx: &mut DataplaneFixture, which: Counter) -> u64 {
    fx.dp()
        .counters()
        .into_iter()
        .find(|(c, _)| *c == which)
        .map(|(_, v)| v)
        .unwrap_or(0)
}

/// Waits until `which` has grown past `above`: the programs made the decision. (A per-CPU
/// counter has no change notification; it moves within microseconds.)
fn wait_counter(fx: &mut DataplaneFixture, which: Counter, above: u64) {
    wait_for(|| {
        (count(fx, which) > above)
            .then_some(())
            .ok_or_else(|| format!("{which:?} stayed at {above}"))
    });
}

/// Polls `check`, for state that has no change notification, until it holds; fails with its
/// last answer after `WAIT`.
fn wait_for<E: std::fmt::Debug>(mut check: impl FnMut() -> Result<(), E>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) => assert!(Instant::now() < deadline, "{last:?}"),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn quick(timeout_ms: u64) -> ConnectOptions {
    ConnectOptions {
        timeout_ms: Some(timeout_ms),
        ..Default::default()
    }
}

/// Point 2: only ztunnel's (marked) listeners receive captured traffic. An app that binds
/// 15006 and 15008 while ztunnel is away receives nothing: inbound is dropped, silently (the
/// client's SYN gets no answer, as with TPROXY), and counted; a client still retrying when
/// ztunnel's listener is back gets through to it.
#[test]
fn only_ztunnels_listeners_receive_captured_traffic() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let squatter = fx.app(1).unwrap();
    squatter.listen(15006).unwrap();
    squatter.listen(15008).unwrap();
    let app = fx.app(1).unwrap();
    app.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let pod1 = fx.pod(1).ips();
    for dst in pod1 {
        for port in [8080, 15006, 15008] {
            let r = client.connect_with(sa(dst, port), &quick(600)).unwrap();
            assert!(!r.ok, "{r:?}");
            assert_eq!(r.stage.as_deref(), Some("connect"), "{r:?}");
            assert_eq!(
                r.errno,
                Some(libc::ETIMEDOUT),
                "dropped without an answer, not refused: {r:?}"
            );
        }
    }
    assert!(count(&mut fx, Counter::InboundNoListener) >= 6);
    let accepted = |a: &sluice_tests::harness::App| {
        a.events()
            .into_iter()
            .filter(|e| e["event"] == "accepted")
            .count()
    };
    assert_eq!(accepted(&squatter), 0, "the squatter got captured traffic");
    assert_eq!(accepted(&app), 0, "the app got traffic around ztunnel");

    // ztunnel comes back (the squatter gives the ports up first, as it would have to).
    drop(squatter);
    let before = count(&mut fx, Counter::InboundNoListener);
    std::thread::scope(|s| {
        let retrying = s.spawn(|| {
            client
                .connect_with(sa(pod1[0], 8080), &quick(5000))
                .unwrap()
        });
        // Its first SYN has been dropped; then the listener returns.
        wait_counter(&mut fx, Counter::InboundNoListener, before);
        let peer = fx.peer(1).unwrap();
        let r = retrying.join().unwrap();
        r.ensure_ok().unwrap();
        peer.wait_event(is("inbound", "orig_dst", sa(pod1[0], 8080)), WAIT)
            .unwrap();
    });
}

/// Point 4: SO_ORIGINAL_DST answers are never stale or lost to another pod's churn. There is
/// no per-connection state to lose: the answer is ztunnel's accepted socket's own local
/// address. Pod A opens 100,000 short connections (client closing first) to 200 destinations,
/// each accepted by its ztunnel, which reads the original destination; meanwhile pod B's
/// connections all get their true original destination, and no map grows with any of them.
/// (`SLUICE_TEST_CHURN` lowers the count where connections are slow: the VM suite, under
/// software emulation.)
#[test]
fn original_destinations_survive_another_pods_churn() {
    let churn_count: u64 = std::env::var("SLUICE_TEST_CHURN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let Some(mut fx) = fixture(3) else { return };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    fx.enroll(1, EnrollOptions::default()).unwrap();
    // A's ztunnel: accept, read the original destination, close (no proxying).
    let ztunnel_a = fx.app(0).unwrap();
    ztunnel_a.sink_start(15001).unwrap();
    let peer_b = fx.peer(1).unwrap();
    let server = fx.app(2).unwrap();
    server.listen(8080).unwrap();
    let mut churner = fx.app(0).unwrap();
    churner.set_timeout(Duration::from_secs(300));
    let b = fx.app(1).unwrap();
    let target = sa(fx.pod(2).ips()[0], 8080);
    let destinations: Vec<SocketAddr> = (0..200u16)
        .map(|i| sa([198, 51, 100, (i % 100 + 1) as u8], 1000 + i))
        .collect();
    let fill_before = fx.dp().map_fill();

    // A churn this fast on a small machine overflows the kernel's per-CPU backlog of `lo`
    // packets now and then, for iptables as much as here: B's connects may need a SYN retry.
    b.loop_start_with_timeout(
        "b",
        target,
        Duration::from_millis(5),
        Duration::from_secs(10),
    )
    .unwrap();
    let churn = churner
        .churn(&destinations, churn_count, Duration::from_secs(3))
        .unwrap();
    let stats = b.loop_stop("b").unwrap();
    let sink = ztunnel_a.sink_stop().unwrap();
    eprintln!("churn: {churn}; A's ztunnel: {sink}; pod B: {stats:?}");

    // The same load may cost A a SYN now and then (a connect timeout, never an error that
    // redirection could cause); every connection ztunnel accepted had its true destination.
    let failed = churn["failures"].as_u64().unwrap();
    assert!(failed * 100 <= churn_count, "{churn}");
    let errnos = churn["errnos"].as_object().unwrap();
    assert!(
        errnos.keys().all(|e| *e == libc::ETIMEDOUT.to_string()),
        "{churn}"
    );
    let accepted = sink["accepted"].as_u64().unwrap();
    assert!(
        (churn_count - failed..=churn_count).contains(&accepted),
        "{sink} {churn}"
    );
    // A connection reset before ztunnel read its destination (its client's kernel may drop
    // orphaned closed sockets under this load) has none to read; every other one answered.
    let gone = sink["gone"].as_u64().unwrap();
    assert_eq!(
        sink["answered"].as_u64().unwrap() + gone,
        accepted,
        "{sink}"
    );
    assert_eq!(sink["wrong"], 0, "{sink}");
    // B's own connections may lose a SYN to the churn's load (see above); what this test is
    // about is that every connection ztunnel got had its true original destination.
    assert!(
        stats.failures * 100 <= stats.attempts,
        "more than 1% of B's connections failed: {stats:?}"
    );
    assert!(
        stats
            .first_error
            .as_ref()
            .is_none_or(|e| e["errno"] == libc::ETIMEDOUT),
        "{stats:?}"
    );
    let b_outbound: Vec<Value> = peer_b
        .events()
        .into_iter()
        .filter(|e| e["event"] == "outbound")
        .collect();
    assert!(
        b_outbound.len() as u64 >= stats.attempts - stats.failures,
        "{stats:?}"
    );
    for ev in &b_outbound {
        assert_eq!(addr(&ev["orig_dst"]), target, "{ev}");
        assert_eq!(ev["orig_dst_from"], "sol_ip", "{ev}");
    }
    // Nothing per connection was kept: the maps are as full as before.
    let fill_after = fx.dp().map_fill();
    for (before, after) in fill_before.iter().zip(&fill_after) {
        assert!(
            after.used <= before.used + 8,
            "{} grew with the churn: {before:?} → {after:?}",
            after.name
        );
    }
}

/// Point 7: the hook covers the whole namespace. A link added to the pod after enrollment
/// that carries traffic for the pod's address is captured like `eth0`; an address that was
/// not there at enrollment is never reached around ztunnel (dropped, and counted).
#[test]
fn interfaces_added_after_enrollment_are_covered() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let peer = fx.peer(1).unwrap();
    let app = fx.app(1).unwrap();
    app.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let (pod0, pod1) = (fx.pod(0), fx.pod(1));
    let node = fx.topo.node();
    // A second link between node and pod1 (as Multus would add), with an address of its own.
    sluice_tests::harness::ip(&[
        "link",
        "add",
        "eth1",
        "netns",
        pod1.netns.name(),
        "type",
        "veth",
        "peer",
        "name",
        "pod1b",
        "netns",
        node.name(),
    ])
    .unwrap();
    pod1.netns
        .ip(&["addr", "add", "10.78.1.2/24", "dev", "eth1"])
        .unwrap();
    pod1.netns.ip(&["link", "set", "eth1", "up"]).unwrap();
    node.ip(&["addr", "add", "10.78.1.1/24", "dev", "pod1b"])
        .unwrap();
    node.ip(&["link", "set", "pod1b", "up"]).unwrap();
    // The node now reaches pod1's IP over the new link only.
    node.ip(&["route", "add", &format!("{}/32", pod1.ipv4), "dev", "pod1b"])
        .unwrap();
    pod0.netns
        .ip(&[
            "route",
            "add",
            "10.78.1.0/24",
            "via",
            &pod0.node_ipv4.to_string(),
        ])
        .unwrap();
    wait_carrier(&pod1.netns, "eth1");

    let dst = sa(pod1.ipv4, 8080);
    let rx_before = rx_packets(&pod1.netns, "eth1");
    let r = client.connect(dst, Some("ping")).unwrap();
    r.ensure_ok().unwrap();
    assert_eq!(r.echo.as_deref(), Some("ping"));
    peer.wait_event(is("inbound", "orig_dst", dst), WAIT)
        .unwrap();
    assert!(
        rx_packets(&pod1.netns, "eth1") > rx_before,
        "the connection came in over the new link"
    );

    let unknown = before_and_after(&mut fx, Counter::UnknownAddress, |fx| {
        let r = client
            .connect_with(sa([10, 78, 1, 2], 8080), &quick(600))
            .unwrap();
        assert_eq!(r.errno, Some(libc::ETIMEDOUT), "{r:?}");
        let _ = fx;
    });
    assert!(unknown >= 1);
    let around: Vec<Value> = app
        .events()
        .into_iter()
        .filter(|e| e["event"] == "accepted" && e["local"] == "10.78.1.2:8080")
        .collect();
    assert!(
        around.is_empty(),
        "the app was reached around ztunnel: {around:?}"
    );
}

fn rx_packets(ns: &sluice_tests::harness::Netns, ifname: &str) -> u64 {
    let json: Value =
        serde_json::from_str(&ns.ip(&["-j", "-s", "link", "show", "dev", ifname]).unwrap())
            .unwrap();
    json[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// No event to wait on short of a netlink monitor; carrier comes within milliseconds.
fn wait_carrier(ns: &sluice_tests::harness::Netns, ifname: &str) {
    wait_for(|| {
        ns.ip(&["-o", "link", "show", "dev", ifname])
            .unwrap()
            .contains("LOWER_UP")
            .then_some(())
            .ok_or_else(|| format!("{ifname} has no carrier"))
    });
}

/// How much `which` grew while `f` ran.
fn before_and_after(
    fx: &mut DataplaneFixture,
    which: Counter,
    f: impl FnOnce(&mut DataplaneFixture),
) -> u64 {
    let before = count(fx, which);
    f(fx);
    count(fx, which) - before
}

/// Point 8: TCP fragments. Socket lookup happens after reassembly, so fragments are neither
/// dropped nor treated apart: fragmented segments (IPv4 without the don't-fragment bit, through
/// a node link with a small MTU) reach ztunnel when captured, and reach the app directly when
/// exempt (a pod with inbound capture bypassed), and each pod did reassemble them.
#[test]
fn fragmented_tcp_is_reassembled_before_any_decision() {
    let Some(mut fx) = fixture(3) else { return };
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let bypass = EnrollOptions {
        bypass_inbound: true,
        ..Default::default()
    };
    fx.enroll(2, bypass).unwrap();
    let peer1 = fx.peer(1).unwrap();
    let peer2 = fx.peer(2).unwrap();
    let (app1, app2) = (fx.app(1).unwrap(), fx.app(2).unwrap());
    app1.listen(8080).unwrap();
    app2.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let big = "x".repeat(3000);
    let opts = ConnectOptions {
        send: Some(big.clone()),
        fragmentable: true,
        ..Default::default()
    };
    for (i, captured) in [(1, true), (2, false)] {
        let pod = fx.pod(i);
        // The node's side of the pod's link: segments bigger than this are fragmented there.
        fx.topo
            .node()
            .ip(&["link", "set", "dev", &pod.node_ifname, "mtu", "576"])
            .unwrap();
        let dst = sa(pod.ipv4, 8080);
        let before = reasm_oks(&pod.netns);
        let r = client.connect_with(dst, &opts).unwrap();
        r.ensure_ok().unwrap();
        assert_eq!(r.echo.as_deref(), Some(big.as_str()), "pod{i}");
        assert!(
            reasm_oks(&pod.netns) > before,
            "pod{i} received the segments fragmented"
        );
        if captured {
            peer1
                .wait_event(is("inbound", "orig_dst", dst), WAIT)
                .unwrap();
        } else {
            assert_eq!(r.banner_peer(), r.sockname, "straight to the app");
        }
    }
    assert!(peer2.events().iter().all(|e| e["event"] != "inbound"));
}

/// `Ip: ... ReasmOKs` of the netns.
fn reasm_oks(ns: &sluice_tests::harness::Netns) -> u64 {
    let snmp = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap())
        .unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "ReasmOKs")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Point 9: the return path covers the kernel's own replies. ztunnel forwards an inbound
/// connection to an app port where nothing listens: the pod's RST (to the client's address,
/// which ztunnel's connection uses as source) comes back to ztunnel at once, so ztunnel is
/// refused rather than waiting for its timeout, and so is the client.
#[test]
fn a_closed_app_port_is_refused_through_ztunnel_at_once() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let peer = fx.peer(1).unwrap();
    let client = fx.app(0).unwrap();
    for dst in fx.pod(1).ips() {
        let dst = sa(dst, 9999);
        let started = Instant::now();
        let r = client.connect(dst, None).unwrap();
        let took = started.elapsed();
        assert!(!r.ok, "{r:?}");
        assert_eq!(r.stage.as_deref(), Some("banner"), "{r:?}");
        let failed = peer
            .wait_event(is("inbound_failed", "orig_dst", dst), WAIT)
            .unwrap();
        assert_eq!(failed["errno"], libc::ECONNREFUSED, "{failed}");
        // ztunnel's own connect timeout is 5 s; the client's read timeout 3 s.
        assert!(took < Duration::from_secs(1), "refused after {took:?}");
    }
}

/// Point 9, the other way round: the app's kernel answers ztunnel's side of an outbound
/// connection too. The app closes first; ztunnel's side (accepted on 15001, marked 0x539 like
/// its listener) closes later, and must get the app's last ACK, which the app's kernel sends
/// statelessly (its socket is FIN_WAIT2 by then, then TIME_WAIT). Had that ACK followed
/// ztunnel's mark towards the real destination, ztunnel's socket would sit in LAST_ACK
/// retransmitting its FIN, and the destination's reset would end the app's TIME_WAIT early,
/// so that its next connect from that port to that destination lost its SYNs to the stale
/// socket (the churn bench's timeouts).
#[test]
fn ztunnels_side_of_a_connection_the_app_closed_first_finishes_closing() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let ztunnel = fx.app(0).unwrap();
    ztunnel.sink_start_holding(15001).unwrap();
    let app = fx.app(0).unwrap();
    let port = 1999;
    let destinations: Vec<SocketAddr> = fx.pod(1).ips().iter().map(|&ip| sa(ip, port)).collect();
    let churn = app
        .churn(&destinations, destinations.len() as u64, WAIT)
        .unwrap();
    assert_eq!(churn["failures"], 0, "{churn}");

    let ns = &fx.pod(0).netns;
    let sockets = || ns.run(|| tcp_sockets(port)).unwrap();
    // The app's close is acknowledged: its sockets are FIN_WAIT2, ztunnel's CLOSE_WAIT.
    wait_for(|| {
        let s = sockets();
        let app_waiting = s
            .iter()
            .filter(|s| !s.local && s.state == FIN_WAIT2)
            .count();
        (app_waiting == destinations.len()).then_some(()).ok_or(s)
    });
    let sink = ztunnel.sink_stop().unwrap();
    assert_eq!(sink["accepted"], destinations.len() as u64, "{sink}");
    // ztunnel has closed: nothing of its side may be left (no LAST_ACK waiting for an ACK
    // that went elsewhere; it would retransmit its FIN for minutes).
    wait_for(|| {
        let s = sockets();
        s.iter().all(|s| !s.local).then_some(()).ok_or(s)
    });
}

const FIN_WAIT2: u8 = 5;

#[derive(Debug)]
struct TcpSocket {
    /// `port` is its local port (ztunnel's side), else its remote port (the app's).
    local: bool,
    /// As in `/proc/net/tcp`.
    state: u8,
}

/// This netns's TCP sockets (both families) whose local or remote port is `port`.
fn tcp_sockets(port: u16) -> Vec<TcpSocket> {
    let port = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|f| {
            let path = format!("/proc/thread-self/net/{f}");
            let table = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            table
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let mut cols = l.split_whitespace().skip(1);
                    let (local, remote, state) = (cols.next()?, cols.next()?, cols.next()?);
                    let state = u8::from_str_radix(state, 16).ok()?;
                    if local.ends_with(&port) {
                        Some(TcpSocket { local: true, state })
                    } else if remote.ends_with(&port) {
                        Some(TcpSocket {
                            local: false,
                            state,
                        })
                    } else {
                        None
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Point 10: an unconnected UDP socket that queries several servers (musl asks every
/// nameserver at once) gets each reply attributed to the server it asked.
#[test]
fn each_dns_reply_comes_from_the_server_that_was_asked() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let _peer = fx.peer(0).unwrap();
    let app = fx.app(0).unwrap();
    let (pod0, pod1) = (fx.pod(0), fx.pod(1));
    for servers in [
        [sa(pod0.node_ipv4, 53), sa(pod1.node_ipv4, 53)],
        [sa(pod0.node_ipv6, 53), sa(pod1.node_ipv6, 53)],
    ] {
        let r = app.dns_udp_multi(&servers).unwrap();
        let sent = r["sent"].as_array().unwrap();
        let replies = r["replies"].as_array().unwrap();
        assert_eq!(replies.len(), servers.len(), "{r}");
        for reply in replies {
            let asked = sent
                .iter()
                .find(|s| s["id"] == reply["id"])
                .unwrap_or_else(|| panic!("a reply to no query: {r}"));
            assert_eq!(
                addr(&reply["from"]),
                addr(&asked["server"]),
                "reply attributed to another server: {r}"
            );
        }
    }
}
