//! The set of ztunnel connections and the workloads ztunnel must know about.
//!
//! One lock serialises workload changes and connection registration, so a new connection's
//! snapshot and the live Adds after it can neither miss nor repeat a workload: whatever is in
//! the map when a connection registers goes into its snapshot, and every later change is queued
//! behind that snapshot. Adds go to the newest connection only; Dels go to every connection
//! (old and new ztunnel overlap during an upgrade).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::{AckResult, AckState, Workload};

/// Something for one connection to send, and who wants to know the outcome.
#[derive(Debug)]
pub(crate) struct Job {
    pub kind: JobKind,
    pub done: Option<oneshot::Sender<AckResult>>,
}

#[derive(Debug, Clone)]
pub(crate) enum JobKind {
    /// Add (or Keep when the netns cannot be opened, in a snapshot only).
    Add {
        workload: Workload,
        in_snapshot: bool,
    },
    Del {
        uid: String,
    },
    SnapshotSent,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Job>,
}

struct Entry {
    workload: Workload,
    state: AckState,
    /// NACKs in a row, for the retry backoff.
    nacks: u32,
    /// Bumped whenever an Add for this workload is queued (live, snapshot or retry): a
    /// scheduled retry carries the generation it was made for and is dropped if another Add
    /// went out since. So there is at most one pending retry per workload, and a snapshot
    /// supersedes it.
    generation: u64,
    retry_pending: bool,
}

impl Entry {
    fn new(workload: Workload) -> Self {
        Entry {
            workload,
            state: AckState::Pending,
            nacks: 0,
            generation: 0,
            retry_pending: false,
        }
    }

    /// Another Add is on its way: any scheduled retry is now stale.
    fn supersede(&mut self) {
        self.generation += 1;
        self.retry_pending = false;
    }
}

#[derive(Default)]
struct State {
    workloads: BTreeMap<String, Entry>,
    /// In registration order: the last one is the newest ztunnel.
    conns: Vec<Conn>,
    next_id: u64,
    /// Told the uid of every workload the newest ztunnel acknowledges (see [`Hub::acks`]).
    ack_listeners: Vec<mpsc::UnboundedSender<String>>,
}

/// Backoff for re-sending an Add that ztunnel NACKed.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, nacks: u32) -> Duration {
        let factor = 2u32.saturating_pow(nacks.saturating_sub(1).min(16));
        self.first.saturating_mul(factor).min(self.max)
    }
}

pub struct Hub {
    state: Mutex<State>,
    retry: RetryPolicy,
}

impl Hub {
    pub fn new(retry: RetryPolicy) -> Arc<Self> {
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            retry,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A workload ztunnel must serve (new, or re-sent). The receiver resolves with ztunnel's
    /// answer, or at once with `NotSent` if no ztunnel is connected.
    pub fn add(&self, workload: Workload) -> oneshot::Receiver<AckResult> {
        let (done, rx) = oneshot::channel();
        let mut st = self.lock();
        let uid = workload.uid.clone();
        let entry = st
            .workloads
            .entry(uid)
            .or_insert_with(|| Entry::new(workload.clone()));
        entry.workload = workload.clone();
        entry.state = AckState::Pending;
        entry.nacks = 0;
        entry.supersede();
        send_add(&mut st, workload, done);
        rx
    }

    /// Makes sure ztunnel is told about `workload`: resolves at once if ztunnel already
    /// acknowledged this very workload, else (re)sends the Add. Idempotent, for retried
    /// requests.
    pub fn ensure(&self, workload: Workload) -> oneshot::Receiver<AckResult> {
        {
            let st = self.lock();
            if let Some(e) = st.workloads.get(&workload.uid)
                && e.state == AckState::Acked
                && e.workload.info == workload.info
                && same_netns(&e.workload, &workload)
            {
                let (done, rx) = oneshot::channel();
                let _ = done.send(AckResult::Acked);
                return rx;
            }
        }
        self.add(workload)
    }

    /// A workload ztunnel must drop: Del to every connection.
    pub fn remove(&self, uid: &str) {
        let mut st = self.lock();
        st.workloads.remove(uid);
        st.conns.retain(|c| {
            c.tx.send(Job {
                kind: JobKind::Del {
                    uid: uid.to_string(),
                },
                done: None,
            })
            .is_ok()
        });
    }

    /// Registers a connection that said hello: queues its snapshot (an Add, or a Keep, per
    /// workload, then SnapshotSent) and makes it the newest.
    pub(crate) fn register(&self, tx: mpsc::UnboundedSender<Job>) -> u64 {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        for entry in st.workloads.values_mut() {
            entry.state = AckState::Pending;
            entry.supersede();
            let job = Job {
                kind: JobKind::Add {
                    workload: entry.workload.clone(),
                    in_snapshot: true,
                },
                done: None,
            };
            let _ = tx.send(job);
        }
        let _ = tx.send(Job {
            kind: JobKind::SnapshotSent,
            done: None,
        });
        st.conns.push(Conn { id, tx });
        info!(
            connection = id,
            workloads = st.workloads.len(),
            "ztunnel connected; snapshot queued"
        );
        id
    }

    pub(crate) fn unregister(&self, id: u64) {
        let mut st = self.lock();
        st.conns.retain(|c| c.id != id);
        info!(
            connection = id,
            remaining = st.conns.len(),
            "ztunnel connection closed"
        );
    }

    /// Records ztunnel's answer to an Add sent on connection `id`, and schedules a retry after
    /// a NACK from the newest connection.
    pub(crate) fn on_add_result(self: &Arc<Self>, id: u64, uid: &str, result: &AckResult) {
        let mut guard = self.lock();
        // A plain `&mut`, so that an entry and the listeners can be borrowed at once.
        let st = &mut *guard;
        let newest = st.conns.last().map(|c| c.id) == Some(id);
        let Some(entry) = st.workloads.get_mut(uid) else {
            return;
        };
        if !newest {
            return;
        }
        match result {
            AckResult::Acked => {
                entry.state = AckState::Acked;
                entry.nacks = 0;
                st.ack_listeners.retain(|l| l.send(uid.to_string()).is_ok());
            }
            AckResult::Nacked(err) => {
                entry.state = AckState::Nacked(err.clone());
                entry.nacks += 1;
                if entry.retry_pending {
                    return;
                }
                entry.retry_pending = true;
                let generation = entry.generation;
                let delay = self.retry.delay(entry.nacks);
                debug!(uid, ?delay, "ztunnel refused the workload; retrying");
                let hub = Arc::clone(self);
                let uid = uid.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    hub.retry(&uid, generation);
                });
            }
            AckResult::NotSent(_) => {}
        }
    }

    fn retry(&self, uid: &str, generation: u64) {
        let mut st = self.lock();
        let Some(entry) = st.workloads.get_mut(uid) else {
            return;
        };
        if entry.generation != generation || !matches!(entry.state, AckState::Nacked(_)) {
            return;
        }
        entry.generation += 1;
        entry.retry_pending = false;
        let workload = entry.workload.clone();
        let (done, _) = oneshot::channel();
        send_add(&mut st, workload, done);
    }

    /// ztunnel's view of one workload (`None`: not one ztunnel must serve).
    pub fn state(&self, uid: &str) -> Option<AckState> {
        self.lock().workloads.get(uid).map(|e| e.state.clone())
    }

    /// The uids ztunnel acknowledges from now on, as it does (an Add's ACK from the newest
    /// connection): how the reconciler learns that a pod's annotation may say `enabled`.
    pub fn acks(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().ack_listeners.push(tx);
        rx
    }

    /// ztunnel's view of each workload.
    pub fn states(&self) -> BTreeMap<String, AckState> {
        self.lock()
            .workloads
            .iter()
            .map(|(uid, e)| (uid.clone(), e.state.clone()))
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }
}

fn same_netns(a: &Workload, b: &Workload) -> bool {
    match (&a.netns, &b.netns) {
        (Some(x), Some(y)) => x.inode() == y.inode(),
        (None, None) => true,
        _ => false,
    }
}

/// A live Add: to the newest connection.
fn send_add(st: &mut State, workload: Workload, done: oneshot::Sender<AckResult>) {
    send_to_newest(
        st,
        JobKind::Add {
            workload,
            in_snapshot: false,
        },
        done,
    );
}

fn send_to_newest(st: &mut State, kind: JobKind, done: oneshot::Sender<AckResult>) {
    let mut job = Job {
        kind,
        done: Some(done),
    };
    // A connection whose task ended has a closed channel: drop it and try the next newest.
    while let Some(conn) = st.conns.last() {
        match conn.tx.send(job) {
            Ok(()) => return,
            Err(mpsc::error::SendError(back)) => {
                job = back;
                st.conns.pop();
            }
        }
    }
    if let Some(done) = job.done {
        let _ = done.send(AckResult::NotSent("no ztunnel is connected".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zds::proto::WorkloadInfo;

    fn workload(uid: &str) -> Workload {
        Workload {
            uid: uid.into(),
            info: WorkloadInfo::default(),
            netns: None,
        }
    }

    fn kinds(rx: &mut mpsc::UnboundedReceiver<Job>) -> Vec<String> {
        let mut out = vec![];
        while let Ok(job) = rx.try_recv() {
            out.push(match job.kind {
                JobKind::Add {
                    workload,
                    in_snapshot: true,
                } => format!("snap:{}", workload.uid),
                JobKind::Add {
                    workload,
                    in_snapshot: false,
                } => format!("add:{}", workload.uid),
                JobKind::Del { uid } => format!("del:{uid}"),
                JobKind::SnapshotSent => "sent".into(),
            });
        }
        out
    }

    #[tokio::test]
    async fn without_ztunnel_an_add_is_not_sent_but_remembered() {
        let hub = Hub::new(RetryPolicy::default());
        let r = hub.add(workload("a")).await.unwrap();
        assert!(matches!(r, AckResult::NotSent(_)));
        assert_eq!(hub.states().get("a"), Some(&AckState::Pending));
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.register(tx);
        assert_eq!(kinds(&mut rx), ["snap:a", "sent"]);
    }

    #[tokio::test]
    async fn adds_go_to_the_newest_connection_and_dels_to_all() {
        let hub = Hub::new(RetryPolicy::default());
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        hub.register(tx1);
        drop(hub.add(workload("a")));
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        hub.register(tx2);
        drop(hub.add(workload("b")));
        hub.remove("a");
        assert_eq!(kinds(&mut rx1), ["sent", "add:a", "del:a"]);
        assert_eq!(kinds(&mut rx2), ["snap:a", "sent", "add:b", "del:a"]);
    }

    #[tokio::test]
    async fn a_closed_newest_connection_falls_back_to_the_previous_one() {
        let hub = Hub::new(RetryPolicy::default());
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        hub.register(tx1);
        let (tx2, rx2) = mpsc::unbounded_channel();
        hub.register(tx2);
        drop(rx2);
        drop(hub.add(workload("a")));
        assert_eq!(kinds(&mut rx1), ["sent", "add:a"]);
        assert_eq!(hub.connections(), 1);
    }

    /// A ztunnel that NACKs a pod on every connection: the live Add and each reconnect's
    /// snapshot Add are refused. However many NACKs came before, there is one retry schedule
    /// for the pod, and each snapshot replaces it.
    #[tokio::test(start_paused = true)]
    async fn a_pod_nacked_across_reconnects_has_one_pending_retry() {
        let hub = Hub::new(RetryPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_millis(100),
        });
        let nack = AckResult::Nacked("no".into());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut id = hub.register(tx);
        drop(hub.add(workload("a")));
        assert_eq!(kinds(&mut rx), ["sent", "add:a"]);
        hub.on_add_result(id, "a", &nack);
        for _ in 0..4 {
            // Half-way to the retry, ztunnel reconnects and refuses the snapshot Add too.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (tx, rx2) = mpsc::unbounded_channel();
            let new = hub.register(tx);
            hub.unregister(id);
            (id, rx) = (new, rx2);
            assert_eq!(kinds(&mut rx), ["snap:a", "sent"]);
            hub.on_add_result(id, "a", &nack);
        }
        // Over one second every retry is refused; with a constant 100 ms backoff that is ten
        // retries, whatever happened before (not one more loop per reconnect).
        let mut adds = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            for k in kinds(&mut rx) {
                assert_eq!(k, "add:a");
                adds += 1;
                hub.on_add_result(id, "a", &nack);
            }
        }
        assert!((9..=10).contains(&adds), "{adds} retries in 1 s");
    }

    #[test]
    fn retry_backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(400));
        assert_eq!(p.delay(10), Duration::from_secs(1));
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
    }
}
