//! A node of the test cluster: the real `sluice-agent run` in Kubernetes mode on an
//! [`AgentFixture`], and pods that are the fixture's network namespaces with a real process
//! each, in a cgroup named the way the kubelet names a pod's (so the agent finds them through
//! `/proc`), together with their Pod objects.
//!
//! - The agent runs in the topology's node namespace and reaches the API server (on the
//!   host's loopback) through a [`NetnsProxy`]; it authenticates as its own service account,
//!   with the ClusterRole of `deploy/` ([`apply_agent_rbac`]), so every test also proves that
//!   RBAC is enough.
//! - The pods' cgroups are made below the fixture's own cgroup v2 (where the agent's programs
//!   are attached), alternating the cgroupfs and systemd drivers' names.
use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    core::v1::Pod,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{Api, Client, api::PostParams};
use serde_json::Value;

use crate::{
    agent_proc::{AgentFixture, Launch},
    harness::{App, CgroupLayout, KubeletCgroup},
    kube::{
        KubeServer, NetnsProxy, User,
        objects::{PodShape, create_pod, set_pod_status},
    },
};

/// How long an agent may take to become ready (its initial sync included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Applies the ClusterRole and binding of `deploy/manifests/sluice.yaml` as they are (a second
/// call finds them there).
pub async fn apply_agent_rbac(admin: &Client) -> Result<()> {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/manifests/sluice.yaml"
    ))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&manifest)?;
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .with_context(|| format!("no {kind} in deploy/manifests/sluice.yaml"))
    };
    let role: ClusterRole = serde_json::from_value(find("ClusterRole")?)?;
    let binding: ClusterRoleBinding = serde_json::from_value(find("ClusterRoleBinding")?)?;
    let created = |r: Result<(), kube::Error>| match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    };
    let post = PostParams::default();
    created(
        Api::<ClusterRole>::all(admin.clone())
            .create(&post, &role)
            .await
            .map(drop),
    )?;
    created(
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&post, &binding)
            .await
            .map(drop),
    )?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Network namespaces ("pods") in the topology.
    pub pods: usize,
    /// More flags for `sluice-agent run`.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run the CNI installer (readiness then waits for a primary CNI config).
    pub cni: bool,
    /// Which API server of the [`KubeServer`] the agent talks to.
    pub apiserver: usize,
    /// Wait for `/readyz` (not possible with `cni` until a primary config is written).
    pub wait_ready: bool,
}

impl NodeOptions {
    pub fn new(pods: usize) -> Self {
        NodeOptions {
            pods,
            args: Vec::new(),
            env: Vec::new(),
            cni: false,
            apiserver: 0,
            wait_ready: true,
        }
    }
}

/// The processes of one pod.
pub struct PodProcs {
    pub uid: String,
    pub app: App,
    _cgroup: KubeletCgroup,
}

pub struct KubeNode {
    // Dropped first: the processes and their cgroups go before the fixture's cgroup.
    pods: Vec<Option<PodProcs>>,
    pub fx: AgentFixture,
    pub proxy: NetnsProxy,
    /// The Node name the agent watches (`NODE_NAME`); no Node object unless a test makes one.
    pub name: String,
    testkit: std::path::PathBuf,
}

impl KubeNode {
    /// Starts the agent on a new node name, talking to `server` through a proxy.
    pub fn start(server: &KubeServer, testkit: &Path, opts: NodeOptions) -> Result<KubeNode> {
        Self::start_named(server, testkit, &crate::kube::objects::name("node"), opts)
    }

    pub fn start_named(
        server: &KubeServer,
        testkit: &Path,
        name: &str,
        opts: NodeOptions,
    ) -> Result<KubeNode> {
        let mut proxy = None;
        let target = server.addr(opts.apiserver)?;
        let mut fx = AgentFixture::spawn_with_launch(testkit, opts.pods, |topo| {
            let p = NetnsProxy::start(topo.node().path(), target)?;
            let kubeconfig = server.kubeconfig_via(User::Agent, p.port())?;
            proxy = Some(p);
            let mut args = vec![
                "--kubeconfig".to_string(),
                kubeconfig.display().to_string(),
                "--node-name".into(),
                name.to_string(),
            ];
            args.extend(opts.args.iter().cloned());
            Ok(Launch {
                args,
                env: opts.env.clone(),
                cni: opts.cni,
            })
        })?;
        if opts.wait_ready {
            fx.agent.wait_ready(READY_TIMEOUT)?;
        }
        Ok(KubeNode {
            pods: (0..opts.pods).map(|_| None).collect(),
            fx,
            proxy: proxy.context("the proxy was not started")?,
            name: name.to_string(),
            testkit: testkit.to_path_buf(),
        })
    }

    /// Makes topology pod `i` the running pod `namespace/name`: the Pod object (bound to this
    /// node), a process in the pod's netns and kubelet-named cgroup, then the status a kubelet
    /// reports (Running, the netns's IPs).
    pub async fn run_pod(
        &mut self,
        client: &Client,
        i: usize,
        namespace: &str,
        name: &str,
        shape: &PodShape<'_>,
    ) -> Result<Pod> {
        let ips = self.fx.topo.pod(i).ips();
        self.run_pod_with_ips(client, i, namespace, name, shape, &ips)
            .await
    }

    /// [`KubeNode::run_pod`] with the IPs the status reports (a test may give wrong ones).
    pub async fn run_pod_with_ips(
        &mut self,
        client: &Client,
        i: usize,
        namespace: &str,
        name: &str,
        shape: &PodShape<'_>,
        ips: &[std::net::IpAddr],
    ) -> Result<Pod> {
        let pod = create_pod(client, namespace, name, &self.name, shape).await?;
        let uid = pod.metadata.uid.clone().context("a pod without UID")?;
        self.start_processes(i, &uid)?;
        set_pod_status(client, namespace, name, "Running", ips).await
    }

    /// A process of pod `uid` in topology pod `i`'s netns, in the pod's kubelet-named cgroup.
    pub fn start_processes(&mut self, i: usize, uid: &str) -> Result<&PodProcs> {
        if self.pods[i].is_some() {
            bail!("topology pod {i} already has processes");
        }
        let app = self.fx.app(i)?;
        let layout = if i.is_multiple_of(2) {
            CgroupLayout::V2Cgroupfs
        } else {
            CgroupLayout::V2Systemd
        };
        let cgroup = KubeletCgroup::new_under(layout, self.fx.cgroup.path(), uid, "app")?;
        cgroup.add_pid(app.pid())?;
        self.pods[i] = Some(PodProcs {
            uid: uid.to_string(),
            app,
            _cgroup: cgroup,
        });
        Ok(self.pods[i].as_ref().expect("just set"))
    }

    /// Kills pod `i`'s processes (its netns stays, held by the topology).
    pub fn stop_processes(&mut self, i: usize) {
        self.pods[i] = None;
    }

    /// The process of topology pod `i`.
    pub fn app(&self, i: usize) -> &App {
        &self.pods[i]
            .as_ref()
            .unwrap_or_else(|| panic!("topology pod {i} has no processes"))
            .app
    }

    /// Another process in topology pod `i`'s netns, outside any pod cgroup (a client).
    pub fn extra_app(&self, i: usize) -> Result<App> {
        App::spawn(
            &self.testkit,
            Some(self.fx.topo.pod(i).path()),
            Some(&self.fx.cgroup),
        )
    }

    /// `sluice-agent status --json`.
    pub fn status(&self) -> Result<Value> {
        self.fx.agent.status()
    }

    /// The reconciler's report on pod `uid` (`status.kubernetes.pods[]`).
    pub fn report(&self, uid: &str) -> Result<Option<Value>> {
        let status = self.status()?;
        Ok(status["kubernetes"]["pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|p| p["uid"] == uid).cloned()))
    }

    /// The agent's enrolled pod `uid` (`status.pods[]`).
    pub fn enrolled(&self, uid: &str) -> Result<Option<Value>> {
        let status = self.status()?;
        Ok(status["pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|p| p["uid"] == uid).cloned()))
    }

    /// How many entries a dataplane map holds.
    pub fn map_used(&self, map: &str) -> Result<u64> {
        let status = self.status()?;
        status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == map))
            .and_then(|m| m["used"].as_u64())
            .with_context(|| format!("no map {map} in the status"))
    }
}
