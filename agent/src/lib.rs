//! Sluice's node agent.
//!
//! - [`dataplane`]: the eBPF programs, pins, and per-pod enrollment;
//! - [`agent`]: the pod table and its operations; [`state`]: its persistence;
//!   [`recovery`]: finishing what a crash interrupted; [`pod_locks`]: one operation per pod;
//! - [`zds`]: the ZDS server ztunnel connects to; [`control`]: the control socket;
//! - [`k8s`]: Kubernetes watches, enrollment policy, /proc netns scan, annotations, taint;
//! - [`http`], [`metrics`], [`status`], [`trace`]: health, Prometheus metrics, inspection;
//! - [`cli`], [`run`], [`uninstall`], [`logging`], [`preflight`]: the `sluice-agent` command;
//! - [`cni`]: the `sluice-cni` plugin; [`cni_ops`]: the agent's side of its requests;
//!   [`policy`]: which pods are enrolled (standalone or Kubernetes); [`cni_install`]:
//!   installing the plugin and its conflist entry; [`readiness`]: conditions `/readyz` waits
//!   for;
//! - [`reconcile`]: Kubernetes mode's reconciler (desired state from the caches, one work
//!   queue per pod UID).
pub mod agent;
pub mod cli;
pub mod cni;
pub mod cni_install;
pub mod cni_ops;
pub mod control;
pub mod dataplane;
pub mod failpoints;
pub mod http;
pub mod k8s;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod pod_locks;
pub mod policy;
pub mod preflight;
pub mod readiness;
pub mod reconcile;
pub mod recovery;
pub mod run;
pub mod shutdown;
pub mod state;
pub mod status;
pub mod trace;
pub mod uninstall;
pub mod zds;
