//! The agent's shared state and its operations: the dataplane, the pod table (persisted), and
//! the ZDS hub that tells ztunnel about pods. Every enroll/unenroll goes through here, one at a
//! time, in an order that survives a crash at any point (see `state.rs`).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
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
    policy::EnrollPolicy,
    state::{Phase, PodRecord, StateError, StateStore},
    status::{MapFillStatus, PodStatus, Status},
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
        "network namespace {netns} does not hold any of the pod's IPs {ips:?} (it holds {held:?})"
    )]
    WrongNetns {
        netns: String,
        ips: Vec<IpAddr>,
        held: Vec<IpAddr>,
    },
    #[error("network namespace {netns} is already enrolled for pod {uid}")]
    NetnsTaken { netns: String, uid: String },
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
}

struct Pod {
    record: PodRecord,
    netns: Option<Arc<Netns>>,
}

pub struct Agent {
    dp: Arc<Mutex<Dataplane>>,
    pods: Mutex<BTreeMap<String, Pod>>,
    store: StateStore,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Serialises enroll and unenroll.
    ops: tokio::sync::Mutex<()>,
    settings: AgentSettings,
    /// Shared with the health endpoint, which is up before the agent is.
    ready: Arc<AtomicBool>,
    stopping: AtomicBool,
}

/// Scrape-time view of the dataplane for metrics.
#[derive(Debug)]
struct DpStats(Arc<Mutex<Dataplane>>);

impl DataplaneStats for DpStats {
    fn counters(&self) -> Vec<(BpfCounter, u64)> {
        lock(&self.0).counters()
    }
    fn map_fill(&self) -> Vec<MapFill> {
        lock(&self.0).map_fill()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Loads (or adopts) the dataplane and rebuilds the pod table from the state directory,
    /// finishing whatever a crashed agent left half done. Blocking.
    pub fn start(
        dp_config: &DataplaneConfig,
        state_dir: &Path,
        settings: AgentSettings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
    ) -> Result<Arc<Self>, AgentError> {
        let store = StateStore::open(state_dir)?;
        let records = store.load()?;
        let mut dp = Dataplane::load(dp_config)?;
        let pods = restore(&mut dp, records);
        let agent = Arc::new(Agent {
            dp: Arc::new(Mutex::new(dp)),
            pods: Mutex::new(BTreeMap::new()),
            store,
            hub,
            metrics,
            ops: tokio::sync::Mutex::new(()),
            settings,
            ready,
            stopping: AtomicBool::new(false),
        });
        agent
            .metrics
            .attach_dataplane(Arc::new(DpStats(Arc::clone(&agent.dp))));
        {
            let mut table = lock(&agent.pods);
            for pod in pods {
                // Nothing is connected yet: this only seeds the hub's snapshot.
                drop(agent.hub.add(workload_of(&pod)));
                table.insert(pod.record.uid.clone(), pod);
            }
            agent.save(&table)?;
            agent.metrics.enrolled_pods.set(table.len() as i64);
            info!(pods = table.len(), "pod table restored");
        }
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

    /// Readers of the eBPF programs' logs (see `Dataplane::take_loggers`).
    pub fn take_ebpf_loggers(&self) -> Vec<aya_log::EbpfLogger<&'static dyn log::Log>> {
        lock(&self.dp).take_loggers()
    }

    /// This node's own addresses, exempt from inbound redirection (kubelet probes).
    pub fn set_host_addrs(&self, addrs: &[IpAddr]) -> Result<(), AgentError> {
        Ok(lock(&self.dp).set_host_addrs(addrs)?)
    }

    fn save(&self, table: &BTreeMap<String, Pod>) -> Result<(), StateError> {
        let records: Vec<PodRecord> = table.values().map(|p| p.record.clone()).collect();
        self.store.save(&records)
    }

    /// Enrolls a pod: dataplane first, then ztunnel, waiting up to `wait_ms` for its ACK.
    /// Retrying a request that already succeeded is harmless.
    pub async fn enroll(self: &Arc<Self>, req: EnrollRequest) -> Result<EnrollReply, AgentError> {
        validate(&req)?;
        if self.stopping.load(Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let wait = req
            .wait_ms
            .map(Duration::from_millis)
            .unwrap_or(self.settings.ack_wait);
        let _serial = self.ops.lock().await;
        let started = Instant::now();
        let this = Arc::clone(self);
        let (reply, workload) = tokio::task::spawn_blocking(move || this.enroll_blocking(req))
            .await
            .map_err(|e| AgentError::Io(std::io::Error::other(e)))??;
        self.metrics
            .enroll_duration
            .observe(started.elapsed().as_secs_f64());
        let Some(workload) = workload else {
            return Ok(reply);
        };
        let answer = self.hub.add(workload);
        drop(_serial);
        let ztunnel = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(AckResult::Acked)) => AckState::Acked,
            Ok(Ok(AckResult::Nacked(e))) => AckState::Nacked(e),
            _ => AckState::Pending,
        };
        Ok(EnrollReply { ztunnel, ..reply })
    }

    fn enroll_blocking(
        &self,
        req: EnrollRequest,
    ) -> Result<(EnrollReply, Option<Workload>), AgentError> {
        let ns = Netns::open(&req.netns)?;
        let ips: Vec<IpAddr> = req
            .ips
            .iter()
            .copied()
            .filter(|ip| self.settings.ipv6 || ip.is_ipv4())
            .collect();
        let held = ns.run(pod_net::addresses)??;
        if !ips.iter().any(|ip| held.contains(ip)) {
            return Err(AgentError::WrongNetns {
                netns: req.netns.display().to_string(),
                ips: req.ips.clone(),
                held,
            });
        }
        let cookie = ns.cookie()?;
        let mut table = lock(&self.pods);
        if let Some(existing) = table.get_mut(&req.uid) {
            if existing.record.netns_cookie == cookie {
                if req.container_id.is_some() && existing.record.container_id != req.container_id {
                    // Enrolled by hand first: from now on the sandbox's DEL lets it go.
                    existing.record.container_id = req.container_id.clone();
                    self.save(&table)?;
                }
                let ztunnel = self
                    .hub
                    .states()
                    .remove(&req.uid)
                    .unwrap_or(AckState::Pending);
                let reply = EnrollReply {
                    uid: req.uid.clone(),
                    netns_cookie: cookie,
                    ztunnel,
                    already_enrolled: true,
                };
                return Ok((reply, None));
            }
            // Same pod, new sandbox netns: the old one goes first.
            info!(uid = %req.uid, "pod has a new network namespace; replacing the old enrollment");
            self.unenroll_locked(&mut table, &req.uid)?;
        }
        if let Some(other) = table.values().find(|p| p.record.netns_cookie == cookie) {
            return Err(AgentError::NetnsTaken {
                netns: req.netns.display().to_string(),
                uid: other.record.uid.clone(),
            });
        }
        let mut dp = lock(&self.dp);
        if dp.is_enrolled(cookie) {
            // Enrolled by an agent that crashed before recording it: start clean.
            warn!(uid = %req.uid, cookie, "adopting an unrecorded enrollment");
            dp.unenroll(&ns)?;
        }
        let dns_capture = req.dns_capture.unwrap_or(self.settings.dns_capture);
        let mut record = PodRecord {
            uid: req.uid.clone(),
            name: req.name.clone(),
            namespace: req.namespace.clone(),
            service_account: req.service_account.clone(),
            netns: req.netns.clone(),
            netns_inode: ns.inode(),
            netns_cookie: cookie,
            ips: ips.clone(),
            dns_capture,
            bypass_inbound: req.bypass_inbound,
            ipv6: self.settings.ipv6,
            phase: Phase::Enrolling,
            container_id: req.container_id.clone(),
        };
        let ns = Arc::new(ns);
        table.insert(
            req.uid.clone(),
            Pod {
                record: record.clone(),
                netns: Some(Arc::clone(&ns)),
            },
        );
        // The intent is on disk before the dataplane changes, or nothing changes.
        if let Err(e) = self.save(&table) {
            table.remove(&req.uid);
            return Err(e.into());
        }
        let opts = EnrollOptions {
            dns_capture,
            bypass_inbound: req.bypass_inbound,
            ipv6: self.settings.ipv6,
        };
        if let Err(e) = dp.enroll(&ns, &ips, opts) {
            table.remove(&req.uid);
            self.save(&table)?;
            self.metrics.error("enroll");
            return Err(e.into());
        }
        record.phase = Phase::Enrolled;
        let pod = Pod {
            record,
            netns: Some(ns),
        };
        let workload = workload_of(&pod);
        table.insert(req.uid.clone(), pod);
        self.save(&table)?;
        self.metrics.enrolled_pods.set(table.len() as i64);
        let reply = EnrollReply {
            uid: req.uid,
            netns_cookie: cookie,
            ztunnel: AckState::Pending,
            already_enrolled: false,
        };
        Ok((reply, Some(workload)))
    }

    /// Un-enrolls a pod: redirection first (its traffic goes direct), then ztunnel lets go.
    pub async fn unenroll(self: &Arc<Self>, uid: String) -> Result<(), AgentError> {
        let _serial = self.ops.lock().await;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut table = lock(&this.pods);
            this.unenroll_locked(&mut table, &uid)
        })
        .await
        .map_err(|e| AgentError::Io(std::io::Error::other(e)))?
    }

    fn unenroll_locked(
        &self,
        table: &mut BTreeMap<String, Pod>,
        uid: &str,
    ) -> Result<(), AgentError> {
        let pod = table
            .get_mut(uid)
            .ok_or_else(|| AgentError::NotEnrolled(uid.to_string()))?;
        pod.record.phase = Phase::Unenrolling;
        let record = pod.record.clone();
        let netns = pod
            .netns
            .clone()
            .or_else(|| open_verified(&record).map(Arc::new));
        self.save(table)?;
        {
            let mut dp = lock(&self.dp);
            match &netns {
                Some(ns) => match dp.unenroll(ns) {
                    Ok(()) | Err(dataplane::Error::NotEnrolled(_)) => {}
                    Err(e) => {
                        self.metrics.error("unenroll");
                        return Err(e.into());
                    }
                },
                // The netns is gone, and its interfaces and rules with it.
                None => dp.forget(record.netns_cookie)?,
            }
        }
        self.hub.remove(uid);
        table.remove(uid);
        self.save(table)?;
        self.metrics.enrolled_pods.set(table.len() as i64);
        info!(uid, "pod unenrolled");
        Ok(())
    }

    /// Un-enrolls the pod that `container_id`'s CNI ADD enrolled, if any; checked and done under
    /// the same lock, so a newer sandbox of the same pod is never let go by an older one's DEL.
    pub async fn unenroll_container(
        self: &Arc<Self>,
        container_id: String,
    ) -> Result<Option<String>, AgentError> {
        let _serial = self.ops.lock().await;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut table = lock(&this.pods);
            let uid = table
                .values()
                .find(|p| p.record.container_id.as_deref() == Some(container_id.as_str()))
                .map(|p| p.record.uid.clone());
            match uid {
                Some(uid) => this.unenroll_locked(&mut table, &uid).map(|()| Some(uid)),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| AgentError::Io(std::io::Error::other(e)))?
    }

    /// (uid, sandbox container id) of every pod a CNI ADD enrolled.
    pub fn cni_containers(&self) -> Vec<(String, String)> {
        lock(&self.pods)
            .values()
            .filter_map(|p| {
                let c = p.record.container_id.clone()?;
                Some((p.record.uid.clone(), c))
            })
            .collect()
    }

    /// Unenrolls pods whose netns path no longer names their namespace: the pod is gone (its
    /// sandbox was torn down) and nobody told us. Returns the uids let go.
    pub async fn collect_vanished(self: &Arc<Self>) -> Vec<String> {
        let _serial = self.ops.lock().await;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut table = lock(&this.pods);
            let gone: Vec<String> = table
                .values()
                .filter(|p| !names_its_netns(&p.record))
                .map(|p| p.record.uid.clone())
                .collect();
            for uid in &gone {
                info!(uid, "the pod's network namespace is gone; unenrolling");
                if let Err(e) = this.unenroll_locked(&mut table, uid) {
                    warn!(uid, error = %e, "unenrolling a vanished pod");
                }
            }
            gone
        })
        .await
        .unwrap_or_default()
    }

    pub fn status(&self) -> Status {
        let states = self.hub.states();
        let pods = lock(&self.pods)
            .values()
            .map(|p| {
                let r = &p.record;
                PodStatus {
                    uid: r.uid.clone(),
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    netns: r.netns.display().to_string(),
                    netns_cookie: r.netns_cookie,
                    ips: r.ips.clone(),
                    dns_capture: r.dns_capture,
                    bypass_inbound: r.bypass_inbound,
                    ipv6: r.ipv6,
                    ztunnel: states.get(&r.uid).cloned().unwrap_or(AckState::Pending),
                    container_id: r.container_id.clone(),
                }
            })
            .collect();
        let dp = lock(&self.dp);
        Status {
            ready: self.is_ready(),
            object_id: dp.object_id().to_string(),
            ztunnel_connections: self.hub.connections(),
            pods,
            links: dp.links(),
            maps: dp
                .map_fill()
                .into_iter()
                .map(|m| MapFillStatus {
                    name: m.name.to_string(),
                    used: m.used,
                    capacity: m.capacity,
                })
                .collect(),
            counters: dp
                .counters()
                .into_iter()
                .map(|(c, v)| (c.name().to_string(), v))
                .collect(),
        }
    }
}

fn validate(req: &EnrollRequest) -> Result<(), AgentError> {
    let bad = |m: &str| Err(AgentError::Invalid(m.to_string()));
    if req.uid.is_empty() {
        return bad("uid is empty");
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

fn workload_of(pod: &Pod) -> Workload {
    let r = &pod.record;
    Workload {
        uid: r.uid.clone(),
        info: WorkloadInfo {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            service_account: r.service_account.clone(),
        },
        netns: pod.netns.clone(),
    }
}

/// Whether the record's netns path still names the namespace that was enrolled.
fn names_its_netns(record: &PodRecord) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(&record.netns)
        .map(|m| m.ino() == record.netns_inode)
        .unwrap_or(false)
}

/// Opens the record's netns if its path still names the same namespace.
fn open_verified(record: &PodRecord) -> Option<Netns> {
    Netns::open(&record.netns)
        .ok()
        .filter(|ns| ns.inode() == record.netns_inode)
}

/// Rebuilds the pod table from saved records against what the dataplane has pinned, finishing
/// interrupted operations. Pods whose netns is gone are dropped (and forgotten by the
/// dataplane); pods whose netns merely cannot be opened are kept (ztunnel gets a Keep).
fn restore(dp: &mut Dataplane, records: Vec<PodRecord>) -> Vec<Pod> {
    let mut kept = Vec::new();
    for mut record in records {
        let netns = open_verified(&record);
        let cookie = record.netns_cookie;
        match record.phase {
            Phase::Unenrolling => {
                let res = match &netns {
                    Some(ns) => dp.unenroll(ns).or_else(|e| {
                        if matches!(e, dataplane::Error::NotEnrolled(_)) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    }),
                    None => dp.forget(cookie),
                };
                match res {
                    Ok(()) => info!(uid = %record.uid, "finished an interrupted unenrollment"),
                    Err(e) => {
                        warn!(uid = %record.uid, error = %e, "could not finish an interrupted unenrollment")
                    }
                }
                continue;
            }
            Phase::Enrolling if !dp.is_enrolled(cookie) => {
                info!(uid = %record.uid, "dropping an enrollment interrupted before the dataplane had it");
                continue;
            }
            Phase::Enrolling | Phase::Enrolled => {}
        }
        record.phase = Phase::Enrolled;
        if !dp.is_enrolled(cookie) {
            // The dataplane lost it (bpffs was wiped): enroll again if the pod is still there.
            let Some(ns) = &netns else {
                info!(uid = %record.uid, "dropping a pod whose netns is gone");
                continue;
            };
            let opts = EnrollOptions {
                dns_capture: record.dns_capture,
                bypass_inbound: record.bypass_inbound,
                ipv6: record.ipv6,
            };
            match dp.enroll(ns, &record.ips, opts) {
                Ok(c) => record.netns_cookie = c,
                Err(e) => {
                    warn!(uid = %record.uid, error = %e, "could not re-enroll a pod the dataplane lost");
                    continue;
                }
            }
        } else if netns.is_none() && dp.netns_alive(cookie) == Some(false) {
            info!(uid = %record.uid, "dropping a pod whose netns is gone");
            let _ = dp.forget(cookie);
            continue;
        }
        kept.push(Pod {
            record,
            netns: netns.map(Arc::new),
        });
    }
    let known: Vec<u64> = kept.iter().map(|p| p.record.netns_cookie).collect();
    for (cookie, _) in dp.enrolled() {
        if known.contains(&cookie) {
            continue;
        }
        if dp.netns_alive(cookie) == Some(false) {
            let _ = dp.forget(cookie);
        } else {
            warn!(
                cookie,
                "an enrolled netns has no pod record; it stays redirected until uninstall"
            );
        }
    }
    kept
}
