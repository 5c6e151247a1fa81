//! The agent's watches through real outages: its API server killed while the cluster changes
//! through another one, so the resumed watch gets 410 Gone and must list again; then etcd
//! killed and restarted under both. Nothing here is faked: each outage is a killed process.
use std::{collections::HashSet, net::IpAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sluice_agent::k8s::watch::{self, PodKey, WatchSettings};
use sluice_tests::kube::{
    KubeServer, User,
    objects::{PodShape, create_namespace, create_running_pod, eventually, force_delete_pod, name},
};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(60);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

async fn expect_keys(rx: &mut UnboundedReceiver<PodKey>, uids: &[&str]) -> Result<()> {
    let mut missing: HashSet<&str> = uids.iter().copied().collect();
    tokio::time::timeout(WAIT, async {
        while !missing.is_empty() {
            let key = rx.recv().await.context("the watch stopped")?;
            missing.remove(key.uid.as_str());
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("no key for {missing:?}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_relists_after_410_and_rides_out_outages() -> Result<()> {
    let started = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.2}s {what}", started.elapsed().as_secs_f64());
    // API server 0 serves the agent's watch; API server 1 is "the rest of the cluster".
    let Some(mut server) = KubeServer::start_with(2).await? else {
        return Ok(());
    };
    phase("etcd and two API servers ready");
    let cluster = server.client_as(User::Admin, 1).await?;
    let agent = server.client_as(User::Admin, 0).await?;
    let node = name("node");
    let ns = name("outage");
    create_namespace(&cluster, &ns, &[]).await?;
    let shape = PodShape::default();
    let p1 = create_running_pod(&cluster, &ns, "p1", &node, &shape, &[ip("10.6.0.1")]).await?;
    let p2 = create_running_pod(&cluster, &ns, "p2", &node, &shape, &[ip("10.6.0.2")]).await?;

    let mut settings = WatchSettings::new(&node);
    settings.backoff_max = Duration::from_secs(1);
    let (caches, mut keys, run) = watch::start(agent, settings);
    let task = tokio::spawn(run);
    tokio::time::timeout(WAIT, caches.wait_synced()).await??;
    expect_keys(&mut keys, &[&uid(&p1), &uid(&p2)]).await?;
    ensure!(caches.counts().pod_lists == 1);
    phase("watching");

    // The agent's API server goes away; meanwhile p1 is deleted and p3 created elsewhere.
    server.stop_apiserver(0);
    force_delete_pod(&cluster, &ns, "p1").await?;
    let p3 = create_running_pod(&cluster, &ns, "p3", &node, &shape, &[ip("10.6.0.3")]).await?;
    eventually("the watch to notice the outage", WAIT, || {
        let errors = caches.counts().errors;
        async move { Ok((errors > 0).then_some(())) }
    })
    .await?;
    ensure!(
        caches.pod(&uid(&p1)).is_some(),
        "the cache keeps its last view while cut off"
    );
    phase("API server 0 down, the cluster changed behind it");

    // Back, with a fresh watch cache: resuming from the old resourceVersion gets 410 Gone,
    // so the watcher lists again; p1's key comes although no Delete was ever seen for it.
    server.start_apiserver(0).await?;
    expect_keys(&mut keys, &[&uid(&p1), &uid(&p2), &uid(&p3)]).await?;
    let counts = caches.counts();
    ensure!(counts.pod_lists >= 2, "a relist: {counts:?}");
    ensure!(caches.pod(&uid(&p1)).is_none(), "p1 is gone from the cache");
    ensure!(caches.pod(&uid(&p2)).is_some() && caches.pod(&uid(&p3)).is_some());
    phase("API server 0 back, relisted after 410");

    // etcd down under both API servers, then back: the watch carries on without losing p4.
    let errors_before = caches.counts().errors;
    server.stop_etcd();
    server.start_etcd().await?;
    let pods: Api<Pod> = Api::namespaced(cluster.clone(), &ns);
    eventually("the API to read from etcd again", WAIT, || {
        let pods = pods.clone();
        async move { Ok(pods.get("p2").await.ok()) }
    })
    .await?;
    let p4 = create_running_pod(&cluster, &ns, "p4", &node, &shape, &[ip("10.6.0.4")]).await?;
    expect_keys(&mut keys, &[&uid(&p4)]).await?;
    ensure!(caches.pod(&uid(&p4)).is_some());
    phase("etcd restarted, changes flow again");
    eprintln!(
        "watch counts: {:?} (errors during the etcd outage: {})",
        caches.counts(),
        caches.counts().errors - errors_before
    );
    task.abort();
    Ok(())
}
