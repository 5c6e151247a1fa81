//! The agent's operations on pods: enroll and unenroll, each one idempotent step that brings
//! one pod's actual state (dataplane, ztunnel, persisted record) to what was asked.
//!
//! Operations on the same pod run one at a time (a lock per pod uid); operations on different
//! pods run in parallel. The pod table is only ever locked for in-memory reads and writes, never
//! across a syscall, and every blocking step (namespaces, netlink, bpf, files) runs on tokio's
//! blocking pool, so status and metrics never wait behind an enrollment.
//!
//! Crash safety: a pod's record is written with the phase it is entering *before* the
//! dataplane changes (see `state.rs`); `recovery.rs` finishes or undoes whatever a crash
//! interrupted. After the dataplane has enrolled a pod, nothing can fail the operation any
//! more: it always goes on to tell ztunnel.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_common::{Counter as BpfCounter, MAX_POD_IPS};
use tracing::{info, warn};

use crate::{
    control::api::{EnrollReply, EnrollRequest},
    dataplane::{self, Dataplane, DataplaneConfig, EnrollOptions, MapFill, pod_net},
    metrics::{DataplaneStats, Metrics},
    netns::Netns,
    pod_locks::PodLocks,
    policy::EnrollPolicy,
    recovery,
    state::{self, Phase, PodRecord, StateError, StateStore},
    zds::{AckResult, AckState, Hub, Workload, proto::WorkloadInfo},
};

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// DNS capture for pods that do not say (Istio's `AMBIENT_DNS_CAPTURE`).
    pub dns_capture: bool,
    /// Whether to redirect pods' IPv6 traffic too (Istio's `AMBIENT_IPV6`).
    pub ipv6: bool,
    /// How long an enroll request waits for ztunnel's ACK by default.
    pub ack_wait: Duration,
    /// Which pods a CNI ADD enrolls.
    pub policy: EnrollPolicy,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            dns_capture: true,
            ipv6: true,
            ack_wait: Duration::from_secs(5),
            policy: EnrollPolicy::standalone([], []),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("pod {0} is not enrolled")]
    NotEnrolled(String),
    #[error(
        "network namespace {netns} does not hold the pod's IPs {missing:?} (it holds {held:?})"
    )]
    WrongNetns {
        netns: String,
        missing: Vec<IpAddr>,
        held: Vec<IpAddr>,
    },
    #[error("network namespace {netns} is already enrolled for pod {uid}")]
    NetnsTaken { netns: String, uid: String },
    #[error("the pod's network namespace {0} is gone")]
    NetnsGone(String),
    #[error(transparent)]
    Dataplane(#[from] dataplane::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// Cannot be done now; a retry may succeed (Kubernetes mode: the cache is behind, ...).
    #[error("{0}")]
    Unavailable(String),
    /// Kubernetes mode: enrollment follows the pods' labels, not requests.
    #[error(
        "the agent runs in Kubernetes mode, where pods are enrolled by their labels (istio.io/dataplane-mode), not by hand"
    )]
    KubernetesMode,
}

/// One pod the agent has taken on.
pub(crate) struct Pod {
    pub record: PodRecord,
    /// Held open while the pod is enrolled, for ztunnel's Add. `None` after a restart when the
    /// path no longer opens (ztunnel is then told to keep what it has).
    pub netns: Option<Arc<Netns>>,
}

impl Pod {
    pub fn workload(&self) -> Workload {
        let r = &self.record;
        Workload {
            uid: r.uid.clone(),
            info: WorkloadInfo {
                name: r.name.clone(),
                namespace: r.namespace.clone(),
                service_account: r.service_account.clone(),
            },
            netns: self.netns.clone(),
        }
    }
}

/// The in-memory pod table. Locked only for in-memory work.
#[derive(Default)]
pub(crate) struct PodTable(Mutex<BTreeMap<String, Pod>>);

impl PodTable {
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Pod>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn records(&self) -> Vec<PodRecord> {
        self.lock().values().map(|p| p.record.clone()).collect()
    }
}

pub struct Agent {
    /// Shared, `&self` throughout: enrollments of different pods use it at the same time.
    dp: Arc<Dataplane>,
    pub(crate) pods: PodTable,
    store: StateStore,
    locks: PodLocks,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    settings: AgentSettings,
    /// Shared with the health endpoint, which is up before the agent is.
    ready: Arc<AtomicBool>,
    stopping: AtomicBool,
}

/// What an enroll step did.
enum Enrolled {
    /// Newly enrolled (or re-enrolled in a new netns).
    New(Workload, u64),
    /// It already was, in this same netns: the request was a retry.
    Already(Workload, u64),
}

impl Agent {
    /// Loads (or adopts) the dataplane and rebuilds the pod table from `store`, finishing
    /// whatever a crashed agent left half done. Blocking.
    pub fn start(
        dp_config: &DataplaneConfig,
        store: StateStore,
        settings: AgentSettings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
    ) -> Result<Arc<Self>, AgentError> {
        let records = store.load()?;
        let dp = Dataplane::load(dp_config)?;
        let pods = recovery::restore(&dp, &store, records);
        let agent = Arc::new(Agent {
            dp: Arc::new(dp),
            pods: PodTable::default(),
            store,
            locks: PodLocks::default(),
            hub,
            metrics,
            settings,
            ready,
            stopping: AtomicBool::new(false),
        });
        agent.metrics.attach_dataplane(Arc::new(DpStats {
            dp: Arc::clone(&agent.dp),
            fill: Mutex::new(None),
        }));
        let mut table = agent.pods.lock();
        for pod in pods {
            // Nothing is connected yet: this only seeds the hub's snapshot.
            drop(agent.hub.add(pod.workload()));
            table.insert(pod.record.uid.clone(), pod);
        }
        agent.metrics.enrolled_pods.set(table.len() as i64);
        info!(pods = table.len(), "pod table restored");
        drop(table);
        Ok(agent)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    /// Refuses new enrollments from now on, and stops reporting ready (graceful stop).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
    }

    pub(crate) fn dp(&self) -> &Dataplane {
        &self.dp
    }

    /// A copy of every pod record (an in-memory read, no syscall).
    pub fn pod_records(&self) -> Vec<PodRecord> {
        self.pods.records()
    }

    /// The dataplane (for decision tracing).
    pub fn dataplane(&self) -> &Arc<Dataplane> {
        &self.dp
    }

    /// Readers of the eBPF programs' logs (see `Dataplane::take_loggers`).
    pub fn take_ebpf_loggers(&self) -> Vec<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.dp().take_loggers()
    }

    /// Enrolls a pod: dataplane first, then ztunnel, waiting up to `wait_ms` for its ACK.
    /// Retrying a request that already succeeded is harmless, and makes sure ztunnel has the
    /// pod.
    pub async fn enroll(self: &Arc<Self>, req: EnrollRequest) -> Result<EnrollReply, AgentError> {
        validate(&req)?;
        if self.stopping.load(Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let wait = req
            .wait_ms
            .map(Duration::from_millis)
            .unwrap_or(self.settings.ack_wait);
        let uid = req.uid.clone();
        let guard = self.locks.lock(&uid).await;
        let started = Instant::now();
        let this = Arc::clone(self);
        let step = blocking(move || this.enroll_step(req)).await?;
        let elapsed = started.elapsed();
        let (workload, cookie, already) = match step {
            Enrolled::New(w, cookie) => {
                self.metrics.enroll_duration.observe(elapsed.as_secs_f64());
                (w, cookie, false)
            }
            Enrolled::Already(w, cookie) => (w, cookie, true),
        };
        // Queued while the pod's lock is held, so a later unenroll's Del goes out after it.
        let answer = self.hub.ensure(workload);
        drop(guard);
        let ztunnel = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(AckResult::Acked)) => AckState::Acked,
            Ok(Ok(AckResult::Nacked(e))) => AckState::Nacked(e),
            _ => AckState::Pending,
        };
        Ok(EnrollReply {
            uid,
            netns_cookie: cookie,
            ztunnel,
            already_enrolled: already,
            enroll_us: (!already).then_some(elapsed.as_micros() as u64),
        })
    }

    fn enroll_step(&self, req: EnrollRequest) -> Result<Enrolled, AgentError> {
        let ns = Netns::open(&req.netns)?;
        let ips: Vec<IpAddr> = req
            .ips
            .iter()
            .copied()
            .filter(|ip| self.settings.ipv6 || ip.is_ipv4())
            .collect();
        // Every address given must be the pod's: they become exempt destinations and the
        // redirect targets, so a wrong one would send the pod's traffic elsewhere.
        let held = ns.run(pod_net::addresses)??;
        let missing: Vec<IpAddr> = req
            .ips
            .iter()
            .copied()
            .filter(|ip| !held.contains(ip))
            .collect();
        if !missing.is_empty() {
            return Err(AgentError::WrongNetns {
                netns: req.netns.display().to_string(),
                missing,
                held,
            });
        }
        let cookie = ns.cookie()?;
        let ns = Arc::new(ns);
        let record = PodRecord {
            uid: req.uid.clone(),
            name: req.name.clone(),
            namespace: req.namespace.clone(),
            service_account: req.service_account.clone(),
            netns: req.netns.clone(),
            netns_inode: ns.inode(),
            netns_cookie: cookie,
            ips: ips.clone(),
            dns_capture: req.dns_capture.unwrap_or(self.settings.dns_capture),
            bypass_inbound: req.bypass_inbound,
            ipv6: self.settings.ipv6,
            phase: Phase::Enrolling,
            container_id: req.container_id.clone(),
        };

        // Find the pod already enrolled (a retried request), or one to replace.
        let replaced = {
            let table = self.pods.lock();
            match table.get(&req.uid) {
                Some(p) if p.record.netns_cookie == cookie && p.record.phase == Phase::Enrolled => {
                    let (mut workload, mut have) = (p.workload(), p.record.clone());
                    drop(table);
                    // Enrolled by hand (or found in /proc) first: from now on the sandbox's
                    // DEL lets it go.
                    let new_owner =
                        req.container_id.is_some() && have.container_id != req.container_id;
                    // The same netns under another path (the one recorded is gone, e.g. the
                    // process it was found through exited): the record follows it.
                    let moved = have.netns != req.netns;
                    if new_owner || moved {
                        if new_owner {
                            have.container_id = req.container_id.clone();
                        }
                        if moved {
                            info!(uid = %req.uid, netns = %req.netns.display(), "the pod's netns has a new path");
                            have.netns = req.netns.clone();
                            have.netns_inode = ns.inode();
                        }
                        self.store.put(&have)?;
                        if let Some(p) = self.pods.lock().get_mut(&req.uid) {
                            p.record = have;
                            if moved {
                                p.netns = Some(Arc::clone(&ns));
                                workload = p.workload();
                            }
                        }
                    }
                    return Ok(Enrolled::Already(workload, cookie));
                }
                Some(_) => true,
                None => false,
            }
        };
        if replaced {
            // Same pod, new sandbox netns (or an unenrollment that failed half-way): the old
            // enrollment goes first.
            info!(uid = %req.uid, "replacing the pod's previous enrollment");
            self.unenroll_step(&req.uid)?;
        }
        // Reserve the pod and its netns in the table.
        {
            let mut table = self.pods.lock();
            if let Some(other) = table.values().find(|p| p.record.netns_cookie == cookie) {
                return Err(AgentError::NetnsTaken {
                    netns: req.netns.display().to_string(),
                    uid: other.record.uid.clone(),
                });
            }
            table.insert(
                req.uid.clone(),
                Pod {
                    record: record.clone(),
                    netns: Some(Arc::clone(&ns)),
                },
            );
        }
        let forget = |this: &Self| {
            this.pods.lock().remove(&req.uid);
        };

        crate::failpoints::pause_enroll(&req.uid);
        // The intent is on disk before the dataplane changes, or nothing changes.
        if let Err(e) = self.store.put(&record) {
            forget(self);
            self.metrics.error("state");
            return Err(e.into());
        }
        let opts = EnrollOptions {
            dns_capture: record.dns_capture,
            bypass_inbound: record.bypass_inbound,
            ipv6: record.ipv6,
        };
        let result = {
            let dp = self.dp();
            if dp.is_enrolled(cookie) {
                // Enrolled by an agent that crashed before recording it: start clean.
                warn!(uid = %req.uid, cookie, "adopting an unrecorded enrollment");
                if let Err(e) = dp.unenroll(&ns) {
                    warn!(uid = %req.uid, error = %e, "clearing an unrecorded enrollment");
                }
            }
            dp.enroll(&ns, &ips, opts)
        };
        if let Err(e) = result {
            forget(self);
            // If this fails, the record says `enrolling` and the dataplane does not have the
            // pod: a restart drops it.
            if let Err(se) = self.store.remove(&req.uid) {
                warn!(uid = %req.uid, error = %se, "removing the record of a failed enrollment");
            }
            self.metrics.error("enroll");
            return Err(e.into());
        }

        // From here on the operation completes: ztunnel must be told. The record's phase is
        // only informative now (a restart treats `enrolling` with the dataplane entry present
        // as enrolled), so failing to write it is a warning, not a failure.
        let mut enrolled = record;
        enrolled.phase = Phase::Enrolled;
        if let Err(e) = self.store.put(&enrolled) {
            self.metrics.error("state");
            warn!(uid = %req.uid, error = %e, "recording the enrollment (it stands; a restart keeps it)");
        }
        let workload = {
            let mut table = self.pods.lock();
            let pod = Pod {
                record: enrolled,
                netns: Some(ns),
            };
            let workload = pod.workload();
            table.insert(req.uid.clone(), pod);
            self.metrics.enrolled_pods.set(table.len() as i64);
            workload
        };
        Ok(Enrolled::New(workload, cookie))
    }

    /// Un-enrolls a pod: redirection first (its traffic goes direct), then ztunnel lets go.
    pub async fn unenroll(self: &Arc<Self>, uid: String) -> Result<(), AgentError> {
        let _guard = self.locks.lock(&uid).await;
        let this = Arc::clone(self);
        blocking(move || this.unenroll_step(&uid)).await
    }

    fn unenroll_step(&self, uid: &str) -> Result<(), AgentError> {
        let mut record = {
            let table = self.pods.lock();
            let pod = table
                .get(uid)
                .ok_or_else(|| AgentError::NotEnrolled(uid.to_string()))?;
            pod.record.clone()
        };
        let netns = self
            .pods
            .lock()
            .get(uid)
            .and_then(|p| p.netns.clone())
            .or_else(|| recovery::open_verified(&record).map(Arc::new));
        record.phase = Phase::Unenrolling;
        self.store.put(&record)?;
        if let Some(p) = self.pods.lock().get_mut(uid) {
            p.record.phase = Phase::Unenrolling;
        }
        let result = {
            let dp = self.dp();
            match &netns {
                Some(ns) => match dp.unenroll(ns) {
                    Ok(()) | Err(dataplane::Error::NotEnrolled(_)) => Ok(()),
                    Err(e) => Err(e),
                },
                // The netns is gone, and its interfaces and rules with it.
                None => dp.forget(record.netns_cookie),
            }
        };
        if let Err(e) = result {
            self.metrics.error("unenroll");
            // The record stays `unenrolling`: a retry, or a restart, finishes the job.
            return Err(e.into());
        }
        self.hub.remove(uid);
        let left = {
            let mut table = self.pods.lock();
            table.remove(uid);
            table.len()
        };
        self.metrics.enrolled_pods.set(left as i64);
        if let Err(e) = self.store.remove(uid) {
            // A restart finds `unenrolling` with no dataplane entry, and drops the record.
            warn!(uid, error = %e, "removing the record of an unenrolled pod");
        }
        info!(uid, "pod unenrolled");
        Ok(())
    }

    /// Changes an enrolled pod's options in place (`Dataplane::update_options`): the
    /// dataplane first, then the record, so a crash in between leaves the old options on
    /// record and the next reconcile applies the new ones again.
    pub async fn update_options(
        self: &Arc<Self>,
        uid: String,
        dns_capture: bool,
        bypass_inbound: bool,
    ) -> Result<(), AgentError> {
        let _guard = self.locks.lock(&uid).await;
        let this = Arc::clone(self);
        blocking(move || this.update_step(&uid, dns_capture, bypass_inbound)).await
    }

    fn update_step(
        &self,
        uid: &str,
        dns_capture: bool,
        bypass_inbound: bool,
    ) -> Result<(), AgentError> {
        let (mut record, netns) = {
            let table = self.pods.lock();
            let pod = table
                .get(uid)
                .ok_or_else(|| AgentError::NotEnrolled(uid.to_string()))?;
            (pod.record.clone(), pod.netns.clone())
        };
        if record.dns_capture == dns_capture && record.bypass_inbound == bypass_inbound {
            return Ok(());
        }
        let netns = netns
            .or_else(|| recovery::open_verified(&record).map(Arc::new))
            .ok_or_else(|| AgentError::NetnsGone(record.netns.display().to_string()))?;
        let opts = EnrollOptions {
            dns_capture,
            bypass_inbound,
            ipv6: record.ipv6,
        };
        self.dp().update_options(&netns, opts)?;
        record.dns_capture = dns_capture;
        record.bypass_inbound = bypass_inbound;
        if let Err(e) = self.store.put(&record) {
            self.metrics.error("state");
            warn!(uid, error = %e, "recording new pod options (they stand; a restart re-applies them)");
        }
        if let Some(p) = self.pods.lock().get_mut(uid) {
            p.record = record;
        }
        Ok(())
    }

    /// The pod's record, if it is enrolled (an in-memory read).
    pub fn pod_record(&self, uid: &str) -> Option<PodRecord> {
        self.pods.lock().get(uid).map(|p| p.record.clone())
    }

    /// Un-enrolls the pod that `container_id`'s CNI ADD enrolled, if any. Checked again under
    /// the pod's lock, so a newer sandbox of the same pod is never let go by an older one's DEL.
    pub async fn unenroll_container(
        self: &Arc<Self>,
        container_id: String,
    ) -> Result<Option<String>, AgentError> {
        let owner = |this: &Self| {
            this.pods
                .lock()
                .values()
                .find(|p| p.record.container_id.as_deref() == Some(container_id.as_str()))
                .map(|p| p.record.uid.clone())
        };
        let Some(uid) = owner(self) else {
            return Ok(None);
        };
        let _guard = self.locks.lock(&uid).await;
        if owner(self).as_deref() != Some(uid.as_str()) {
            return Ok(None);
        }
        let this = Arc::clone(self);
        let id = uid.clone();
        blocking(move || this.unenroll_step(&id)).await?;
        Ok(Some(uid))
    }

    /// (uid, sandbox container id) of every pod a CNI ADD enrolled.
    pub fn cni_containers(&self) -> Vec<(String, String)> {
        self.pods
            .lock()
            .values()
            .filter_map(|p| Some((p.record.uid.clone(), p.record.container_id.clone()?)))
            .collect()
    }

    /// Unenrolls pods whose netns path no longer names their namespace: the pod is gone (its
    /// sandbox was torn down) and nobody told us. Returns the uids let go.
    pub async fn collect_vanished(self: &Arc<Self>) -> Vec<String> {
        let records = self.pods.records();
        let gone: Vec<String> = blocking(move || {
            Ok::<_, AgentError>(
                records
                    .iter()
                    .filter(|r| !recovery::names_its_netns(r))
                    .map(|r| r.uid.clone())
                    .collect(),
            )
        })
        .await
        .unwrap_or_default();
        let mut let_go = Vec::new();
        for uid in gone {
            let _guard = self.locks.lock(&uid).await;
            // Re-check under the pod's lock: it may have been re-enrolled meanwhile.
            let Some(record) = self.pods.lock().get(&uid).map(|p| p.record.clone()) else {
                continue;
            };
            let this = Arc::clone(self);
            let id = uid.clone();
            let res = blocking(move || {
                if recovery::names_its_netns(&record) {
                    return Ok(false);
                }
                info!(uid = %id, "the pod's network namespace is gone; unenrolling");
                this.unenroll_step(&id).map(|()| true)
            })
            .await;
            match res {
                Ok(true) => let_go.push(uid),
                Ok(false) => {}
                Err(e) => warn!(uid, error = %e, "unenrolling a vanished pod"),
            }
        }
        let_go
    }
}

/// Runs a blocking step on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Io(std::io::Error::other(e)))?
}

/// Scrape-time view of the dataplane for metrics. Counters are read on every scrape (one
/// lookup each); map fill levels at most every `FILL_EVERY`, since counting a map that has no
/// batch lookup (the sockhash) walks its keys.
#[derive(Debug)]
struct DpStats {
    dp: Arc<Dataplane>,
    fill: Mutex<Option<(Instant, Vec<MapFill>)>>,
}

const FILL_EVERY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agent")
    }
}

impl DataplaneStats for DpStats {
    fn counters(&self) -> Vec<(BpfCounter, u64)> {
        self.dp.counters()
    }
    fn map_fill(&self) -> Vec<MapFill> {
        let mut cached = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((at, fill)) if at.elapsed() < FILL_EVERY => fill.clone(),
            _ => {
                let fill = self.dp.map_fill();
                *cached = Some((Instant::now(), fill.clone()));
                fill
            }
        }
    }
}

fn validate(req: &EnrollRequest) -> Result<(), AgentError> {
    let bad = |m: &str| Err(AgentError::Invalid(m.to_string()));
    if !state::valid_uid(&req.uid) {
        return bad("uid must be 1-253 characters of A-Z a-z 0-9 - _ . (not starting with .)");
    }
    if req.name.is_empty() || req.namespace.is_empty() {
        return bad("pod name and namespace are required");
    }
    if !req.netns.is_absolute() {
        return bad("netns must be an absolute path");
    }
    if req.ips.is_empty() {
        return bad("at least one pod IP is required");
    }
    if req.ips.len() > MAX_POD_IPS {
        return Err(AgentError::Invalid(format!(
            "at most {MAX_POD_IPS} pod IPs are supported"
        )));
    }
    // Refused here rather than failing later: ztunnel cannot read an Add this big.
    let info = WorkloadInfo {
        name: req.name.clone(),
        namespace: req.namespace.clone(),
        service_account: req.service_account.clone(),
    };
    let len = crate::zds::add_request_len(&req.uid, &info);
    if len >= crate::zds::connection::MAX_REQUEST {
        return Err(AgentError::Invalid(format!(
            "pod identity too long: its ZDS Add would be {len} bytes"
        )));
    }
    Ok(())
}
