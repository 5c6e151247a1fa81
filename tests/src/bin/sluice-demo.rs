//! `cargo xtask demo`: the whole path on this machine, narrated. A node namespace (standing in
//! for the host) where the agent runs and installs sluice-cni into a CNI configuration that a
//! "primary CNI" (Debian's bridge and host-local plugins) wrote; the ztunnel-like peer
//! connected over ZDS; three pods created the way a container runtime creates them: an empty
//! network namespace, then the CNI chain (loopback; bridge + host-local + portmap + sluice-cni)
//! with the runtime's environment and stdin. Two pods are in the ambient namespace `demo` and
//! get enrolled by sluice-cni before "their app starts"; the third is not. Then traffic, status,
//! CNI DEL, and a clean teardown that leaves nothing behind.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use sluice_tests::{
    agent_proc::{AgentFixture, HEALTH_PORT, Workdir, agent_bin},
    cni_runtime::{Runtime, Sandbox, bridge_conflist, cni_bin, link_reference_plugins},
    harness::{App, Netns, testkit_path},
    zds::{ZdsPeer, ZdsPeerOptions},
};

const WAIT: Duration = Duration::from_secs(10);
const AMBIENT_NS: &str = "demo";
/// (pod name, Kubernetes namespace): the first two are in the ambient namespace.
const PODS: [(&str, &str); 3] = [
    ("pod-a", AMBIENT_NS),
    ("pod-b", AMBIENT_NS),
    ("pod-c", "default"),
];
const BRIDGE: &str = "slbr0";
const V4: (&str, &str, &str) = ("10.78.0.0/24", "10.78.0.0/16", "10.78.0.1/24");
const V6: (&str, &str, &str) = ("fd78::/64", "fd78::/16", "fd78::1/64");

fn main() {
    if let Err(e) = run() {
        eprintln!("\ndemo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

struct Pod {
    netns: Netns,
    sandbox: Sandbox,
    result: Value,
    ipv4: std::net::IpAddr,
    ipv6: std::net::IpAddr,
}

fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo loads eBPF programs and creates network namespaces: run it as root");
    }
    for bin in [agent_bin(), testkit_path(), cni_bin()] {
        if !bin.exists() {
            bail!(
                "{} is missing: build with `cargo build --bins` (cargo xtask demo does)",
                bin.display()
            );
        }
    }

    step("Node: a network namespace standing in for the host, with a bridge for the pods");
    let mut fx = AgentFixture::spawn_cni(&testkit_path(), 0, &["--ambient-namespaces", AMBIENT_NS])
        .context("setting up")?;
    let node = fx.topo.node();
    // The node's own address on the pod bridge exists before the agent starts, as a node's
    // addresses do: traffic from it (kubelet probes) stays exempt.
    node.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    node.ip(&["addr", "add", V4.2, "dev", BRIDGE])?;
    node.ip(&["-6", "addr", "add", V6.2, "dev", BRIDGE, "nodad"])?;
    node.ip(&["link", "set", BRIDGE, "up"])?;
    println!(
        "node netns {}, bridge {BRIDGE} {} {}",
        node.path().display(),
        V4.2,
        V6.2
    );

    step("Agent: sluice-agent run --cni-conf-dir ... --ambient-namespaces demo");
    let cni = fx.agent.paths.cni.clone().context("CNI dirs")?;
    println!(
        "CNI conf dir {}\nCNI bin dir  {}",
        cni.conf_dir.display(),
        cni.bin_dir.display()
    );
    // Up, but not ready until it has chained sluice-cni: there is no CNI config yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (code, body) = loop {
        let (code, body) = fx
            .agent
            .http_get(HEALTH_PORT, "/readyz")
            .unwrap_or_default();
        if body.contains("no CNI network configuration") || std::time::Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "GET :{HEALTH_PORT}/readyz -> {code} {}",
        body.trim().replace('\n', " | ")
    );

    step("Primary CNI: writes its configuration (Debian's bridge + host-local + portmap)");
    link_reference_plugins(
        &cni.bin_dir,
        &["bridge", "host-local", "portmap", "loopback"],
    )?;
    let ipam = Workdir::new()?;
    let primary = bridge_conflist(
        "1.0.0",
        BRIDGE,
        &[(V4.0, V4.1), (V6.0, V6.1)],
        &ipam.path().join("ipam"),
    );
    let conflist = cni.conf_dir.join("10-bridge.conflist");
    std::fs::write(&conflist, serde_json::to_vec_pretty(&primary)?)?;
    println!("wrote {}", conflist.display());
    fx.agent.wait_ready(Duration::from_secs(30))?;
    let chained: Value = serde_json::from_slice(&std::fs::read(&conflist)?)?;
    println!("the agent chained sluice-cni last and is ready; the runtime now runs:");
    for p in chained["plugins"].as_array().into_iter().flatten() {
        println!("  {}", p);
    }
    println!(
        "and {} holds the plugin",
        cni.bin_dir.join("sluice-cni").display()
    );

    step("ztunnel stand-in: sluice-testkit peer --zds (a ZDS client, like the real ztunnel)");
    let peer = ZdsPeer::start(
        &testkit_path(),
        &fx.agent.paths.zds,
        &ZdsPeerOptions::default(),
        Some(&fx.cgroup),
        WAIT,
    )?;
    println!("connected to {}", fx.agent.paths.zds.display());

    step("Pods: an empty netns each, then CNI ADD as a runtime runs it");
    let runtime = Runtime::from_conf_dir(&cni.conf_dir, &cni.bin_dir, Some(node.path()))?;
    let mut pods = Vec::new();
    for (i, (name, ns)) in PODS.iter().enumerate() {
        let netns = Netns::new("slpod")?;
        // No duplicate address detection: the pod's IPv6 address is usable at once.
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        let sandbox = Sandbox {
            container_id: format!("{i:02x}{}", "5a1ce".repeat(12)),
            netns: netns.path().to_path_buf(),
            ifname: "eth0".into(),
            namespace: ns.to_string(),
            name: name.to_string(),
            uid: Some(format!("00000000-0000-4000-8000-{i:012}")),
        };
        runtime.loopback().add(&sandbox)?;
        let (result, timings) = runtime.add(&sandbox)?;
        let ips = sluice_agent::cni::result::pod_ips(&result)?;
        let ip = |v4: bool| ips.iter().copied().find(|ip| ip.is_ipv4() == v4);
        let (ipv4, ipv6) = (ip(true).context("no IPv4")?, ip(false).context("no IPv6")?);
        let times: Vec<String> = timings
            .iter()
            .map(|(t, d)| format!("{t} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        println!(
            "{ns}/{name:<6} {ipv4:<11} {ipv6:<10}  ADD: {}",
            times.join(", ")
        );
        pods.push(Pod {
            netns,
            sandbox,
            result,
            ipv4,
            ipv6,
        });
    }
    let status = fx.agent.status()?;
    for p in status["pods"].as_array().into_iter().flatten() {
        println!(
            "enrolled: {}/{} uid {} netns {} (container {}…)",
            p["namespace"].as_str().unwrap_or_default(),
            p["name"].as_str().unwrap_or_default(),
            p["uid"].as_str().unwrap_or_default(),
            p["netns"].as_str().unwrap_or_default(),
            &p["container_id"].as_str().unwrap_or_default()[..12]
        );
    }
    println!(
        "({}/pod-c is not in an ambient namespace: sluice-cni passed it through)",
        PODS[2].1
    );

    step("Apps: a TCP echo server on :8080 in every pod");
    let apps: Vec<App> = pods
        .iter()
        .map(|p| App::spawn(&testkit_path(), Some(p.netns.path()), Some(&fx.cgroup)))
        .collect::<Result<_>>()?;
    for app in &apps {
        app.listen(8080)?;
    }
    let host = App::spawn(&testkit_path(), Some(node.path()), Some(&fx.cgroup))?;

    connect(
        &peer,
        &apps[0],
        "pod-a",
        SocketAddr::new(pods[1].ipv4, 8080),
    )?;
    connect(
        &peer,
        &apps[2],
        "pod-c",
        SocketAddr::new(pods[0].ipv6, 8080),
    )?;
    connect(&peer, &apps[0], "pod-a", "198.51.100.7:443".parse()?)?;
    connect(
        &peer,
        &host,
        "the host",
        SocketAddr::new(pods[1].ipv4, 8080),
    )?;
    println!("  (traffic from the node's own addresses is exempt, as kubelet probes must be)");

    step("DNS: pod-a asks a resolver on UDP/53; ztunnel's DNS proxy answers in its name");
    let server: SocketAddr = SocketAddr::new("10.78.0.1".parse()?, 53);
    let r = apps[0].dns_udp(server, false)?;
    println!("pod-a app: reply valid={} from {:?}", r.valid, r.reply_from);
    if let Ok(e) = peer.wait_event(|e| e["event"] == "dns_udp", WAIT) {
        println!("ztunnel:   query from {} on {}", e["peer"], e["local"]);
    }

    step("sluice-agent status");
    let out = fx.agent.cli(&["status"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("Pods deleted: CNI DEL as a runtime runs it (in reverse, with the cached result)");
    drop(apps);
    for p in &pods {
        runtime.del(&p.sandbox, Some(&p.result))?;
        runtime.loopback().del(&p.sandbox, None)?;
        println!("{}/{}: DEL done", p.sandbox.namespace, p.sandbox.name);
    }
    let left = fx.agent.status()?["pods"].as_array().map_or(0, Vec::len);
    println!("pods still enrolled: {left}");

    step("Teardown: sluice-agent uninstall, then the namespaces and cgroup go");
    drop(peer);
    drop(host);
    fx.agent.uninstall()?;
    let pins: PathBuf = fx.bpffs.path().to_path_buf();
    let types: Vec<String> =
        serde_json::from_slice::<Value>(&std::fs::read(&conflist)?)?["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["type"].as_str().unwrap_or_default().to_string())
            .collect();
    println!(
        "pin directory {}: {}",
        pins.display(),
        if pins.exists() { "STILL THERE" } else { "gone" }
    );
    println!("{}: plugins {types:?}", conflist.display());
    println!(
        "{}: {}",
        cni.bin_dir.join("sluice-cni").display(),
        if cni.bin_dir.join("sluice-cni").exists() {
            "STILL THERE"
        } else {
            "gone"
        }
    );
    drop(pods);
    drop(fx);
    println!("namespaces, veths, the bridge and the cgroup removed. Done.");
    Ok(())
}

/// One connection, as the app and as ztunnel saw it.
fn connect(peer: &ZdsPeer, app: &App, who: &str, dst: SocketAddr) -> Result<()> {
    println!("\n{who} connects to {dst}");
    let r = app.connect(dst, Some("hello"))?;
    match (&r.peername, &r.banner) {
        (Some(peer_addr), Some(banner)) => {
            println!("  app:     getpeername() = {peer_addr}; server said {banner:?}")
        }
        _ => println!(
            "  app:     {}",
            r.error.clone().unwrap_or_else(|| "no answer".into())
        ),
    }
    let dst_s = dst.to_string();
    let seen: Vec<Value> = std::iter::from_fn(|| {
        peer.wait_event(
            |e| (e["event"] == "outbound" || e["event"] == "inbound") && e["orig_dst"] == dst_s,
            Duration::from_millis(500),
        )
        .ok()
    })
    .take(2)
    .collect();
    if seen.is_empty() {
        println!("  ztunnel: did not see it (not redirected)");
    }
    for e in seen {
        println!(
            "  ztunnel: {} listener of workload {} got it from {}; original destination {} (via {})",
            e["event"].as_str().unwrap_or_default(),
            e["uid"].as_str().unwrap_or_default(),
            e["peer"].as_str().unwrap_or_default(),
            e["orig_dst"].as_str().unwrap_or_default(),
            e["orig_dst_from"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}
