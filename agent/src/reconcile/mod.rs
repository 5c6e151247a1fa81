//! Kubernetes mode: one reconciler, keyed by pod UID, that keeps the dataplane, ztunnel and each
//! pod's `ambient.istio.io/redirection` annotation in line with Istio's labels (in the spirit
//! of ztunnel's `inpod/statemanager.rs` and kube-runtime controllers).
//!
//! - Desired state: the caches of this node's pods and all namespaces (`k8s::watch`), decided
//!   by `policy` (Istio's rules); for a pod whose CNI ADD arrived, the sandbox it announced.
//! - Actual state: the agent's pod table (dataplane and persisted record), ztunnel's ACKs (the
//!   ZDS hub) and the annotation as cached.
//! - Every change enqueues the pod's UID ([`queue`]): the watches, CNI ADD/DEL/GC, ztunnel's
//!   ACKs, and a periodic resync of every key. A worker takes one UID, asks [`plan`] for the
//!   next step, applies it through the agent's idempotent operations (whose per-pod lock keeps
//!   the same pod serial; different pods run in parallel), and repeats until there is nothing
//!   left; then it patches the annotation. Failures are retried with backoff per key.
//! - Nothing else changes the dataplane in this mode: the control socket refuses hand-made
//!   enrollments, CNI requests go through here ([`cni`]).
//!
//! Start-up (see [`Reconciler::initial_sync`]): the pod table is restored first
//! (`Agent::start`), then the caches fill, then every key is reconciled once; only then is
//! ztunnel served its snapshot and the agent ready.
pub mod cni;
mod netns_finder;
pub mod plan;
pub mod queue;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Client, ResourceExt as _};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    agent::{Agent, AgentError},
    control::api::{EnrollReply, EnrollRequest},
    k8s::{
        self,
        annotate::{self, AnnotateError, PodEvents, Redirection, reason},
        policy::ignored_annotations,
        procscan::{PodToFind, ProcScanner},
        watch::{Caches, PodKey, WatchCounts, WatchSettings},
    },
    policy::Decision,
    recovery,
    zds::AckState,
};
use netns_finder::{Found, NetnsFinder};
use plan::{Desired, Enrolled, Facts, Options, Step};
use queue::{Backoff, Job, Queue};

/// Steps one run may take before it gives the key back (a plan always converges in fewer;
/// this only bounds a bug).
const MAX_STEPS: usize = 4;
/// Failed attempts to find a running pod's netns before an Event says so.
const NOT_FOUND_EVENT_AFTER: u32 = 3;

#[derive(Debug, Clone)]
pub struct Settings {
    /// This node (`NODE_NAME`).
    pub node_name: String,
    /// How often every key is reconciled even if nothing was heard about it.
    pub resync: Duration,
    /// Pods reconciled at the same time.
    pub workers: usize,
    /// How long a CNI ADD waits for the cache to show its pod.
    pub cni_pod_lookup: Duration,
    /// Retries of a failing pod.
    pub backoff: Backoff,
    /// The watches' retry delays after API errors.
    pub watch: WatchSettings,
}

impl Settings {
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        Settings {
            watch: WatchSettings::new(&node_name),
            node_name,
            resync: Duration::from_secs(10),
            workers: 16,
            cni_pod_lookup: Duration::from_secs(5),
            backoff: Backoff {
                min: Duration::from_millis(200),
                max: Duration::from_secs(30),
            },
        }
    }
}

/// The result of one run for one pod.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Redirected (the reply of the enrollment this run made, if it made one).
    Enrolled(Option<EnrollReply>),
    /// Not redirected, and not to be.
    Skipped(String),
    /// Not redirected yet; something must change first (an IP, a sandbox).
    Waiting(String),
    Failed(String),
}

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

/// The sandbox a CNI ADD announced for a pod.
#[derive(Debug, Clone)]
struct SandboxHint {
    container_id: String,
    netns: PathBuf,
    ips: Vec<IpAddr>,
    deleted: bool,
}

pub struct Reconciler {
    agent: Arc<Agent>,
    client: Client,
    caches: Caches,
    events: PodEvents,
    settings: Settings,
    queue: Arc<Queue<Outcome>>,
    finder: NetnsFinder,
    sandboxes: Mutex<HashMap<String, SandboxHint>>,
    reports: Mutex<BTreeMap<String, PodReport>>,
    /// The last Event note per pod and reason, so retries do not repeat it.
    warned: Mutex<HashMap<(String, &'static str), String>>,
    /// Bumped whenever the pod cache changes (CNI ADDs waiting for their pod look again).
    cache_changed: watch::Sender<u64>,
}

/// What a run looks at: the cached objects and the plan's facts.
struct Seen {
    pod: Option<Arc<Pod>>,
    namespace: Option<Arc<Namespace>>,
    decision: Option<Decision>,
    facts: Facts,
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
    /// Sets up the watches and the queue; nothing runs until [`Starting::run`].
    pub fn setup(
        agent: Arc<Agent>,
        client: Client,
        settings: Settings,
    ) -> std::io::Result<Starting> {
        let (caches, keys, watch) = k8s::watch::start(client.clone(), settings.watch.clone());
        let events = PodEvents::new(client.clone(), settings.node_name.clone());
        let reconciler = Arc::new(Reconciler {
            queue: Queue::new(settings.backoff),
            finder: NetnsFinder::start(ProcScanner::new()?),
            agent,
            client,
            caches,
            events,
            settings,
            sandboxes: Mutex::default(),
            reports: Mutex::default(),
            warned: Mutex::default(),
            cache_changed: watch::channel(0).0,
        });
        Ok(Starting {
            reconciler,
            keys,
            watch: Box::pin(watch),
        })
    }

    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// Waits for the caches, then reconciles every pod they hold and every pod of the
    /// restored table once, and returns when all of that is done (failed pods keep being
    /// retried afterwards).
    pub async fn initial_sync(&self) -> Result<(), k8s::watch::WatchStopped> {
        let started = Instant::now();
        self.caches.wait_synced().await?;
        let mut uids: Vec<String> = self
            .caches
            .pods()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        uids.extend(self.agent.pod_records().into_iter().map(|r| r.uid));
        uids.sort();
        uids.dedup();
        let outcomes = join_all(uids.iter().map(|uid| self.queue.add_waiting(uid))).await;
        let enrolled = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(Outcome::Enrolled(_))))
            .count();
        let failed = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(Outcome::Failed(_))))
            .count();
        info!(
            pods = uids.len(),
            enrolled,
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "initial reconcile done"
        );
        Ok(())
    }

    /// Queues every pod the caches, the table and the CNI sandboxes know.
    fn resync(&self) {
        let mut uids: Vec<String> = self
            .caches
            .pods()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        uids.extend(self.agent.pod_records().into_iter().map(|r| r.uid));
        uids.extend(self.sandboxes().keys().cloned());
        for uid in uids {
            self.queue.add(&uid);
        }
    }

    pub fn status(&self) -> ReconcilerStatus {
        ReconcilerStatus {
            node: self.settings.node_name.clone(),
            watch: self.caches.counts().into(),
            queued: self.queue.in_progress(),
            pods: lock(&self.reports).values().cloned().collect(),
        }
    }

    fn sandboxes(&self) -> MutexGuard<'_, HashMap<String, SandboxHint>> {
        lock(&self.sandboxes)
    }

    async fn work(self: Arc<Self>, job: Job<Outcome>) {
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
    async fn reconcile(&self, uid: &str, failures: u32) -> (Outcome, bool) {
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

    fn report(&self, seen: &Seen, outcome: &Outcome) {
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

    /// A pod gone from the cluster and the dataplane: nothing is kept about it.
    fn forget(&self, uid: &str) {
        self.sandboxes().remove(uid);
        lock(&self.reports).remove(uid);
        lock(&self.warned).retain(|(u, _), _| u != uid);
    }

    /// A Warning Event on the pod, unless the last one for this reason said the same.
    async fn warn(&self, pod: &Pod, action: &str, reason: &'static str, note: &str) {
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
    async fn check_annotations(&self, pod: &Pod) {
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

/// A reconciler set up but not yet running.
pub struct Starting {
    reconciler: Arc<Reconciler>,
    keys: mpsc::UnboundedReceiver<PodKey>,
    watch: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Starting {
    pub fn reconciler(&self) -> &Arc<Reconciler> {
        &self.reconciler
    }

    /// Runs the watches, the feeders of the queue, the workers and the periodic resync until
    /// `stop`.
    pub fn run(self, stop: watch::Receiver<bool>) -> Arc<Reconciler> {
        let r = self.reconciler;
        spawn_until(stop.clone(), self.watch);
        // Watch events: the pod's key, and a nudge for CNI ADDs waiting for their pod.
        let mut keys = self.keys;
        let feeder = Arc::clone(&r);
        spawn_until(stop.clone(), async move {
            while let Some(key) = keys.recv().await {
                feeder.queue.add(&key.uid);
                feeder.cache_changed.send_modify(|n| *n += 1);
            }
        });
        // ztunnel's ACKs: the annotation may now say `enabled`.
        let mut acks = r.agent.hub.acks();
        let queue = Arc::clone(&r.queue);
        spawn_until(stop.clone(), async move {
            while let Some(uid) = acks.recv().await {
                queue.add(&uid);
            }
        });
        let workers = Arc::clone(&r);
        spawn_until(stop.clone(), async move {
            let permits = Arc::new(Semaphore::new(workers.settings.workers.max(1)));
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let job = workers.queue.next().await;
                let w = Arc::clone(&workers);
                tokio::spawn(async move {
                    if let Some(pod) = w.caches.pod(&job.uid) {
                        w.check_annotations(&pod).await;
                    }
                    w.work(job).await;
                    drop(permit);
                });
            }
        });
        let resync = Arc::clone(&r);
        spawn_until(stop, async move {
            let mut every = tokio::time::interval(resync.settings.resync);
            every.tick().await;
            loop {
                every.tick().await;
                resync.resync();
            }
        });
        r
    }
}

fn spawn_until(mut stop: watch::Receiver<bool>, task: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => {}
            _ = task => {}
        }
    });
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
