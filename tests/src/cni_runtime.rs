//! A container runtime's CNI side, in miniature (what libcni does for containerd): runs the
//! plugins of a network configuration list one after the other, with the `CNI_*` environment
//! and a stdin built as libcni builds it (`name` and `cniVersion` of the list, `prevResult` of
//! the plugin before), inside the node's network namespace. Used by the tests, the demo and the
//! benchmarks to call `sluice-cni` exactly as a runtime would.
use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// Path of the `sluice-cni` binary: `SLUICE_CNI_BIN`, else next to the test binaries.
pub fn cni_bin() -> PathBuf {
    crate::harness::sibling_binary("SLUICE_CNI_BIN", "sluice-cni")
}

/// Where Debian's containernetworking-plugins are.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// What one plugin run left behind.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Spawn to exit.
    pub elapsed: Duration,
}

impl PluginOutput {
    /// stdout as JSON (Null if empty).
    pub fn json(&self) -> Result<Value> {
        if self.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {:?}", self.stdout))
    }

    /// The result on success, or an error carrying the plugin's error object.
    pub fn ok(&self) -> Result<Value> {
        if !self.status.success() {
            bail!(
                "plugin failed ({}): {} {}",
                self.status,
                self.stdout.trim(),
                self.stderr.trim()
            );
        }
        self.json()
    }
}

/// Runs `bin` once with `env` (added to ours, minus any inherited `CNI_*`) and `stdin`,
/// inside the network namespace `netns` if given.
pub fn exec_plugin(
    bin: &Path,
    env: &[(&str, String)],
    stdin: &[u8],
    netns: Option<&Path>,
) -> Result<PluginOutput> {
    let ns = netns
        .map(|p| File::open(p).with_context(|| format!("opening {}", p.display())))
        .transpose()?;
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    drop(ns);
    // Plugins read all of stdin before writing; a config is far below the pipe buffer.
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(stdin)?;
    drop(input);
    let out = child.wait_with_output()?;
    Ok(PluginOutput {
        elapsed: started.elapsed(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A pod sandbox as the runtime describes it to CNI.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`; `None` plays a runtime that does not pass it.
    pub uid: Option<String>,
}

impl Sandbox {
    /// `CNI_ARGS` as containerd writes it.
    pub fn cni_args(&self) -> String {
        let mut args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.namespace, self.name, self.container_id
        );
        if let Some(uid) = &self.uid {
            args.push_str(&format!(";K8S_POD_UID={uid}"));
        }
        args
    }

    /// The `CNI_*` environment of `command` for this sandbox.
    pub fn env(&self, command: &str, bin_dir: &Path) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns.display().to_string()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.cni_args()),
            ("CNI_PATH", bin_dir.display().to_string()),
        ]
    }
}

/// One network configuration list and the directory its plugins are in; plugins run in
/// `netns` (the node's), as they would run in the runtime's.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub conflist: Value,
    pub bin_dir: PathBuf,
    pub netns: Option<PathBuf>,
}

/// The time each plugin of a chain took.
pub type Timings = Vec<(String, Duration)>;

impl Runtime {
    /// The list the runtime would use: the first `*.conflist` / `*.conf` / `*.json` in
    /// `conf_dir` by name (a `.conf` is wrapped into a list, as libcni does).
    pub fn from_conf_dir(conf_dir: &Path, bin_dir: &Path, netns: Option<&Path>) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.to_string_lossy();
                n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json")
            })
            .collect();
        files.sort();
        let first = files
            .first()
            .with_context(|| format!("no network configuration in {}", conf_dir.display()))?;
        let v: Value = serde_json::from_slice(&std::fs::read(first)?)
            .with_context(|| format!("parsing {}", first.display()))?;
        let conflist = if first.to_string_lossy().ends_with(".conflist") {
            v
        } else {
            json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [v]})
        };
        Ok(Runtime {
            conflist,
            bin_dir: bin_dir.to_path_buf(),
            netns: netns.map(Path::to_path_buf),
        })
    }

    pub fn new(conflist: Value, bin_dir: &Path, netns: Option<&Path>) -> Self {
        Runtime {
            conflist,
            bin_dir: bin_dir.to_path_buf(),
            netns: netns.map(Path::to_path_buf),
        }
    }

    /// The loopback network a runtime sets up first, in its own list.
    pub fn loopback(&self) -> Runtime {
        let conflist = json!({
            "cniVersion": self.conflist["cniVersion"],
            "name": "cni-loopback",
            "plugins": [{"type": "loopback"}]
        });
        Runtime {
            conflist,
            ..self.clone()
        }
    }

    fn plugins(&self) -> Result<Vec<Value>> {
        Ok(self.conflist["plugins"]
            .as_array()
            .context("the list has no plugins")?
            .clone())
    }

    /// libcni's stdin for one plugin of the list.
    pub fn plugin_stdin(&self, plugin: &Value, prev: Option<&Value>) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf.to_string().into_bytes()
    }

    fn run(
        &self,
        plugin: &Value,
        env: &[(&str, String)],
        prev: Option<&Value>,
    ) -> Result<PluginOutput> {
        let ty = plugin["type"].as_str().context("a plugin without type")?;
        exec_plugin(
            &self.bin_dir.join(ty),
            env,
            &self.plugin_stdin(plugin, prev),
            self.netns.as_deref(),
        )
    }

    /// ADD through the whole list; returns the final result and each plugin's time.
    pub fn add(&self, sandbox: &Sandbox) -> Result<(Value, Timings)> {
        let env = sandbox.env("ADD", &self.bin_dir);
        let mut prev: Option<Value> = None;
        let mut timings = Vec::new();
        for plugin in self.plugins()? {
            let out = self.run(&plugin, &env, prev.as_ref())?;
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            timings.push((ty.clone(), out.elapsed));
            prev = Some(out.ok().with_context(|| format!("ADD: plugin {ty}"))?);
        }
        Ok((prev.unwrap_or(Value::Null), timings))
    }

    /// DEL through the list in reverse, each plugin given the ADD result (as libcni does from
    /// its cache). Every plugin runs even if one fails; the first failure is returned.
    pub fn del(&self, sandbox: &Sandbox, added: Option<&Value>) -> Result<Timings> {
        let env = sandbox.env("DEL", &self.bin_dir);
        let mut first_err = None;
        let mut timings = Vec::new();
        for plugin in self.plugins()?.iter().rev() {
            let out = self.run(plugin, &env, added)?;
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            timings.push((ty.clone(), out.elapsed));
            if let Err(e) = out.ok() {
                first_err.get_or_insert(e.context(format!("DEL: plugin {ty}")));
            }
        }
        first_err.map_or(Ok(timings), Err)
    }

    /// CHECK through the list, with the ADD result.
    pub fn check(&self, sandbox: &Sandbox, added: &Value) -> Result<()> {
        let env = sandbox.env("CHECK", &self.bin_dir);
        for plugin in self.plugins()? {
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            self.run(&plugin, &env, Some(added))?
                .ok()
                .with_context(|| format!("CHECK: plugin {ty}"))?;
        }
        Ok(())
    }

    /// One plugin of the list (by type) with a command that needs no sandbox (STATUS, GC);
    /// `extra` keys go into its stdin.
    pub fn call_plugin(&self, ty: &str, command: &str, extra: Value) -> Result<PluginOutput> {
        let plugin = self
            .plugins()?
            .into_iter()
            .find(|p| p["type"] == ty)
            .with_context(|| format!("no {ty} in the list"))?;
        let mut conf: Value = serde_json::from_slice(&self.plugin_stdin(&plugin, None))?;
        for (k, v) in extra.as_object().into_iter().flatten() {
            conf[k] = v.clone();
        }
        exec_plugin(
            &self.bin_dir.join(ty),
            &[
                ("CNI_COMMAND", command.to_string()),
                ("CNI_PATH", self.bin_dir.display().to_string()),
            ],
            conf.to_string().as_bytes(),
            self.netns.as_deref(),
        )
    }
}

/// Links Debian's reference plugins (`types`) into `bin_dir`, next to what the installer put
/// there: a runtime's `bin_dir` is one directory.
pub fn link_reference_plugins(bin_dir: &Path, types: &[&str]) -> Result<()> {
    for ty in types {
        let src = Path::new(REFERENCE_PLUGINS).join(ty);
        if !src.exists() {
            bail!(
                "{} is missing: install Debian's containernetworking-plugins (cargo xtask test does)",
                src.display()
            );
        }
        let dst = bin_dir.join(ty);
        if !dst.exists() {
            std::os::unix::fs::symlink(&src, &dst)
                .with_context(|| format!("linking {}", dst.display()))?;
        }
    }
    Ok(())
}

/// A bridge + host-local (+ portmap) list, as a simple primary CNI writes it: pods on a bridge
/// in the node namespace, one address per `(subnet, route)` range and a route to `route` only
/// (no default route, no masquerade: nothing leaves the machine).
pub fn bridge_conflist(
    version: &str,
    bridge: &str,
    ranges: &[(&str, &str)],
    ipam_dir: &Path,
) -> Value {
    let subnets: Vec<Value> = ranges.iter().map(|(s, _)| json!([{"subnet": s}])).collect();
    let routes: Vec<Value> = ranges.iter().map(|(_, r)| json!({"dst": r})).collect();
    json!({
        "cniVersion": version,
        "name": "sluice-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": subnets,
                    "routes": routes,
                    "dataDir": ipam_dir.display().to_string()
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}
