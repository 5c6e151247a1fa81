//! Sluice's node agent.
//!
//! - [`dataplane`]: the eBPF programs, pins, and per-pod enrollment;
//! - [`agent`]: the pod table and its operations; [`state`]: its persistence;
//! - [`zds`]: the ZDS server ztunnel connects to; [`control`]: the control socket;
//! - [`http`], [`metrics`], [`status`], [`trace`]: health, Prometheus metrics, inspection;
//! - [`cli`], [`run`], [`uninstall`], [`logging`]: the `sluice-agent` command.
pub mod agent;
pub mod cli;
pub mod control;
pub mod dataplane;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod run;
pub mod shutdown;
pub mod state;
pub mod status;
pub mod trace;
pub mod uninstall;
pub mod zds;
