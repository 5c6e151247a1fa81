//! The reconciler's work queue, keyed by pod UID, with the semantics of client-go's and
//! kube-runtime's queues:
//! - a key is queued at most once, however often it is added before a worker takes it;
//! - a key is never worked on by two workers at once: added while it runs, it runs once more
//!   afterwards;
//! - a failed run is retried after a backoff that grows per key (and starts over once it
//!   succeeds); adding the key again runs it at once;
//! - a caller can wait for the outcome of the next run of a key that starts after it asked
//!   (how a CNI ADD waits on the same worker as the watcher, instead of racing it).
//!
//! kube-runtime's `Controller` has the first three, but it keys by name (a pod deleted and
//! re-created under the same name is another pod here), only reconciles objects still in its
//! cache (a deleted pod must be un-enrolled), and has nothing like the fourth: hence this.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::{Notify, oneshot};

/// Delays between retries of a failing key: `min`, doubling, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    fn delay(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// A key a worker has taken.
#[derive(Debug)]
pub struct Job<O> {
    pub uid: String,
    /// Failed runs in a row before this one.
    pub failures: u32,
    waiters: Vec<oneshot::Sender<O>>,
}

struct State<O> {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    running: HashSet<String>,
    /// Added while running: run again when done.
    again: HashSet<String>,
    failures: HashMap<String, u32>,
    retry_scheduled: HashSet<String>,
    /// For the next run of each key.
    waiters: HashMap<String, Vec<oneshot::Sender<O>>>,
}

pub struct Queue<O> {
    state: Mutex<State<O>>,
    ready: Notify,
    backoff: Backoff,
}

impl<O: Clone + Send + 'static> Queue<O> {
    pub fn new(backoff: Backoff) -> Arc<Self> {
        Arc::new(Queue {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                queued: HashSet::new(),
                running: HashSet::new(),
                again: HashSet::new(),
                failures: HashMap::new(),
                retry_scheduled: HashSet::new(),
                waiters: HashMap::new(),
            }),
            ready: Notify::new(),
            backoff,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<O>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `uid` (once).
    pub fn add(&self, uid: &str) {
        let mut st = self.lock();
        Self::push(&mut st, uid);
        drop(st);
        self.ready.notify_one();
    }

    fn push(st: &mut State<O>, uid: &str) {
        if st.running.contains(uid) {
            st.again.insert(uid.to_string());
        } else if st.queued.insert(uid.to_string()) {
            st.ready.push_back(uid.to_string());
        }
    }

    /// Queues `uid` and returns the outcome of its next run that starts after this call.
    pub fn add_waiting(&self, uid: &str) -> oneshot::Receiver<O> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        st.waiters.entry(uid.to_string()).or_default().push(tx);
        Self::push(&mut st, uid);
        drop(st);
        self.ready.notify_one();
        rx
    }

    /// The next key to work on; it is the caller's until [`Queue::done`].
    pub async fn next(&self) -> Job<O> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = self.take() {
                return job;
            }
            notified.await;
        }
    }

    fn take(&self) -> Option<Job<O>> {
        let mut st = self.lock();
        let uid = st.ready.pop_front()?;
        st.queued.remove(&uid);
        st.running.insert(uid.clone());
        let waiters = st.waiters.remove(&uid).unwrap_or_default();
        let failures = st.failures.get(&uid).copied().unwrap_or(0);
        let more = !st.ready.is_empty();
        drop(st);
        if more {
            // Another worker may take the next one.
            self.ready.notify_one();
        }
        Some(Job {
            uid,
            failures,
            waiters,
        })
    }

    /// Ends a run: tells its waiters `outcome`, and with `retry` schedules the key again after
    /// its backoff (unless it was added meanwhile, which runs it at once).
    pub fn done(self: &Arc<Self>, job: Job<O>, outcome: O, retry: bool) {
        for w in job.waiters {
            let _ = w.send(outcome.clone());
        }
        let uid = job.uid;
        let mut st = self.lock();
        st.running.remove(&uid);
        let delay = if retry {
            let n = st.failures.entry(uid.clone()).or_insert(0);
            *n = n.saturating_add(1);
            Some(self.backoff.delay(*n))
        } else {
            st.failures.remove(&uid);
            None
        };
        if st.again.remove(&uid) {
            Self::push(&mut st, &uid);
            drop(st);
            self.ready.notify_one();
            return;
        }
        let Some(delay) = delay else { return };
        if !st.retry_scheduled.insert(uid.clone()) {
            return;
        }
        drop(st);
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.lock().retry_scheduled.remove(&uid);
            queue.add(&uid);
        });
    }

    /// Keys queued or running (for status).
    pub fn in_progress(&self) -> usize {
        let st = self.lock();
        st.ready.len() + st.running.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Arc<Queue<&'static str>> {
        Queue::new(Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(400),
        })
    }

    async fn next_now(q: &Queue<&'static str>) -> Option<Job<&'static str>> {
        tokio::time::timeout(Duration::from_millis(1), q.next())
            .await
            .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_deduplicated_and_run_in_order() {
        let q = queue();
        for uid in ["a", "b", "a", "c", "b"] {
            q.add(uid);
        }
        for want in ["a", "b", "c"] {
            let job = next_now(&q).await.unwrap();
            assert_eq!(job.uid, want);
            q.done(job, "ok", false);
        }
        assert!(next_now(&q).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_added_while_running_runs_again_after_and_never_twice_at_once() {
        let q = queue();
        q.add("a");
        let first = next_now(&q).await.unwrap();
        q.add("a");
        q.add("a");
        assert!(next_now(&q).await.is_none(), "not while it runs");
        q.done(first, "ok", false);
        let second = next_now(&q).await.unwrap();
        assert_eq!(second.uid, "a");
        q.done(second, "ok", false);
        assert!(next_now(&q).await.is_none(), "once more, not twice");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_run_that_starts_after_it_asked() {
        let q = queue();
        q.add("a");
        let running = next_now(&q).await.unwrap();
        let mut rx = q.add_waiting("a");
        q.done(running, "stale", false);
        assert!(
            rx.try_recv().is_err(),
            "the run in progress is not its answer"
        );
        let job = next_now(&q).await.unwrap();
        q.done(job, "fresh", false);
        assert_eq!(rx.await.unwrap(), "fresh");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_per_key_and_success_resets() {
        let q = queue();
        q.add("a");
        let mut delays = Vec::new();
        for _ in 0..4 {
            let started = tokio::time::Instant::now();
            let job = q.next().await;
            delays.push(started.elapsed());
            assert_eq!(job.uid, "a");
            q.done(job, "failed", true);
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 100, 200, 400]);
        let job = q.next().await;
        assert_eq!(job.failures, 4);
        q.done(job, "ok", false);
        q.add("a");
        assert_eq!(next_now(&q).await.unwrap().failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn adding_a_failing_key_runs_it_without_waiting_for_the_backoff() {
        let q = queue();
        q.add("a");
        let job = next_now(&q).await.unwrap();
        q.done(job, "failed", true);
        assert!(next_now(&q).await.is_none());
        q.add("a");
        let job = next_now(&q).await.unwrap();
        assert_eq!(job.failures, 1);
        q.done(job, "ok", false);
        // The scheduled retry still comes; it is harmless (runs are idempotent).
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(next_now(&q).await.unwrap().uid, "a");
    }
}
