//! `cargo xtask demo`: the whole path on this machine, narrated. A node namespace (standing in
//! for the host) with three pod namespaces; the agent; the ztunnel-like peer connected over
//! ZDS; two pods enrolled with `sluice-agent enroll`; traffic between them, into them and from
//! the host; `sluice-agent status`; then a clean teardown that leaves nothing behind.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use sluice_tests::{
    agent_proc::{AgentFixture, HEALTH_PORT, agent_bin},
    harness::{App, testkit_path},
    zds::{ZdsPeer, ZdsPeerOptions},
};

const WAIT: Duration = Duration::from_secs(10);
const NAMES: [&str; 3] = ["pod-a", "pod-b", "pod-c (not enrolled)"];

fn main() {
    if let Err(e) = run() {
        eprintln!("\ndemo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo loads eBPF programs and creates network namespaces: run it as root");
    }
    for bin in [agent_bin(), testkit_path()] {
        if !bin.exists() {
            bail!(
                "{} is missing: build with `cargo build --bins` (cargo xtask demo does)",
                bin.display()
            );
        }
    }

    step("Node and pods: network namespaces joined by veth pairs, no route off this machine");
    println!(
        "(the node namespace plays the host: the agent runs there, as on a node's host network)"
    );
    let mut fx = AgentFixture::spawn(&testkit_path(), 3, &[]).context("setting up")?;
    println!("node netns {}", fx.topo.node().path().display());
    for (i, name) in NAMES.iter().enumerate() {
        let p = fx.topo.pod(i);
        println!(
            "{name:<22} netns {}  {} {}",
            p.path().display(),
            p.ipv4,
            p.ipv6
        );
    }

    step("Agent: sluice-agent run (programs pinned, ZDS socket and control socket open)");
    fx.agent.wait_ready(Duration::from_secs(30))?;
    println!(
        "pins under {}, programs attached to cgroup {}",
        fx.agent.paths.pin_root.display(),
        fx.agent.paths.cgroup.display()
    );
    println!("(on a node they attach to the cgroup2 root; here, to the demo's own cgroup)");
    let (code, body) = fx.agent.http_get(HEALTH_PORT, "/readyz")?;
    println!("GET :{HEALTH_PORT}/readyz -> {code} {}", body.trim());

    step("ztunnel stand-in: sluice-testkit peer --zds (a ZDS client, like the real ztunnel)");
    let peer = ZdsPeer::start(
        &testkit_path(),
        &fx.agent.paths.zds,
        &ZdsPeerOptions::default(),
        Some(&fx.cgroup),
        WAIT,
    )?;
    println!("connected to {}", fx.agent.paths.zds.display());

    step("Enroll pod-a and pod-b: sluice-agent enroll --netns ... --uid ... --ip ... --ip ...");
    for (i, name) in NAMES.iter().take(2).enumerate() {
        let reply = fx.enroll(i, &[])?;
        println!("{name:<8} (default/pod{i}) -> {reply}");
    }

    step("Apps: a TCP echo server on :8080 in every pod");
    let apps: Vec<App> = (0..3).map(|i| fx.app(i)).collect::<Result<_>>()?;
    for app in &apps {
        app.listen(8080)?;
    }
    let host = App::spawn(
        &testkit_path(),
        Some(fx.topo.node().path()),
        Some(&fx.cgroup),
    )?;

    let b = fx.topo.pod(1).ipv4;
    let a6 = fx.topo.pod(0).ipv6;
    connect(&peer, &apps[0], "pod-a", SocketAddr::new(b.into(), 8080))?;
    connect(&peer, &apps[2], "pod-c", SocketAddr::new(a6.into(), 8080))?;
    connect(&peer, &apps[0], "pod-a", "198.51.100.7:443".parse()?)?;
    connect(&peer, &host, "the host", SocketAddr::new(b.into(), 8080))?;
    println!("  (traffic from the node's own addresses is exempt, as kubelet probes must be)");

    step("DNS: pod-a asks a resolver on UDP/53; ztunnel's DNS proxy answers in its name");
    let server: SocketAddr = SocketAddr::new(fx.topo.pod(0).node_ipv4.into(), 53);
    let r = apps[0].dns_udp(server, false)?;
    println!("pod-a app: reply valid={} from {:?}", r.valid, r.reply_from);
    if let Ok(e) = peer.wait_event(|e| e["event"] == "dns_udp", WAIT) {
        println!("ztunnel:   query from {} on {}", e["peer"], e["local"]);
    }

    step("sluice-agent status");
    let out = fx.agent.cli(&["status"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("Teardown: sluice-agent uninstall, then the namespaces and cgroup go");
    drop(peer);
    drop(apps);
    drop(host);
    fx.agent.uninstall()?;
    let pins: PathBuf = fx.bpffs.path().to_path_buf();
    println!(
        "pin directory {}: {}",
        pins.display(),
        if pins.exists() { "STILL THERE" } else { "gone" }
    );
    drop(fx);
    println!("namespaces, veths and the cgroup removed. Done.");
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
