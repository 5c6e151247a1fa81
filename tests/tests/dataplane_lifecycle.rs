//! The dataplane's life around the traffic rules: coexistence with other eBPF users, agent
//! restarts (drop and reload) under load, uninstall, and bad input.
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use sluice_agent::{
    dataplane::{EnrollOptions, EnrollStage, Error},
    netns::{Netns as AgentNetns, NetnsError},
};
use sluice_tests::{
    fixture::DataplaneFixture,
    harness::{
        BPF_CGROUP_INET4_CONNECT, ForeignCgroupProg, ForeignTcxProg, Netns,
        cgroup_attached_prog_ids, prog_name, require_root, tcx_ingress_prog_names,
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

/// Row 8: a foreign cgroup program stays attached through load, enroll, restart and uninstall;
/// a restarted agent adopts pinned links (no second attachment) and redirection never stops:
/// a connection loop running across the restart sees zero failures, and every one of its
/// connections went through ztunnel. Uninstall leaves no pin, link, rule or sysctl behind.
#[test]
fn restart_adopts_pins_keeps_redirecting_and_uninstall_leaves_nothing() {
    let Some(mut fx) = fixture(2) else { return };
    let foreign = ForeignCgroupProg::attach(&fx.cgroup).unwrap();
    // Another TC user inside the pod, attached before us.
    let _foreign_tc = ForeignTcxProg::attach(fx.pod(0).path(), "eth0").unwrap();
    assert!(!fx.dp().adopted());
    fx.enroll(0, EnrollOptions::default()).unwrap();
    let peer = fx.peer(0).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let target = SocketAddr::new(fx.pod(1).ips()[0], 8080);
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

    assert_eq!(connect4_names(&fx), ["foreign_test", "sl_connect4"]);
    let pod0 = fx.pod(0).path().to_path_buf();
    assert_eq!(
        tcx_ingress_prog_names(&pod0, "eth0").unwrap(),
        ["foreign_tcx", "sl_pod_ingress"]
    );
    // Behind the foreign TC program, inbound redirection still works.
    let inside = fx.app(0).unwrap();
    inside.listen(9000).unwrap();
    let dst = SocketAddr::new(fx.pod(0).ips()[0], 9000);
    server.connect(dst, None).unwrap().ensure_ok().unwrap();
    peer.wait_event(
        |e| e["event"] == "inbound" && e["orig_dst"] == dst.to_string(),
        WAIT,
    )
    .unwrap();
    assert_eq!(
        tcx_ingress_prog_names(&pod0, "lo").unwrap(),
        ["sl_lo_ingress"]
    );

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
        tcx_ingress_prog_names(&pod0, "eth0").unwrap(),
        ["foreign_tcx"],
        "only the foreign TC program is left"
    );
    assert!(tcx_ingress_prog_names(&pod0, "lo").unwrap().is_empty());
    let p0 = &fx.pod(0).netns;
    assert!(!p0.ip(&["rule"]).unwrap().contains("0x111"));
    assert!(!p0.ip(&["-6", "rule"]).unwrap().contains("0x111"));
    assert!(
        p0.ip(&["route", "show", "table", "100"])
            .unwrap_or_default()
            .trim()
            .is_empty()
    );
    assert_eq!(
        p0.read_sysctl("net.ipv4.tcp_fwmark_accept").unwrap().trim(),
        "0"
    );
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
/// behind (no map entry, no pins, no TC links).
#[test]
fn a_netns_that_vanishes_mid_enroll_leaves_nothing_behind() {
    let Some(mut fx) = fixture(1) else { return };
    let doomed = Arc::new(std::sync::Mutex::new(Some(Netns::new("sldoomed").unwrap())));
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
        tcx_ingress_prog_names(fx.pod(0).path(), "eth0").unwrap(),
        ["sl_pod_ingress"]
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
    assert!(
        tcx_ingress_prog_names(fx.pod(0).path(), "eth0")
            .unwrap()
            .is_empty()
    );
}
