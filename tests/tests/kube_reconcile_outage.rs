//! The agent in Kubernetes mode through real trouble with its API server: its watch
//! connections dropped mid-stream, its API server killed while the cluster changes through
//! another one (so the resumed watch gets 410 Gone and must list again), and etcd killed under
//! both. Nothing is faked: each outage is a killed process or a cut connection. In each case
//! the agent keeps what it has while it cannot know better, then converges.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt as _, api::ListParams};
use serde_json::Value;
use sluice_agent::k8s::{
    annotate::REDIRECTION_ANNOTATION,
    policy::{DATAPLANE_MODE_LABEL, MODE_AMBIENT},
};
use sluice_tests::{
    harness::require_root,
    kube::{
        KubeServer, User,
        objects::{
            PodShape, create_namespace, eventually, force_delete_pod, label_namespace, name,
        },
    },
    kube_node::{KubeNode, NodeOptions, apply_agent_rbac},
    zds::ZdsPeerOptions,
};

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");
const WAIT: Duration = Duration::from_secs(60);

async fn annotation(client: &Client, ns: &str, pod: &str) -> Result<Option<String>> {
    let p = Api::<Pod>::namespaced(client.clone(), ns).get(pod).await?;
    Ok(p.annotations().get(REDIRECTION_ANNOTATION).cloned())
}

async fn wait_annotation(client: &Client, ns: &str, pod: &str, want: Option<&str>) -> Result<()> {
    eventually(
        &format!("{ns}/{pod}'s annotation to be {want:?}"),
        WAIT,
        || async move { Ok((annotation(client, ns, pod).await?.as_deref() == want).then_some(())) },
    )
    .await
}

fn enrolled(status: &Value) -> Vec<String> {
    status["pods"]
        .as_array()
        .map(|p| {
            let mut uids: Vec<String> = p
                .iter()
                .filter_map(|p| p["uid"].as_str().map(str::to_string))
                .collect();
            uids.sort();
            uids
        })
        .unwrap_or_default()
}

fn sorted(uids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = uids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_through_dropped_watches_410_and_outages() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.2}s {what}", started.elapsed().as_secs_f64());
    // API server 0 serves the agent; API server 1 is "the rest of the cluster".
    let Some(mut server) = KubeServer::start_with(2).await? else {
        return Ok(());
    };
    let cluster = server.client_as(User::Admin, 1).await?;
    apply_agent_rbac(&cluster).await?;
    // Each API server's authorizer learns the role from its own watch, a moment later.
    let agent_view = server.client_as(User::Agent, 0).await?;
    eventually("RBAC on API server 0", WAIT, || {
        let c = agent_view.clone();
        async move {
            let ok = Api::<Pod>::all(c)
                .list(&ListParams::default().limit(1))
                .await
                .is_ok();
            Ok(ok.then_some(()))
        }
    })
    .await?;
    let mut node = KubeNode::start(&server, Path::new(TESTKIT), NodeOptions::new(5))?;
    let peer = node.fx.zds_peer(&ZdsPeerOptions::default())?;
    phase("etcd, two API servers and the agent ready");

    let (a, b) = (name("outa"), name("outb"));
    create_namespace(&cluster, &a, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    create_namespace(&cluster, &b, &[]).await?;
    let shape = PodShape::default();
    let p0 = uid(&node.run_pod(&cluster, 0, &a, "p0", &shape).await?);
    let p1 = uid(&node.run_pod(&cluster, 1, &a, "p1", &shape).await?);
    let p2 = uid(&node.run_pod(&cluster, 2, &b, "p2", &shape).await?);
    node.app(1).listen(8080)?;
    let dst = SocketAddr::new(node.fx.topo.pod(1).ipv4.into(), 8080);
    for p in ["p0", "p1"] {
        wait_annotation(&cluster, &a, p, Some("enabled")).await?;
    }
    phase("p0, p1 enrolled");

    // 1. Every connection to the API server dropped mid-stream; the cluster changes.
    node.proxy.cut();
    label_namespace(&cluster, &b, DATAPLANE_MODE_LABEL, Some(MODE_AMBIENT)).await?;
    wait_annotation(&cluster, &b, "p2", Some("enabled")).await?;
    phase("watch cut: b's label still seen, p2 enrolled");

    // 2. The agent's API server down while the cluster changes through the other one.
    let errors_before = node.status()?["kubernetes"]["watch"]["errors"]
        .as_u64()
        .unwrap_or(0);
    server.stop_apiserver(0);
    label_namespace(&cluster, &a, DATAPLANE_MODE_LABEL, None).await?;
    force_delete_pod(&cluster, &b, "p2").await?;
    let p3 = uid(&node.run_pod(&cluster, 3, &b, "p3", &shape).await?);
    let errors = || -> Result<u64> {
        Ok(node.status()?["kubernetes"]["watch"]["errors"]
            .as_u64()
            .unwrap_or(0))
    };
    eventually("the agent to notice the outage", WAIT, || {
        let n = errors();
        async move { Ok((n? > errors_before).then_some(())) }
    })
    .await?;
    // Cut off, it keeps what it has: nothing let go, nothing new, traffic still redirected.
    ensure!(enrolled(&node.status()?) == sorted(&[&p0, &p1, &p2]));
    node.app(0).connect(dst, Some("outage"))?.ensure_ok()?;
    peer.wait_event(
        |e| e["event"] == "outbound" && e["uid"] == p0 && e["orig_dst"] == dst.to_string(),
        WAIT,
    )?;
    phase("API server 0 down: the agent holds its state");

    // Back with a fresh watch cache: the resumed watch gets 410 Gone, the agent lists again.
    server.start_apiserver(0).await?;
    for p in ["p0", "p1"] {
        wait_annotation(&cluster, &a, p, None).await?;
    }
    wait_annotation(&cluster, &b, "p3", Some("enabled")).await?;
    let status = node.status()?;
    ensure!(enrolled(&status) == sorted(&[&p3]), "{}", status["pods"]);
    let lists = status["kubernetes"]["watch"]["pod_lists"].as_u64();
    ensure!(lists >= Some(2), "a relist after 410: {lists:?}");
    for u in [&p0, &p1, &p2] {
        peer.wait_event(
            |e| e["event"] == "workload_stopped" && e["uid"] == **u,
            WAIT,
        )?;
    }
    let r = node.app(0).connect(dst, Some("direct"))?;
    r.ensure_ok()?;
    ensure!(
        r.banner_peer() == r.sockname,
        "p0's traffic is direct again: {r:?}"
    );
    phase("API server 0 back: relisted and converged");

    // 3. etcd down under both API servers (their watch caches stall or fail), then back.
    let _ = peer.events();
    server.stop_etcd();
    ensure!(enrolled(&node.status()?) == sorted(&[&p3]));
    server.start_etcd().await?;
    let pods: Api<Pod> = Api::namespaced(cluster.clone(), &b);
    eventually("the API to read from etcd again", WAIT, || {
        let pods = pods.clone();
        async move { Ok(pods.get("p3").await.ok()) }
    })
    .await?;
    label_namespace(&cluster, &a, DATAPLANE_MODE_LABEL, Some(MODE_AMBIENT)).await?;
    for p in ["p0", "p1"] {
        wait_annotation(&cluster, &a, p, Some("enabled")).await?;
    }
    ensure!(enrolled(&node.status()?) == sorted(&[&p0, &p1, &p3]));
    node.app(0).connect(dst, Some("again"))?.ensure_ok()?;
    peer.wait_event(
        |e| e["event"] == "outbound" && e["uid"] == p0 && e["orig_dst"] == dst.to_string(),
        WAIT,
    )
    .context("p0 redirected again")?;
    phase("etcd restarted: changes flow again");
    let events = peer.events();
    ensure!(
        !events
            .iter()
            .any(|e| e["event"] == "workload_stopped" && e["uid"] == p3),
        "p3 was let go across the etcd outage"
    );
    ensure!(
        !events.iter().any(|e| e["event"] == "zds_violation"),
        "{events:?}"
    );
    Ok(())
}
