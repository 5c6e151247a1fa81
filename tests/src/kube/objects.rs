//! Building and changing the objects tests need, the way a kubelet-less cluster allows.
use std::{collections::BTreeMap, future::Future, net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Container, Namespace, Node, NodeSpec, Pod, PodSpec, Taint};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::harness::unique;

/// `prefix-<unique>`, valid as a namespace, pod or node name.
pub fn name(prefix: &str) -> String {
    unique(&format!("{prefix}-"))
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

pub async fn create_namespace(
    client: &Client,
    name: &str,
    label: &[(&str, &str)],
) -> Result<Namespace> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: labels(label),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))
}

/// Sets (`Some`) or removes (`None`) one label of a namespace.
pub async fn label_namespace(
    client: &Client,
    name: &str,
    key: &str,
    value: Option<&str>,
) -> Result<()> {
    let patch = json!({"metadata": {"labels": {key: value}}});
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("labelling namespace {name}"))?;
    Ok(())
}

/// A Node object (no kubelet behind it) with the given `(key, effect)` taints.
pub async fn create_node(client: &Client, name: &str, taints: &[(&str, &str)]) -> Result<Node> {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(key, effect)| Taint {
                        key: key.to_string(),
                        effect: effect.to_string(),
                        value: Some("true".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating node {name}"))
}

/// What a test pod looks like; everything else is a one-container pod.
#[derive(Debug, Clone, Default)]
pub struct PodShape<'a> {
    pub labels: &'a [(&'a str, &'a str)],
    pub annotations: &'a [(&'a str, &'a str)],
    pub host_network: bool,
    /// Container names (default: one, `app`).
    pub containers: &'a [&'a str],
}

/// Creates a pod bound to `node` (as the scheduler would), then gives it the status a kubelet
/// would report once it runs: phase Running and `ips`.
pub async fn create_running_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    shape: &PodShape<'_>,
    ips: &[IpAddr],
) -> Result<Pod> {
    create_pod(client, namespace, name, node, shape).await?;
    set_pod_status(client, namespace, name, "Running", ips).await
}

/// Creates a pod bound to `node`, with no status yet (Pending, as before its sandbox exists).
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    shape: &PodShape<'_>,
) -> Result<Pod> {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: labels(shape.labels),
            annotations: labels(shape.annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            host_network: shape.host_network.then_some(true),
            containers: if shape.containers.is_empty() {
                &["app"][..]
            } else {
                shape.containers
            }
            .iter()
            .map(|name| Container {
                name: name.to_string(),
                image: Some("registry.invalid/app".into()),
                ..Default::default()
            })
            .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {namespace}/{name}"))
}

/// Patches a pod's status as a kubelet would.
pub async fn set_pod_status(
    client: &Client,
    namespace: &str,
    name: &str,
    phase: &str,
    ips: &[IpAddr],
) -> Result<Pod> {
    let ip_list: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let patch = json!({"status": {
        "phase": phase,
        "podIP": ips.first().map(|ip| ip.to_string()),
        "podIPs": ip_list,
    }});
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting the status of pod {namespace}/{name}"))
}

/// Deletes a pod at once: with no kubelet, a graceful delete would leave it Terminating.
pub async fn force_delete_pod(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &params)
        .await
        .with_context(|| format!("deleting pod {namespace}/{name}"))?;
    Ok(())
}

/// Polls `check` every 20 ms until it yields a value. For state the API only exposes by
/// reading it again (another client's view, a Node's taints); where a stream of changes
/// exists, wait on that instead.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
