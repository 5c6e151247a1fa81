//! Conditions that hold `/readyz` at "not ready" besides the agent's own start-up, each with a
//! reason a person can act on (e.g. the CNI installer while the conflist lacks our entry).
use std::{collections::BTreeMap, sync::Mutex};

#[derive(Debug, Default)]
pub struct Readiness {
    blockers: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// `condition` is not met, because of `reason`.
    pub fn block(&self, condition: &'static str, reason: impl Into<String>) {
        self.lock().insert(condition, reason.into());
    }

    pub fn clear(&self, condition: &'static str) {
        self.lock().remove(condition);
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
