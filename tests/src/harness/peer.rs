use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::cgroup::Cgroup;
use super::process::{DEFAULT_TIMEOUT, Proc};

/// `sluice-testkit peer`: the ztunnel-like listener set running in a pod netns. Its
/// events (see `sluice_tests::peer::EventKind`) are JSON values like
/// `{"event":"outbound","orig_dst":"10.77.1.2:8080",...}`.
pub struct Peer {
    proc: Mutex<Proc>,
}

impl Peer {
    /// Starts the peer and waits (10 s) until all its listeners are bound.
    pub fn start(bin: &Path, netns: Option<&Path>, cgroup: Option<&Cgroup>) -> Result<Peer> {
        Peer::start_tagged(bin, netns, cgroup, None)
    }

    /// Like [`Peer::start`]; `tag` is copied into every event as `"netns"`.
    pub fn start_tagged(
        bin: &Path,
        netns: Option<&Path>,
        cgroup: Option<&Cgroup>,
        tag: Option<&str>,
    ) -> Result<Peer> {
        let mut args = vec!["peer"];
        if let Some(tag) = tag {
            args.extend(["--tag", tag]);
        }
        let mut proc = Proc::spawn(bin, &args, netns, cgroup)?;
        proc.take(|v| v["event"] == "ready", DEFAULT_TIMEOUT)
            .context("waiting for the peer to be ready")?;
        Ok(Peer {
            proc: Mutex::new(proc),
        })
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid()
    }

    /// Removes and returns the events received so far.
    pub fn events(&self) -> Vec<Value> {
        self.lock().drain(|_| true)
    }

    /// Waits for (and removes) the first event matching `pred`; others stay queued.
    pub fn wait_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        self.lock().take(pred, timeout)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(|p| p.into_inner())
    }
}
