//! Finding running pods' network namespaces through /proc: real network namespaces holding
//! real processes, placed in cgroups named as the kubelet names them (cgroupfs and systemd
//! drivers, cgroup v1 and v2), scanned by `sluice_agent::k8s::procscan`.
use std::{
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, ensure};
use sluice_agent::k8s::procscan::{PodToFind, ProcScanner};
use sluice_tests::harness::{CgroupLayout, KubeletCgroup, Netns, Proc, require_root};

/// A fresh pod UID (the shape Kubernetes gives them).
fn pod_uid() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
        std::process::id(),
        n,
        t & 0xfff,
        t
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// A pod's netns: an interface holding `ips` (one end of a veth pair whose other end stays
/// in the same namespace; the kernel here has veth but maybe no `dummy`).
fn pod_netns(ips: &[IpAddr]) -> Result<Netns> {
    let ns = Netns::new("kp")?;
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
    ns.ip(&["link", "set", "d0", "up"])?;
    for ip in ips {
        let cidr = if ip.is_ipv4() {
            format!("{ip}/32")
        } else {
            format!("{ip}/128")
        };
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", "d0"];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        ns.ip(&args)?;
    }
    Ok(ns)
}

/// A process of the pod: started in `netns` (the host's if `None`), then moved into `cgroup`.
fn pod_process(netns: Option<&Netns>, cgroup: &KubeletCgroup) -> Result<Proc> {
    let p = Proc::spawn(
        Path::new("/bin/sleep"),
        &["1000"],
        netns.map(|n| n.path()),
        None,
    )?;
    cgroup.add_pid(p.pid())?;
    Ok(p)
}

fn inode(ns: &Netns) -> u64 {
    std::fs::metadata(ns.path())
        .map(|m| m.ino())
        .unwrap_or_default()
}

/// The layouts this machine has; all of them are required in CI.
fn layouts() -> Vec<CgroupLayout> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    CgroupLayout::ALL
        .into_iter()
        .filter(|l| {
            let has = l.mount().is_some();
            assert!(
                has || !ci,
                "CI=true but this machine has no cgroup hierarchy for {l:?}"
            );
            if !has {
                eprintln!("skipping {l:?}: no such cgroup hierarchy here");
            }
            has
        })
        .collect()
}

#[test]
fn finds_running_pods_in_every_kubelet_cgroup_layout() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    struct Pod {
        uid: String,
        ips: Vec<IpAddr>,
        netns: Netns,
        _cgroup: KubeletCgroup,
        procs: Vec<Proc>,
    }
    let mut pods = Vec::new();
    for (i, layout) in layouts().into_iter().enumerate() {
        let uid = pod_uid();
        let ips = vec![ip(&format!("10.91.{i}.2")), ip(&format!("fd91:0:{i}::2"))];
        let netns = pod_netns(&ips)?;
        let cgroup = KubeletCgroup::new(layout, &uid, &format!("c{i}"))?;
        // Two processes in the pod (a sandbox and an app): the older one is reported.
        let procs = vec![
            pod_process(Some(&netns), &cgroup)?,
            pod_process(Some(&netns), &cgroup)?,
        ];
        pods.push(Pod {
            uid,
            ips,
            netns,
            _cgroup: cgroup,
            procs,
        });
    }
    let wanted: Vec<PodToFind> = pods
        .iter()
        .map(|p| PodToFind {
            uid: p.uid.clone(),
            ips: p.ips.clone(),
        })
        .collect();

    let result = ProcScanner::new()?.find(&wanted)?;
    ensure!(result.refused.is_empty(), "{:?}", result.refused);
    for pod in &pods {
        let found = result
            .found
            .get(&pod.uid)
            .with_context(|| format!("pod {} not found", pod.uid))?;
        ensure!(
            found.netns.inode() == inode(&pod.netns),
            "the pod's own netns"
        );
        ensure!(
            std::fs::canonicalize(&found.path)? == std::fs::canonicalize(pod.netns.path())?,
            "its bind mount is the stable path: {:?}",
            found.path
        );
        ensure!(
            found.pid == pod.procs[0].pid(),
            "the oldest process: {} vs {}",
            found.pid,
            pod.procs[0].pid()
        );
    }
    ensure!(result.found.len() == pods.len());
    Ok(())
}

#[test]
fn refuses_a_netns_that_lacks_any_of_the_pods_ips() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let layout = layouts()[0];

    // Pod A's process sits in a netns holding only one of A's two IPs.
    let a = PodToFind {
        uid: pod_uid(),
        ips: vec![ip("10.92.0.2"), ip("fd92::2")],
    };
    let a_ns = pod_netns(&a.ips[..1])?;
    let a_cg = KubeletCgroup::new(layout, &a.uid, "a")?;
    let _a_proc = pod_process(Some(&a_ns), &a_cg)?;

    // Pod B has its own netns, and one of its processes visits pod C's netns (as `nsenter`
    // or a debug container would): only B's own netns may be taken.
    let b = PodToFind {
        uid: pod_uid(),
        ips: vec![ip("10.92.1.2")],
    };
    let b_ns = pod_netns(&b.ips)?;
    let c_ns = pod_netns(&[ip("10.92.2.2")])?;
    let b_cg = KubeletCgroup::new(layout, &b.uid, "b")?;
    let _b_visitor = pod_process(Some(&c_ns), &b_cg)?;
    let _b_proc = pod_process(Some(&b_ns), &b_cg)?;

    // Pod D's only process runs in the host netns: never a pod's, not even a refusal.
    let d = PodToFind {
        uid: pod_uid(),
        ips: vec![ip("10.92.3.2")],
    };
    let d_cg = KubeletCgroup::new(layout, &d.uid, "d")?;
    let _d_proc = pod_process(None, &d_cg)?;

    // Pod E has no IPs yet: nothing can be verified, so nothing is accepted.
    let e = PodToFind {
        uid: pod_uid(),
        ips: vec![],
    };
    let e_ns = pod_netns(&[ip("10.92.4.2")])?;
    let e_cg = KubeletCgroup::new(layout, &e.uid, "e")?;
    let _e_proc = pod_process(Some(&e_ns), &e_cg)?;

    let result = ProcScanner::new()?.find(&[a.clone(), b.clone(), d.clone(), e.clone()])?;

    ensure!(
        !result.found.contains_key(&a.uid),
        "A's netns lacks one of its IPs"
    );
    let a_refusal = result
        .refused
        .iter()
        .find(|r| r.uid == a.uid)
        .context("A refused")?;
    ensure!(a_refusal.missing == [ip("fd92::2")], "{a_refusal:?}");
    ensure!(a_refusal.netns_inode == inode(&a_ns));

    let b_found = result.found.get(&b.uid).context("B found")?;
    ensure!(
        b_found.netns.inode() == inode(&b_ns),
        "B's own netns, not C's"
    );
    let b_refusal = result
        .refused
        .iter()
        .find(|r| r.uid == b.uid)
        .context("C's netns refused for B")?;
    ensure!(
        b_refusal.netns_inode == inode(&c_ns) && b_refusal.missing == b.ips,
        "{b_refusal:?}"
    );

    ensure!(!result.found.contains_key(&d.uid) && !result.refused.iter().any(|r| r.uid == d.uid));
    ensure!(!result.found.contains_key(&e.uid), "no IPs, no netns");
    ensure!(result.refused.iter().any(|r| r.uid == e.uid));
    Ok(())
}
