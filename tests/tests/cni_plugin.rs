//! `sluice-cni` as a runtime runs it: the real binary, exec'd with the `CNI_*` environment and
//! a network configuration on stdin, for every command in every spec version.
//!
//! The first tests need no agent (it is "down": nothing listens on the socket) and no
//! privilege. The others run a real agent over a real dataplane and check what it enrolled.
use std::{net::IpAddr, path::Path, time::Duration};

use serde_json::{Value, json};
use sluice_tests::{
    agent_proc::{AGENT_START, AgentFixture},
    cni_runtime::{PluginOutput, cni_bin, exec_plugin},
    zds::ZdsPeerOptions,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const WAIT: Duration = Duration::from_secs(10);

/// The result a bridge plugin of `version` would pass on for a pod with `ips`.
fn prev_result(version: &str, netns: &Path, ips: &[IpAddr]) -> Value {
    let ips: Vec<Value> = ips
        .iter()
        .map(|ip| {
            let prefix = if ip.is_ipv4() { 24 } else { 64 };
            let mut v = json!({"interface": 1, "address": format!("{ip}/{prefix}")});
            if version.starts_with("0.") {
                v["version"] = (if ip.is_ipv4() { "4" } else { "6" }).into();
            }
            v
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "veth0", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": netns.display().to_string()}
        ],
        "ips": ips,
        "dns": {}
    })
}

fn conf(version: &str, socket: &Path, extra: Value, prev: Option<Value>) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": version,
        "name": "test-net",
        "type": "sluice-cni",
        "agent_socket": socket.display().to_string(),
        "timeout_ms": 10_000,
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        c[k] = v.clone();
    }
    if let Some(prev) = prev {
        c["prevResult"] = prev;
    }
    c.to_string().into_bytes()
}

fn env(
    command: &str,
    container: &str,
    netns: &Path,
    ns: &str,
    uid: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web-{container};K8S_POD_INFRA_CONTAINER_ID={container}"
    );
    if let Some(uid) = uid {
        args.push_str(&format!(";K8S_POD_UID={uid}"));
    }
    vec![
        ("CNI_COMMAND", command.into()),
        ("CNI_CONTAINERID", container.into()),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/opt/cni/bin".into()),
    ]
}

fn run(env: &[(&str, String)], stdin: &[u8]) -> PluginOutput {
    exec_plugin(&cni_bin(), env, stdin, None).expect("running sluice-cni")
}

/// The spec's error object on stdout and a non-zero exit; returns the code.
fn error_code(out: &PluginOutput, version: &str) -> u64 {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    let e = out.json().unwrap();
    assert_eq!(e["cniVersion"], version, "{e}");
    assert!(
        e["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {e}"
    );
    e["code"].as_u64().unwrap_or_else(|| panic!("no code: {e}"))
}

fn down_socket() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sluice-no-agent-{}.sock", std::process::id()))
}

#[test]
fn version_lists_what_it_speaks() {
    for v in VERSIONS {
        let out = run(
            &[("CNI_COMMAND", "VERSION".into())],
            json!({"cniVersion": v}).to_string().as_bytes(),
        );
        let r = out.ok().unwrap();
        assert_eq!(r["cniVersion"], v);
        let supported: Vec<&str> = r["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(supported, VERSIONS);
    }
}

#[test]
fn agent_down_fails_add_for_ambient_pods_only_and_del_always_succeeds() {
    let sock = down_socket();
    let netns = Path::new("/var/run/netns/nonexistent");
    let ip: IpAddr = "10.0.0.5".parse().unwrap();
    let listed = json!({"ambient_namespaces": ["mesh"]});
    for v in VERSIONS {
        let prev = prev_result(v, netns, &[ip]);
        // A pod of an ambient namespace must not start un-redirected: try again later.
        let out = run(
            &env("ADD", "c1", netns, "mesh", Some("u1")),
            &conf(v, &sock, listed.clone(), Some(prev.clone())),
        );
        assert_eq!(error_code(&out, v), 11, "{v}");
        assert!(out.stdout.contains("mesh/web-c1"), "{}", out.stdout);
        // Another namespace, with a complete list: passes, printing prevResult.
        let out = run(
            &env("ADD", "c2", netns, "other", Some("u2")),
            &conf(v, &sock, listed.clone(), Some(prev.clone())),
        );
        assert_eq!(out.ok().unwrap(), prev, "{v}");
        // Without a list only the agent knows: fail closed, except excluded namespaces.
        let out = run(
            &env("ADD", "c3", netns, "other", None),
            &conf(v, &sock, json!({}), Some(prev.clone())),
        );
        assert_eq!(error_code(&out, v), 11, "{v}");
        let out = run(
            &env("ADD", "c4", netns, "kube-system", None),
            &conf(v, &sock, json!({}), Some(prev.clone())),
        );
        assert_eq!(out.ok().unwrap(), prev, "{v}");
        // DEL succeeds and prints nothing, netns or not.
        let out = run(
            &env("DEL", "c1", netns, "mesh", Some("u1")),
            &conf(v, &sock, listed.clone(), Some(prev.clone())),
        );
        assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
        let mut no_netns = env("DEL", "c1", netns, "mesh", Some("u1"));
        no_netns.retain(|(k, _)| *k != "CNI_NETNS");
        assert!(
            run(&no_netns, &conf(v, &sock, json!({}), None))
                .status
                .success()
        );
        // CHECK exists from 0.4.0; for an ambient pod with no agent it fails.
        let out = run(
            &env("CHECK", "c1", netns, "mesh", Some("u1")),
            &conf(v, &sock, listed.clone(), Some(prev.clone())),
        );
        let want = if v.starts_with("0.3") { 1 } else { 11 };
        assert_eq!(error_code(&out, v), want, "CHECK {v}");
        // STATUS and GC exist from 1.1.0; with no agent STATUS is 50 and GC 11.
        let out = run(
            &[("CNI_COMMAND", "STATUS".into())],
            &conf(v, &sock, json!({}), None),
        );
        let want = if v == "1.1.0" { 50 } else { 1 };
        assert_eq!(error_code(&out, v), want, "STATUS {v}");
        let gc = json!({"cni.dev/valid-attachments": [{"containerID": "c9", "ifname": "eth0"}]});
        let out = run(&[("CNI_COMMAND", "GC".into())], &conf(v, &sock, gc, None));
        let want = if v == "1.1.0" { 11 } else { 1 };
        assert_eq!(error_code(&out, v), want, "GC {v}");
    }
}

#[test]
fn missing_or_garbage_environment_and_stdin_are_spec_errors() {
    let sock = down_socket();
    let netns = Path::new("/var/run/netns/x");
    let good = conf(
        "1.0.0",
        &sock,
        json!({"ambient_namespaces": []}),
        Some(prev_result("1.0.0", netns, &["10.0.0.5".parse().unwrap()])),
    );
    let add = env("ADD", "c1", netns, "other", None);
    let without = |k: &str| -> Vec<(&'static str, String)> {
        add.iter().filter(|(n, _)| *n != k).cloned().collect()
    };
    let with = |k: &'static str, v: &str| -> Vec<(&'static str, String)> {
        let mut e = without(k);
        e.push((k, v.to_string()));
        e
    };
    // Sanity: the good call passes.
    run(&add, &good).ok().unwrap();
    for (what, e, stdin, code) in [
        ("no CNI_COMMAND", without("CNI_COMMAND"), &good, 4),
        ("unknown command", with("CNI_COMMAND", "FROB"), &good, 4),
        ("no CNI_NETNS", without("CNI_NETNS"), &good, 4),
        ("no CNI_CONTAINERID", without("CNI_CONTAINERID"), &good, 4),
        ("no CNI_IFNAME", without("CNI_IFNAME"), &good, 4),
        ("bad container id", with("CNI_CONTAINERID", "a/b"), &good, 4),
        ("relative netns", with("CNI_NETNS", "netns"), &good, 4),
        ("bad CNI_ARGS", with("CNI_ARGS", "K8S_POD_NAME"), &good, 4),
    ] {
        assert_eq!(error_code(&run(&e, stdin), "1.0.0"), code, "{what}");
    }
    for (what, stdin, code, version) in [
        ("empty stdin", &b""[..], 6, "1.1.0"),
        ("garbage stdin", b"\x00\xffnot json", 6, "1.1.0"),
        ("a JSON array", b"[]", 6, "1.1.0"),
        (
            "no cniVersion",
            br#"{"name":"n","type":"sluice-cni"}"#,
            7,
            "1.1.0",
        ),
        ("unknown version", br#"{"cniVersion":"9.9.9"}"#, 1, "1.1.0"),
        (
            "bad option",
            br#"{"cniVersion":"0.4.0","timeout_ms":"soon"}"#,
            7,
            "0.4.0",
        ),
        (
            "no prevResult",
            br#"{"cniVersion":"0.4.0","ambient_namespaces":[]}"#,
            7,
            "0.4.0",
        ),
        (
            "bad prevResult",
            br#"{"cniVersion":"0.4.0","prevResult":{"ips":[{"address":"x"}]}}"#,
            7,
            "0.4.0",
        ),
    ] {
        assert_eq!(error_code(&run(&add, stdin), version), code, "{what}");
    }
}

/// ADD, CHECK, DEL (twice, as containerd does) in every version against the real agent; the
/// pod's netns really enrolled and released; a pod outside the ambient namespaces passed
/// through untouched.
#[test]
fn add_check_del_enroll_and_release_in_every_version() {
    let Some(fx) = AgentFixture::start_if_privileged(
        Path::new(TESTKIT),
        VERSIONS.len() + 1,
        &["--ambient-namespaces", "mesh"],
    ) else {
        return;
    };
    let sock = fx.agent.paths.control.clone();
    for (i, v) in VERSIONS.iter().enumerate() {
        let pod = fx.topo.pod(i);
        let prev = prev_result(v, pod.path(), &pod.ips());
        let container = format!("sandbox{i}");
        let uid = AgentFixture::uid(i);
        let stdin = conf(v, &sock, json!({}), Some(prev.clone()));
        let out = run(
            &env("ADD", &container, pod.path(), "mesh", Some(&uid)),
            &stdin,
        );
        assert_eq!(out.ok().unwrap(), prev, "ADD {v}");
        let status = fx.agent.status().unwrap();
        let enrolled = status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["uid"] == uid.as_str())
            .unwrap_or_else(|| panic!("{v}: not enrolled: {status}"))
            .clone();
        assert_eq!(enrolled["container_id"], container.as_str());
        assert_eq!(enrolled["namespace"], "mesh");
        assert_eq!(enrolled["netns"], pod.path().display().to_string());
        // A retried ADD is harmless.
        run(
            &env("ADD", &container, pod.path(), "mesh", Some(&uid)),
            &stdin,
        )
        .ok()
        .unwrap();
        if *v != "0.3.0" && *v != "0.3.1" {
            let out = run(
                &env("CHECK", &container, pod.path(), "mesh", Some(&uid)),
                &stdin,
            );
            assert!(
                out.status.success() && out.stdout.is_empty(),
                "CHECK {v}: {out:?}"
            );
        }
        for _ in 0..2 {
            let out = run(
                &env("DEL", &container, pod.path(), "mesh", Some(&uid)),
                &stdin,
            );
            assert!(
                out.status.success() && out.stdout.is_empty(),
                "DEL {v}: {out:?}"
            );
        }
        assert!(
            !fx.agent.status().unwrap()["pods"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["uid"] == uid.as_str()),
            "{v}: still enrolled after DEL"
        );
        if *v != "0.3.0" && *v != "0.3.1" {
            let out = run(
                &env("CHECK", &container, pod.path(), "mesh", Some(&uid)),
                &stdin,
            );
            assert_eq!(error_code(&out, v), 11, "CHECK after DEL {v}");
        }
    }
    // Not an ambient namespace: passes through, nothing enrolled, nothing attached.
    let pod = fx.topo.pod(VERSIONS.len());
    let prev = prev_result("1.1.0", pod.path(), &pod.ips());
    let out = run(
        &env("ADD", "other0", pod.path(), "other", Some("u-other")),
        &conf("1.1.0", &sock, json!({}), Some(prev.clone())),
    );
    assert_eq!(out.ok().unwrap(), prev);
    assert_eq!(
        fx.agent.status().unwrap()["pods"].as_array().unwrap().len(),
        0
    );
    assert!(
        sluice_tests::harness::sk_lookup_prog_names(pod.path())
            .unwrap()
            .is_empty()
    );
}

/// Redirection is in place when ADD returns, with or without ztunnel: without one ADD still
/// succeeds (the pod waits for ztunnel, as upstream's partial add), and ztunnel gets the pod
/// when it connects. Without K8S_POD_UID the pod is known as `cni-<container id>`.
#[test]
fn add_without_ztunnel_is_a_partial_add_and_uid_falls_back() {
    let Some(fx) =
        AgentFixture::start_if_privileged(Path::new(TESTKIT), 2, &["--ambient-namespaces", "mesh"])
    else {
        return;
    };
    let sock = fx.agent.paths.control.clone();
    let (client, server) = (fx.topo.pod(0), fx.topo.pod(1));
    let prev = prev_result("1.0.0", client.path(), &client.ips());
    run(
        &env("ADD", "nouid", client.path(), "mesh", None),
        &conf("1.0.0", &sock, json!({}), Some(prev)),
    )
    .ok()
    .unwrap();
    let status = fx.agent.status().unwrap();
    assert_eq!(status["pods"][0]["uid"], "cni-nouid", "{status}");
    assert_eq!(status["pods"][0]["ztunnel"]["state"], "pending", "{status}");
    // Redirected already: with no ztunnel listening in the pod, the app's connection fails
    // instead of going out directly.
    let srv = fx.app(1).unwrap();
    srv.listen(8080).unwrap();
    let app = fx.app(0).unwrap();
    let r = app
        .connect(std::net::SocketAddr::new(server.ipv4.into(), 8080), None)
        .unwrap();
    assert!(!r.ok, "not redirected: {r:?}");
    // ztunnel connects: it gets the pod, and the connection goes through it.
    let peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    fx.wait_ztunnel_state("acked", None, WAIT).unwrap();
    let dst = std::net::SocketAddr::new(server.ipv4.into(), 8080);
    app.connect(dst, Some("hi")).unwrap().ensure_ok().unwrap();
    peer.wait_event(
        |e| e["event"] == "outbound" && e["uid"] == "cni-nouid" && e["orig_dst"] == dst.to_string(),
        WAIT,
    )
    .unwrap();
}

/// GC lets go of CNI enrollments whose container the runtime no longer lists, and leaves pods
/// enrolled by hand alone; STATUS succeeds while the agent is ready.
#[test]
fn gc_and_status_against_the_agent() {
    let Some(fx) =
        AgentFixture::start_if_privileged(Path::new(TESTKIT), 3, &["--ambient-namespaces", "mesh"])
    else {
        return;
    };
    let sock = fx.agent.paths.control.clone();
    for i in 0..2 {
        let pod = fx.topo.pod(i);
        let prev = prev_result("1.1.0", pod.path(), &pod.ips());
        let uid = AgentFixture::uid(i);
        run(
            &env("ADD", &format!("keep{i}"), pod.path(), "mesh", Some(&uid)),
            &conf("1.1.0", &sock, json!({}), Some(prev)),
        )
        .ok()
        .unwrap();
    }
    fx.enroll(2, &["--wait-ms", "0"]).unwrap();
    let gc = json!({"cni.dev/valid-attachments": [{"containerID": "keep0", "ifname": "eth0"}]});
    let out = run(
        &[("CNI_COMMAND", "GC".into())],
        &conf("1.1.0", &sock, gc, None),
    );
    assert!(out.status.success(), "{out:?}");
    let mut uids: Vec<String> = fx.agent.status().unwrap()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["uid"].as_str().unwrap().to_string())
        .collect();
    uids.sort();
    assert_eq!(uids, vec![AgentFixture::uid(0), AgentFixture::uid(2)]);
    let out = run(
        &[("CNI_COMMAND", "STATUS".into())],
        &conf("1.1.0", &sock, json!({}), None),
    );
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
}

/// The agent stops (SIGKILL): an ambient pod's ADD fails and names the problem; its DEL
/// succeeds; once the agent is back, the retried ADD enrolls it.
#[test]
fn agent_down_then_back() {
    let Some(mut fx) =
        AgentFixture::start_if_privileged(Path::new(TESTKIT), 1, &["--ambient-namespaces", "mesh"])
    else {
        return;
    };
    let sock = fx.agent.paths.control.clone();
    let pod = fx.topo.pod(0);
    let stdin = conf(
        "1.0.0",
        &sock,
        json!({"ambient_namespaces": ["mesh"]}),
        Some(prev_result("1.0.0", pod.path(), &pod.ips())),
    );
    let add = env("ADD", "sb", pod.path(), "mesh", Some("u-0"));
    let path = pod.path().to_path_buf();
    // Chained before the plugin that assigns the pod's IPs: refused, saying so.
    let no_ips = conf(
        "1.0.0",
        &sock,
        json!({}),
        Some(prev_result("1.0.0", pod.path(), &[])),
    );
    let out = run(&add, &no_ips);
    assert_eq!(error_code(&out, "1.0.0"), 11);
    assert!(out.stdout.contains("chained after"), "{}", out.stdout);
    fx.agent.kill();
    let out = run(&add, &stdin);
    assert_eq!(error_code(&out, "1.0.0"), 11);
    assert!(
        out.stdout.contains("cannot reach the sluice agent"),
        "{}",
        out.stdout
    );
    assert!(
        run(&env("DEL", "sb", &path, "mesh", Some("u-0")), &stdin)
            .status
            .success()
    );
    fx.agent.restart().unwrap();
    fx.agent.wait_ready(AGENT_START).unwrap();
    run(&add, &stdin).ok().unwrap();
    assert_eq!(fx.agent.status().unwrap()["pods"][0]["uid"], "u-0");
}
