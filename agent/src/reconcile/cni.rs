//! sluice-cni's requests in Kubernetes mode. They change nothing themselves: ADD matches the
//! pod to its Kubernetes object, takes the same decision as the watcher, records the sandbox
//! and waits for the worker's run for that pod; DEL and GC mark the sandbox gone and let the
//! worker act. So a CNI ADD and the watcher can never race each other into a double enroll.
use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Outcome, Reconciler, SandboxHint};
use crate::{
    agent::AgentError,
    control::api::{
        CniAddReply, CniAddRequest, CniDelReply, CniDelRequest, CniGcReply, EnrollReply,
    },
    k8s::policy::{DATAPLANE_MODE_LABEL, MODE_AMBIENT},
    policy::{Decision, Skip},
    zds::AckState,
};

/// How long DEL and GC wait for the pod to be let go (they succeed either way).
const DEL_WAIT: Duration = Duration::from_secs(5);
/// What a CNI ADD may take when the plugin does not say (its default timeout is 15 s).
const DEFAULT_BUDGET: Duration = Duration::from_secs(11);

impl Reconciler {
    /// ADD: enrolled when this returns `Enrolled` (ztunnel may not have acknowledged yet).
    pub async fn cni_add(&self, req: CniAddRequest) -> Result<CniAddReply, AgentError> {
        let started = Instant::now();
        let ns = &req.pod.namespace;
        let policy = &self.agent.settings().policy;
        if policy.settings().exclude_namespaces.contains(ns) || req.exclude_namespaces.contains(ns)
        {
            return Ok(skipped(Skip::ExcludedNamespace.as_str()));
        }
        // Leave the plugin time to hear the answer.
        let budget = req
            .timeout_ms
            .map(|t| Duration::from_millis(t.saturating_mul(3) / 4))
            .unwrap_or(DEFAULT_BUDGET);
        let lookup = self.settings.cni_pod_lookup.min(budget);
        let Some(pod) = self.find_pod(&req, started + lookup).await else {
            return self.unknown_pod(&req, lookup);
        };
        let namespace = self.caches.namespace(ns).ok_or_else(|| {
            AgentError::Unavailable(format!("namespace {ns} is not in the agent's cache yet"))
        })?;
        if let Decision::Skip(s) = policy.decide(&pod, &namespace) {
            return Ok(skipped(s.as_str()));
        }
        if req.ips.is_empty() {
            return Err(AgentError::Invalid(
                "prevResult has no address inside the pod: sluice-cni must be chained after the plugin that assigns the pod's IPs".into(),
            ));
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.sandboxes().insert(
            uid.clone(),
            SandboxHint {
                container_id: req.container_id.clone(),
                netns: req.netns.clone(),
                ips: req.ips.clone(),
                deleted: false,
            },
        );
        let wait = budget.saturating_sub(started.elapsed());
        let outcome = tokio::time::timeout(wait, self.queue.add_waiting(&uid)).await;
        // The table is the truth: enrolled in this sandbox's netns, whatever else happened
        // (e.g. the annotation patch failed and will be retried).
        if let Some(record) = self.agent.pod_record(&uid)
            && record.container_id.as_deref() == Some(req.container_id.as_str())
        {
            let reply = match outcome {
                Ok(Ok(Outcome::Enrolled(Some(reply)))) => reply,
                _ => EnrollReply {
                    uid: uid.clone(),
                    netns_cookie: record.netns_cookie,
                    ztunnel: self.agent.hub.state(&uid).unwrap_or(AckState::Pending),
                    already_enrolled: true,
                    enroll_us: None,
                },
            };
            info!(uid, namespace = %ns, pod = %req.pod.name, container = %req.container_id,
                ztunnel = ?reply.ztunnel, "CNI ADD: pod enrolled");
            return Ok(CniAddReply::Enrolled(reply));
        }
        match outcome {
            Ok(Ok(Outcome::Skipped(reason))) => Ok(skipped(&reason)),
            Ok(Ok(Outcome::Failed(e) | Outcome::Waiting(e))) => Err(AgentError::Unavailable(e)),
            Ok(Ok(Outcome::Enrolled(_))) => Err(AgentError::Unavailable(
                "the pod is enrolled in another network namespace than this sandbox's".into(),
            )),
            Ok(Err(_)) => Err(AgentError::ShuttingDown),
            Err(_) => Err(AgentError::Unavailable(format!(
                "the pod's enrollment did not finish within {wait:?}"
            ))),
        }
    }

    /// The cached pod the request names, waiting for the cache to catch up until `deadline`.
    /// With `K8S_POD_UID` a pod of the same name but another UID (deleted and re-created) is
    /// not it.
    async fn find_pod(&self, req: &CniAddRequest, deadline: Instant) -> Option<Arc<Pod>> {
        let mut changed = self.cache_changed.subscribe();
        let want_uid = req.pod.uid.as_deref().filter(|u| !u.is_empty());
        let mut first = true;
        loop {
            if let Some(pod) = self
                .caches
                .pod_by_name(&req.pod.namespace, &req.pod.name)
                .filter(|p| want_uid.is_none_or(|u| p.metadata.uid.as_deref() == Some(u)))
            {
                return Some(pod);
            }
            if std::mem::take(&mut first) {
                info!(namespace = %req.pod.namespace, pod = %req.pod.name,
                    "CNI ADD: the pod is not in the cache yet; waiting for it");
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return None },
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// A pod the cache never showed: it must not start un-redirected if its namespace is
    /// ambient (the runtime retries a failed ADD); otherwise it passes. (A pod that opts in
    /// by its own label is then enrolled live once the cache has it.)
    fn unknown_pod(
        &self,
        req: &CniAddRequest,
        waited: Duration,
    ) -> Result<CniAddReply, AgentError> {
        let (ns, name) = (&req.pod.namespace, &req.pod.name);
        match self.caches.namespace(ns) {
            Some(n)
                if n.labels().get(DATAPLANE_MODE_LABEL).map(String::as_str)
                    == Some(MODE_AMBIENT) =>
            {
                Err(AgentError::Unavailable(format!(
                    "pod {ns}/{name} is not in the agent's cache after {waited:?}, and its namespace is ambient"
                )))
            }
            Some(_) => {
                warn!(namespace = %ns, pod = %name, "CNI ADD for a pod the cache does not show; its namespace is not ambient: passing it");
                Ok(skipped("unknown pod, namespace not ambient"))
            }
            None => Err(AgentError::Unavailable(format!(
                "namespace {ns} of pod {name} is not in the agent's cache"
            ))),
        }
    }

    /// DEL: the sandbox is going away; the worker lets go of its netns. Always succeeds.
    pub async fn cni_del(&self, req: CniDelRequest) -> CniDelReply {
        let Some(uid) = self.sandbox_gone(&req.container_id, req.pod.and_then(|p| p.uid)) else {
            return CniDelReply { unenrolled: None };
        };
        let was = self.agent.pod_record(&uid).is_some();
        let _ = tokio::time::timeout(DEL_WAIT, self.queue.add_waiting(&uid)).await;
        let unenrolled = (was && self.agent.pod_record(&uid).is_none()).then_some(uid);
        if let Some(uid) = &unenrolled {
            info!(uid, container = %req.container_id, "CNI DEL: pod unenrolled");
        }
        CniDelReply { unenrolled }
    }

    /// GC: sandboxes the runtime no longer lists are gone.
    pub async fn cni_gc(&self, valid: Vec<String>) -> CniGcReply {
        let gone: Vec<String> = self
            .agent
            .cni_containers()
            .into_iter()
            .filter(|(_, c)| !valid.contains(c))
            .filter_map(|(uid, c)| self.sandbox_gone(&c, Some(uid)))
            .collect();
        let waits = gone.iter().map(|uid| self.queue.add_waiting(uid));
        let _ = tokio::time::timeout(DEL_WAIT, futures_util::future::join_all(waits)).await;
        CniGcReply {
            unenrolled: gone
                .into_iter()
                .filter(|uid| self.agent.pod_record(uid).is_none())
                .collect(),
        }
    }

    /// CHECK: a pod that must be enrolled is, by this sandbox.
    pub fn cni_check(&self, req: &CniAddRequest) -> Result<(), AgentError> {
        let Some(pod) = self.caches.pod_by_name(&req.pod.namespace, &req.pod.name) else {
            return Ok(());
        };
        let Some(ns) = self.caches.namespace(&req.pod.namespace) else {
            return Ok(());
        };
        if let Decision::Skip(_) = self.agent.settings().policy.decide(&pod, &ns) {
            return Ok(());
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        match self.agent.pod_record(&uid) {
            Some(r) if r.container_id.as_deref() == Some(req.container_id.as_str()) => Ok(()),
            _ => Err(AgentError::NotEnrolled(format!(
                "{}/{} (container {})",
                req.pod.namespace, req.pod.name, req.container_id
            ))),
        }
    }

    /// Marks `container`'s sandbox gone and returns the pod it was for, if it is one we know:
    /// the pod's latest sandbox, or the one its enrollment is for. A DEL of an older sandbox
    /// of the pod changes nothing.
    fn sandbox_gone(&self, container: &str, uid: Option<String>) -> Option<String> {
        let uid = uid.filter(|u| !u.is_empty()).or_else(|| {
            self.agent
                .cni_containers()
                .into_iter()
                .find(|(_, c)| c == container)
                .map(|(uid, _)| uid)
        })?;
        let mut sandboxes = self.sandboxes();
        match sandboxes.get_mut(&uid) {
            Some(h) if h.container_id == container => h.deleted = true,
            Some(_) => {}
            None => {
                let owns = self
                    .agent
                    .pod_record(&uid)
                    .is_some_and(|r| r.container_id.as_deref() == Some(container));
                if owns {
                    sandboxes.insert(
                        uid.clone(),
                        SandboxHint {
                            container_id: container.to_string(),
                            netns: Default::default(),
                            ips: Vec::new(),
                            deleted: true,
                        },
                    );
                }
            }
        }
        Some(uid)
    }
}

fn skipped(reason: &str) -> CniAddReply {
    CniAddReply::Skipped {
        reason: reason.to_string(),
    }
}
