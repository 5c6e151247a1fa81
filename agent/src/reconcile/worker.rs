//! One run for one pod: read what it should be and what it is, take the steps [`plan`] gives
//! one at a time (looking again after each), then bring the annotation in line.
use std::{net::IpAddr, os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt as _;
use tracing::{debug, warn};

use super::{
    Outcome, Reconciler, lock,
    netns_finder::Found,
    plan::{self, Desired, Enrolled, Facts, Options, Step},
    queue::Job,
};
use crate::{
    agent::AgentError,
    control::api::{EnrollReply, EnrollRequest},
    k8s::{
        self,
        annotate::{self, AnnotateError, Redirection, reason},
        procscan::PodToFind,
        watch::PodKey,
    },
    policy::Decision,
    recovery,
    zds::AckState,
};

/// Steps one run may take before it gives the key back (a plan always converges in fewer;
/// this only bounds a bug).
const MAX_STEPS: usize = 4;
/// Failed attempts to find a running pod's netns before an Event says so.
const NOT_FOUND_EVENT_AFTER: u32 = 3;

/// What a run looks at: the cached objects and the plan's facts.
pub(super) struct Seen {
    pub(super) pod: Option<Arc<Pod>>,
    pub(super) namespace: Option<Arc<Namespace>>,
    pub(super) decision: Option<Decision>,
    pub(super) facts: Facts,
}

/// How a step ended when it did not fail.
enum Applied {
    Done { fresh: Option<EnrollReply> },
    Wait(String),
}

struct Failure {
    message: String,
}

impl Reconciler {
    pub(super) async fn work(self: Arc<Self>, job: Job<Outcome>) {
        let (outcome, retry) = self.reconcile(&job.uid, job.failures).await;
        match &outcome {
            Outcome::Failed(e) => {
                warn!(uid = %job.uid, error = %e, attempt = job.failures + 1, "reconciling a pod")
            }
            o => debug!(uid = %job.uid, outcome = ?o, "reconciled"),
        }
        self.queue.done(job, outcome, retry);
    }

    /// One run for one pod: steps until the plan has none left, then the annotation.
    pub(super) async fn reconcile(&self, uid: &str, failures: u32) -> (Outcome, bool) {
        let mut fresh: Option<EnrollReply> = None;
        let mut waiting = None;
        let mut failed = None;
        let mut seen = self.look(uid);
        for _ in 0..MAX_STEPS {
            let Some(step) = plan::next_step(&seen.facts) else {
                break;
            };
            debug!(uid, ?step, "reconcile step");
            let applied = self.apply(uid, &seen, step, failures).await;
            seen = self.look(uid);
            match applied {
                Ok(Applied::Done { fresh: f }) => {
                    if f.is_some() {
                        fresh = f;
                    }
                }
                Ok(Applied::Wait(why)) => {
                    waiting = Some(why);
                    break;
                }
                Err(f) => {
                    failed = Some(f.message);
                    break;
                }
            }
        }
        // Whatever happened, the annotation says what is true now.
        let annotated = self.annotate(uid, &seen, fresh.as_ref()).await;
        if let Some(message) = failed.or(annotated.err().map(|f| f.message)) {
            let outcome = Outcome::Failed(message);
            self.report(&seen, &outcome);
            return (outcome, true);
        }
        let enrolled = seen.facts.enrolled.is_some();
        let (outcome, retry) = match (&seen.facts.desired, enrolled, waiting) {
            (_, true, _) => (Outcome::Enrolled(fresh), false),
            (Desired::Unknown, false, _) => (
                Outcome::Waiting("the pod's namespace is not cached yet".into()),
                true,
            ),
            (_, false, Some(why)) => (Outcome::Waiting(why), false),
            (Desired::In(_), false, None) => (
                Outcome::Waiting("waiting for the pod's next sandbox (CNI ADD)".into()),
                false,
            ),
            (Desired::Out, false, None) => (
                Outcome::Skipped(match seen.decision {
                    Some(Decision::Skip(s)) => s.as_str().to_string(),
                    _ => "gone from this node".to_string(),
                }),
                false,
            ),
        };
        self.report(&seen, &outcome);
        if seen.pod.is_none() && !enrolled {
            self.forget(uid);
        }
        (outcome, retry)
    }

    /// Everything a run decides from, read now.
    fn look(&self, uid: &str) -> Seen {
        let pod = self.caches.pod(uid);
        let namespace = pod
            .as_ref()
            .and_then(|p| p.metadata.namespace.as_deref())
            .and_then(|ns| self.caches.namespace(ns));
        let policy = &self.agent.settings().policy;
        let decision = match (&pod, &namespace) {
            (Some(p), Some(ns)) => Some(policy.decide(p, ns)),
            _ => None,
        };
        let desired = match (&pod, decision) {
            (None, _) => Desired::Out,
            (Some(_), None) => Desired::Unknown,
            (Some(_), Some(Decision::Skip(_))) => Desired::Out,
            (Some(_), Some(Decision::Enroll(o))) => Desired::In(Options {
                dns_capture: o.dns_capture.unwrap_or(self.agent.settings().dns_capture),
                bypass_inbound: o.bypass_inbound,
            }),
        };
        let enrolled = self.agent.pod_record(uid).map(|r| Enrolled {
            options: Options {
                dns_capture: r.dns_capture,
                bypass_inbound: r.bypass_inbound,
            },
            netns_inode: r.netns_inode,
            netns_live: recovery::names_its_netns(&r),
            container_id: r.container_id,
        });
        let sandbox = self.sandboxes().get(uid).map(|h| plan::Sandbox {
            container_id: h.container_id.clone(),
            netns_inode: std::fs::metadata(&h.netns).ok().map(|m| m.ino()),
            deleted: h.deleted,
        });
        Seen {
            pod,
            namespace,
            decision,
            facts: Facts {
                desired,
                enrolled,
                sandbox,
            },
        }
    }

    async fn apply(
        &self,
        uid: &str,
        seen: &Seen,
        step: Step,
        failures: u32,
    ) -> Result<Applied, Failure> {
        match step {
            Step::EnrollSandbox(o) => {
                let pod = seen.pod.as_deref().ok_or_else(|| fail("the pod is gone"))?;
                let hint = self
                    .sandboxes()
                    .get(uid)
                    .cloned()
                    .ok_or_else(|| fail("the pod's sandbox is no longer known"))?;
                let req =
                    self.enroll_request(pod, o, hint.netns, hint.ips, Some(hint.container_id));
                self.enroll(pod, req).await
            }
            Step::EnrollScanned(o) => {
                let pod = seen.pod.as_deref().ok_or_else(|| fail("the pod is gone"))?;
                self.enroll_scanned(uid, pod, seen, o, failures).await
            }
            Step::Update(o) => {
                self.agent
                    .update_options(uid.to_string(), o.dns_capture, o.bypass_inbound)
                    .await
                    .map_err(|e| fail(format!("updating the pod's options: {e}")))?;
                Ok(Applied::Done { fresh: None })
            }
            Step::Unenroll => match self.agent.unenroll(uid.to_string()).await {
                Ok(()) | Err(AgentError::NotEnrolled(_)) => Ok(Applied::Done { fresh: None }),
                Err(e) => {
                    let message = format!("un-enrolling the pod: {e}");
                    if let Some(pod) = seen.pod.as_deref() {
                        self.warn(pod, "Unenroll", reason::UNENROLL_FAILED, &message)
                            .await;
                    }
                    Err(fail(message))
                }
            },
        }
    }

    async fn enroll_scanned(
        &self,
        uid: &str,
        pod: &Pod,
        seen: &Seen,
        o: Options,
        failures: u32,
    ) -> Result<Applied, Failure> {
        let ips = match k8s::pod_ips(pod) {
            Ok(ips) => ips,
            Err(e) => {
                let message = e.to_string();
                self.warn(pod, "Enroll", reason::ENROLL_FAILED, &message)
                    .await;
                return Err(fail(message));
            }
        };
        if ips.is_empty() {
            return Ok(Applied::Wait(
                "the pod has no IP yet (its CNI ADD has not finished)".into(),
            ));
        }
        let found = self
            .finder
            .find(PodToFind {
                uid: uid.to_string(),
                ips: ips.clone(),
            })
            .await
            .map_err(fail)?;
        let netns = match found {
            Found::Netns(n) => n,
            Found::Nothing(refused) => {
                if seen.facts.enrolled.is_some() {
                    // Enrolled in a netns that is gone, and none to be found: let it go.
                    self.agent
                        .unenroll(uid.to_string())
                        .await
                        .map_err(|e| fail(format!("letting go of a vanished netns: {e}")))?;
                }
                let message = match refused.first() {
                    Some(r) => format!(
                        "refused the network namespace of process {}: it lacks the pod's IPs {:?} (it holds {:?})",
                        r.pid, r.missing, r.held
                    ),
                    None => "no process of the pod runs on this node (its network namespace was not found in /proc)".to_string(),
                };
                if !refused.is_empty() || failures + 1 >= NOT_FOUND_EVENT_AFTER {
                    self.warn(pod, "Enroll", reason::ENROLL_FAILED, &message)
                        .await;
                }
                return Err(fail(message));
            }
        };
        let req = self.enroll_request(pod, o, netns.path.clone(), ips, None);
        // `netns.netns` stays open until enrolled: the namespace cannot be recycled meanwhile.
        let applied = self.enroll(pod, req).await;
        drop(netns);
        applied
    }

    fn enroll_request(
        &self,
        pod: &Pod,
        o: Options,
        netns: PathBuf,
        ips: Vec<IpAddr>,
        container_id: Option<String>,
    ) -> EnrollRequest {
        EnrollRequest {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            name: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            netns,
            ips,
            dns_capture: Some(o.dns_capture),
            bypass_inbound: o.bypass_inbound,
            wait_ms: Some(self.agent.settings().ack_wait.as_millis() as u64),
            container_id,
        }
    }

    async fn enroll(&self, pod: &Pod, req: EnrollRequest) -> Result<Applied, Failure> {
        match self.agent.enroll(req).await {
            Ok(reply) => Ok(Applied::Done {
                fresh: (!reply.already_enrolled).then_some(reply),
            }),
            Err(e) => {
                let message = format!("enrolling the pod: {e}");
                if !matches!(e, AgentError::ShuttingDown) {
                    self.warn(pod, "Enroll", reason::ENROLL_FAILED, &message)
                        .await;
                }
                Err(fail(message))
            }
        }
    }

    /// Brings the annotation in line with what the pod is now.
    async fn annotate(
        &self,
        uid: &str,
        seen: &Seen,
        fresh: Option<&EnrollReply>,
    ) -> Result<(), Failure> {
        let Some(pod) = seen.pod.as_deref() else {
            return Ok(());
        };
        if matches!(seen.facts.desired, Desired::Unknown) {
            return Ok(());
        }
        let acked = self.agent.hub.state(uid) == Some(AckState::Acked);
        let want = plan::annotation(
            seen.facts.enrolled.is_some(),
            acked,
            fresh.is_some(),
            Redirection::of(pod),
        );
        if annotate::redirection_is(pod, want) {
            return Ok(());
        }
        let Some(key) = PodKey::of(pod) else {
            return Ok(());
        };
        match annotate::set_redirection(&self.client, &key, want).await {
            // Deleted meanwhile: its key comes again, with nothing left to annotate.
            Ok(()) | Err(AnnotateError::Gone(_)) => Ok(()),
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// A pod gone from the cluster and the dataplane: nothing is kept about it.
    fn forget(&self, uid: &str) {
        self.sandboxes().remove(uid);
        lock(&self.reports).remove(uid);
        lock(&self.warned).retain(|(u, _), _| u != uid);
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
    }
}
