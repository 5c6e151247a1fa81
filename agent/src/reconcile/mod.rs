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
//!
//! Modules: [`queue`] the work queue; [`plan`] the pure core; `worker` one run for one pod;
//! `netns_finder` batched `/proc` scans; [`cni`] the CNI requests; `report` status and Events.
pub mod cni;
mod netns_finder;
pub mod plan;
pub mod queue;
mod report;
mod worker;

pub use report::{PodReport, ReconcilerStatus, WatchStatus};

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use kube::Client;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::info;

use crate::{
    agent::Agent,
    control::api::EnrollReply,
    k8s::{
        self,
        annotate::PodEvents,
        procscan::ProcScanner,
        watch::{Caches, PodKey, WatchSettings},
    },
};
use netns_finder::NetnsFinder;
use queue::{Backoff, Queue};

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

    fn sandboxes(&self) -> MutexGuard<'_, HashMap<String, SandboxHint>> {
        lock(&self.sandboxes)
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
