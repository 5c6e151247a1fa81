//! One operation per pod at a time, any number of pods at once: an async lock per pod uid,
//! created on first use and dropped when nobody holds or waits for it.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct PodLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Held while one operation on one pod runs.
pub struct PodGuard<'a> {
    owner: &'a PodLocks,
    uid: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl PodLocks {
    pub async fn lock(&self, uid: &str) -> PodGuard<'_> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(uid.to_string()).or_default())
        };
        let guard = lock.lock_owned().await;
        PodGuard {
            owner: self,
            uid: uid.to_string(),
            guard: Some(guard),
        }
    }

    /// How many pods have a lock allocated (held or waited for).
    pub fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Release first, then drop the entry if only the map still refers to it (a waiter
        // holds its own Arc, so the entry stays for it).
        drop(self.guard.take());
        if locks
            .get(&self.uid)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn different_pods_do_not_wait_for_each_other_and_the_same_pod_does() {
        let locks = Arc::new(PodLocks::default());
        let a = locks.lock("a").await;
        // Another pod: immediately.
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("pod b must not wait for pod a");
        // The same pod: waits until released.
        let l2 = Arc::clone(&locks);
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a").await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
        drop(b);
        assert!(locks.is_empty(), "entries are dropped when unused");
    }
}
