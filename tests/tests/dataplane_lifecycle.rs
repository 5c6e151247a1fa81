//! The dataplane's life around the traffic rules: coexistence with other eBPF users, agent
//! restarts (drop and reload) and upgrades under load, uninstall, and bad input.
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use sluice_agent::{
    dataplane::{EnrollOptions, EnrollStage, Error},
    netns::{Netns as AgentNetns, NetnsError},
};
use sluice_tests::{
    fixture::DataplaneFixture,
    harness::{
        BPF_CGROUP_INET4_CONNECT, ForeignCgroupProg, ForeignSkLookupProg, Netns,
        cgroup_attached_prog_ids, prog_name, require_root, sk_lookup_prog_names,
    },
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);

fn fixture(pods: usize) -> Option<DataplaneFixture> {
    if !require_root() {
        return None;
    }
    Some(DataplaneFixture::new(Path::new(TESTKIT), pods, false).expect("fixture"))
}

fn connect4_names(fx: &DataplaneFixture) -> Vec<String> {
    let mut names: Vec<String> = cgroup_attached_prog_ids(&fx.cgroup, BPF_CGROUP_INET4_CONNECT)
        .unwrap()
        .into_iter()
        .map(|id| prog_name(id).unwrap())
        .collect();
    names.sort();
    names
}

/// Waits until the server has accepted `n` more connections: the loop made progress.
fn wait_accepts(server: &sluice_tests::harness::App, n: usize) {
    for _ in 0..n {
        server
            .wait_event(|e| e["event"] == "accepted", WAIT)
            .expect("the connection loop stalled");
    }
}

/// Row 8 and issue point 5: foreign programs (a cgroup connect4 one, and an sk_lookup one
/// linked in the pod *after* Sluice's) keep running for the pod's traffic and stay attached
/// through load, enroll, restart and uninstall; a restarted agent adopts pinned links (no
/// second attachment) and redirection never stops: a connection loop running across the
/// restart sees zero failures, and every one of its connections went through ztunnel.
/// Uninstall leaves no pin, link, rule or sysctl behind.
#[test]
fn restart_adopts_pins_keeps_redirecting_and_uninstall_leaves_nothing() {
    let Some(mut fx) = fixture(2) else { return };
    let foreign = ForeignCgroupProg::attach(&fx.cgroup).unwrap();
    assert!(!fx.dp().adopted());
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let pod0 = fx.pod(0).path().to_path_buf();
    // Another sk_lookup user in the pod, linked after us.
    let foreign_lookup = ForeignSkLookupProg::attach(&pod0).unwrap();
    assert_eq!(
        sk_lookup_prog_names(&pod0).unwrap(),
        ["sl_sk_lookup", "foreign_lookup"]
    );
    let peer = fx.peer(0).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let target = SocketAddr::new(fx.pod(1).ips()[0], 8080);
    let (cgroup_runs, lookup_runs) = (foreign.runs().unwrap(), foreign_lookup.runs().unwrap());
    client
        .loop_start("l", target, Duration::from_millis(5))
        .unwrap();
    wait_accepts(&server, 5);

    // The agent goes away: nothing is detached, the loop keeps being redirected.
    fx.drop_dataplane();
    wait_accepts(&server, 20);
    // It comes back: adopts everything, attaches nothing twice.
    let dp = fx.reload(false).unwrap();
    assert!(dp.adopted(), "a restarted agent adopts the pinned links");
    assert_eq!(
        dp.enrolled().len(),
        1,
        "the enrolled pod survived the restart"
    );
    wait_accepts(&server, 20);
    let stats = client.loop_stop("l").unwrap();
    assert_eq!(stats.failures, 0, "{stats:?}");
    assert!(stats.attempts >= 45, "{stats:?}");
    let redirected = peer
        .events()
        .into_iter()
        .filter(|e| e["event"] == "outbound")
        .count() as u64;
    assert!(
        redirected >= stats.attempts - 1,
        "every connection went through ztunnel: {redirected} of {stats:?}"
    );
    // The foreign programs ran for those connections: each connect, and each of the SYNs the
    // pod looked up a socket for (the app's to ztunnel, at least).
    assert!(
        foreign.runs().unwrap() >= cgroup_runs + stats.attempts,
        "the foreign connect4 program ran"
    );
    assert!(
        foreign_lookup.runs().unwrap() >= lookup_runs + stats.attempts,
        "the foreign sk_lookup program ran after ours"
    );

    assert_eq!(connect4_names(&fx), ["foreign_test", "sl_connect4"]);
    assert_eq!(
        sk_lookup_prog_names(&pod0).unwrap(),
        ["sl_sk_lookup", "foreign_lookup"],
        "attached once, ours still first"
    );
    // Inbound redirection works with the foreign program after ours.
    let inside = fx.app(0).unwrap();
    inside.listen(9000).unwrap();
    let dst = SocketAddr::new(fx.pod(0).ips()[0], 9000);
    server.connect(dst, None).unwrap().ensure_ok().unwrap();
    peer.wait_event(
        |e| e["event"] == "inbound" && e["orig_dst"] == dst.to_string(),
        WAIT,
    )
    .unwrap();

    fx.uninstall().unwrap();
    assert!(!fx.bpffs.path().exists(), "pin directory removed");
    assert_eq!(
        connect4_names(&fx),
        ["foreign_test"],
        "only the foreign program is left"
    );
    assert!(
        cgroup_attached_prog_ids(&fx.cgroup, BPF_CGROUP_INET4_CONNECT)
            .unwrap()
            .contains(&foreign.id())
    );
    assert_eq!(
        sk_lookup_prog_names(&pod0).unwrap(),
        ["foreign_lookup"],
        "only the foreign sk_lookup program is left"
    );
    let p0 = &fx.pod(0).netns;
    assert!(!p0.ip(&["rule"]).unwrap().contains("0x111"));
    assert!(!p0.ip(&["-6", "rule"]).unwrap().contains("0x111"));
    assert!(
        p0.ip(&["route", "show", "table", "100"])
            .unwrap_or_default()
            .trim()
            .is_empty()
    );
    for sysctl in [
        "net.ipv4.tcp_fwmark_accept",
        "net.ipv4.fwmark_reflect",
        "net.ipv6.fwmark_reflect",
    ] {
        assert_eq!(p0.read_sysctl(sysctl).unwrap().trim(), "0", "{sysctl}");
    }
}

/// Issue point 6: a new build takes over running pods in place. Here the same ELF is loaded
/// again under another object id, which is all that tells builds apart: the kernel gets a new
/// set of programs, as with a real new build. Every pod's sk_lookup link keeps its id and now
/// runs the new program (`BPF_LINK_UPDATE`, no moment without one); the cgroup links are the
/// new build's, attached before the old ones went. A connection loop across the upgrade sees
/// zero failures, all through ztunnel, and a connection held through ztunnel keeps working.
#[test]
fn a_new_build_replaces_the_programs_of_running_pods_in_place() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let peer = fx.peer(0).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let target = SocketAddr::new(fx.pod(1).ips()[0], 8080);
    client.hold("held", target).unwrap().ensure_ok().unwrap();
    let pod_link = |fx: &mut DataplaneFixture| {
        fx.dp()
            .links()
            .into_iter()
            .find(|l| l.kind == "netns")
            .expect("the pod's sk_lookup link")
    };
    let before = pod_link(&mut fx);
    let old_build = fx.dp().object_id().to_string();
    let old_connect4 = cgroup_attached_prog_ids(&fx.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap();
    client
        .loop_start("l", target, Duration::from_millis(5))
        .unwrap();
    wait_accepts(&server, 5);

    let dp = fx.reload_as("0123456789abcdef").unwrap();
    assert!(!dp.adopted(), "another build attaches its own programs");
    let new_prog = dp.sk_lookup_prog_id();
    assert!(
        !dp.layout().cgroup_links(&old_build).exists(),
        "the old build's links are gone"
    );
    let after = pod_link(&mut fx);
    assert_eq!(
        after.link_id, before.link_id,
        "the same link, updated in place"
    );
    assert_ne!(after.prog_id, before.prog_id);
    assert_eq!(after.prog_id, new_prog, "running the new build's program");
    let new_connect4 = cgroup_attached_prog_ids(&fx.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap();
    assert_eq!(new_connect4.len(), 1, "{new_connect4:?}");
    assert_ne!(new_connect4, old_connect4);
    assert_eq!(
        sk_lookup_prog_names(fx.pod(0).path()).unwrap(),
        ["sl_sk_lookup"]
    );

    wait_accepts(&server, 20);
    let stats = client.loop_stop("l").unwrap();
    assert_eq!(stats.failures, 0, "{stats:?}");
    let redirected = peer
        .events()
        .into_iter()
        .filter(|e| e["event"] == "outbound")
        .count() as u64;
    assert!(
        redirected > stats.attempts,
        "every connection (and the held one) went through ztunnel: {redirected} of {stats:?}"
    );
    assert_eq!(
        client.ping("held", "still").unwrap().echo.as_deref(),
        Some("still")
    );
}

/// Issue point 3: the node's network namespace, and the agent's own, are never enrolled.
#[test]
fn the_node_and_agent_network_namespaces_are_refused() {
    let Some(mut fx) = fixture(1) else { return };
    let node = AgentNetns::open(fx.topo.node().path()).unwrap();
    let err = fx
        .dp()
        .enroll(
            &node,
            &["10.77.0.1".parse().unwrap()],
            EnrollOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::NodeNetns(_)), "{err}");
    assert!(
        err.to_string().contains("node's network namespace"),
        "{err}"
    );
    let own = AgentNetns::open("/proc/self/ns/net").unwrap();
    let err = fx
        .dp()
        .enroll(
            &own,
            &["10.9.9.9".parse().unwrap()],
            EnrollOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::AgentNetns(_)), "{err}");
    assert!(fx.dp().enrolled().is_empty());
    assert!(
        sk_lookup_prog_names(fx.topo.node().path())
            .unwrap()
            .is_empty()
    );
}

/// Enrollments from several threads at once all succeed, each pod fully configured: the
/// dataplane has no lock around a whole enrollment.
#[test]
fn concurrent_enrollments_all_succeed() {
    const PODS: usize = 6;
    let Some(fx) = fixture(PODS) else { return };
    let dp = fx.dp_shared();
    std::thread::scope(|s| {
        for i in 0..PODS {
            let pod = fx.pod(i);
            s.spawn(move || {
                let ns = AgentNetns::open(pod.path()).unwrap();
                dp.enroll(&ns, &pod.ips(), EnrollOptions::default())
                    .unwrap()
            });
        }
    });
    assert_eq!(dp.enrolled().len(), PODS);
    for i in 0..PODS {
        assert_eq!(
            sk_lookup_prog_names(fx.pod(i).path()).unwrap(),
            ["sl_sk_lookup"]
        );
        assert!(fx.pod(i).netns.ip(&["rule"]).unwrap().contains("0x111"));
    }
}

#[test]
fn a_path_that_is_not_a_network_namespace_is_refused() {
    if !require_root() {
        return;
    }
    for path in [
        "/proc/self/status",
        "/proc/self/ns/uts",
        "/nonexistent/netns",
        "/run",
    ] {
        let err = AgentNetns::open(path).unwrap_err();
        assert!(
            matches!(err, NetnsError::NotNetns { .. } | NetnsError::Open { .. }),
            "{path}: {err}"
        );
    }
}

/// A namespace deleted while its enrollment is under way: a clear error and nothing left
/// behind (no map entry, no pins, no link).
#[test]
fn a_netns_that_vanishes_mid_enroll_leaves_nothing_behind() {
    let Some(mut fx) = fixture(1) else { return };
    let ns = Netns::new("sldoomed").unwrap();
    ns.ip(&["addr", "add", "10.1.2.3/32", "dev", "lo"]).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let doomed = Arc::new(std::sync::Mutex::new(Some(ns)));
    let path = doomed
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .path()
        .to_path_buf();
    let handle = AgentNetns::open(&path).unwrap();
    let cookie = handle.cookie().unwrap();
    let d = doomed.clone();
    fx.dp().set_enroll_hook(move |stage| {
        if stage == EnrollStage::Attached {
            // `ip netns del`: the pod is gone (we still hold it open, the way a slow agent would).
            d.lock().unwrap().take();
        }
    });
    let err = fx
        .dp()
        .enroll(
            &handle,
            &["10.1.2.3".parse().unwrap()],
            EnrollOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::NetnsVanished(_)), "{err}");
    assert!(!fx.dp().is_enrolled(cookie));
    assert!(!fx.dp().layout().pod(cookie).exists(), "no pins left");
    assert!(
        handle
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").unwrap())
            .unwrap()
            .trim()
            == "0"
    );
}

#[test]
fn double_enroll_and_double_unenroll_are_clear_errors() {
    let Some(mut fx) = fixture(2) else { return };
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let err = fx.enroll(0, EnrollOptions::default()).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::AlreadyEnrolled(_))),
        "{err}"
    );
    // Still enrolled and still working after the refused second attempt.
    let peer = fx.peer(0).unwrap();
    let client = fx.app(0).unwrap();
    let dst = SocketAddr::new(fx.pod(1).ips()[0], 8080);
    let _ = client.connect(dst, None).unwrap();
    peer.wait_event(|e| e["event"] == "outbound", WAIT).unwrap();
    assert_eq!(
        sk_lookup_prog_names(fx.pod(0).path()).unwrap(),
        ["sl_sk_lookup"]
    );

    fx.unenroll(0).unwrap();
    let err = fx.unenroll(0).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NotEnrolled(_))),
        "{err}"
    );
    let err = fx.unenroll(1).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NotEnrolled(_))),
        "{err}"
    );
}

#[test]
fn too_many_pod_ips_are_refused_before_anything_changes() {
    let Some(mut fx) = fixture(1) else { return };
    let ns = AgentNetns::open(fx.pod(0).path()).unwrap();
    let ips: Vec<_> = (1..=5)
        .map(|i| format!("10.9.9.{i}").parse().unwrap())
        .collect();
    let err = fx
        .dp()
        .enroll(&ns, &ips, EnrollOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::TooManyIps(5)), "{err}");
    assert!(fx.dp().enrolled().is_empty());
    assert!(sk_lookup_prog_names(fx.pod(0).path()).unwrap().is_empty());
}
