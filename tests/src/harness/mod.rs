//! Building blocks for privileged integration tests: real network namespaces, veth
//! topologies, cgroups, bpffs directories, helper processes and raw BPF queries.
//!
//! Every resource is a guard that cleans up in `Drop` (also when a test panics) and is
//! named with [`unique`], so tests can run in parallel. Nothing here adds routes,
//! addresses or interfaces to the host network namespace: traffic stays in namespaces
//! without a default route, so anything mis-steered fails with ENETUNREACH.

mod app;
mod bpf;
mod bpffs;
mod cgroup;
mod command;
mod kubelet_cgroup;
mod mounts;
mod names;
mod netns;
mod peer;
mod privilege;
mod process;
mod topology;

pub use app::{App, ConnectOptions, ConnectResult, DnsResult, LoopStats};
pub use bpf::{
    BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT, BPF_SK_LOOKUP, ForeignCgroupProg,
    ForeignSkLookupProg, cgroup_attached_prog_ids, prog_ids_attached_to, prog_name,
    sk_lookup_prog_names,
};
pub use bpffs::{BPFFS_ROOT, Bpffs, ensure_bpffs_mounted};
pub use cgroup::{Cgroup, cgroup2_mount};
pub use command::ip;
pub use kubelet_cgroup::{CgroupLayout, KubeletCgroup};
pub use names::unique;
pub use netns::{Netns, list_netns, run_in_netns};
pub use peer::Peer;
pub use privilege::require_root;
pub use process::{DEFAULT_TIMEOUT, Proc, sibling_binary, testkit_path};
pub use topology::{Pod, Topology};
