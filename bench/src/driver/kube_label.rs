//! Figure 9: Kubernetes-driven enrollment. The agent in Kubernetes mode against the tests'
//! real kube-apiserver (v1.20.2, etcd on tmpfs); a namespace of running pods (100 in the full
//! run), each a network namespace with a process in a cgroup named like the kubelet's, so the
//! agent finds it through `/proc`. Timed from the label change
//! (`istio.io/dataplane-mode=ambient`) to each pod's `ambient.istio.io/redirection: enabled`
//! (redirected, and acknowledged over ZDS by the bench's peer), as a watch of the pods sees
//! it; and back, from removing the label to each annotation gone.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use sluice_agent::k8s::{
    annotate::REDIRECTION_ANNOTATION,
    policy::{DATAPLANE_MODE_LABEL, MODE_AMBIENT},
};
use sluice_tests::{
    harness::{CgroupLayout, KubeletCgroup, Proc},
    kube::{
        KubeServer, NetnsProxy, User,
        objects::{PodShape, create_namespace, create_pod, label_namespace, name, set_pod_status},
    },
    kube_node::apply_agent_rbac,
};
use tokio::sync::mpsc;

use super::procs::{Agent, Peer};
use super::results::{Figure, Rows};
use super::topo::CheapPods;
use super::{Env, Plan, progress};

const WAIT: Duration = Duration::from_secs(120);

pub fn run(env: &Env, plan: &Plan) -> Result<Figure> {
    let n = plan.label_pods;
    let mut fig = Figure::new(
        9,
        "kube-label",
        &format!("Kubernetes: label a namespace of {n} running pods → enrolled"),
        "ms",
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let Some(server) = runtime.block_on(KubeServer::start())? else {
        fig.problems
            .push("no kube-apiserver: run `cargo xtask kube-apiserver`".into());
        return Ok(fig);
    };
    let result = runtime.block_on(measure(env, plan, &server, &mut fig));
    drop(server);
    result.map(|()| fig)
}

async fn measure(env: &Env, plan: &Plan, server: &KubeServer, fig: &mut Figure) -> Result<()> {
    let n = plan.label_pods;
    let admin = server.client().await?;
    apply_agent_rbac(&admin).await?;
    progress(format!(
        "kubernetes: {n} running pods, agent in Kubernetes mode"
    ));
    let node = env.topo.node().path();
    let proxy = NetnsProxy::start(node, server.addr(0)?)?;
    let kubeconfig = server.kubeconfig_via(User::Agent, proxy.port())?;
    let node_name = name("bench-node");
    let kubeconfig = kubeconfig.display().to_string();
    let agent = Agent::start_with(
        node,
        &env.cgroup,
        &["--kubeconfig", &kubeconfig, "--node-name", &node_name],
    )?;
    let zds = agent.zds_socket().display().to_string();
    let mut peer = Peer::start(&env.bench, node, &env.cgroup, &["--zds", &zds])?;
    peer.wait_event("zds_connected", Duration::from_secs(20))?;

    let ns = name("bench");
    create_namespace(&admin, &ns, &[]).await?;
    let pods = CheapPods::new(n, 0)?;
    // Processes and cgroups go before the pods' namespaces.
    let mut running: Vec<(Proc, KubeletCgroup)> = Vec::new();
    for (i, pod) in pods.pods().iter().enumerate() {
        let pod_name = format!("p{i}");
        let created = create_pod(&admin, &ns, &pod_name, &node_name, &PodShape::default()).await?;
        let uid = created.metadata.uid.clone().context("a pod without UID")?;
        let proc = Proc::spawn(
            std::path::Path::new("/bin/sleep"),
            &["3600"],
            Some(&pod.path),
            Some(&env.cgroup),
        )?;
        let cgroup =
            KubeletCgroup::new_under(CgroupLayout::V2Cgroupfs, env.cgroup.path(), &uid, "app")?;
        cgroup.add_pid(proc.pid())?;
        running.push((proc, cgroup));
        set_pod_status(&admin, &ns, &pod_name, "Running", &[pod.ip.into()]).await?;
    }
    let mut annotations = Annotations::watch(&admin, &ns).await?;
    annotations.until(n, None, WAIT).await?;
    // The agent has seen every pod (and left them alone) before the clock starts.
    let deadline = Instant::now() + WAIT;
    loop {
        let status = agent.proc.status()?;
        let seen = status["kubernetes"]["pods"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["state"] == "skipped").count());
        if seen == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent saw {seen} of {n} pods");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut rows = Rows::default();
    let (label, unlabel) = ("label → pod enabled", "unlabel → pod annotation removed");
    let all = format!("label → all {n} pods enabled");
    for round in 0..plan.rounds {
        crate::stop::check()?;
        label_namespace(&admin, &ns, DATAPLANE_MODE_LABEL, Some(MODE_AMBIENT)).await?;
        let times = annotations.until(n, Some("enabled"), WAIT).await?;
        let last = times.iter().copied().fold(Duration::ZERO, Duration::max);
        for t in &times {
            rows.acc("sluice", label).add_sample(ms(*t));
        }
        rows.acc("sluice", &all).add_sample(ms(last));
        progress(format!(
            "kubernetes: round {}: all {n} pods enabled {:.0} ms after the label",
            round + 1,
            ms(last)
        ));
        let enrolled = agent.proc.status()?["pods"].as_array().map_or(0, Vec::len);
        if enrolled != n {
            fig.problems
                .push(format!("{enrolled} pods enrolled in the agent, not {n}"));
        }
        label_namespace(&admin, &ns, DATAPLANE_MODE_LABEL, None).await?;
        for t in annotations.until(n, None, WAIT).await? {
            rows.acc("sluice", unlabel).add_sample(ms(t));
        }
    }
    fig.rows = rows.rows(false);
    fig.notes.push(format!(
        "From the label change to each pod's `{REDIRECTION_ANNOTATION}: enabled` (the agent \
         found the pod's netns in /proc, enrolled it, ztunnel's stand-in acknowledged it, the \
         agent patched pods/status), as a watch of the pods sees it. {n} pods, {} round(s); \
         kube-apiserver v1.20.2 and etcd on this machine.",
        plan.rounds
    ));
    drop(running);
    drop(pods);
    drop(peer);
    drop(agent);
    drop(proxy);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Every pod's redirection annotation, as a watch reports it.
struct Annotations {
    rx: mpsc::UnboundedReceiver<(String, Option<String>, Instant)>,
    current: HashMap<String, Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Annotations {
    async fn watch(client: &Client, ns: &str) -> Result<Annotations> {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut pods = watcher(api, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(pod)) = pods.next().await {
                let value = pod.annotations().get(REDIRECTION_ANNOTATION).cloned();
                if tx.send((pod.name_any(), value, Instant::now())).is_err() {
                    return;
                }
            }
        });
        Ok(Annotations {
            rx,
            current: HashMap::new(),
            task,
        })
    }

    /// Waits until `n` pods show `want` (None: no annotation); returns how long after this
    /// call each pod got there (zero for those already there).
    async fn until(
        &mut self,
        n: usize,
        want: Option<&str>,
        limit: Duration,
    ) -> Result<Vec<Duration>> {
        let start = Instant::now();
        let mut reached: HashMap<String, Duration> = self
            .current
            .iter()
            .filter(|(_, v)| v.as_deref() == want)
            .map(|(k, _)| (k.clone(), Duration::ZERO))
            .collect();
        let deadline = tokio::time::Instant::now() + limit;
        while reached.len() < n {
            let Ok(Some((pod, value, at))) =
                tokio::time::timeout_at(deadline, self.rx.recv()).await
            else {
                bail!(
                    "{} of {n} pods reached {want:?} in {limit:?}",
                    reached.len()
                );
            };
            if value.as_deref() == want {
                reached
                    .entry(pod.clone())
                    .or_insert_with(|| at.saturating_duration_since(start));
            } else {
                reached.remove(&pod);
            }
            self.current.insert(pod, value);
        }
        Ok(reached.into_values().collect())
    }
}

impl Drop for Annotations {
    fn drop(&mut self) {
        self.task.abort();
    }
}
