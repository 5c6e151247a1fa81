//! A real Kubernetes API server for tests: etcd and kube-apiserver v1.20.2 on loopback, with
//! their own ports, data directory, CA and tokens, stopped and cleaned up on drop.
//!
//! The binaries come from `cargo xtask kube-apiserver` (built once, cached outside the
//! clone; `cargo xtask test` builds them first and passes their directory in
//! `SLUICE_KUBE_BIN_DIR`). There is no kubelet, scheduler or controller-manager: pods are
//! bound by setting `spec.nodeName`, their status is whatever a test patches in, and they
//! stay Terminating after a graceful delete, so tests force-delete them.
//!
//! Outages are real: [`KubeServer::stop_apiserver`] / [`KubeServer::start_apiserver`] and the
//! etcd equivalents kill and restart the processes. A server can run several API servers on
//! one etcd, so a test can change the cluster through one while a client of the other is
//! cut off; a restarted API server's watch cache starts at the current revision, so a
//! watch resumed from before answers 410 Gone, as a real cluster does.
mod bins;
mod certs;
mod launcher;
mod netns_proxy;
pub mod objects;
mod server;
pub mod shared;

pub use bins::KubeBins;
pub use netns_proxy::NetnsProxy;
pub use server::{KubeServer, User};
pub use shared::TestFn;
