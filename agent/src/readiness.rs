//! Conditions that hold `/readyz` at "not ready" besides the agent's own start-up, each with a
//! reason a person can act on (e.g. the CNI installer while the conflist lacks our entry).
use std::{collections::BTreeMap, sync::Mutex};

#[derive(Debug, Default)]
pub struct Readiness {
    blockers: Mutex<BTreeMap<&'static str, String>>,
    changed: tokio::sync::Notify,
}

impl Readiness {
    /// `condition` is not met, because of `reason`.
    pub fn block(&self, condition: &'static str, reason: impl Into<String>) {
        self.lock().insert(condition, reason.into());
        self.changed.notify_waiters();
    }

    pub fn clear(&self, condition: &'static str) {
        self.lock().remove(condition);
        self.changed.notify_waiters();
    }

    /// Resolves once no condition is unmet (at once if none is).
    pub async fn until_clear(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change between the look and the wait is seen.
            changed.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// `condition: reason` for every unmet condition.
    pub fn blockers(&self) -> Vec<String> {
        self.lock()
            .iter()
            .map(|(c, r)| format!("{c}: {r}"))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.blockers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn until_clear_waits_for_the_last_condition() {
        let r = std::sync::Arc::new(super::Readiness::default());
        r.until_clear().await;
        r.block("a", "x");
        r.block("b", "y");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.until_clear().await }
        });
        r.clear("a");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        r.clear("b");
        waiter.await.unwrap();
    }

    #[test]
    fn blockers_come_and_go() {
        let r = super::Readiness::default();
        assert!(r.blockers().is_empty());
        r.block("cni", "no config");
        r.block("cni", "entry missing");
        assert_eq!(r.blockers(), vec!["cni: entry missing".to_string()]);
        r.clear("cni");
        assert!(r.blockers().is_empty());
    }
}
