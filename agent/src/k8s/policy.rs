//! Which pods are in the mesh: Istio's ambient enrollment rules, as a pure function of a Pod,
//! its Namespace and the agent's settings, so every path (watcher, CNI ADD, resync) decides
//! the same way.
//!
//! The rules match istio-cni's (`PodRedirectionEnabled`, `IsZtunnelPod`, the terminal-pod
//! check, `getPodLevelTrafficOverrides`), plus the exclusions its CNI plugin applies:
//! - enrolled when the namespace or the pod has `istio.io/dataplane-mode=ambient`;
//! - a pod label `istio.io/dataplane-mode=none` opts the pod out, even in an ambient namespace;
//! - never: hostNetwork pods, pods with an Istio sidecar (annotation `sidecar.istio.io/status`
//!   or a container named `istio-proxy`), the ztunnel pods (label `app=ztunnel` in the
//!   agent's own namespace, as istio-cni recognises them), namespace `kube-system` and the
//!   configured `EXCLUDE_NAMESPACES`, and terminal pods (phase Succeeded or Failed);
//! - per pod: `ambient.istio.io/bypass-inbound-capture` and `ambient.istio.io/dns-capture`,
//!   read as Go's `strconv.ParseBool` reads them; a value it would reject is ignored.
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Namespace, Pod};

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const MODE_AMBIENT: &str = "ambient";
pub const MODE_NONE: &str = "none";
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
pub const SIDECAR_CONTAINER: &str = "istio-proxy";
pub const BYPASS_INBOUND_ANNOTATION: &str = "ambient.istio.io/bypass-inbound-capture";
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";
/// ztunnel's pods carry `app=ztunnel` in the system namespace (istio-cni's `IsZtunnelPod`).
pub const ZTUNNEL_APP_LABEL: (&str, &str) = ("app", "ztunnel");
/// Always excluded, whatever `EXCLUDE_NAMESPACES` says.
pub const KUBE_SYSTEM: &str = "kube-system";

/// The settings the decision depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// The namespace ztunnel (and the agent) run in: Istio's `POD_NAMESPACE`, usually
    /// `istio-system`.
    pub system_namespace: String,
    /// Namespaces whose pods are never enrolled: `kube-system` plus `EXCLUDE_NAMESPACES`.
    pub exclude_namespaces: BTreeSet<String>,
}

impl PolicySettings {
    /// `exclude` is Istio's `EXCLUDE_NAMESPACES`: a comma-separated list (blanks ignored).
    pub fn new(system_namespace: impl Into<String>, exclude: &str) -> Self {
        let mut exclude_namespaces: BTreeSet<String> = exclude
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        exclude_namespaces.insert(KUBE_SYSTEM.to_string());
        PolicySettings {
            system_namespace: system_namespace.into(),
            exclude_namespaces,
        }
    }
}

/// What to do with one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Enroll(PodOptions),
    Skip(Skip),
}

impl Decision {
    pub fn is_enroll(&self) -> bool {
        matches!(self, Decision::Enroll(_))
    }
}

/// Per-pod settings from annotations; they map one to one onto an enroll request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodOptions {
    /// `None`: the agent's default (`AMBIENT_DNS_CAPTURE`).
    pub dns_capture: Option<bool>,
    pub bypass_inbound: bool,
}

/// Why a pod is not enrolled, in the order the rules are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Phase Succeeded or Failed: its processes are gone.
    Terminal,
    HostNetwork,
    Ztunnel,
    ExcludedNamespace,
    /// Neither the namespace nor the pod asks for ambient.
    NotAmbient,
    /// The pod label says `none`.
    OptedOut,
    Sidecar,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Terminal => "terminal",
            Skip::HostNetwork => "host-network",
            Skip::Ztunnel => "ztunnel",
            Skip::ExcludedNamespace => "excluded-namespace",
            Skip::NotAmbient => "not-ambient",
            Skip::OptedOut => "opted-out",
            Skip::Sidecar => "sidecar",
        }
    }
}

/// The enrollment decision for `pod`, which lives in `namespace`.
pub fn decide(pod: &Pod, namespace: &Namespace, settings: &PolicySettings) -> Decision {
    let pod_ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Decision::Skip(Skip::Terminal);
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Decision::Skip(Skip::HostNetwork);
    }
    if is_ztunnel(pod, settings) {
        return Decision::Skip(Skip::Ztunnel);
    }
    if settings.exclude_namespaces.contains(pod_ns) {
        return Decision::Skip(Skip::ExcludedNamespace);
    }
    let pod_mode = label(pod.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL);
    let ns_mode = label(namespace.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL);
    if ns_mode != Some(MODE_AMBIENT) && pod_mode != Some(MODE_AMBIENT) {
        return Decision::Skip(Skip::NotAmbient);
    }
    if pod_mode == Some(MODE_NONE) {
        return Decision::Skip(Skip::OptedOut);
    }
    if has_sidecar(pod) {
        return Decision::Skip(Skip::Sidecar);
    }
    Decision::Enroll(pod_options(pod))
}

/// Annotation values the decision ignored because they are not booleans, as
/// `(annotation, value)`: worth a log line or an Event, since the pod's owner meant something.
pub fn ignored_annotations(pod: &Pod) -> Vec<(&'static str, String)> {
    [BYPASS_INBOUND_ANNOTATION, DNS_CAPTURE_ANNOTATION]
        .into_iter()
        .filter_map(|key| {
            let v = annotation(pod, key)?;
            parse_go_bool(v).is_none().then(|| (key, v.to_string()))
        })
        .collect()
}

fn pod_options(pod: &Pod) -> PodOptions {
    let flag = |key| annotation(pod, key).and_then(parse_go_bool);
    PodOptions {
        dns_capture: flag(DNS_CAPTURE_ANNOTATION),
        bypass_inbound: flag(BYPASS_INBOUND_ANNOTATION).unwrap_or(false),
    }
}

fn is_ztunnel(pod: &Pod, settings: &PolicySettings) -> bool {
    let (key, value) = ZTUNNEL_APP_LABEL;
    pod.metadata.namespace.as_deref() == Some(settings.system_namespace.as_str())
        && label(pod.metadata.labels.as_ref(), key) == Some(value)
}

fn has_sidecar(pod: &Pod) -> bool {
    annotation(pod, SIDECAR_STATUS_ANNOTATION).is_some()
        || pod.spec.as_ref().is_some_and(|s| {
            // Native sidecars (restartable init containers) count too.
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == SIDECAR_CONTAINER)
        })
}

fn label<'a>(
    labels: Option<&'a std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels?.get(key).map(String::as_str)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    label(pod.metadata.annotations.as_ref(), key)
}

/// Go's `strconv.ParseBool`, which is how Istio reads these annotations.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    const SYSTEM: &str = "istio-system";

    fn settings() -> PolicySettings {
        PolicySettings::new(SYSTEM, "excluded-a, excluded-b,,")
    }

    /// A pod described by a few words; every rule below changes one thing of a plain pod.
    #[derive(Clone, Default)]
    struct P {
        ns: &'static str,
        labels: &'static [(&'static str, &'static str)],
        annotations: &'static [(&'static str, &'static str)],
        containers: &'static [&'static str],
        init_containers: &'static [&'static str],
        host_network: bool,
        phase: &'static str,
    }

    fn map(pairs: &[(&str, &str)]) -> Option<std::collections::BTreeMap<String, String>> {
        (!pairs.is_empty()).then(|| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    fn containers(names: &[&str]) -> Vec<Container> {
        names
            .iter()
            .map(|n| Container {
                name: n.to_string(),
                ..Default::default()
            })
            .collect()
    }

    fn pod(p: &P) -> Pod {
        let app = if p.containers.is_empty() {
            &["app"][..]
        } else {
            p.containers
        };
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(if p.ns.is_empty() { "apps" } else { p.ns }.into()),
                labels: map(p.labels),
                annotations: map(p.annotations),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: containers(app),
                init_containers: (!p.init_containers.is_empty())
                    .then(|| containers(p.init_containers)),
                host_network: p.host_network.then_some(true),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(
                    if p.phase.is_empty() {
                        "Running"
                    } else {
                        p.phase
                    }
                    .into(),
                ),
                ..Default::default()
            }),
        }
    }

    fn namespace(name: &str, mode: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: mode.map(|m| [(DATAPLANE_MODE_LABEL.to_string(), m.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    const AMBIENT: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, MODE_AMBIENT)];
    const NONE: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, MODE_NONE)];
    const ENROLL: Decision = Decision::Enroll(PodOptions {
        dns_capture: None,
        bypass_inbound: false,
    });

    /// (case, pod, namespace label, expected decision)
    #[rustfmt::skip]
    fn table() -> Vec<(&'static str, P, Option<&'static str>, Decision)> {
        use Skip::*;
        let d = P::default();
        vec![
            ("plain pod, plain namespace", d.clone(), None, Decision::Skip(NotAmbient)),
            ("ambient namespace", d.clone(), Some(MODE_AMBIENT), ENROLL),
            ("namespace label with another value", d.clone(), Some("sidecar"), Decision::Skip(NotAmbient)),
            ("namespace label none", d.clone(), Some(MODE_NONE), Decision::Skip(NotAmbient)),
            ("pod opts in", P { labels: AMBIENT, ..d.clone() }, None, ENROLL),
            ("pod opts in, namespace says none", P { labels: AMBIENT, ..d.clone() }, Some(MODE_NONE), ENROLL),
            ("pod opts out in an ambient namespace", P { labels: NONE, ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(OptedOut)),
            ("pod none in a plain namespace", P { labels: NONE, ..d.clone() }, None, Decision::Skip(NotAmbient)),
            ("hostNetwork", P { host_network: true, ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(HostNetwork)),
            ("hostNetwork, pod opts in", P { host_network: true, labels: AMBIENT, ..d.clone() }, None, Decision::Skip(HostNetwork)),
            ("sidecar status annotation", P { annotations: &[(SIDECAR_STATUS_ANNOTATION, "{}")], ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(Sidecar)),
            ("istio-proxy container", P { containers: &["app", SIDECAR_CONTAINER], ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(Sidecar)),
            ("istio-proxy native sidecar", P { init_containers: &[SIDECAR_CONTAINER], ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(Sidecar)),
            ("ztunnel in the system namespace", P { ns: SYSTEM, labels: &[("app", "ztunnel")], ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(Ztunnel)),
            ("ztunnel labelled ambient itself", P { ns: SYSTEM, labels: &[("app", "ztunnel"), (DATAPLANE_MODE_LABEL, MODE_AMBIENT)], ..d.clone() }, None, Decision::Skip(Ztunnel)),
            ("app=ztunnel elsewhere is an ordinary pod", P { labels: &[("app", "ztunnel")], ..d.clone() }, Some(MODE_AMBIENT), ENROLL),
            ("another pod of the system namespace", P { ns: SYSTEM, ..d.clone() }, Some(MODE_AMBIENT), ENROLL),
            ("kube-system", P { ns: KUBE_SYSTEM, ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(ExcludedNamespace)),
            ("kube-system, pod opts in", P { ns: KUBE_SYSTEM, labels: AMBIENT, ..d.clone() }, None, Decision::Skip(ExcludedNamespace)),
            ("EXCLUDE_NAMESPACES, first", P { ns: "excluded-a", ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(ExcludedNamespace)),
            ("EXCLUDE_NAMESPACES, trimmed", P { ns: "excluded-b", ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(ExcludedNamespace)),
            ("Succeeded", P { phase: "Succeeded", ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(Terminal)),
            ("Failed", P { phase: "Failed", ..d.clone() }, Some(MODE_AMBIENT), Decision::Skip(Terminal)),
            ("Pending is enrolled (CNI ADD runs before the phase changes)", P { phase: "Pending", ..d.clone() }, Some(MODE_AMBIENT), ENROLL),
            ("bypass inbound", P { annotations: &[(BYPASS_INBOUND_ANNOTATION, "true")], ..d.clone() }, Some(MODE_AMBIENT),
                Decision::Enroll(PodOptions { dns_capture: None, bypass_inbound: true })),
            ("bypass inbound, Go spelling", P { annotations: &[(BYPASS_INBOUND_ANNOTATION, "T")], ..d.clone() }, Some(MODE_AMBIENT),
                Decision::Enroll(PodOptions { dns_capture: None, bypass_inbound: true })),
            ("bypass inbound false", P { annotations: &[(BYPASS_INBOUND_ANNOTATION, "false")], ..d.clone() }, Some(MODE_AMBIENT), ENROLL),
            ("bypass inbound garbage is ignored", P { annotations: &[(BYPASS_INBOUND_ANNOTATION, "yes")], ..d.clone() }, Some(MODE_AMBIENT), ENROLL),
            ("dns capture off", P { annotations: &[(DNS_CAPTURE_ANNOTATION, "false")], ..d.clone() }, Some(MODE_AMBIENT),
                Decision::Enroll(PodOptions { dns_capture: Some(false), bypass_inbound: false })),
            ("dns capture on", P { annotations: &[(DNS_CAPTURE_ANNOTATION, "1")], ..d.clone() }, Some(MODE_AMBIENT),
                Decision::Enroll(PodOptions { dns_capture: Some(true), bypass_inbound: false })),
            ("dns capture garbage keeps the default", P { annotations: &[(DNS_CAPTURE_ANNOTATION, "off")], ..d.clone() }, Some(MODE_AMBIENT), ENROLL),
            ("both overrides", P { annotations: &[(DNS_CAPTURE_ANNOTATION, "False"), (BYPASS_INBOUND_ANNOTATION, "TRUE")], ..d.clone() }, Some(MODE_AMBIENT),
                Decision::Enroll(PodOptions { dns_capture: Some(false), bypass_inbound: true })),
            ("overrides on a pod that is not enrolled", P { annotations: &[(DNS_CAPTURE_ANNOTATION, "true")], ..d.clone() }, None, Decision::Skip(NotAmbient)),
        ]
    }

    #[test]
    fn every_rule() {
        let s = settings();
        for (case, p, ns_mode, want) in table() {
            let pod = pod(&p);
            let ns = namespace(pod.metadata.namespace.as_deref().unwrap(), ns_mode);
            assert_eq!(decide(&pod, &ns, &s), want, "{case}");
        }
    }

    #[test]
    fn kube_system_is_excluded_even_with_an_empty_list() {
        let s = PolicySettings::new(SYSTEM, "");
        assert_eq!(
            s.exclude_namespaces,
            BTreeSet::from([KUBE_SYSTEM.to_string()])
        );
    }

    #[test]
    fn a_pod_without_spec_or_status_is_decided_from_labels() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("apps".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = settings();
        assert_eq!(
            decide(&pod, &namespace("apps", Some(MODE_AMBIENT)), &s),
            ENROLL
        );
        assert_eq!(
            decide(&pod, &namespace("apps", None), &s),
            Decision::Skip(Skip::NotAmbient)
        );
    }

    #[test]
    fn non_boolean_annotations_are_reported() {
        let p = pod(&P {
            annotations: &[
                (BYPASS_INBOUND_ANNOTATION, "yes"),
                (DNS_CAPTURE_ANNOTATION, "true"),
            ],
            ..Default::default()
        });
        assert_eq!(
            ignored_annotations(&p),
            vec![(BYPASS_INBOUND_ANNOTATION, "yes".to_string())]
        );
    }
}
