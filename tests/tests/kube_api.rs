//! The agent's Kubernetes modules against a real kube-apiserver v1.20.2 and etcd, one server
//! shared by every test here (each test uses its own namespaces and node names).
//!
//! A custom main (libtest-mimic: libtest's arguments and output) starts the server before the
//! tests and stops it after them. Tests that stop or restart the server are in
//! `kube_outage.rs`, each with a server of its own.
use std::{collections::HashSet, net::IpAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Secret},
    events::v1::Event as K8sEvent,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;
use sluice_agent::k8s::{
    annotate::{self, AnnotateError, PodEvents, REDIRECTION_ANNOTATION, Redirection},
    node_taint::{self, DEFAULT_STARTUP_TAINT, Removal},
    policy::{DATAPLANE_MODE_LABEL, MODE_AMBIENT},
    watch::{self, PodKey, WatchSettings},
};
use sluice_tests::kube::{
    KubeServer, User,
    objects::{
        PodShape, create_namespace, create_node, create_running_pod, eventually, force_delete_pod,
        label_namespace, name,
    },
};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    sluice_tests::kube::shared::run(
        sluice_tests::kube_tests![
            smoke_pods_namespaces_watch_and_status,
            watch_caches_this_nodes_pods_and_enqueues_changes,
            redirection_annotation_through_pods_status,
            redirection_annotation_never_lands_on_a_recreated_pod,
            events_are_recorded_on_the_pod,
            startup_taint_is_removed_only_once_ready,
            agent_rbac_from_deploy_is_enough,
        ],
        || true,
        KubeServer::start,
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// Waits for the keys of all `pods` (by UID) to come out of the watch.
async fn expect_keys(rx: &mut UnboundedReceiver<PodKey>, uids: &[&str]) -> Result<Vec<PodKey>> {
    let mut missing: HashSet<&str> = uids.iter().copied().collect();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !missing.is_empty() {
            let key = rx.recv().await.context("the watch stopped")?;
            missing.remove(key.uid.as_str());
            seen.push(key);
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("no key for {missing:?}; got {seen:?}"))??;
    Ok(seen)
}

/// Waits for a key for `uid` that comes when `cond` holds: keys queued before a change are
/// passed over, the one the change caused must satisfy it.
async fn expect_key_with(
    rx: &mut UnboundedReceiver<PodKey>,
    uid: &str,
    what: &str,
    cond: impl Fn() -> bool,
) -> Result<()> {
    tokio::time::timeout(WAIT, async {
        loop {
            let key = rx.recv().await.context("the watch stopped")?;
            if key.uid == uid && cond() {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .with_context(|| format!("no key for {uid} once {what}"))?
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

/// What `.ci/run` used to ask of the server directly: it is v1.20.2, serves namespaces and
/// pods, watches them, takes `pods/status` patches, and force-deletes.
async fn smoke_pods_namespaces_watch_and_status(server: Arc<KubeServer>) -> Result<()> {
    let client = server.client().await?;
    let version = client.apiserver_version().await?;
    ensure!(version.git_version == "v1.20.2", "version {version:?}");

    let ns = name("smoke");
    create_namespace(&client, &ns, &[]).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut events = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
    // The first list (empty) completes before we create anything.
    loop {
        if let watcher::Event::InitDone = events.try_next().await?.context("watch ended")? {
            break;
        }
    }

    let pod = create_running_pod(
        &client,
        &ns,
        "p",
        &name("node"),
        &PodShape::default(),
        &[ip("10.1.0.1")],
    )
    .await?;
    let seen = next_pod_event(&mut events).await?;
    ensure!(
        matches!(&seen, watcher::Event::Apply(p) if p.uid() == pod.uid()),
        "{seen:?}"
    );

    let patch = json!({"metadata": {"annotations": {"smoke": "yes"}}});
    pods.patch_status("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let got = pods.get("p").await?;
    ensure!(got.annotations().get("smoke").map(String::as_str) == Some("yes"));
    ensure!(
        got.status.as_ref().and_then(|s| s.pod_ip.as_deref()) == Some("10.1.0.1"),
        "status {:?}",
        got.status
    );

    force_delete_pod(&client, &ns, "p").await?;
    loop {
        match next_pod_event(&mut events).await? {
            watcher::Event::Delete(p) if p.uid() == pod.uid() => break,
            watcher::Event::Apply(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(pods.get_opt("p").await?.is_none());
    Ok(())
}

async fn next_pod_event(
    events: &mut (impl futures_util::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin),
) -> Result<watcher::Event<Pod>> {
    tokio::time::timeout(WAIT, events.try_next())
        .await
        .context("no watch event")??
        .context("watch ended")
}

async fn watch_caches_this_nodes_pods_and_enqueues_changes(server: Arc<KubeServer>) -> Result<()> {
    let client = server.client().await?;
    let (node, other_node) = (name("node"), name("node"));
    let (ambient, plain) = (name("amb"), name("plain"));
    create_namespace(&client, &ambient, &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)]).await?;
    create_namespace(&client, &plain, &[]).await?;
    let (caches, mut keys, run) = watch::start(client.clone(), WatchSettings::new(&node));
    let task = tokio::spawn(run);
    tokio::time::timeout(WAIT, caches.wait_synced()).await??;

    let shape = PodShape::default();
    let a = create_running_pod(&client, &ambient, "a", &node, &shape, &[ip("10.2.0.1")]).await?;
    let b = create_running_pod(&client, &plain, "b", &node, &shape, &[ip("10.2.0.2")]).await?;
    let elsewhere = create_running_pod(
        &client,
        &ambient,
        "x",
        &other_node,
        &shape,
        &[ip("10.2.0.3")],
    )
    .await?;
    let seen = expect_keys(&mut keys, &[uid(&a), uid(&b)]).await?;
    ensure!(
        caches.pod(uid(&a)).is_some() && caches.pod_by_name(&plain, "b").is_some(),
        "pods on this node are cached"
    );
    ensure!(
        caches.pod(uid(&elsewhere)).is_none() && !seen.iter().any(|k| k.uid == uid(&elsewhere)),
        "a pod on another node is neither cached nor enqueued"
    );
    let cached_ns = caches.namespace(&ambient).context("namespace cached")?;
    ensure!(
        cached_ns
            .labels()
            .get(DATAPLANE_MODE_LABEL)
            .map(String::as_str)
            == Some(MODE_AMBIENT)
    );

    // Labelling a namespace enqueues its pods, and the cache has the label by then.
    let mode = |ns: &str| {
        caches
            .namespace(ns)
            .and_then(|n| n.labels().get(DATAPLANE_MODE_LABEL).cloned())
    };
    label_namespace(&client, &plain, DATAPLANE_MODE_LABEL, Some(MODE_AMBIENT)).await?;
    expect_key_with(&mut keys, uid(&b), "the label is cached", || {
        mode(&plain).as_deref() == Some(MODE_AMBIENT)
    })
    .await?;
    label_namespace(&client, &plain, DATAPLANE_MODE_LABEL, None).await?;
    expect_key_with(&mut keys, uid(&b), "the label is gone", || {
        mode(&plain).is_none()
    })
    .await?;

    // A deleted pod's key comes once more, and the cache no longer has it.
    force_delete_pod(&client, &ambient, "a").await?;
    expect_key_with(&mut keys, uid(&a), "it is uncached", || {
        caches.pod(uid(&a)).is_none()
    })
    .await?;
    ensure!(
        caches.pods().len() == 1,
        "{:?}",
        caches
            .pods()
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    );

    let counts = caches.counts();
    ensure!(
        counts.pod_lists == 1 && counts.namespace_lists == 1 && counts.errors == 0,
        "{counts:?}"
    );
    task.abort();
    Ok(())
}

async fn redirection_annotation_through_pods_status(server: Arc<KubeServer>) -> Result<()> {
    let client = server.client().await?;
    let ns = name("annot");
    create_namespace(&client, &ns, &[]).await?;
    let shape = PodShape {
        annotations: &[("keep", "me")],
        ..Default::default()
    };
    let pod =
        create_running_pod(&client, &ns, "p", &name("node"), &shape, &[ip("10.3.0.1")]).await?;
    let key = PodKey::of(&pod).context("key")?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    for (want, shown) in [
        (Some(Redirection::Pending), Some("pending")),
        (Some(Redirection::Enabled), Some("enabled")),
        (None, None),
        // Removing what is not there is fine.
        (None, None),
    ] {
        annotate::set_redirection(&client, &key, want).await?;
        let got = pods.get("p").await?;
        let a = got.annotations();
        ensure!(
            a.get(REDIRECTION_ANNOTATION).map(String::as_str) == shown,
            "{want:?}: {a:?}"
        );
        ensure!(
            a.get("keep").map(String::as_str) == Some("me"),
            "other annotations kept: {a:?}"
        );
        ensure!(annotate::redirection_is(&got, want));
    }

    force_delete_pod(&client, &ns, "p").await?;
    annotate::set_redirection(&client, &key, None)
        .await
        .context("removing from a deleted pod is not an error")?;
    match annotate::set_redirection(&client, &key, Some(Redirection::Enabled)).await {
        Err(AnnotateError::Gone(k)) if k == key => Ok(()),
        other => bail!("annotating a deleted pod: {other:?}"),
    }
}

async fn redirection_annotation_never_lands_on_a_recreated_pod(
    server: Arc<KubeServer>,
) -> Result<()> {
    let client = server.client().await?;
    let ns = name("annot");
    create_namespace(&client, &ns, &[]).await?;
    let node = name("node");
    let old = create_running_pod(
        &client,
        &ns,
        "p",
        &node,
        &PodShape::default(),
        &[ip("10.3.1.1")],
    )
    .await?;
    let old_key = PodKey::of(&old).context("key")?;
    force_delete_pod(&client, &ns, "p").await?;
    let new = create_running_pod(
        &client,
        &ns,
        "p",
        &node,
        &PodShape::default(),
        &[ip("10.3.1.2")],
    )
    .await?;
    ensure!(uid(&new) != uid(&old));

    for state in [Some(Redirection::Enabled), None] {
        match annotate::set_redirection(&client, &old_key, state).await {
            Err(AnnotateError::Gone(_)) if state.is_some() => {}
            Ok(()) if state.is_none() => {}
            other => bail!("patching the predecessor's UID ({state:?}): {other:?}"),
        }
    }
    let got = Api::<Pod>::namespaced(client.clone(), &ns).get("p").await?;
    ensure!(
        !got.annotations().contains_key(REDIRECTION_ANNOTATION),
        "the new pod was annotated: {:?}",
        got.annotations()
    );
    Ok(())
}

async fn events_are_recorded_on_the_pod(server: Arc<KubeServer>) -> Result<()> {
    let client = server.client().await?;
    let ns = name("events");
    create_namespace(&client, &ns, &[]).await?;
    let pod = create_running_pod(
        &client,
        &ns,
        "p",
        &name("node"),
        &PodShape::default(),
        &[ip("10.4.0.1")],
    )
    .await?;
    let events = PodEvents::new(client.clone(), "test-node");
    let note = "could not find the pod's network namespace";
    events
        .warn(&pod, "Enroll", annotate::reason::ENROLL_FAILED, note)
        .await?;
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let list = api.list(&ListParams::default()).await?.items;
    ensure!(list.len() == 1, "{list:?}");
    let e = &list[0];
    ensure!(
        e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid(&pod)),
        "{e:?}"
    );
    ensure!(
        e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some(annotate::reason::ENROLL_FAILED)
    );
    ensure!(
        e.note.as_deref() == Some(note) && e.reporting_instance.as_deref() == Some("test-node")
    );

    // The same failure again is one event with a count, not a second event.
    events
        .warn(&pod, "Enroll", annotate::reason::ENROLL_FAILED, note)
        .await?;
    let list = api.list(&ListParams::default()).await?.items;
    ensure!(list.len() == 1, "{list:?}");
    ensure!(
        list[0].series.as_ref().map(|s| s.count) == Some(2),
        "{:?}",
        list[0].series
    );
    Ok(())
}

fn taint_keys(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|t| t.iter().map(|t| t.key.clone()).collect())
        .unwrap_or_default()
}

async fn startup_taint_is_removed_only_once_ready(server: Arc<KubeServer>) -> Result<()> {
    let client = server.client().await?;
    let node = name("node");
    create_node(
        &client,
        &node,
        &[
            (DEFAULT_STARTUP_TAINT, "NoSchedule"),
            ("other/taint", "NoExecute"),
        ],
    )
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let remover = tokio::spawn(node_taint::remove_when_ready(
        client.clone(),
        node.clone(),
        DEFAULT_STARTUP_TAINT.to_string(),
        async move {
            let _ = ready_rx.await;
        },
    ));
    // Not told ready: it has nothing to do but wait.
    tokio::task::yield_now().await;
    ensure!(!remover.is_finished());
    ensure!(taint_keys(&nodes.get(&node).await?).contains(&DEFAULT_STARTUP_TAINT.to_string()));

    let before = taint_keys(&nodes.get(&node).await?);
    ready_tx.send(()).ok();
    let removal = tokio::time::timeout(WAIT, remover).await??;
    ensure!(removal == Removal::Removed);
    // Everything else stays (the API server adds node.kubernetes.io/not-ready itself).
    let after = taint_keys(&nodes.get(&node).await?);
    let expected: Vec<String> = before
        .into_iter()
        .filter(|k| k != DEFAULT_STARTUP_TAINT)
        .collect();
    ensure!(
        after == expected && after.contains(&"other/taint".to_string()),
        "{after:?}"
    );
    ensure!(
        node_taint::remove_taint(&client, &node, DEFAULT_STARTUP_TAINT).await? == Removal::Absent
    );
    Ok(())
}

/// The ClusterRole and binding from `deploy/manifests/sluice.yaml`, applied as they are, let
/// the agent's service account do everything these modules do, and nothing else asked here.
async fn agent_rbac_from_deploy_is_enough(server: Arc<KubeServer>) -> Result<()> {
    let admin = server.client().await?;
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/manifests/sluice.yaml"
    ))?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&manifest)?;
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .with_context(|| format!("no {kind} in deploy/manifests/sluice.yaml"))
    };
    let role: ClusterRole = serde_json::from_value(find("ClusterRole")?)?;
    let binding: ClusterRoleBinding = serde_json::from_value(find("ClusterRoleBinding")?)?;

    // The Helm chart grants the same (its template lines aside, the role is plain YAML).
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/sluice/templates/clusterrole.yaml"
    ))?;
    let chart: String = chart
        .lines()
        .filter(|l| !l.contains("{{"))
        .map(|l| format!("{l}\n"))
        .collect();
    let chart_role: ClusterRole = serde_saphyr::from_str(&chart)?;
    ensure!(
        chart_role.rules == role.rules,
        "chart {:?} != manifest {:?}",
        chart_role.rules,
        role.rules
    );

    let post = PostParams::default();
    match Api::<ClusterRole>::all(admin.clone())
        .create(&post, &role)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {} // a rerun against a kept server
        Err(e) => return Err(e.into()),
    }
    match Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&post, &binding)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }

    let node = name("node");
    let ns = name("rbac");
    create_node(&admin, &node, &[(DEFAULT_STARTUP_TAINT, "NoSchedule")]).await?;
    create_namespace(&admin, &ns, &[]).await?;
    let pod = create_running_pod(
        &admin,
        &ns,
        "p",
        &node,
        &PodShape::default(),
        &[ip("10.5.0.1")],
    )
    .await?;
    let agent = server.client_as(User::Agent, 0).await?;

    // RBAC reaches the authorizer through its own cache, a moment after the create.
    eventually("RBAC to allow listing pods", WAIT, || {
        let agent = agent.clone();
        async move {
            Ok(Api::<Pod>::all(agent)
                .list(&ListParams::default().limit(1))
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;

    let (caches, mut keys, run) = watch::start(agent.clone(), WatchSettings::new(&node));
    let task = tokio::spawn(run);
    tokio::time::timeout(WAIT, caches.wait_synced()).await??;
    expect_keys(&mut keys, &[uid(&pod)]).await?;
    ensure!(caches.counts().errors == 0, "{:?}", caches.counts());
    task.abort();

    let key = PodKey::of(&pod).context("key")?;
    annotate::set_redirection(&agent, &key, Some(Redirection::Pending)).await?;
    annotate::set_redirection(&agent, &key, None).await?;
    let events = PodEvents::new(agent.clone(), node.clone());
    events
        .warn(&pod, "Enroll", annotate::reason::ENROLL_FAILED, "first")
        .await?;
    events
        .warn(&pod, "Enroll", annotate::reason::ENROLL_FAILED, "again")
        .await?;
    ensure!(
        node_taint::remove_taint(&agent, &node, DEFAULT_STARTUP_TAINT).await? == Removal::Removed
    );

    // And not more than that.
    let pods: Api<Pod> = Api::namespaced(agent.clone(), &ns);
    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(()),
        other => bail!("{what}: expected 403, got {other:?}"),
    };
    let spec_patch = json!({"metadata": {"labels": {"x": "y"}}});
    forbidden(
        pods.patch("p", &PatchParams::default(), &Patch::Merge(&spec_patch))
            .await
            .map(drop),
        "patching a pod",
    )?;
    forbidden(
        pods.delete("p", &DeleteParams::default()).await.map(drop),
        "deleting a pod",
    )?;
    forbidden(
        Api::<Secret>::namespaced(agent.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map(drop),
        "listing secrets",
    )?;
    forbidden(
        Api::<Namespace>::all(agent.clone())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&spec_patch))
            .await
            .map(drop),
        "labelling a namespace",
    )?;
    Ok(())
}
