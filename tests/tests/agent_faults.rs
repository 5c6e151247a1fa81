//! Faults an operator meets, against the real agent: a state write failing mid-enrollment, a
//! wrong pod address, a slow enrollment next to others, a second agent on the node, a corrupt
//! state file, missing prerequisites, and the capabilities the agent keeps.
use std::{path::Path, time::Duration};

use serde_json::Value;
use sluice_tests::{
    agent_proc::{AGENT_START, AgentFixture, HEALTH_PORT, METRICS_PORT},
    harness::{Bpffs, unique},
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

fn enrolled_uids(fx: &AgentFixture) -> Vec<String> {
    fx.agent.status().unwrap()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap().to_string())
        .collect()
}

fn pods_in_dataplane(fx: &AgentFixture) -> u64 {
    fx.agent.status().unwrap()["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "SL_PODS")
        .and_then(|m| m["used"].as_u64())
        .unwrap()
}

/// Restarts the fixture's agent with `FAILPOINTS` set (the test build carries them).
fn restart_with_failpoints(fx: &mut AgentFixture, failpoints: &str) {
    fx.agent.set_env("FAILPOINTS", failpoints);
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
}

/// Waits until the agent's log has a line containing `needle`.
fn wait_log(fx: &AgentFixture, needle: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while !fx.agent.log().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} in the agent log"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Issue 6.1: once the dataplane has enrolled a pod, a failing state write no longer aborts
/// the operation before ztunnel is told: the enrollment completes and the peer gets its Add.
/// A failure *before* the dataplane step leaves nothing behind, and a retry then works.
#[test]
fn an_enrollment_completes_including_ztunnel_or_is_undone() {
    let Some(mut fx) = fixture(2, &[]) else {
        return;
    };
    restart_with_failpoints(&mut fx, "state-put=return(enrolled)");
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    let connected = || {
        peer.wait_event(|e| e["event"] == "snapshot_done", WAIT)
            .unwrap()
    };
    connected();
    let reply = fx.enroll(0, &[]).unwrap();
    assert_eq!(reply["ztunnel"]["state"], "acked", "{reply}");
    peer.wait_event(
        |e| e["event"] == "workload_started" && e["uid"] == uid(0),
        WAIT,
    )
    .unwrap();
    // A retried request finds it enrolled and acknowledged.
    let again = fx.enroll(0, &[]).unwrap();
    assert_eq!(again["already_enrolled"], true, "{again}");
    assert_eq!(again["ztunnel"]["state"], "acked", "{again}");

    // The intent cannot be written: nothing changes at all.
    restart_with_failpoints(&mut fx, "state-put=return(enrolling)");
    let err = fx.enroll(1, &[]).unwrap_err().to_string();
    assert!(err.contains("failpoint state-put"), "{err}");
    assert_eq!(enrolled_uids(&fx), [uid(0)]);
    assert_eq!(pods_in_dataplane(&fx), 1);
    assert!(
        !peer
            .events()
            .iter()
            .any(|e| e["event"] == "zds" && e["kind"] == "add" && e["uid"] == uid(1)),
        "ztunnel heard of a pod that is not enrolled"
    );
    restart_with_failpoints(&mut fx, "");
    connected();
    let reply = fx.enroll(1, &[]).unwrap();
    assert_eq!(reply["ztunnel"]["state"], "acked", "{reply}");
    assert_eq!(enrolled_uids(&fx), [uid(0), uid(1)]);
}

/// Issue 6.3: every address given for a pod must be in its netns; one wrong extra address
/// refuses the whole request before anything changes.
#[test]
fn every_pod_ip_must_be_in_its_network_namespace() {
    let Some(fx) = fixture(2, &[]) else { return };
    let elsewhere = fx.topo.pod(1).ipv6.to_string();
    let err = fx.enroll(0, &["--ip", &elsewhere]).unwrap_err().to_string();
    assert!(err.contains("does not hold the pod's IPs"), "{err}");
    assert!(err.contains(&elsewhere), "{err}");
    assert!(enrolled_uids(&fx).is_empty());
    assert_eq!(pods_in_dataplane(&fx), 0);
    fx.enroll(0, &["--wait-ms", "0"]).unwrap();
}

/// Issue 6.4: while one pod's enrollment is stuck in the middle, another pod enrolls, and
/// status and metrics answer, all before the stuck one finishes.
#[test]
fn enrollments_of_different_pods_overlap_and_status_never_waits() {
    let Some(mut fx) = fixture(2, &[]) else {
        return;
    };
    restart_with_failpoints(&mut fx, &format!("enroll-pause=return({}:5000)", uid(0)));
    let args = fx.enroll_args(0, &["--wait-ms", "0"]);
    let control = fx.agent.paths.control.clone();
    let slow = std::thread::spawn(move || {
        std::process::Command::new(sluice_tests::agent_proc::agent_bin())
            .arg("--control-socket")
            .arg(&control)
            .args(&args)
            .output()
            .unwrap()
    });
    wait_log(&fx, "failpoint enroll-pause: pausing");

    fx.enroll(1, &["--wait-ms", "0"]).unwrap();
    let status = fx.agent.status().unwrap();
    let (code, metrics) = fx.agent.http_get(METRICS_PORT, "/metrics").unwrap();
    assert!(
        !slow.is_finished(),
        "pod 1, status and metrics had to wait for pod 0's enrollment"
    );
    assert!(
        status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["uid"] == uid(1))
    );
    assert_eq!(code, 200);
    assert!(metrics.contains("sluice_enrolled_pods"), "{metrics}");

    let out = slow.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut uids = enrolled_uids(&fx);
    uids.sort();
    assert_eq!(uids, [uid(0), uid(1)]);
}

/// Issue 6.5: a second agent on the node (a rolling update's new pod, hostNetwork) waits for
/// the state lock before it binds the node's health and metrics ports, so it neither crashes
/// on "address in use" nor answers for a node it does not run yet; it takes over when the
/// first one exits.
#[test]
fn a_second_agent_waits_for_the_first_before_binding_its_ports() {
    let Some(mut fx) = fixture(1, &[]) else {
        return;
    };
    fx.enroll(0, &["--wait-ms", "0"]).unwrap();
    let twin_log = fx.work.path().join("twin.log");
    let mut twin = fx.agent.spawn_twin(&twin_log).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&twin_log)
        .unwrap_or_default()
        .contains("another agent holds the state directory")
    {
        assert!(twin.is_running(), "{}", twin.log());
        assert!(std::time::Instant::now() < deadline, "{}", twin.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(twin.is_running(), "{}", twin.log());
    // The first agent still answers on the node's ports.
    assert_eq!(fx.agent.http_get(HEALTH_PORT, "/readyz").unwrap().0, 200);

    let exit = fx.agent.terminate().unwrap();
    assert!(exit.success(), "{exit}");
    twin.wait_ready(AGENT_START).unwrap();
    let status = twin.status().unwrap();
    assert_eq!(status["pods"][0]["uid"], uid(0), "{status}");
    // Hand the node back to the fixture's agent (its drop uninstalls).
    let exit = twin.terminate().unwrap();
    assert!(exit.success(), "{exit}");
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
}

/// Issue 6.6: a truncated pod record stops the agent at start with one line naming the file
/// and the recovery command; that command (`uninstall --force`) then removes everything from
/// the node, the record-less pod included, and a new agent starts clean.
#[test]
fn a_corrupt_state_file_stops_the_agent_and_names_the_way_out() {
    let Some(mut fx) = fixture(2, &[]) else {
        return;
    };
    for i in 0..2 {
        fx.enroll(i, &["--wait-ms", "0"]).unwrap();
    }
    fx.agent.kill();
    let record = fx
        .agent
        .paths
        .state
        .join("pods")
        .join(format!("{}.json", uid(0)));
    let bytes = std::fs::read(&record).unwrap();
    std::fs::write(&record, &bytes[..bytes.len() / 2]).unwrap();

    let out = fx.agent.run_to_exit(&[], &[]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(last.contains(&record.display().to_string()), "{last}");
    assert!(last.contains("sluice-agent uninstall --force"), "{last}");

    // Without --force, uninstall refuses and says how.
    let plain = fx.agent.uninstall().unwrap_err().to_string();
    assert!(plain.contains("--force"), "{plain}");
    fx.agent.uninstall_with(&["--force"]).unwrap();
    assert!(!fx.bpffs.path().join("pods").exists());
    assert!(!fx.agent.paths.state.exists());
    for i in 0..2 {
        let rules = fx.topo.pod(i).netns.ip(&["rule"]).unwrap();
        assert!(!rules.contains("0x111"), "pod {i} still has {rules}");
    }
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    assert!(enrolled_uids(&fx).is_empty());
}

/// Issue 6.7: a missing prerequisite is one line naming it and how to provide it, and the
/// agent touches nothing before saying so.
#[test]
fn missing_prerequisites_are_one_line_errors_before_anything_is_attached() {
    let Some(fx) = fixture(0, &[]) else { return };
    let fresh = Bpffs::new().unwrap();
    let scratch = std::env::temp_dir().join(unique("sluice-not-bpffs-"));
    std::fs::create_dir_all(&scratch).unwrap();
    let cases: Vec<(&str, sluice_tests::agent_proc::AgentPaths, Vec<&str>, &str)> = vec![
        (
            "pin root off bpffs",
            {
                let mut p = fx.agent.paths.clone();
                p.pin_root = scratch.join("sluice");
                p
            },
            vec![],
            "mount -t bpf",
        ),
        (
            "cgroup that is not cgroup v2",
            {
                let mut p = fx.agent.paths.clone();
                p.pin_root = fresh.path().to_path_buf();
                p.cgroup = scratch.clone();
                p
            },
            vec![],
            "is not a cgroup v2 mount",
        ),
        (
            "no CAP_NET_ADMIN",
            {
                let mut p = fx.agent.paths.clone();
                p.pin_root = fresh.path().to_path_buf();
                p
            },
            vec!["setpriv", "--bounding-set=-net_admin"],
            "missing capability CAP_NET_ADMIN",
        ),
    ];
    for (what, paths, wrapper, needle) in cases {
        let out = fx.agent.sibling(paths).run_to_exit(&[], &wrapper).unwrap();
        assert!(!out.status.success(), "{what}: started");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{what}: {stderr}");
        assert!(errors[0].starts_with("error: "), "{what}: {stderr}");
        assert!(errors[0].contains(needle), "{what}: {stderr}");
        // Nothing was created on bpffs or in the scratch directory.
        assert!(
            !fresh.path().exists(),
            "{what}: {} created",
            fresh.path().display()
        );
        assert!(!scratch.join("sluice").exists(), "{what}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Issue 6.7: after startup the agent holds only the capabilities it documents.
#[test]
fn the_agent_keeps_only_the_capabilities_it_needs() {
    let Some(fx) = fixture(1, &[]) else { return };
    let pid = fx.agent.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let set = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {status}"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    // CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
    let kept: u64 = [12u32, 19, 21, 38, 39].iter().map(|b| 1u64 << b).sum();
    for name in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(set(name), kept, "{name} {:#x}", set(name));
    }
    assert_eq!(set("CapInh:"), 0);
    // And with only those it still does its job.
    let reply: Value = fx.enroll(0, &["--wait-ms", "0"]).unwrap();
    assert_eq!(reply["already_enrolled"], false, "{reply}");
    fx.unenroll(0).unwrap();
}
