//! Which pods are enrolled. There is one set of rules, Istio's ([`k8s::policy::decide`]); the
//! agent's two modes differ only in where the pod and its namespace come from:
//!
//! - [`EnrollPolicy::Standalone`] (no cluster: the demo, the CNI tests): the pod is what the
//!   CNI request names, without labels or annotations, and its namespace counts as labelled
//!   `istio.io/dataplane-mode=ambient` when the agent's flags or the plugin's entry list it.
//! - [`EnrollPolicy::Kubernetes`]: the pod and its namespace from the API server's caches;
//!   the reconciler (`reconcile`) asks, for CNI ADDs as for everything else.
//!
//! Exclusions (`kube-system`, `EXCLUDE_NAMESPACES`) are the same in both.
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ObjectMeta;

use crate::{
    control::api::CniAddRequest,
    k8s::policy::{self as rules, DATAPLANE_MODE_LABEL, MODE_AMBIENT},
};

pub use crate::k8s::policy::{Decision, PodOptions, PolicySettings, Skip};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollPolicy {
    Standalone {
        /// Namespaces that count as labelled ambient.
        ambient: BTreeSet<String>,
        settings: PolicySettings,
    },
    Kubernetes(PolicySettings),
}

impl EnrollPolicy {
    /// `ambient`: namespaces whose pods are enrolled; `excluded` (Istio's
    /// `EXCLUDE_NAMESPACES`): never, and `kube-system` never either.
    pub fn standalone(
        ambient: impl IntoIterator<Item = String>,
        excluded: impl IntoIterator<Item = String>,
    ) -> Self {
        EnrollPolicy::Standalone {
            ambient: clean(ambient),
            settings: settings("", excluded),
        }
    }

    /// `system_namespace`: where ztunnel runs (Istio's `POD_NAMESPACE`).
    pub fn kubernetes(
        system_namespace: impl Into<String>,
        excluded: impl IntoIterator<Item = String>,
    ) -> Self {
        EnrollPolicy::Kubernetes(settings(system_namespace, excluded))
    }

    pub fn settings(&self) -> &PolicySettings {
        match self {
            EnrollPolicy::Standalone { settings, .. } | EnrollPolicy::Kubernetes(settings) => {
                settings
            }
        }
    }

    pub fn is_kubernetes(&self) -> bool {
        matches!(self, EnrollPolicy::Kubernetes(_))
    }

    /// Istio's rules for `pod` in `namespace`.
    pub fn decide(&self, pod: &Pod, namespace: &Namespace) -> Decision {
        rules::decide(pod, namespace, self.settings())
    }

    /// Standalone mode: the decision for the pod a CNI ADD names, from the request alone.
    /// `None` in Kubernetes mode, where the pod must be looked up first.
    pub fn decide_cni(&self, req: &CniAddRequest) -> Option<Decision> {
        let EnrollPolicy::Standalone { ambient, .. } = self else {
            return None;
        };
        let ns = &req.pod.namespace;
        if req.exclude_namespaces.contains(ns) {
            return Some(Decision::Skip(Skip::ExcludedNamespace));
        }
        let listed = ambient.contains(ns)
            || req
                .ambient_namespaces
                .as_ref()
                .is_some_and(|l| l.contains(ns));
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(req.pod.name.clone()),
                namespace: Some(ns.clone()),
                uid: req.pod.uid.clone(),
                ..Default::default()
            },
            ..Default::default()
        };
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                labels: listed
                    .then(|| [(DATAPLANE_MODE_LABEL.to_string(), MODE_AMBIENT.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Some(self.decide(&pod, &namespace))
    }

    /// What the installer writes as the plugin's `exclude_namespaces`.
    pub fn excluded(&self) -> Vec<String> {
        self.settings().exclude_namespaces.iter().cloned().collect()
    }

    /// What the installer writes as the plugin's `ambient_namespaces`: in standalone mode the
    /// complete list, so the plugin can pass other pods while the agent is down; in Kubernetes
    /// mode `None` (labels decide, only the agent knows them), and the plugin then fails
    /// closed.
    pub fn plugin_ambient_namespaces(&self) -> Option<Vec<String>> {
        match self {
            EnrollPolicy::Standalone { ambient, .. } => Some(ambient.iter().cloned().collect()),
            EnrollPolicy::Kubernetes(_) => None,
        }
    }
}

fn clean(names: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    names
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn settings(
    system_namespace: impl Into<String>,
    excluded: impl IntoIterator<Item = String>,
) -> PolicySettings {
    let excluded: Vec<String> = clean(excluded).into_iter().collect();
    PolicySettings::new(system_namespace, &excluded.join(","))
}

/// The uid a CNI-enrolled pod is known by in standalone mode: `K8S_POD_UID`, or when the
/// runtime does not pass it, `cni-<sandbox container id>`, which is stable across retries of
/// the same sandbox and what DEL and GC match anyway (they go by container id).
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

    const ENROLL: Option<Decision> = Some(Decision::Enroll(PodOptions {
        dns_capture: None,
        bypass_inbound: false,
    }));

    #[test]
    fn standalone_namespaces_from_either_source_enroll_unless_excluded() {
        let p = EnrollPolicy::standalone(["a".to_string(), " ".to_string()], ["x".to_string()]);
        let skip = |s| Some(Decision::Skip(s));
        assert_eq!(p.decide_cni(&req("a", None, &[])), ENROLL);
        assert_eq!(p.decide_cni(&req("b", Some(&["b"]), &[])), ENROLL);
        assert_eq!(
            p.decide_cni(&req("c", Some(&["b"]), &[])),
            skip(Skip::NotAmbient)
        );
        assert_eq!(
            p.decide_cni(&req("a", None, &["a"])),
            skip(Skip::ExcludedNamespace)
        );
        assert_eq!(
            p.decide_cni(&req("x", Some(&["x"]), &[])),
            skip(Skip::ExcludedNamespace)
        );
        let ks = EnrollPolicy::standalone(["kube-system".to_string()], []);
        assert_eq!(
            ks.decide_cni(&req("kube-system", None, &[])),
            skip(Skip::ExcludedNamespace)
        );
        assert_eq!(
            p.excluded(),
            vec!["kube-system".to_string(), "x".to_string()]
        );
        assert_eq!(p.plugin_ambient_namespaces(), Some(vec!["a".to_string()]));
    }

    #[test]
    fn kubernetes_mode_decides_from_objects_only() {
        let p = EnrollPolicy::kubernetes("istio-system", ["x".to_string()]);
        assert!(p.is_kubernetes());
        assert_eq!(p.decide_cni(&req("a", Some(&["a"]), &[])), None);
        assert_eq!(p.plugin_ambient_namespaces(), None);
        assert_eq!(
            p.excluded(),
            vec!["kube-system".to_string(), "x".to_string()]
        );
        assert_eq!(p.settings().system_namespace, "istio-system");
    }

    #[test]
    fn a_missing_uid_falls_back_to_the_container() {
        let mut r = req("a", None, &[]);
        assert_eq!(pod_uid(&r), "cni-c1");
        r.pod.uid = Some("u-1".into());
        assert_eq!(pod_uid(&r), "u-1");
    }
}
