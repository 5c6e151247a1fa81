//! Handles on the bench's own helper processes (`sluice-bench client|peer|server`), each
//! placed in its namespace and in the bench's cgroup before it execs, and on the agent.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use sluice_tests::{
    agent_proc::{AgentPaths, AgentProc, METRICS_PORT, Workdir},
    harness::{Bpffs, Cgroup, Proc},
};

use crate::proto::{Job, JobResult};

const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Client {
    proc: Proc,
}

impl Client {
    pub fn start(bench: &Path, netns: &Path, cgroup: &Cgroup) -> Result<Client> {
        Ok(Client {
            proc: Proc::spawn(bench, &["client"], Some(netns), Some(cgroup))?,
        })
    }

    /// Runs one job; `limit` bounds the wait beyond the job's own deadline.
    pub fn run(&mut self, job: &Job, limit: Duration) -> Result<JobResult> {
        self.send(job)?;
        self.result(limit)
    }

    pub fn send(&mut self, job: &Job) -> Result<()> {
        self.proc.send_line(&serde_json::to_string(job)?)
    }

    pub fn wait_event(&mut self, event: &str, limit: Duration) -> Result<Value> {
        self.proc.take(|v| v["event"] == event, limit)
    }

    pub fn result(&mut self, limit: Duration) -> Result<JobResult> {
        let v = self.wait_event("result", limit)?;
        serde_json::from_value(v).context("decoding a client result")
    }
}

/// The peer's counters (see `peer::stats`).
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
pub struct PeerStats {
    pub outbound_sol_ip: u64,
    pub outbound_sol_ipv6: u64,
    pub outbound_local: u64,
    pub outbound_at_orig: u64,
    pub dns: u64,
}

pub struct Peer {
    proc: Proc,
}

impl Peer {
    /// Starts the peer in the node namespace (where ztunnel runs) and waits until it is ready.
    pub fn start(bench: &Path, node: &Path, cgroup: &Cgroup, args: &[&str]) -> Result<Peer> {
        let mut all = vec!["peer"];
        all.extend_from_slice(args);
        let mut proc = Proc::spawn(bench, &all, Some(node), Some(cgroup))?;
        proc.take(|v| v["event"] == "ready", START_TIMEOUT)
            .context("waiting for the peer")?;
        Ok(Peer { proc })
    }

    pub fn wait_event(&mut self, event: &str, limit: Duration) -> Result<Value> {
        self.proc.take(|v| v["event"] == event, limit)
    }

    pub fn stats(&mut self) -> Result<PeerStats> {
        self.proc.send_line("stats")?;
        let v = self.proc.take(|v| v["event"] == "stats", START_TIMEOUT)?;
        serde_json::from_value(v).context("decoding peer stats")
    }
}

pub struct Server {
    _proc: Proc,
}

impl Server {
    pub fn start(bench: &Path, netns: &Path, cgroup: &Cgroup) -> Result<Server> {
        let mut proc = Proc::spawn(bench, &["server"], Some(netns), Some(cgroup))?;
        proc.take(|v| v["event"] == "ready", START_TIMEOUT)
            .context("waiting for the destination app")?;
        Ok(Server { _proc: proc })
    }
}

/// A `sluice-agent run` in the node namespace with pins, sockets and state of its own, its
/// programs on the bench's cgroup. Dropping it runs `sluice-agent uninstall`.
pub struct Agent {
    // Field order is drop order: the process before its directories.
    pub proc: AgentProc,
    _work: Workdir,
    _bpffs: Bpffs,
}

impl Agent {
    pub fn start(node: &Path, cgroup: &Cgroup, accelerate: bool) -> Result<Agent> {
        let extra: &[&str] = if accelerate {
            &["--accelerate", "true"]
        } else {
            &[]
        };
        Self::start_with(node, cgroup, extra)
    }

    /// With more flags for `sluice-agent run` (e.g. Kubernetes mode's).
    pub fn start_with(node: &Path, cgroup: &Cgroup, flags: &[&str]) -> Result<Agent> {
        let work = Workdir::new()?;
        let bpffs = Bpffs::new()?;
        let paths = AgentPaths::new(&work, &bpffs, cgroup);
        // Default settings; the log level is the agent's default too (the test harness asks
        // for debug through the environment, which a flag overrides).
        let mut extra = vec!["--log-level", "info"];
        extra.extend_from_slice(flags);
        let proc = AgentProc::spawn(node, paths, &extra)?;
        let mut agent = Agent {
            proc,
            _work: work,
            _bpffs: bpffs,
        };
        agent.proc.wait_ready(Duration::from_secs(60))?;
        Ok(agent)
    }

    pub fn zds_socket(&self) -> PathBuf {
        self.proc.paths.zds.clone()
    }

    pub fn pid(&self) -> Result<u32> {
        self.proc.pid().context("the agent is not running")
    }

    /// `sluice_enroll_duration_seconds_sum` from `/metrics`: the agent's own time spent
    /// enrolling, over every enrollment so far.
    pub fn enroll_seconds(&self) -> Result<f64> {
        let (code, body) = self.proc.http_get(METRICS_PORT, "/metrics")?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        body.lines()
            .find_map(|l| l.strip_prefix("sluice_enroll_duration_seconds_sum "))
            .and_then(|v| v.trim().parse().ok())
            .context("no sluice_enroll_duration_seconds_sum in /metrics")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.proc.uninstall() {
            eprintln!("warning: agent uninstall: {e:#}\n{}", self.proc.log());
        }
    }
}
