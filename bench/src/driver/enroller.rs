//! How a pod gets enrolled into Sluice: the caller is pluggable. `sluice-agent enroll` over
//! the control socket ([`Cli`]), or the CNI plugin exec'd as a container runtime execs it
//! ([`Cni`]); both timed the same way, from the caller's side.
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sluice_tests::cni_runtime::{Runtime, Sandbox, cni_bin, exec_plugin};

use super::procs::Agent;

/// One enrollment as the caller and the agent saw it.
#[derive(Debug, Clone, Copy)]
pub struct Enrolled {
    /// From the caller's request to its answer (for an exec'd caller: spawn to exit).
    pub caller: Duration,
    /// The agent's own measure of the same enrollment, when it reports one.
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
    /// Lets go of the pod; returns the caller's time.
    fn unenroll(&self, uid: &str) -> Result<Duration>;
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
            NAMESPACE,
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

    fn unenroll(&self, uid: &str) -> Result<Duration> {
        let t0 = Instant::now();
        self.agent.proc.cli_json(&["unenroll", "--uid", uid])?;
        Ok(t0.elapsed())
    }
}

/// The Kubernetes namespace the bench's pods are in.
const NAMESPACE: &str = "bench";
const IFNAME: &str = "eth0";
const CNI_VERSION: &str = "1.0.0";

/// `sluice-cni`, exec'd as containerd's libcni execs the last plugin of a chain: the `CNI_*`
/// environment (`CNI_ARGS` with the pod's namespace, name and uid), the network configuration
/// on stdin with the previous plugin's result as `prevResult` (the pod's interface and
/// address, as a primary CNI reports them), in the node's network namespace. DEL gets the same
/// stdin, as libcni replays it from its cache.
///
/// The caller's time is the plugin's spawn to exit; the agent's is the growth of its
/// `sluice_enroll_duration_seconds_sum` across the call (the same measure as the CLI's
/// `enroll_us`), read from `/metrics` after the call, outside the timed part.
pub struct Cni<'a> {
    agent: &'a Agent,
    runtime: Runtime,
    plugin: Value,
    /// Per enrolled uid: what DEL needs to describe the same sandbox.
    sandboxes: RefCell<HashMap<String, (Sandbox, Value)>>,
}

impl<'a> Cni<'a> {
    pub fn new(agent: &'a Agent, node: &Path) -> Result<Cni<'a>> {
        let bin = cni_bin();
        let bin_dir: PathBuf = bin.parent().context("sluice-cni's directory")?.into();
        if !bin.exists() {
            bail!(
                "{} is missing: build it (cargo xtask bench does), or set SLUICE_CNI_BIN",
                bin.display()
            );
        }
        let plugin = json!({
            "type": bin.file_name().and_then(|n| n.to_str()).unwrap_or("sluice-cni"),
            "agent_socket": agent.proc.paths.control.display().to_string(),
            "ambient_namespaces": [NAMESPACE],
            "log_level": "warn",
        });
        let conflist = json!({"cniVersion": CNI_VERSION, "name": "bench", "plugins": [plugin]});
        Ok(Cni {
            agent,
            runtime: Runtime::new(conflist, &bin_dir, Some(node)),
            plugin,
            sandboxes: RefCell::new(HashMap::new()),
        })
    }

    /// What the primary CNI's plugins would have handed on: the pod's interface and address.
    fn prev_result(pod: &PodRef<'_>) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "interfaces": [{"name": IFNAME, "sandbox": pod.netns.display().to_string()}],
            "ips": [{"interface": 0, "address": format!("{}/32", pod.ip)}],
        })
    }

    fn call(&self, command: &str, sandbox: &Sandbox, prev: &Value) -> Result<Duration> {
        let stdin = self.runtime.plugin_stdin(&self.plugin, Some(prev));
        let out = exec_plugin(
            &self
                .runtime
                .bin_dir
                .join(self.plugin["type"].as_str().unwrap_or_default()),
            &sandbox.env(command, &self.runtime.bin_dir),
            &stdin,
            self.runtime.netns.as_deref(),
        )?;
        out.ok()
            .with_context(|| format!("sluice-cni {command} for {}", sandbox.name))?;
        Ok(out.elapsed)
    }
}

impl Enroller for Cni<'_> {
    fn name(&self) -> &'static str {
        "CNI ADD"
    }

    fn enroll(&self, pod: &PodRef<'_>) -> Result<Enrolled> {
        let sandbox = Sandbox {
            container_id: format!("sandbox-{}", pod.uid),
            netns: pod.netns.to_path_buf(),
            ifname: IFNAME.into(),
            namespace: NAMESPACE.into(),
            name: pod.uid.into(),
            uid: Some(pod.uid.into()),
        };
        let prev = Self::prev_result(pod);
        let before = self.agent.enroll_seconds()?;
        let caller = self.call("ADD", &sandbox, &prev)?;
        let agent = Duration::from_secs_f64((self.agent.enroll_seconds()? - before).max(0.0));
        self.sandboxes
            .borrow_mut()
            .insert(pod.uid.to_string(), (sandbox, prev));
        Ok(Enrolled {
            caller,
            agent: Some(agent),
        })
    }

    fn unenroll(&self, uid: &str) -> Result<Duration> {
        let (sandbox, prev) = self
            .sandboxes
            .borrow_mut()
            .remove(uid)
            .with_context(|| format!("{uid} was not enrolled through sluice-cni"))?;
        self.call("DEL", &sandbox, &prev)
    }
}
