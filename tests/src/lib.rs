//! Test support for Sluice's privileged integration tests.
//!
//! - [`harness`]: guards for network namespaces, veth topologies, cgroups and bpffs,
//!   plus typed clients for the `sluice-testkit` helper processes and raw BPF queries.
//! - [`peer`]: a ztunnel-like listener set ("inpod" mode) that can be created inside
//!   any network namespace; the `sluice-testkit peer` subcommand is one user of it.
//! - [`testkit`]: the rest of the `sluice-testkit` binary (the `app` command server).
//! - [`kube`]: a real kube-apiserver and etcd on loopback, and helpers for its objects;
//!   [`kube_node`]: a node of it with the agent in Kubernetes mode and pods with processes.
//! - [`sockets`], [`dns`]: small socket and DNS helpers shared by the above.
//! - [`cni_runtime`]: a runtime's CNI side in miniature, to run plugin chains as libcni does;
//!   [`containerd`], [`pause_image`]: a real containerd and the sandbox image it runs.
//! - [`deploy`]: the real Helm engine, the manifests as API objects, the agent's image.

pub mod agent_proc;
pub mod cni_runtime;
pub mod containerd;
pub mod deploy;
pub mod dns;
pub mod fixture;
pub mod harness;
pub mod kube;
pub mod kube_node;
pub mod pause_image;
pub mod peer;
pub mod sockets;
pub mod testkit;
pub mod zds;
