//! Kubernetes: the pieces a per-pod reconciler is built from.
//!
//! - [`policy`]: which pods are in the mesh (Istio's labels and annotations), a pure function;
//! - [`watch`]: caches of this node's pods and all namespaces, and a stream of pods to
//!   reconcile (kube-runtime watchers: bookmarks, relist on 410 Gone, backoff);
//! - [`procscan`]: a running pod's network namespace, found through `/proc` and verified
//!   against the pod's IPs;
//! - [`annotate`]: the `ambient.istio.io/redirection` annotation and Events on pods;
//! - [`node_taint`]: the startup taint removed once the agent is ready.
pub mod annotate;
pub mod node_taint;
pub mod policy;
pub mod procscan;
pub mod watch;

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

/// A client from the environment: in a pod, its service account; elsewhere `KUBECONFIG` or
/// `~/.kube/config`.
pub async fn connect() -> Result<kube::Client, kube::Error> {
    kube::Client::try_default().await
}

/// A client from a kubeconfig file.
pub async fn connect_with(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("using {}", kubeconfig.display()))?;
    Ok(kube::Client::try_from(config)?)
}

/// Whether this process runs in a Kubernetes pod (the kubelet sets this for every container).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// The pod's IPs as Kubernetes reports them (`status.podIPs`, else `status.podIP`); empty
/// until the runtime's CNI ADD has finished and the kubelet has reported them.
pub fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, BadPodIp> {
    let Some(status) = &pod.status else {
        return Ok(Vec::new());
    };
    let listed: Vec<&str> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    listed
        .into_iter()
        .map(|s| s.parse().map_err(|_| BadPodIp(s.to_string())))
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the pod's status has an IP that does not parse: {0:?}")]
pub struct BadPodIp(pub String);

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodStatus};

    use super::*;

    fn pod(pod_ip: Option<&str>, pod_ips: &[&str]) -> Pod {
        Pod {
            status: Some(PodStatus {
                pod_ip: pod_ip.map(str::to_string),
                pod_ips: (!pod_ips.is_empty()).then(|| {
                    pod_ips
                        .iter()
                        .map(|ip| PodIP { ip: ip.to_string() })
                        .collect()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pod_ips_prefer_the_list() {
        let ips = pod_ips(&pod(Some("10.0.0.1"), &["10.0.0.1", "fd00::1"])).unwrap();
        assert_eq!(
            ips,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(pod_ips(&pod(Some("10.0.0.2"), &[])).unwrap().len(), 1);
        assert!(pod_ips(&pod(None, &[])).unwrap().is_empty());
        assert!(pod_ips(&Pod::default()).unwrap().is_empty());
        assert_eq!(
            pod_ips(&pod(Some("10.0.0.300"), &[])),
            Err(BadPodIp("10.0.0.300".into()))
        );
    }
}
