//! Command line. Every flag can also come from an environment variable; where istio-cni has an
//! equivalent setting, its variable name is accepted (ZTUNNEL_UDS_ADDRESS, MONITORING_PORT,
//! AMBIENT_DNS_CAPTURE, AMBIENT_IPV6, NODE_NAME, POD_NAMESPACE).
use std::{net::IpAddr, net::SocketAddr, path::PathBuf};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_CONTROL_SOCKET: &str = "/var/run/sluice/agent.sock";

#[derive(Debug, Parser)]
#[command(
    name = "sluice-agent",
    version,
    about = "Sluice: eBPF traffic redirection for Istio ambient mode"
)]
pub struct Cli {
    /// Log level or filter (e.g. `info`, `debug`, `sluice_agent=debug,info`).
    #[arg(long, global = true, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// The agent's control socket (enroll/unenroll/status); root only.
    #[arg(long, global = true, env = "SLUICE_CONTROL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load and pin the dataplane, serve ztunnel (ZDS) and the control socket.
    Run(RunArgs),
    /// Enroll a pod network namespace (standalone mode; the CNI plugin does this on a cluster).
    Enroll(EnrollArgs),
    /// Stop redirecting a pod.
    Unenroll {
        #[arg(long)]
        uid: String,
    },
    /// What is enrolled, what is attached, map fill levels and counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the agent put on this node (pins, links, pod rules, sockets, state,
    /// the sluice-cni entry and binary). Stops a running agent first.
    Uninstall(UninstallArgs),
    /// Install sluice-cni and chain it into the node's CNI configuration once, then exit
    /// (`run` does this too, and keeps it installed).
    InstallCni(InstallCniArgs),
    /// Stream live redirect decisions (redirected, exempt and why, dropped and why) until
    /// interrupted. Costs nothing while nobody traces.
    Trace {
        /// Only this pod's decisions (`namespace/name`).
        #[arg(long)]
        pod: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Go ahead even if the state is unreadable (corrupt or truncated): pod namespaces are
    /// then found by scanning /var/run/netns and /proc instead of from the pod records.
    #[arg(long)]
    pub force: bool,
}

/// Where the agent keeps its things on the node.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// bpffs directory for pinned maps and links (bpffs is mounted at /sys/fs/bpf if needed).
    #[arg(long, env = "SLUICE_PIN_ROOT", default_value = crate::dataplane::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// cgroup v2 directory the programs attach to (default: the cgroup2 root, i.e. every pod).
    #[arg(long, env = "SLUICE_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// The ZDS socket ztunnel connects to.
    #[arg(
        long,
        env = "ZTUNNEL_UDS_ADDRESS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub zds_socket: PathBuf,
    /// Where the pod table is persisted.
    #[arg(
        long,
        env = "SLUICE_STATE_DIR",
        default_value = "/var/run/sluice/state"
    )]
    pub state_dir: PathBuf,
    /// CNI network configuration directory to chain sluice-cni into (the DaemonSet mounts the
    /// host's /etc/cni/net.d at /host/etc/cni/net.d). Unset: no CNI installer (standalone).
    #[arg(long, env = "MOUNTED_CNI_NET_DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// CNI binary directory sluice-cni is installed into.
    #[arg(long, env = "SLUICE_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
}

/// The sluice-cni plugin: what the installer writes into its conflist entry, and which pods a
/// CNI ADD enrolls.
#[derive(Debug, Clone, Args)]
pub struct CniArgs {
    /// The plugin binary to install (default: `sluice-cni` next to this executable).
    #[arg(long, env = "SLUICE_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,
    /// The plugin's log level.
    #[arg(long, env = "SLUICE_CNI_LOG_LEVEL", default_value = "info",
          value_parser = ["error", "warn", "info", "debug"])]
    pub cni_log_level: String,
    /// The plugin's log file on the node (default: stderr, i.e. the runtime's log).
    #[arg(long, env = "SLUICE_CNI_LOG_FILE")]
    pub cni_log_file: Option<PathBuf>,
    /// How long the plugin waits for the agent (enrollment included), in milliseconds.
    #[arg(long, env = "SLUICE_CNI_TIMEOUT_MS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub cni_timeout_ms: u64,
    /// Namespaces whose pods are never enrolled, comma-separated; kube-system never is.
    #[arg(long, env = "EXCLUDE_NAMESPACES", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// Standalone mode: namespaces whose pods a CNI ADD enrolls, comma-separated (ignored in
    /// Kubernetes mode, where labels decide).
    #[arg(long, env = "SLUICE_AMBIENT_NAMESPACES", value_delimiter = ',')]
    pub ambient_namespaces: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InstallCniArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub cni: CniArgs,
    /// If there is no CNI configuration yet, wait for the primary CNI to write one.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub cni: CniArgs,
    /// Health endpoint (`/healthz`, `/readyz`).
    #[arg(long, env = "SLUICE_HEALTH_ADDR", default_value = "0.0.0.0:8000")]
    pub health_addr: SocketAddr,
    /// Prometheus metrics port (`/metrics`).
    #[arg(long, env = "MONITORING_PORT", default_value_t = 15014)]
    pub metrics_port: u16,
    /// Address the metrics port binds on.
    #[arg(long, env = "SLUICE_METRICS_BIND", default_value = "0.0.0.0")]
    pub metrics_bind: IpAddr,
    /// Short-circuit app↔ztunnel bytes with sockmap.
    #[arg(long, env = "SLUICE_ACCELERATE", action = ArgAction::Set, default_value_t = false)]
    pub accelerate: bool,
    /// Capture pods' DNS by default (per-pod annotation overrides).
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", action = ArgAction::Set, default_value_t = true)]
    pub dns_capture: bool,
    /// Redirect pods' IPv6 traffic too.
    #[arg(long, env = "AMBIENT_IPV6", action = ArgAction::Set, default_value_t = true)]
    pub ipv6: bool,
    /// Seconds to wait for ztunnel's answer to one request before dropping the connection.
    #[arg(long, env = "SLUICE_ZDS_ACK_TIMEOUT", default_value_t = 10)]
    pub zds_ack_timeout: u64,
    /// Backoff for re-sending an Add that ztunnel refused: first and longest delay in ms.
    #[arg(long, env = "SLUICE_ZDS_RETRY_MS", value_parser = parse_retry, default_value = "200,30000")]
    pub zds_retry_ms: (u64, u64),
    /// Milliseconds an enroll request waits for ztunnel's ACK by default.
    #[arg(long, env = "SLUICE_ENROLL_WAIT_MS", default_value_t = 5000)]
    pub enroll_wait_ms: u64,
    /// Seconds between checks for pods whose network namespace disappeared without an unenroll;
    /// in Kubernetes mode, between full resyncs of every pod (which include that check).
    #[arg(long, env = "SLUICE_GC_INTERVAL", default_value_t = 10)]
    pub gc_interval: u64,
    /// This node's name: in Kubernetes mode its pods are the ones watched, and its startup
    /// taint is removed (required there; informational in standalone mode).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The agent's own namespace, where ztunnel runs too (Kubernetes mode: ztunnel's pods are
    /// never enrolled).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Kubernetes mode with this kubeconfig. Without it, Kubernetes mode is on when the agent
    /// runs in a pod (`KUBERNETES_SERVICE_HOST`, its service account); off otherwise
    /// (standalone: `--ambient-namespaces` decide).
    #[arg(long, env = "SLUICE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the node taint removed once the agent is ready and its CNI entry is
    /// installed (Istio's key; empty: leave taints alone).
    #[arg(long, env = "SLUICE_STARTUP_TAINT", default_value = crate::k8s::node_taint::DEFAULT_STARTUP_TAINT)]
    pub startup_taint: String,
    /// Kubernetes mode: how long a CNI ADD waits for the agent's cache to show its pod, in
    /// milliseconds.
    #[arg(long, env = "SLUICE_CNI_POD_LOOKUP_MS", default_value_t = 5000)]
    pub cni_pod_lookup_ms: u64,
}

impl RunArgs {
    /// Whether the agent takes its desired state from Kubernetes.
    pub fn kubernetes_mode(&self) -> bool {
        self.kubeconfig.is_some() || crate::k8s::in_cluster()
    }
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Path of the pod's network namespace.
    #[arg(long)]
    pub netns: PathBuf,
    #[arg(long)]
    pub uid: String,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub namespace: String,
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// A pod IP (repeat for dual stack).
    #[arg(long = "ip", required = true)]
    pub ips: Vec<IpAddr>,
    /// Override the agent's DNS capture default for this pod.
    #[arg(long, action = ArgAction::Set)]
    pub dns_capture: Option<bool>,
    #[arg(long)]
    pub bypass_inbound: bool,
    /// Milliseconds to wait for ztunnel's ACK.
    #[arg(long)]
    pub wait_ms: Option<u64>,
}

/// `FIRST,MAX` in milliseconds (or just `FIRST`, for a constant backoff).
fn parse_retry(s: &str) -> Result<(u64, u64), String> {
    let num = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|e| format!("{v:?}: {e}"))
            .and_then(|n| {
                if n == 0 {
                    Err("must be > 0".into())
                } else {
                    Ok(n)
                }
            })
    };
    match s.split_once(',') {
        Some((first, max)) => {
            let (first, max) = (num(first)?, num(max)?);
            if max < first {
                return Err("MAX must be at least FIRST".into());
            }
            Ok((first, max))
        }
        None => num(s).map(|n| (n, n)),
    }
}
