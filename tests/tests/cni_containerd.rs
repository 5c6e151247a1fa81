//! The whole path under a real container runtime: containerd (Debian's) creates a pod sandbox
//! through its CRI API, runs the CNI chain bridge + host-local + portmap + sluice-cni, and the
//! sandbox's network namespace is enrolled before RunPodSandbox returns; stopping and removing
//! the sandbox (two DELs) un-enrolls it cleanly.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use sluice_tests::{
    agent_proc::{AgentFixture, METRICS_PORT, Workdir},
    cni_runtime::{bridge_conflist, link_reference_plugins},
    containerd::Containerd,
    harness::{App, require_root},
    zds::ZdsPeerOptions,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);
/// The bridge's subnet, in the test's node namespace only.
const SUBNET: &str = "10.79.0.0/24";
const GATEWAY: &str = "10.79.0.1";

/// Debian's packages this test runs; outside CI a missing one skips the test.
fn tools_present() -> bool {
    let missing: Vec<&str> = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/bin/busybox",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {missing:?} are missing (cargo xtask test installs them)");
    }
    eprintln!("skipping: {missing:?} missing (cargo xtask test installs them)");
    false
}

/// sluice-cni's "done in N µs" for `command` of sandbox `id` (its log, at debug level).
fn plugin_times(log: &str, command: &str, id: &str) -> Vec<Duration> {
    let tag = format!("{command} {}: done in ", &id[..12]);
    log.lines()
        .filter_map(|l| l.split_once(&tag))
        .filter_map(|(_, rest)| rest.trim_end_matches(" µs").parse().ok())
        .map(Duration::from_micros)
        .collect()
}

#[test]
fn containerd_sandbox_is_enrolled_through_sluice_cni_and_released() {
    if !require_root() || !tools_present() {
        return;
    }
    let work = Workdir::new().unwrap();
    let cni_log = work.path().join("sluice-cni.log");
    let cni_log_arg = cni_log.display().to_string();
    let mut fx = AgentFixture::spawn_cni(
        Path::new(TESTKIT),
        0,
        &[
            "--ambient-namespaces",
            "mesh",
            "--cni-log-level",
            "debug",
            "--cni-log-file",
            &cni_log_arg,
        ],
    )
    .unwrap();
    let cni = fx.agent.paths.cni.clone().unwrap();
    link_reference_plugins(
        &cni.bin_dir,
        &["bridge", "host-local", "portmap", "loopback"],
    )
    .unwrap();
    // The primary CNI: a bridge in the node namespace, addresses from SUBNET, a route to it
    // only, no masquerade.
    let primary = bridge_conflist(
        "1.0.0",
        "slbr0",
        &[(SUBNET, SUBNET)],
        &work.path().join("ipam"),
    );
    std::fs::write(
        cni.conf_dir.join("10-bridge.conflist"),
        serde_json::to_vec_pretty(&primary).unwrap(),
    )
    .unwrap();
    fx.agent.wait_ready(WAIT).unwrap();
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();

    let mut ctrd = Containerd::start(
        &work.path().join("containerd"),
        fx.topo.node().path(),
        &cni.bin_dir,
        &cni.conf_dir,
    )
    .unwrap();
    let uid = "6f1c2b9e-0000-4000-8000-000000000001";
    let started = Instant::now();
    let id = ctrd.run_sandbox("mesh", "web", uid).unwrap();
    let run_sandbox = started.elapsed();

    // Enrolled when RunPodSandbox returned: the agent has the sandbox's netns, by the pod's
    // uid, with the address the runtime reports.
    let (netns, ip) = ctrd.sandbox_network(&id).unwrap();
    let status = fx.agent.status().unwrap();
    let pod = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["uid"] == uid)
        .unwrap_or_else(|| panic!("sandbox not enrolled: {status}\n{}", ctrd.log()))
        .clone();
    assert_eq!(pod["container_id"], id.as_str());
    assert_eq!(pod["netns"], netns.display().to_string());
    assert_eq!(pod["namespace"], "mesh");
    assert_eq!(pod["name"], "web");
    assert_eq!(pod["ips"], serde_json::json!([ip.to_string()]));
    // ztunnel was told about it.
    peer.wait_event(
        |e| e["event"] == "workload_started" && e["uid"] == uid,
        WAIT,
    )
    .unwrap();

    // A process in the sandbox's netns connects out: through ztunnel, to the real server.
    let server = App::spawn(
        Path::new(TESTKIT),
        Some(fx.topo.node().path()),
        Some(&fx.cgroup),
    )
    .unwrap();
    server.listen(8080).unwrap();
    let app = App::spawn(Path::new(TESTKIT), Some(&netns), Some(&fx.cgroup)).unwrap();
    let dst = SocketAddr::new(GATEWAY.parse::<IpAddr>().unwrap(), 8080);
    let r = app.connect(dst, Some("hello")).unwrap();
    r.ensure_ok().unwrap();
    assert_eq!(r.peername, Some(dst), "the app sees its original peer");
    peer.wait_event(
        |e| e["event"] == "outbound" && e["uid"] == uid && e["orig_dst"] == dst.to_string(),
        WAIT,
    )
    .unwrap();
    drop(app);

    // Stop (DEL), then remove (DEL again): un-enrolled at the first, the second harmless.
    ctrd.stop_sandbox(&id).unwrap();
    let status = fx.agent.status().unwrap();
    assert!(
        status["pods"].as_array().unwrap().is_empty(),
        "still enrolled after StopPodSandbox: {status}"
    );
    peer.wait_event(
        |e| e["event"] == "workload_stopped" && e["uid"] == uid,
        WAIT,
    )
    .unwrap();
    ctrd.remove_sandbox(&id).unwrap();
    let log = std::fs::read_to_string(&cni_log).unwrap_or_default();
    let adds = plugin_times(&log, "ADD", &id);
    let dels = plugin_times(&log, "DEL", &id);
    assert_eq!(adds.len(), 1, "{log}");
    assert_eq!(
        dels.len(),
        2,
        "containerd calls DEL at stop and at remove:\n{log}"
    );
    assert!(!log.contains(" error "), "{log}");
    assert!(peer.violations().is_empty(), "{:?}", peer.violations());

    let (_, metrics) = fx.agent.http_get(METRICS_PORT, "/metrics").unwrap();
    let enroll_sum = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_enroll_duration_seconds_sum "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_default();
    println!(
        "containerd figures: RunPodSandbox {:.1} ms (netns, loopback, bridge+host-local, portmap, sluice-cni, pause start); sluice-cni ADD {:.2} ms in the plugin (ask the agent, enrollment, answer), of which the agent's enrollment {:.2} ms; DELs {:?}",
        run_sandbox.as_secs_f64() * 1e3,
        adds[0].as_secs_f64() * 1e3,
        enroll_sum * 1e3,
        dels
    );
}
