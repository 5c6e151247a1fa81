//! Harness handle for `sluice-testkit peer --zds`: a ztunnel stand-in process that
//! connects to the agent's ZDS socket and serves every added workload in its netns.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::harness::{Cgroup, Proc};

/// Command-line options of `peer --zds` besides the socket path.
#[derive(Clone, Debug, Default)]
pub struct ZdsPeerOptions {
    /// `--tag`: copied into every proxy event as `"netns"`.
    pub tag: Option<String>,
    /// `--nack-uid`: NACK the first Add of each of these uids.
    pub nack_uids: Vec<String>,
    /// `--retry-connect`: keep retrying while the socket is missing at start, instead of
    /// exiting (reconnecting after a lost connection always retries).
    pub retry_connect: bool,
}

impl ZdsPeerOptions {
    fn args(&self, socket: &Path) -> Vec<String> {
        let mut args = vec![
            "peer".to_string(),
            "--zds".into(),
            socket.display().to_string(),
        ];
        if let Some(tag) = &self.tag {
            args.extend(["--tag".into(), tag.clone()]);
        }
        for uid in &self.nack_uids {
            args.extend(["--nack-uid".into(), uid.clone()]);
        }
        if self.retry_connect {
            args.push("--retry-connect".into());
        }
        args
    }
}

/// The running `peer --zds` process; its JSON events are described in
/// `sluice_tests::testkit::peer_zds`. Dropping it kills the process.
pub struct ZdsPeer {
    proc: Mutex<Proc>,
}

impl ZdsPeer {
    /// Starts the peer in the caller's netns (and `cgroup`, if given) without waiting.
    pub fn spawn(
        bin: &Path,
        socket: &Path,
        opts: &ZdsPeerOptions,
        cgroup: Option<&Cgroup>,
    ) -> Result<ZdsPeer> {
        let args = opts.args(socket);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn(bin, &args, None, cgroup)?;
        Ok(ZdsPeer {
            proc: Mutex::new(proc),
        })
    }

    /// Like [`ZdsPeer::spawn`], then waits until it has connected and said hello.
    pub fn start(
        bin: &Path,
        socket: &Path,
        opts: &ZdsPeerOptions,
        cgroup: Option<&Cgroup>,
        timeout: Duration,
    ) -> Result<ZdsPeer> {
        let peer = ZdsPeer::spawn(bin, socket, opts, cgroup)?;
        peer.wait_event(|v| v["event"] == "zds_connected", timeout)
            .context("waiting for the ZDS peer to connect")?;
        Ok(peer)
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid()
    }

    /// Waits for (and removes) the first event matching `pred`; others stay queued.
    pub fn wait_event(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        self.lock().take(pred, timeout)
    }

    /// Waits for the `{"event":"zds","kind":kind,...}` event of `uid` (None: any uid).
    pub fn wait_zds(&self, kind: &str, uid: Option<&str>, timeout: Duration) -> Result<Value> {
        self.wait_event(
            |v| v["event"] == "zds" && v["kind"] == kind && uid.is_none_or(|u| v["uid"] == u),
            timeout,
        )
    }

    /// Waits until `uid`'s response has been sent; returns the `zds_response` event
    /// (`"error"` is empty for an ack).
    pub fn wait_response(&self, uid: &str, timeout: Duration) -> Result<Value> {
        self.wait_event(|v| v["event"] == "zds_response" && v["uid"] == uid, timeout)
    }

    /// Removes and returns the events received so far.
    pub fn events(&self) -> Vec<Value> {
        self.lock().drain(|_| true)
    }

    /// Removes and returns the `zds_violation` events received so far.
    pub fn violations(&self) -> Vec<Value> {
        self.lock().drain(|v| v["event"] == "zds_violation")
    }

    /// Closes stdin and waits for a clean exit.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        let mut proc = self.lock();
        proc.close_stdin();
        let status = proc.wait_exit(timeout)?;
        anyhow::ensure!(status.success(), "ZDS peer exited with {status}");
        Ok(())
    }

    /// Kills the process at once, like a crashing ztunnel.
    pub fn kill(&self) {
        self.lock().kill();
    }

    fn lock(&self) -> MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(|p| p.into_inner())
    }
}
