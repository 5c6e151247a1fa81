//! One test per row of the traffic table in docs/traffic-rules.md, on the running kernel's eBPF, with real
//! namespaces and veths. Pods are network namespaces; "ztunnel" is the testkit peer, which
//! behaves like ztunnel inside a pod (marks, IP_TRANSPARENT, SO_ORIGINAL_DST, spoofed source).
//! Assertions are on what the app, the peer and the other side observed.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use sluice_agent::dataplane::EnrollOptions;
use sluice_common::Counter;
use sluice_tests::{
    fixture::DataplaneFixture,
    harness::{App, ConnectOptions, ConnectResult, Peer, require_root},
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(5);
/// How long we wait for something that must NOT happen, after a positive signal that the
/// traffic concerned has already completed (so this is a margin, not a synchronisation).
const SETTLE: Duration = Duration::from_millis(300);

fn fixture(pods: usize, accelerate: bool) -> Option<DataplaneFixture> {
    if !require_root() {
        return None;
    }
    Some(DataplaneFixture::new(Path::new(TESTKIT), pods, accelerate).expect("fixture"))
}

/// The usual cast: pod `pod` enrolled with its peer ("ztunnel"), a server on :8080 in pod 1,
/// and a client app in `client_pod`.
struct Scene {
    fx: DataplaneFixture,
    peer: Peer,
    server: App,
    client: App,
}

fn scene(pods: usize, pod: usize, client_pod: usize) -> Option<Scene> {
    let mut fx = fixture(pods, false)?;
    fx.enroll(pod, EnrollOptions::default()).unwrap();
    let peer = fx.peer(pod).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(client_pod).unwrap();
    Some(Scene {
        fx,
        peer,
        server,
        client,
    })
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

/// The connection went straight to the server: the server saw the client socket itself.
fn assert_direct(r: &ConnectResult) {
    r.ensure_ok().unwrap();
    assert_eq!(
        r.banner_peer(),
        r.sockname,
        "expected a direct connection: {r:?}"
    );
}

fn assert_no_event(peer: &Peer, kind: &str) {
    std::thread::sleep(SETTLE);
    let unexpected: Vec<Value> = peer
        .events()
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected {kind} events: {unexpected:?}"
    );
}

/// Row 1: outbound TCP → 15001 on the pod IP; SO_ORIGINAL_DST answers the original destination
/// (at SOL_IP for IPv4, at SOL_IPV6 for IPv6); the app still sees its original peer.
#[test]
fn outbound_tcp_goes_to_ztunnel_with_its_original_destination() {
    let Some(Scene {
        mut fx,
        peer,
        server: _server,
        client,
    }) = scene(2, 0, 0)
    else {
        return;
    };
    let (pod0, pod1) = (fx.pod(0), fx.pod(1));

    for (src, dst, level) in [
        (pod0.ips()[0], pod1.ips()[0], "sol_ip"),
        (pod0.ips()[1], pod1.ips()[1], "sol_ipv6"),
    ] {
        let r = client.connect(sa(dst, 8080), Some("ping")).unwrap();
        r.ensure_ok().unwrap();
        assert_eq!(
            r.peername,
            Some(sa(dst, 8080)),
            "the app sees its original peer"
        );
        let ev = peer
            .wait_event(is("outbound", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
        assert_eq!(ev["orig_dst_from"], level, "{ev}");
        assert_eq!(
            Some(addr(&ev["peer"])),
            r.sockname,
            "ztunnel's peer is the app socket"
        );
        assert_eq!(
            addr(&ev["local"]),
            sa(dst, 8080),
            "TPROXY-like: ztunnel's socket has the original destination as local address"
        );
        // The server was reached by ztunnel's own connection, from the pod.
        let seen = r.banner_peer().unwrap();
        assert_eq!(seen.ip(), src);
        assert_ne!(Some(seen), r.sockname);
        assert_eq!(r.echo.as_deref(), Some("ping"));
    }

    // A destination with no route at all is still redirected: connect succeeds (to ztunnel),
    // and it is ztunnel that fails to go further.
    for dst in ["198.51.100.1:80", "[2001:db8::1]:80"] {
        let dst: SocketAddr = dst.parse().unwrap();
        let r = client.connect(dst, None).unwrap();
        assert_ne!(
            r.stage.as_deref(),
            Some("connect"),
            "connect must reach ztunnel: {r:?}"
        );
        assert_eq!(r.peername, Some(dst));
        peer.wait_event(is("outbound", "orig_dst", dst), WAIT)
            .unwrap();
        let failed = peer
            .wait_event(is("outbound_failed", "orig_dst", dst), WAIT)
            .unwrap();
        assert_eq!(failed["errno"], libc::ENETUNREACH, "{failed}");
    }
    let counters = fx.dp().counters();
    assert!(
        count(&counters, Counter::OutboundRedirected) >= 4,
        "{counters:?}"
    );
    assert!(
        count(&counters, Counter::OrigDstAnswered) >= 4,
        "{counters:?}"
    );
}

/// Rows 2 and 5: inbound TCP → 15006, whose accepted socket has the original destination as
/// local address; ztunnel connects to the app from the client's address and the app's replies
/// come back to it (the client gets the banner and its echo).
#[test]
fn inbound_tcp_goes_to_ztunnel_and_the_app_sees_the_client() {
    let Some(Scene {
        mut fx,
        peer,
        server: _server,
        client,
    }) = scene(2, 1, 0)
    else {
        return;
    };
    let (pod0, pod1) = (fx.pod(0), fx.pod(1));

    for (src, dst) in [
        (pod0.ips()[0], pod1.ips()[0]),
        (pod0.ips()[1], pod1.ips()[1]),
    ] {
        let r = client.connect(sa(dst, 8080), Some("ping")).unwrap();
        r.ensure_ok().unwrap();
        let ev = peer
            .wait_event(is("inbound", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
        assert_eq!(
            ev["orig_dst_from"], "local",
            "TPROXY-like: the local address is the original destination"
        );
        assert_eq!(Some(addr(&ev["peer"])), r.sockname);
        peer.wait_event(is("inbound_connected", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
        // The app sees the real client address, on a connection ztunnel made.
        let seen = r.banner_peer().unwrap();
        assert_eq!(seen.ip(), src);
        assert_ne!(
            Some(seen),
            r.sockname,
            "the app's peer is ztunnel's socket, not the client's"
        );
        assert_eq!(
            r.echo.as_deref(),
            Some("ping"),
            "the app's replies reached ztunnel"
        );
    }
    let counters = fx.dp().counters();
    assert!(
        count(&counters, Counter::InboundRedirected) >= 2,
        "{counters:?}"
    );
    assert!(count(&counters, Counter::ReplyMarked) >= 2, "{counters:?}");
}

/// Row 3 (HBONE): inbound to 15008 reaches ztunnel's own listener untouched.
#[test]
fn hbone_port_passes_untouched() {
    let Some(Scene {
        fx,
        peer,
        server: _server,
        client,
    }) = scene(2, 1, 0)
    else {
        return;
    };
    let pod1 = fx.pod(1);
    for dst in pod1.ips() {
        let opts = ConnectOptions {
            preface: Some(format!("CONNECT {}", sa(dst, 8080))),
            send: Some("x".into()),
            ..Default::default()
        };
        let r = client.connect_with(sa(dst, 15008), &opts).unwrap();
        r.ensure_ok().unwrap();
        let ev = peer
            .wait_event(is("hbone", "local", sa(dst, 15008)), WAIT)
            .unwrap();
        assert_eq!(Some(addr(&ev["peer"])), r.sockname);
    }
    assert_no_event(&peer, "inbound");
}

/// Row 3: sockets marked 0x539, loopback, and the pod's own addresses are not redirected.
#[test]
fn marked_loopback_and_own_address_traffic_is_untouched() {
    let Some(Scene {
        fx,
        peer,
        server: _server,
        client,
    }) = scene(2, 0, 0)
    else {
        return;
    };
    client.listen(9090).unwrap();
    let (pod0, pod1) = (fx.pod(0), fx.pod(1));

    for dst in pod1.ips() {
        let marked = ConnectOptions {
            mark: Some(0x539),
            ..Default::default()
        };
        assert_direct(&client.connect_with(sa(dst, 8080), &marked).unwrap());
    }
    let local: Vec<IpAddr> = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()]
        .into_iter()
        .chain(pod0.ips())
        .collect();
    for dst in local {
        assert_direct(&client.connect(sa(dst, 9090), None).unwrap());
    }
    assert_no_event(&peer, "outbound");
}

/// Issue point 1: only connections opened by the node's own sockets are exempt. A process in
/// the node namespace (kubelet) reaches the app directly and the app sees its real address;
/// traffic merely masqueraded to the node's address on its way through the node (kube-proxy's
/// MASQUERADE for NodePort, here an iptables rule in the test's own node namespace) is captured.
#[test]
fn only_the_nodes_own_connections_are_exempt_from_inbound_capture() {
    let Some(mut fx) = fixture(2, false) else {
        return;
    };
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let peer = fx.peer(1).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let kubelet = fx.node_app().unwrap();
    let outside = fx.app(0).unwrap();
    let pod1 = fx.pod(1);
    let node = fx.topo.node();
    for (cmd, node_addr) in [
        ("iptables", IpAddr::from(pod1.node_ipv4)),
        ("ip6tables", IpAddr::from(pod1.node_ipv6)),
    ] {
        node.run(|| {
            let st = std::process::Command::new(cmd)
                .args([
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    &pod1.node_ifname,
                    "-j",
                    "MASQUERADE",
                ])
                .status()
                .unwrap();
            assert!(st.success(), "{cmd} MASQUERADE");
        })
        .unwrap();
        let dst = if node_addr.is_ipv4() {
            pod1.ips()[0]
        } else {
            pod1.ips()[1]
        };
        // kubelet: straight to the app, which sees the node's address and kubelet's own port.
        let r = kubelet.connect(sa(dst, 8080), None).unwrap();
        assert_direct(&r);
        assert_eq!(r.banner_peer().unwrap().ip(), node_addr);
        // Forwarded and masqueraded: it carries the node's address, and goes to ztunnel.
        let r = outside.connect(sa(dst, 8080), Some("ping")).unwrap();
        r.ensure_ok().unwrap();
        let ev = peer
            .wait_event(is("inbound", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
        assert_eq!(
            addr(&ev["peer"]).ip(),
            node_addr,
            "masqueraded to the node's address: {ev}"
        );
        assert_eq!(r.echo.as_deref(), Some("ping"));
    }
    let counters = fx.dp().counters();
    assert!(count(&counters, Counter::NodeExempt) >= 2, "{counters:?}");
    assert_eq!(
        fx.dp()
            .map_fill()
            .iter()
            .find(|m| m.name == "SL_NODE_CONNS")
            .unwrap()
            .used,
        0,
        "the node's connects are forgotten once established"
    );
}

/// Row 4: DNS over UDP (connected or not) and TCP goes to 15053; replies appear to come from
/// the server the app asked.
#[test]
fn dns_goes_to_ztunnel_and_replies_come_from_the_server() {
    let Some(mut fx) = fixture(1, false) else {
        return;
    };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let peer = fx.peer(0).unwrap();
    let app = fx.app(0).unwrap();
    let pod0 = fx.pod(0);
    // The node addresses: nothing listens on 53 there.
    for server in [sa(pod0.node_ipv4, 53), sa(pod0.node_ipv6, 53)] {
        for connected in [false, true] {
            let r = app.dns_udp(server, connected).unwrap();
            assert!(r.ok && r.valid, "{r:?}");
            assert_eq!(r.reply_from, Some(server), "{r:?}");
            if connected {
                assert_eq!(r.peername, Some(server));
            }
            let ev = peer.wait_event(|e| e["event"] == "dns_udp", WAIT).unwrap();
            assert_eq!(addr(&ev["local"]).port(), 15053);
        }
        let r = app.dns_tcp(server).unwrap();
        assert!(r.ok && r.valid, "{r:?}");
        assert_eq!(r.peername, Some(server));
        let ev = peer.wait_event(|e| e["event"] == "dns_tcp", WAIT).unwrap();
        assert_eq!(addr(&ev["local"]).port(), 15053);
        assert_eq!(Some(addr(&ev["peer"])), r.sockname, "{ev}");
    }
}

/// Row 4, switched off per pod: UDP DNS goes to the real server (nothing there), TCP DNS is
/// ordinary outbound TCP for ztunnel's 15001.
#[test]
fn dns_capture_can_be_switched_off() {
    let Some(mut fx) = fixture(1, false) else {
        return;
    };
    fx.enroll(
        0,
        EnrollOptions {
            dns_capture: false,
            ..Default::default()
        },
    )
    .unwrap();
    let peer = fx.peer(0).unwrap();
    let app = fx.app(0).unwrap();
    let pod0 = fx.pod(0);
    for server in [sa(pod0.node_ipv4, 53), sa(pod0.node_ipv6, 53)] {
        let r = app.dns_udp(server, true).unwrap();
        assert!(!r.valid, "{r:?}");
        assert_eq!(r.errno, Some(libc::ECONNREFUSED), "{r:?}");
        let _ = app.dns_tcp(server).unwrap();
        peer.wait_event(is("outbound", "orig_dst", server), WAIT)
            .unwrap();
    }
    assert_no_event(&peer, "dns_udp");
}

/// Row 6: with bypass_inbound, inbound goes straight to the app; outbound is still redirected.
#[test]
fn bypass_inbound_leaves_inbound_alone() {
    let Some(mut fx) = fixture(2, false) else {
        return;
    };
    fx.enroll(
        1,
        EnrollOptions {
            bypass_inbound: true,
            ..Default::default()
        },
    )
    .unwrap();
    let peer = fx.peer(1).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let other = fx.app(0).unwrap();
    other.listen(8080).unwrap();
    let (pod0, pod1) = (fx.pod(0), fx.pod(1));
    for dst in pod1.ips() {
        assert_direct(&other.connect(sa(dst, 8080), None).unwrap());
    }
    for dst in pod0.ips() {
        server
            .connect(sa(dst, 8080), None)
            .unwrap()
            .ensure_ok()
            .unwrap();
        peer.wait_event(is("outbound", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
    }
    assert_no_event(&peer, "inbound");
}

/// IPv6 capture switched off (Istio's AMBIENT_IPV6=false): IPv4 is redirected both ways, IPv6
/// goes direct both ways.
#[test]
fn ipv6_capture_can_be_switched_off() {
    let Some(mut fx) = fixture(2, false) else {
        return;
    };
    let no_v6 = EnrollOptions {
        ipv6: false,
        ..Default::default()
    };
    fx.enroll(0, no_v6).unwrap();
    fx.enroll(1, no_v6).unwrap();
    let peer0 = fx.peer(0).unwrap();
    let peer1 = fx.peer(1).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let (v4, v6) = (fx.pod(1).ips()[0], fx.pod(1).ips()[1]);
    client
        .connect(sa(v4, 8080), None)
        .unwrap()
        .ensure_ok()
        .unwrap();
    peer0
        .wait_event(is("outbound", "orig_dst", sa(v4, 8080)), WAIT)
        .unwrap();
    peer1
        .wait_event(is("inbound", "orig_dst", sa(v4, 8080)), WAIT)
        .unwrap();
    assert_direct(&client.connect(sa(v6, 8080), None).unwrap());
    assert_no_event(&peer0, "outbound");
    assert_no_event(&peer1, "inbound");
}

/// Row 7: pods that are not enrolled, and the node, are never affected; unenrolling restores
/// plain behaviour for new connections; connections that existed before enrolling survive
/// enrolling and unenrolling. A connection made through ztunnel ends with unenrolling (its
/// app socket's route to ztunnel is gone, as ztunnel lets go of the pod): at once, with a reset.
#[test]
fn enrollment_is_per_pod_and_reversible_without_breaking_connections() {
    let Some(mut fx) = fixture(3, false) else {
        return;
    };
    let peer = fx.peer(0).unwrap();
    let app0 = fx.app(0).unwrap();
    app0.listen(8080).unwrap();
    let app1 = fx.app(1).unwrap();
    app1.listen(8080).unwrap();
    let app2 = fx.app(2).unwrap();
    let node = fx.node_app().unwrap();
    let (pod0, pod1) = (fx.pod(0).ips(), fx.pod(1).ips());

    // Established before enrollment: one outbound from pod0, one inbound to it.
    app0.hold("out", sa(pod1[0], 8080))
        .unwrap()
        .ensure_ok()
        .unwrap();
    app2.hold("in", sa(pod0[1], 8080))
        .unwrap()
        .ensure_ok()
        .unwrap();

    fx.enroll(0, EnrollOptions::default()).unwrap();
    for (who, id) in [(&app0, "out"), (&app2, "in")] {
        assert_eq!(
            who.ping(id, "still").unwrap().echo.as_deref(),
            Some("still")
        );
    }
    // New connections of pod0 go through ztunnel; one of them stays open across unenroll.
    let via = app0.hold("via", sa(pod1[1], 8080)).unwrap();
    via.ensure_ok().unwrap();
    peer.wait_event(is("outbound", "orig_dst", sa(pod1[1], 8080)), WAIT)
        .unwrap();
    // Everyone else is untouched.
    for dst in pod1 {
        assert_direct(&app2.connect(sa(dst, 8080), None).unwrap());
        assert_direct(&node.connect(sa(dst, 8080), None).unwrap());
    }

    fx.unenroll(0).unwrap();
    for (who, id) in [(&app0, "out"), (&app2, "in")] {
        assert_eq!(
            who.ping(id, "after").unwrap().echo.as_deref(),
            Some("after"),
            "{id}"
        );
    }
    let via = app0.ping("via", "after").unwrap();
    assert_eq!(via.errno, Some(libc::ECONNRESET), "{via:?}");
    for dst in pod1 {
        assert_direct(&app0.connect(sa(dst, 8080), None).unwrap());
    }
    for dst in pod0 {
        assert_direct(&app2.connect(sa(dst, 8080), None).unwrap());
    }
    assert_no_event(&peer, "inbound");
    // And it is really gone from the pod: no sk_lookup program, no reply rule, sysctls restored.
    let p0 = fx.pod(0);
    assert!(
        sluice_tests::harness::sk_lookup_prog_names(p0.path())
            .unwrap()
            .is_empty()
    );
    assert!(!p0.netns.ip(&["rule"]).unwrap().contains("0x111"));
    assert_eq!(
        p0.netns
            .read_sysctl("net.ipv4.tcp_fwmark_accept")
            .unwrap()
            .trim(),
        "0"
    );
}

/// Row 9: with acceleration on, app↔ztunnel bytes are short-circuited through the sockmap, and
/// what the app, ztunnel and the server observe is the same as without.
#[test]
fn acceleration_short_circuits_with_the_same_behaviour() {
    let Some(mut fx) = fixture(2, true) else {
        return;
    };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let peer0 = fx.peer(0).unwrap();
    let peer1 = fx.peer(1).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let (pod0, pod1) = (fx.pod(0).ips(), fx.pod(1).ips());
    for (src, dst) in [(pod0[0], pod1[0]), (pod0[1], pod1[1])] {
        // Several round trips on one connection: ordering must hold through the short-circuit.
        client
            .hold("c", sa(dst, 8080))
            .unwrap()
            .ensure_ok()
            .unwrap();
        for i in 0..20 {
            let msg = format!("m{i}");
            assert_eq!(
                client.ping("c", &msg).unwrap().echo.as_deref(),
                Some(msg.as_str())
            );
        }
        client.close("c").unwrap();
        let r = client.connect(sa(dst, 8080), Some("ping")).unwrap();
        r.ensure_ok().unwrap();
        assert_eq!(r.peername, Some(sa(dst, 8080)));
        assert_eq!(
            r.banner_peer().unwrap().ip(),
            src,
            "the app in pod1 sees pod0's address"
        );
        peer0
            .wait_event(is("outbound", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
        peer1
            .wait_event(is("inbound", "orig_dst", sa(dst, 8080)), WAIT)
            .unwrap();
    }
    let counters = fx.dp().counters();
    assert!(
        count(&counters, Counter::SocketsAccelerated) >= 4,
        "{counters:?}"
    );
    assert!(
        count(&counters, Counter::MessagesAccelerated) > 0,
        "{counters:?}"
    );
}

/// Row 9 under load: several MiB over several parallel accelerated connections, through
/// two "ztunnels" (the client's outbound, the server's inbound), arrive complete and in order,
/// both ways: every byte the server echoes is checked. A stall fails the connection after the
/// socket timeout; nothing here is timed. (The client retries a blocking call's early
/// `EAGAIN`, which the kernel returns on accelerated sockets: see the testkit's `bulk`.)
#[test]
fn acceleration_carries_bulk_transfers_on_parallel_connections() {
    let Some(mut fx) = fixture(2, true) else {
        return;
    };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    fx.enroll(1, EnrollOptions::default()).unwrap();
    let _peer0 = fx.peer(0).unwrap();
    let _peer1 = fx.peer(1).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let mut client = fx.app(0).unwrap();
    client.set_timeout(Duration::from_secs(120));
    let (parallel, bytes) = (8, 4 << 20);
    for dst in fx.pod(1).ips() {
        let r = client
            .bulk(sa(dst, 8080), bytes, parallel, Duration::from_secs(10))
            .unwrap();
        for (i, c) in r["results"].as_array().unwrap().iter().enumerate() {
            assert!(
                c["error"].is_null() && c["mismatch_at"].is_null(),
                "{dst}, connection {i}: {c}"
            );
            assert_eq!(c["sent"], bytes, "{dst}, connection {i}: {c}");
            assert_eq!(c["verified"], bytes, "{dst}, connection {i}: {c}");
        }
    }
    let counters = fx.dp().counters();
    assert!(
        count(&counters, Counter::MessagesAccelerated) > 0,
        "the bytes took the short-circuit: {counters:?}"
    );
}

fn count(counters: &[(Counter, u64)], which: Counter) -> u64 {
    counters
        .iter()
        .find(|(c, _)| *c == which)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}
