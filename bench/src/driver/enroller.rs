//! How a pod gets enrolled into Sluice: the caller is pluggable. Today it is the
//! `sluice-agent enroll` CLI over the control socket; the CNI plugin will be another
//! implementation of [`Enroller`], timed the same way.
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::procs::Agent;

/// One enrollment as the caller and the agent saw it.
#[derive(Debug, Clone, Copy)]
pub struct Enrolled {
    /// From the caller's request to its answer.
    pub caller: Duration,
    /// The agent's own measure (`enroll_us` in the reply), when it reports one.
    pub agent: Option<Duration>,
}

pub struct PodRef<'a> {
    pub uid: &'a str,
    pub netns: &'a Path,
    pub ip: Ipv4Addr,
}

pub trait Enroller {
    fn name(&self) -> &'static str;
    fn enroll(&self, pod: &PodRef<'_>) -> Result<Enrolled>;
    fn unenroll(&self, uid: &str) -> Result<()>;
}

/// `sluice-agent enroll ...` against the agent's control socket.
pub struct Cli<'a> {
    pub agent: &'a Agent,
}

impl Enroller for Cli<'_> {
    fn name(&self) -> &'static str {
        "CLI"
    }

    fn enroll(&self, pod: &PodRef<'_>) -> Result<Enrolled> {
        let netns = pod.netns.display().to_string();
        let ip = pod.ip.to_string();
        let args = [
            "enroll",
            "--netns",
            &netns,
            "--uid",
            pod.uid,
            "--name",
            pod.uid,
            "--namespace",
            "bench",
            "--ip",
            &ip,
        ];
        let t0 = Instant::now();
        let out = self.agent.proc.cli(&args)?;
        let caller = t0.elapsed();
        if !out.status.success() {
            bail!(
                "sluice-agent enroll {}: {}",
                pod.uid,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let reply: Value =
            serde_json::from_slice(&out.stdout).context("decoding the enroll reply")?;
        if reply["ztunnel"]["state"] != "acked" {
            bail!("ztunnel did not acknowledge {}: {reply}", pod.uid);
        }
        let agent = reply["enroll_us"].as_u64().map(Duration::from_micros);
        Ok(Enrolled { caller, agent })
    }

    fn unenroll(&self, uid: &str) -> Result<()> {
        self.agent
            .proc
            .cli_json(&["unenroll", "--uid", uid])
            .map(drop)
    }
}
