//! A real containerd (Debian's) for the CNI end-to-end test, configured as these machines need
//! (runc, `SystemdCgroup = false`, `disable_apparmor`, `restrict_oom_score_adj`), with its own
//! root, state and sockets under a scratch directory so that it never meets a system
//! containerd. It runs in the topology's node network namespace: the CNI plugins it runs put
//! the bridge and the pods' host-side veths there, never in the host's namespace.
//!
//! Pod sandboxes are made through its CRI API (the `k8s-cri` bindings), with a pause image the
//! test builds (`pause_image`). Dropping it removes every sandbox it made, stops it, and ends
//! any shim left behind.
use std::{
    collections::HashMap,
    fs,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    harness::unique,
    pause_image::{BUSYBOX, PAUSE_IMAGE, docker_archive},
};

const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    cri: RuntimeServiceClient<Channel>,
    sandboxes: Vec<String>,
    cgroup_parent: String,
}

fn config(dir: &Path, socket: &Path, cni_bin: &Path, cni_conf: &Path) -> String {
    let d = |p: &Path| p.display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
# Plugins that would touch shared places (/opt/containerd) or need what is not here.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = d(&dir.join("root")),
        state = d(&dir.join("state")),
        socket = d(socket),
        pause = PAUSE_IMAGE,
        cni_bin = d(cni_bin),
        cni_conf = d(cni_conf),
    )
}

impl Containerd {
    /// Starts containerd in `netns` with everything under `dir`, waits until its CRI says the
    /// runtime and network are ready, and imports the pause image.
    pub fn start(dir: &Path, netns: &Path, cni_bin: &Path, cni_conf: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config(dir, &socket, cni_bin, cni_conf))?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let ns_fd = ns.as_raw_fd();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .context("starting containerd (Debian's containerd package)")?;
        drop(ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut child = Some(child);
        let cri = match rt.block_on(connect(&socket, &mut child)) {
            Ok(c) => c,
            Err(e) => {
                if let Some(mut c) = child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let log = fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
                return Err(e.context(format!("containerd log:\n{log}")));
            }
        };
        let mut ctrd = Containerd {
            child,
            dir: dir.to_path_buf(),
            socket,
            rt,
            cri,
            sandboxes: vec![],
            cgroup_parent: format!("/{}", unique("sluice-ctr-")),
        };
        ctrd.wait_ready()?;
        ctrd.import_pause_image()?;
        Ok(ctrd)
    }

    /// Until the CRI's Status has RuntimeReady and NetworkReady (the CNI config loaded).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = self
                .rt
                .block_on(self.cri.status(StatusRequest { verbose: false }))
                .map(|r| r.into_inner().status);
            let conditions: Vec<(String, bool)> = status
                .iter()
                .flatten()
                .flat_map(|s| s.conditions.iter())
                .map(|c| (c.r#type.clone(), c.status))
                .collect();
            let ready = |t: &str| conditions.iter().any(|(ty, ok)| ty == t && *ok);
            if ready("RuntimeReady") && ready("NetworkReady") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd not ready after {START_TIMEOUT:?}: {conditions:?}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn import_pause_image(&self) -> Result<()> {
        let archive = self.dir.join("pause.tar");
        fs::write(&archive, docker_archive(Path::new(BUSYBOX))?)?;
        self.import_image(&archive)
    }

    /// `ctr images import` into the CRI's namespace (a docker or OCI archive).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let out = self
            .ctr()
            .args(["images", "import"])
            .arg(archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr images import failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `ctr` talking to this containerd, in the CRI's namespace.
    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// Runs one container of an imported image to completion with `ctr run` (as a kubelet
    /// runs a Job's container, without the CRI's pod around it): its exit status and its
    /// output (stdout and stderr, through a log file: its stdin is empty, as in a pod). Its
    /// cgroup is under this containerd's, never a fixed global one.
    pub fn run_container(&self, spec: &ContainerRun) -> Result<(std::process::ExitStatus, String)> {
        let id = unique("sluice-run-");
        let log = self.dir.join(format!("{id}.log"));
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm"])
            .arg("--cgroup")
            .arg(format!("{}/{id}", self.cgroup_parent))
            .arg("--log-uri")
            .arg(format!("file://{}", log.display()));
        if spec.privileged {
            cmd.arg("--privileged");
        }
        if spec.host_network {
            // The runtime's network namespace: the node's.
            cmd.arg("--net-host");
        }
        if spec.host_pid {
            // The runtime's own PID namespace: the node's.
            let pid = self
                .child
                .as_ref()
                .context("containerd is not running")?
                .id();
            cmd.arg(format!("--with-ns=pid:/proc/{pid}/ns/pid"));
        }
        for (k, v) in &spec.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        for m in &spec.mounts {
            // rbind carries the mounts below the source (netns files, bpffs) along.
            let mut options = "rbind:rw".to_string();
            if let Some(p) = m.propagation {
                options.push(':');
                options.push_str(p);
            }
            cmd.arg("--mount").arg(format!(
                "type=bind,src={},dst={},options={options}",
                m.host.display(),
                m.container.display()
            ));
        }
        cmd.arg(&spec.image).arg(&id).args(&spec.command);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ctr run for {}", spec.image))?;
        let mut output = fs::read_to_string(&log).unwrap_or_default();
        output.push_str(&String::from_utf8_lossy(&out.stdout));
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status, output))
    }

    /// RunPodSandbox (which runs the CNI ADD chain); returns the sandbox id.
    pub fn run_sandbox(&mut self, namespace: &str, name: &str, uid: &str) -> Result<String> {
        let pod_ns = |mode: NamespaceMode| mode as i32;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.dir.join("pods").display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: pod_ns(NamespaceMode::Pod),
                        pid: pod_ns(NamespaceMode::Pod),
                        ipc: pod_ns(NamespaceMode::Pod),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            labels: HashMap::from([("app".to_string(), name.to_string())]),
            ..Default::default()
        };
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let id = self
            .rt
            .block_on(self.cri.run_pod_sandbox(req))
            .map_err(|s| anyhow::anyhow!("RunPodSandbox: {s}\n{}", self.log()))?
            .into_inner()
            .pod_sandbox_id;
        self.sandboxes.push(id.clone());
        Ok(id)
    }

    /// The sandbox's network namespace and IP, as the runtime reports them.
    pub fn sandbox_network(&mut self, id: &str) -> Result<(PathBuf, IpAddr)> {
        let resp = self
            .rt
            .block_on(self.cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))?
            .into_inner();
        let ip: IpAddr = resp
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .context("no sandbox network status")?
            .parse()?;
        let info: serde_json::Value =
            serde_json::from_str(resp.info.get("info").context("no verbose info")?.as_str())?;
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .context("no network namespace in the sandbox's spec")?;
        Ok((PathBuf::from(netns), ip))
    }

    /// StopPodSandbox: kills the pause process, runs CNI DEL, removes the netns.
    pub fn stop_sandbox(&mut self, id: &str) -> Result<()> {
        self.rt
            .block_on(self.cri.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map_err(|s| anyhow::anyhow!("StopPodSandbox: {s}"))?;
        Ok(())
    }

    /// RemovePodSandbox (runs CNI DEL again).
    pub fn remove_sandbox(&mut self, id: &str) -> Result<()> {
        self.rt
            .block_on(self.cri.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .map_err(|s| anyhow::anyhow!("RemovePodSandbox: {s}"))?;
        self.sandboxes.retain(|s| s != id);
        Ok(())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Shims of this containerd still running (they outlive it if a sandbox was left).
    fn shims(&self) -> Vec<i32> {
        let needle = self.socket.display().to_string();
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("containerd-shim") && c.contains(&needle)
                })
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.sandboxes.clone() {
            let _ = self.stop_sandbox(&id);
            if let Err(e) = self.remove_sandbox(&id) {
                eprintln!("containerd: removing sandbox {id}: {e:#}");
            }
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in self.shims() {
            eprintln!("containerd: killing a leftover shim, pid {pid}");
            // SAFETY: kill has no memory-safety preconditions; the pid is our shim.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // The sandboxes' cgroup parents (empty once the sandboxes are gone).
        for hierarchy in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = fs::remove_dir(
                hierarchy
                    .path()
                    .join(self.cgroup_parent.trim_start_matches('/')),
            );
        }
        let _ = fs::remove_dir(
            Path::new("/sys/fs/cgroup").join(self.cgroup_parent.trim_start_matches('/')),
        );
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}", self.log());
        }
    }
}

/// A container for [`Containerd::run_container`].
#[derive(Debug, Clone, Default)]
pub struct ContainerRun {
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<BindMount>,
    pub privileged: bool,
    pub host_network: bool,
    pub host_pid: bool,
}

/// A host directory or file mounted into a container.
#[derive(Debug, Clone)]
pub struct BindMount {
    pub host: PathBuf,
    pub container: PathBuf,
    /// `rslave` (Kubernetes' HostToContainer), `rshared` (Bidirectional), or none.
    pub propagation: Option<&'static str>,
}

/// Connects the CRI client, retrying until the socket answers or containerd exits.
async fn connect(
    socket: &Path,
    child: &mut Option<Child>,
) -> Result<RuntimeServiceClient<Channel>> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("containerd exited with {status}");
        }
        if socket.exists() {
            let path = socket.to_path_buf();
            let channel = Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await;
            if let Ok(channel) = channel {
                return Ok(RuntimeServiceClient::new(channel));
            }
        }
        if Instant::now() > deadline {
            bail!("containerd's socket {} did not answer", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
