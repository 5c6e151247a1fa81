//! The agent's container image (`cargo xtask image`) in a real containerd (Debian's): it
//! imports, both binaries run from its one layer, and the uninstall Job of
//! `deploy/manifests/` — its command, environment, privileges and host mounts, read from the
//! manifests — run from the image, leaves the node as it was before the agent came: no pin,
//! link, rule, route, sysctl change, CNI entry, binary, socket or state.
//!
//! The Job's host paths are the test's own (its pin directory, cgroup, CNI and run
//! directories), mounted where the Job mounts the node's.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};
use sluice_tests::{
    agent_proc::{AgentFixture, Workdir},
    cni_runtime::{bridge_conflist, link_reference_plugins},
    containerd::{BindMount, ContainerRun, Containerd},
    deploy::{image::AgentImage, manifests, repo_root},
    harness::{
        BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, Netns, cgroup_attached_prog_ids,
        require_root, sk_lookup_prog_names,
    },
    zds::ZdsPeerOptions,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(10);

/// Debian's packages these tests run; outside CI a missing one skips the test.
fn tools_present() -> bool {
    let missing: Vec<&str> = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/usr/lib/cni/loopback",
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

fn prerequisites() -> Option<AgentImage> {
    if !require_root() || !tools_present() {
        return None;
    }
    AgentImage::locate().unwrap()
}

/// A containerd of the test's own in `netns`, its CNI a loopback-only list, with the image
/// imported.
fn containerd_with_image(work: &Workdir, netns: &Path, image: &AgentImage) -> Containerd {
    let (bin, conf) = (
        work.path().join("ctrd-cni/bin"),
        work.path().join("ctrd-cni/net.d"),
    );
    for d in [&bin, &conf] {
        std::fs::create_dir_all(d).unwrap();
    }
    link_reference_plugins(&bin, &["loopback"]).unwrap();
    let lo = json!({"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]});
    std::fs::write(conf.join("10-lo.conflist"), lo.to_string()).unwrap();
    let ctrd = Containerd::start(&work.path().join("containerd"), netns, &bin, &conf).unwrap();
    ctrd.import_image(&image.archive).unwrap();
    ctrd
}

fn output_of((status, output): (std::process::ExitStatus, String)) -> String {
    assert!(status.success(), "{status}\n{output}");
    output
}

#[test]
fn the_image_imports_and_both_binaries_run_from_it() {
    let Some(image) = prerequisites() else { return };
    let work = Workdir::new().unwrap();
    let netns = Netns::new("slimg").unwrap();
    let ctrd = containerd_with_image(&work, netns.path(), &image);
    let run = |command: &[&str], env: &[(&str, &str)]| {
        ctrd.run_container(&ContainerRun {
            image: image.reference.clone(),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .unwrap()
    };
    let version = output_of(run(&["sluice-agent", "--version"], &[]));
    assert_eq!(
        version.trim(),
        format!("sluice-agent {}", image.version().unwrap())
    );
    let cni = output_of(run(&["sluice-cni"], &[("CNI_COMMAND", "VERSION")]));
    let cni: Value = serde_json::from_str(&cni).unwrap();
    assert!(
        cni["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.1.0"))),
        "{cni}"
    );
}

/// What the agent may change on a pod's netns, read from inside it.
fn pod_state(netns: &Netns) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for family in ["-4", "-6"] {
        state.insert(
            format!("rule {family}"),
            netns.ip(&[family, "rule"]).unwrap(),
        );
        state.insert(
            format!("table 100 {family}"),
            netns
                .ip(&[family, "route", "show", "table", "100"])
                .unwrap_or_default(),
        );
    }
    for sysctl in [
        "net.ipv4.tcp_fwmark_accept",
        "net.ipv4.fwmark_reflect",
        "net.ipv6.fwmark_reflect",
    ] {
        state.insert(sysctl.into(), netns.read_sysctl(sysctl).unwrap());
    }
    let progs = sk_lookup_prog_names(netns.path()).unwrap();
    state.insert("sk_lookup".into(), format!("{progs:?}"));
    state
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The uninstall Job's container from the manifests, with each host path mapped to the
/// test's own (`hosts`) and `env` added (after the Job's, as a ConfigMap would set it).
fn job_container(
    image: &AgentImage,
    hosts: &BTreeMap<&str, PathBuf>,
    env: &[(&str, String)],
) -> ContainerRun {
    let job = manifests::read(&repo_root().join("deploy/manifests/sluice-uninstall-job.yaml"))
        .unwrap()
        .remove(0);
    let config = manifests::read(&repo_root().join("deploy/manifests/sluice.yaml"))
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap();
    let pod = &job["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mut vars: Vec<(String, String)> = Vec::new();
    // envFrom first, then env: env wins, as in Kubernetes.
    if !c["envFrom"].is_null() {
        for (k, v) in config["data"].as_object().unwrap() {
            vars.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        vars.push((
            e["name"].as_str().unwrap().into(),
            e["value"].as_str().unwrap().into(),
        ));
    }
    for (k, v) in env {
        vars.push((k.to_string(), v.clone()));
    }
    let volumes: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap(),
                v["hostPath"]["path"].as_str().unwrap(),
            )
        })
        .collect();
    let mounts = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let node_path = volumes[m["name"].as_str().unwrap()];
            BindMount {
                host: hosts
                    .get(node_path)
                    .unwrap_or_else(|| panic!("no test path for the node's {node_path}"))
                    .clone(),
                container: PathBuf::from(m["mountPath"].as_str().unwrap()),
                propagation: match m["mountPropagation"].as_str() {
                    Some("HostToContainer") => Some("rslave"),
                    Some("Bidirectional") => Some("rshared"),
                    _ => None,
                },
            }
        })
        .collect();
    ContainerRun {
        image: image.reference.clone(),
        command: c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
        env: vars,
        mounts,
        privileged: c["securityContext"]["privileged"] == true,
        host_network: pod["hostNetwork"] == true,
        host_pid: pod["hostPID"] == true,
    }
}

#[test]
fn the_uninstall_job_from_the_image_leaves_the_node_as_it_found_it() {
    let Some(image) = prerequisites() else { return };
    // The agent lays its pins out as on a node: `sluice/` in a bpffs directory (the Job
    // mounts that directory where the node's bpffs is).
    let mut fx = AgentFixture::spawn_cni_with(Path::new(TESTKIT), 2, &[], |p| {
        std::fs::create_dir_all(&p.pin_root).unwrap();
        p.pin_root = p.pin_root.join("sluice");
    })
    .unwrap();
    let cni = fx.agent.paths.cni.clone().unwrap();
    // The node before the agent: a primary CNI's config and plugins, untouched pods.
    link_reference_plugins(
        &cni.bin_dir,
        &["bridge", "host-local", "portmap", "loopback"],
    )
    .unwrap();
    let primary = bridge_conflist(
        "1.0.0",
        "slbr1",
        &[("10.80.0.0/24", "10.80.0.0/24")],
        &fx.work.path().join("ipam"),
    );
    let conflist = cni.conf_dir.join("10-bridge.conflist");
    std::fs::write(&conflist, serde_json::to_vec_pretty(&primary).unwrap()).unwrap();
    let bins_before = names_in(&cni.bin_dir);
    let pods_before: Vec<_> = (0..2).map(|i| pod_state(&fx.topo.pod(i).netns)).collect();

    // The agent at work: chained, two pods enrolled and redirected.
    fx.agent.wait_ready(WAIT).unwrap();
    let _peer = fx.zds_peer(&ZdsPeerOptions::default()).unwrap();
    fx.enroll(0, &[]).unwrap();
    fx.enroll(1, &["--bypass-inbound"]).unwrap();
    let chained: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert!(chained.to_string().contains("sluice-cni"), "{chained}");
    assert!(cni.bin_dir.join("sluice-cni").exists());
    assert_ne!(pod_state(&fx.topo.pod(0).netns), pods_before[0]);

    // Uninstall as the README says: the DaemonSet goes (its agent stops), then the Job runs.
    let exit = fx.agent.terminate().unwrap();
    assert!(exit.success(), "{exit}");
    let ctrd = containerd_with_image(&fx.work, fx.topo.node().path(), &image);
    let work = fx.work.path().to_path_buf();
    let hosts: BTreeMap<&str, PathBuf> = [
        ("/sys/fs/bpf", fx.bpffs.path().to_path_buf()),
        ("/sys/fs/cgroup", PathBuf::from("/sys/fs/cgroup")),
        ("/var/run/netns", PathBuf::from("/var/run/netns")),
        ("/var/run/ztunnel", work.clone()),
        ("/var/run/sluice", work.clone()),
        ("/opt/cni/bin", cni.bin_dir.clone()),
        ("/etc/cni/net.d", cni.conf_dir.clone()),
    ]
    .into();
    // The programs attach to the test's cgroup, never the machine's root (a ConfigMap may
    // name a cgroup the same way).
    let env = [("SLUICE_CGROUP", fx.cgroup.path().display().to_string())];
    let (status, log) = ctrd
        .run_container(&job_container(&image, &hosts, &env))
        .unwrap();
    assert!(
        status.success(),
        "the uninstall Job failed ({status}):\n{log}"
    );

    // As it found it.
    assert!(!fx.agent.paths.pin_root.exists(), "pins left: {log}");
    for t in [BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT] {
        assert!(
            cgroup_attached_prog_ids(&fx.cgroup, t).unwrap().is_empty(),
            "cgroup links"
        );
    }
    for (i, before) in pods_before.iter().enumerate() {
        assert_eq!(&pod_state(&fx.topo.pod(i).netns), before, "pod{i}");
    }
    let restored: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(restored, primary, "the primary CNI's config");
    assert_eq!(names_in(&cni.conf_dir), ["10-bridge.conflist"]);
    assert_eq!(
        names_in(&cni.bin_dir),
        bins_before,
        "sluice-cni left in the CNI bin dir"
    );
    for path in [
        &fx.agent.paths.control,
        &fx.agent.paths.zds,
        &fx.agent.paths.state,
    ] {
        assert!(!path.exists(), "{} left behind", path.display());
    }
    drop(ctrd);
    // The fixture's own uninstall finds nothing left to do.
    fx.agent
        .uninstall()
        .context("a second uninstall on a clean node")
        .unwrap();
}
