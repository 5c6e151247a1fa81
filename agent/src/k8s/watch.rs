//! The agent's view of Kubernetes: caches of the pods on this node and of all namespaces,
//! kept by kube-runtime watchers, and a stream of the pods whose desired state may have
//! changed, for the reconciler's work queue.
//!
//! kube-runtime does the protocol work: resuming from bookmarks, a fresh list after 410 Gone,
//! and (with the backoff set here) waiting between retries when the API server fails. What is
//! added here is the bookkeeping a work queue needs:
//! - a pod applied or deleted → its key;
//! - a namespace whose `istio.io/dataplane-mode` label changed (or that appeared or went) →
//!   the keys of its pods on this node;
//! - after every (re)list → every pod's key, plus the keys of pods that vanished while the
//!   watch was down (no Delete is ever sent for those, so they are found by diffing the cache
//!   before and after the list).
//!
//! Keys are pod UIDs with the name for logs: the reconciler looks the pod up in [`Caches`]
//! when it works on the key, so a burst of changes to one pod is handled once, with the latest
//! state, and a key whose pod is gone from the cache means "not wanted any more".
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use backon::BackoffBuilder as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store, store::Writer},
        utils::Backoff,
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::policy::DATAPLANE_MODE_LABEL;

/// What to watch and how to retry.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// This node (`NODE_NAME`): only its pods are watched.
    pub node_name: String,
    /// Wait after the first API error; doubles (with jitter) up to `backoff_max`, and starts
    /// over as soon as events flow again.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl WatchSettings {
    pub fn new(node_name: impl Into<String>) -> Self {
        WatchSettings {
            node_name: node_name.into(),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// A pod to reconcile. Ordered and hashable for the work queue; equality is by all fields,
/// but the UID alone identifies the pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn of(pod: &Pod) -> Option<PodKey> {
        Some(PodKey {
            uid: pod.metadata.uid.clone()?,
            namespace: pod.namespace()?,
            name: pod.name_any(),
        })
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// How the watches have fared, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WatchCounts {
    /// Complete lists of this node's pods received: 1 after start-up, +1 for every relist
    /// (after 410 Gone, or a watch that could not be resumed).
    pub pod_lists: u64,
    pub namespace_lists: u64,
    /// API errors seen by either watch (each one was followed by a backoff).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Stats {
    pod_lists: AtomicU64,
    namespace_lists: AtomicU64,
    errors: AtomicU64,
}

/// Read access to the caches. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    stats: Arc<Stats>,
}

#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes watch stopped before its first list")]
pub struct WatchStopped;

impl Caches {
    /// Resolves once both caches hold a complete list.
    pub async fn wait_synced(&self) -> Result<(), WatchStopped> {
        self.pods
            .wait_until_ready()
            .await
            .map_err(|_| WatchStopped)?;
        self.namespaces
            .wait_until_ready()
            .await
            .map_err(|_| WatchStopped)
    }

    /// The pod on this node with this UID.
    pub fn pod(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods.find(|p| p.metadata.uid.as_deref() == Some(uid))
    }

    /// The pod on this node with this name (what a CNI ADD carries; check the UID too).
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    /// Every pod on this node (for a periodic resync).
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        self.pods.state()
    }

    pub fn counts(&self) -> WatchCounts {
        WatchCounts {
            pod_lists: self.stats.pod_lists.load(Ordering::Relaxed),
            namespace_lists: self.stats.namespace_lists.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
        }
    }
}

/// Sets up the watches. Returns the caches, the stream of changed pods, and the future that
/// runs the watches: spawn it, and drop (abort) it to stop. Until it runs, the caches are
/// empty and [`Caches::wait_synced`] waits.
pub fn start(
    client: Client,
    settings: WatchSettings,
) -> (
    Caches,
    mpsc::UnboundedReceiver<PodKey>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let caches = Caches {
        pods,
        namespaces,
        stats: Arc::default(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let run = {
        let caches = caches.clone();
        async move {
            let pods = watch_pods(&client, &settings, pod_writer, &caches, tx.clone());
            let namespaces = watch_namespaces(&client, &settings, ns_writer, &caches, tx);
            futures_util::future::join(pods, namespaces).await;
        }
    };
    (caches, rx, run)
}

fn backoff(settings: &WatchSettings) -> RetryBackoff {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(settings.backoff_min)
        .with_max_delay(settings.backoff_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    RetryBackoff {
        current: builder.build(),
        builder,
    }
}

/// Exponential backoff with jitter, started over by the watch stream whenever an event gets
/// through. (kube-runtime's own `ExponentialBackoff` has no public constructor; this is the
/// same thing on the same crate.)
struct RetryBackoff {
    builder: backon::ExponentialBuilder,
    current: backon::ExponentialBackoff,
}

impl Iterator for RetryBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.current.next()
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

async fn watch_pods(
    client: &Client,
    settings: &WatchSettings,
    mut writer: Writer<Pod>,
    caches: &Caches,
    tx: mpsc::UnboundedSender<PodKey>,
) {
    let api: Api<Pod> = Api::all(client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let mut stream = watcher::watcher(api, config)
        .backoff(backoff(settings))
        .boxed();
    let send = |key: PodKey| {
        // A closed receiver means nobody reconciles; the caches are still kept.
        let _ = tx.send(key);
    };
    // Keys cached when a (re)list began, and the UIDs the list has delivered so far.
    let mut before: HashMap<String, PodKey> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                caches.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "watching pods");
                continue;
            }
        };
        match &event {
            Event::Init => {
                before = caches
                    .pods
                    .state()
                    .iter()
                    .filter_map(|p| PodKey::of(p).map(|k| (k.uid.clone(), k)))
                    .collect();
                listed.clear();
            }
            Event::InitApply(pod) => {
                if let Some(uid) = &pod.metadata.uid {
                    listed.insert(uid.clone());
                }
            }
            Event::Apply(_) | Event::Delete(_) | Event::InitDone => {}
        }
        writer.apply_watcher_event(&event);
        match event {
            Event::Apply(pod) | Event::Delete(pod) => match PodKey::of(&pod) {
                Some(key) => send(key),
                None => warn!(pod = %pod.name_any(), "a pod without UID or namespace"),
            },
            Event::InitDone => {
                let n = caches.stats.pod_lists.fetch_add(1, Ordering::Relaxed) + 1;
                let gone: Vec<PodKey> = before
                    .drain()
                    .filter(|(uid, _)| !listed.contains(uid))
                    .map(|(_, k)| k)
                    .collect();
                info!(
                    lists = n,
                    pods = listed.len(),
                    vanished = gone.len(),
                    "pods on this node listed"
                );
                for key in gone {
                    debug!(pod = %key, "pod vanished while the watch was down");
                    send(key);
                }
                caches
                    .pods
                    .state()
                    .iter()
                    .filter_map(|p| PodKey::of(p))
                    .for_each(send);
            }
            Event::Init | Event::InitApply(_) => {}
        }
    }
}

async fn watch_namespaces(
    client: &Client,
    settings: &WatchSettings,
    mut writer: Writer<Namespace>,
    caches: &Caches,
    tx: mpsc::UnboundedSender<PodKey>,
) {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .backoff(backoff(settings))
        .boxed();
    let enqueue_pods_of = |ns: Option<&str>| {
        for pod in caches.pods.state() {
            if ns.is_none_or(|ns| pod.metadata.namespace.as_deref() == Some(ns))
                && let Some(key) = PodKey::of(&pod)
            {
                let _ = tx.send(key);
            }
        }
    };
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                caches.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "watching namespaces");
                continue;
            }
        };
        // Only the mode label matters to enrollment; other namespace updates are noise.
        let changed = match &event {
            Event::Apply(ns) | Event::Delete(ns) => {
                let old = caches.namespace(&ns.name_any());
                let mode = |n: &Namespace| n.labels().get(DATAPLANE_MODE_LABEL).cloned();
                matches!(event, Event::Delete(_)) || old.is_none_or(|old| mode(&old) != mode(ns))
            }
            _ => false,
        };
        writer.apply_watcher_event(&event);
        match event {
            Event::Apply(ns) | Event::Delete(ns) if changed => {
                debug!(namespace = %ns.name_any(), "namespace mode changed");
                enqueue_pods_of(Some(&ns.name_any()));
            }
            // Anything may have changed while the watch was down.
            Event::InitDone => {
                let n = caches.stats.namespace_lists.fetch_add(1, Ordering::Relaxed) + 1;
                debug!(lists = n, "namespaces listed");
                enqueue_pods_of(None);
            }
            _ => {}
        }
    }
}
