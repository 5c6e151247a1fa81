//! The node readiness taint: a node pool creates its nodes with a startup taint (default
//! `cni.istio.io/not-ready`, the key Istio's own untaint controller uses, so node pools set up
//! for istio-cni need no change), which keeps ordinary pods off the node. The agent tolerates
//! it, and removes it once it can enroll pods there, so no ambient pod is ever scheduled onto
//! a node where it could not be redirected.
//!
//! Removal is an optimistic update: the taint list is patched together with the node's
//! `resourceVersion`, so a concurrent change (the node controller adds and removes its own
//! taints all the time) makes the server answer 409 Conflict and we read and try again,
//! instead of writing back a stale list.
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tracing::{info, warn};

/// Istio's startup taint key (`PILOT_NODE_UNTAINT_CONTROLLERS_TAINT_NAME`'s default).
pub const DEFAULT_STARTUP_TAINT: &str = "cni.istio.io/not-ready";

/// Conflicts in a row before giving up on one attempt (each re-reads the node).
const CONFLICT_RETRIES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// The node did not carry the taint (already removed, or never set).
    Absent,
}

/// Removes every taint with key `key` from node `node`, keeping all others.
pub async fn remove_taint(client: &Client, node: &str, key: &str) -> Result<Removal, kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut attempt = 0;
    loop {
        let current = api.get(node).await?;
        let taints: Vec<Taint> = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let kept: Vec<&Taint> = taints.iter().filter(|t| t.key != key).collect();
        if kept.len() == taints.len() {
            return Ok(Removal::Absent);
        }
        let patch = json!({
            "metadata": { "resourceVersion": current.metadata.resource_version },
            "spec": { "taints": kept },
        });
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(node, taint = key, "startup taint removed");
                return Ok(Removal::Removed);
            }
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < CONFLICT_RETRIES => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for `ready`, then removes the taint, retrying failures (API down, RBAC not yet
/// granted) with backoff until it succeeds. Spawn it; dropping it stops it.
pub async fn remove_when_ready(
    client: Client,
    node: String,
    key: String,
    ready: impl Future<Output = ()>,
) -> Removal {
    ready.await;
    let mut wait = Duration::from_millis(200);
    loop {
        match remove_taint(&client, &node, &key).await {
            Ok(r) => return r,
            Err(e) => {
                warn!(node, taint = key, error = %e, retry_in = ?wait, "removing the startup taint");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}
