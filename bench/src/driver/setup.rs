//! The four setups, made active on a fresh client pod: the same peer, client and destination
//! app every time; only what steers the client's traffic into the peer differs.
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_tests::harness::Netns;

use super::Env;
use super::enroller::{Cli, Enroller, PodRef};
use super::exec::{ip_batch, run_in, sysctl};
use super::procs::{Agent, Client, Peer};
use super::rules;
use super::topo::ClientPod;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    Floor,
    Iptables,
    Sluice,
    SluiceAccel,
}

impl Setup {
    pub const ALL: [Setup; 4] = [
        Setup::Floor,
        Setup::Iptables,
        Setup::Sluice,
        Setup::SluiceAccel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Floor => "floor",
            Setup::Iptables => "iptables",
            Setup::Sluice => "sluice",
            Setup::SluiceAccel => "sluice+accel",
        }
    }

    pub fn is_sluice(self) -> bool {
        matches!(self, Setup::Sluice | Setup::SluiceAccel)
    }
}

/// A setup ready for traffic. Field order is drop order: the client and the peer go first,
/// then the agent (uninstalled while the pod still exists), the node rule, and the pod.
pub struct Active<'a> {
    pub setup: Setup,
    pub client: Client,
    pub peer: Peer,
    pub agent: Option<Agent>,
    _node_rule: Option<NodeRule<'a>>,
    _pod: ClientPod,
}

const ACK_WAIT: Duration = Duration::from_secs(15);

impl<'a> Active<'a> {
    pub fn start(env: &'a Env, setup: Setup) -> Result<Active<'a>> {
        let pod = env.topo.client_pod()?;
        let node = env.topo.node().path();
        let netns = pod.path().display().to_string();
        let (peer, agent, node_rule) = match setup {
            Setup::Floor => {
                let peer = Peer::start(
                    &env.bench,
                    node,
                    &env.cgroup,
                    &["--netns", &netns, "--floor"],
                )?;
                (peer, None, None)
            }
            Setup::Iptables => {
                apply_pod_rules(&pod)?;
                let rule = NodeRule::apply(env.topo.node())?;
                let peer = Peer::start(&env.bench, node, &env.cgroup, &["--netns", &netns])?;
                (peer, None, Some(rule))
            }
            Setup::Sluice | Setup::SluiceAccel => {
                let agent = Agent::start(node, &env.cgroup, setup == Setup::SluiceAccel)?;
                let zds = agent.zds_socket().display().to_string();
                let mut peer = Peer::start(&env.bench, node, &env.cgroup, &["--zds", &zds])?;
                peer.wait_event("zds_connected", ACK_WAIT)?;
                let uid = format!("bench-client-{}", pod.k);
                Cli { agent: &agent }
                    .enroll(&PodRef {
                        uid: &uid,
                        netns: pod.path(),
                        ip: pod.ip,
                    })
                    .context("enrolling the client pod")?;
                (peer, Some(agent), None)
            }
        };
        let client = Client::start(&env.bench, pod.path(), &env.cgroup)?;
        Ok(Active {
            setup,
            client,
            peer,
            agent,
            _node_rule: node_rule,
            _pod: pod,
        })
    }
}

/// Upstream's in-pod rules and routing (IPv4: the bench's pods are IPv4-only).
pub fn apply_pod_rules(pod: &ClientPod) -> Result<()> {
    run_in(
        pod.path(),
        "iptables-nft-restore",
        &["--noflush"],
        &rules::pod_rules(false),
    )?;
    ip_batch(pod.path(), Some("-4"), &rules::pod_routing(false))?;
    sysctl(pod.path(), "net.ipv4.tcp_fwmark_accept", "1")
}

/// The host half of upstream's rules, in the bench's node namespace (never the machine's).
/// Removed on drop, with its table, so the other setups' forwarded traffic is not tracked.
pub struct NodeRule<'a> {
    node: &'a Netns,
}

impl<'a> NodeRule<'a> {
    pub fn apply(node: &'a Netns) -> Result<NodeRule<'a>> {
        run_in(
            node.path(),
            "iptables-nft-restore",
            &["--noflush"],
            &rules::host_rules(),
        )?;
        Ok(NodeRule { node })
    }
}

impl Drop for NodeRule<'_> {
    fn drop(&mut self) {
        // iptables cannot delete its built-in chains; nft deletes the whole table.
        if let Err(e) = run_in(
            self.node.path(),
            "nft",
            &["delete", "table", "ip", "nat"],
            "",
        ) {
            eprintln!("warning: removing the node's iptables rule: {e:#}");
        }
    }
}
