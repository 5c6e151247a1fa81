use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::netns::Netns;

/// One pod: its own netns with `eth0` (veth) towards the node.
#[derive(Debug)]
pub struct Pod {
    pub netns: Netns,
    pub index: u8,
    /// `10.77.<i>.2`
    pub ipv4: Ipv4Addr,
    /// `fd77:0:<i>::2`
    pub ipv6: Ipv6Addr,
    /// The node's side of this pod's link: `10.77.<i>.1` (the pod's only gateway).
    pub node_ipv4: Ipv4Addr,
    /// `fd77:0:<i>::1`
    pub node_ipv6: Ipv6Addr,
    /// Name of the node-side veth, inside the node netns.
    pub node_ifname: String,
}

impl Pod {
    pub fn path(&self) -> &Path {
        self.netns.path()
    }

    /// IPv4 and IPv6 address of the pod.
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }
}

/// A "node" netns plus pods, each linked to the node by a veth pair created directly in
/// the two namespaces (never in the host's). Pods route only `10.77.0.0/16` and
/// `fd77::/16` via the node, which forwards between them; there is no default route
/// anywhere, so any other destination fails with ENETUNREACH inside the test.
///
/// Addresses repeat between topologies: they live in namespaces of their own.
#[derive(Debug)]
pub struct Topology {
    // Declared before `node`, so pods are deleted first.
    pods: Vec<Pod>,
    node: Netns,
}

const POD_IFNAME: &str = "eth0";
const READY_TIMEOUT: Duration = Duration::from_secs(5);

impl Topology {
    pub fn new(pods: usize) -> Result<Topology> {
        ensure!(pods <= 256, "at most 256 pods (one /24 each)");
        let node = Netns::new("slnode")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        disable_dad(&node)?;
        let mut topo = Topology {
            pods: Vec::with_capacity(pods),
            node,
        };
        for i in 0..pods {
            // Pushed one by one so a failure part-way still cleans up what exists.
            let pod = topo.add_pod(i as u8)?;
            topo.pods.push(pod);
        }
        for pod in &topo.pods {
            wait_link_ready(&pod.netns, POD_IFNAME)?;
            wait_link_ready(&topo.node, &pod.node_ifname)?;
        }
        Ok(topo)
    }

    pub fn node(&self) -> &Netns {
        &self.node
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    fn add_pod(&self, i: u8) -> Result<Pod> {
        let netns = Netns::new("slpod")?;
        disable_dad(&netns)?;
        let pod = Pod {
            index: i,
            ipv4: Ipv4Addr::new(10, 77, i, 2),
            ipv6: Ipv6Addr::new(0xfd77, 0, i.into(), 0, 0, 0, 0, 2),
            node_ipv4: Ipv4Addr::new(10, 77, i, 1),
            node_ipv6: Ipv6Addr::new(0xfd77, 0, i.into(), 0, 0, 0, 0, 1),
            node_ifname: format!("pod{i}"),
            netns,
        };
        // Both ends are created in their target namespaces by one netlink request.
        super::command::ip(&[
            "link",
            "add",
            POD_IFNAME,
            "netns",
            pod.netns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &pod.node_ifname,
            "netns",
            self.node.name(),
        ])
        .with_context(|| format!("creating veth for pod {i}"))?;

        let node_if = pod.node_ifname.as_str();
        let n = &self.node;
        n.ip(&[
            "addr",
            "add",
            &format!("{}/24", pod.node_ipv4),
            "dev",
            node_if,
        ])?;
        n.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", pod.node_ipv6),
            "dev",
            node_if,
            "nodad",
        ])?;
        n.ip(&["link", "set", node_if, "up"])?;

        let p = &pod.netns;
        p.ip(&[
            "addr",
            "add",
            &format!("{}/24", pod.ipv4),
            "dev",
            POD_IFNAME,
        ])?;
        p.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", pod.ipv6),
            "dev",
            POD_IFNAME,
            "nodad",
        ])?;
        p.ip(&["link", "set", POD_IFNAME, "up"])?;
        let gw4 = pod.node_ipv4.to_string();
        let gw6 = pod.node_ipv6.to_string();
        p.ip(&[
            "route",
            "add",
            "10.77.0.0/16",
            "via",
            &gw4,
            "dev",
            POD_IFNAME,
        ])?;
        p.ip(&[
            "-6",
            "route",
            "add",
            "fd77::/16",
            "via",
            &gw6,
            "dev",
            POD_IFNAME,
        ])?;
        Ok(pod)
    }
}

/// Link-local addresses would otherwise sit in DAD for a second or so; nothing here
/// needs duplicate detection. Must be set before the veths appear in the namespace.
fn disable_dad(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
}

/// Waits until `ifname` has carrier (both veth ends up) and no tentative IPv6 address.
fn wait_link_ready(ns: &Netns, ifname: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let link = ns.ip(&["-o", "link", "show", "dev", ifname])?;
        let tentative = ns.ip(&["-6", "-o", "addr", "show", "dev", ifname, "tentative"])?;
        if link.contains("LOWER_UP") && tentative.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{ifname} in {} not ready after {READY_TIMEOUT:?}: {link} {tentative}",
                ns.name()
            );
        }
        // No event to wait on short of a netlink monitor; the state settles in µs–ms.
        thread::sleep(Duration::from_millis(5));
    }
}
