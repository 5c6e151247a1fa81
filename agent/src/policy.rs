//! Which pods must be enrolled. Until the agent watches Kubernetes, this is standalone mode:
//! namespaces listed in the agent's settings or in the plugin's config, minus excluded ones
//! (`kube-system` always). [`EnrollPolicy::decide`] is the one place the decision is made;
//! a Kubernetes-aware policy (namespace and pod labels) replaces it.
use std::collections::BTreeSet;

use crate::control::api::CniAddRequest;

/// Never enrolled, whatever the settings say (as istio-cni).
pub const ALWAYS_EXCLUDED: &str = "kube-system";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Enroll,
    Skip(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrollPolicy {
    ambient: BTreeSet<String>,
    excluded: BTreeSet<String>,
}

impl EnrollPolicy {
    /// `ambient`: namespaces whose pods are enrolled; `excluded` (Istio's
    /// `EXCLUDE_NAMESPACES`): never, and `kube-system` never either.
    pub fn standalone(
        ambient: impl IntoIterator<Item = String>,
        excluded: impl IntoIterator<Item = String>,
    ) -> Self {
        let clean = |s: String| {
            let s = s.trim().to_string();
            (!s.is_empty()).then_some(s)
        };
        let mut excluded: BTreeSet<String> = excluded.into_iter().filter_map(clean).collect();
        excluded.insert(ALWAYS_EXCLUDED.to_string());
        EnrollPolicy {
            ambient: ambient.into_iter().filter_map(clean).collect(),
            excluded,
        }
    }

    /// Whether the pod a CNI ADD is about must be enrolled.
    pub fn decide(&self, req: &CniAddRequest) -> Decision {
        let ns = &req.pod.namespace;
        if self.excluded.contains(ns) || req.exclude_namespaces.contains(ns) {
            return Decision::Skip(format!("namespace {ns} is excluded"));
        }
        let listed_by_plugin = req
            .ambient_namespaces
            .as_ref()
            .is_some_and(|l| l.contains(ns));
        if self.ambient.contains(ns) || listed_by_plugin {
            Decision::Enroll
        } else {
            Decision::Skip(format!("namespace {ns} is not an ambient namespace"))
        }
    }

    /// What the installer writes as the plugin's `exclude_namespaces`.
    pub fn excluded(&self) -> Vec<String> {
        self.excluded.iter().cloned().collect()
    }

    /// What the installer writes as the plugin's `ambient_namespaces`: the complete list, so
    /// the plugin can pass other pods while the agent is down. A policy that needs the agent to
    /// decide (Kubernetes labels) returns `None`, and the plugin then fails closed.
    pub fn plugin_ambient_namespaces(&self) -> Option<Vec<String>> {
        Some(self.ambient.iter().cloned().collect())
    }
}

/// The uid a CNI-enrolled pod is known by: `K8S_POD_UID`, or when the runtime does not pass
/// it, `cni-<sandbox container id>`, which is stable across retries of the same sandbox and
/// what DEL and GC match anyway (they go by container id).
pub fn pod_uid(req: &CniAddRequest) -> String {
    match &req.pod.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        _ => format!("cni-{}", req.container_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::api::CniPod;

    fn req(ns: &str, plugin_ambient: Option<&[&str]>, plugin_excluded: &[&str]) -> CniAddRequest {
        CniAddRequest {
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            pod: CniPod {
                namespace: ns.into(),
                name: "p".into(),
                uid: None,
            },
            ips: vec![],
            ambient_namespaces: plugin_ambient.map(|l| l.iter().map(|s| s.to_string()).collect()),
            exclude_namespaces: plugin_excluded.iter().map(|s| s.to_string()).collect(),
            timeout_ms: None,
        }
    }

    #[test]
    fn namespaces_from_either_source_enroll_unless_excluded() {
        let p = EnrollPolicy::standalone(["a".to_string(), " ".to_string()], ["x".to_string()]);
        assert_eq!(p.decide(&req("a", None, &[])), Decision::Enroll);
        assert_eq!(p.decide(&req("b", Some(&["b"]), &[])), Decision::Enroll);
        assert!(matches!(
            p.decide(&req("c", Some(&["b"]), &[])),
            Decision::Skip(_)
        ));
        assert!(matches!(
            p.decide(&req("a", None, &["a"])),
            Decision::Skip(_)
        ));
        assert!(matches!(
            p.decide(&req("x", Some(&["x"]), &[])),
            Decision::Skip(_)
        ));
        let ks = EnrollPolicy::standalone(["kube-system".to_string()], []);
        assert!(matches!(
            ks.decide(&req("kube-system", None, &[])),
            Decision::Skip(_)
        ));
        assert_eq!(
            p.excluded(),
            vec!["kube-system".to_string(), "x".to_string()]
        );
        assert_eq!(p.plugin_ambient_namespaces(), Some(vec!["a".to_string()]));
    }

    #[test]
    fn a_missing_uid_falls_back_to_the_container() {
        let mut r = req("a", None, &[]);
        assert_eq!(pod_uid(&r), "cni-c1");
        r.pod.uid = Some("u-1".into());
        assert_eq!(pod_uid(&r), "u-1");
    }
}
