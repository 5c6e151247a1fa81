//! Sluice's node agent: the eBPF dataplane, and (in later modules) the ZDS server for ztunnel,
//! the enrollment API for the CNI plugin, health, metrics and inspection.
pub mod dataplane;
pub mod netns;
