//! What the agent does for sluice-cni's requests (control socket ops `cni_*`). Standalone:
//! decide with the enrollment policy, then enroll or let go through the same `Agent`
//! operations as the CLI. Kubernetes mode: hand the request to the reconciler, the only one
//! that changes the dataplane there.
use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    agent::{Agent, AgentError},
    control::api::{
        CniAddReply, CniAddRequest, CniDelReply, CniDelRequest, CniGcReply, CniStatusReply,
        EnrollRequest,
    },
    policy::{self, Decision},
    reconcile::Reconciler,
};

/// ADD: enroll the pod if the policy says so. Redirection is in place when this returns
/// `Enrolled`, even if ztunnel has not acknowledged yet (it gets the pod when it connects).
pub async fn add(
    agent: &Arc<Agent>,
    kube: Option<&Reconciler>,
    req: CniAddRequest,
) -> Result<CniAddReply, AgentError> {
    if let Some(r) = kube {
        return r.cni_add(req).await;
    }
    match standalone_decision(agent, &req)? {
        Decision::Skip(s) => {
            return Ok(CniAddReply::Skipped {
                reason: format!("namespace {}: {}", req.pod.namespace, s.as_str()),
            });
        }
        Decision::Enroll(_) => {}
    }
    if req.ips.is_empty() {
        return Err(AgentError::Invalid(
            "prevResult has no address inside the pod: sluice-cni must be chained after the plugin that assigns the pod's IPs".into(),
        ));
    }
    // Leave the plugin time to hear the answer: wait for ztunnel at most half its timeout.
    let ack_wait = agent.settings().ack_wait;
    let wait = req
        .timeout_ms
        .map(|t| Duration::from_millis(t / 2).min(ack_wait))
        .unwrap_or(ack_wait);
    let enroll = EnrollRequest {
        uid: policy::pod_uid(&req),
        name: req.pod.name.clone(),
        namespace: req.pod.namespace.clone(),
        service_account: String::new(),
        netns: req.netns.clone(),
        ips: req.ips.clone(),
        dns_capture: None,
        bypass_inbound: false,
        wait_ms: Some(wait.as_millis() as u64),
        container_id: Some(req.container_id.clone()),
    };
    let reply = agent.enroll(enroll).await?;
    info!(uid = %reply.uid, namespace = %req.pod.namespace, pod = %req.pod.name,
        container = %req.container_id, ztunnel = ?reply.ztunnel, "CNI ADD: pod enrolled");
    Ok(CniAddReply::Enrolled(reply))
}

/// The decision for a CNI ADD without a cluster.
fn standalone_decision(agent: &Agent, req: &CniAddRequest) -> Result<Decision, AgentError> {
    agent
        .settings()
        .policy
        .decide_cni(req)
        .ok_or_else(|| AgentError::Unavailable("the agent is not watching Kubernetes yet".into()))
}

/// CHECK: a pod that must be enrolled is enrolled, by this sandbox.
pub fn check(
    agent: &Arc<Agent>,
    kube: Option<&Reconciler>,
    req: &CniAddRequest,
) -> Result<(), AgentError> {
    if let Some(r) = kube {
        return r.cni_check(req);
    }
    if let Decision::Skip(_) = standalone_decision(agent, req)? {
        return Ok(());
    }
    if agent
        .cni_containers()
        .iter()
        .any(|(_, c)| *c == req.container_id)
    {
        Ok(())
    } else {
        Err(AgentError::NotEnrolled(format!(
            "{}/{} (container {})",
            req.pod.namespace, req.pod.name, req.container_id
        )))
    }
}

/// DEL: let go of what this container's ADD enrolled. Nothing enrolled is not an error.
pub async fn del(
    agent: &Arc<Agent>,
    kube: Option<&Reconciler>,
    req: CniDelRequest,
) -> Result<CniDelReply, AgentError> {
    if let Some(r) = kube {
        return Ok(r.cni_del(req).await);
    }
    let unenrolled = agent.unenroll_container(req.container_id.clone()).await?;
    if let Some(uid) = &unenrolled {
        info!(uid, container = %req.container_id, "CNI DEL: pod unenrolled");
    }
    Ok(CniDelReply { unenrolled })
}

/// GC: let go of CNI enrollments whose sandbox the runtime no longer lists. Pods enrolled by
/// hand are not the runtime's, and are left alone.
pub async fn gc(agent: &Arc<Agent>, kube: Option<&Reconciler>, valid: Vec<String>) -> CniGcReply {
    if let Some(r) = kube {
        return r.cni_gc(valid).await;
    }
    let mut unenrolled = Vec::new();
    for (uid, container) in agent.cni_containers() {
        if valid.contains(&container) {
            continue;
        }
        match agent.unenroll_container(container.clone()).await {
            Ok(Some(uid)) => {
                info!(uid, container, "CNI GC: pod unenrolled");
                unenrolled.push(uid);
            }
            Ok(None) => {}
            Err(e) => warn!(uid, container, error = %e, "CNI GC: unenrolling"),
        }
    }
    CniGcReply { unenrolled }
}

pub fn status(agent: &Arc<Agent>) -> CniStatusReply {
    CniStatusReply {
        ready: agent.is_ready(),
    }
}
