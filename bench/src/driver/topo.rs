//! The bench's network: a node namespace (standing in for the host: the agent and the peer
//! process live there), a destination pod holding 200 addresses with the destination app, and
//! client pods made on demand, each joined to the node by a veth pair. Pods route only
//! `10.0.0.0/8` via the node; nothing routes off the machine. Cheap pods (a namespace with `lo`
//! and a dummy-like interface holding one address) serve the enrollment and scale figures.
//!
//! Every namespace is a guard: dropped (also on error or Ctrl-C), it is deleted, and the veth,
//! addresses, rules and sockets inside go with it.
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sluice_tests::harness::{Netns, unique};

use super::exec::{ip_batch, ip_batch_here};
use crate::ports;

/// How many destination addresses the destination pod holds (figure 2's 200).
pub const DEST_ADDRS: usize = 200;
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Topo {
    // Declared first: deleted before the node.
    dest: Netns,
    node: Netns,
    next_pod: Cell<u8>,
}

/// A pod with a veth to the node: `10.77.<k>.2/24`, gateway `10.77.<k>.1`.
pub struct ClientPod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub k: u8,
}

impl ClientPod {
    pub fn path(&self) -> &Path {
        self.netns.path()
    }
}

impl Topo {
    pub fn new() -> Result<Topo> {
        let node = Netns::new("sbnode")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let dest = Netns::new("sbdst")?;
        let topo = Topo {
            dest,
            node,
            next_pod: Cell::new(1),
        };
        topo.link(&topo.dest, "dst0", "10.79.0.2", "10.79.0.1", 24)?;
        let mut lines: Vec<String> = (0..DEST_ADDRS)
            .map(|i| format!("addr add {}/32 dev eth0", ports::dest_ip(i)))
            .collect();
        lines.push("route add 10.0.0.0/8 via 10.79.0.1 dev eth0".into());
        ip_batch(topo.dest.path(), None, &lines)?;
        ip_batch(
            topo.node.path(),
            None,
            &["route add 10.78.0.0/16 via 10.79.0.2 dev dst0".into()],
        )?;
        Ok(topo)
    }

    pub fn node(&self) -> &Netns {
        &self.node
    }

    pub fn dest(&self) -> &Netns {
        &self.dest
    }

    /// A fresh client pod. Each setup gets its own, so nothing (TIME_WAIT sockets, conntrack
    /// entries, rules) carries over from one setup to the next.
    pub fn client_pod(&self) -> Result<ClientPod> {
        let k = self.next_pod.get();
        ensure!(k < 250, "out of client pod subnets");
        self.next_pod.set(k + 1);
        let netns = Netns::new("sbpod")?;
        let ip = Ipv4Addr::new(10, 77, k, 2);
        self.link(
            &netns,
            &format!("c{k}"),
            &ip.to_string(),
            &format!("10.77.{k}.1"),
            24,
        )?;
        ip_batch(
            netns.path(),
            None,
            &[format!("route add 10.0.0.0/8 via 10.77.{k}.1 dev eth0")],
        )?;
        Ok(ClientPod { netns, ip, k })
    }

    /// A veth pair `eth0` (in `pod`) — `node_if` (in the node), addressed and up.
    fn link(&self, pod: &Netns, node_if: &str, pod_ip: &str, node_ip: &str, len: u8) -> Result<()> {
        sluice_tests::harness::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            pod.name(),
            "type",
            "veth",
            "peer",
            "name",
            node_if,
            "netns",
            self.node.name(),
        ])
        .with_context(|| format!("creating the veth of {}", pod.name()))?;
        ip_batch(
            self.node.path(),
            None,
            &[
                format!("addr add {node_ip}/{len} dev {node_if}"),
                format!("link set {node_if} up"),
            ],
        )?;
        ip_batch(
            pod.path(),
            None,
            &[
                format!("addr add {pod_ip}/{len} dev eth0"),
                "link set eth0 up".into(),
            ],
        )?;
        wait_carrier(pod, "eth0")
    }
}

fn wait_carrier(ns: &Netns, ifname: &str) -> Result<()> {
    let deadline = Instant::now() + LINK_TIMEOUT;
    loop {
        let link = ns.ip(&["-o", "link", "show", "dev", ifname])?;
        if link.contains("LOWER_UP") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{ifname} in {} has no carrier: {link}", ns.name());
        }
        // No event to wait on short of a netlink monitor; carrier comes within milliseconds.
        thread::sleep(Duration::from_millis(2));
    }
}

/// Many cheap pods, made and deleted with a handful of `ip -batch` runs: `lo` up, an `eth0`
/// (a dummy, or an ifb where the kernel lacks dummy) holding `10.200.<i/250>.<i%250+1>/32`.
/// Enough to enroll (the agent checks the
/// namespace holds the pod's IP); not reachable from anywhere.
pub struct CheapPods {
    pods: Vec<CheapPod>,
}

/// The interface type cheap pods get, found on first use.
static IFACE_KIND: OnceLock<&'static str> = OnceLock::new();

pub struct CheapPod {
    pub name: String,
    pub path: PathBuf,
    pub ip: Ipv4Addr,
}

impl CheapPods {
    pub fn new(n: usize, first_index: usize) -> Result<CheapPods> {
        let mut set = CheapPods { pods: Vec::new() };
        let mut adds = Vec::new();
        for i in first_index..first_index + n {
            let name = unique("sbcp");
            adds.push(format!("netns add {name}"));
            set.pods.push(CheapPod {
                path: Path::new("/run/netns").join(&name),
                name,
                ip: Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1),
            });
        }
        // If this fails part-way, Drop deletes whatever was made (`-force` skips the rest).
        ip_batch_here(&adds, false)?;
        for pod in &set.pods {
            let lines = |kind: &str| {
                [
                    "link set lo up".to_string(),
                    format!("link add eth0 type {kind}"),
                    format!("addr add {}/32 dev eth0", pod.ip),
                    "link set eth0 up".into(),
                ]
            };
            match IFACE_KIND.get() {
                Some(kind) => ip_batch(&pod.path, None, &lines(kind))?,
                None => {
                    // Kernels built without `dummy` (no modules) usually have `ifb`.
                    let kind = ["dummy", "ifb"]
                        .into_iter()
                        .find(|kind| ip_batch(&pod.path, None, &lines(kind)).is_ok())
                        .context("neither a dummy nor an ifb interface can be made")?;
                    let _ = IFACE_KIND.set(kind);
                }
            }
        }
        Ok(set)
    }

    pub fn pods(&self) -> &[CheapPod] {
        &self.pods
    }
}

impl Drop for CheapPods {
    fn drop(&mut self) {
        let dels: Vec<String> = self
            .pods
            .iter()
            .map(|p| format!("netns del {}", p.name))
            .collect();
        if !dels.is_empty()
            && let Err(e) = ip_batch_here(&dels, true)
        {
            eprintln!("warning: deleting cheap pods: {e:#}");
        }
    }
}
