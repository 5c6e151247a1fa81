//! A rolling update of the agent on one node, as the DaemonSet does it: the old agent gets
//! SIGTERM and exits, the new version starts on the same pins and state. Through all of it, a
//! loop of new connections through an enrolled pod never fails, a connection opened before
//! the update carries on after it, and ztunnel keeps every pod.
//!
//! The old agent is the test build; the new one is the image's (stripped), made another build
//! of the eBPF object. Every build embeds a byte-identical object (aya-build always builds it
//! in release mode), and an object with other bytes needs other source; so the new binary's
//! embedded object gets one byte of its
//! DWARF producer string changed: the same programs, another object id, which the agent
//! treats as a new build: it attaches its own cgroup programs, moves every pod's `sk_lookup`
//! link to its program in place, and removes the old build's.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use sluice_tests::{
    agent_proc::AgentFixture,
    deploy::image::AgentImage,
    harness::{BPF_CGROUP_INET4_CONNECT, cgroup_attached_prog_ids, require_root},
    zds::ZdsPeerOptions,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);

/// A copy of agent binary `bin` at `out` whose embedded eBPF object (the one ELF file for
/// the BPF machine inside it) differs from the original in one byte of its debug info.
fn another_object_build(bin: &Path, out: &Path) -> PathBuf {
    const EM_BPF: u16 = 247;
    let mut data = std::fs::read(bin).unwrap();
    let start = (0..data.len() - 64)
        .find(|&i| {
            data[i..i + 4] == *b"\x7fELF"
                && u16::from_le_bytes([data[i + 18], data[i + 19]]) == EM_BPF
        })
        .expect("an embedded BPF object");
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    // It ends with its section header table.
    let end = start + u64_at(start + 0x28) + u16_at(start + 0x3a) * u16_at(start + 0x3c);
    let producer = b"rustc version";
    let at = data[start..end]
        .windows(producer.len())
        .position(|w| w == producer)
        .expect("the object's DWARF producer string");
    data[start + at] = b'R';
    std::fs::write(out, &data).unwrap();
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)).unwrap();
    out.to_path_buf()
}

/// Waits until `server` accepted `n` more connections.
fn wait_accepts(server: &sluice_tests::harness::App, n: usize) {
    for _ in 0..n {
        server
            .wait_event(|e| e["event"] == "accepted", WAIT)
            .unwrap();
    }
}

fn pod_uids(status: &Value) -> Vec<String> {
    let mut uids: Vec<String> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap().to_string())
        .collect();
    uids.sort();
    uids
}

#[test]
fn a_rolling_update_to_another_build_keeps_every_pod_redirected() {
    if !require_root() {
        return;
    }
    let Some(image) = AgentImage::locate().unwrap() else {
        return;
    };
    let mut fx = AgentFixture::start(Path::new(TESTKIT), 3, &[]).unwrap();
    let new_bin = another_object_build(
        &image.agent_bin().unwrap(),
        &fx.work.path().join("sluice-agent-new"),
    );
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    for i in 0..2 {
        let reply = fx.enroll(i, &[]).unwrap();
        assert_eq!(reply["ztunnel"]["state"], "acked", "{reply}");
    }
    let server = fx.app(1).unwrap();
    server.listen(8080).unwrap();
    let client = fx.app(0).unwrap();
    let dst = SocketAddr::new(fx.topo.pod(1).ipv4.into(), 8080);
    // One connection that lives through the update, and a stream of new ones.
    client.hold("long", dst).unwrap().ensure_ok().unwrap();
    assert_eq!(
        client.ping("long", "before").unwrap().echo.as_deref(),
        Some("before")
    );
    // From here on, every outbound report of pod0 is one of the loop's connections.
    let mut reports = peer.events();
    client
        .loop_start("l", dst, Duration::from_millis(5))
        .unwrap();
    server
        .wait_event(|e| e["event"] == "accepted", WAIT)
        .unwrap();
    let old = fx.agent.status().unwrap();
    let old_progs = cgroup_attached_prog_ids(&fx.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap();

    // The update: the old pod stops, the new one starts on the same node paths.
    wait_accepts(&server, 5);
    let exit = fx.agent.terminate().unwrap();
    assert!(exit.success(), "{exit}");
    // Between the two, no agent runs at all: connections still go through ztunnel.
    wait_accepts(&server, 5);
    let mut new = fx
        .agent
        .spawn_twin_with(&fx.work.path().join("new-agent.log"), Some(&new_bin))
        .unwrap();
    new.wait_ready(Duration::from_secs(30)).unwrap();
    let status = new.status().unwrap();

    // Another build of the object, which took over every pod.
    assert_ne!(status["object_id"], old["object_id"], "another build");
    assert_eq!(pod_uids(&status), pod_uids(&old));
    let new_progs = cgroup_attached_prog_ids(&fx.cgroup, BPF_CGROUP_INET4_CONNECT).unwrap();
    assert_eq!(new_progs.len(), 1, "one build attached: {new_progs:?}");
    assert_ne!(
        new_progs, old_progs,
        "the new build's programs are attached"
    );
    let links = status["links"].as_array().unwrap();
    assert_eq!(
        links.len(),
        10 + 2,
        "10 cgroup links and 2 pods' sk_lookup: {links:?}"
    );

    // Connections made during and after the update went through ztunnel; none failed.
    // (`events` hands over, and forgets, what the peer reported so far.)
    let outbound = |e: &Value| e["event"] == "outbound" && e["uid"] == AgentFixture::uid(0);
    let mut through_ztunnel = 0;
    let mut count = |drained: Vec<Value>| {
        through_ztunnel += drained.iter().filter(|e| outbound(e)).count() as u64;
        reports.extend(drained);
    };
    count(peer.events());
    server
        .wait_event(|e| e["event"] == "accepted", WAIT)
        .unwrap();
    peer.wait_event(outbound, WAIT)
        .expect("a connection made after the update reaches ztunnel");
    wait_accepts(&server, 20);
    let stats = client.loop_stop("l").unwrap();
    assert!(!stats.hit_limit, "{stats:?}");
    assert_eq!(stats.failures, 0, "{stats:?}");
    count(peer.events());
    // One was taken above; the peer's last reports may still be on their way.
    through_ztunnel += 1;
    while through_ztunnel < stats.attempts {
        peer.wait_event(outbound, WAIT).unwrap_or_else(|e| {
            panic!("{through_ztunnel} of {stats:?} went through ztunnel: {e:#}")
        });
        through_ztunnel += 1;
    }
    assert_eq!(
        client.ping("long", "after").unwrap().echo.as_deref(),
        Some("after"),
        "the connection opened before the update still works"
    );
    eprintln!(
        "rolling update: {} connections, none failed; object {} → {}",
        stats.attempts, old["object_id"], status["object_id"]
    );

    // The new agent serves ztunnel and enrolls new pods.
    let reply = new
        .cli_json(
            &fx.enroll_args(2, &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert_eq!(reply["ztunnel"]["state"], "acked", "{reply}");
    reports.extend(peer.events());
    let violations: Vec<&Value> = reports
        .iter()
        .filter(|e| e["event"] == "zds_violation")
        .collect();
    assert!(violations.is_empty(), "{violations:?}");
}
