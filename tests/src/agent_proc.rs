//! A real `sluice-agent run` process under test, with paths of its own: it runs in the
//! topology's node namespace (so its health and metrics ports never clash with anything), its
//! programs watch the test's cgroup, and its pins, sockets and state live in unique places.
//!
//! The binary is the one `cargo build --bins` put next to the test executables (`cargo xtask
//! test` builds it first); `SLUICE_AGENT_BIN` overrides.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::harness::{Bpffs, Cgroup, run_in_netns, unique};

pub const HEALTH_PORT: u16 = 8000;
/// How long an agent may take to become ready: a few seconds on the host, more under software
/// emulation (the VM suite), where loading the eBPF object and BTF is slow.
pub const AGENT_START: Duration = Duration::from_secs(30);
pub const METRICS_PORT: u16 = 15014;
/// How long a running agent may take to stop once `uninstall` asked it to.
const UNINSTALL_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `sluice-agent` binary: `SLUICE_AGENT_BIN`, else next to the test binaries.
pub fn agent_bin() -> PathBuf {
    crate::harness::sibling_binary("SLUICE_AGENT_BIN", "sluice-agent")
}

/// A unique scratch directory, removed on drop.
#[derive(Debug)]
pub struct Workdir(PathBuf);

impl Workdir {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("sluice-agent-test-"));
        std::fs::create_dir_all(&dir)?;
        Ok(Workdir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where one agent keeps its things.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub control: PathBuf,
    pub zds: PathBuf,
    pub state: PathBuf,
    pub pin_root: PathBuf,
    pub cgroup: PathBuf,
    pub log: PathBuf,
    /// CNI config and binary directories, when the agent runs its CNI installer.
    pub cni: Option<CniDirs>,
}

/// A CNI configuration directory and binary directory of a test's own.
#[derive(Debug, Clone)]
pub struct CniDirs {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
}

impl CniDirs {
    /// `net.d` and `bin` under `work`, created.
    pub fn new(work: &Workdir) -> Result<Self> {
        let dirs = CniDirs {
            conf_dir: work.path().join("net.d"),
            bin_dir: work.path().join("bin"),
        };
        std::fs::create_dir_all(&dirs.conf_dir)?;
        std::fs::create_dir_all(&dirs.bin_dir)?;
        Ok(dirs)
    }
}

impl AgentPaths {
    pub fn new(work: &Workdir, bpffs: &Bpffs, cgroup: &Cgroup) -> Self {
        AgentPaths {
            control: work.path().join("agent.sock"),
            zds: work.path().join("ztunnel.sock"),
            state: work.path().join("state"),
            pin_root: bpffs.path().to_path_buf(),
            cgroup: cgroup.path().to_path_buf(),
            log: work.path().join("agent.log"),
            cni: None,
        }
    }

    /// The flags that point an agent command at these paths.
    pub fn node_args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let mut args = vec![
            "--pin-root".into(),
            p(&self.pin_root),
            "--cgroup".into(),
            p(&self.cgroup),
            "--zds-socket".into(),
            p(&self.zds),
            "--state-dir".into(),
            p(&self.state),
        ];
        if let Some(cni) = &self.cni {
            args.extend([
                "--cni-conf-dir".into(),
                p(&cni.conf_dir),
                "--cni-bin-dir".into(),
                p(&cni.bin_dir),
            ]);
        }
        args
    }
}

pub struct AgentProc {
    child: Option<Child>,
    /// Another `sluice-agent` build than [`agent_bin`] (an upgrade's new version).
    bin: Option<PathBuf>,
    pub paths: AgentPaths,
    netns: PathBuf,
    extra: Vec<String>,
    /// Extra environment for the next start (e.g. `FAILPOINTS`).
    env: Vec<(String, String)>,
}

impl AgentProc {
    /// Starts `sluice-agent run` in `netns`; see [`AgentProc::wait_ready`].
    pub fn spawn(netns: &Path, paths: AgentPaths, extra: &[&str]) -> Result<Self> {
        Self::spawn_with_env(netns, paths, extra, Vec::new())
    }

    /// [`AgentProc::spawn`] with extra environment variables (e.g. `FAILPOINTS`).
    pub fn spawn_with_env(
        netns: &Path,
        paths: AgentPaths,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        let mut agent = AgentProc {
            child: None,
            bin: None,
            paths,
            netns: netns.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env,
        };
        agent.start()?;
        Ok(agent)
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.log)?;
        let mut cmd = self.command(&[], &[])?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin().display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// `[wrapper...] sluice-agent run <paths> <flags> <extra>` in the agent's netns.
    fn command(&self, extra: &[&str], wrapper: &[&str]) -> Result<Command> {
        let netns = std::fs::File::open(&self.netns)
            .with_context(|| format!("opening {}", self.netns.display()))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(self.bin());
                c
            }
            None => Command::new(self.bin()),
        };
        cmd.arg("--control-socket")
            .arg(&self.paths.control)
            .arg("run")
            .args(self.paths.node_args())
            .args([
                "--health-addr",
                &format!("127.0.0.1:{HEALTH_PORT}"),
                "--metrics-bind",
                "127.0.0.1",
            ])
            .args(&self.extra)
            .args(extra)
            .env("SLUICE_LOG_LEVEL", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // The fd is opened before fork and moved into the closure, so it outlives the exec.
        let netns_fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd was opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &netns;
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// The `sluice-agent` binary this process runs.
    pub fn bin(&self) -> PathBuf {
        self.bin.clone().unwrap_or_else(agent_bin)
    }

    /// Sets an environment variable for the agent's next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Runs `sluice-agent run` (with `extra` flags, under `wrapper` if given) in the agent's
    /// netns until it exits, for startups that must fail.
    pub fn run_to_exit(&self, extra: &[&str], wrapper: &[&str]) -> Result<Output> {
        Ok(self
            .command(extra, wrapper)?
            .stdin(Stdio::null())
            .output()?)
    }

    /// An agent on the same node with other paths, not started (see [`AgentProc::run_to_exit`]).
    pub fn sibling(&self, paths: AgentPaths) -> AgentProc {
        AgentProc {
            child: None,
            bin: self.bin.clone(),
            paths,
            netns: self.netns.clone(),
            extra: self.extra.clone(),
            env: self.env.clone(),
        }
    }

    /// A second agent process on the same node with the same paths (a rolling update's new
    /// pod), logging to `log`. Not waited for.
    pub fn spawn_twin(&self, log: &Path) -> Result<AgentProc> {
        self.spawn_twin_with(log, None)
    }

    /// [`AgentProc::spawn_twin`] running binary `bin` (another build) if given.
    pub fn spawn_twin_with(&self, log: &Path, bin: Option<&Path>) -> Result<AgentProc> {
        let mut paths = self.paths.clone();
        paths.log = log.to_path_buf();
        let mut twin = AgentProc {
            child: None,
            bin: bin.map(Path::to_path_buf).or_else(|| self.bin.clone()),
            paths,
            netns: self.netns.clone(),
            extra: self.extra.clone(),
            env: self.env.clone(),
        };
        twin.start()?;
        Ok(twin)
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until `/readyz` answers 200 (or the process dies).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the agent exited with {status}:\n{}", self.log());
            }
            if let Ok((200, _)) = self.http_get(HEALTH_PORT, "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not become ready in {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the agent's netns loopback: (status code, body).
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        run_in_netns(&self.netns, move || -> Result<(u16, String)> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let code = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no status line")?;
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((code, body))
        })?
    }

    /// Runs `sluice-agent <args>` against this agent's control socket.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(agent_bin())
            .arg("--control-socket")
            .arg(&self.paths.control)
            .args(args)
            .output()?)
    }

    /// `cli`, requiring success; returns stdout parsed as JSON (or Null if empty).
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "sluice-agent {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.trim().is_empty() {
            Ok(Value::Null)
        } else {
            Ok(serde_json::from_str(&stdout)?)
        }
    }

    pub fn status(&self) -> Result<Value> {
        self.cli_json(&["status", "--json"])
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the agent is not running")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        // The agent's own grace period is its ZDS ACK timeout (10 s) plus 5 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent did not exit within 60 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again with the same paths and flags.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.paths.log).unwrap_or_default()
    }

    /// `sluice-agent uninstall` with this agent's paths (stopping it if it runs).
    pub fn uninstall(&mut self) -> Result<()> {
        self.uninstall_with(&[])
    }

    /// `sluice-agent uninstall <extra>` (e.g. `--force`) with this agent's paths.
    pub fn uninstall_with(&mut self, extra: &[&str]) -> Result<()> {
        let mut args = vec!["uninstall".to_string()];
        args.extend(self.paths.node_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.cli(&args)?;
        if let Some(mut child) = self.child.take() {
            // Bounded: an agent that missed the request (e.g. still loading when a failed test
            // drops its fixture) must not hang the test run.
            let deadline = Instant::now() + UNINSTALL_STOP_TIMEOUT;
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "the agent still ran {UNINSTALL_STOP_TIMEOUT:?} after uninstall: killed it"
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !out.status.success() {
            bail!("uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.child.is_some() && std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        self.kill();
    }
}

/// How [`AgentFixture::spawn_with_launch`] starts its agent.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Flags after `run` and the fixture's paths.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run the CNI installer on CNI directories of the fixture's own.
    pub cni: bool,
}

/// An agent with everything it runs against: a topology (the agent lives in its node netns), a
/// cgroup of the test's own for every process that makes traffic, a unique pin directory and
/// scratch directory. Dropping it runs `sluice-agent uninstall`, then the guards clean up.
pub struct AgentFixture {
    pub agent: AgentProc,
    pub topo: crate::harness::Topology,
    pub cgroup: Cgroup,
    pub bpffs: Bpffs,
    pub work: Workdir,
    testkit: PathBuf,
}

impl AgentFixture {
    /// Starts an agent (with `extra` flags) and waits until it is ready.
    pub fn start(testkit: &Path, pods: usize, extra: &[&str]) -> Result<Self> {
        let mut fx = Self::spawn(testkit, pods, extra)?;
        fx.agent.wait_ready(AGENT_START)?;
        Ok(fx)
    }

    /// [`AgentFixture::start`], or `None` where the test must skip (not root, outside CI).
    pub fn start_if_privileged(testkit: &Path, pods: usize, extra: &[&str]) -> Option<Self> {
        if !crate::harness::require_root() {
            return None;
        }
        Some(Self::start(testkit, pods, extra).expect("agent fixture"))
    }

    /// Starts an agent without waiting for it.
    pub fn spawn(testkit: &Path, pods: usize, extra: &[&str]) -> Result<Self> {
        Self::spawn_with(testkit, pods, extra, false)
    }

    /// An agent that also runs its CNI installer on CNI directories of the fixture's own
    /// (`agent.paths.cni`); not waited for (readiness waits for a primary CNI config).
    pub fn spawn_cni(testkit: &Path, pods: usize, extra: &[&str]) -> Result<Self> {
        Self::spawn_with(testkit, pods, extra, true)
    }

    fn spawn_with(testkit: &Path, pods: usize, extra: &[&str], cni: bool) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let launch = |_: &crate::harness::Topology| {
            Ok(Launch {
                args: extra,
                env: Vec::new(),
                cni,
            })
        };
        Self::spawn_adjusted(testkit, pods, launch, |_| {})
    }

    /// An agent with CNI directories (as [`AgentFixture::spawn_cni`]) whose paths `adjust`
    /// changes before it starts (e.g. to lay them out as on a node); not waited for.
    pub fn spawn_cni_with(
        testkit: &Path,
        pods: usize,
        extra: &[&str],
        adjust: impl FnOnce(&mut AgentPaths),
    ) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let launch = |_: &crate::harness::Topology| {
            Ok(Launch {
                args: extra,
                env: Vec::new(),
                cni: true,
            })
        };
        Self::spawn_adjusted(testkit, pods, launch, adjust)
    }

    /// An agent whose flags depend on its topology (e.g. a proxy listening in its node
    /// namespace): `launch` is called once the topology exists. Not waited for.
    pub fn spawn_with_launch(
        testkit: &Path,
        pods: usize,
        launch: impl FnOnce(&crate::harness::Topology) -> Result<Launch>,
    ) -> Result<Self> {
        Self::spawn_adjusted(testkit, pods, launch, |_| {})
    }

    fn spawn_adjusted(
        testkit: &Path,
        pods: usize,
        launch: impl FnOnce(&crate::harness::Topology) -> Result<Launch>,
        adjust: impl FnOnce(&mut AgentPaths),
    ) -> Result<Self> {
        crate::harness::ensure_bpffs_mounted()?;
        let topo = crate::harness::Topology::new(pods)?;
        let cgroup = Cgroup::new("slagent")?;
        let bpffs = Bpffs::new()?;
        let work = Workdir::new()?;
        let mut paths = AgentPaths::new(&work, &bpffs, &cgroup);
        let launch = launch(&topo)?;
        if launch.cni {
            paths.cni = Some(CniDirs::new(&work)?);
        }
        adjust(&mut paths);
        let extra: Vec<&str> = launch.args.iter().map(String::as_str).collect();
        let agent = AgentProc::spawn_with_env(topo.node().path(), paths, &extra, launch.env)?;
        Ok(AgentFixture {
            agent,
            topo,
            cgroup,
            bpffs,
            work,
            testkit: testkit.to_path_buf(),
        })
    }

    pub fn uid(i: usize) -> String {
        format!("00000000-0000-0000-0000-{i:012}")
    }

    /// `sluice-agent enroll` for pod `i` (both its addresses); `extra` adds flags.
    pub fn enroll(&self, i: usize, extra: &[&str]) -> Result<Value> {
        let args = self.enroll_args(i, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agent.cli_json(&args)
    }

    /// The `sluice-agent` arguments (after the control socket) that enroll pod `i`.
    pub fn enroll_args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let pod = self.topo.pod(i);
        let (uid, name, sa) = (Self::uid(i), format!("pod{i}"), format!("sa{i}"));
        let (v4, v6) = (pod.ipv4.to_string(), pod.ipv6.to_string());
        let netns = pod.path().display().to_string();
        let mut args = vec![
            "enroll",
            "--netns",
            &netns,
            "--uid",
            &uid,
            "--name",
            &name,
            "--namespace",
            "default",
            "--service-account",
            &sa,
            "--ip",
            &v4,
            "--ip",
            &v6,
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect()
    }

    pub fn unenroll(&self, i: usize) -> Result<()> {
        self.agent
            .cli_json(&["unenroll", "--uid", &Self::uid(i)])
            .map(drop)
    }

    /// The ztunnel-like peer as a ZDS client of this agent, in the test's cgroup.
    pub fn zds_peer(&self, opts: &crate::zds::ZdsPeerOptions) -> Result<crate::zds::ZdsPeer> {
        crate::zds::ZdsPeer::start(
            &self.testkit,
            &self.agent.paths.zds,
            opts,
            Some(&self.cgroup),
            Duration::from_secs(10),
        )
    }

    /// An app command server inside pod `i`, in the test's cgroup.
    pub fn app(&self, i: usize) -> Result<crate::harness::App> {
        crate::harness::App::spawn(
            &self.testkit,
            Some(self.topo.pod(i).path()),
            Some(&self.cgroup),
        )
    }

    /// Waits until `status` reports ztunnel's `state` for every enrolled pod (or pod `only`).
    /// ztunnel's ACK reaches the agent a moment after ztunnel sent it, so this polls.
    pub fn wait_ztunnel_state(
        &self,
        state: &str,
        only: Option<usize>,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.agent.status()?;
            let pods = status["pods"].as_array().cloned().unwrap_or_default();
            let wanted: Vec<&Value> = match only {
                Some(i) => pods.iter().filter(|p| p["uid"] == Self::uid(i)).collect(),
                None => pods.iter().collect(),
            };
            if !wanted.is_empty() && wanted.iter().all(|p| p["ztunnel"]["state"] == state) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("ztunnel state is not {state:?} within {timeout:?}: {wanted:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw ZDS connection to the agent (hello not yet sent).
    pub fn zds_conn(&self) -> Result<crate::zds::ZdsConn> {
        Ok(crate::zds::ZdsConn::connect(&self.agent.paths.zds)?)
    }
}

impl Drop for AgentFixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent.log());
        }
        if let Err(e) = self.agent.uninstall() {
            eprintln!(
                "agent fixture: {e:#}\n--- agent log ---\n{}",
                self.agent.log()
            );
        }
    }
}
