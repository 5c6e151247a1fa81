//! What the reconciler tells people: its conclusion per pod (`sluice-agent status`), and
//! Warning Events on pods for what a person must act on.
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use serde::Serialize;
use tracing::warn;

use super::{Outcome, Reconciler, lock, worker::Seen};
use crate::k8s::{annotate::reason, policy::ignored_annotations, watch::WatchCounts};

/// What the reconciler last concluded about a pod (`sluice-agent status`).
#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `enrolled`, `skipped`, `waiting` or `failed`.
    pub state: &'static str,
    pub reason: String,
    /// The `resourceVersion`s the decision was made from.
    pub pod_version: Option<String>,
    pub namespace_version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReconcilerStatus {
    pub node: String,
    pub watch: WatchStatus,
    pub queued: usize,
    pub pods: Vec<PodReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchStatus {
    pub pod_lists: u64,
    pub namespace_lists: u64,
    pub errors: u64,
}

impl From<WatchCounts> for WatchStatus {
    fn from(c: WatchCounts) -> Self {
        WatchStatus {
            pod_lists: c.pod_lists,
            namespace_lists: c.namespace_lists,
            errors: c.errors,
        }
    }
}

impl Reconciler {
    pub fn status(&self) -> ReconcilerStatus {
        ReconcilerStatus {
            node: self.settings.node_name.clone(),
            watch: self.caches.counts().into(),
            queued: self.queue.in_progress(),
            pods: lock(&self.reports).values().cloned().collect(),
        }
    }

    pub(super) fn report(&self, seen: &Seen, outcome: &Outcome) {
        let Some(pod) = &seen.pod else { return };
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let (state, reason) = match outcome {
            Outcome::Enrolled(_) => ("enrolled", String::new()),
            Outcome::Skipped(r) => ("skipped", r.clone()),
            Outcome::Waiting(r) => ("waiting", r.clone()),
            Outcome::Failed(r) => ("failed", r.clone()),
        };
        let report = PodReport {
            uid: uid.clone(),
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            state,
            reason,
            pod_version: pod.resource_version(),
            namespace_version: seen.namespace.as_ref().and_then(|n| n.resource_version()),
        };
        lock(&self.reports).insert(uid, report);
    }

    /// A Warning Event on the pod, unless the last one for this reason said the same.
    pub(super) async fn warn(&self, pod: &Pod, action: &str, reason: &'static str, note: &str) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        {
            let mut warned = lock(&self.warned);
            let key = (uid, reason);
            if warned.get(&key).map(String::as_str) == Some(note) {
                return;
            }
            warned.insert(key, note.to_string());
        }
        if let Err(e) = self.events.warn(pod, action, reason, note).await {
            warn!(pod = %pod.name_any(), error = %e, "recording an Event");
        }
    }

    /// Ignored annotation values (not booleans) get one Event per pod and value.
    pub(super) async fn check_annotations(&self, pod: &Pod) {
        let ignored = ignored_annotations(pod);
        if ignored.is_empty() {
            return;
        }
        let note = ignored
            .iter()
            .map(|(k, v)| format!("{k}={v:?} is not a boolean and was ignored"))
            .collect::<Vec<_>>()
            .join("; ");
        self.warn(pod, "Enroll", reason::BAD_ANNOTATION, &note)
            .await;
    }
}
