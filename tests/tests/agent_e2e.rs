//! The agent as a whole: a real `sluice-agent run` process, the dataplane on this kernel, and
//! the ztunnel-like peer as a ZDS client serving every enrolled pod from inside its netns.
use std::{collections::BTreeSet, net::SocketAddr, path::Path, time::Duration};

use serde_json::Value;
use sluice_tests::{
    agent_proc::{AGENT_START, AgentFixture, HEALTH_PORT, METRICS_PORT, agent_bin},
    harness::{
        BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, cgroup_attached_prog_ids,
        sk_lookup_prog_names,
    },
    zds::ZdsPeerOptions,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);

fn fixture(pods: usize, extra: &[&str]) -> Option<AgentFixture> {
    AgentFixture::start_if_privileged(Path::new(TESTKIT), pods, extra)
}

fn uid(i: usize) -> String {
    AgentFixture::uid(i)
}

fn sa(ip: impl Into<std::net::IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn event_is<'a>(event: &'a str, uid: &'a str, dst: SocketAddr) -> impl Fn(&Value) -> bool + 'a {
    move |e| {
        e["event"] == event
            && e["uid"] == uid
            && e["orig_dst"].as_str().and_then(|s| s.parse().ok()) == Some(dst)
    }
}

fn enrolled_uids(fx: &AgentFixture) -> Vec<String> {
    let status = fx.agent.status().unwrap();
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap().to_string())
        .collect()
}

fn map_used(fx: &AgentFixture, map: &str) -> u64 {
    let status = fx.agent.status().unwrap();
    status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == map)
        .map(|m| m["used"].as_u64().unwrap())
        .unwrap()
}

/// The whole path: pods enrolled with `sluice-agent enroll`, the peer told about them over ZDS,
/// their traffic through it; unenrolled, their traffic direct again and the peer told.
#[test]
fn enrolled_pods_are_served_by_the_peer_over_zds() {
    let Some(fx) = fixture(2, &[]) else { return };
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    for i in 0..2 {
        let reply = fx.enroll(i, &[]).unwrap();
        assert_eq!(reply["ztunnel"]["state"], "acked", "{reply}");
    }
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let (pod0, pod1) = (fx.topo.pod(0).ips(), fx.topo.pod(1).ips());
    for (src, dst) in [(pod0[0], pod1[0]), (pod0[1], pod1[1])] {
        let r = client.connect(sa(dst, 8080), Some("ping")).unwrap();
        r.ensure_ok().unwrap();
        assert_eq!(r.peername, Some(sa(dst, 8080)));
        assert_eq!(r.banner_peer().unwrap().ip(), src);
        peer.wait_event(event_is("outbound", &uid(0), sa(dst, 8080)), WAIT)
            .unwrap();
        peer.wait_event(event_is("inbound", &uid(1), sa(dst, 8080)), WAIT)
            .unwrap();
    }

    fx.unenroll(0).unwrap();
    peer.wait_event(
        |e| e["event"] == "workload_stopped" && e["uid"] == uid(0),
        WAIT,
    )
    .unwrap();
    let r = client.connect(sa(pod1[0], 8080), None).unwrap();
    r.ensure_ok().unwrap();
    // pod1 is still enrolled: its inbound still goes through the peer, but pod0's outbound not.
    peer.wait_event(event_is("inbound", &uid(1), sa(pod1[0], 8080)), WAIT)
        .unwrap();
    assert!(
        peer.events()
            .iter()
            .all(|e| !(e["event"] == "outbound" && e["uid"] == uid(0)))
    );
    assert!(peer.violations().is_empty(), "{:?}", peer.violations());
}

/// SIGKILL in the middle of a stream of enrollments (retried by their caller, as a container
/// runtime retries CNI ADD), then a restart: no pod lost, none duplicated, nothing orphaned in
/// the dataplane, every pod served by the peer, and a connection loop through an enrolled pod
/// never failed.
#[test]
fn sigkill_during_enrollments_loses_and_duplicates_nothing() {
    const PODS: usize = 8;
    let Some(fx) = fixture(PODS, &[]) else { return };
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    fx.enroll(0, &[]).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let target = sa(fx.topo.pod(1).ipv4, 8080);
    client
        .loop_start("l", target, Duration::from_millis(5))
        .unwrap();
    server
        .wait_event(|e| e["event"] == "accepted", WAIT)
        .unwrap();

    // The enrollments run on their own thread, straight through the CLI, so that the kill can
    // land while one is in flight.
    let commands: Vec<Vec<String>> = (1..PODS)
        .map(|i| fx.enroll_args(i, &["--wait-ms", "0"]))
        .collect();
    let control = fx.agent.paths.control.clone();
    let (starting, started) = std::sync::mpsc::channel();
    let enroller = std::thread::spawn(move || {
        let mut retries = 0;
        for (i, args) in commands.iter().enumerate() {
            let _ = starting.send(i + 1);
            // Retry until it sticks: the agent may be dead or restarting.
            while !std::process::Command::new(agent_bin())
                .arg("--control-socket")
                .arg(&control)
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
            {
                retries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        retries
    });
    // Kill as the fourth enrollment starts: three are done, the rest are still to come.
    while started.recv().unwrap() < 4 {}
    let mut fx = fx;
    fx.agent.kill();
    assert!(!enroller.is_finished(), "the kill must land mid-stream");
    // With no agent at all, the loop keeps going (and keeps being redirected).
    for _ in 0..10 {
        server
            .wait_event(|e| e["event"] == "accepted", WAIT)
            .unwrap();
    }
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    let retries = enroller.join().unwrap();
    for _ in 0..20 {
        server
            .wait_event(|e| e["event"] == "accepted", WAIT)
            .unwrap();
    }
    let stats = client.loop_stop("l").unwrap();

    let uids = enrolled_uids(&fx);
    let unique: BTreeSet<_> = uids.iter().cloned().collect();
    assert_eq!(uids.len(), PODS, "{uids:?}");
    assert_eq!(
        unique,
        (0..PODS).map(uid).collect(),
        "no pod lost or duplicated"
    );
    assert_eq!(
        map_used(&fx, "SL_PODS"),
        PODS as u64,
        "nothing orphaned in the dataplane"
    );
    // The peer (a ztunnel that stayed up across the agent restart) serves every pod.
    for i in 0..PODS {
        peer.wait_event(
            |e| e["event"] == "zds_response" && e["uid"] == uid(i) && e["error"] == "",
            WAIT,
        )
        .unwrap();
    }
    fx.wait_ztunnel_state("acked", None, WAIT).unwrap();
    assert!(peer.violations().is_empty(), "{:?}", peer.violations());
    assert_eq!(stats.failures, 0, "{stats:?}");
    let redirected = peer
        .events()
        .iter()
        .filter(|e| e["event"] == "outbound" && e["uid"] == uid(0))
        .count();
    println!(
        "restart figures: {} connections attempted across the SIGKILL and restart, {} failed, {} redirected seen by the peer; {retries} enroll calls retried",
        stats.attempts, stats.failures, redirected
    );
}

/// `/healthz` and `/readyz` answer 200 once the agent is up (a second agent waiting for the
/// state lock binds neither: see `agent_faults`); `/metrics` is valid Prometheus text with every
/// family the agent promises.
#[test]
fn readyz_and_metrics_parse() {
    let Some(fx) = fixture(1, &[]) else { return };
    assert_eq!(fx.agent.http_get(HEALTH_PORT, "/healthz").unwrap().0, 200);
    assert_eq!(fx.agent.http_get(HEALTH_PORT, "/readyz").unwrap().0, 200);

    fx.enroll(0, &["--wait-ms", "0"]).unwrap();
    let (code, text) = fx.agent.http_get(METRICS_PORT, "/metrics").unwrap();
    assert_eq!(code, 200);
    let samples = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for family in [
        "sluice_enrolled_pods",
        "ztunnel_connected",
        "sluice_enroll_duration_seconds_bucket",
        "sluice_redirects_total",
        "sluice_ebpf_events_total",
        "sluice_map_entries",
    ] {
        assert!(
            samples.iter().any(|(name, _)| name == family),
            "missing {family}"
        );
    }
    assert!(samples.contains(&("sluice_enrolled_pods".to_string(), 1.0)));
}

/// SIGTERM: a clean exit, and redirection stays; a new agent adopts it.
#[test]
fn sigterm_stops_cleanly_and_redirection_stays() {
    let Some(mut fx) = fixture(2, &[]) else {
        return;
    };
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    fx.enroll(0, &[]).unwrap();
    let status = fx.agent.terminate().unwrap();
    assert!(status.success(), "{status}");
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let dst = sa(fx.topo.pod(1).ipv4, 8080);
    client.connect(dst, None).unwrap().ensure_ok().unwrap();
    peer.wait_event(event_is("outbound", &uid(0), dst), WAIT)
        .unwrap();
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    assert_eq!(enrolled_uids(&fx), [uid(0)]);
    let links = fx.agent.status().unwrap()["links"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        links,
        10 + 1,
        "10 cgroup links and pod0's sk_lookup link, not attached twice"
    );
}

/// Uninstall removes every pin, link, rule, route, sysctl change, socket and state file.
#[test]
fn uninstall_leaves_the_node_as_it_found_it() {
    let Some(mut fx) = fixture(2, &["--accelerate", "true"]) else {
        return;
    };
    let _peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    fx.enroll(0, &[]).unwrap();
    fx.enroll(1, &["--bypass-inbound"]).unwrap();
    let client = fx.app(0).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    client
        .connect(sa(fx.topo.pod(1).ipv4, 8080), Some("x"))
        .unwrap()
        .ensure_ok()
        .unwrap();

    fx.agent.uninstall().unwrap();
    assert!(!fx.bpffs.path().exists(), "pins");
    for t in [BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT] {
        assert!(
            cgroup_attached_prog_ids(&fx.cgroup, t).unwrap().is_empty(),
            "cgroup links"
        );
    }
    for i in 0..2 {
        let pod = fx.topo.pod(i);
        assert!(
            sk_lookup_prog_names(pod.path()).unwrap().is_empty(),
            "sk_lookup in pod{i}"
        );
        for family in ["-4", "-6"] {
            assert!(
                !pod.netns.ip(&[family, "rule"]).unwrap().contains("0x111"),
                "rule in pod{i}"
            );
            assert!(
                pod.netns
                    .ip(&[family, "route", "show", "table", "100"])
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
            );
        }
        for sysctl in [
            "net.ipv4.tcp_fwmark_accept",
            "net.ipv4.fwmark_reflect",
            "net.ipv6.fwmark_reflect",
        ] {
            assert_eq!(
                pod.netns.read_sysctl(sysctl).unwrap().trim(),
                "0",
                "{sysctl} in pod{i}"
            );
        }
    }
    for path in [
        &fx.agent.paths.control,
        &fx.agent.paths.zds,
        &fx.agent.paths.state,
    ] {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

/// A strict reading of the Prometheus text format: `# HELP`/`# TYPE` lines, then samples
/// `name{labels} value`. Returns (name, value) pairs.
fn parse_prometheus(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut out = vec![];
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            let words: Vec<_> = rest.split_whitespace().collect();
            match words.first() {
                Some(&"HELP") | Some(&"TYPE") if words.len() >= 3 => continue,
                Some(&"EOF") => continue,
                _ => return Err(format!("bad comment line {line:?}")),
            }
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or(format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("bad value in {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name in {line:?}"));
        }
        if series.contains('{') && !series.ends_with('}') {
            return Err(format!("bad labels in {line:?}"));
        }
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// Every crash window of an enrollment or unenrollment, set up exactly: a restarted agent
/// finishes an unenrollment, keeps an enrollment the dataplane completed, drops one it never
/// got to, and re-adopts a dataplane enrollment that never made it into the state file.
#[test]
fn restart_finishes_interrupted_operations() {
    let Some(mut fx) = fixture(4, &[]) else {
        return;
    };
    for i in 0..3 {
        fx.enroll(i, &["--wait-ms", "0"]).unwrap();
    }
    fx.agent.kill();
    let pods = fx.agent.paths.state.join("pods");
    let file = |i: usize| pods.join(format!("{}.json", uid(i)));
    let read =
        |i: usize| -> Value { serde_json::from_slice(&std::fs::read(file(i)).unwrap()).unwrap() };
    let write =
        |i: usize, v: &Value| std::fs::write(file(i), serde_json::to_vec(v).unwrap()).unwrap();
    let mut ghost = read(0);
    let mut pod0 = read(0);
    pod0["pod"]["phase"] = "enrolling".into(); // dataplane done, crash before the state said so
    write(0, &pod0);
    let mut pod1 = read(1);
    pod1["pod"]["phase"] = "unenrolling".into(); // crash in the middle of an unenrollment
    write(1, &pod1);
    // Crash after the dataplane enrolled, before the state was written.
    std::fs::remove_file(file(2)).unwrap();
    ghost["pod"]["uid"] = uid(3).into();
    ghost["pod"]["netns"] = fx.topo.pod(3).path().display().to_string().into();
    ghost["pod"]["netns_cookie"] = 1.into(); // never enrolled in the dataplane
    write(3, &ghost);

    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    assert_eq!(enrolled_uids(&fx), [uid(0)]);
    let pod1 = fx.topo.pod(1);
    assert!(
        sk_lookup_prog_names(pod1.path()).unwrap().is_empty(),
        "unenrollment finished"
    );
    assert!(!pod1.netns.ip(&["rule"]).unwrap().contains("0x111"));
    assert_eq!(
        map_used(&fx, "SL_PODS"),
        2,
        "pod0, and pod2 left redirected (fail closed) without a record"
    );
    // The retried enroll of pod2 adopts it: one record, one dataplane entry, one sk_lookup link.
    fx.enroll(2, &["--wait-ms", "0"]).unwrap();
    assert_eq!(enrolled_uids(&fx), [uid(0), uid(2)]);
    assert_eq!(map_used(&fx, "SL_PODS"), 2);
    assert_eq!(
        sk_lookup_prog_names(fx.topo.pod(2).path()).unwrap(),
        ["sl_sk_lookup"]
    );
}

/// A pod whose netns disappears without an unenroll (a missed CNI DEL) is let go: its record
/// and dataplane entry removed, ztunnel told with a Del, and its namespace no longer held open.
#[test]
fn a_vanished_pod_netns_is_collected() {
    let Some(fx) = fixture(2, &["--gc-interval", "1"]) else {
        return;
    };
    let client = sluice_tests::zds::ZdsClient::spawn(
        fx.zds_conn().unwrap(),
        sluice_tests::zds::Policy::ack_all(),
    )
    .unwrap();
    fx.enroll(1, &[]).unwrap();
    client
        .wait_for(|e| e.kind == sluice_tests::zds::Kind::Add, WAIT)
        .unwrap();
    // The pod goes away: its netns path is removed (the agent and ztunnel-side still hold it).
    sluice_tests::harness::ip(&["netns", "del", fx.topo.pod(1).netns.name()]).unwrap();
    client
        .wait_for(
            |e| e.kind == sluice_tests::zds::Kind::Del && e.uid.as_deref() == Some(uid(1).as_str()),
            WAIT,
        )
        .unwrap();
    assert!(enrolled_uids(&fx).is_empty());
    assert_eq!(map_used(&fx, "SL_PODS"), 0);
    client.finish().check_invariants().unwrap();
}

/// After a restart, a pod whose netns is alive but can no longer be opened by its path (here:
/// the path is gone while a process still lives in the namespace) is sent as a Keep in the
/// snapshot, so ztunnel keeps serving it rather than dropping it.
#[test]
fn a_pod_whose_netns_cannot_be_opened_is_kept_through_a_restart() {
    let Some(mut fx) = fixture(1, &[]) else {
        return;
    };
    fx.enroll(0, &["--wait-ms", "0"]).unwrap();
    let holder = fx.app(0).unwrap();
    fx.agent.kill();
    sluice_tests::harness::ip(&["netns", "del", fx.topo.pod(0).netns.name()]).unwrap();
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    assert_eq!(enrolled_uids(&fx), [uid(0)]);
    let client = sluice_tests::zds::ZdsClient::spawn(
        fx.zds_conn().unwrap(),
        sluice_tests::zds::Policy::ack_all(),
    )
    .unwrap();
    client
        .wait_for(|e| e.kind == sluice_tests::zds::Kind::SnapshotSent, WAIT)
        .unwrap();
    let t = client.finish();
    t.check_invariants().unwrap();
    assert_eq!(
        t.kinds(),
        [
            sluice_tests::zds::Kind::Keep,
            sluice_tests::zds::Kind::SnapshotSent
        ]
    );
    assert_eq!(t.entries()[0].uid.as_deref(), Some(uid(0).as_str()));
    drop(holder);
}

/// Issue point 15: `sluice-agent trace --pod NS/NAME` streams that pod's live decisions; the
/// programs write them only while a trace client is attached (the flag in SL_CONFIG).
#[test]
fn trace_streams_a_pods_decisions_only_while_someone_watches() {
    let Some(fx) = fixture(2, &[]) else { return };
    let _peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    fx.enroll(0, &[]).unwrap();
    fx.enroll(1, &[]).unwrap();
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    assert!(!tracing_on(&fx), "nobody traces yet");

    let mut trace = std::process::Command::new(agent_bin())
        .arg("--control-socket")
        .arg(&fx.agent.paths.control)
        .args(["trace", "--pod", "default/pod0", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = trace.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + WAIT;
    while !tracing_on(&fx) {
        assert!(
            std::time::Instant::now() < deadline,
            "tracing never turned on"
        );
        // The flag lives in a map: nothing to wait on but the map itself.
        std::thread::sleep(Duration::from_millis(10));
    }
    let dst = sa(fx.topo.pod(1).ipv4, 8080);
    client.connect(dst, None).unwrap().ensure_ok().unwrap();
    let mut seen = Vec::new();
    let wanted = |v: &Value| {
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("outbound, delivered"))
    };
    while !seen.iter().any(wanted) {
        let line = lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no outbound decision traced: {seen:?}"));
        assert_eq!(line["pod"], "default/pod0", "only pod0's decisions: {line}");
        seen.push(line);
    }
    let delivered = seen.iter().find(|v| wanted(v)).unwrap();
    assert_eq!(delivered["verdict"], "redirected");
    assert_eq!(delivered["dst"], dst.to_string());
    // The connect that marked it was traced too, before.
    assert!(
        seen.iter()
            .any(|v| v["reason"] == "outbound, routed to ztunnel 15001")
    );

    trace.kill().unwrap();
    let _ = trace.wait();
    let deadline = std::time::Instant::now() + WAIT;
    while tracing_on(&fx) {
        assert!(
            std::time::Instant::now() < deadline,
            "tracing stayed on without a client"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the programs are told to trace: `GLOBAL_TRACE` in SL_CONFIG, read with bpftool.
fn tracing_on(fx: &AgentFixture) -> bool {
    let pin = fx
        .bpffs
        .path()
        .join(format!("maps-v{}", sluice_common::MAP_ABI))
        .join("SL_CONFIG");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = dump[0]["value"][0].as_str().unwrap();
    let flags = u8::from_str_radix(first.trim_start_matches("0x"), 16).unwrap();
    u32::from(flags) & sluice_common::GLOBAL_TRACE != 0
}
